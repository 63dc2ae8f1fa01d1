//! The messaging context: stored campaigns, dispatches, the durable send queue, per-user
//! campaign receipts, the trigger engine's cursor and segment trackers, and the reads the
//! dispatcher needs.
//!
//! Every method is one transaction. Events passed in (EnrollInControl, Send, Failure, Abort, …)
//! are appended to the workspace's event log **in the same transaction** as the state change
//! they describe, under the same log-order rule as every other append (see [`crate::store`]).
//!
//! The queue: a send is a row (`pending`, due at a time) that a dispatcher *claims* with a lease
//! ([`MessagingStore::claim_sends`]); whatever happens to the attempt is *settled*
//! ([`MessagingStore::settle_sends`]) fenced by the lease owner, so a node that lost its lease
//! (it stalled, another took over) cannot write a second outcome. A crash leaves claimed rows
//! whose lease expires and are claimed again: at most the messages in flight are sent twice,
//! and they carry the same idempotency key (the send's id).
//!
//! Receipts make "a user receives a campaign once, or again after the re-eligibility
//! window" hold under concurrency: [`NewSend::receipt`] is taken with a conditional upsert in
//! the enqueue transaction, and an item whose receipt is refused is skipped whole.

use serde_json::Value;

use crate::campaigns::CampaignStatus;
use crate::clock::Millis;
use crate::currents::CurrentsEvent;
use crate::ids::{UserSeq, WorkspaceId};
use crate::profile::UserRecord;
use crate::segments::FeedPosition;

use super::StoreFuture;

/// A stored campaign: its canonical definition ([`crate::campaigns::CampaignDefinition`]'s
/// JSON) and its lifecycle.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignRecord {
    /// A UUID, unique across workspaces (Braze's `campaign_id`).
    pub id: String,
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    pub status: CampaignStatus,
    pub definition: Value,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// When it was last launched: triggers before it never start a send.
    pub launched_at: Option<Millis>,
    /// Scheduled delivery: the next occurrence not yet dispatched.
    pub next_run: Option<Millis>,
    /// When a send of one of its dispatches was first and last settled
    /// [`SendState::Sent`] (the settlement's `now`); kept up by
    /// [`MessagingStore::settle_sends`].
    pub first_sent: Option<Millis>,
    pub last_sent: Option<Millis>,
}

/// Where a dispatch's messages come from.
#[derive(Debug, Clone, PartialEq)]
pub enum DispatchSource {
    /// A stored campaign (its current definition is read when each message is sent).
    Campaign { campaign_id: String },
    /// An ad-hoc `/messages/send`: the message definition travels with the dispatch, in the
    /// canonical campaign JSON shape (`messages`, …).
    AdHoc { definition: Value },
    /// Entries into a Canvas at a time, made by the Canvas engine rather than the scheduler:
    /// `/canvas/trigger/schedule/create`, a broadcast `/canvas/trigger/send`, a scheduled
    /// Canvas's occurrence. Named `recipients` enter at once; without them the Canvas's entry
    /// audience (narrowed by the dispatch's `audience`) enters in chunks, the expansion mark
    /// recording how far. The dispatch's `properties` are the shared entry properties.
    Canvas {
        canvas_id: String,
        recipients: Option<Vec<super::canvas::CanvasRecipient>>,
    },
}

/// One dispatch: a scheduled occurrence, an API request or one trigger; its `id` is Braze's
/// `dispatch_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchRecord {
    pub id: String,
    pub workspace: WorkspaceId,
    pub source: DispatchSource,
    pub send_id: Option<String>,
    /// Events carry a per-user dispatch id derived from this one (triggered sends) rather than
    /// this one (scheduled occurrences).
    pub per_user_ids: bool,
    /// JSON object text: `trigger_properties` of an API trigger, shared by every recipient.
    pub properties: Option<String>,
    /// An extra audience of this dispatch alone (an API request's `audience` or
    /// `segment_id`), as a segment-language filter (JSON), ANDed with the campaign's.
    pub audience: Option<Value>,
    pub created_at: Millis,
    /// A dispatch that targets an audience is expanded in chunks; `Some(u)` means users up to
    /// and including `u` are enqueued and the rest are not yet (a new expansion starts at
    /// `Some(UserSeq(0))`: seqs start at 1), `None` that it is complete.
    pub expanding_after: Option<UserSeq>,
    /// A scheduled API send's time: an expanding dispatch's expansion waits until then; a
    /// dispatch of named recipients has its jobs due then. `None`: not a scheduled send.
    pub not_before: Option<Millis>,
}

/// A campaign receipt to take with an item: the item goes ahead only if the user has not
/// received the campaign, or received it at least `reeligible_after_ms` ago (`None`: never
/// again).
///
/// The receipt is taken *at* the item's job's `due_at` (when the user receives it), else at its
/// first event's time (a control-group enrolment), else at the latest `created_at` of the
/// enqueue's new dispatches, else at 0. A receipt received at `r` may be taken again at `t`
/// when `r + reeligible_after_ms <= t`; taking it records `t` as the new receipt time. Items
/// of one enqueue are taken in order, each seeing the receipts taken before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub campaign_id: String,
    pub reeligible_after_ms: Option<i64>,
}

/// A message to deliver later.
#[derive(Debug, Clone, PartialEq)]
pub struct SendJob {
    pub dispatch_id: String,
    /// The variant (`message_variation_id`) to send.
    pub variant: String,
    pub due_at: Millis,
    /// JSON object text: per-user properties (an API recipient's `trigger_properties`, a
    /// trigger's event properties); `None` if there are none.
    pub properties: Option<String>,
}

/// One user's item of an enqueue: take the receipt (if any), then write the job (if any) and
/// the events. A control-group enrolment has a receipt and an event but no job.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSend {
    pub user: UserSeq,
    pub receipt: Option<Receipt>,
    pub job: Option<SendJob>,
    pub events: Vec<CurrentsEvent>,
}

/// Where the trigger engine (or the Canvas engine) has read a workspace's logs up to.
///
/// The default cursor, `(0, 0)`, means "never started": the engine's first pass points it at
/// the logs' heads so that history before the first launch triggers nothing. A started
/// cursor is therefore never the default one, even when the logs were empty when it started
/// (see [`TriggerCursor::at_heads`]); otherwise the next pass would take it for unstarted and
/// jump over whatever arrived in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TriggerCursor {
    /// Last event-log position read.
    pub events: i64,
    /// Last cohort-membership-change position read.
    pub cohort_changes: i64,
}

impl TriggerCursor {
    /// A started cursor at the logs' heads (each the last committed position, or 0 for an
    /// empty log). An empty log's head is kept as -1: log positions start at 1, so reading
    /// after -1 reads the same rows as reading after 0, and the cursor stays distinguishable
    /// from the never-started default.
    pub fn at_heads(events: i64, cohort_changes: i64) -> Self {
        let started = |head: i64| if head == 0 { -1 } else { head };
        Self {
            events: started(events),
            cohort_changes: started(cohort_changes),
        }
    }

    /// Whether an engine's first pass has set this cursor (see the type's docs).
    pub fn is_started(self) -> bool {
        self != Self::default()
    }
}

/// One transaction's worth of enqueueing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Enqueue {
    /// Dispatches to create first (an API request, a trigger, a scheduled occurrence).
    pub dispatches: Vec<DispatchRecord>,
    pub items: Vec<NewSend>,
    /// Events about nobody's receipt (e.g. aborts decided before a job exists).
    pub events: Vec<(Option<UserSeq>, CurrentsEvent)>,
    /// Compare-and-set of the trigger cursor: `(expected, new)`. The enqueue fails with
    /// [`super::StoreError::Conflict`] (and writes nothing) when the stored cursor is not
    /// `expected` — another node read the same stretch of log first.
    pub cursor: Option<(TriggerCursor, TriggerCursor)>,
    /// Compare-and-set of a scheduled campaign's next run: `(campaign_id, expected, new)`.
    /// Conflict (nothing written) when it is not `expected`: the occurrence was dispatched by
    /// another node — or when the workspace has no such campaign.
    pub next_run: Option<(String, Option<Millis>, Option<Millis>)>,
    /// Marks a dispatch's expansion progress: `(dispatch_id, Some(last user enqueued))`, or
    /// `None` when it is complete. A mark only moves an expansion forward: it applies to a
    /// dispatch of the workspace that is still expanding (`expanding_after` is `Some`) and,
    /// for `Some(u)`, has not reached `u` yet. A mark that does not apply (the dispatch was
    /// cancelled, its campaign deleted, another node enqueued this chunk or finished the
    /// expansion first, no such dispatch) fails the enqueue with
    /// [`super::StoreError::Conflict`], nothing written — so every chunk is enqueued once.
    pub expansion: Option<(String, Option<UserSeq>)>,
    /// Conversions to record: each is written (with its event) only if that (campaign, user,
    /// conversion index) has no conversion yet — a conversion counts once.
    pub conversions: Vec<NewConversion>,
    /// Campaign stats to count, applied in the same transaction (so an enqueue refused by a
    /// compare-and-set counts nothing). One without `unique_user` adds one to its
    /// (campaign, stat); one with `unique_user` records that user for its (campaign, stat) and
    /// adds one only if the user was not recorded yet — by an earlier enqueue or earlier in
    /// this one.
    pub stats: Vec<StatIncrement>,
    /// Segment-entry trigger state to write: `(campaign_id, segment_id, expected, new)`, each a
    /// compare-and-set of that (campaign, segment)'s [`SegmentTracker::position`]: `expected`
    /// `None` means the tracker must not exist yet, `Some(p)` that it is stored at `p`. Any
    /// mismatch fails the enqueue with [`super::StoreError::Conflict`] and writes nothing —
    /// another node acted on that stretch of the segment's feed first — and so does a tracker
    /// of a campaign the workspace does not have (deleted meanwhile).
    pub segment_trackers: Vec<(String, String, Option<FeedPosition>, SegmentTracker)>,
    /// Send-id series figures to count (`GET /sends/data_series`), as `stats` are counted: one
    /// without `unique_user` adds one to its (series key, stat); one with it adds one only the
    /// first time that user is recorded for that (series key, stat).
    pub send_stats: Vec<SendStatIncrement>,
}

/// How far the trigger engine has followed one segment for one segment-entry campaign, and who
/// was in the segment there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SegmentTracker {
    /// The segment change-feed position the members are as of.
    pub position: FeedPosition,
    /// The members at `position`: a serialized roaring bitmap of user seqs (opaque to the
    /// store).
    pub members: Vec<u8>,
}

/// One counted figure of a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CampaignStat {
    Sends,
    Deliveries,
    Bounces,
    SoftBounces,
    Opens,
    UniqueOpens,
    Clicks,
    UniqueClicks,
    Unsubscribes,
    Conversions,
    Aborts,
    Failures,
    ControlGroup,
}

impl CampaignStat {
    /// Every stat, in the order [`MessagingStore::campaign_stats`] lists them.
    pub const ALL: [CampaignStat; 13] = [
        CampaignStat::Sends,
        CampaignStat::Deliveries,
        CampaignStat::Bounces,
        CampaignStat::SoftBounces,
        CampaignStat::Opens,
        CampaignStat::UniqueOpens,
        CampaignStat::Clicks,
        CampaignStat::UniqueClicks,
        CampaignStat::Unsubscribes,
        CampaignStat::Conversions,
        CampaignStat::Aborts,
        CampaignStat::Failures,
        CampaignStat::ControlGroup,
    ];

    /// Its name, as stored and as the API reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStat::Sends => "sends",
            CampaignStat::Deliveries => "deliveries",
            CampaignStat::Bounces => "bounces",
            CampaignStat::SoftBounces => "soft_bounces",
            CampaignStat::Opens => "opens",
            CampaignStat::UniqueOpens => "unique_opens",
            CampaignStat::Clicks => "clicks",
            CampaignStat::UniqueClicks => "unique_clicks",
            CampaignStat::Unsubscribes => "unsubscribes",
            CampaignStat::Conversions => "conversions",
            CampaignStat::Aborts => "aborts",
            CampaignStat::Failures => "failures",
            CampaignStat::ControlGroup => "control_group",
        }
    }

    /// The stat named `name` ([`CampaignStat::as_str`]), if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// One event's contribution to a campaign's stats. With `unique_user`, it counts only the
/// first time for that (campaign, stat, user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatIncrement {
    pub campaign_id: String,
    pub stat: CampaignStat,
    pub unique_user: Option<UserSeq>,
}

/// One daily figure of a `send_id`'s messages (`GET /sends/data_series`); its name is the
/// field Braze's response gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SendStat {
    Sent,
    Delivered,
    Bounces,
    Opens,
    UniqueOpens,
    Clicks,
    UniqueClicks,
    Unsubscribes,
    /// Webhooks that failed for good (their last attempt).
    Errors,
    /// Users sent a message (per variation, and for the day's totals).
    UniqueRecipients,
    Conversions,
}

impl SendStat {
    pub const ALL: [SendStat; 11] = [
        SendStat::Sent,
        SendStat::Delivered,
        SendStat::Bounces,
        SendStat::Opens,
        SendStat::UniqueOpens,
        SendStat::Clicks,
        SendStat::UniqueClicks,
        SendStat::Unsubscribes,
        SendStat::Errors,
        SendStat::UniqueRecipients,
        SendStat::Conversions,
    ];

    /// Its name, as stored and as the response names it.
    pub fn as_str(self) -> &'static str {
        match self {
            SendStat::Sent => "sent",
            SendStat::Delivered => "delivered",
            SendStat::Bounces => "bounces",
            SendStat::Opens => "opens",
            SendStat::UniqueOpens => "unique_opens",
            SendStat::Clicks => "clicks",
            SendStat::UniqueClicks => "unique_clicks",
            SendStat::Unsubscribes => "unsubscribes",
            SendStat::Errors => "errors",
            SendStat::UniqueRecipients => "unique_recipients",
            SendStat::Conversions => "conversions",
        }
    }

    /// The stat named `name` ([`SendStat::as_str`]), if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// Where a send-id figure is counted: one campaign's `send_id`, one UTC day, one channel and
/// variation — or, with `channel` and `variation` empty, the day's totals.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SendSeriesKey {
    pub campaign_id: String,
    pub send_id: String,
    /// The day's first millisecond (UTC midnight).
    pub day: Millis,
    /// `email` or `webhook`; empty for the day's totals.
    pub channel: String,
    /// The variation's id (`message_variation_id`); empty for the day's totals.
    pub variation: String,
}

/// One event's contribution to a send id's daily series. With `unique_user`, it counts only the
/// first time for that (key, stat, user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendStatIncrement {
    pub key: SendSeriesKey,
    pub stat: SendStat,
    pub unique_user: Option<UserSeq>,
}

/// One stored figure of a send id's series ([`MessagingStore::send_series`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendSeriesFigure {
    pub day: Millis,
    /// Empty for the day's totals.
    pub channel: String,
    /// Empty for the day's totals.
    pub variation: String,
    pub stat: SendStat,
    pub count: u64,
}

/// A user converting on a campaign's conversion event `index`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewConversion {
    pub campaign_id: String,
    pub user: UserSeq,
    pub index: u8,
    pub event: CurrentsEvent,
}

/// A campaign a user received, and when (the last time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRecord {
    pub campaign_id: String,
    pub received_at: Millis,
}

/// What an enqueue did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnqueueOutcome {
    /// Jobs written.
    pub queued: u64,
    /// Items skipped because their receipt was refused (not re-eligible).
    pub ineligible: u64,
    /// Conversions written (new ones).
    pub conversions: u64,
}

/// A claimed send, with everything the dispatcher needs to look up the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedSend {
    /// The send's id: its idempotency key, `Message-ID` and tracking-token subject. Unique
    /// across workspaces and never reused, not even after the send was deleted.
    pub id: i64,
    pub workspace: WorkspaceId,
    pub user: UserSeq,
    pub job: SendJob,
    /// Attempts made before this one.
    pub attempts: u32,
}

/// What became of an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum SendState {
    /// Delivered (or handed to the MTA): kept for tracking with the address it went to and
    /// the original URLs of its tracked links (JSON array text), by link index.
    Sent {
        address: Option<String>,
        links: Option<String>,
    },
    /// Try again at `at` (attempt count goes up by one).
    RetryAt { at: Millis },
    /// Not attempted (the campaign is paused, its rate limit is spent): due again at `at`,
    /// attempt count unchanged.
    Deferred { at: Millis },
    /// Not sent and never will be (a terminal failure, an abort, an unreachable user).
    Failed,
}

/// One settlement: the outcome and the events that report it (appended about `user` to the
/// log of `workspace`, the send's workspace — a settlement naming another is refused).
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    pub send: i64,
    pub workspace: WorkspaceId,
    pub user: UserSeq,
    pub state: SendState,
    pub events: Vec<CurrentsEvent>,
}

/// A sent message as tracking needs it (opens, clicks, unsubscribes).
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    pub id: i64,
    pub workspace: WorkspaceId,
    pub user: UserSeq,
    pub dispatch_id: String,
    pub variant: String,
    pub address: Option<String>,
    pub links: Option<String>,
    pub sent_at: Millis,
}

/// A user entering a partner cohort, as the cohort-membership change log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortEntry {
    pub position: i64,
    pub user: UserSeq,
    pub partner: String,
    pub cohort_id: String,
    pub at: Millis,
}

/// Where a send stands in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Queued, claimed or to retry.
    Pending,
    Sent,
    Failed,
}

impl QueueState {
    /// Its name, as stored and as pages show it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueState::Pending => "pending",
            QueueState::Sent => "sent",
            QueueState::Failed => "failed",
        }
    }

    /// The state named `name` ([`QueueState::as_str`]), if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        [QueueState::Pending, QueueState::Sent, QueueState::Failed]
            .into_iter()
            .find(|s| s.as_str() == name)
    }
}

/// One message to a user, as their lookup page lists it ([`MessagingStore::recent_sends`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UserSend {
    pub id: i64,
    pub dispatch_id: String,
    /// Its dispatch's source: the campaign, or the ad-hoc definition (a Canvas step's sends
    /// carry the Canvas under `canvas`); `None` when the dispatch row is gone.
    pub source: Option<DispatchSource>,
    pub variant: String,
    pub state: QueueState,
    pub due_at: Millis,
    /// When it was settled [`SendState::Sent`].
    pub sent_at: Option<Millis>,
    pub attempts: u32,
}

/// Counts of a dispatch's or campaign's sends by state, for the management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendCounts {
    pub pending: u64,
    pub sent: u64,
    pub failed: u64,
}

/// The messaging context's storage.
pub trait MessagingStore: Send + Sync {
    // -- campaigns ------------------------------------------------------------------------
    /// Stores a new campaign (the caller chose its id and checked its definition).
    fn create_campaign(
        &self,
        workspace: WorkspaceId,
        campaign: CampaignRecord,
    ) -> StoreFuture<'_, CampaignRecord>;
    fn campaign(&self, workspace: WorkspaceId, id: &str)
    -> StoreFuture<'_, Option<CampaignRecord>>;
    /// The workspace's campaigns, oldest first (`created_at`, then `id`).
    fn list_campaigns(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<CampaignRecord>>;
    /// Replaces everything but `id` and `created_at`; `None` if there is no such campaign.
    fn save_campaign(
        &self,
        workspace: WorkspaceId,
        campaign: CampaignRecord,
    ) -> StoreFuture<'_, Option<CampaignRecord>>;
    /// Deletes the campaign with its pending sends — claimed ones too, whose settlement is then
    /// refused — its stats (counts and the users counted) and its segment trackers, and ends
    /// its dispatches' expansions (sent ones are kept for tracking); returns whether it existed.
    fn delete_campaign(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool>;
    /// Every active campaign of every workspace (the trigger engine and the scheduler), by
    /// workspace id, then oldest first.
    fn active_campaigns(&self) -> StoreFuture<'_, Vec<(WorkspaceId, CampaignRecord)>>;
    /// Counts of the campaign's sends by state (pending: queued, claimed or to retry).
    fn campaign_send_counts(&self, workspace: WorkspaceId, id: &str)
    -> StoreFuture<'_, SendCounts>;
    /// The campaign's stats as counted by [`Enqueue::stats`]: every stat of
    /// [`CampaignStat::ALL`], in that order, zero when never counted (also for a campaign the
    /// workspace does not have).
    fn campaign_stats(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
    ) -> StoreFuture<'_, Vec<(CampaignStat, u64)>>;

    /// The figures counted for the campaign's `send_id` on the days from `first_day` to
    /// `last_day` (both UTC midnights, inclusive), by day, channel, variation and stat; none
    /// for a campaign or send id the workspace does not have.
    fn send_series(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
        send_id: &str,
        first_day: Millis,
        last_day: Millis,
    ) -> StoreFuture<'_, Vec<SendSeriesFigure>>;

    // -- dispatches and the queue -----------------------------------------------------------
    /// Creates dispatches, takes receipts, writes jobs and events, moves cursors — all or
    /// nothing (see [`Enqueue`]). The events are appended in this order: each accepted item's
    /// (about its user), then [`Enqueue::events`], then the new conversions'.
    fn enqueue(&self, workspace: WorkspaceId, enqueue: Enqueue) -> StoreFuture<'_, EnqueueOutcome>;
    fn dispatch(&self, workspace: WorkspaceId, id: &str)
    -> StoreFuture<'_, Option<DispatchRecord>>;
    /// Dispatches of every workspace whose expansion is not complete and whose `not_before` is
    /// at or before `now` (or unset): resumed after a restart, scheduled broadcasts when due.
    /// Oldest first (`created_at`).
    fn expanding_dispatches(&self, now: Millis) -> StoreFuture<'_, Vec<DispatchRecord>>;
    /// Claims up to `limit` pending sends due at `now` (`due_at <= now`), of any workspace,
    /// oldest due first (then by id), whose lease is free or expired, for `lease_ms`: the
    /// lease runs until `now + lease_ms` and is free again from that instant. Two claims never
    /// return the same send while its lease runs; the attempt count is not changed.
    fn claim_sends(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<ClaimedSend>>;
    /// Records outcomes and appends their events, each only where `owner` still holds the
    /// send's lease; returns how many were refused because the lease was lost.
    ///
    /// `owner` holds the lease of a send it claimed as long as the send is pending and no
    /// other owner claimed it since — also once the lease has run out, if nobody took it
    /// over. Everything else is refused and counted: a send claimed by another owner, never
    /// claimed by this one, already settled (also earlier in the same call), deleted (its
    /// dispatch cancelled, its campaign deleted), or named with another workspace. A refused
    /// settlement writes nothing and appends none of its events. `Sent` records `now` as the
    /// sent time; `RetryAt` and `Deferred` leave the send pending without a lease.
    fn settle_sends(
        &self,
        owner: &str,
        now: Millis,
        settlements: Vec<Settlement>,
    ) -> StoreFuture<'_, u64>;
    /// When the next pending send can be claimed, if there is one (the dispatcher sleeps until
    /// then): the earliest, over pending sends, of the send's `due_at`, or for a claimed send
    /// the later of its `due_at` and the end of its lease.
    fn next_due(&self) -> StoreFuture<'_, Option<Millis>>;
    /// Makes every pending send leased by `owner` claimable now, and returns how many. A node
    /// calls it when it starts: its owner name is stable (host and data directory), so these
    /// are the sends its previous incarnation had in flight when it died — they go out again
    /// at once (same idempotency key) instead of after their lease.
    fn release_leases(&self, owner: &str) -> StoreFuture<'_, u64>;
    /// A sent message, for tracking.
    fn sent_message(
        &self,
        workspace: WorkspaceId,
        send: i64,
    ) -> StoreFuture<'_, Option<SentMessage>>;
    /// Appends engagement events (opens, clicks) about a sent message.
    fn record_engagement(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
        events: Vec<CurrentsEvent>,
    ) -> StoreFuture<'_, ()>;
    /// How many messages were sent (state `Sent`) to `user` at or after `since`, across
    /// campaigns (frequency capping).
    fn sends_since(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
        since: Millis,
    ) -> StoreFuture<'_, u64>;

    /// The newest `limit` sends to `user` in any state, newest (highest id) first, each with
    /// its dispatch's source — a bounded read served by an index on (workspace, user, id).
    fn recent_sends(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
        limit: usize,
    ) -> StoreFuture<'_, Vec<UserSend>>;

    /// Moves a dispatch's pending jobs (and its expansion's `not_before`, while it is still
    /// expanding) to `at`; false if the workspace has no such dispatch.
    fn reschedule_dispatch(
        &self,
        workspace: WorkspaceId,
        id: &str,
        at: Millis,
    ) -> StoreFuture<'_, bool>;
    /// Cancels a dispatch: deletes its pending jobs (claimed ones too) and ends its expansion;
    /// false if the workspace has no such dispatch. Sent messages are kept.
    fn cancel_dispatch(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool>;
    /// Replaces the definition of an ad-hoc dispatch that is still a schedule (`not_before`
    /// set: not cancelled); its pending sends go out with it (the caller keeps the variant ids
    /// they name). False if the workspace has no such dispatch.
    fn replace_adhoc_definition(
        &self,
        workspace: WorkspaceId,
        id: &str,
        definition: serde_json::Value,
    ) -> StoreFuture<'_, bool>;
    /// The campaigns `user` received, most recent receipt each (conversion tracking), the most
    /// recently received first (then by campaign id).
    fn receipts_of(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
    ) -> StoreFuture<'_, Vec<ReceiptRecord>>;
    /// Records a caller-chosen `send_id` (or checks it exists) for a campaign: true if it was
    /// new, false if the (campaign, send id) exists already. [`super::StoreError::Conflict`]
    /// (nothing written) when it is new and `max_per_day` new send ids were already created
    /// for the workspace at or after `day_start`; concurrent calls never pass the cap.
    fn create_send_id(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
        send_id: &str,
        now: Millis,
        day_start: Millis,
        max_per_day: u32,
    ) -> StoreFuture<'_, bool>;
    /// The workspace's messaging settings (frequency-capping rules), JSON as saved; `None`
    /// when never saved.
    fn messaging_settings(&self, workspace: WorkspaceId) -> StoreFuture<'_, Option<Value>>;
    fn save_messaging_settings(
        &self,
        workspace: WorkspaceId,
        settings: Value,
    ) -> StoreFuture<'_, ()>;

    // -- triggers -------------------------------------------------------------------------
    fn trigger_cursor(&self, workspace: WorkspaceId) -> StoreFuture<'_, TriggerCursor>;
    /// Users entering partner cohorts after log position `after`, oldest first, at most
    /// `limit` (leaving a cohort moves the log's head but is not an entry).
    fn cohort_entries(
        &self,
        workspace: WorkspaceId,
        after: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<CohortEntry>>;
    /// The cohort-change log's head, its last committed position or 0 (a new trigger cursor
    /// starts there, not at the start).
    fn cohort_changes_head(&self, workspace: WorkspaceId) -> StoreFuture<'_, i64>;
    /// The event log's head: its last committed position, or 0 when it is empty.
    fn event_log_head(&self, workspace: WorkspaceId) -> StoreFuture<'_, i64>;
    /// A segment-entry campaign's tracker of one segment (written by [`Enqueue::segment_trackers`]);
    /// `None` until the first is written.
    fn segment_tracker(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
        segment_id: &str,
    ) -> StoreFuture<'_, Option<SegmentTracker>>;

    // -- secrets --------------------------------------------------------------------------
    /// The key that signs tracking and unsubscribe URLs, the same for every node: the first
    /// call stores `candidate` (32 random bytes the caller drew) and every call returns the
    /// stored key.
    fn messaging_secret(&self, candidate: [u8; 32]) -> StoreFuture<'_, [u8; 32]>;

    // -- recipients -----------------------------------------------------------------------
    /// The users a dispatcher is about to message, as of every acknowledged write, in the order
    /// asked; missing (deleted, unknown) users are left out.
    fn users_by_seq(
        &self,
        workspace: WorkspaceId,
        users: Vec<UserSeq>,
    ) -> StoreFuture<'_, Vec<UserRecord>>;
}

#[cfg(test)]
mod tests {
    use super::CampaignStat;

    #[test]
    fn stat_names_are_distinct_and_parse_back() {
        for stat in CampaignStat::ALL {
            assert_eq!(CampaignStat::parse(stat.as_str()), Some(stat));
        }
        let mut names: Vec<&str> = CampaignStat::ALL.iter().map(|s| s.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CampaignStat::ALL.len());
        assert_eq!(CampaignStat::parse("Sends"), None);
        assert_eq!(CampaignStat::parse(""), None);
    }
}
