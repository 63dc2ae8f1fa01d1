//! Stored segments and the segment change feed the live index follows.

use crate::clock::Millis;
use crate::ids::WorkspaceId;
use crate::segments::{FeedPosition, ProfileChanges, ProfileSnapshot, Segment};

use super::StoreFuture;

/// A held [`SegmentStore::lock_segment_definitions`]: whatever the backend needs kept alive
/// (a mutex guard, a database session); dropping it releases the lock.
pub struct DefinitionsLock {
    /// Never read: it is kept only to be dropped.
    _held: Box<dyn Send + Sync>,
}

impl DefinitionsLock {
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        DefinitionsLock {
            _held: Box::new(held),
        }
    }
}

impl std::fmt::Debug for DefinitionsLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DefinitionsLock")
    }
}

/// Segments and the feed. Each method is one transaction.
///
/// The feed is defined by [`crate::segments::LiveIndex::apply`]: applying
/// `segment_profile_changes(after)` to an index built from `segment_profiles()` at `after` must
/// answer every filter as a full load at the returned position would (the conformance suite and
/// the differential proptest in `tideway-store` hold every backend to it).
pub trait SegmentStore: Send + Sync {
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
    /// Waits for, and takes, the workspace's segment definitions lock: held by a segment
    /// change from the checks it makes against the other segments (`in_segment` references
    /// exist, no cycle) to its write, so two changes cannot each pass their checks and together
    /// save a cycle or a reference to a deleted segment. Exclusive between every process on
    /// the same database, not only within one. Dropping the guard releases it.
    fn lock_segment_definitions(&self, workspace: WorkspaceId) -> StoreFuture<'_, DefinitionsLock>;
    /// Every live user of the workspace as segment evaluation sees them, at one consistent
    /// point that includes every write acknowledged before the call.
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
