//! One Current's consumer: the exporter loop.
//!
//! ```text
//! loop {
//!     settle finished batches, oldest first  → ack (position, counters, dead letters) | halt | disable
//!     maintenance when due                   → renew lease, retention drops, lag gauges, "stuck" alert
//!     claim batches while the window has room → dead-letter replays, window replays, then the live log
//!     wait for: the oldest batch, a control change, the next poll / flush / maintenance / replay look
//! }
//! ```
//!
//! Replays are rows in the store: a control change from this node's API says to look for them
//! at once, and the consumer also looks every rescan interval, so a replay asked of another
//! node (which cannot signal this one) starts within that interval.
//!
//! Each claimed batch is delivered by its own task (`deliver`): send → classify → ack,
//! split to singles (400), halve (413), dead-letter (a single 400/413, or an event over the size
//! limit), retry with backoff (5xx, 429, timeouts, …) or halt (401/403/404). Batches are
//! acknowledged strictly in claim order, so the committed position only ever covers resolved
//! events; at most `max_in_flight` batches (1 with per-user ordering) are unacknowledged, which
//! bounds the duplicates a crash can cause.
//!
//! A Current that is not active (draft, paused, halted, disabled) parks: it keeps applying
//! retention (counted, recorded drops) and publishing its lag until its status changes.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tideway_core::clock::Millis;
use tideway_core::currents_store::{
    Ack, BatchSource, Current, CurrentId, CurrentStatus, DeadLetterReason, LastError,
    NewDeadLetter, Ordering, QueuedEvent, StatusChange, TypeFilter,
};
use tideway_core::store::StoreError;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backoff::{self, Jitter};
use crate::classify::{Verdict, classify};
use crate::exporter::Shared;
use crate::send::Sender;
use crate::spec::selected_types;

/// What the supervisor tells a consumer: the Current as last read, and a counter bumped when
/// replays were queued.
#[derive(Debug, Clone)]
pub struct Control {
    pub current: Arc<Current>,
    pub poke: u64,
}

/// How a delivery task ended.
#[derive(Debug)]
pub(crate) enum End {
    Done,
    Halt(LastError),
    Disable(LastError),
    Store(StoreError),
}

/// What a delivery task hands back for acknowledgement.
#[derive(Debug)]
pub(crate) struct BatchResult {
    delivered: u64,
    skipped: u64,
    dead_letters: Vec<NewDeadLetter>,
    end: End,
}

struct InFlight {
    source: BatchSource,
    handle: JoinHandle<BatchResult>,
    /// The task's output, once awaited.
    done: Option<Result<BatchResult, tokio::task::JoinError>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Why the active loop returned.
enum Exit {
    /// The control value changed (new spec or status): start over with it.
    Changed,
    /// The supervisor is gone.
    Closed,
    /// This consumer changed the status itself; wait until the control shows `revision`.
    SelfChanged(i64),
    /// Something failed (lease lost, storage); start over after a pause.
    Pause,
}

fn label(id: CurrentId) -> String {
    id.to_string()
}

pub(crate) async fn run(shared: Arc<Shared>, mut control: watch::Receiver<Control>) {
    let id = control.borrow().current.id;
    let mut min_revision = 0;
    let mut jitter = Jitter::random();
    loop {
        let current = control.borrow_and_update().current.clone();
        if current.revision < min_revision {
            if control.changed().await.is_err() {
                break;
            }
            continue;
        }
        publish_status(&current);
        let exit = if current.status == CurrentStatus::Active {
            active(&shared, &mut control, current, &mut jitter).await
        } else {
            parked(&shared, &mut control, current).await
        };
        match exit {
            Exit::Changed => {}
            Exit::Closed => break,
            Exit::SelfChanged(revision) => {
                min_revision = revision;
                shared.wake.notify_one();
            }
            Exit::Pause => {
                tokio::select! {
                    r = control.changed() => if r.is_err() { break },
                    () = tokio::time::sleep(shared.config.lease_retry()) => {}
                }
            }
        }
    }
    let _ = shared.store.release_lease(id, &shared.config.owner).await;
}

fn publish_status(current: &Current) {
    for s in CurrentStatus::ALL {
        metrics::gauge!("tideway_currents_status", "current" => label(current.id), "status" => s.as_str())
            .set(if s == current.status { 1.0 } else { 0.0 });
    }
}

/// A deleted Current is in no status and has no lag: its gauges all read 0 (a scrape would
/// otherwise see it `active`, and lagging, for as long as the process runs).
pub(crate) fn clear_status(id: CurrentId) {
    for s in CurrentStatus::ALL {
        metrics::gauge!("tideway_currents_status", "current" => label(id), "status" => s.as_str())
            .set(0.0);
    }
    metrics::gauge!("tideway_currents_lag_events", "current" => label(id)).set(0.0);
    metrics::gauge!("tideway_currents_lag_seconds", "current" => label(id)).set(0.0);
}

/// Retention: drops what passed the retention period (counted, recorded, loud); returns the
/// last dropped position.
async fn retention(
    shared: &Shared,
    current: &Current,
    types: &TypeFilter,
) -> Result<Option<i64>, StoreError> {
    if current.status == CurrentStatus::Draft {
        return Ok(None);
    }
    let now = shared.clock.now();
    let cutoff = Millis(
        now.0
            .saturating_sub(i64::try_from(current.spec.windows.retention_ms).unwrap_or(i64::MAX)),
    );
    let Some(drop) = shared
        .store
        .apply_retention(current.id, &shared.config.owner, cutoff, types.clone(), now)
        .await?
    else {
        return Ok(None);
    };
    metrics::counter!("tideway_currents_dropped_events_total", "current" => label(current.id))
        .increment(drop.count);
    tracing::error!(current = %current.id, name = %current.spec.name, dropped = drop.count, from_seq = drop.from_seq, to_seq = drop.to_seq,
        "queued events passed the retention period and were dropped (recorded; replayable from the event log)");
    shared
        .alert(
            current,
            "dropped",
            &format!(
                "{} queued events passed retention and were dropped",
                drop.count
            ),
        )
        .await;
    shared.bump();
    Ok(Some(drop.to_seq))
}

/// Lag gauges and the "stuck" alert (oldest queued event older than `alert_after`).
async fn observe(
    shared: &Shared,
    current: &Current,
    types: &TypeFilter,
    stuck_alerted: &mut bool,
) -> Result<(), StoreError> {
    let now = shared.clock.now();
    let lag = shared.store.lag(current.id, types.clone()).await?;
    let lag_secs = lag
        .oldest_logged_at
        .map_or(0.0, |t| ((now.0 - t.0).max(0) as f64) / 1000.0);
    metrics::gauge!("tideway_currents_lag_events", "current" => label(current.id))
        .set(lag.events as f64);
    metrics::gauge!("tideway_currents_lag_seconds", "current" => label(current.id)).set(lag_secs);
    let stuck = lag_secs * 1000.0 > current.spec.windows.alert_after_ms as f64
        && current.status != CurrentStatus::Draft;
    if stuck && !*stuck_alerted {
        *stuck_alerted = true;
        tracing::error!(current = %current.id, name = %current.spec.name, lag_events = lag.events, lag_seconds = lag_secs,
            "Current is stuck: its oldest queued event is older than the alert threshold");
        shared
            .alert(
                current,
                "stuck",
                &format!(
                    "{} events queued, the oldest for {lag_secs:.0} s",
                    lag.events
                ),
            )
            .await;
    } else if !stuck {
        *stuck_alerted = false;
    }
    Ok(())
}

async fn parked(
    shared: &Shared,
    control: &mut watch::Receiver<Control>,
    current: Arc<Current>,
) -> Exit {
    let types = selected_types(&current.spec.selection);
    let mut stuck_alerted = false;
    loop {
        let now = shared.clock.now();
        let leased = shared
            .store
            .acquire_lease(
                current.id,
                &shared.config.owner,
                now,
                shared.config.lease_ttl_ms,
            )
            .await
            .unwrap_or(false);
        if leased {
            let done = match retention(shared, &current, &types).await {
                Ok(_) => observe(shared, &current, &types, &mut stuck_alerted).await,
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                tracing::warn!(current = %current.id, error = %e, "maintenance of a parked Current failed");
            }
        }
        tokio::select! {
            r = control.changed() => return if r.is_err() { Exit::Closed } else { Exit::Changed },
            () = tokio::time::sleep(shared.config.maintenance()) => {}
        }
    }
}

struct Active<'a> {
    shared: &'a Arc<Shared>,
    current: Arc<Current>,
    sender: Arc<Sender>,
    types: TypeFilter,
    window: VecDeque<InFlight>,
    max_in_flight: usize,
    batch: usize,
    buffer: VecDeque<QueuedEvent>,
    buffer_since: Option<Instant>,
    read_cursor: i64,
    acked_to: i64,
    next_poll: Instant,
    check_replays: bool,
    dead_letters_busy: bool,
    window_busy: bool,
}

async fn active(
    shared: &Arc<Shared>,
    control: &mut watch::Receiver<Control>,
    current: Arc<Current>,
    jitter: &mut Jitter,
) -> Exit {
    let id = current.id;
    let owner = &shared.config.owner;
    match shared
        .store
        .acquire_lease(id, owner, shared.clock.now(), shared.config.lease_ttl_ms)
        .await
    {
        // Each start resumes from the committed position, so it may re-send the batches the
        // previous holder (another node, or this one before a pause) had in flight: counted,
        // so that bound can be checked.
        Ok(true) => {
            metrics::counter!("tideway_currents_consumer_starts_total", "current" => label(id))
                .increment(1)
        }
        Ok(false) => return Exit::Pause,
        Err(e) => {
            tracing::warn!(current = %id, error = %e, "cannot take the Current's lease");
            return Exit::Pause;
        }
    }
    // Resume from the position committed *now*, read under the lease: the definition this
    // task was handed may be seconds old, and when the lease comes from another node (which
    // died, or let it lapse) that node has moved the position since. Starting from the old
    // one would re-send everything it delivered in between.
    let current = match shared.store.get_current(current.workspace, id).await {
        Ok(Some(fresh)) => Arc::new(fresh),
        Ok(None) => return Exit::Pause,
        Err(e) => {
            tracing::warn!(current = %id, error = %e, "cannot read the Current after taking its lease");
            return Exit::Pause;
        }
    };
    let sender = match Sender::new(&current.spec, shared.clock, &shared.config.egress) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(current = %id, error = %e, "cannot deliver to this Current's endpoint");
            let err = LastError {
                at: shared.clock.now(),
                status: None,
                message: e.to_string(),
            };
            let _ = shared.store.record_failure(id, owner, err, 0).await;
            shared.bump();
            return match control.changed().await {
                Ok(()) => Exit::Changed,
                Err(_) => Exit::Closed,
            };
        }
    };
    // The credential probe: an empty batch the receiver must authorise.
    if let Some(probe) = sender.probe().await
        && classify(probe.answer, 0) == Verdict::Halt
    {
        let err = LastError {
            at: shared.clock.now(),
            status: probe.status(),
            message: probe.describe(),
        };
        return halt(shared, &current, StatusChange::Halt, err).await;
    }
    let max_in_flight = match current.spec.ordering {
        Ordering::PerUser => 1,
        Ordering::Unordered => current.spec.max_in_flight.max(1) as usize,
    };
    let mut a = Active {
        shared,
        types: selected_types(&current.spec.selection),
        sender,
        window: VecDeque::new(),
        max_in_flight,
        batch: current.spec.batch_size.max(1) as usize,
        buffer: VecDeque::new(),
        buffer_since: None,
        read_cursor: current.position,
        acked_to: current.position,
        next_poll: Instant::now(),
        check_replays: true,
        dead_letters_busy: false,
        window_busy: false,
        current,
    };
    let mut stuck_alerted = false;
    let mut next_maintenance = Instant::now();
    let mut next_replay_look = Instant::now() + shared.config.rescan();
    // After a failed read of the log (the database away), no claim before this: the flush
    // deadline of a partial batch may be past, and waking for it would spin.
    let mut reads_resume_at: Option<Instant> = None;
    let mut retention_pending = true;
    let flush = Duration::from_millis(a.current.spec.flush_interval_ms);
    loop {
        // 1. Settle finished batches, oldest first.
        while a
            .window
            .front()
            .is_some_and(|f| f.done.is_some() || f.handle.is_finished())
        {
            if let Some(exit) = a.settle_front().await {
                return exit;
            }
        }
        // 2. Maintenance: lease renewal, retention (only with nothing in flight), gauges.
        let now = Instant::now();
        if now >= next_maintenance {
            match shared
                .store
                .acquire_lease(id, owner, shared.clock.now(), shared.config.lease_ttl_ms)
                .await
            {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    metrics::counter!("tideway_currents_leases_lost_total", "current" => label(id))
                        .increment(1);
                    tracing::warn!(current = %id, "lost the Current's lease; stopping");
                    return Exit::Pause;
                }
            }
            retention_pending = true;
            next_maintenance = now + shared.config.maintenance();
            if let Err(e) = observe(shared, &a.current, &a.types, &mut stuck_alerted).await {
                tracing::warn!(current = %id, error = %e, "cannot measure the Current's lag");
            }
        }
        if now >= next_replay_look {
            a.check_replays = true;
            next_replay_look = now + shared.config.rescan();
        }
        if retention_pending && a.window.is_empty() {
            retention_pending = false;
            match retention(shared, &a.current, &a.types).await {
                Ok(Some(dropped_to)) => {
                    // Events up to `dropped_to` are gone from the queue: forget them here too.
                    a.buffer.retain(|e| e.seq > dropped_to);
                    a.read_cursor = a.read_cursor.max(dropped_to);
                    a.acked_to = a.acked_to.max(dropped_to);
                    if a.buffer.is_empty() {
                        a.buffer_since = None;
                    }
                }
                Ok(None) => {}
                Err(StoreError::Conflict(_)) => return Exit::Pause,
                Err(e) => tracing::warn!(current = %id, error = %e, "Current maintenance failed"),
            }
            // Move the position past log entries of other types once in a while.
            if a.buffer.is_empty() && a.read_cursor > a.acked_to {
                let resolved_to = a.read_cursor;
                a.spawn(Vec::new(), BatchSource::Live { resolved_to }, jitter);
            }
        }
        // 3. Claim while the window has room.
        if reads_resume_at.is_some_and(|t| Instant::now() >= t) {
            reads_resume_at = None;
        }
        while a.window.len() < a.max_in_flight && !retention_pending && reads_resume_at.is_none() {
            match a.claim_next(jitter, flush).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(current = %id, error = %e, "cannot read the event log; retrying shortly");
                    let resume = Instant::now() + shared.config.lease_retry();
                    a.next_poll = resume;
                    reads_resume_at = Some(resume);
                    break;
                }
            }
        }
        metrics::gauge!("tideway_currents_in_flight_batches", "current" => label(id))
            .set(a.window.len() as f64);
        // 4. Wait.
        let mut wake = next_maintenance.min(next_replay_look);
        if let Some(resume) = reads_resume_at {
            wake = wake.min(resume);
        } else if a.window.len() < a.max_in_flight {
            if a.buffer.len() < a.batch {
                wake = wake.min(a.next_poll);
            }
            if let Some(since) = a.buffer_since {
                wake = wake.min(since + flush);
            }
        }
        enum Event {
            Control(bool),
            Front,
            Timer,
        }
        let event = {
            let front = async {
                match a.window.front_mut() {
                    Some(f) if f.done.is_none() => {
                        f.done = Some((&mut f.handle).await);
                    }
                    Some(_) => {}
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                r = control.changed() => Event::Control(r.is_ok()),
                () = front => Event::Front,
                () = tokio::time::sleep_until(wake) => Event::Timer,
            }
        };
        match event {
            Event::Control(false) => return Exit::Closed,
            Event::Control(true) => {
                let ctl = control.borrow();
                if ctl.current.revision != a.current.revision {
                    return Exit::Changed;
                }
                drop(ctl);
                a.check_replays = true;
            }
            Event::Front | Event::Timer => {}
        }
    }
}

impl Active<'_> {
    /// Claims and spawns one batch; false when there is nothing to send now.
    async fn claim_next(
        &mut self,
        jitter: &mut Jitter,
        flush: Duration,
    ) -> Result<bool, StoreError> {
        let store = &self.shared.store;
        let id = self.current.id;
        if self.check_replays && !self.dead_letters_busy {
            let dls = store.claim_dead_letters(id, self.batch).await?;
            if !dls.is_empty() {
                let ids = dls.iter().map(|d| d.id).collect();
                self.dead_letters_busy = true;
                self.spawn(
                    dls.into_iter().map(|d| d.event).collect(),
                    BatchSource::DeadLetters { ids },
                    jitter,
                );
                return Ok(true);
            }
        }
        if self.check_replays && !self.window_busy {
            if let Some(w) = store.next_replay_window(id).await? {
                let claimed = store
                    .claim(
                        self.current.workspace,
                        w.cursor,
                        self.batch * 4,
                        self.types.clone(),
                    )
                    .await?;
                let mut events: Vec<QueuedEvent> = claimed
                    .events
                    .into_iter()
                    .filter(|e| e.seq <= w.to_seq)
                    .collect();
                let resolved_to = if events.len() > self.batch {
                    events.truncate(self.batch);
                    events.last().map_or(w.cursor, |e| e.seq)
                } else {
                    claimed.scanned_to.min(w.to_seq).max(w.cursor + 1)
                };
                self.window_busy = true;
                self.spawn(
                    events,
                    BatchSource::Window {
                        window: w.id,
                        resolved_to,
                    },
                    jitter,
                );
                return Ok(true);
            }
            if !self.dead_letters_busy {
                self.check_replays = false;
            }
        }
        let now = Instant::now();
        if self.buffer.len() < self.batch && now >= self.next_poll {
            let scan = (self.batch * 8).max(1_000);
            let claimed = store
                .claim(
                    self.current.workspace,
                    self.read_cursor,
                    scan,
                    self.types.clone(),
                )
                .await?;
            let at_head = claimed.scanned < scan;
            self.read_cursor = claimed.scanned_to;
            if !claimed.events.is_empty() && self.buffer.is_empty() {
                self.buffer_since = Some(now);
            }
            self.buffer.extend(claimed.events);
            self.next_poll = if at_head {
                now + self.shared.config.poll()
            } else {
                now
            };
        }
        let due = self.buffer_since.is_some_and(|since| now >= since + flush);
        if self.buffer.len() >= self.batch || (!self.buffer.is_empty() && due) {
            let take = self.buffer.len().min(self.batch);
            let events: Vec<QueuedEvent> = self.buffer.drain(..take).collect();
            let resolved_to = self.buffer.front().map_or(self.read_cursor, |e| e.seq - 1);
            if self.buffer.is_empty() {
                self.buffer_since = None;
            }
            self.spawn(events, BatchSource::Live { resolved_to }, jitter);
            return Ok(true);
        }
        Ok(false)
    }

    fn spawn(&mut self, events: Vec<QueuedEvent>, source: BatchSource, jitter: &mut Jitter) {
        let max = self.shared.config.max_event_bytes;
        let (events, oversized): (Vec<_>, Vec<_>) =
            events.into_iter().partition(|e| e.body.len() <= max);
        let oversized = oversized
            .into_iter()
            .map(|event| NewDeadLetter {
                detail: format!(
                    "event of {} bytes is over the {max}-byte limit; never sent",
                    event.body.len()
                ),
                event,
                reason: DeadLetterReason::Oversized,
                response_status: None,
                response_body: None,
            })
            .collect();
        let job = Job {
            shared: Arc::clone(self.shared),
            current: Arc::clone(&self.current),
            sender: Arc::clone(&self.sender),
            jitter: Jitter::seeded(jitter.draw().to_bits()),
        };
        let handle = tokio::spawn(deliver(job, events, oversized));
        self.window.push_back(InFlight {
            source,
            handle,
            done: None,
        });
    }

    /// Acknowledges (or acts on) the oldest batch; `Some` ends the active loop.
    async fn settle_front(&mut self) -> Option<Exit> {
        let mut front = self.window.pop_front()?;
        let output = match front.done.take() {
            Some(out) => out,
            None => (&mut front.handle).await,
        };
        let result = match output {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(current = %self.current.id, error = %e, "a delivery task failed");
                return Some(Exit::Pause);
            }
        };
        let shared = self.shared;
        let id = self.current.id;
        match result.end {
            End::Done => {}
            End::Halt(err) => {
                self.window.clear();
                return Some(halt(shared, &self.current, StatusChange::Halt, err).await);
            }
            End::Disable(err) => {
                self.window.clear();
                return Some(halt(shared, &self.current, StatusChange::Disable, err).await);
            }
            End::Store(e) => {
                tracing::warn!(current = %id, error = %e, "storage failed during delivery; restarting from the committed position");
                return Some(Exit::Pause);
            }
        }
        let dead = result.dead_letters.len() as u64;
        let ack = Ack {
            current: id,
            owner: shared.config.owner.clone(),
            source: front.source.clone(),
            delivered: result.delivered,
            skipped: result.skipped,
            dead_letters: result.dead_letters,
            at: shared.clock.now(),
        };
        match shared.store.ack(ack).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(current = %id, error = %e, "cannot record delivered batch; restarting from the committed position");
                return Some(Exit::Pause);
            }
        }
        match front.source {
            BatchSource::Live { resolved_to } => self.acked_to = self.acked_to.max(resolved_to),
            BatchSource::Window { .. } => {
                self.window_busy = false;
                self.check_replays = true;
            }
            BatchSource::DeadLetters { .. } => {
                self.dead_letters_busy = false;
                self.check_replays = true;
            }
        }
        let l = label(id);
        metrics::counter!("tideway_currents_delivered_events_total", "current" => l.clone())
            .increment(result.delivered);
        if dead > 0 {
            metrics::counter!("tideway_currents_dead_lettered_events_total", "current" => l.clone()).increment(dead);
        }
        if result.skipped > 0 {
            metrics::counter!("tideway_currents_skipped_events_total", "current" => l)
                .increment(result.skipped);
        }
        shared.bump();
        None
    }
}

/// Halts or disables the Current (loudly) and tells the caller to wait for the new status.
async fn halt(shared: &Shared, current: &Current, change: StatusChange, err: LastError) -> Exit {
    let what = if change == StatusChange::Halt {
        "halted"
    } else {
        "disabled"
    };
    tracing::error!(current = %current.id, name = %current.spec.name, status = ?err.status, error = %err.message,
        "Current {what}: delivery stopped, queued events are kept until it is re-enabled");
    metrics::counter!("tideway_currents_stopped_total", "current" => label(current.id), "status" => what).increment(1);
    shared.alert(current, what, &err.message).await;
    let exit = match shared
        .store
        .change_status(current.id, change, Some(err), shared.clock.now())
        .await
    {
        Ok(updated) => Exit::SelfChanged(updated.revision),
        Err(e) => {
            tracing::warn!(current = %current.id, error = %e, "cannot record the status change");
            Exit::Pause
        }
    };
    shared.bump();
    exit
}

pub(crate) struct Job {
    shared: Arc<Shared>,
    current: Arc<Current>,
    sender: Arc<Sender>,
    jitter: Jitter,
}

/// Delivers one claimed batch to the end: acknowledged, split, dead-lettered, or stopped.
pub(crate) async fn deliver(
    mut job: Job,
    events: Vec<QueuedEvent>,
    oversized: Vec<NewDeadLetter>,
) -> BatchResult {
    let mut result = BatchResult {
        delivered: 0,
        skipped: 0,
        dead_letters: oversized,
        end: End::Done,
    };
    let id = job.current.id;
    let l = label(id);
    let policy = job.current.spec.retry;
    let mut work: VecDeque<Vec<QueuedEvent>> = VecDeque::from([events]);
    let mut failures = 0u32;
    while let Some(part) = work.pop_front() {
        if part.is_empty() {
            continue;
        }
        let sent = job.sender.send(&part).await;
        metrics::histogram!("tideway_currents_request_seconds", "current" => l.clone())
            .record(sent.elapsed.as_secs_f64());
        let verdict = if sent.sent == 0 {
            Verdict::Ack
        } else {
            classify(sent.answer, sent.sent)
        };
        metrics::counter!("tideway_currents_requests_total", "current" => l.clone(), "outcome" => verdict_label(verdict)).increment(1);
        match verdict {
            Verdict::Ack => {
                failures = 0;
                result.delivered += sent.sent as u64;
                result.skipped += sent.skipped.len() as u64;
                for (_, reason) in &sent.skipped {
                    tracing::debug!(current = %id, reason = reason.as_str(), "event skipped");
                }
            }
            Verdict::SplitToSingles => {
                for e in part.into_iter().rev() {
                    work.push_front(vec![e]);
                }
            }
            Verdict::Halve => {
                let mut first = part;
                let second = first.split_off(first.len() / 2);
                work.push_front(second);
                work.push_front(first);
            }
            Verdict::DeadLetter(reason) => {
                // What was not in the request (the kind cannot carry it) was not refused: it
                // is skipped and counted as such, as on a 2xx.
                result.skipped += sent.skipped.len() as u64;
                let unsent: HashSet<usize> = sent.skipped.iter().map(|(at, _)| *at).collect();
                for (_, event) in part
                    .into_iter()
                    .enumerate()
                    .filter(|(at, _)| !unsent.contains(at))
                {
                    result.dead_letters.push(NewDeadLetter {
                        detail: sent.describe(),
                        event,
                        reason,
                        response_status: sent.status(),
                        response_body: sent.body.clone(),
                    });
                }
            }
            Verdict::Halt => {
                result.end = End::Halt(LastError {
                    at: job.shared.clock.now(),
                    status: sent.status(),
                    message: sent.describe(),
                });
                return result;
            }
            Verdict::Retry { at_least } => {
                failures = failures.saturating_add(1);
                let now = job.shared.clock.now();
                let err = LastError {
                    at: now,
                    status: sent.status(),
                    message: sent.describe(),
                };
                metrics::counter!("tideway_currents_retried_events_total", "current" => l.clone())
                    .increment(part.len() as u64);
                match job
                    .shared
                    .store
                    .record_failure(id, &job.shared.config.owner, err.clone(), part.len() as u64)
                    .await
                {
                    Ok(since) => {
                        let failing_for = u64::try_from(now.0 - since.0).unwrap_or(0);
                        if failing_for > job.current.spec.windows.failure_window_ms {
                            result.end = End::Disable(LastError {
                                message: format!(
                                    "failing for {} s (over the failure window); last: {}",
                                    failing_for / 1000,
                                    err.message
                                ),
                                ..err
                            });
                            return result;
                        }
                    }
                    Err(e) => {
                        result.end = End::Store(e);
                        return result;
                    }
                }
                job.shared.bump();
                let wait = backoff::delay(&policy, failures, at_least, job.jitter.draw());
                tokio::time::sleep(wait).await;
                work.push_front(part);
            }
        }
    }
    result
}

fn verdict_label(v: Verdict) -> &'static str {
    match v {
        Verdict::Ack => "ack",
        Verdict::SplitToSingles => "split",
        Verdict::Halve => "halve",
        Verdict::DeadLetter(_) => "dead_letter",
        Verdict::Halt => "halt",
        Verdict::Retry { .. } => "retry",
    }
}
