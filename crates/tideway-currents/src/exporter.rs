//! The exporter's supervisor: one consumer task per Current, kept in step with the store.
//!
//! It rescans the Currents on a timer and whenever [`Exporter::refresh`] is called (the
//! management API calls it after every change), starts a consumer for each new Current,
//! hands changed definitions to their consumers, and stops the consumers of deleted ones. It
//! also samples the log clock (which log position was the head at which time) that
//! retention, lag in seconds and replay windows read. [`Exporter::send_test`] is the
//! **send test events** action; [`Exporter::wait_for`] lets tests and tools wait for a
//! Current's state without sleeping. Every request it and its consumers make keeps the
//! egress policy of [`ExporterConfig::egress`] ([`crate::egress`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tideway_core::currents_store::{Current, CurrentId, CurrentsStore};
use tideway_core::egress::EgressPolicy;
use tideway_core::store::StoreError;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::classify::{Verdict, classify};
use crate::clock::Clock;
use crate::consumer::{self, Control};
use crate::send::Sender;
use crate::spec::selected_types;
use crate::{CurrentsError, catalogue, egress};

/// Process-wide exporter settings (per-Current settings live in each Current's spec).
#[derive(Debug, Clone)]
pub struct ExporterConfig {
    /// This node's lease-owner name. Stable across restarts of one node, so a restarted
    /// process takes its Currents back at once; distinct per node.
    pub owner: String,
    /// A lease not renewed for this long may be taken by another node.
    pub lease_ttl_ms: u64,
    /// How often a consumer at the head of the log looks for new events.
    pub poll_interval_ms: u64,
    /// How often the supervisor rescans the Currents, and each consumer looks for replays,
    /// without being asked (what another node changed is seen within it).
    pub rescan_interval_ms: u64,
    /// How often the log clock is sampled.
    pub clock_tick_ms: u64,
    /// How often each consumer renews its lease, applies retention and updates its gauges.
    pub maintenance_interval_ms: u64,
    /// Events larger than this (bytes of JSON) go to the dead-letter store unsent.
    pub max_event_bytes: usize,
    /// Test events per Current per rolling window.
    pub test_event_cap: u64,
    pub test_event_window_ms: u64,
    /// How long log-clock samples are kept.
    pub log_clock_keep_ms: u64,
    /// Which destinations deliveries, test sends and alerts may reach.
    pub egress: EgressPolicy,
}

impl Default for ExporterConfig {
    fn default() -> Self {
        ExporterConfig {
            owner: "tideway".into(),
            lease_ttl_ms: 30_000,
            poll_interval_ms: 50,
            rescan_interval_ms: 5_000,
            clock_tick_ms: 1_000,
            maintenance_interval_ms: 10_000,
            max_event_bytes: 900_000,
            test_event_cap: 10_000,
            test_event_window_ms: 7 * 86_400_000,
            log_clock_keep_ms: 60 * 86_400_000,
            egress: EgressPolicy::default(),
        }
    }
}

impl ExporterConfig {
    pub(crate) fn poll(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(1))
    }

    pub(crate) fn rescan(&self) -> Duration {
        Duration::from_millis(self.rescan_interval_ms.max(1))
    }

    pub(crate) fn maintenance(&self) -> Duration {
        Duration::from_millis(self.maintenance_interval_ms.max(1))
    }

    pub(crate) fn lease_retry(&self) -> Duration {
        Duration::from_millis((self.lease_ttl_ms / 4).clamp(10, 5_000))
    }
}

struct ConsumerHandle {
    control: watch::Sender<Control>,
    task: JoinHandle<()>,
}

/// What the supervisor and the consumers share.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn CurrentsStore>,
    pub(crate) config: ExporterConfig,
    pub(crate) clock: Clock,
    pub(crate) wake: Notify,
    progress: watch::Sender<u64>,
    consumers: Mutex<HashMap<CurrentId, ConsumerHandle>>,
    /// The alert webhook client (`None`: it could not be built, which was logged).
    alerts: Option<reqwest::Client>,
}

impl Shared {
    /// Signals "something about some Current changed" to waiters.
    pub(crate) fn bump(&self) {
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Posts an alert to the Current's alert webhook, if it has one (one attempt, 10 s).
    pub(crate) async fn alert(&self, current: &Current, kind: &str, message: &str) {
        metrics::counter!("tideway_currents_alerts_total", "current" => current.id.to_string(), "alert" => kind.to_owned()).increment(1);
        let (Some(url), Some(client)) = (&current.spec.alert_webhook, &self.alerts) else {
            return;
        };
        let url = match egress::parse_url(&self.config.egress, url.as_str()) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(current = %current.id, webhook = %url, error = %e, "alert webhook not sent");
                return;
            }
        };
        let body = json!({
            "alert": kind,
            "current_id": current.id.0,
            "workspace_id": current.workspace.0,
            "name": current.spec.name,
            "message": message,
            "at": self.clock.now().to_iso(),
        });
        let sent = client.post(url).json(&body).send().await;
        if let Err(e) = sent {
            let webhook = current.spec.alert_webhook.as_ref().map(|u| u.redacted());
            tracing::warn!(current = %current.id, webhook, error = %egress::reason(&e), "alert webhook failed");
        }
    }
}

/// The outcome of **send test events**.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestReport {
    /// Placeholder events sent (one per selected type).
    pub events: usize,
    /// The receiver's status, if it answered.
    pub status: Option<u16>,
    /// Whether the receiver accepted them (2xx).
    pub accepted: bool,
    /// A short reason (`"delivered"`, `"receiver answered 500: will be retried"`,
    /// `"connection refused"`, `"refused by egress policy: …"`); never the receiver's body.
    pub message: String,
}

/// The running exporter.
pub struct Exporter {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    supervisor: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Starts the supervisor on the current tokio runtime, with the system clock.
    pub fn start(store: Arc<dyn CurrentsStore>, config: ExporterConfig) -> Exporter {
        Self::start_with_clock(store, config, Clock::system())
    }

    pub fn start_with_clock(
        store: Arc<dyn CurrentsStore>,
        config: ExporterConfig,
        clock: Clock,
    ) -> Exporter {
        let alerts = egress::client_builder(config.egress)
            .timeout(Duration::from_secs(10))
            .build()
            .inspect_err(|e| tracing::error!(error = %e, "cannot build the alert webhook client: no alert will be posted"))
            .ok();
        let shared = Arc::new(Shared {
            store,
            config,
            clock,
            wake: Notify::new(),
            progress: watch::Sender::new(0),
            consumers: Mutex::new(HashMap::new()),
            alerts,
        });
        let (stop, stopped) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(Arc::clone(&shared), stopped));
        Exporter {
            shared,
            stop,
            supervisor: Some(supervisor),
        }
    }

    pub fn store(&self) -> &Arc<dyn CurrentsStore> {
        &self.shared.store
    }

    pub fn clock(&self) -> Clock {
        self.shared.clock
    }

    /// The egress policy every request keeps (the management API judges definitions by it).
    pub fn egress(&self) -> EgressPolicy {
        self.shared.config.egress
    }

    /// Rescan now (after a create, update, status change or delete).
    pub fn refresh(&self) {
        self.shared.wake.notify_one();
    }

    /// Brings the consumers in step with the store now (after a change made through the
    /// store, before acting on it).
    pub async fn sync(&self) {
        reconcile(&self.shared).await;
    }

    /// Tells the Current's consumer that replays were queued (after syncing, so a replay
    /// requested right after an update goes to the updated endpoint).
    pub async fn poke(&self, id: CurrentId) {
        reconcile(&self.shared).await;
        if let Ok(map) = self.shared.consumers.lock()
            && let Some(h) = map.get(&id)
        {
            h.control.send_modify(|c| c.poke = c.poke.wrapping_add(1));
        }
    }

    /// A counter bumped whenever any Current made progress or changed state.
    pub fn progress(&self) -> watch::Receiver<u64> {
        self.shared.progress.subscribe()
    }

    /// Waits until the Current satisfies `done` (re-read from the store after every change),
    /// up to `limit`; returns its last state either way and whether `done` held.
    pub async fn wait_for(
        &self,
        id: CurrentId,
        limit: Duration,
        mut done: impl FnMut(&Current) -> bool,
    ) -> Result<(Current, bool), StoreError> {
        let mut progress = self.progress();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            progress.borrow_and_update();
            let current = self
                .shared
                .store
                .all_currents()
                .await?
                .into_iter()
                .find(|c| c.id == id)
                .ok_or_else(|| StoreError::NotFound(format!("current {id}")))?;
            if done(&current) {
                return Ok((current, true));
            }
            let checked = tokio::time::Instant::now();
            tokio::select! {
                r = progress.changed() => if r.is_err() { return Ok((current, false)) },
                () = tokio::time::sleep_until(deadline) => return Ok((current, false)),
            }
            // Under heavy progress, re-read at most every 5 ms (the store serves the
            // exporter first).
            tokio::time::sleep_until((checked + Duration::from_millis(5)).min(deadline)).await;
        }
    }

    /// **Send test events**: one placeholder event of each selected type, sent once (no
    /// retry), transformations applied; counted against the test cap. The report gives the
    /// receiver's status and a short reason, never its body (the body of whatever answers at
    /// an endpoint is not for the key holder to read). An endpoint the egress policy refuses
    /// is reported, with nothing sent and nothing counted.
    pub async fn send_test(&self, current: &Current) -> Result<TestReport, CurrentsError> {
        let sender = match Sender::new(&current.spec, self.shared.clock, &self.shared.config.egress)
        {
            Ok(s) => s,
            Err(CurrentsError::Refused { refusal, .. }) => {
                return Ok(TestReport {
                    events: 0,
                    status: None,
                    accepted: false,
                    message: refusal.to_string(),
                });
            }
            Err(e) => return Err(e),
        };
        let types: Vec<&catalogue::TypeInfo> = match selected_types(&current.spec.selection) {
            None => catalogue::all().iter().collect(),
            Some(names) => names.iter().filter_map(|n| catalogue::find(n)).collect(),
        };
        let now = self.shared.clock.now();
        let c = &self.shared.config;
        self.shared
            .store
            .record_test_events(
                current.id,
                types.len() as u64,
                c.test_event_cap,
                c.test_event_window_ms,
                now,
            )
            .await?;
        let events = types
            .iter()
            .map(|t| t.placeholder(&uuid::Uuid::new_v4().hyphenated().to_string(), now.secs()))
            .collect::<Vec<_>>();
        let n = events.len();
        let sent = sender.send_values(events).await;
        let accepted = sent.sent == 0 || classify(sent.answer, sent.sent) == Verdict::Ack;
        Ok(TestReport {
            events: n,
            status: sent.status(),
            accepted,
            message: sent.reason(),
        })
    }

    /// Stops every consumer (in-flight batches are abandoned and will be re-sent) and the
    /// supervisor; leases are released.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(s) = self.supervisor.take() {
            let _ = s.await;
        }
        let handles: Vec<(CurrentId, ConsumerHandle)> = match self.shared.consumers.lock() {
            Ok(mut map) => map.drain().collect(),
            Err(_) => Vec::new(),
        };
        for (id, h) in handles {
            h.task.abort();
            let _ = h.task.await;
            let _ = self
                .shared
                .store
                .release_lease(id, &self.shared.config.owner)
                .await;
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        if let Some(s) = &self.supervisor {
            s.abort();
        }
        if let Ok(mut map) = self.shared.consumers.lock() {
            for (_, h) in map.drain() {
                h.task.abort();
            }
        }
    }
}

async fn supervise(shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let rescan = shared.config.rescan();
    let tick = Duration::from_millis(shared.config.clock_tick_ms.max(1));
    let mut next_tick = tokio::time::Instant::now();
    let mut next_rescan = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if now >= next_tick {
            if let Err(e) = shared
                .store
                .tick_log_clock(shared.clock.now(), shared.config.log_clock_keep_ms)
                .await
            {
                tracing::warn!(error = %e, "cannot sample the log clock");
            }
            next_tick = now + tick;
        }
        if now >= next_rescan {
            reconcile(&shared).await;
            next_rescan = now + rescan;
        }
        tokio::select! {
            r = stopped.changed() => if r.is_err() || *stopped.borrow() { break },
            () = shared.wake.notified() => next_rescan = tokio::time::Instant::now(),
            () = tokio::time::sleep_until(next_tick.min(next_rescan)) => {}
        }
    }
}

async fn reconcile(shared: &Arc<Shared>) {
    let currents = match shared.store.all_currents().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list Currents");
            return;
        }
    };
    let Ok(mut map) = shared.consumers.lock() else {
        return;
    };
    let live: std::collections::HashSet<CurrentId> = currents.iter().map(|c| c.id).collect();
    map.retain(|id, h| {
        let keep = live.contains(id) && !h.task.is_finished();
        if !keep {
            h.task.abort();
        }
        if !live.contains(id) {
            consumer::clear_status(*id);
        }
        keep
    });
    for current in currents {
        match map.get(&current.id) {
            Some(h) => {
                if h.control.borrow().current.revision != current.revision {
                    h.control.send_modify(|c| c.current = Arc::new(current));
                }
            }
            None => {
                let id = current.id;
                let (control, rx) = watch::channel(Control {
                    current: Arc::new(current),
                    poke: 0,
                });
                let task = tokio::spawn(consumer::run(Arc::clone(shared), rx));
                map.insert(id, ConsumerHandle { control, task });
            }
        }
    }
    drop(map);
    shared.bump();
}
