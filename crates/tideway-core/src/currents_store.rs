//! Currents connectors as the domain sees them, and the storage contract their exporter needs.
//!
//! A *Current* is one connector of one workspace: where to deliver (an endpoint and an optional
//! bearer token), what to deliver (event types or categories), how (batch size, flush interval,
//! field transformations, retry and retention windows), and its progress: a committed position
//! in the workspace's event log, counters, the last error. Each Current consumes the log on its
//! own, so a dead receiver never holds back another Current.
//!
//! [`CurrentsStore`] is everything the exporter (`tideway-currents`) and the management API need
//! from a database. Like [`crate::store::Store`], every method is one transaction. The exporter
//! holds a *lease* on a Current while it consumes it; every progress write names the lease owner
//! and fails with [`crate::store::StoreError::Conflict`] once another node has taken the lease (fencing), so
//! two nodes never advance one position.
//!
//! Time: positions in the log get wall-clock times through a sampled *log clock*
//! ([`CurrentsStore::tick_log_clock`]): "event N entered the log no later than T". Retention,
//! lag in seconds and replay by time window all read it, so they measure time in the log, not
//! the (client-supplied, possibly old) `time` of an event.

use std::fmt;

use crate::clock::Millis;
use crate::currents::{CurrentsEvent, EventCategory};
use crate::ids::{UserSeq, WorkspaceId};
use crate::store::StoreFuture;

/// One logged Currents event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    /// Position in the workspace's log: positions increase in commit order (see
    /// [`crate::store`], "Log order").
    pub seq: i64,
    pub workspace: WorkspaceId,
    pub user: Option<UserSeq>,
    pub event: CurrentsEvent,
}

/// The database key of a Current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CurrentId(pub i64);

impl fmt::Display for CurrentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a URL was refused as a delivery endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("must be an absolute http:// or https:// URL")]
    Scheme,
    #[error("must name a host")]
    NoHost,
    #[error("must not contain whitespace, control characters or a #fragment")]
    BadCharacters,
    #[error("must not carry credentials (user:password@); use bearer_token")]
    Credentials,
    #[error("must be at most 2048 characters")]
    TooLong,
}

/// An absolute `http(s)://host[:port]/path?query` URL a Current or a webhook delivers to.
/// The query string is kept: several workspaces may share one endpoint told apart by it.
#[derive(Clone, PartialEq, Eq)]
pub struct EndpointUrl(String);

impl EndpointUrl {
    pub fn parse(raw: &str) -> Result<Self, EndpointError> {
        let raw = raw.trim();
        if raw.len() > 2048 {
            return Err(EndpointError::TooLong);
        }
        if raw
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
        {
            return Err(EndpointError::BadCharacters);
        }
        let lower = raw.to_ascii_lowercase();
        let rest = if lower.starts_with("https://") {
            &raw[8..]
        } else if lower.starts_with("http://") {
            &raw[7..]
        } else {
            return Err(EndpointError::Scheme);
        };
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        if authority.contains('@') {
            return Err(EndpointError::Credentials);
        }
        let host = if authority.starts_with('[') {
            authority
                .split(']')
                .next()
                .map(|h| h.trim_start_matches('['))
                .unwrap_or("")
        } else {
            authority.split(':').next().unwrap_or("")
        };
        if host.is_empty() {
            return Err(EndpointError::NoHost);
        }
        Ok(EndpointUrl(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_https(&self) -> bool {
        self.0
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    }

    /// The URL with its query string cut off: safe to log (query strings sometimes carry keys).
    pub fn redacted(&self) -> &str {
        self.0.split('?').next().unwrap_or(&self.0)
    }
}

impl fmt::Debug for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EndpointUrl({:?})", self.redacted())
    }
}

impl fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.redacted())
    }
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be 1 to 4096 characters of A-Z a-z 0-9 - . _ ~ + / and trailing =")]
pub struct BadBearerToken;

/// A bearer token (RFC 6750 `token68`) sent as `Authorization: Bearer …`. Redacted in `Debug`;
/// stored as given because it has to be presented, not compared.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    pub fn parse(raw: &str) -> Result<Self, BadBearerToken> {
        let body = raw.trim_end_matches('=');
        let ok = !body.is_empty()
            && raw.len() <= 4096
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
        if ok {
            Ok(BearerToken(raw.to_owned()))
        } else {
            Err(BadBearerToken)
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// What a Current delivers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CurrentKind {
    /// Braze's "Heap Export": the Custom HTTP payload to Heap's Currents intake.
    HeapExport,
    /// Braze's "Custom Currents Export": the Custom HTTP payload to any endpoint.
    CustomHttp,
    /// Tideway's forwarder to Heap's bulk track API (`POST {host}/api/track`).
    HeapTrack,
}

impl CurrentKind {
    pub const ALL: [CurrentKind; 3] = [
        CurrentKind::HeapExport,
        CurrentKind::CustomHttp,
        CurrentKind::HeapTrack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CurrentKind::HeapExport => "heap_export",
            CurrentKind::CustomHttp => "custom_http",
            CurrentKind::HeapTrack => "heap_track",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == raw)
    }
}

impl EventCategory {
    pub const ALL: [EventCategory; 3] = [
        EventCategory::MessageEngagement,
        EventCategory::CustomerBehavior,
        EventCategory::User,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventCategory::MessageEngagement => "message_engagement",
            EventCategory::CustomerBehavior => "customer_behavior",
            EventCategory::User => "user",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == raw)
    }
}

/// Which events a Current exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These event type names (e.g. `users.behaviors.CustomEvent`).
    EventTypes(Vec<String>),
    /// Every event type of these categories.
    Categories(Vec<EventCategory>),
}

/// What a transformation does to a field's value before sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldAction {
    /// Replace the value with `"[REDACTED]"`.
    Remove,
    /// Replace the value with the lowercase hex SHA-256 of its text.
    Hash,
}

impl FieldAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldAction::Remove => "remove",
            FieldAction::Hash => "hash",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "remove" => Some(FieldAction::Remove),
            "hash" => Some(FieldAction::Hash),
            _ => None,
        }
    }
}

/// One per-Current field transformation. `field` names a key of `user` or `properties`
/// (in every event type that has it), or a dotted path below them
/// (`properties.custom_properties.email`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transformation {
    pub field: String,
    pub action: FieldAction,
}

/// Backoff for retried deliveries: `min(cap, base × multiplier^attempt)`, full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base_ms: u64,
    pub multiplier: u32,
    pub cap_ms: u64,
    /// One request's time limit; a timeout is retried like a 5xx.
    pub request_timeout_ms: u64,
    /// The longest `Retry-After` honoured (a receiver asking for more waits this long).
    pub max_retry_after_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base_ms: 1_000,
            multiplier: 2,
            cap_ms: 300_000,
            request_timeout_ms: 30_000,
            max_retry_after_ms: 3_600_000,
        }
    }
}

/// How long a failing Current keeps trying and how long its queued events are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Continuous failure longer than this disables the Current (default 5 days).
    pub failure_window_ms: u64,
    /// Queued events older than this (time in the log) are dropped, counted and recorded
    /// (default 7 days).
    pub retention_ms: u64,
    /// A Current whose oldest queued event is older than this raises an alert (default 24 h).
    pub alert_after_ms: u64,
}

pub const DAY_MS: u64 = 86_400_000;

impl Default for Windows {
    fn default() -> Self {
        Windows {
            failure_window_ms: 5 * DAY_MS,
            retention_ms: 7 * DAY_MS,
            alert_after_ms: DAY_MS,
        }
    }
}

/// Which Braze attribute becomes Heap's `identity` in the `heap_track` forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapIdentity {
    ExternalUserId,
    UserId,
}

impl HeapIdentity {
    pub fn as_str(self) -> &'static str {
        match self {
            HeapIdentity::ExternalUserId => "external_user_id",
            HeapIdentity::UserId => "user_id",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "external_user_id" => Some(HeapIdentity::ExternalUserId),
            "user_id" => Some(HeapIdentity::UserId),
            _ => None,
        }
    }
}

/// Whether Heap event and property names get the `braze-` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamePrefix {
    None,
    Braze,
}

/// Settings of the `heap_track` kind (the endpoint is the Heap host: US, EU or a custom base).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapTrackSettings {
    pub app_id: String,
    pub identity: HeapIdentity,
    pub prefix: NamePrefix,
    /// Events per minute per app id (Heap: 15,000).
    pub app_events_per_minute: u32,
    /// Events per minute per identity (Heap: 1,000).
    pub identity_events_per_minute: u32,
}

/// Whether one user's events must reach the receiver in log order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Batches may overlap in flight (up to `max_in_flight`); splits and retries may reorder.
    Unordered,
    /// One batch in flight at a time, splits sent in order: each user's events arrive in log
    /// order (except an event moved to the dead-letter store and replayed later).
    PerUser,
}

/// Everything a user configures about a Current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentSpec {
    pub name: String,
    pub kind: CurrentKind,
    pub endpoint: EndpointUrl,
    pub bearer_token: Option<BearerToken>,
    pub selection: Selection,
    /// Most events per request (default 100; at most 1,000).
    pub batch_size: u32,
    /// A partial batch is sent this long after its first event was read (default 1,000 ms).
    pub flush_interval_ms: u64,
    pub transformations: Vec<Transformation>,
    pub ordering: Ordering,
    /// Most batches in flight at once when `ordering` is `Unordered` (default 2).
    pub max_in_flight: u32,
    pub retry: RetryPolicy,
    pub windows: Windows,
    /// Where to POST a JSON alert when the Current halts, is disabled or gets stuck.
    pub alert_webhook: Option<EndpointUrl>,
    /// Present exactly when `kind` is `HeapTrack`.
    pub heap: Option<HeapTrackSettings>,
}

pub const DEFAULT_BATCH_SIZE: u32 = 100;
pub const MAX_BATCH_SIZE: u32 = 1_000;
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 1_000;
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 2;

/// Where a Current stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CurrentStatus {
    /// Created, never launched: delivers nothing.
    Draft,
    Active,
    /// Stopped by the operator; the queue is kept.
    Paused,
    /// The receiver refused the credentials or the URL (401/403/404); the queue is kept until
    /// `enable`, then replayed.
    HaltedCredentials,
    /// Failing continuously for longer than the failure window; the queue is kept (subject to
    /// retention) until `enable`.
    Disabled,
}

impl CurrentStatus {
    pub const ALL: [CurrentStatus; 5] = [
        CurrentStatus::Draft,
        CurrentStatus::Active,
        CurrentStatus::Paused,
        CurrentStatus::HaltedCredentials,
        CurrentStatus::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CurrentStatus::Draft => "draft",
            CurrentStatus::Active => "active",
            CurrentStatus::Paused => "paused",
            CurrentStatus::HaltedCredentials => "halted",
            CurrentStatus::Disabled => "disabled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// A status change, with the statuses it may start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// Draft → Active.
    Launch,
    /// Active, halted or disabled → Paused.
    Pause,
    /// Paused → Active.
    Resume,
    /// Halted or disabled (or paused) → Active; clears the failure streak.
    Enable,
    /// Active → Halted (the exporter, on 401/403/404).
    Halt,
    /// Active → Disabled (the exporter, after the failure window).
    Disable,
}

impl StatusChange {
    /// The statuses this change may start from, and where it leads.
    pub fn rule(self) -> (&'static [CurrentStatus], CurrentStatus) {
        use CurrentStatus as S;
        match self {
            StatusChange::Launch => (&[S::Draft], S::Active),
            StatusChange::Pause => (&[S::Active, S::HaltedCredentials, S::Disabled], S::Paused),
            StatusChange::Resume => (&[S::Paused], S::Active),
            StatusChange::Enable => (&[S::HaltedCredentials, S::Disabled, S::Paused], S::Active),
            StatusChange::Halt => (&[S::Active], S::HaltedCredentials),
            StatusChange::Disable => (&[S::Active], S::Disabled),
        }
    }
}

/// Cumulative counts of a Current.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events acknowledged by the receiver (2xx).
    pub delivered: u64,
    /// Event deliveries retried (a batch of 100 retried once counts 100).
    pub retried: u64,
    /// Events moved to the dead-letter store.
    pub dead_lettered: u64,
    /// Queued events dropped at the end of the retention period.
    pub dropped: u64,
    /// Events the receiver kind cannot take (e.g. `heap_track` without the identity), skipped.
    pub skipped: u64,
}

/// The last failed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    pub at: Millis,
    /// The HTTP status, when there was a response.
    pub status: Option<u16>,
    /// What happened, for people (no secrets: built from the status, the error kind and a
    /// truncated response body).
    pub message: String,
}

/// A Current with its progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub id: CurrentId,
    pub workspace: WorkspaceId,
    pub spec: CurrentSpec,
    pub status: CurrentStatus,
    /// Bumped by every change of spec or status, so a consumer can tell it is out of date.
    pub revision: i64,
    /// Every selected event at or before this log position is resolved.
    pub position: i64,
    pub counters: Counters,
    /// Start of the current run of failures; `None` after a success.
    pub failing_since: Option<Millis>,
    pub last_error: Option<LastError>,
    pub last_success_at: Option<Millis>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// One event of the log, as the exporter sends it: the stored JSON text, unparsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedEvent {
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    pub user: Option<UserSeq>,
    /// The wire object, exactly as logged.
    pub body: String,
}

/// Events read after a position: `scanned_to` is the last log position looked at (events of
/// other types up to it are not selected and need no delivery).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claimed {
    pub events: Vec<QueuedEvent>,
    pub scanned_to: i64,
    /// Log entries looked at (fewer than asked for: the read reached the head of the log).
    pub scanned: usize,
}

/// Why an event went to the dead-letter store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// Sent alone and still refused with 400.
    Rejected,
    /// Sent alone and still refused with 413.
    TooLargeForReceiver,
    /// Over the per-event size limit (900 KB); never sent.
    Oversized,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Rejected => "rejected",
            DeadLetterReason::TooLargeForReceiver => "too_large_for_receiver",
            DeadLetterReason::Oversized => "oversized",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            DeadLetterReason::Rejected,
            DeadLetterReason::TooLargeForReceiver,
            DeadLetterReason::Oversized,
        ]
        .into_iter()
        .find(|r| r.as_str() == raw)
    }
}

/// An event moving to the dead-letter store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    pub event: QueuedEvent,
    pub reason: DeadLetterReason,
    /// Human-readable detail (e.g. the size).
    pub detail: String,
    pub response_status: Option<u16>,
    /// The receiver's response body, truncated to 4 KiB.
    pub response_body: Option<String>,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub current: CurrentId,
    pub event: QueuedEvent,
    pub reason: DeadLetterReason,
    pub detail: String,
    pub response_status: Option<u16>,
    pub response_body: Option<String>,
    pub created_at: Millis,
    /// Times it was sent (including replays).
    pub attempts: u32,
    /// Waiting to be replayed.
    pub replay_pending: bool,
}

/// Which dead letters to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterPick {
    All,
    Ids(Vec<i64>),
}

/// A time window of the log queued for re-delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindow {
    pub id: i64,
    pub current: CurrentId,
    /// Log positions `from_seq..=to_seq` (from the log clock).
    pub from_seq: i64,
    pub to_seq: i64,
    /// Delivered up to here.
    pub cursor: i64,
}

/// Where a delivered batch came from, so its acknowledgement moves the right cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchSource {
    /// The live log: the position advances to `resolved_to`.
    Live { resolved_to: i64 },
    /// A replay window: its cursor advances to `resolved_to`; finished windows are removed.
    Window { window: i64, resolved_to: i64 },
    /// Replayed dead letters: these leave the store (those refused again come back as new
    /// dead letters in the same acknowledgement).
    DeadLetters { ids: Vec<i64> },
}

/// The outcome of one batch, written in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub current: CurrentId,
    /// The lease owner writing (fencing: refused if another owner holds the lease).
    pub owner: String,
    pub source: BatchSource,
    pub delivered: u64,
    pub skipped: u64,
    pub dead_letters: Vec<NewDeadLetter>,
    pub at: Millis,
}

/// What retention dropped: every selected event in `(from_seq, to_seq]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropRecord {
    pub current: CurrentId,
    pub from_seq: i64,
    pub to_seq: i64,
    pub count: u64,
    pub at: Millis,
}

/// How far behind a Current is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Selected events after the position (not counting replays or dead letters); counted
    /// exactly up to [`LAG_EXACT_UP_TO`], beyond that estimated from log positions.
    pub events: u64,
    /// Whether `events` was counted (not estimated).
    pub exact: bool,
    /// When the oldest of them entered the log (from the log clock), if any.
    pub oldest_logged_at: Option<Millis>,
}

/// Lags up to this many events are counted exactly; larger ones are estimated (a status read
/// must not scan a 10 M-event backlog).
pub const LAG_EXACT_UP_TO: u64 = 100_000;

/// Which event types a read keeps: `None` keeps all.
pub type TypeFilter = Option<Vec<String>>;

/// The storage the exporter and the management API need. One transaction per method.
pub trait CurrentsStore: Send + Sync {
    // -- definitions --------------------------------------------------------------------
    /// Creates a Current at the end of the log (it exports what happens from now on), in
    /// status `initial` (`Draft`, or `Active` for create-and-launch).
    fn create_current(
        &self,
        workspace: WorkspaceId,
        spec: CurrentSpec,
        initial: CurrentStatus,
        now: Millis,
    ) -> StoreFuture<'_, Current>;
    /// Replaces the spec (position and counters are kept).
    fn update_current(
        &self,
        workspace: WorkspaceId,
        id: CurrentId,
        spec: CurrentSpec,
        now: Millis,
    ) -> StoreFuture<'_, Current>;
    fn get_current(
        &self,
        workspace: WorkspaceId,
        id: CurrentId,
    ) -> StoreFuture<'_, Option<Current>>;
    fn list_currents(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<Current>>;
    /// Every Current of every workspace (the exporter's supervisor).
    fn all_currents(&self) -> StoreFuture<'_, Vec<Current>>;
    /// Removes the Current with its dead letters, replays and records.
    fn delete_current(&self, workspace: WorkspaceId, id: CurrentId) -> StoreFuture<'_, bool>;
    /// Applies a status change; [`crate::store::StoreError::Conflict`] when the Current is in a status the
    /// change cannot start from. `Enable` also clears the failure streak.
    fn change_status(
        &self,
        id: CurrentId,
        change: StatusChange,
        reason: Option<LastError>,
        now: Millis,
    ) -> StoreFuture<'_, Current>;

    // -- the log ------------------------------------------------------------------------
    /// Events of a workspace after log position `after`, oldest first.
    fn read_events(
        &self,
        workspace: WorkspaceId,
        after: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<LoggedEvent>>;

    // -- consuming ----------------------------------------------------------------------
    /// Takes or renews the lease when it is free, expired or already `owner`'s.
    fn acquire_lease(
        &self,
        id: CurrentId,
        owner: &str,
        now: Millis,
        ttl_ms: u64,
    ) -> StoreFuture<'_, bool>;
    fn release_lease(&self, id: CurrentId, owner: &str) -> StoreFuture<'_, ()>;
    /// Reads up to `scan` log entries of the workspace after `after`, keeping the selected
    /// types.
    fn claim(
        &self,
        workspace: WorkspaceId,
        after: i64,
        scan: usize,
        types: TypeFilter,
    ) -> StoreFuture<'_, Claimed>;
    /// Records a batch's outcome: cursor, counters, dead letters, last success; clears the
    /// failure streak when something was delivered.
    fn ack(&self, ack: Ack) -> StoreFuture<'_, ()>;
    /// Records a failed attempt (`retried` events will be re-sent); returns the start of the
    /// failure streak.
    fn record_failure(
        &self,
        id: CurrentId,
        owner: &str,
        error: LastError,
        retried: u64,
    ) -> StoreFuture<'_, Millis>;
    /// Drops every selected queued event that entered the log before `cutoff` (moving the
    /// position past them), records and returns what was dropped.
    fn apply_retention(
        &self,
        id: CurrentId,
        owner: &str,
        cutoff: Millis,
        types: TypeFilter,
        now: Millis,
    ) -> StoreFuture<'_, Option<DropRecord>>;
    fn lag(&self, id: CurrentId, types: TypeFilter) -> StoreFuture<'_, Lag>;
    /// Records "the log head is here at `now`" when it moved; forgets samples older than
    /// `keep_ms` (keeping one so old positions still map to a time).
    fn tick_log_clock(&self, now: Millis, keep_ms: u64) -> StoreFuture<'_, ()>;

    // -- dead letters and replays -------------------------------------------------------
    fn list_dead_letters(
        &self,
        id: CurrentId,
        after_id: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<DeadLetter>>;
    /// Marks dead letters for replay; returns how many.
    fn replay_dead_letters(&self, id: CurrentId, pick: DeadLetterPick) -> StoreFuture<'_, u64>;
    /// Dead letters marked for replay, oldest first.
    fn claim_dead_letters(&self, id: CurrentId, limit: usize) -> StoreFuture<'_, Vec<DeadLetter>>;
    /// Queues the log entries that entered the log within `[from, to]` for re-delivery.
    fn replay_window(
        &self,
        id: CurrentId,
        from: Millis,
        to: Millis,
    ) -> StoreFuture<'_, Option<ReplayWindow>>;
    /// The oldest pending replay window, if any.
    fn next_replay_window(&self, id: CurrentId) -> StoreFuture<'_, Option<ReplayWindow>>;
    fn list_drops(&self, id: CurrentId, limit: usize) -> StoreFuture<'_, Vec<DropRecord>>;
    /// Counts test events against the cap (`max` per `window_ms`); `Conflict` when over it.
    fn record_test_events(
        &self,
        id: CurrentId,
        count: u64,
        max: u64,
        window_ms: u64,
        now: Millis,
    ) -> StoreFuture<'_, ()>;

    // -- appending ----------------------------------------------------------------------
    /// Appends events that do not come with a user-state change (benchmarks, fixtures,
    /// imports); returns the last position written.
    fn append_events(
        &self,
        workspace: WorkspaceId,
        events: Vec<(Option<UserSeq>, CurrentsEvent)>,
    ) -> StoreFuture<'_, i64>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_are_checked() {
        assert!(EndpointUrl::parse("https://h.example/path?k=Brand%20A").is_ok());
        assert!(EndpointUrl::parse("http://127.0.0.1:8080").is_ok());
        assert!(EndpointUrl::parse("http://[::1]:8080/x").is_ok());
        assert_eq!(EndpointUrl::parse("ftp://h"), Err(EndpointError::Scheme));
        assert_eq!(EndpointUrl::parse("https://"), Err(EndpointError::NoHost));
        assert_eq!(
            EndpointUrl::parse("https://u:p@h/"),
            Err(EndpointError::Credentials)
        );
        assert_eq!(
            EndpointUrl::parse("https://h/a b"),
            Err(EndpointError::BadCharacters)
        );
        let url = EndpointUrl::parse("https://h/x?token=secret").unwrap();
        assert!(!format!("{url:?}").contains("secret"));
        assert!(url.is_https());
    }

    #[test]
    fn bearer_tokens_are_token68_and_redacted() {
        assert!(BearerToken::parse("0p3n5354m3==").is_ok());
        assert!(BearerToken::parse("a-b.c_d~e+f/g").is_ok());
        assert!(BearerToken::parse("").is_err());
        assert!(BearerToken::parse("has space").is_err());
        assert!(BearerToken::parse("==").is_err());
        assert_eq!(
            format!("{:?}", BearerToken::parse("s3cret").unwrap()),
            "BearerToken(<redacted>)"
        );
    }

    #[test]
    fn status_rules() {
        assert_eq!(
            StatusChange::Launch.rule(),
            (&[CurrentStatus::Draft][..], CurrentStatus::Active)
        );
        assert!(
            StatusChange::Enable
                .rule()
                .0
                .contains(&CurrentStatus::Disabled)
        );
        for s in CurrentStatus::ALL {
            assert_eq!(CurrentStatus::parse(s.as_str()), Some(s));
        }
        for k in CurrentKind::ALL {
            assert_eq!(CurrentKind::parse(k.as_str()), Some(k));
        }
    }
}
