//! The storage contract: what the services need from a database, and what the HTTP edge and
//! the CLI call.
//!
//! Two layers. [`UserTx`] is the set of primitive reads and writes the user services run inside
//! one transaction of one workspace (scoping the transaction to a workspace makes cross-workspace
//! access impossible by construction). [`Store`] is the async, domain-level surface: one method
//! per operation, each one transaction, so an implementation can batch many of them into a
//! group commit (SQLite) or run them on a pool (PostgreSQL) without the callers knowing.

use std::future::Future;
use std::pin::Pin;

use crate::clock::Millis;
use crate::cohorts::{CohortChange, CohortId, CohortUpsert, MembershipOutcome};
use crate::currents::CurrentsEvent;
use crate::ids::AliasLabel;
use crate::ids::{BrazeId, DeviceId, Email, ExternalId, Phone, UserAlias, UserSeq, WorkspaceId};
use crate::keys::{ApiKey, IpAllowlist, KeyHash, PermissionSet, Secret};
use crate::profile::UserRecord;
use crate::segments::{FeedPosition, ProfileChanges, ProfileSnapshot, Segment};
use crate::track::TrackRequest;
use crate::users::{
    AliasNewItem, AliasUpdateItem, DeleteOutcome, DeleteRequest, ExportOutcome, ExportRequest,
    IdentifyItem, ItemOutcome, MergeItem, RemoveOutcome, RenameItem, RenameOutcome, TrackOutcome,
};

/// What went wrong in storage, as far as a caller can act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the write could not be committed; retrying later
    /// may work. Nothing of the operation was applied.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule would be broken (e.g. a workspace name that exists).
    #[error("{0} already exists")]
    Conflict(String),
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// Stored data could not be read back (a bug or a damaged file).
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

/// A workspace (Braze's "app group").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub name: String,
    /// Stable public id, carried by Currents events as `app_group_id`.
    pub app_group_id: String,
    pub created_at: Millis,
}

/// Primitive reads inside a workspace.
pub trait UserLookup {
    /// By current `external_id`, or by a deprecated one kept after a rename.
    fn user_by_external_id(&mut self, id: &ExternalId) -> Result<Option<UserRecord>, StoreError>;
    fn user_by_alias(&mut self, alias: &UserAlias) -> Result<Option<UserRecord>, StoreError>;
    fn user_by_braze_id(&mut self, id: &BrazeId) -> Result<Option<UserRecord>, StoreError>;
    fn user_by_device(&mut self, device: &DeviceId) -> Result<Option<UserRecord>, StoreError>;
    /// Every live user with this email, most recently updated first.
    fn users_by_email(&mut self, email: &Email) -> Result<Vec<UserRecord>, StoreError>;
    /// Every live user with this phone, most recently updated first.
    fn users_by_phone(&mut self, phone: &Phone) -> Result<Vec<UserRecord>, StoreError>;
    fn aliases_of(&mut self, user: UserSeq) -> Result<Vec<UserAlias>, StoreError>;
    fn devices_of(&mut self, user: UserSeq) -> Result<Vec<DeviceId>, StoreError>;
    /// True if `id` is kept as a deprecated external id (after a rename).
    fn is_deprecated_external_id(&mut self, id: &ExternalId) -> Result<bool, StoreError>;

    /// Like [`UserLookup::user_by_external_id`] but only the sequence number; a store can
    /// answer it without loading the profile (cohort import matches a million of these).
    fn seq_by_external_id(&mut self, id: &ExternalId) -> Result<Option<UserSeq>, StoreError> {
        Ok(self.user_by_external_id(id)?.map(|u| u.seq))
    }

    /// The sequence number of the alias's user.
    fn seq_by_alias(&mut self, alias: &UserAlias) -> Result<Option<UserSeq>, StoreError> {
        Ok(self.user_by_alias(alias)?.map(|u| u.seq))
    }

    /// The sequence number of the device's user if that user is still anonymous.
    fn anonymous_seq_by_device(
        &mut self,
        device: &DeviceId,
    ) -> Result<Option<UserSeq>, StoreError> {
        Ok(self
            .user_by_device(device)?
            .filter(|u| !u.is_identified())
            .map(|u| u.seq))
    }
}

/// Primitive writes inside one transaction of one workspace. Every method's effect commits or
/// rolls back with the transaction, Currents events included.
pub trait UserTx: UserLookup {
    /// Creates an empty user with a fresh dense sequence number.
    fn create_user(&mut self, braze_id: BrazeId, now: Millis) -> Result<UserRecord, StoreError>;
    /// Creates a user with this external id (a store may do it in one write).
    fn create_user_with_external_id(
        &mut self,
        braze_id: BrazeId,
        external_id: &ExternalId,
        now: Millis,
    ) -> Result<UserRecord, StoreError> {
        let mut user = self.create_user(braze_id, now)?;
        user.external_id = Some(external_id.clone());
        self.save_user(&user)?;
        Ok(user)
    }
    /// Writes identifiers and profile back.
    fn save_user(&mut self, user: &UserRecord) -> Result<(), StoreError>;
    /// [`UserTx::save_user`] for a record the caller is done with (a store that keeps users
    /// in memory can keep this one without copying it).
    fn save_user_owned(&mut self, user: UserRecord) -> Result<(), StoreError> {
        self.save_user(&user)
    }
    /// Removes the user for good: identifiers, aliases, devices and profile are erased; the
    /// sequence number is never reused.
    fn delete_user(&mut self, user: UserSeq, now: Millis) -> Result<(), StoreError>;
    /// Gives `user` this alias (the caller has checked the pair is free and the label unused).
    fn put_alias(&mut self, user: UserSeq, alias: &UserAlias) -> Result<(), StoreError>;
    fn remove_alias(&mut self, alias: &UserAlias) -> Result<(), StoreError>;
    /// Points `device` at `user` (moving it from any other user).
    fn put_device(&mut self, user: UserSeq, device: &DeviceId) -> Result<(), StoreError>;
    /// Keeps `old` resolving to `user` after a rename, until removed.
    fn put_deprecated_external_id(
        &mut self,
        user: UserSeq,
        old: &ExternalId,
    ) -> Result<(), StoreError>;
    fn remove_deprecated_external_id(&mut self, old: &ExternalId) -> Result<bool, StoreError>;
    /// Appends to the event log, about `user` where there is one (a store may buffer it until
    /// the job ends; it commits with the job either way).
    fn append_event(
        &mut self,
        user: Option<UserSeq>,
        event: CurrentsEvent,
    ) -> Result<(), StoreError>;
    /// Moves `from`'s cohort memberships to `to` (merge: the survivor keeps the union).
    fn move_cohort_memberships(
        &mut self,
        from: UserSeq,
        to: UserSeq,
        now: Millis,
    ) -> Result<(), StoreError>;
    /// Records that `from` was merged into `into`, so history kept per user (the events the
    /// segment index counts) follows the merge.
    fn record_merge(&mut self, from: UserSeq, into: UserSeq, now: Millis)
    -> Result<(), StoreError>;
}

/// A new REST API key to store.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub workspace: WorkspaceId,
    pub name: String,
    pub prefix: String,
    pub hash: KeyHash,
    pub permissions: PermissionSet,
    pub allow: IpAllowlist,
    pub created_at: Millis,
}

/// One logged Currents event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    /// Position in the log, increasing in commit order.
    pub seq: i64,
    pub workspace: WorkspaceId,
    pub user: Option<UserSeq>,
    pub event: CurrentsEvent,
}

/// A data import key as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportKeyInfo {
    pub id: i64,
    pub workspace: WorkspaceId,
    pub partner: String,
    pub prefix: String,
    pub created_at: Millis,
    pub invalidated_at: Option<Millis>,
}

/// Who a data import key (a partner request's `client_secret`) belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportKeyOwner {
    pub workspace: Workspace,
    /// Whether the workspace has this partner enabled (import is refused otherwise).
    pub partner_enabled: bool,
}

/// A workspace's Heap segment-sync webhook settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapWebhook {
    pub workspace: Workspace,
    pub secret: Secret,
    /// `None`: Heap's ids are external ids; `Some(label)`: they are alias names under `label`.
    pub alias_label: Option<AliasLabel>,
}

/// One page of Heap's segment sync, mapped to cohort terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSyncPage {
    pub cohort_id: CohortId,
    /// The segment's name when Heap sent one (a new cohort without one is named by its id).
    pub name: Option<String>,
    /// `(sync_task_id, page_number)`: a page seen before is acknowledged without applying it
    /// again. `None` when Heap sent no sync info.
    pub page_key: Option<(String, i64)>,
    /// `segment.users.drain`: remove every member.
    pub drain: bool,
    /// Adds then removes (an id in both ends removed: heap.md §2.4 "Our choice").
    pub changes: Vec<CohortChange>,
}

/// What a segment-sync page did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentSyncOutcome {
    pub membership: MembershipOutcome,
    /// The page had been applied before; nothing was done.
    pub replayed: bool,
}

/// A cohort as the management API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortSummary {
    pub partner: String,
    pub cohort_id: CohortId,
    pub name: String,
    pub member_count: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// A member of a cohort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortMember {
    pub user: UserSeq,
    pub braze_id: BrazeId,
    pub external_id: Option<ExternalId>,
    pub entered_at: Millis,
}

/// A user's membership in one cohort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCohort {
    pub partner: String,
    pub cohort_id: CohortId,
    pub name: String,
    pub entered_at: Millis,
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// The domain-level storage surface. Each method is one transaction.
pub trait Store: Send + Sync {
    fn create_workspace(&self, name: &str, now: Millis) -> StoreFuture<'_, Workspace>;
    fn workspace_by_name(&self, name: &str) -> StoreFuture<'_, Option<Workspace>>;
    fn list_workspaces(&self) -> StoreFuture<'_, Vec<Workspace>>;

    fn create_api_key(&self, key: NewApiKey) -> StoreFuture<'_, ApiKey>;
    fn list_api_keys(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<ApiKey>>;
    /// Revokes the key with this id or visible prefix; returns whether one was revoked.
    fn revoke_api_key(
        &self,
        workspace: WorkspaceId,
        id_or_prefix: &str,
        now: Millis,
    ) -> StoreFuture<'_, bool>;
    /// Finds a live (unrevoked) key by the hash of its secret, with its workspace.
    fn find_api_key(&self, hash: KeyHash) -> StoreFuture<'_, Option<(ApiKey, Workspace)>>;

    fn track(
        &self,
        workspace: &Workspace,
        request: TrackRequest,
        now: Millis,
    ) -> StoreFuture<'_, TrackOutcome>;
    fn identify(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, IdentifyItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome>;
    fn alias_new(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, AliasNewItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome>;
    fn alias_update(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, AliasUpdateItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome>;
    fn merge_users(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, MergeItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome>;
    fn delete_users(
        &self,
        workspace: &Workspace,
        request: DeleteRequest,
        now: Millis,
    ) -> StoreFuture<'_, DeleteOutcome>;
    fn rename_external_ids(
        &self,
        workspace: &Workspace,
        items: Vec<RenameItem>,
        now: Millis,
    ) -> StoreFuture<'_, RenameOutcome>;
    fn remove_external_ids(
        &self,
        workspace: &Workspace,
        ids: Vec<ExternalId>,
    ) -> StoreFuture<'_, RemoveOutcome>;
    fn export_ids(
        &self,
        workspace: &Workspace,
        request: ExportRequest,
    ) -> StoreFuture<'_, ExportOutcome>;

    /// The operator-issued `partner_api_key` of a partner, created from `fresh` if absent.
    fn partner_api_key(&self, partner: &str, fresh: Secret, now: Millis)
    -> StoreFuture<'_, Secret>;
    /// True if `key` is the partner's current `partner_api_key` (constant-time compare).
    fn check_partner_api_key(&self, partner: &str, key: Secret) -> StoreFuture<'_, bool>;
    /// Stores a new data import key for (workspace, partner) and enables the partner there.
    fn create_import_key(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        secret: &Secret,
        now: Millis,
    ) -> StoreFuture<'_, ImportKeyInfo>;
    fn list_import_keys(
        &self,
        workspace: WorkspaceId,
        partner: &str,
    ) -> StoreFuture<'_, Vec<ImportKeyInfo>>;
    /// Invalidates the key with this id or prefix at once; returns whether one was.
    fn invalidate_import_key(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        id_or_prefix: &str,
        now: Millis,
    ) -> StoreFuture<'_, bool>;
    fn set_partner_enabled(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        enabled: bool,
    ) -> StoreFuture<'_, ()>;
    /// The workspace owning a valid data import key for `partner`.
    fn find_import_key(
        &self,
        partner: &str,
        hash: KeyHash,
    ) -> StoreFuture<'_, Option<ImportKeyOwner>>;
    /// The workspace's Heap webhook settings, creating the secret from `fresh` if absent;
    /// `alias_label` (when `Some`) replaces the id mapping.
    fn heap_webhook(
        &self,
        workspace: WorkspaceId,
        fresh: Secret,
        alias_label: Option<Option<AliasLabel>>,
    ) -> StoreFuture<'_, HeapWebhook>;
    /// Every workspace's Heap webhook settings (to find the one whose secret signed a request).
    fn heap_webhooks(&self) -> StoreFuture<'_, Vec<HeapWebhook>>;

    fn upsert_cohort(
        &self,
        workspace: &Workspace,
        partner: &str,
        upsert: CohortUpsert,
        now: Millis,
    ) -> StoreFuture<'_, ()>;
    /// Applies membership deltas; creates the cohort (named by its id) if it is new and there
    /// is something to apply.
    fn apply_cohort_changes(
        &self,
        workspace: &Workspace,
        partner: &str,
        cohort_id: CohortId,
        changes: Vec<CohortChange>,
        now: Millis,
    ) -> StoreFuture<'_, MembershipOutcome>;
    fn apply_segment_sync(
        &self,
        workspace: &Workspace,
        partner: &str,
        page: SegmentSyncPage,
        now: Millis,
    ) -> StoreFuture<'_, SegmentSyncOutcome>;
    fn list_cohorts(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<CohortSummary>>;
    /// Members in `seq` order after `after`; `None` if the cohort does not exist.
    fn cohort_members(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        cohort_id: CohortId,
        after: u32,
        limit: usize,
    ) -> StoreFuture<'_, Option<Vec<CohortMember>>>;
    /// `None` if no live user has this braze_id.
    fn user_cohorts(
        &self,
        workspace: WorkspaceId,
        braze_id: BrazeId,
    ) -> StoreFuture<'_, Option<Vec<UserCohort>>>;

    /// Events of a workspace after log position `after`, oldest first.
    fn read_events(
        &self,
        workspace: WorkspaceId,
        after: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<LoggedEvent>>;

    /// Stores a new segment (the caller chose its id and validated its filter).
    fn create_segment(&self, workspace: WorkspaceId, segment: Segment) -> StoreFuture<'_, Segment>;
    fn segment(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, Option<Segment>>;
    /// The workspace's segments, oldest first.
    fn list_segments(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<Segment>>;
    /// Replaces name and filter; `None` if there is no such segment.
    fn update_segment(
        &self,
        workspace: WorkspaceId,
        id: &str,
        name: String,
        filter: serde_json::Value,
        now: Millis,
    ) -> StoreFuture<'_, Option<Segment>>;
    /// Returns whether a segment was deleted.
    fn delete_segment(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool>;
    /// Every live user of the workspace as segment evaluation sees them, at one consistent point.
    fn segment_profiles(&self, workspace: WorkspaceId) -> StoreFuture<'_, ProfileSnapshot>;
    /// What changed after `after`, as increments ([`ProfileChanges`]): current attributes of
    /// users whose attributes or identifiers changed, custom-event and purchase occurrences in
    /// log order, cohort deltas, removed users, and whole profiles only where increments cannot
    /// say it (a merge's survivor). Applying it to an index at `after` gives the index a full
    /// load at the returned position would.
    fn segment_profile_changes(
        &self,
        workspace: WorkspaceId,
        after: FeedPosition,
    ) -> StoreFuture<'_, ProfileChanges>;
    /// How far the workspace's change feed reaches: everything acknowledged so far is at or
    /// before it. Cheap (no flush, no profile read), so a reader can ask it on every request
    /// and wait for its index to pass it.
    fn segment_feed_head(&self, workspace: WorkspaceId) -> StoreFuture<'_, FeedPosition>;
}
