//! The Canvas context: stored Canvases and their versions, each user's journey (their place
//! in a Canvas, which is also its timer), the journeys' inboxes, entry receipts, per-step
//! counts and the Canvas engine's log cursor.
//!
//! Every method is one transaction, and events passed in are appended to the workspace's
//! event log in that transaction (the log-order rule of [`crate::store`]).
//!
//! **Journeys are timers.** A journey row carries `wake_at`, the time it must be looked at:
//! its step's own timer ([`Journey::due_at`]: a Delay's end, an Action Paths window's end),
//! or earlier when an event it may care about was put in its inbox. A worker *claims* due
//! journeys with a lease ([`CanvasStore::claim_journeys`]: oldest `wake_at` first, so late
//! timers after a restart fire at once and in order; only journeys of active Canvases) and
//! *settles* each ([`CanvasStore::settle_journeys`]: new position or end, inbox consumed,
//! events, message sends, counts — one transaction, fenced by the lease and the journey's
//! entry id). Several nodes share the work through the leases; a crash leaves leases that
//! run out (or that the restarted node releases at once), and the journey is processed
//! again from its last settled position.
//!
//! **Message steps use the send queue.** A settlement's [`CanvasSend`]s are written into the
//! messaging context's queue (`sends`), each under a dispatch of the step's (created on first
//! use), so the dispatcher delivers Canvas messages like any other.

use serde_json::Value;

use crate::campaigns::CampaignStatus;
use crate::canvas::{Happening, Journey};
use crate::clock::Millis;
use crate::currents::CurrentsEvent;
use crate::ids::{UserSeq, WorkspaceId};
use crate::track::TrackRequest;

use super::StoreFuture;
use super::Workspace;
use super::messaging::{DispatchRecord, SegmentTracker, SendCounts, SendJob, TriggerCursor};
use crate::segments::FeedPosition;

/// A stored Canvas: its current definition and version, and its lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub struct CanvasRecord {
    /// A UUID, unique across workspaces (Braze's `canvas_id`).
    pub id: String,
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    /// Draft, Active, Paused or Stopped (the campaign lifecycle).
    pub status: CampaignStatus,
    /// The current version (1 for a new Canvas); every definition edit adds one.
    pub version: u32,
    /// The current version's canonical definition.
    pub definition: Value,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub launched_at: Option<Millis>,
    /// Scheduled entry: the next occurrence not yet entered.
    pub next_run: Option<Millis>,
    /// First and last entry of any user; total entries (kept by [`CanvasStore::enter_canvas`]).
    pub first_entry: Option<Millis>,
    pub last_entry: Option<Millis>,
    pub entries: u64,
}

/// A named recipient of a scheduled Canvas entry: the user and their entry properties (JSON
/// object text, merged over the dispatch's shared ones).
#[derive(Debug, Clone, PartialEq)]
pub struct CanvasRecipient {
    pub user: UserSeq,
    pub properties: Option<String>,
}

/// A per-step figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CanvasStat {
    /// Users who arrived at the step (entry into a first step, or progression into it).
    Entered,
    /// Users who moved on from the step.
    Progressed,
    /// Users whose journey ended at the step.
    Exited,
    /// Conversions counted while at the step.
    Conversions,
}

impl CanvasStat {
    pub const ALL: [CanvasStat; 4] = [
        CanvasStat::Entered,
        CanvasStat::Progressed,
        CanvasStat::Exited,
        CanvasStat::Conversions,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CanvasStat::Entered => "entered",
            CanvasStat::Progressed => "progressed",
            CanvasStat::Exited => "exited",
            CanvasStat::Conversions => "conversions",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// One count to add: `(step id, stat)` of the item's Canvas.
pub type StepStat = (String, CanvasStat);

/// A user entering a Canvas.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEntry {
    pub canvas_id: String,
    pub user: UserSeq,
    /// The journey to start (its `due_at` is when its first step runs); `None` for a user
    /// put in the control group (the entry is recorded, no journey).
    pub journey: Option<Journey>,
    /// Re-entry: `None` means once ever; `Some(ms)`: again `ms` after the last entry. Never
    /// while a journey of this Canvas is under way.
    pub reentry_after_ms: Option<i64>,
    /// Most entries of the Canvas in total.
    pub entry_limit: Option<u64>,
    /// Events of the entry (`users.canvas.Entry`, the entry Progression), appended about the
    /// user if the entry is accepted.
    pub events: Vec<CurrentsEvent>,
    pub stats: Vec<StepStat>,
}

/// An event for a journey's inbox; kept only if the user has a journey in the Canvas, whose
/// `wake_at` it moves to `at` at the latest.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxItem {
    pub canvas_id: String,
    pub user: UserSeq,
    pub happening: Happening,
}

/// One transaction of the Canvas engine's entry path: entries and inbox items, with the
/// compare-and-sets that make each stretch of log (or each scheduled occurrence) acted on
/// once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CanvasScan {
    /// Compare-and-set of the workspace's Canvas cursor: `(expected, new)`; conflict (nothing
    /// written) when it is not `expected`.
    pub cursor: Option<(TriggerCursor, TriggerCursor)>,
    /// Compare-and-set of a scheduled Canvas's next run `(canvas_id, expected, new)`.
    pub next_run: Option<(String, Option<Millis>, Option<Millis>)>,
    /// Taken in order; each sees the ones before it.
    pub entries: Vec<NewEntry>,
    pub inbox: Vec<InboxItem>,
    /// Canvas entry dispatches to create first ([`super::DispatchSource::Canvas`]: a
    /// scheduled occurrence's, created with the `next_run` compare-and-set).
    pub dispatches: Vec<DispatchRecord>,
    /// Marks a Canvas entry dispatch's expansion, with the entries of its chunk: the rule of
    /// [`super::Enqueue::expansion`] (a mark only moves forward; one that does not apply — the
    /// dispatch cancelled, the chunk entered by another node — is a conflict, nothing
    /// written), so every chunk enters once.
    pub expansion: Option<(String, Option<UserSeq>)>,
    /// Segment-entry trackers to move, keyed by the Canvas's id: the rule of
    /// [`super::Enqueue::segment_trackers`] (a compare-and-set on each position; conflict,
    /// nothing written, when one moved meanwhile), so each segment entry enters once.
    pub segment_trackers: Vec<(String, String, Option<FeedPosition>, SegmentTracker)>,
    /// Conversions of users who left their journey (see [`LateConversion`]).
    pub conversions: Vec<LateConversion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScanOutcome {
    pub entered: u64,
    /// Entries refused: journey under way, not re-eligible, entry limit reached, no such
    /// Canvas.
    pub refused: u64,
    pub inboxed: u64,
}

/// A claimed journey with the events waiting in its inbox (oldest first, with their ids).
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedJourney {
    pub workspace: WorkspaceId,
    pub canvas_id: String,
    pub user: UserSeq,
    pub journey: Journey,
    pub inbox: Vec<(i64, Happening)>,
}

/// A message step's send: the step's dispatch (created if the workspace has none of that id)
/// and the job.
#[derive(Debug, Clone, PartialEq)]
pub struct CanvasSend {
    pub dispatch: DispatchRecord,
    pub job: SendJob,
}

/// The attributes a journey's User Update steps set or increment, as a `/users/track`
/// request about the user (by `braze_id`), applied through the users context in the
/// settlement's transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct UserUpdate {
    pub workspace: Workspace,
    pub request: TrackRequest,
}

/// An ended journey's conversion windows, kept so that a conversion event after the user
/// left (exited or reached the end) still counts within the windows counted from the entry
/// (Braze's rule), once per conversion event and entry. A new entry of the user replaces it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversionWatch {
    pub entry_id: String,
    pub version: u32,
    pub variant_id: String,
    /// The step the journey ended at (the Conversion event's step).
    pub step_id: String,
    pub entered_at: Millis,
    /// Conversion events counted (bit `i` for event `i`).
    pub converted: u8,
    /// When the last window closes; the watch is forgotten after.
    pub until: Millis,
}

/// A conversion of a user who left the journey, counted against their [`ConversionWatch`]:
/// applied only if the watch of `entry_id` is there and has not counted `index`, which it
/// then marks; the events and counts are written with it.
#[derive(Debug, Clone, PartialEq)]
pub struct LateConversion {
    pub canvas_id: String,
    pub user: UserSeq,
    pub entry_id: String,
    pub index: u8,
    pub events: Vec<CurrentsEvent>,
    pub stats: Vec<StepStat>,
}

/// What became of a claimed journey.
#[derive(Debug, Clone, PartialEq)]
pub struct JourneySettlement {
    pub workspace: WorkspaceId,
    pub canvas_id: String,
    pub user: UserSeq,
    /// The claimed journey's entry id (the fence beside the lease).
    pub entry_id: String,
    /// Its new position; `None` when the journey ended (the row is deleted).
    pub journey: Option<Journey>,
    /// Inbox items up to this id were applied (deleted).
    pub inbox_upto: Option<i64>,
    pub events: Vec<CurrentsEvent>,
    pub sends: Vec<CanvasSend>,
    pub stats: Vec<StepStat>,
    /// The User Update steps the journey ran, applied through the users context in the
    /// settlement's transaction (on PostgreSQL the settlement runs inside the users context's
    /// unit of work), so an update is applied exactly when the journey moves past its step:
    /// a crash or a refused or failed settlement applies neither.
    pub user_update: Option<UserUpdate>,
    /// For a journey that ended with conversion windows still open: its watch (replacing any
    /// older one of the user in the Canvas).
    pub watch: Option<ConversionWatch>,
}

/// Per-step counts of a Canvas.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StepCounts {
    pub step_id: String,
    /// Journeys standing at the step now.
    pub in_step: u64,
    pub entered: u64,
    pub progressed: u64,
    pub exited: u64,
    pub conversions: u64,
}

/// The Canvas context's storage.
pub trait CanvasStore: Send + Sync {
    /// Stores a new Canvas and its version `record.version`.
    fn create_canvas(
        &self,
        workspace: WorkspaceId,
        record: CanvasRecord,
    ) -> StoreFuture<'_, CanvasRecord>;
    fn canvas(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, Option<CanvasRecord>>;
    /// The workspace's Canvases, oldest first (`created_at`, then `id`).
    fn list_canvases(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<CanvasRecord>>;
    /// Replaces everything but `id`, `created_at` and the entry figures; stores
    /// `record.version`'s definition if that version is new (a stored version is never
    /// rewritten). `None` if there is no such Canvas.
    fn save_canvas(
        &self,
        workspace: WorkspaceId,
        record: CanvasRecord,
    ) -> StoreFuture<'_, Option<CanvasRecord>>;
    /// Deletes the Canvas with its versions, journeys, inboxes, receipts and counts (sends
    /// already queued are kept); whether it existed.
    fn delete_canvas(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool>;
    /// A stored version's definition.
    fn canvas_version(
        &self,
        workspace: WorkspaceId,
        id: &str,
        version: u32,
    ) -> StoreFuture<'_, Option<Value>>;
    /// Every active Canvas of every workspace, by workspace, then oldest first.
    fn active_canvases(&self) -> StoreFuture<'_, Vec<(WorkspaceId, CanvasRecord)>>;
    /// The workspace's Canvas cursor (the default, never-started one until first moved; see
    /// [`TriggerCursor`]).
    fn canvas_cursor(&self, workspace: WorkspaceId) -> StoreFuture<'_, TriggerCursor>;
    /// Entries and inbox items, all or nothing (see [`CanvasScan`]). An entry is accepted
    /// when the Canvas exists, the user has no journey in it, their last entry (if any) is at
    /// least `reentry_after_ms` old (never again when `None`), and the Canvas has fewer than
    /// `entry_limit` entries; accepting it writes the journey (if any), the receipt (`now`),
    /// the Canvas's entry figures, the events and the counts, and forgets the user's
    /// conversion watch of an earlier entry. Watches whose windows closed before `now` are
    /// forgotten too.
    fn enter_canvas(
        &self,
        workspace: WorkspaceId,
        now: Millis,
        scan: CanvasScan,
    ) -> StoreFuture<'_, ScanOutcome>;
    /// Claims up to `limit` journeys of active Canvases whose `wake_at <= now` and whose lease
    /// is free or expired, oldest `wake_at` first, for `lease_ms`.
    fn claim_journeys(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<ClaimedJourney>>;
    /// Applies settlements where `owner` still holds the journey's lease and the journey is
    /// the same entry; returns how many were refused (writing nothing for them). The new
    /// position's `wake_at` is its `due_at`, or now if an inbox item arrived past
    /// `inbox_upto` meanwhile.
    fn settle_journeys(
        &self,
        owner: &str,
        now: Millis,
        settlements: Vec<JourneySettlement>,
    ) -> StoreFuture<'_, u64>;
    /// When the next journey can be claimed, as far as the 1,000 earliest `wake_at`s tell
    /// (the later of `wake_at` and a lease's end, over journeys of active Canvases); the
    /// worker also looks again after an idle period, so a hint that misses one is harmless.
    fn next_journey_due(&self) -> StoreFuture<'_, Option<Millis>>;
    /// Frees every journey lease held by `owner` (a restarting node); how many.
    fn release_journey_leases(&self, owner: &str) -> StoreFuture<'_, u64>;
    /// The conversion watches of `users` in the Canvas whose windows are open at `now`.
    fn conversion_watches(
        &self,
        workspace: WorkspaceId,
        canvas_id: &str,
        users: Vec<UserSeq>,
        now: Millis,
    ) -> StoreFuture<'_, Vec<(UserSeq, ConversionWatch)>>;
    /// Per-step counts of the Canvas, for every step that has any (in step id order).
    fn canvas_step_counts(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, Vec<StepCounts>>;
    /// Send counts of the named dispatches (zero for unknown ones), in the order given.
    fn dispatch_send_counts(
        &self,
        workspace: WorkspaceId,
        dispatch_ids: Vec<String>,
    ) -> StoreFuture<'_, Vec<SendCounts>>;
}

#[cfg(test)]
mod tests {
    use super::CanvasStat;

    #[test]
    fn stat_names_parse_back() {
        for s in CanvasStat::ALL {
            assert_eq!(CanvasStat::parse(s.as_str()), Some(s));
        }
    }
}
