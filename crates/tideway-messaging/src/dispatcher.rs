//! The dispatcher: claims due sends from the store's queue, renders each for its user, hands
//! it to its channel, and settles the outcome with its Currents events.
//!
//! The loop is plain: claim (leased) → render → send → classify → settle (fenced by the lease).
//! Sends run concurrently up to [`DispatchConfig::concurrency`]; one campaign (or ad-hoc
//! dispatch) may hold at most [`DispatchConfig::per_source`] of those slots, so a receiver that
//! hangs for its whole timeout delays its own campaign only: the sends of other campaigns are
//! claimed and sent beside it. A claimed send whose campaign is at its cap is *parked* in the
//! process (up to `per_source` per campaign) and started when a slot of its campaign frees;
//! claims come in batches as slots free, and at least every 50 ms, so other campaigns' sends
//! behind a slow one are found. Sends beyond the parking bound, parked for half their lease,
//! of a paused campaign, or beyond a campaign's rate limit are *deferred* (due again shortly,
//! no attempt counted).
//!
//! Settlement is batched: outcomes are collected as sends finish and written together
//! ([`MessagingStore::settle_sends`]) every few milliseconds, so a million-user campaign is a
//! few thousand transactions, not a million.
//!
//! Crash safety: a send is `pending` until its outcome is settled. A crash between the
//! channel's answer and the settlement leaves the lease to expire; the send is claimed again
//! and re-sent with the same idempotency key (`Idempotency-Key` header, `Message-ID`): at most
//! the messages in flight are duplicated.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tideway_core::campaigns::{
    CampaignDefinition, CampaignStatus, Delivery, EmailContent, FrequencyCap, MAX_ATTACHMENT_BYTES,
    Message, SubscriptionState, Variant, WebhookContent, user_dispatch_id,
};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventUser};
use tideway_core::ids::{EventId, UserSeq, WorkspaceId};
use tideway_core::message_events::{MessageSource, Origin, WebhookFailure};
use tideway_core::profile::{StandardField, UserRecord};
use tideway_core::store::{
    AdminStore, CampaignRecord, ClaimedSend, DispatchRecord, DispatchSource, MessagingStore,
    SendState, Settlement, StoreError, Workspace,
};
use tideway_currents::Clock;
use tokio::sync::{Notify, Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::audience::Audiences;
use crate::email::{self, AttachedFile, EmailAttempt, EmailOutcome, OutgoingEmail, SmtpSender};
use crate::liquid::{RenderError, Template, Vars};
use crate::personalise::{CampaignVars, vars_for};
use crate::tracking::{TrackingKey, TrackingUrls, add_open_pixel, rewrite_links};
use crate::webhook::{
    self, AttachmentError, Method, WebhookOutcome, WebhookRequest, WebhookSender,
};

/// Most email attempts (the first and its retries) before a soft bounce becomes final.
pub const EMAIL_MAX_ATTEMPTS: u32 = 5;

/// How the dispatcher runs.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// The lease owner's name: unique per node and stable across its restarts (`tideway serve`
    /// uses host and data directory), so a restarted node takes back its own leases.
    pub owner: String,
    /// How long a claim is held: longer than the slowest attempt (a 90 s webhook timeout).
    pub lease_ms: u64,
    /// Most sends claimed at once.
    pub claim_batch: usize,
    /// Most sends in flight.
    pub concurrency: usize,
    /// Most sends in flight of one campaign or ad-hoc dispatch.
    pub per_source: usize,
    /// How long to wait when nothing is due.
    pub idle: Duration,
    /// How soon a deferred send is due again.
    pub defer_ms: i64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            owner: format!("node-{}", uuid::Uuid::new_v4().simple()),
            lease_ms: 120_000,
            claim_batch: 1_000,
            concurrency: 512,
            per_source: 256,
            idle: Duration::from_millis(200),
            defer_ms: 1_000,
        }
    }
}

/// The channels a dispatcher sends on.
#[derive(Clone)]
pub struct Channels {
    pub webhook: WebhookSender,
    /// `None` when no `smtp-url` is configured: email sends are aborted as undeliverable.
    pub smtp: Option<SmtpSender>,
}

/// Open/click tracking and subscription links: the signing key and the public base URL.
#[derive(Clone)]
pub struct Tracking {
    pub key: TrackingKey,
    pub urls: TrackingUrls,
}

/// The store a dispatcher needs.
pub trait DispatchStore: MessagingStore + AdminStore {}
impl<T: MessagingStore + AdminStore + ?Sized> DispatchStore for T {}

/// The subscription links a template may name (`braze-messaging.md` §7).
const LINK_NAMES: [&str; 4] = [
    "set_user_to_unsubscribed_url",
    "unsubscribe_url",
    "set_user_to_subscribed_url",
    "set_user_to_opted_in_url",
];

/// The subscription links for a preview, which has no send to sign them for: inert
/// same-page anchors named after each link (`#preview-unsubscribe_url`), so a template that
/// names one renders a visible link that changes nobody's subscription when clicked.
pub fn preview_links() -> Map<String, Value> {
    LINK_NAMES
        .iter()
        .map(|name| ((*name).to_owned(), json!(format!("#preview-{name}"))))
        .collect()
}

/// A campaign or ad-hoc definition with its templates parsed once.
struct Compiled {
    campaign: Option<CampaignRecord>,
    definition: CampaignDefinition,
    templates: HashMap<String, Template>,
    /// Whether any template names a subscription link: signing one costs more than the rest
    /// of a webhook's rendering, so sends whose templates never show one skip it.
    uses_links: bool,
}

impl Compiled {
    fn new(campaign: Option<CampaignRecord>, definition: CampaignDefinition) -> Compiled {
        let mut templates = HashMap::new();
        let mut uses_links = false;
        for (path, source) in definition.templates() {
            uses_links |= LINK_NAMES.iter().any(|name| source.contains(name));
            match Template::parse(source) {
                Ok(t) => {
                    templates.insert(path, t);
                }
                Err(e) => debug!(path, error = %e, "stored template does not parse"),
            }
        }
        Compiled {
            campaign,
            definition,
            templates,
            uses_links,
        }
    }

    fn variant_index(&self, id: &str) -> Option<usize> {
        self.definition.variants.iter().position(|v| v.id == id)
    }

    fn render(&self, path: &str, vars: &Vars) -> Result<String, RenderError> {
        match self.templates.get(path) {
            Some(t) => t.render(vars),
            None => Err(RenderError::Failed {
                message: format!("{path} does not parse"),
            }),
        }
    }
}

/// A campaign's token bucket (its `rate_limit_per_minute`), per node.
struct Bucket {
    per_minute: u32,
    tokens: f64,
    at: Millis,
}

impl Bucket {
    fn take(&mut self, now: Millis) -> bool {
        let rate = f64::from(self.per_minute) / 60_000.0;
        let elapsed = (now.0 - self.at.0).max(0) as f64;
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(self.per_minute));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The dispatcher of one process.
pub struct Dispatcher<S: ?Sized> {
    store: Arc<S>,
    /// Who is in a campaign's audience when a delayed triggered message goes out.
    audiences: Arc<dyn Audiences>,
    channels: Channels,
    tracking: Option<Tracking>,
    clock: Clock,
    config: DispatchConfig,
    workspaces: Mutex<HashMap<WorkspaceId, Workspace>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    in_flight: Mutex<HashMap<String, usize>>,
    /// Users with a send in flight that counts toward frequency caps, and that send: a second
    /// such send for the user is deferred until the first is settled (and so counted by
    /// [`MessagingStore::sends_since`]), so caps hold under concurrency. Per node: two nodes
    /// may each have one such send of a user in flight (see ARCHITECTURE.md).
    capped_in_flight: Mutex<HashMap<(WorkspaceId, UserSeq), i64>>,
    /// Each workspace's frequency-capping rules, re-read every [`CAPS_TTL_MS`].
    caps: Mutex<HashMap<WorkspaceId, CachedCaps>>,
    /// Attachment files fetched in the last [`ATTACHMENT_TTL_MS`], by URL: a message to many
    /// users fetches each of its files once, not once per email. Each URL's slot is locked
    /// while it is fetched, so emails sent at once wait for the one fetch.
    attachments: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<CachedFile>>>>>,
    wake: Notify,
}

/// A fetched attachment file (its bytes and type) and when it was fetched.
type CachedFile = (Millis, Arc<(Vec<u8>, Option<String>)>);

/// How long a fetched attachment file is reused.
const ATTACHMENT_TTL_MS: i64 = 60_000;

/// Files kept at most (each ≤ 2 MB): beyond, the oldest is dropped.
const MAX_CACHED_ATTACHMENTS: usize = 16;

/// A workspace's frequency-capping rules and when they were read.
type CachedCaps = (Millis, Arc<Vec<FrequencyCap>>);

/// A webhook's rendered URL, body and headers.
type RenderedWebhook = (String, String, Vec<(String, String)>);

/// How long a workspace's frequency-capping rules are cached.
const CAPS_TTL_MS: i64 = 5_000;

/// How long outcomes are gathered into one settlement transaction: long enough that a busy
/// campaign writes a few hundred at once (the index pages they touch are written once per
/// commit), short against the time a send takes.
const SETTLE_WINDOW: Duration = Duration::from_millis(5);

/// How often the dispatcher claims even when every claimed send is parked behind its
/// campaign's cap, so other campaigns' sends are found.
const DISCOVERY: Duration = Duration::from_millis(50);

/// Most sends claimed by a look for other campaigns' sends when nothing has room (those of a
/// campaign at its cap go back to the queue).
const DISCOVERY_CLAIM: usize = 16;

/// Claimed sends waiting for a slot of their campaign, oldest first per campaign. Parking
/// (rather than handing them back at once) keeps a campaign that is at its cap from being
/// claimed and deferred over and over; the per-campaign bound and the discovery claims keep
/// other campaigns moving.
struct Parked {
    by_source: std::collections::BTreeMap<String, std::collections::VecDeque<(Prepared, Millis)>>,
    total: usize,
    claimed_at: std::time::Instant,
}

impl Default for Parked {
    fn default() -> Self {
        Parked {
            by_source: std::collections::BTreeMap::new(),
            total: 0,
            claimed_at: std::time::Instant::now(),
        }
    }
}

impl Parked {
    fn len(&self) -> usize {
        self.total
    }

    fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn count(&self, source: &str) -> usize {
        self.by_source.get(source).map_or(0, |q| q.len())
    }

    fn push(&mut self, p: Prepared, at: Millis) {
        self.by_source
            .entry(p.source_key.clone())
            .or_default()
            .push_back((p, at));
        self.total += 1;
    }

    fn pop(&mut self, source: &str) -> Option<Prepared> {
        let queue = self.by_source.get_mut(source)?;
        let (p, _) = queue.pop_front()?;
        if queue.is_empty() {
            self.by_source.remove(source);
        }
        self.total -= 1;
        Some(p)
    }

    /// Removes and returns the sends parked before `before`.
    fn take_stale(&mut self, before: Millis) -> Vec<Prepared> {
        let mut out = Vec::new();
        for queue in self.by_source.values_mut() {
            while queue.front().is_some_and(|(_, at)| at.0 < before.0) {
                if let Some((p, _)) = queue.pop_front() {
                    out.push(p);
                }
            }
        }
        self.by_source.retain(|_, q| !q.is_empty());
        self.total -= out.len();
        out
    }
}

/// A frequency-cap check's answer.
enum CapCheck {
    /// Under every cap: send (the user's slot is now held).
    Clear,
    /// Another send of this user is in flight: try again shortly.
    Busy,
    /// At a cap: this send is dropped (counted as `frequency_capped`).
    Capped,
}

/// Everything one send needs besides its claim.
struct Prepared {
    claim: ClaimedSend,
    user: Arc<UserRecord>,
    workspace: Workspace,
    dispatch: Arc<DispatchRecord>,
    compiled: Arc<Compiled>,
    variant: usize,
    source_key: String,
    /// At a frequency cap: not sent, settled at once with the channel's `Abort` event
    /// (`abort_type: frequency_capped`).
    capped: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn event_id() -> EventId {
    EventId(uuid::Uuid::new_v4().hyphenated().to_string())
}

/// A jitter in [0, 1) derived from the send and attempt: retries of different sends spread
/// out, and the schedule is reproducible (no hidden randomness).
fn jitter(send: i64, attempt: u32) -> f64 {
    let digest = Sha256::new()
        .chain_update(send.to_be_bytes())
        .chain_update(attempt.to_be_bytes())
        .finalize();
    f64::from(u32::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3],
    ])) / (f64::from(u32::MAX) + 1.0)
}

/// The idempotency key of a send: the same on every attempt and after a crash.
pub fn idempotency_key(workspace: WorkspaceId, send: i64) -> String {
    format!("tw-{}-{}", workspace.0, send)
}

impl<S: DispatchStore + ?Sized + 'static> Dispatcher<S> {
    pub fn new(
        store: Arc<S>,
        audiences: Arc<dyn Audiences>,
        channels: Channels,
        tracking: Option<Tracking>,
        clock: Clock,
        config: DispatchConfig,
    ) -> Arc<Self> {
        Arc::new(Dispatcher {
            store,
            audiences,
            channels,
            tracking,
            clock,
            config,
            workspaces: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            capped_in_flight: Mutex::new(HashMap::new()),
            caps: Mutex::new(HashMap::new()),
            attachments: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        })
    }

    /// Something was enqueued: look for due sends now rather than after the idle wait.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        // Sends a previous incarnation of this node (same owner name) had in flight are
        // claimable again now, not when their lease ends.
        match self.store.release_leases(&self.config.owner).await {
            Ok(0) => {}
            Ok(n) => {
                info!(released = n, owner = %self.config.owner, "took back the sends in flight at the last stop")
            }
            Err(e) => {
                warn!(error = %e, "releasing this node's old leases failed; they expire on their own")
            }
        }
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Settlement>();
        let settler = tokio::spawn(Arc::clone(&self).settle_loop(done_rx));
        let _settler = AbortOnDrop(settler);
        let mut parked = Parked::default();
        loop {
            let now = self.clock.now();
            // Sends waiting for their campaign's slot go first; those held too long (their
            // lease) go back to the queue.
            for late in parked.take_stale(Millis(now.0 - self.lease_ms_i64() / 2)) {
                let _ = done_tx.send(self.defer_parked(&late, now));
            }
            self.start_parked(&mut parked, &slots, &done_tx);
            // Room for what can start soon: the free slots, plus one campaign's worth parked
            // ahead so a busy campaign has its next sends ready when slots free up. Claiming
            // more than that only sends the surplus back to the queue (claimed, loaded and
            // settled for nothing: it once cost a broadcast 2.6 claims per send).
            let room = |parked: &Parked| {
                (slots.available_permits() + self.config.per_source)
                    .min(self.config.claim_batch)
                    .saturating_sub(parked.len())
            };
            // Claim in batches, not one send per completion; but at least every
            // `DISCOVERY` look at the queue, so a campaign whose sends are all parked behind
            // a slow receiver does not hide other campaigns' sends.
            let discovery_due = parked.claimed_at.elapsed() >= DISCOVERY;
            let free = room(&parked);
            if free < (self.config.claim_batch / 4).max(1) && !(discovery_due && free > 0) {
                tokio::select! {
                    _ = tokio::time::sleep(DISCOVERY) => {}
                    _ = self.wake.notified() => {}
                }
                if parked.is_empty() || slots.available_permits() == 0 {
                    continue;
                }
                if parked.claimed_at.elapsed() < DISCOVERY {
                    continue;
                }
            }
            // A look for other campaigns' sends claims a few even when nothing has room.
            let room = room(&parked).max(DISCOVERY_CLAIM);
            parked.claimed_at = std::time::Instant::now();
            let claimed = match self
                .store
                .claim_sends(&self.config.owner, now, self.config.lease_ms, room)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "claiming sends failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if claimed.is_empty() {
                if !parked.is_empty() {
                    continue;
                }
                let wait = match self.store.next_due().await {
                    Ok(Some(due)) => Duration::from_millis((due.0 - now.0).clamp(1, 60_000) as u64)
                        .min(self.config.idle),
                    _ => self.config.idle,
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.wake.notified() => {}
                }
                continue;
            }
            metrics::counter!("tideway_messages_claimed_total").increment(claimed.len() as u64);
            let (ready, settled) = self.prepare(claimed, now).await;
            for s in settled {
                let _ = done_tx.send(s);
            }
            for p in ready {
                if p.capped {
                    // Nothing to send: its Abort is settled now, outside the campaign's slots.
                    let _ = done_tx.send(self.attempt(p).await);
                    continue;
                }
                // Each campaign parks at most twice `per_source` sends beyond those in flight
                // (a slot's worth and the claim ahead); the rest go back to the queue
                // (deferred, no attempt counted).
                if parked.count(&p.source_key) >= 2 * self.config.per_source {
                    let _ = done_tx.send(self.defer_parked(&p, now));
                } else {
                    parked.push(p, now);
                }
            }
            self.start_parked(&mut parked, &slots, &done_tx);
        }
    }

    fn lease_ms_i64(&self) -> i64 {
        i64::try_from(self.config.lease_ms).unwrap_or(i64::MAX)
    }

    /// A parked send goes back to the queue: due again after `defer_ms`, its frequency-cap slot
    /// given back.
    fn defer_parked(&self, p: &Prepared, now: Millis) -> Settlement {
        let slot = (p.claim.workspace, p.claim.user);
        {
            let mut capped = lock(&self.capped_in_flight);
            if capped.get(&slot) == Some(&p.claim.id) {
                capped.remove(&slot);
            }
        }
        metrics::counter!("tideway_messages_deferred_total", "reason" => "campaign_busy")
            .increment(1);
        Settlement {
            send: p.claim.id,
            workspace: p.claim.workspace,
            user: p.claim.user,
            state: SendState::Deferred {
                at: Millis(now.0 + self.config.defer_ms),
            },
            events: Vec::new(),
        }
    }

    /// Starts parked sends while there are free slots, campaign by campaign in turn, each up
    /// to its `per_source` sends in flight.
    fn start_parked(
        self: &Arc<Self>,
        parked: &mut Parked,
        slots: &Arc<Semaphore>,
        done_tx: &mpsc::UnboundedSender<Settlement>,
    ) {
        loop {
            let mut started = false;
            let sources: Vec<String> = parked.by_source.keys().cloned().collect();
            for source in sources {
                let busy = lock(&self.in_flight).get(&source).copied().unwrap_or(0);
                if busy >= self.config.per_source {
                    continue;
                }
                let Ok(permit) = Arc::clone(slots).try_acquire_owned() else {
                    return;
                };
                let Some(p) = parked.pop(&source) else {
                    continue;
                };
                *lock(&self.in_flight).entry(source).or_insert(0) += 1;
                started = true;
                let me = Arc::clone(self);
                let done = done_tx.clone();
                tokio::spawn(async move {
                    let key = p.source_key.clone();
                    let settlement = me.attempt(p).await;
                    {
                        let mut flight = lock(&me.in_flight);
                        if let Some(n) = flight.get_mut(&key) {
                            *n = n.saturating_sub(1);
                            if *n == 0 {
                                flight.remove(&key);
                            }
                        }
                    }
                    let _ = done.send(settlement);
                    drop(permit);
                    // A slot is free: start a parked send or claim more.
                    me.wake.notify_one();
                });
            }
            if !started {
                return;
            }
        }
    }

    async fn settle_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Settlement>) {
        loop {
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut batch = vec![first];
            // Gather what finishes within a few milliseconds into one transaction.
            let deadline = tokio::time::Instant::now() + SETTLE_WINDOW;
            while batch.len() < 2_000 {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    _ => break,
                }
            }
            let n = batch.len() as u64;
            loop {
                match self
                    .store
                    .settle_sends(&self.config.owner, self.clock.now(), batch.clone())
                    .await
                {
                    Ok(refused) => {
                        if refused > 0 {
                            metrics::counter!("tideway_messages_settle_refused_total")
                                .increment(refused);
                            warn!(refused, "sends settled after their lease was lost");
                        }
                        metrics::counter!("tideway_messages_settled_total").increment(n);
                        // The users' frequency-cap slots are free once their sends are
                        // recorded (and so counted by the next send's check).
                        let mut capped = lock(&self.capped_in_flight);
                        for s in &batch {
                            if capped.get(&(s.workspace, s.user)) == Some(&s.send) {
                                capped.remove(&(s.workspace, s.user));
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        // Not settled: keep them and retry; if this process dies, the lease
                        // expires and the sends are claimed again (at most these re-sent).
                        warn!(error = %e, "settling sends failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    async fn workspace(&self, id: WorkspaceId) -> Result<Option<Workspace>, StoreError> {
        if let Some(w) = lock(&self.workspaces).get(&id) {
            return Ok(Some(w.clone()));
        }
        let all = self.store.list_workspaces().await?;
        let mut cache = lock(&self.workspaces);
        for w in all {
            cache.insert(w.id, w);
        }
        Ok(cache.get(&id).cloned())
    }

    /// Loads what the claimed sends need; answers at once the ones that cannot go (their
    /// campaign is gone, stopped or paused, the user was deleted, the source is at its cap).
    async fn prepare(
        &self,
        claimed: Vec<ClaimedSend>,
        now: Millis,
    ) -> (Vec<Prepared>, Vec<Settlement>) {
        let mut ready = Vec::new();
        let mut settled = Vec::new();
        // Per-claim lookups, hashed with FxHash: a claim of hundreds of sends asks these maps
        // a few times per send, and SipHash showed in the dispatcher's profile.
        let mut dispatches: FxHashMap<(WorkspaceId, String), Option<Arc<DispatchRecord>>> =
            FxHashMap::default();
        let mut compiled: FxHashMap<(WorkspaceId, String), Option<Arc<Compiled>>> =
            FxHashMap::default();
        let mut by_workspace: FxHashMap<WorkspaceId, Vec<UserSeq>> = FxHashMap::default();
        for c in &claimed {
            by_workspace.entry(c.workspace).or_default().push(c.user);
        }
        let mut users: FxHashMap<(WorkspaceId, UserSeq), Arc<UserRecord>> = FxHashMap::default();
        let mut workspaces: FxHashMap<WorkspaceId, Workspace> = FxHashMap::default();
        for (ws, seqs) in by_workspace {
            match self.workspace(ws).await {
                Ok(Some(w)) => {
                    workspaces.insert(ws, w);
                }
                _ => continue,
            }
            match self.store.users_by_seq(ws, seqs).await {
                Ok(list) => {
                    for u in list {
                        users.insert((ws, u.seq), Arc::new(u));
                    }
                }
                Err(e) => warn!(workspace = ws.0, error = %e, "loading recipients failed"),
            }
        }
        for c in claimed {
            let defer = |c: &ClaimedSend, ms: i64| Settlement {
                send: c.id,
                workspace: c.workspace,
                user: c.user,
                state: SendState::Deferred {
                    at: Millis(now.0 + ms),
                },
                events: Vec::new(),
            };
            let Some(workspace) = workspaces.get(&c.workspace).cloned() else {
                settled.push(defer(&c, 5_000));
                continue;
            };
            let dkey = (c.workspace, c.job.dispatch_id.clone());
            if !dispatches.contains_key(&dkey) {
                let d = self
                    .store
                    .dispatch(c.workspace, &c.job.dispatch_id)
                    .await
                    .ok()
                    .flatten()
                    .map(Arc::new);
                dispatches.insert(dkey.clone(), d);
            }
            let Some(dispatch) = dispatches.get(&dkey).cloned().flatten() else {
                settled.push(fail(&c, Vec::new()));
                continue;
            };
            let source_key = match &dispatch.source {
                DispatchSource::Campaign { campaign_id } => campaign_id.clone(),
                DispatchSource::AdHoc { .. } | DispatchSource::Canvas { .. } => {
                    format!("adhoc:{}", dispatch.id)
                }
            };
            let ckey = (c.workspace, source_key.clone());
            if !compiled.contains_key(&ckey) {
                let loaded = match &dispatch.source {
                    DispatchSource::Campaign { campaign_id } => {
                        match self.store.campaign(c.workspace, campaign_id).await {
                            Ok(Some(record)) => CampaignDefinition::load(&record.definition)
                                .ok()
                                .map(|d| Arc::new(Compiled::new(Some(record), d))),
                            Ok(None) => None,
                            Err(_) => {
                                settled.push(defer(&c, 5_000));
                                continue;
                            }
                        }
                    }
                    // A send credited to a campaign (`crate::sends::credit_to_campaign`) goes
                    // out only while that campaign would send: its status is checked below as
                    // the campaign's own sends' is (paused: later; stopped: never).
                    DispatchSource::AdHoc { definition } => {
                        let credited = match crate::sends::credited_campaign(definition) {
                            None => None,
                            Some((campaign_id, _)) => {
                                match self.store.campaign(c.workspace, campaign_id).await {
                                    Ok(record) => record,
                                    Err(_) => {
                                        settled.push(defer(&c, 5_000));
                                        continue;
                                    }
                                }
                            }
                        };
                        CampaignDefinition::load(definition)
                            .ok()
                            .map(|d| Arc::new(Compiled::new(credited, d)))
                    }
                    // A Canvas entry dispatch has no messages (its entries' steps send under
                    // dispatches of their own).
                    DispatchSource::Canvas { .. } => None,
                };
                compiled.insert(ckey.clone(), loaded);
            }
            let Some(comp) = compiled.get(&ckey).cloned().flatten() else {
                // The campaign was deleted: nothing to send.
                metrics::counter!("tideway_messages_skipped_total", "reason" => "campaign_deleted")
                    .increment(1);
                settled.push(fail(&c, Vec::new()));
                continue;
            };
            if let Some(campaign) = &comp.campaign {
                match campaign.status {
                    CampaignStatus::Active => {}
                    CampaignStatus::Paused | CampaignStatus::Draft => {
                        settled.push(defer(&c, 30_000));
                        continue;
                    }
                    CampaignStatus::Stopped => {
                        metrics::counter!("tideway_messages_skipped_total", "reason" => "campaign_stopped")
                            .increment(1);
                        settled.push(fail(&c, Vec::new()));
                        continue;
                    }
                }
            }
            let Some(user) = users.get(&(c.workspace, c.user)).cloned() else {
                metrics::counter!("tideway_messages_skipped_total", "reason" => "user_deleted")
                    .increment(1);
                settled.push(fail(&c, Vec::new()));
                continue;
            };
            let Some(variant) = comp.variant_index(&c.job.variant) else {
                metrics::counter!("tideway_messages_skipped_total", "reason" => "variant_removed")
                    .increment(1);
                settled.push(fail(&c, Vec::new()));
                continue;
            };
            // The campaign's rate limit (its cap on sends in flight is applied when the send is
            // started, see `run`).
            if let Some(limit) = comp.definition.rate_limit_per_minute {
                let allowed = lock(&self.buckets)
                    .entry(source_key.clone())
                    .or_insert(Bucket {
                        per_minute: limit,
                        tokens: f64::from(limit.clamp(1, 10)),
                        at: now,
                    })
                    .take(now);
                if !allowed {
                    metrics::counter!("tideway_messages_rate_limited_total").increment(1);
                    let wait = (60_000 / i64::from(limit.max(1))).max(50);
                    settled.push(defer(&c, wait));
                    continue;
                }
            }
            let mut capped = false;
            if comp.definition.obey_frequency_caps {
                match self.frequency_check(&c, now).await {
                    Ok(CapCheck::Clear) => {}
                    Ok(CapCheck::Busy) => {
                        settled.push(defer(&c, self.config.defer_ms));
                        continue;
                    }
                    Ok(CapCheck::Capped) => {
                        metrics::counter!("tideway_messages_skipped_total", "reason" => "frequency_capped")
                            .increment(1);
                        capped = true;
                    }
                    Err(e) => {
                        warn!(error = %e, "reading frequency caps failed; deferring the send");
                        settled.push(defer(&c, 5_000));
                        continue;
                    }
                }
            }
            ready.push(Prepared {
                claim: c,
                user,
                workspace,
                dispatch,
                compiled: comp,
                variant,
                source_key,
                capped,
            });
        }
        let (ready, left) = self.still_in_audience(ready).await;
        settled.extend(left);
        (ready, settled)
    }

    /// A delayed action-based message goes out only to users still in the campaign's audience
    /// when it is due (Braze checks the audience at send time); the others are dropped
    /// (counted as `left_audience`). One audience question per campaign in the claim.
    async fn still_in_audience(&self, ready: Vec<Prepared>) -> (Vec<Prepared>, Vec<Settlement>) {
        let delayed = |p: &Prepared| {
            p.compiled.campaign.is_some()
                && matches!(&p.compiled.definition.delivery, Delivery::ActionBased(a) if a.delay_secs > 0)
        };
        let mut groups: HashMap<(WorkspaceId, String), Vec<UserSeq>> = HashMap::new();
        for p in ready.iter().filter(|p| delayed(p)) {
            groups
                .entry((p.claim.workspace, p.source_key.clone()))
                .or_default()
                .push(p.claim.user);
        }
        if groups.is_empty() {
            return (ready, Vec::new());
        }
        let mut inside: HashMap<(WorkspaceId, String), Option<HashSet<UserSeq>>> = HashMap::new();
        for ((ws, key), users) in groups {
            let Some(p) = ready
                .iter()
                .find(|p| p.claim.workspace == ws && p.source_key == key)
            else {
                continue;
            };
            let answer = match crate::audience::audience_filter(&p.compiled.definition.audience) {
                Ok(filter) => self.audiences.matching(ws, filter, users).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(members) => {
                    inside.insert((ws, key), Some(members.into_iter().collect()));
                }
                Err(e) => {
                    // Unknown: send (the audience held when it was triggered).
                    warn!(workspace = ws.0, campaign = %key, error = %e, "checking the audience at send time failed");
                    inside.insert((ws, key), None);
                }
            }
        }
        let mut keep = Vec::with_capacity(ready.len());
        let mut left = Vec::new();
        for p in ready {
            let gone = delayed(&p)
                && inside
                    .get(&(p.claim.workspace, p.source_key.clone()))
                    .and_then(Option::as_ref)
                    .is_some_and(|members| !members.contains(&p.claim.user));
            if gone {
                metrics::counter!("tideway_messages_skipped_total", "reason" => "left_audience")
                    .increment(1);
                let slot = (p.claim.workspace, p.claim.user);
                let mut capped = lock(&self.capped_in_flight);
                if capped.get(&slot) == Some(&p.claim.id) {
                    capped.remove(&slot);
                }
                drop(capped);
                left.push(fail(&p.claim, Vec::new()));
            } else {
                keep.push(p);
            }
        }
        (keep, left)
    }

    /// The file at `url`, fetched at most once per [`ATTACHMENT_TTL_MS`] (failures are not
    /// kept: the next email tries again).
    async fn attachment(
        &self,
        url: &str,
    ) -> Result<Arc<(Vec<u8>, Option<String>)>, AttachmentError> {
        let now = self.clock.now();
        let fresh = |at: Millis| now.0 - at.0 < ATTACHMENT_TTL_MS;
        let slot = {
            let mut cache = lock(&self.attachments);
            // Slots nobody is using whose file is stale or missing go; then, over the bound,
            // the idle slots with the oldest files.
            cache.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot
                        .try_lock()
                        .is_ok_and(|held| held.as_ref().is_some_and(|(at, _)| fresh(*at)))
            });
            while cache.len() >= MAX_CACHED_ATTACHMENTS {
                let oldest = cache
                    .iter()
                    .filter(|(_, slot)| Arc::strong_count(slot) == 1)
                    .filter_map(|(url, slot)| {
                        let at = slot.try_lock().ok()?.as_ref()?.0;
                        Some((at, url.clone()))
                    })
                    .min();
                let Some((_, url)) = oldest else { break };
                cache.remove(&url);
            }
            Arc::clone(cache.entry(url.to_owned()).or_default())
        };
        let mut held = slot.lock().await;
        if let Some((at, file)) = held.as_ref()
            && fresh(*at)
        {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(
            self.channels
                .webhook
                .fetch_attachment(url, MAX_ATTACHMENT_BYTES)
                .await?,
        );
        *held = Some((now, Arc::clone(&file)));
        Ok(file)
    }

    /// The workspace's frequency-capping rules, cached for [`CAPS_TTL_MS`].
    async fn caps(
        &self,
        workspace: WorkspaceId,
        now: Millis,
    ) -> Result<Arc<Vec<FrequencyCap>>, StoreError> {
        if let Some((at, caps)) = lock(&self.caps).get(&workspace)
            && now.0 - at.0 < CAPS_TTL_MS
        {
            return Ok(Arc::clone(caps));
        }
        let settings = self.store.messaging_settings(workspace).await?;
        let caps = Arc::new(
            settings
                .as_ref()
                .and_then(|s| FrequencyCap::parse_rules(s).ok())
                .unwrap_or_default(),
        );
        lock(&self.caps).insert(workspace, (now, Arc::clone(&caps)));
        Ok(caps)
    }

    /// Whether the workspace's frequency caps let this send go now. On `Clear` the user's
    /// slot is taken (released when the send is settled).
    async fn frequency_check(&self, c: &ClaimedSend, now: Millis) -> Result<CapCheck, StoreError> {
        let caps = self.caps(c.workspace, now).await?;
        if caps.is_empty() {
            return Ok(CapCheck::Clear);
        }
        let slot = (c.workspace, c.user);
        {
            let mut held = lock(&self.capped_in_flight);
            match held.get(&slot) {
                Some(holder) if *holder != c.id => return Ok(CapCheck::Busy),
                _ => {
                    held.insert(slot, c.id);
                }
            }
        }
        for cap in caps.iter() {
            let since = Millis(now.0 - cap.window_secs * 1_000);
            let sent = match self.store.sends_since(c.workspace, c.user, since).await {
                Ok(n) => n,
                Err(e) => {
                    lock(&self.capped_in_flight).remove(&slot);
                    return Err(e);
                }
            };
            if sent >= u64::from(cap.max) {
                lock(&self.capped_in_flight).remove(&slot);
                return Ok(CapCheck::Capped);
            }
        }
        Ok(CapCheck::Clear)
    }

    fn links(&self, compiled: &Compiled, workspace: WorkspaceId, send: i64) -> Map<String, Value> {
        let mut links = Map::new();
        if !compiled.uses_links {
            return links;
        }
        if let Some(t) = &self.tracking {
            let url = t.urls.unsubscribe(&t.key, workspace.0, send);
            for name in [LINK_NAMES[0], LINK_NAMES[1]] {
                links.insert(name.into(), json!(url));
            }
            let resubscribe = format!("{url}?state=subscribed");
            links.insert(LINK_NAMES[2].into(), json!(resubscribe));
            links.insert(LINK_NAMES[3].into(), json!(format!("{url}?state=opted_in")));
        }
        links
    }

    /// One attempt of one prepared send, classified into its settlement.
    async fn attempt(&self, p: Prepared) -> Settlement {
        let variant: &Variant = &p.compiled.definition.variants[p.variant];
        let campaign = p.compiled.campaign.as_ref();
        let event_dispatch_id = if p.dispatch.per_user_ids {
            user_dispatch_id(&p.dispatch.id, p.user.braze_id.as_str())
        } else {
            p.dispatch.id.clone()
        };
        // A Canvas message step's dispatch carries the step's Canvas ids in its definition
        // (`crate::canvas::step_dispatch`).
        // and a `/messages/send` credited to a campaign carries that campaign's
        // (`crate::sends::credit_to_campaign`).
        let (canvas, credited) = match &p.dispatch.source {
            DispatchSource::AdHoc { definition } => (
                definition.get("canvas").and_then(Value::as_object),
                crate::sends::credited_campaign(definition),
            ),
            DispatchSource::Campaign { .. } | DispatchSource::Canvas { .. } => (None, None),
        };
        let origin = match (campaign, canvas, credited) {
            (Some(c), _, _) => Origin::Campaign {
                campaign_id: &c.id,
                campaign_name: Some(&c.name),
                message_variation_id: Some(&variant.id),
                message_variation_name: Some(&variant.name),
            },
            (None, Some(canvas), _) => crate::canvas::step_origin(canvas),
            (None, None, Some((campaign_id, campaign_name))) => Origin::Campaign {
                campaign_id,
                campaign_name: Some(campaign_name),
                message_variation_id: Some(&variant.id),
                message_variation_name: Some(&variant.name),
            },
            (None, None, None) => Origin::AdHoc,
        };
        let source = MessageSource {
            app_group_id: &p.workspace.app_group_id,
            app_id: None,
            origin,
            dispatch_id: Some(&event_dispatch_id),
            send_id: p.dispatch.send_id.as_deref(),
        };
        let event_user = EventUser {
            braze_id: &p.user.braze_id,
            external_id: p.user.external_id.as_ref(),
            device_id: None,
            time_zone: p.user.time_zone(),
        };
        if p.capped {
            // Nothing is rendered for a message that will not go out.
            let now = self.clock.now();
            return capped_abort(&p, &event_user, &source, &variant.message, now);
        }
        let mut vars = vars_for(
            &p.user,
            CampaignVars {
                campaign_id: campaign.map(|c| c.id.as_str()),
                campaign_name: campaign.map(|c| c.name.as_str()),
                dispatch_id: &event_dispatch_id,
                variant_id: &variant.id,
                variant_name: &variant.name,
            },
            p.dispatch.properties.as_deref(),
            p.claim.job.properties.as_deref(),
            matches!(
                p.compiled.definition.delivery,
                tideway_core::campaigns::Delivery::ActionBased(_)
            ),
            self.links(&p.compiled, p.claim.workspace, p.claim.id),
        );
        if canvas.is_some() {
            crate::canvas::canvas_vars(&mut vars, canvas, p.claim.job.properties.as_deref());
        }
        let path = format!("messages[{}]", p.variant);
        let now = self.clock.now();
        let ctx = Ctx {
            claim: &p.claim,
            source: &source,
            user: &event_user,
            record: &p.user,
            compiled: &p.compiled,
            vars: &vars,
            path: &path,
        };
        match &variant.message {
            Message::Webhook(w) => self.send_webhook(&ctx, w, now).await,
            Message::Email(e) => self.send_email(&ctx, e, now).await,
        }
    }

    async fn send_webhook(&self, ctx: &Ctx<'_>, w: &WebhookContent, now: Millis) -> Settlement {
        let c = ctx.claim;
        let abort = |abort_type: &str, log: Option<&str>| {
            metrics::counter!("tideway_messages_aborted_total", "channel" => "webhook", "abort_type" => abort_type.to_owned())
                .increment(1);
            fail(
                c,
                vec![CurrentsEvent::webhook_abort(
                    event_id(),
                    now,
                    ctx.user,
                    ctx.source,
                    abort_type,
                    log,
                )],
            )
        };
        let rendered = (|| -> Result<RenderedWebhook, RenderError> {
            let url = ctx
                .compiled
                .render(&format!("{}.url", ctx.path), ctx.vars)?;
            let body = ctx
                .compiled
                .render(&format!("{}.body", ctx.path), ctx.vars)?;
            let mut headers = Vec::new();
            for (name, _) in &w.headers {
                let value = ctx
                    .compiled
                    .render(&format!("{}.request_headers.{name}", ctx.path), ctx.vars)?;
                headers.push((name.clone(), value));
            }
            Ok((url, body, headers))
        })();
        let (url, body, headers) = match rendered {
            Ok(r) => r,
            Err(RenderError::Abort { log }) => return abort("liquid_abort_message", Some(&log)),
            Err(RenderError::Failed { message }) => {
                return abort("template_parse_error", Some(&message));
            }
        };
        let method = match w.method {
            tideway_core::campaigns::WebhookMethod::Post => Method::Post,
            tideway_core::campaigns::WebhookMethod::Put => Method::Put,
            tideway_core::campaigns::WebhookMethod::Delete => Method::Delete,
            tideway_core::campaigns::WebhookMethod::Get => Method::Get,
        };
        let request = WebhookRequest {
            url: url.trim().to_owned(),
            method,
            headers,
            body,
            idempotency_key: idempotency_key(c.workspace, c.id),
        };
        let attempt = self.channels.webhook.send(&request).await;
        let now = self.clock.now();
        let retry_count = c.attempts;
        let failure = |terminal: bool| {
            let (host, path) = split_url(&request.url);
            CurrentsEvent::webhook_failure(
                event_id(),
                now,
                ctx.user,
                ctx.source,
                &WebhookFailure {
                    http_status_code: attempt.status.map(i32::from),
                    endpoint_url: Some(redact_query(&request.url).to_owned()),
                    host: host.as_deref(),
                    url_path: path.as_deref(),
                    raw_response: attempt.raw_response.as_deref(),
                    content_length: attempt.content_length.map(|n| n as i64),
                    webhook_duration_ms: Some(attempt.duration_ms as i64),
                    retry_count: retry_count as i32,
                    is_terminal: terminal,
                    failure_source: "External Endpoint",
                },
            )
        };
        match &attempt.outcome {
            WebhookOutcome::Delivered => {
                metrics::counter!("tideway_messages_sent_total", "channel" => "webhook")
                    .increment(1);
                Settlement {
                    send: c.id,
                    workspace: c.workspace,
                    user: c.user,
                    state: SendState::Sent {
                        address: None,
                        links: None,
                    },
                    events: vec![CurrentsEvent::webhook_send(
                        event_id(),
                        now,
                        ctx.user,
                        ctx.source,
                        extras(ctx.compiled, ctx.path).as_deref(),
                    )],
                }
            }
            WebhookOutcome::Blocked { abort_type, reason } => abort(abort_type, Some(reason)),
            WebhookOutcome::Failed { .. } => {
                metrics::counter!("tideway_messages_failed_total", "channel" => "webhook")
                    .increment(1);
                fail(c, vec![failure(true)])
            }
            WebhookOutcome::Retry { reason } => {
                if c.attempts + 1 >= webhook::MAX_ATTEMPTS {
                    metrics::counter!("tideway_messages_failed_total", "channel" => "webhook")
                        .increment(1);
                    fail(c, vec![failure(true)])
                } else {
                    metrics::counter!("tideway_messages_retried_total", "channel" => "webhook")
                        .increment(1);
                    let delay = webhook::retry_delay(c.attempts + 1, jitter(c.id, c.attempts));
                    let retry = CurrentsEvent::webhook_retry(
                        event_id(),
                        now,
                        ctx.user,
                        ctx.source,
                        if attempt.status.is_some() {
                            "http_status"
                        } else {
                            "connection"
                        },
                        reason,
                    );
                    Settlement {
                        send: c.id,
                        workspace: c.workspace,
                        user: c.user,
                        state: SendState::RetryAt {
                            at: Millis(now.0 + delay.as_millis() as i64),
                        },
                        events: vec![failure(false), retry],
                    }
                }
            }
        }
    }

    async fn send_email(&self, ctx: &Ctx<'_>, e: &EmailContent, now: Millis) -> Settlement {
        let c = ctx.claim;
        let address = ctx.record.email.as_ref().map(|e| e.as_str().to_owned());
        let abort = |abort_type: &str, log: Option<&str>| {
            metrics::counter!("tideway_messages_aborted_total", "channel" => "email", "abort_type" => abort_type.to_owned())
                .increment(1);
            fail(
                c,
                vec![CurrentsEvent::email_abort(
                    event_id(),
                    now,
                    ctx.user,
                    ctx.source,
                    address.as_deref().unwrap_or(""),
                    abort_type,
                    log,
                )],
            )
        };
        let Some(to) = address.clone() else {
            return abort("missing_email", Some("the user has no email address"));
        };
        let subscription = ctx
            .record
            .profile
            .standard
            .get(&StandardField::EmailSubscribe)
            .and_then(Value::as_str);
        let wanted = ctx.compiled.definition.recipient_subscription_state;
        if !wanted.admits(subscription) {
            let reason = match wanted {
                SubscriptionState::OptedIn => "not_opted_in",
                _ => "unsubscribed",
            };
            metrics::counter!("tideway_messages_skipped_total", "reason" => reason).increment(1);
            return fail(c, Vec::new());
        }
        let Some(smtp) = &self.channels.smtp else {
            return abort(
                "smtp_not_configured",
                Some("no smtp-url is configured on this server"),
            );
        };
        let render = |field: &str| {
            ctx.compiled
                .render(&format!("{}.{field}", ctx.path), ctx.vars)
        };
        let rendered = (|| -> Result<_, RenderError> {
            let subject = render("subject")?;
            let mut html = render("body")?;
            let from = render("from")?;
            let reply_to = match &e.reply_to {
                Some(_) => Some(render("reply_to")?),
                None => None,
            };
            let text = match &e.plaintext_body {
                Some(_) => Some(render("plaintext_body")?),
                None => None,
            };
            if e.preheader.is_some() {
                let pre = render("preheader")?;
                html = format!(
                    "<div style=\"display:none;max-height:0;overflow:hidden\">{}</div>{html}",
                    escape_html(&pre)
                );
            }
            let mut headers = Vec::new();
            for (name, _) in &e.headers {
                headers.push((name.clone(), render(&format!("headers.{name}"))?));
            }
            Ok((subject, html, from, reply_to, text, headers))
        })();
        let (subject, mut html, from, reply_to, text, headers) = match rendered {
            Ok(r) => r,
            Err(RenderError::Abort { log }) => return abort("liquid_abort_message", Some(&log)),
            Err(RenderError::Failed { message }) => {
                return abort("template_parse_error", Some(&message));
            }
        };
        let mut links_json = None;
        let mut list_unsubscribe = None;
        if let Some(t) = &self.tracking {
            let flag =
                |f: StandardField| ctx.record.profile.standard.get(&f) == Some(&Value::Bool(true));
            if !flag(StandardField::EmailClickTrackingDisabled) {
                let (rewritten, originals) = rewrite_links(&html, |index, _| {
                    t.urls.click(&t.key, c.workspace.0, c.id, index)
                });
                html = rewritten;
                links_json = Some(Value::from(originals).to_string());
            }
            if !flag(StandardField::EmailOpenTrackingDisabled) {
                html = add_open_pixel(&html, &t.urls.open_pixel(&t.key, c.workspace.0, c.id));
            }
            list_unsubscribe = Some(t.urls.unsubscribe(&t.key, c.workspace.0, c.id));
        }
        let text = text.unwrap_or_else(|| email::html_to_text(&html));
        // Attachments are fetched for each email (a triggered send names at most 50 users, and
        // a broadcast may not have any): a file that cannot be had now is a soft bounce and a
        // retry, one that can never be had (refused, too big) an abort.
        let mut attachments = Vec::with_capacity(e.attachments.len());
        let mut unreachable = None;
        for file in &e.attachments {
            match self.attachment(&file.url).await {
                Ok(fetched) => attachments.push(AttachedFile {
                    file_name: file.file_name.clone(),
                    content_type: fetched.1.clone(),
                    bytes: fetched.0.clone(),
                }),
                Err(AttachmentError::Refused(why)) => {
                    // Braze's `abort_log` is at most 128 characters.
                    let log: String = format!("attachment '{}': {why}", file.file_name)
                        .chars()
                        .take(crate::liquid::MAX_ABORT_LOG_CHARS)
                        .collect();
                    return abort("attachment_unavailable", Some(&log));
                }
                Err(AttachmentError::Unreachable(why)) => {
                    unreachable = Some(format!("attachment '{}': {why}", file.file_name));
                    break;
                }
            }
        }
        let key = idempotency_key(c.workspace, c.id);
        let outgoing = OutgoingEmail {
            from,
            to: to.clone(),
            reply_to,
            subject,
            html: Some(html),
            text: Some(text),
            headers,
            message_id: format!("{key}@tideway"),
            list_unsubscribe,
            attachments,
        };
        let result = match unreachable {
            Some(reply) => EmailAttempt {
                outcome: EmailOutcome::Temporary,
                code: None,
                reply,
            },
            None => smtp.send(&outgoing).await,
        };
        let now = self.clock.now();
        let first = c.attempts == 0;
        let send_event = || {
            CurrentsEvent::email_send(
                event_id(),
                now,
                ctx.user,
                ctx.source,
                &to,
                extras(ctx.compiled, ctx.path).as_deref(),
            )
        };
        let reason = || match result.code {
            Some(code) => format!("{code} {}", result.reply).trim().to_owned(),
            None => result.reply.clone(),
        };
        match result.outcome {
            EmailOutcome::Accepted => {
                metrics::counter!("tideway_messages_sent_total", "channel" => "email").increment(1);
                let mut events = Vec::new();
                if first {
                    events.push(send_event());
                }
                let from_domain = outgoing
                    .from
                    .rsplit('@')
                    .next()
                    .map(|d| d.trim_end_matches('>').to_owned());
                events.push(CurrentsEvent::email_delivery(
                    event_id(),
                    now,
                    ctx.user,
                    ctx.source,
                    &to,
                    &tideway_core::message_events::EmailDeliveryInfo {
                        esp: Some("tideway"),
                        from_domain: from_domain.as_deref(),
                        sending_ip: None,
                    },
                ));
                Settlement {
                    send: c.id,
                    workspace: c.workspace,
                    user: c.user,
                    state: SendState::Sent {
                        address: Some(to.clone()),
                        links: links_json,
                    },
                    events,
                }
            }
            EmailOutcome::Permanent => {
                metrics::counter!("tideway_messages_failed_total", "channel" => "email")
                    .increment(1);
                let mut events = Vec::new();
                if first {
                    events.push(send_event());
                }
                events.push(CurrentsEvent::email_bounce(
                    event_id(),
                    now,
                    ctx.user,
                    ctx.source,
                    &to,
                    &reason(),
                    false,
                ));
                fail(c, events)
            }
            EmailOutcome::Temporary => {
                let mut events = Vec::new();
                if first {
                    events.push(send_event());
                    events.push(CurrentsEvent::email_soft_bounce(
                        event_id(),
                        now,
                        ctx.user,
                        ctx.source,
                        &to,
                        &reason(),
                    ));
                } else {
                    events.push(CurrentsEvent::email_deferral(
                        event_id(),
                        now,
                        ctx.user,
                        ctx.source,
                        &to,
                        (c.attempts + 1) as i32,
                        &reason(),
                        to.rsplit('@').next(),
                    ));
                }
                if c.attempts + 1 >= EMAIL_MAX_ATTEMPTS {
                    metrics::counter!("tideway_messages_failed_total", "channel" => "email")
                        .increment(1);
                    fail(c, events)
                } else {
                    metrics::counter!("tideway_messages_retried_total", "channel" => "email")
                        .increment(1);
                    let delay = email::email_retry_delay(c.attempts + 1, jitter(c.id, c.attempts));
                    Settlement {
                        send: c.id,
                        workspace: c.workspace,
                        user: c.user,
                        state: SendState::RetryAt {
                            at: Millis(now.0 + delay.as_millis() as i64),
                        },
                        events,
                    }
                }
            }
            EmailOutcome::Invalid { abort_type } => abort(abort_type, Some(&reason())),
        }
    }
}

/// What one send's rendering and events share.
struct Ctx<'a> {
    claim: &'a ClaimedSend,
    source: &'a MessageSource<'a>,
    user: &'a EventUser<'a>,
    record: &'a UserRecord,
    compiled: &'a Compiled,
    vars: &'a Vars,
    path: &'a str,
}

/// A message held back by a frequency cap: failed, with the channel's `Abort` event
/// (`abort_type: frequency_capped`, braze-messaging.md §8), so the cap is visible downstream.
fn capped_abort(
    p: &Prepared,
    user: &EventUser<'_>,
    source: &MessageSource<'_>,
    message: &Message,
    now: Millis,
) -> Settlement {
    const TYPE: &str = "frequency_capped";
    const LOG: Option<&str> = Some("the user is at a frequency cap");
    let event = match message {
        Message::Webhook(_) => {
            CurrentsEvent::webhook_abort(event_id(), now, user, source, TYPE, LOG)
        }
        Message::Email(_) => CurrentsEvent::email_abort(
            event_id(),
            now,
            user,
            source,
            p.user.email.as_ref().map_or("", |e| e.as_str()),
            TYPE,
            LOG,
        ),
    };
    fail(&p.claim, vec![event])
}

fn fail(c: &ClaimedSend, events: Vec<CurrentsEvent>) -> Settlement {
    Settlement {
        send: c.id,
        workspace: c.workspace,
        user: c.user,
        state: SendState::Failed,
        events,
    }
}

fn extras(compiled: &Compiled, path: &str) -> Option<String> {
    let index: usize = path
        .trim_start_matches("messages[")
        .trim_end_matches(']')
        .parse()
        .ok()?;
    match &compiled.definition.variants.get(index)?.message {
        Message::Email(e) => e.extras.clone(),
        Message::Webhook(w) => w.extras.clone(),
    }
}

fn split_url(url: &str) -> (Option<String>, Option<String>) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let path = path.split('?').next().unwrap_or("/");
    (
        Some(host.to_owned()),
        Some(if path.is_empty() { "/" } else { path }.to_owned()),
    )
}

fn redact_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_links_name_every_link_and_sign_nothing() {
        let links = preview_links();
        assert_eq!(links.len(), LINK_NAMES.len());
        for name in LINK_NAMES {
            assert_eq!(links[name], json!(format!("#preview-{name}")));
        }
    }

    #[test]
    fn jitter_is_in_range_and_reproducible() {
        for send in 0..200 {
            let j = jitter(send, 1);
            assert!((0.0..1.0).contains(&j));
            assert_eq!(j, jitter(send, 1));
        }
    }

    #[test]
    fn urls_split_into_host_and_path() {
        assert_eq!(
            split_url("https://h.example:8443/a/b?x=1"),
            (Some("h.example:8443".into()), Some("/a/b".into()))
        );
        assert_eq!(split_url("http://h"), (Some("h".into()), Some("/".into())));
        assert_eq!(redact_query("https://h/p?token=s"), "https://h/p");
    }

    #[test]
    fn buckets_refill_at_their_rate() {
        let mut b = Bucket {
            per_minute: 60,
            tokens: 1.0,
            at: Millis(0),
        };
        assert!(b.take(Millis(0)));
        assert!(!b.take(Millis(500)));
        assert!(b.take(Millis(1_000)));
    }
}
