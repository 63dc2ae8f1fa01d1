//! The Canvas engine: entries, journeys' timers and their steps, exits and conversions.
//!
//! Two loops over the store ([`CanvasStore`]), started with the rest of the messaging engine:
//!
//! - **the scan** follows each workspace's event log and cohort-change log from the Canvas
//!   cursor (the same log reading as the trigger engine, with a cursor of its own so that
//!   campaigns and Canvases never hold each other up). Partner cohort entries, custom events
//!   and purchases that match an active action-based Canvas's entry triggers become entries
//!   (the entry audience is checked then); custom events and purchases that a Canvas listens
//!   to (exception events, Action Paths, conversions) go to the inbox of the user's journey,
//!   which wakes it; those of users who left the journey with conversion windows open count
//!   against their conversion watch. Entries, inbox items and the cursor's move are one transaction (a
//!   compare-and-set on the cursor), so each stretch of log is acted on once. A scheduled
//!   Canvas's due occurrence (its `next_run`, set at launch) becomes a Canvas entry dispatch
//!   in the same kind of transaction, moving `next_run` on by compare-and-set (one occurrence
//!   per scan).
//! - **segment entries** ([`CanvasEngine::segment_pass`]): a tracker per (Canvas, segment)
//!   along the segment change feed, as campaigns' segment-entry triggers.
//! - **entry dispatches** ([`CanvasEngine::expand_pass`], after each scan): an occurrence's,
//!   a broadcast's or a scheduled API entry's users enter when it is due — named recipients
//!   at once, an audience in chunks of [`CanvasConfig::entry_chunk`], each chunk one
//!   transaction with the dispatch's expansion mark.
//! - **the timer worker** claims due journeys (leased, oldest first: late timers after a
//!   restart fire at once, in order), loads the version each journey entered with, answers
//!   the definition's filters for the batch (one audience question per filter), runs
//!   [`tideway_core::canvas::advance`], and settles each journey with its Currents events,
//!   its Message steps' sends (into the send queue, under a dispatch per step and version)
//!   and its per-step counts, in one transaction fenced by the lease.
//!
//! API-triggered entries of named recipients (`/canvas/trigger/send`) go through
//! [`CanvasEngine::enter`]. A User Update step's attributes travel with the journey's
//! settlement ([`JourneySettlement::user_update`]) and are applied through the users
//! context in its transaction.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tideway_core::campaigns::{CampaignStatus, Delivery, LOCAL_TIME_LEAD_MS, Occurrence, Trigger};
use tideway_core::canvas::{
    self, CanvasDefinition, ExitReason, Facts, Happening, HappeningKind, StepEvent, StepKind,
};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventType, EventUser};
use tideway_core::ids::{EventId, UserSeq, WorkspaceId};
use tideway_core::message_events::{MessageSource, Origin, Progression};
use tideway_core::profile::UserRecord;
use tideway_core::segments::FeedPosition;
use tideway_core::store::{
    CanvasRecord, CanvasScan, CanvasSend, CanvasStat, CanvasStore, ClaimedJourney, DispatchRecord,
    DispatchSource, InboxItem, JourneySettlement, NewEntry, ScanOutcome, SendJob, StoreError,
    TriggerCursor, UserStore, UserUpdate, Workspace,
};
use tideway_core::store::{ConversionWatch, LateConversion};
use tideway_core::track::parse_track;
use tideway_currents::Clock;
use tideway_segment::Filter;
use tracing::{debug, warn};

use crate::audience::{Audiences, audience_filter, narrowed};
use crate::dispatcher::Dispatcher;
use crate::liquid::Vars;
use crate::triggers::{READ_LIMIT, TriggerStore, segment_step};

/// A batch of journeys claimed for this node at `now`.
struct Claimed {
    now: Millis,
    journeys: Vec<ClaimedJourney>,
}

/// A claimed batch advanced: its settlements, to commit; whether any queued a send.
struct Computed {
    now: Millis,
    settlements: Vec<JourneySettlement>,
    sent: bool,
}

/// The store the Canvas engine needs.
pub trait CanvasEngineStore: TriggerStore + CanvasStore + UserStore {}
impl<T: TriggerStore + CanvasStore + UserStore + ?Sized> CanvasEngineStore for T {}

/// How the Canvas engine runs.
#[derive(Debug, Clone)]
pub struct CanvasConfig {
    /// The lease owner (the dispatcher's: unique per node, stable across restarts).
    pub owner: String,
    pub lease_ms: u64,
    /// Most journeys claimed at once.
    pub claim_batch: usize,
    /// How often the scan reads the logs, and the longest the timer worker sleeps.
    pub poll: Duration,
    /// Users entered per transaction when a Canvas entry dispatch enters an audience.
    pub entry_chunk: usize,
}

impl Default for CanvasConfig {
    fn default() -> Self {
        CanvasConfig {
            owner: format!("node-{}", uuid::Uuid::new_v4().simple()),
            lease_ms: 60_000,
            claim_batch: 1_000,
            poll: Duration::from_millis(100),
            entry_chunk: crate::scheduler::CHUNK,
        }
    }
}

/// The dispatch id of a Message step of one Canvas version: 32 hex, stable, so every send of
/// the step shares it (and the step's message stats are its sends).
pub fn step_dispatch_id(canvas_id: &str, version: u32, step_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(canvas_id.as_bytes())
        .chain_update([0])
        .chain_update(version.to_be_bytes())
        .chain_update(step_id.as_bytes())
        .finalize();
    hex::encode(&digest[..16])
}

/// The Canvas fields of a Message step's events, from the `canvas` object its ad-hoc dispatch
/// definition carries ([`step_dispatch_id`]'s dispatch): the dispatcher's Send and Delivery and
/// the tracking endpoints' Open, Click and Unsubscribe say the same.
pub fn step_origin(canvas: &Map<String, Value>) -> Origin<'_> {
    let field = |k: &str| canvas.get(k).and_then(Value::as_str);
    Origin::Canvas {
        canvas_id: field("id").unwrap_or_default(),
        canvas_name: field("name"),
        canvas_variation_id: field("variation_id"),
        canvas_variation_name: field("variation_name"),
        canvas_step_id: field("step_id"),
        canvas_step_name: field("step_name"),
        canvas_step_message_variation_id: None,
    }
}

/// Adds a Canvas message's variables: `canvas_entry_properties` / `context`,
/// `event_properties` (after Action Paths) and `canvas.*`, from the job's properties
/// (`{"canvas_entry_properties": {…}, "event_properties": {…}}`) and the dispatch's `canvas`.
pub fn canvas_vars(vars: &mut Vars, canvas: Option<&Map<String, Value>>, job: Option<&str>) {
    let props: Map<String, Value> = job
        .and_then(|t| serde_json::from_str::<Value>(t).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let object = |k: &str| {
        props
            .get(k)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    vars.canvas_entry_properties = object("canvas_entry_properties");
    vars.event_properties = object("event_properties");
    vars.api_trigger_properties = Map::new();
    if let Some(c) = canvas {
        let mut m = Map::new();
        for (from, to) in [
            ("id", "api_id"),
            ("name", "name"),
            ("variation_name", "variant_name"),
            ("variation_id", "variant_api_id"),
        ] {
            if let Some(v) = c.get(from) {
                m.insert(to.into(), v.clone());
            }
        }
        vars.canvas = m;
        if let Some(step) = c.get("step_name") {
            vars.campaign.insert("name".into(), step.clone());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn event_id() -> EventId {
    EventId(uuid::Uuid::new_v4().to_string())
}

/// A loaded version: the parsed definition and its canonical JSON (for the steps' messages).
struct Version {
    def: CanvasDefinition,
    json: Value,
}

/// One recipient of an entry: the user, their entry properties (JSON object text) and, for a
/// local-time occurrence, when their first step runs (else at once).
#[derive(Debug, Clone)]
pub struct Entrant {
    pub user: UserSeq,
    pub properties: Option<String>,
    pub due_at: Option<Millis>,
}

/// `shared` properties with `own` merged over them, as JSON object text (`None` when both are
/// absent).
fn merged_properties(shared: Option<&str>, own: Option<&str>) -> Option<String> {
    let object = |t: Option<&str>| {
        t.and_then(|t| serde_json::from_str::<Value>(t).ok())
            .and_then(|v| v.as_object().cloned())
    };
    match (object(shared), object(own)) {
        (None, None) => None,
        (a, b) => {
            let mut m = a.unwrap_or_default();
            m.extend(b.unwrap_or_default());
            Some(Value::Object(m).to_string())
        }
    }
}

pub struct CanvasEngine<S: ?Sized> {
    store: Arc<S>,
    audiences: Arc<dyn Audiences>,
    dispatcher: Arc<Dispatcher<S>>,
    clock: Clock,
    config: CanvasConfig,
    versions: Mutex<HashMap<(WorkspaceId, String, u32), Arc<Version>>>,
    workspaces: Mutex<HashMap<WorkspaceId, Workspace>>,
    wake: tokio::sync::Notify,
}

/// The filter answers and experiment buckets of one journey.
struct Answers<'a> {
    yes: &'a HashSet<usize>,
    canvas_id: &'a str,
    user_key: String,
}

impl Facts for Answers<'_> {
    fn matches(&self, filter: usize) -> bool {
        self.yes.contains(&filter)
    }
    fn bucket(&self, step_id: &str) -> u32 {
        canvas::experiment_bucket(self.canvas_id, step_id, &self.user_key)
    }
}

impl<S: CanvasEngineStore + ?Sized + 'static> CanvasEngine<S> {
    pub fn new(
        store: Arc<S>,
        audiences: Arc<dyn Audiences>,
        dispatcher: Arc<Dispatcher<S>>,
        clock: Clock,
        config: CanvasConfig,
    ) -> Arc<Self> {
        Arc::new(CanvasEngine {
            store,
            audiences,
            dispatcher,
            clock,
            config,
            versions: Mutex::new(HashMap::new()),
            workspaces: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Wakes the timer worker (journeys were entered for now).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The timer worker's loop; it first takes back this node's old leases.
    ///
    /// Pipelined: while the store settles one batch, the engine computes the next, claimed
    /// just before (the writer runs claim N+1, then settle N; the engine computes N+1 beside
    /// that settle). A batch's journeys stay leased until their settlement commits, so the
    /// next claim never takes them, and settlements still commit one batch after another.
    /// What the next batch reads of its users (attributes, segments) may therefore be from
    /// before this batch's User Update steps commit: as if both had been one batch, which
    /// reads every user once, before any of its own settlements.
    pub async fn run_timers(self: Arc<Self>) {
        if let Err(e) = self.store.release_journey_leases(&self.config.owner).await {
            warn!(error = %e, "releasing old journey leases failed");
        }
        let mut settling: Option<Computed> = None;
        let mut failures = 0;
        loop {
            let claimed = match self.claim_due().await {
                Ok(claimed) => {
                    failures = 0;
                    Some(claimed)
                }
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, failures, "Canvas timer claim failed");
                    None
                }
            };
            let busy = claimed
                .as_ref()
                .is_some_and(|c| c.journeys.len() == self.config.claim_batch);
            let (settled, computed) = tokio::join!(
                async {
                    match settling.take() {
                        Some(batch) => self.settle(batch).await,
                        None => Ok(()),
                    }
                },
                async {
                    match claimed {
                        Some(c) if !c.journeys.is_empty() => self.compute(c).await.map(Some),
                        _ => Ok(None),
                    }
                }
            );
            if let Err(e) = settled {
                warn!(error = %e, "Canvas timer settlement failed");
            }
            match computed {
                Ok(next) => settling = next,
                // The batch's journeys stay leased; they are claimed again when it runs out.
                Err(e) => warn!(error = %e, "Canvas timer pass failed"),
            }
            if busy || settling.is_some() {
                continue;
            }
            let wait = if failures > 0 {
                crate::engine::retry_wait(self.config.poll, failures)
            } else {
                match self.store.next_journey_due().await {
                    Ok(Some(at)) => {
                        let ms = (at.0 - self.clock.now().0).max(0);
                        Duration::from_millis(u64::try_from(ms).unwrap_or(0)).min(self.config.poll)
                    }
                    _ => self.config.poll,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// The scan's loop: the logs and scheduled occurrences, then due Canvas entry dispatches.
    pub async fn run_scan(self: Arc<Self>) {
        let mut failures = 0;
        loop {
            let mut failed = false;
            let full = match self.scan_pass().await {
                Ok(full) => full,
                Err(e) => {
                    warn!(error = %e, failures, "Canvas scan failed");
                    failed = true;
                    false
                }
            };
            if let Err(e) = self.expand_pass().await {
                warn!(error = %e, failures, "Canvas entry dispatches failed");
                failed = true;
            }
            if let Err(e) = self.segment_pass().await {
                warn!(error = %e, failures, "Canvas segment entries failed");
                failed = true;
            }
            failures = if failed { failures + 1 } else { 0 };
            if !full {
                tokio::time::sleep(crate::engine::retry_wait(self.config.poll, failures)).await;
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

    async fn version(
        &self,
        ws: WorkspaceId,
        canvas_id: &str,
        version: u32,
    ) -> Result<Option<Arc<Version>>, StoreError> {
        let key = (ws, canvas_id.to_owned(), version);
        if let Some(v) = lock(&self.versions).get(&key) {
            return Ok(Some(Arc::clone(v)));
        }
        let Some(json) = self.store.canvas_version(ws, canvas_id, version).await? else {
            return Ok(None);
        };
        let def = CanvasDefinition::load(&json)
            .map_err(|e| StoreError::Corrupt(format!("canvas {canvas_id} v{version}: {e}")))?;
        let v = Arc::new(Version { def, json });
        lock(&self.versions).insert(key, Arc::clone(&v));
        Ok(Some(v))
    }

    /// Entries of `entrants` into `canvas` now (the entry audience, narrowed by `audience` if
    /// given, checked; variants assigned); the store decides re-entry and limits.
    pub async fn enter(
        &self,
        ws: WorkspaceId,
        canvas: &CanvasRecord,
        entrants: Vec<Entrant>,
        audience: Option<&Value>,
    ) -> Result<ScanOutcome, StoreError> {
        let mut scan = CanvasScan::default();
        self.plan_entries(ws, canvas, entrants, audience, &mut scan)
            .await?;
        let now = self.clock.now();
        let out = self.store.enter_canvas(ws, now, scan).await?;
        if out.entered > 0 {
            self.wake();
        }
        Ok(out)
    }

    /// Plans entries of those `entrants` who are in the Canvas's entry audience (narrowed by
    /// `audience` if given).
    async fn plan_entries(
        &self,
        ws: WorkspaceId,
        canvas: &CanvasRecord,
        mut entrants: Vec<Entrant>,
        audience: Option<&Value>,
        scan: &mut CanvasScan,
    ) -> Result<(), StoreError> {
        if entrants.is_empty() || canvas.status != CampaignStatus::Active {
            return Ok(());
        }
        let Some(version) = self.version(ws, &canvas.id, canvas.version).await? else {
            return Ok(());
        };
        let def = &version.def;
        if !def.audience.is_everyone() || audience.is_some() {
            let mut users: Vec<UserSeq> = entrants.iter().map(|e| e.user).collect();
            users.sort_unstable();
            users.dedup();
            let filter = narrowed(audience_filter(&def.audience)?, audience)?;
            let inside: HashSet<UserSeq> = self
                .audiences
                .matching(ws, filter, users)
                .await?
                .into_iter()
                .collect();
            entrants.retain(|e| inside.contains(&e.user));
        }
        self.plan_members(ws, canvas, &version, entrants, scan)
            .await
    }

    /// Plans entries of `entrants`, known to be in the entry audience.
    async fn plan_members(
        &self,
        ws: WorkspaceId,
        canvas: &CanvasRecord,
        version: &Version,
        entrants: Vec<Entrant>,
        scan: &mut CanvasScan,
    ) -> Result<(), StoreError> {
        let def = &version.def;
        let Some(workspace) = self.workspace(ws).await? else {
            return Ok(());
        };
        let mut users: Vec<UserSeq> = entrants.iter().map(|e| e.user).collect();
        users.sort_unstable();
        users.dedup();
        let records: HashMap<UserSeq, UserRecord> = self
            .store
            .users_by_seq(ws, users)
            .await?
            .into_iter()
            .map(|u| (u.seq, u))
            .collect();
        let now = self.clock.now();
        for e in entrants {
            let Some(record) = records.get(&e.user) else {
                continue;
            };
            let variant = def.assign(&canvas.id, &crate::plan::assignment_key(e.user));
            let user = event_user(record);
            let entry_id = uuid::Uuid::new_v4().simple().to_string();
            let (variant_id, variant_name, first) = match variant {
                Some(v) => (v.id.as_str(), v.name.as_str(), Some(v.first_step.as_str())),
                None => (canvas::CONTROL_VARIANT_ID, "Control", None),
            };
            let first_name = first.and_then(|f| def.step(f)).map(|s| s.name.as_str());
            let source = MessageSource {
                app_group_id: &workspace.app_group_id,
                app_id: None,
                origin: Origin::Canvas {
                    canvas_id: &canvas.id,
                    canvas_name: Some(&canvas.name),
                    canvas_variation_id: Some(variant_id),
                    canvas_variation_name: Some(variant_name),
                    canvas_step_id: first,
                    canvas_step_name: first_name,
                    canvas_step_message_variation_id: None,
                },
                dispatch_id: None,
                send_id: None,
            };
            let mut events = vec![CurrentsEvent::canvas_entry(
                event_id(),
                now,
                &user,
                &source,
                variant.is_none(),
            )];
            let mut stats = Vec::new();
            let journey = variant.map(|v| {
                events.push(CurrentsEvent::canvas_progression(
                    event_id(),
                    now,
                    &user,
                    &source,
                    &Progression {
                        canvas_entry_id: &entry_id,
                        progression_type: "advance",
                        next_step_id: Some(&v.first_step),
                        exit_reason: None,
                        is_canvas_entry: true,
                    },
                ));
                stats.push((v.first_step.clone(), CanvasStat::Entered));
                let mut j = canvas::start(
                    v,
                    entry_id.clone(),
                    canvas.version,
                    now,
                    e.properties.clone(),
                );
                // A local-time occurrence: the first step waits for the user's wall-clock time.
                if let Some(due) = e.due_at {
                    j.due_at = Millis(due.0.max(now.0));
                }
                j
            });
            scan.entries.push(NewEntry {
                canvas_id: canvas.id.clone(),
                user: e.user,
                journey,
                reentry_after_ms: def.reentry_after_secs.map(|s| s * 1_000),
                entry_limit: def.entry_limit,
                events,
                stats,
            });
        }
        Ok(())
    }

    /// Enters the users of every due Canvas entry dispatch (scheduled API entries,
    /// broadcasts, scheduled occurrences), resuming an expansion a crash interrupted.
    pub async fn expand_pass(&self) -> Result<(), StoreError> {
        for dispatch in self.store.expanding_dispatches(self.clock.now()).await? {
            if !matches!(dispatch.source, DispatchSource::Canvas { .. }) {
                continue;
            }
            let id = dispatch.id.clone();
            if let Err(e) = self.expand(dispatch).await {
                // One dispatch's trouble does not hold up the others; retried next pass.
                warn!(dispatch = %id, error = %e, "a Canvas entry dispatch failed; will retry");
            }
        }
        Ok(())
    }

    /// One Canvas entry dispatch from where it stopped: named recipients in one transaction,
    /// an audience in chunks of [`CanvasConfig::entry_chunk`] users in seq order, each chunk's
    /// entries with the move of the expansion mark (so a chunk enters once, and a crash
    /// resumes after the last chunk entered). A Canvas no longer active, or deleted, ends
    /// the dispatch with no entries.
    async fn expand(&self, dispatch: DispatchRecord) -> Result<(), StoreError> {
        let ws = dispatch.workspace;
        let DispatchSource::Canvas {
            canvas_id,
            recipients,
        } = &dispatch.source
        else {
            return Ok(());
        };
        let marked = |mark: Option<UserSeq>| CanvasScan {
            expansion: Some((dispatch.id.clone(), mark)),
            ..CanvasScan::default()
        };
        let canvas = self
            .store
            .canvas(ws, canvas_id)
            .await?
            .filter(|c| c.status == CampaignStatus::Active);
        let version = match &canvas {
            Some(c) => self.version(ws, &c.id, c.version).await?,
            None => None,
        };
        let (Some(canvas), Some(version)) = (canvas, version) else {
            return self.apply_chunk(ws, marked(None)).await.map(|_| ());
        };
        let shared = dispatch.properties.as_deref();
        if let Some(list) = recipients {
            let entrants = list
                .iter()
                .map(|r| Entrant {
                    user: r.user,
                    properties: merged_properties(shared, r.properties.as_deref()),
                    due_at: None,
                })
                .collect();
            let mut scan = marked(None);
            self.plan_entries(ws, &canvas, entrants, dispatch.audience.as_ref(), &mut scan)
                .await?;
            return self.apply_chunk(ws, scan).await.map(|_| ());
        }
        let filter = narrowed(
            audience_filter(&version.def.audience)?,
            dispatch.audience.as_ref(),
        )?;
        let members = self
            .audiences
            .members(ws, filter, dispatch.expanding_after)
            .await?;
        let local = match (&version.def.entry, dispatch.not_before) {
            (Delivery::Scheduled(s), Some(expanded)) if s.in_local_time => {
                Some(Millis(expanded.0 + LOCAL_TIME_LEAD_MS))
            }
            _ => None,
        };
        let properties = merged_properties(shared, None);
        let mut chunks = members.chunks(self.config.entry_chunk.max(1)).peekable();
        if chunks.peek().is_none() {
            return self.apply_chunk(ws, marked(None)).await.map(|_| ());
        }
        while let Some(chunk) = chunks.next() {
            let mark = if chunks.peek().is_none() {
                None
            } else {
                chunk.last().copied()
            };
            let dues = crate::local_time::local_dues(
                self.store.as_ref(),
                ws,
                chunk,
                local,
                self.clock.now(),
            )
            .await?;
            let entrants = chunk
                .iter()
                .map(|u| Entrant {
                    user: *u,
                    properties: properties.clone(),
                    due_at: dues.get(u).copied(),
                })
                .collect();
            let mut scan = marked(mark);
            self.plan_members(ws, &canvas, &version, entrants, &mut scan)
                .await?;
            if !self.apply_chunk(ws, scan).await? {
                // Another node entered this chunk first, or the dispatch was cancelled.
                return Ok(());
            }
        }
        Ok(())
    }

    /// Segment-entry triggers of active action-based Canvases: each (Canvas, segment) tracker
    /// followed along the segment change feed as campaigns' are
    /// ([`crate::triggers::segment_step`]); the users who entered the segment (within the
    /// entry window) enter the Canvas in the transaction that moves the tracker, so each
    /// segment entry is acted on once across restarts and nodes.
    pub async fn segment_pass(&self) -> Result<(), StoreError> {
        let mut heads: HashMap<WorkspaceId, Option<FeedPosition>> = HashMap::new();
        for (ws, canvas) in self.store.active_canvases().await? {
            let Some(version) = self.version(ws, &canvas.id, canvas.version).await? else {
                continue;
            };
            let Delivery::ActionBased(action) = &version.def.entry else {
                continue;
            };
            for trigger in &action.triggers {
                let Trigger::SegmentEntry { segment_id } = trigger else {
                    continue;
                };
                if self.store.segment(ws, segment_id).await?.is_none() {
                    continue;
                }
                let head = heads.entry(ws).or_default();
                let Some(step) = segment_step(
                    self.store.as_ref(),
                    self.audiences.as_ref(),
                    ws,
                    &canvas.id,
                    segment_id,
                    head,
                )
                .await?
                else {
                    continue;
                };
                let now = self.clock.now();
                let launched = canvas.launched_at.unwrap_or(canvas.updated_at);
                let in_window = now.0 >= launched.0
                    && action.start.is_none_or(|s| now.0 >= s.0)
                    && action.end.is_none_or(|e| now.0 <= e.0);
                let mut scan = CanvasScan {
                    segment_trackers: step.moves,
                    ..CanvasScan::default()
                };
                if in_window {
                    let entrants = step
                        .entered
                        .into_iter()
                        .map(|user| Entrant {
                            user,
                            properties: None,
                            due_at: None,
                        })
                        .collect();
                    self.plan_entries(ws, &canvas, entrants, None, &mut scan)
                        .await?;
                }
                // A conflict: another node moved the tracker first (its entries are its).
                self.apply_chunk(ws, scan).await?;
            }
        }
        Ok(())
    }

    /// Conversions of users who left their journey in `canvas`, within the windows of their
    /// entry (their conversion watches): each conversion event once per entry, by the
    /// definition of the version they entered with.
    async fn late_conversions(
        &self,
        ws: WorkspaceId,
        canvas: &CanvasRecord,
        happened: &[(UserSeq, Happening)],
        scan: &mut CanvasScan,
    ) -> Result<(), StoreError> {
        let mut users: Vec<UserSeq> = happened.iter().map(|(u, _)| *u).collect();
        users.sort_unstable();
        users.dedup();
        if users.is_empty() {
            return Ok(());
        }
        let watches = self
            .store
            .conversion_watches(ws, &canvas.id, users, self.clock.now())
            .await?;
        if watches.is_empty() {
            return Ok(());
        }
        let Some(workspace) = self.workspace(ws).await? else {
            return Ok(());
        };
        let records: HashMap<UserSeq, UserRecord> = self
            .store
            .users_by_seq(ws, watches.iter().map(|(u, _)| *u).collect())
            .await?
            .into_iter()
            .map(|u| (u.seq, u))
            .collect();
        for (user, watch) in watches {
            let (Some(v), Some(record)) = (
                self.version(ws, &canvas.id, watch.version).await?,
                records.get(&user),
            ) else {
                continue;
            };
            let def = &v.def;
            let step_name = def.step(&watch.step_id).map(|s| s.name.as_str());
            let source = MessageSource {
                app_group_id: &workspace.app_group_id,
                app_id: None,
                origin: Origin::Canvas {
                    canvas_id: &canvas.id,
                    canvas_name: Some(&canvas.name),
                    canvas_variation_id: Some(&watch.variant_id),
                    canvas_variation_name: def.variant(&watch.variant_id).map(|v| v.name.as_str()),
                    canvas_step_id: Some(&watch.step_id),
                    canvas_step_name: step_name,
                    canvas_step_message_variation_id: None,
                },
                dispatch_id: None,
                send_id: None,
            };
            let mut converted = watch.converted;
            for (_, h) in happened.iter().filter(|(u, _)| *u == user) {
                for index in canvas::conversions(def, watch.entered_at, converted, h) {
                    converted |= 1 << index;
                    let behavior = def.conversion_events[usize::from(index)]
                        .behavior_json()
                        .to_string();
                    scan.conversions.push(LateConversion {
                        canvas_id: canvas.id.clone(),
                        user,
                        entry_id: watch.entry_id.clone(),
                        index,
                        events: vec![CurrentsEvent::canvas_conversion(
                            event_id(),
                            h.at,
                            &event_user(record),
                            &source,
                            i32::from(index),
                            &behavior,
                        )],
                        stats: vec![(watch.step_id.clone(), CanvasStat::Conversions)],
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes one chunk of a Canvas entry dispatch; `false` when its mark did not apply.
    async fn apply_chunk(&self, ws: WorkspaceId, scan: CanvasScan) -> Result<bool, StoreError> {
        match self.store.enter_canvas(ws, self.clock.now(), scan).await {
            Ok(out) => {
                if out.entered > 0 {
                    self.wake();
                }
                Ok(true)
            }
            Err(StoreError::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One scan of every workspace with an active Canvas; whether a read was full.
    pub async fn scan_pass(&self) -> Result<bool, StoreError> {
        let canvases = self.store.active_canvases().await?;
        let mut by_ws: HashMap<WorkspaceId, Vec<CanvasRecord>> = HashMap::new();
        for (ws, c) in canvases {
            by_ws.entry(ws).or_default().push(c);
        }
        let mut full = false;
        for (ws, list) in by_ws {
            match self.scan_workspace(ws, &list).await {
                Ok(f) => full |= f,
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(full)
    }

    async fn scan_workspace(
        &self,
        ws: WorkspaceId,
        canvases: &[CanvasRecord],
    ) -> Result<bool, StoreError> {
        let cursor = self.store.canvas_cursor(ws).await?;
        if !cursor.is_started() {
            // Start at the logs' heads: history before the first Canvas enters no one.
            let heads = TriggerCursor::at_heads(
                self.store.event_log_head(ws).await?,
                self.store.cohort_changes_head(ws).await?,
            );
            let scan = CanvasScan {
                cursor: Some((cursor, heads)),
                ..CanvasScan::default()
            };
            self.store.enter_canvas(ws, self.clock.now(), scan).await?;
            return Ok(true);
        }
        let events = self
            .store
            .read_events(ws, cursor.events, READ_LIMIT)
            .await?;
        let entries = self
            .store
            .cohort_entries(ws, cursor.cohort_changes, READ_LIMIT)
            .await?;
        // A local-time occurrence is due `LOCAL_TIME_LEAD_MS` early.
        let scheduled_due = canvases.iter().any(|c| {
            c.next_run
                .is_some_and(|t| t.0 - LOCAL_TIME_LEAD_MS <= self.clock.now().0)
        });
        if events.is_empty() && entries.is_empty() && !scheduled_due {
            return Ok(false);
        }
        let full = events.len() == READ_LIMIT || entries.len() == READ_LIMIT;
        let next = TriggerCursor {
            events: events.last().map_or(cursor.events, |e| e.seq),
            cohort_changes: entries.last().map_or(cursor.cohort_changes, |e| e.position),
        };
        let mut happened: Vec<(UserSeq, Happening)> = Vec::new();
        for logged in &events {
            let Some(user) = logged.user else { continue };
            let (kind, props) = match logged.event.event_type {
                EventType::CustomEvent | EventType::Purchase => {
                    let body = logged.event.body_value();
                    let p = &body["properties"];
                    if logged.event.event_type == EventType::CustomEvent {
                        (
                            HappeningKind::CustomEvent {
                                name: p["name"].as_str().unwrap_or_default().to_owned(),
                            },
                            p["custom_properties"]
                                .as_object()
                                .cloned()
                                .unwrap_or_default(),
                        )
                    } else {
                        (
                            HappeningKind::Purchase {
                                product_id: p["product_id"].as_str().unwrap_or_default().to_owned(),
                            },
                            p["purchase_properties"]
                                .as_object()
                                .cloned()
                                .unwrap_or_default(),
                        )
                    }
                }
                _ => continue,
            };
            happened.push((
                user,
                Happening {
                    at: Millis::from_secs(logged.event.time),
                    kind,
                    properties: props,
                },
            ));
        }
        let mut scan = CanvasScan {
            cursor: Some((cursor, next)),
            ..CanvasScan::default()
        };
        for canvas in canvases {
            let Some(version) = self.version(ws, &canvas.id, canvas.version).await? else {
                continue;
            };
            self.late_conversions(ws, canvas, &happened, &mut scan)
                .await?;
            let def = &version.def;
            // Inbox: everything this Canvas listens to (the store keeps it only for users
            // with a journey in the Canvas). Older versions' listeners are included through
            // the current one only: a journey on an old version whose Action Paths the new
            // version dropped still ends at its window.
            for (user, h) in &happened {
                if def.listens_to(&h.occurrence()) {
                    scan.inbox.push(InboxItem {
                        canvas_id: canvas.id.clone(),
                        user: *user,
                        happening: h.clone(),
                    });
                }
            }
            if let Delivery::Scheduled(schedule) = &def.entry {
                if let Some(due) = canvas.next_run
                    && schedule.expands_at(due).0 <= self.clock.now().0
                    && scan.next_run.is_none()
                {
                    // The occurrence: a Canvas entry dispatch of the whole entry audience
                    // (entered in chunks by `expand_pass`), created with the next occurrence's
                    // compare-and-set. A local-time occurrence remembers itself in
                    // `not_before` (expanded `LOCAL_TIME_LEAD_MS` early, as campaigns do).
                    scan.dispatches.push(DispatchRecord {
                        id: crate::plan::new_dispatch_id(),
                        workspace: ws,
                        source: DispatchSource::Canvas {
                            canvas_id: canvas.id.clone(),
                            recipients: None,
                        },
                        send_id: None,
                        per_user_ids: false,
                        properties: None,
                        audience: None,
                        created_at: self.clock.now(),
                        expanding_after: Some(UserSeq(0)),
                        not_before: schedule.in_local_time.then(|| schedule.expands_at(due)),
                    });
                    scan.next_run = Some((canvas.id.clone(), Some(due), schedule.next_after(due)));
                }
                continue;
            }
            let Delivery::ActionBased(action) = &def.entry else {
                continue;
            };
            let launched = canvas.launched_at.unwrap_or(canvas.updated_at);
            let from = action
                .start
                .map_or(launched, |s| Millis(s.0.max(launched.0)));
            let floor = from.0 - from.0.rem_euclid(1_000);
            let mut entrants = Vec::new();
            for (user, h) in &happened {
                if h.at.0 >= floor
                    && action.end.is_none_or(|end| h.at.0 <= end.0)
                    && action.triggers.iter().any(|t| t.matches(&h.occurrence()))
                {
                    entrants.push(Entrant {
                        user: *user,
                        properties: None,
                        due_at: None,
                    });
                }
            }
            for entry in &entries {
                let o = Occurrence::CohortEntry {
                    partner: &entry.partner,
                    cohort_id: &entry.cohort_id,
                };
                if entry.at.0 >= floor && action.triggers.iter().any(|t| t.matches(&o)) {
                    entrants.push(Entrant {
                        user: entry.user,
                        properties: None,
                        due_at: None,
                    });
                }
            }
            self.plan_entries(ws, canvas, entrants, None, &mut scan)
                .await?;
        }
        let out = self.store.enter_canvas(ws, self.clock.now(), scan).await?;
        if out.entered > 0 || out.inboxed > 0 {
            debug!(
                workspace = ws.0,
                entered = out.entered,
                inboxed = out.inboxed,
                "Canvas scan"
            );
            self.wake();
        }
        Ok(full)
    }

    /// Claims and processes one batch of due journeys; how many were claimed. (The timer
    /// worker runs the same three steps, pipelined.)
    pub async fn timer_pass(&self) -> Result<usize, StoreError> {
        let claimed = self.claim_due().await?;
        let n = claimed.journeys.len();
        if n > 0 {
            let computed = self.compute(claimed).await?;
            self.settle(computed).await?;
        }
        Ok(n)
    }

    /// Claims up to a batch of due journeys for this node.
    async fn claim_due(&self) -> Result<Claimed, StoreError> {
        let now = self.clock.now();
        // Wall time of each phase, for the histograms and the debug log (not the clock: the
        // injected clock may stand still in tests).
        let started = std::time::Instant::now();
        let journeys = self
            .store
            .claim_journeys(
                &self.config.owner,
                now,
                self.config.lease_ms,
                self.config.claim_batch,
            )
            .await?;
        let took = started.elapsed();
        metrics::histogram!("tideway_canvas_timer_pass_seconds", "phase" => "claim")
            .record(took.as_secs_f64());
        debug!(
            journeys = journeys.len(),
            claim_ms = took.as_millis(),
            "Canvas timers claimed"
        );
        Ok(Claimed { now, journeys })
    }

    /// Advances each claimed journey and builds its settlement (reads only).
    async fn compute(&self, claimed: Claimed) -> Result<Computed, StoreError> {
        let Claimed { now, journeys } = claimed;
        let started = std::time::Instant::now();
        let n = journeys.len();
        let mut by_canvas: HashMap<(WorkspaceId, String, u32), Vec<ClaimedJourney>> =
            HashMap::new();
        for c in journeys {
            by_canvas
                .entry((c.workspace, c.canvas_id.clone(), c.journey.version))
                .or_default()
                .push(c);
        }
        let mut settlements = Vec::with_capacity(n);
        let mut sent = false;
        for ((ws, canvas_id, version), group) in by_canvas {
            let (Some(workspace), Some(canvas)) = (
                self.workspace(ws).await?,
                self.store.canvas(ws, &canvas_id).await?,
            ) else {
                continue;
            };
            let Some(v) = self.version(ws, &canvas_id, version).await? else {
                // A damaged or missing version: the journeys end where they are.
                for c in group {
                    settlements.push(JourneySettlement {
                        workspace: ws,
                        canvas_id: c.canvas_id.clone(),
                        user: c.user,
                        entry_id: c.journey.entry_id.clone(),
                        journey: None,
                        inbox_upto: c.inbox.last().map(|(id, _)| *id),
                        events: Vec::new(),
                        sends: Vec::new(),
                        stats: Vec::new(),
                        user_update: None,
                        watch: None,
                    });
                }
                continue;
            };
            let users: Vec<UserSeq> = group.iter().map(|c| c.user).collect();
            let records: HashMap<UserSeq, UserRecord> = self
                .store
                .users_by_seq(ws, users.clone())
                .await?
                .into_iter()
                .map(|u| (u.seq, u))
                .collect();
            let mut yes: HashMap<UserSeq, HashSet<usize>> = HashMap::new();
            for (i, raw) in v.def.filters.iter().enumerate() {
                let filter = Filter::from_json(raw)
                    .map_err(|e| StoreError::Corrupt(format!("canvas filter: {e}")))?;
                for u in self.audiences.matching(ws, filter, users.clone()).await? {
                    yes.entry(u).or_default().insert(i);
                }
            }
            let empty = HashSet::new();
            for c in group {
                let Some(record) = records.get(&c.user) else {
                    // The user was deleted: the journey ends silently.
                    settlements.push(ended(&c));
                    continue;
                };
                let facts = Answers {
                    yes: yes.get(&c.user).unwrap_or(&empty),
                    canvas_id: &canvas_id,
                    user_key: crate::plan::assignment_key(c.user),
                };
                let inbox: Vec<Happening> = c.inbox.iter().map(|(_, h)| h.clone()).collect();
                let advanced = canvas::advance(&v.def, c.journey.clone(), now, &inbox, &facts);
                let s = self
                    .settlement(&workspace, &canvas, &v, &c, record, advanced, now)
                    .await?;
                sent |= !s.sends.is_empty();
                settlements.push(s);
            }
        }
        let took = started.elapsed();
        metrics::histogram!("tideway_canvas_timer_pass_seconds", "phase" => "compute")
            .record(took.as_secs_f64());
        debug!(
            journeys = n,
            compute_ms = took.as_millis(),
            "Canvas timers computed"
        );
        Ok(Computed {
            now,
            settlements,
            sent,
        })
    }

    /// Commits a batch's settlements (a lost lease refuses a journey's, writing nothing for it)
    /// and wakes the dispatcher for the sends they queued.
    async fn settle(&self, batch: Computed) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let n = batch.settlements.len();
        let refused = self
            .store
            .settle_journeys(&self.config.owner, batch.now, batch.settlements)
            .await?;
        let took = started.elapsed();
        metrics::histogram!("tideway_canvas_timer_pass_seconds", "phase" => "settle")
            .record(took.as_secs_f64());
        debug!(
            journeys = n,
            settle_ms = took.as_millis(),
            "Canvas timers settled"
        );
        if refused > 0 {
            warn!(refused, "journey settlements refused (lease lost)");
        }
        if batch.sent {
            self.dispatcher.wake();
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn settlement(
        &self,
        workspace: &Workspace,
        canvas: &CanvasRecord,
        v: &Version,
        c: &ClaimedJourney,
        record: &UserRecord,
        advanced: canvas::Advanced,
        now: Millis,
    ) -> Result<JourneySettlement, StoreError> {
        let def = &v.def;
        let user = event_user(record);
        let variant = def.variant(&c.journey.variant_id);
        let step_name = |id: &str| def.step(id).map(|s| s.name.clone());
        let mut events = Vec::new();
        let mut sends = Vec::new();
        let mut stats = Vec::new();
        let mut updates = Vec::new();
        for e in &advanced.events {
            let step_id = match e {
                StepEvent::Progressed { from, .. } => from,
                StepEvent::SplitEntry { step, .. }
                | StepEvent::Send { step, .. }
                | StepEvent::UserUpdate { step }
                | StepEvent::Conversion { step, .. }
                | StepEvent::Exited { step, .. } => step,
            };
            let name = step_name(step_id);
            let source = MessageSource {
                app_group_id: &workspace.app_group_id,
                app_id: None,
                origin: Origin::Canvas {
                    canvas_id: &canvas.id,
                    canvas_name: Some(&canvas.name),
                    canvas_variation_id: Some(&c.journey.variant_id),
                    canvas_variation_name: variant.map(|v| v.name.as_str()),
                    canvas_step_id: Some(step_id),
                    canvas_step_name: name.as_deref(),
                    canvas_step_message_variation_id: None,
                },
                dispatch_id: None,
                send_id: None,
            };
            match e {
                StepEvent::Progressed { from, to } => {
                    events.push(CurrentsEvent::canvas_progression(
                        event_id(),
                        now,
                        &user,
                        &source,
                        &Progression {
                            canvas_entry_id: &c.journey.entry_id,
                            progression_type: "advance",
                            next_step_id: Some(to),
                            exit_reason: None,
                            is_canvas_entry: false,
                        },
                    ));
                    stats.push((from.clone(), CanvasStat::Progressed));
                    stats.push((to.clone(), CanvasStat::Entered));
                }
                StepEvent::SplitEntry {
                    path, path_name, ..
                } => events.push(CurrentsEvent::canvas_split_entry(
                    event_id(),
                    now,
                    &user,
                    &source,
                    path,
                    path_name,
                    false,
                )),
                StepEvent::Send {
                    step,
                    event_properties,
                } => {
                    if let Some(send) = step_send(
                        workspace,
                        canvas,
                        v,
                        c,
                        step,
                        event_properties.as_deref(),
                        now,
                    ) {
                        sends.push(send);
                    }
                }
                StepEvent::UserUpdate { step } => {
                    updates.extend(user_update(def, step, record));
                }
                StepEvent::Conversion { index, at, .. } => {
                    let behavior = def.conversion_events[usize::from(*index)]
                        .behavior_json()
                        .to_string();
                    events.push(CurrentsEvent::canvas_conversion(
                        event_id(),
                        *at,
                        &user,
                        &source,
                        i32::from(*index),
                        &behavior,
                    ));
                    stats.push((step_id.clone(), CanvasStat::Conversions));
                }
                StepEvent::Exited { step, reason } => {
                    match reason {
                        ExitReason::ExceptionEvent => events.push(CurrentsEvent::canvas_exit(
                            event_id(),
                            now,
                            &user,
                            &source,
                            false,
                        )),
                        ExitReason::MatchedAudience => events.push(CurrentsEvent::canvas_exit(
                            event_id(),
                            now,
                            &user,
                            &source,
                            true,
                        )),
                        _ => {}
                    }
                    events.push(CurrentsEvent::canvas_progression(
                        event_id(),
                        now,
                        &user,
                        &source,
                        &Progression {
                            canvas_entry_id: &c.journey.entry_id,
                            progression_type: "exit",
                            next_step_id: None,
                            exit_reason: Some(reason.as_str()),
                            is_canvas_entry: false,
                        },
                    ));
                    stats.push((step.clone(), CanvasStat::Exited));
                }
            }
        }
        // A journey that ended keeps its conversion windows open (Braze counts a conversion
        // within the window after the entry even once the user has left).
        let watch = match (
            &advanced.journey,
            canvas::conversions_close(def, c.journey.entered_at),
        ) {
            (None, Some(until)) if until.0 >= now.0 => {
                let mut converted = c.journey.converted;
                let mut last = c.journey.step_id.clone();
                for e in &advanced.events {
                    match e {
                        StepEvent::Conversion { index, .. } => converted |= 1 << index,
                        StepEvent::Exited { step, .. } => last.clone_from(step),
                        _ => {}
                    }
                }
                Some(ConversionWatch {
                    entry_id: c.journey.entry_id.clone(),
                    version: c.journey.version,
                    variant_id: c.journey.variant_id.clone(),
                    step_id: last,
                    entered_at: c.journey.entered_at,
                    converted,
                    until,
                })
            }
            _ => None,
        };
        Ok(JourneySettlement {
            workspace: workspace.id,
            canvas_id: canvas.id.clone(),
            user: c.user,
            entry_id: c.journey.entry_id.clone(),
            journey: advanced.journey,
            inbox_upto: c.inbox.last().map(|(id, _)| *id),
            events,
            sends,
            stats,
            user_update: user_update_request(workspace, updates),
            watch,
        })
    }
}

/// A User Update step's attributes object about the user: `set` values and `{"inc": n}`
/// for each increment.
fn user_update(def: &CanvasDefinition, step: &str, record: &UserRecord) -> Option<Value> {
    let Some(StepKind::UserUpdate { set, increment, .. }) = def.step(step).map(|s| &s.kind) else {
        return None;
    };
    let mut object = set.clone();
    for (k, n) in increment {
        object.insert(k.clone(), json!({"inc": n}));
    }
    object.insert("braze_id".into(), json!(record.braze_id.as_str()));
    Some(Value::Object(object))
}

/// The `/users/track` request of a journey's User Update steps (in step order), if any is
/// valid.
fn user_update_request(workspace: &Workspace, objects: Vec<Value>) -> Option<UserUpdate> {
    if objects.is_empty() {
        return None;
    }
    let mut body = Map::new();
    body.insert("attributes".into(), Value::Array(objects));
    match parse_track(&body) {
        Ok(request) if request.valid_objects() > 0 => Some(UserUpdate {
            workspace: workspace.clone(),
            request,
        }),
        Ok(refused) => {
            // Saving checks the values since, so only a Canvas saved before that gets here.
            let reasons: Vec<&str> = refused.errors.iter().map(|e| e.message.as_str()).collect();
            warn!(?reasons, "a User Update step's attributes were refused");
            None
        }
        Err(e) => {
            warn!(error = %e, "a User Update step's attributes do not parse");
            None
        }
    }
}

fn ended(c: &ClaimedJourney) -> JourneySettlement {
    JourneySettlement {
        workspace: c.workspace,
        canvas_id: c.canvas_id.clone(),
        user: c.user,
        entry_id: c.journey.entry_id.clone(),
        journey: None,
        inbox_upto: c.inbox.last().map(|(id, _)| *id),
        events: Vec::new(),
        sends: Vec::new(),
        stats: Vec::new(),
        user_update: None,
        watch: None,
    }
}

fn event_user(record: &UserRecord) -> EventUser<'_> {
    EventUser {
        braze_id: &record.braze_id,
        external_id: record.external_id.as_ref(),
        device_id: None,
        time_zone: record.time_zone(),
    }
}

/// The send of a Message step: its dispatch (per Canvas, version and step; the message in
/// the campaign shape, the Canvas ids under `canvas`) and the job with the journey's entry
/// properties and event properties.
fn step_send(
    workspace: &Workspace,
    canvas: &CanvasRecord,
    v: &Version,
    c: &ClaimedJourney,
    step: &str,
    event_properties: Option<&str>,
    now: Millis,
) -> Option<CanvasSend> {
    let message = v.json["steps"]
        .as_array()?
        .iter()
        .find(|s| s["id"] == step)?
        .get("message")?
        .clone();
    let variant = v.def.variant(&c.journey.variant_id);
    let step_name = v.def.step(step).map(|s| s.name.clone());
    let id = step_dispatch_id(&canvas.id, c.journey.version, step);
    let definition = json!({
        "messages": [message],
        "control_percent": 0,
        "delivery": {"type": "api_triggered"},
        "frequency_capping": v.def.obey_frequency_caps,
        "canvas": {
            "id": canvas.id,
            "name": canvas.name,
            "variation_id": c.journey.variant_id,
            "variation_name": variant.map(|v| v.name.clone()),
            "step_id": step,
            "step_name": step_name,
        },
    });
    let entry: Value = c
        .journey
        .entry_properties
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_else(|| json!({}));
    let event: Value = event_properties
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_else(|| json!({}));
    Some(CanvasSend {
        dispatch: DispatchRecord {
            id: id.clone(),
            workspace: workspace.id,
            source: DispatchSource::AdHoc { definition },
            send_id: None,
            per_user_ids: true,
            properties: None,
            audience: None,
            created_at: now,
            expanding_after: None,
            not_before: None,
        },
        job: SendJob {
            dispatch_id: id,
            variant: step.to_owned(),
            due_at: now,
            properties: Some(
                json!({"canvas_entry_properties": entry, "event_properties": event}).to_string(),
            ),
        },
    })
}
