//! Workspaces, REST API keys, partner keys, data import keys and Heap webhook settings: the
//! small, mostly cross-workspace lookups every request starts with.

use crate::clock::Millis;
use crate::ids::{AliasLabel, WorkspaceId};
use crate::keys::{ApiKey, IpAllowlist, KeyHash, PermissionSet, Secret};

use super::{StoreFuture, Workspace};

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

/// A data import key as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportKeyInfo {
    pub id: i64,
    pub workspace: WorkspaceId,
    pub partner: String,
    pub prefix: String,
    pub created_at: Millis,
    pub invalidated_at: Option<Millis>,
    /// When a partner request last authenticated with it (to the minute; `None`: never).
    pub last_used_at: Option<Millis>,
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

/// Workspaces and credentials. Each method is one transaction; a change is visible to every
/// node at once (nothing here is cached in a process).
pub trait AdminStore: Send + Sync {
    fn create_workspace(&self, name: &str, now: Millis) -> StoreFuture<'_, Workspace>;
    fn workspace_by_name(&self, name: &str) -> StoreFuture<'_, Option<Workspace>>;
    fn list_workspaces(&self) -> StoreFuture<'_, Vec<Workspace>>;
    /// Whether the database takes writes now (`/health`): `false` when it answers but refuses
    /// them (a read-only or standby PostgreSQL, a SQLite store recovering from a failed write),
    /// an error when it does not answer.
    fn accepts_writes(&self) -> StoreFuture<'_, bool>;

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
    /// Whether the workspace has `partner` enabled (never set: disabled).
    fn partner_enabled(&self, workspace: WorkspaceId, partner: &str) -> StoreFuture<'_, bool>;
    /// Records that a partner request authenticated with this key at `now`; writes only when
    /// the recorded use is a minute older or more, so a burst of imports costs one write.
    fn touch_import_key(&self, partner: &str, hash: KeyHash, now: Millis) -> StoreFuture<'_, ()>;
    /// The workspace owning a valid data import key for `partner`.
    fn find_import_key(
        &self,
        partner: &str,
        hash: KeyHash,
    ) -> StoreFuture<'_, Option<ImportKeyOwner>>;
    /// The workspace's Heap webhook settings, creating the secret from `fresh` if absent, and
    /// enabling Heap for the workspace unless it was ever enabled or disabled before (a webhook
    /// secret enables Heap as a data import key does); `alias_label` (when `Some`) replaces the
    /// id mapping.
    fn heap_webhook(
        &self,
        workspace: WorkspaceId,
        fresh: Secret,
        alias_label: Option<Option<AliasLabel>>,
    ) -> StoreFuture<'_, HeapWebhook>;
    /// Every workspace's Heap webhook settings (to find the one whose secret signed a request).
    fn heap_webhooks(&self) -> StoreFuture<'_, Vec<HeapWebhook>>;
}
