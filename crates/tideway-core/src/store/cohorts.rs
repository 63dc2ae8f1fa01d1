//! Cohort reads for the management API, and the shapes of Heap's segment-sync pages. Cohort
//! *writes* are units of work ([`super::UserStore::run_unit`] over
//! [`crate::cohorts::CohortTx`]); their rules are in [`crate::cohorts`].

use crate::clock::Millis;
use crate::cohorts::{CohortChange, CohortId, MembershipOutcome};
use crate::ids::{BrazeId, ExternalId, UserSeq, WorkspaceId};

use super::StoreFuture;

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

/// What the newest membership changes did to one cohort (the Heap page's recent syncs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentCohortChanges {
    pub partner: String,
    pub cohort_id: CohortId,
    pub name: String,
    pub entered: u64,
    pub left: u64,
    /// The oldest and newest of these changes.
    pub first_at: Millis,
    pub last_at: Millis,
}

/// Cohort reads. Each method is one read transaction.
pub trait CohortStore: Send + Sync {
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
    /// The workspace's newest `last` membership changes (by log position, read backwards
    /// through the workspace's index: never the whole history), summed per cohort, the cohort
    /// changed most recently first.
    fn recent_cohort_changes(
        &self,
        workspace: WorkspaceId,
        last: usize,
    ) -> StoreFuture<'_, Vec<RecentCohortChanges>>;
    /// The cohorts of the live user with this braze_id, by partner, name, then cohort id
    /// (byte order); `None` if there is no such user.
    fn user_cohorts(
        &self,
        workspace: WorkspaceId,
        braze_id: BrazeId,
    ) -> StoreFuture<'_, Option<Vec<UserCohort>>>;
}
