//! The segment service: one in-memory [`LiveIndex`] per workspace, kept fresh from the store's
//! change feed by one background worker per workspace, and kept across restarts as a snapshot
//! file.
//!
//! - **Start.** [`SegmentService::spawn_preload`] starts a worker for every workspace that has
//!   segments. A worker's first step loads `<snapshot dir>/<workspace>.snap` (a few hundred ms
//!   for millions of users) and catches up from the feed position it records; without a usable
//!   snapshot (none, damaged, another version, or ahead of the store) it builds the index from
//!   every profile (`Store::segment_profiles`, tens of seconds on millions of users) and writes
//!   a snapshot right away.
//! - **Freshness.** A request reads the feed head (`Store::segment_feed_head`, one cheap read),
//!   wakes the worker and waits — at most [`FRESH_WAIT`] — until the published index covers
//!   that head. Everything acknowledged before the request is then visible (read-your-writes),
//!   and any number of waiting requests share one catch-up. Past the bound it answers from the
//!   index it has, so a slow catch-up delays freshness, never the answer. An idle worker also
//!   catches up every [`REFRESH_EVERY`].
//! - **No lock across a catch-up.** The worker reads the changes without any lock and applies
//!   them under the write half of the index's `RwLock`; evaluations hold the read half only
//!   while they evaluate. Loads, builds, applies, evaluations and snapshot writes all run on
//!   the blocking pool, never on the async request threads.
//!   The feed is incremental (appended occurrences, attributes, deltas; see
//!   `tideway_core::segments::ProfileChanges`), so a catch-up costs what changed since the last
//!   one and a waiting request normally waits for the rest of one round plus one more.
//! - **Persistence.** A snapshot is written (temp file, fsync, rename; mode 0600) after a full
//!   build, every [`SNAPSHOT_EVERY`] when something changed, after [`SNAPSHOT_AFTER`] applied
//!   changes, and when the service is dropped (clean shutdown). The periodic ones are written
//!   beside the worker: the read lock is held only to copy the index
//!   ([`LiveIndex::begin_snapshot`]), so catch-ups go on while the file is encoded and synced.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tideway_core::ids::WorkspaceId;
use tideway_core::segments::{FeedPosition, LiveIndex};
use tideway_core::store::{Store, StoreError};
use tokio::sync::{Notify, watch};

/// How often an idle worker catches up.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);
/// Longest a request waits for the index to cover the feed head it read on arrival.
pub const FRESH_WAIT: Duration = Duration::from_secs(1);
/// Longest a request waits for a workspace's first index (load or build) before a 503.
pub const FIRST_LOAD_WAIT: Duration = Duration::from_secs(25);
/// A snapshot is rewritten this often while the index changes...
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(300);
/// ... or once this many changes (attribute updates, appended events and purchases, cohort
/// deltas, removals, reloads) have been applied since the last one. It bounds the catch-up
/// after a crash (a clean shutdown writes a snapshot): about 10 µs a change on the test
/// machine, so ~10 s at worst; and each snapshot costs about a second of one core on 3 M
/// users, so under 100,000 objects/s of ingest one comes every ~10 s, not every second.
pub const SNAPSHOT_AFTER: u64 = 1_000_000;

const INDEX_LOADS: &str = "tideway_segment_index_loads_total";
const INDEX_BUILD_SECONDS: &str = "tideway_segment_index_build_seconds";
const CATCHUP_SECONDS: &str = "tideway_segment_catchup_seconds";
/// A catch-up's phases: reading the feed, waiting for the write lock, applying.
const CATCHUP_READ_SECONDS: &str = "tideway_segment_catchup_read_seconds";
const CATCHUP_LOCK_SECONDS: &str = "tideway_segment_catchup_lock_wait_seconds";
const CATCHUP_APPLY_SECONDS: &str = "tideway_segment_catchup_apply_seconds";
const CATCHUP_CHANGES: &str = "tideway_segment_catchup_changes";
/// How long requests wait for the index to cover the head they read.
const FRESH_WAIT_SECONDS: &str = "tideway_segment_fresh_wait_seconds";
/// How long taking a snapshot holds the index's read lock (a catch-up's apply waits for it).
const SNAPSHOT_LOCK_SECONDS: &str = "tideway_segment_snapshot_lock_seconds";
const CATCHUP_LAG_EVENTS: &str = "tideway_segment_catchup_lag_events";
const SNAPSHOT_AGE_SECONDS: &str = "tideway_segment_snapshot_age_seconds";
const SNAPSHOT_BYTES: &str = "tideway_segment_snapshot_bytes";

/// Whether `pos` includes everything up to `head`, in each of the feed's sequences.
fn covers(pos: FeedPosition, head: FeedPosition) -> bool {
    pos.event_seq >= head.event_seq
        && pos.cohort_change_seq >= head.cohort_change_seq
        && pos.user_change_seq >= head.user_change_seq
}

fn component_max(a: FeedPosition, b: FeedPosition) -> FeedPosition {
    FeedPosition {
        event_seq: a.event_seq.max(b.event_seq),
        cohort_change_seq: a.cohort_change_seq.max(b.cohort_change_seq),
        user_change_seq: a.user_change_seq.max(b.user_change_seq),
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

/// How a workspace's index came to be, counted per service (tests and logs read them).
#[derive(Debug, Default)]
pub struct IndexCounters {
    /// Indexes built from every profile (`Store::segment_profiles`).
    pub full_loads: AtomicU64,
    /// Indexes loaded from a snapshot file.
    pub snapshot_loads: AtomicU64,
    /// Snapshot files refused (damaged, another version, ahead of the store) and rebuilt.
    pub snapshots_discarded: AtomicU64,
    /// Snapshot files written.
    pub snapshots_written: AtomicU64,
}

/// What was last written to disk for a workspace.
#[derive(Debug)]
struct Persisted {
    position: Option<FeedPosition>,
    at: Instant,
    changes_since: u64,
}

/// One workspace: its index, the position published to waiting requests, and its worker's
/// bell.
struct Slot {
    workspace: WorkspaceId,
    index: RwLock<Option<LiveIndex>>,
    published: watch::Sender<Option<FeedPosition>>,
    wanted: Mutex<FeedPosition>,
    wake: Notify,
    persisted: Mutex<Persisted>,
    /// Held while the snapshot file is written (the worker and a shutdown may both try).
    writing: Mutex<()>,
    /// Whether a background snapshot write is under way (at most one is started at a time).
    persisting: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Slot {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<LiveIndex>> {
        self.index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<LiveIndex>> {
        self.index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn position(&self) -> Option<FeedPosition> {
        *self.published.borrow()
    }
}

/// The per-workspace indexes.
pub struct SegmentService {
    store: Arc<dyn Store>,
    snapshot_dir: Option<PathBuf>,
    slots: Mutex<HashMap<WorkspaceId, Arc<Slot>>>,
    counters: IndexCounters,
    /// The service itself, for the workers it starts (they hold it only while they work).
    me: Weak<SegmentService>,
}

impl SegmentService {
    /// A service that keeps each workspace's index in `<snapshot_dir>/<workspace>.snap`.
    pub fn with_snapshots(store: Arc<dyn Store>, snapshot_dir: Option<PathBuf>) -> Arc<Self> {
        Arc::new_cyclic(|me| SegmentService {
            store,
            snapshot_dir,
            slots: Mutex::new(HashMap::new()),
            counters: IndexCounters::default(),
            me: me.clone(),
        })
    }

    /// How the indexes came to be so far.
    #[cfg(test)]
    pub fn counters(&self) -> &IndexCounters {
        &self.counters
    }

    /// Starts (in the background) loading the index of every workspace that has segments, so
    /// the first request after a restart finds it ready. Needs a tokio runtime; without one it
    /// does nothing (indexes then load on first use).
    pub fn spawn_preload(service: &Arc<SegmentService>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(service);
        handle.spawn(async move {
            let Some(service) = weak.upgrade() else {
                return;
            };
            let workspaces = match service.store.list_workspaces().await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list workspaces to preload segment indexes");
                    return;
                }
            };
            for w in workspaces {
                match service.store.list_segments(w.id).await {
                    Ok(segments) if !segments.is_empty() => {
                        service.slot(w.id);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, workspace = w.id.0, "cannot list segments to preload")
                    }
                }
            }
        });
    }

    /// Whether the workspace's index exists (loaded or loading): a caller that only wants a
    /// count uses it rather than start a first load of every profile.
    pub fn has_index(&self, workspace: WorkspaceId) -> bool {
        lock(&self.slots).contains_key(&workspace)
    }

    /// The workspace's slot; the first call starts its worker.
    fn slot(&self, workspace: WorkspaceId) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get(&workspace) {
            return Arc::clone(slot);
        }
        let slot = Arc::new(Slot {
            workspace,
            index: RwLock::new(None),
            published: watch::Sender::new(None),
            wanted: Mutex::new(FeedPosition::default()),
            wake: Notify::new(),
            persisted: Mutex::new(Persisted {
                position: None,
                at: Instant::now(),
                changes_since: 0,
            }),
            writing: Mutex::new(()),
            persisting: AtomicBool::new(false),
        });
        slots.insert(workspace, Arc::clone(&slot));
        tokio::spawn(worker(self.me.clone(), Arc::clone(&slot)));
        slot
    }

    /// Runs `f` over the workspace's index once it covers everything the store acknowledged
    /// before this call (waiting at most [`FRESH_WAIT`] for that; then the index as it is).
    /// `f` runs on the blocking pool.
    pub async fn with_fresh<T, F>(&self, workspace: WorkspaceId, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&LiveIndex) -> T + Send + 'static,
    {
        let slot = self.slot(workspace);
        let head = self.store.segment_feed_head(workspace).await?;
        let mut rx = slot.published.subscribe();
        let fresh = |p: &Option<FeedPosition>| p.is_some_and(|p| covers(p, head));
        if !fresh(&rx.borrow()) {
            let waiting = Instant::now();
            {
                let mut wanted = lock(&slot.wanted);
                *wanted = component_max(*wanted, head);
            }
            slot.wake.notify_one();
            if tokio::time::timeout(FRESH_WAIT, rx.wait_for(fresh))
                .await
                .is_err()
                && rx.borrow().is_none()
            {
                // no index at all yet: a first load or build is running
                let loaded = tokio::time::timeout(FIRST_LOAD_WAIT, rx.wait_for(Option::is_some));
                if loaded.await.is_err() {
                    return Err(StoreError::Unavailable(
                        "the segment index of this workspace is still loading; retry shortly"
                            .into(),
                    ));
                }
            }
            metrics::histogram!(FRESH_WAIT_SECONDS).record(waiting.elapsed().as_secs_f64());
        }
        tokio::task::spawn_blocking(move || {
            let guard = slot.read();
            let live = guard
                .as_ref()
                .ok_or_else(|| StoreError::Unavailable("segment index not loaded".into()))?;
            Ok(f(live))
        })
        .await
        .map_err(|e| unavailable("segment evaluation failed", e))?
    }

    fn snapshot_path(&self, workspace: WorkspaceId) -> Option<PathBuf> {
        self.snapshot_dir
            .as_ref()
            .map(|d| d.join(format!("{}.snap", workspace.0)))
    }

    /// One step of a workspace's worker: the first load, else a catch-up; then a snapshot if
    /// one is due.
    async fn step(&self, slot: &Arc<Slot>) -> Result<(), StoreError> {
        if slot.position().is_none() {
            self.first_load(slot).await?;
        }
        self.catch_up(slot).await?;
        let due = {
            let p = lock(&slot.persisted);
            p.changes_since >= SNAPSHOT_AFTER
                || (p.changes_since > 0 && p.at.elapsed() >= SNAPSHOT_EVERY)
        };
        if due {
            self.persist_in_background(slot);
        }
        if let Some(age) = self.snapshot_dir.as_ref().map(|_| lock(&slot.persisted).at) {
            metrics::gauge!(SNAPSHOT_AGE_SECONDS, "workspace" => slot.workspace.0.to_string())
                .set(age.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Loads the snapshot, or builds from every profile (and then writes a snapshot).
    async fn first_load(&self, slot: &Arc<Slot>) -> Result<(), StoreError> {
        let started = Instant::now();
        let workspace = slot.workspace;
        if let Some(path) = self.snapshot_path(workspace) {
            let read = tokio::task::spawn_blocking(move || read_snapshot(&path))
                .await
                .map_err(|e| unavailable("segment snapshot load failed", e))?;
            if read.is_err() {
                self.counters
                    .snapshots_discarded
                    .fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(Some((live, bytes))) = read {
                // a snapshot ahead of the store belongs to another database: rebuild
                let head = self.store.segment_feed_head(workspace).await?;
                if covers(head, live.position()) {
                    let position = live.position();
                    *slot.write() = Some(live);
                    *lock(&slot.persisted) = Persisted {
                        position: Some(position),
                        at: Instant::now(),
                        changes_since: 0,
                    };
                    // Counted before it is published: whoever is answered from it sees the
                    // count that says where it came from.
                    self.counters.snapshot_loads.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(INDEX_LOADS, "source" => "snapshot").increment(1);
                    metrics::histogram!(INDEX_BUILD_SECONDS, "source" => "snapshot")
                        .record(started.elapsed().as_secs_f64());
                    slot.published.send_replace(Some(position));
                    tracing::info!(
                        workspace = workspace.0,
                        bytes,
                        ms = started.elapsed().as_millis() as u64,
                        "segment index loaded from its snapshot"
                    );
                    return Ok(());
                }
                self.counters
                    .snapshots_discarded
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    workspace = workspace.0,
                    "segment index snapshot is ahead of the store (another database?); rebuilding"
                );
            }
        }
        let snapshot = self.store.segment_profiles(workspace).await?;
        let live = tokio::task::spawn_blocking(move || LiveIndex::from_snapshot(snapshot))
            .await
            .map_err(|e| unavailable("segment index build failed", e))?;
        let position = live.position();
        *slot.write() = Some(live);
        self.counters.full_loads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(INDEX_LOADS, "source" => "store").increment(1);
        metrics::histogram!(INDEX_BUILD_SECONDS, "source" => "store")
            .record(started.elapsed().as_secs_f64());
        slot.published.send_replace(Some(position));
        tracing::info!(
            workspace = workspace.0,
            ms = started.elapsed().as_millis() as u64,
            "segment index built from every profile"
        );
        self.persist(slot).await;
        Ok(())
    }

    /// Reads the changes after the published position (no lock held) and applies them.
    async fn catch_up(&self, slot: &Arc<Slot>) -> Result<(), StoreError> {
        let Some(from) = slot.position() else {
            return Ok(());
        };
        let started = Instant::now();
        let changes = self
            .store
            .segment_profile_changes(slot.workspace, from)
            .await?;
        metrics::histogram!(CATCHUP_READ_SECONDS).record(started.elapsed().as_secs_f64());
        let applied = changes.len() as u64;
        metrics::histogram!(CATCHUP_CHANGES).record(applied as f64);
        let position = changes.position;
        if position != from {
            let s = Arc::clone(slot);
            tokio::task::spawn_blocking(move || {
                let asked = Instant::now();
                let mut guard = s.write();
                let locked = Instant::now();
                if let Some(live) = guard.as_mut() {
                    live.apply(&changes);
                }
                drop(guard);
                metrics::histogram!(CATCHUP_LOCK_SECONDS).record((locked - asked).as_secs_f64());
                metrics::histogram!(CATCHUP_APPLY_SECONDS).record(locked.elapsed().as_secs_f64());
            })
            .await
            .map_err(|e| unavailable("segment index catch-up failed", e))?;
            lock(&slot.persisted).changes_since += applied.max(1);
        }
        slot.published.send_replace(Some(position));
        let wanted = *lock(&slot.wanted);
        metrics::histogram!(CATCHUP_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::gauge!(CATCHUP_LAG_EVENTS, "workspace" => slot.workspace.0.to_string())
            .set((wanted.event_seq - position.event_seq).max(0) as f64);
        Ok(())
    }

    /// Writes the workspace's snapshot if there is a snapshot directory and anything new.
    async fn persist(&self, slot: &Arc<Slot>) {
        let Some(path) = self.snapshot_path(slot.workspace) else {
            return;
        };
        let s = Arc::clone(slot);
        let written = tokio::task::spawn_blocking(move || write_slot(&s, &path)).await;
        match written {
            Ok(Ok(_)) => {
                self.counters
                    .snapshots_written
                    .fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, workspace = slot.workspace.0, "cannot write the segment index snapshot")
            }
            Err(e) => {
                tracing::warn!(error = %e, workspace = slot.workspace.0, "segment snapshot task failed")
            }
        }
    }

    /// Starts writing the workspace's snapshot on the blocking pool, unless a write is already
    /// under way, and returns at once: the worker goes on catching up while the file is
    /// encoded and synced (seconds on millions of users), so a due snapshot never holds up
    /// freshness longer than [`LiveIndex::begin_snapshot`] holds the read lock.
    fn persist_in_background(&self, slot: &Arc<Slot>) {
        let Some(path) = self.snapshot_path(slot.workspace) else {
            return;
        };
        if slot.persisting.swap(true, Ordering::AcqRel) {
            return;
        }
        let s = Arc::clone(slot);
        let me = self.me.clone();
        tokio::task::spawn_blocking(move || {
            let written = write_slot(&s, &path);
            s.persisting.store(false, Ordering::Release);
            match written {
                Ok(true) => {
                    if let Some(service) = me.upgrade() {
                        service
                            .counters
                            .snapshots_written
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, workspace = s.workspace.0, "cannot write the segment index snapshot")
                }
            }
        });
    }

    /// Writes every index whose snapshot is behind it (what a clean shutdown does).
    pub fn persist_all(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        for slot in slots {
            let Some(path) = self.snapshot_path(slot.workspace) else {
                return;
            };
            match write_slot(&slot, &path) {
                Ok(true) => {
                    self.counters
                        .snapshots_written
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, workspace = slot.workspace.0, "cannot write the segment index snapshot")
                }
            }
        }
    }
}

impl Drop for SegmentService {
    fn drop(&mut self) {
        self.persist_all();
    }
}

/// A workspace's worker: steps, then waits for a request's bell or the refresh period. It holds
/// the service only while it steps, so dropping the service ends it.
async fn worker(service: Weak<SegmentService>, slot: Arc<Slot>) {
    // Steps that failed in a row (the database away): the worker then waits longer each
    // time, up to a few seconds, deaf to requests' bells, and warns once per outage.
    let mut failures: u32 = 0;
    loop {
        let ok = {
            let Some(service) = service.upgrade() else {
                return;
            };
            match service.step(&slot).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(
                            failures,
                            workspace = slot.workspace.0,
                            "segment index catch-up works again"
                        );
                    }
                    failures = 0;
                    true
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(error = %e, workspace = slot.workspace.0, "segment index catch-up failed; retrying, less often while it fails");
                    } else {
                        tracing::debug!(error = %e, failures, workspace = slot.workspace.0, "segment index catch-up failed again");
                    }
                    false
                }
            }
        };
        if !ok {
            tokio::time::sleep(tideway_messaging::engine::retry_wait(
                REFRESH_EVERY,
                failures,
            ))
            .await;
            continue;
        }
        let behind = !slot
            .position()
            .is_some_and(|p| covers(p, *lock(&slot.wanted)));
        if behind {
            continue;
        }
        tokio::select! {
            () = slot.wake.notified() => {}
            () = tokio::time::sleep(REFRESH_EVERY) => {}
        }
    }
}

/// Writes the slot's index to `path` if it is ahead of what was last written; whether it
/// wrote. Only copying the index holds the read lock (evaluations go on; a catch-up's apply
/// waits that long); encoding and syncing the file do not.
fn write_slot(slot: &Slot, path: &Path) -> std::io::Result<bool> {
    let _writing = lock(&slot.writing);
    let (pending, counted) = {
        let guard = slot.read();
        let Some(live) = guard.as_ref() else {
            return Ok(false);
        };
        if lock(&slot.persisted).position == Some(live.position()) {
            return Ok(false);
        }
        let started = Instant::now();
        let pending = live.begin_snapshot();
        metrics::histogram!(SNAPSHOT_LOCK_SECONDS).record(started.elapsed().as_secs_f64());
        (pending, lock(&slot.persisted).changes_since)
    };
    // encoded without the lock: catch-ups apply meanwhile
    let position = pending.position();
    let bytes = pending.finish();
    write_atomically(path, &bytes)?;
    {
        // changes applied while the file was written count towards the next one
        let mut p = lock(&slot.persisted);
        let changes_since = p.changes_since.saturating_sub(counted);
        *p = Persisted {
            position: Some(position),
            at: Instant::now(),
            changes_since,
        };
    }
    metrics::gauge!(SNAPSHOT_BYTES, "workspace" => slot.workspace.0.to_string())
        .set(bytes.len() as f64);
    Ok(true)
}

/// Temp file (mode 0600), fsync, rename over `path`, fsync the directory: a crash leaves the
/// old snapshot or the new one, never a torn one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let tmp = path.with_extension("snap.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// The snapshot at `path` and its size (`Ok(None)`: there is none); `Err` when there was one
/// and it was unreadable, damaged or of another version: it is removed with a warning and the
/// caller rebuilds.
#[allow(clippy::result_unit_err)]
fn read_snapshot(path: &Path) -> Result<Option<(LiveIndex, usize)>, ()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot read the segment index snapshot; rebuilding");
            return Err(());
        }
    };
    match LiveIndex::from_snapshot_bytes(&bytes) {
        Ok(live) => Ok(Some((live, bytes.len()))),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "discarding the segment index snapshot; rebuilding");
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(error = %e, path = %path.display(), "cannot remove the damaged snapshot");
            }
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tideway_core::clock::Millis;
    use tideway_core::segments::Segment;
    use tideway_core::services::Services;
    use tideway_core::store::Workspace;
    use tideway_core::track::parse_track;
    use tideway_segment::{Filter, NoSegments};
    use tideway_store::sqlite::{SqliteOptions, SqliteStore};

    use super::*;

    const NOW: Millis = Millis(1_700_000_000_000);

    async fn store(dir: &Path) -> (Arc<dyn Store>, Workspace) {
        let store = SqliteStore::open(&dir.join("db.sqlite"), SqliteOptions::default()).unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        let ws = store.create_workspace("w", NOW).await.unwrap();
        store
            .create_segment(
                ws.id,
                Segment {
                    id: "s".into(),
                    name: "pro".into(),
                    filter: pro().to_json(),
                    created_at: NOW,
                    updated_at: NOW,
                },
            )
            .await
            .unwrap();
        (store, ws)
    }

    /// Users `from..to`, every other one on the pro plan.
    async fn track(store: &Arc<dyn Store>, ws: &Workspace, from: usize, to: usize) {
        for chunk in (from..to).collect::<Vec<_>>().chunks(75) {
            let attributes: Vec<_> = chunk
                .iter()
                .map(|i| json!({"external_id": format!("u{i}"), "plan": if i % 2 == 0 { "pro" } else { "free" }}))
                .collect();
            let body = json!({ "attributes": attributes });
            let request = parse_track(body.as_object().unwrap()).unwrap();
            store.track(ws, request, NOW).await.unwrap();
        }
    }

    fn pro() -> Filter {
        Filter::from_json(&json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}}))
            .unwrap()
    }

    async fn size(service: &SegmentService, ws: &Workspace) -> u64 {
        service
            .with_fresh(ws.id, |live| live.size(&pro(), 0, &NoSegments))
            .await
            .unwrap()
    }

    fn loads(service: &SegmentService) -> (u64, u64, u64) {
        let c = service.counters();
        (
            c.full_loads.load(Ordering::Relaxed),
            c.snapshot_loads.load(Ordering::Relaxed),
            c.snapshots_discarded.load(Ordering::Relaxed),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_restart_the_index_comes_from_its_snapshot_and_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = dir.path().join("segment-index");
        let (store, ws) = store(dir.path()).await;
        track(&store, &ws, 0, 400).await;

        let before = SegmentService::with_snapshots(Arc::clone(&store), Some(snapshots.clone()));
        assert_eq!(size(&before, &ws).await, 200);
        assert_eq!(
            loads(&before),
            (1, 0, 0),
            "the first index is built from the store"
        );
        // a clean shutdown writes what the index holds now
        before.persist_all();
        drop(before);
        let file = snapshots.join(format!("{}.snap", ws.id.0));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the snapshot is private");
        }

        // changes while the service is down: 50 more users, 25 of them pro
        track(&store, &ws, 400, 450).await;

        let after = SegmentService::with_snapshots(Arc::clone(&store), Some(snapshots.clone()));
        assert_eq!(
            size(&after, &ws).await,
            225,
            "snapshot plus the changes made while down"
        );
        assert_eq!(
            loads(&after),
            (0, 1, 0),
            "no full load from the store: the snapshot was loaded and caught up"
        );
        // read-your-writes still holds on the restored index
        track(&store, &ws, 450, 452).await;
        assert_eq!(size(&after, &ws).await, 226);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_snapshot_is_discarded_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let snapshots = dir.path().join("segment-index");
        let (store, ws) = store(dir.path()).await;
        track(&store, &ws, 0, 100).await;
        let first = SegmentService::with_snapshots(Arc::clone(&store), Some(snapshots.clone()));
        assert_eq!(size(&first, &ws).await, 50);
        first.persist_all();
        // The service is gone only when its worker lets go of it (after its current step), and
        // its drop and any background write still rewrite the snapshot: wait for all of that
        // before damaging the file, or a late good write would repair it.
        let slots: Vec<Arc<Slot>> = lock(&first.slots).values().cloned().collect();
        let gone = Arc::downgrade(&first);
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(20);
        while gone.strong_count() > 0 || slots.iter().any(|s| s.persisting.load(Ordering::Acquire))
        {
            assert!(Instant::now() < deadline, "the first service never stopped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let file = snapshots.join(format!("{}.snap", ws.id.0));
        let mut bytes = std::fs::read(&file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();

        let service = SegmentService::with_snapshots(Arc::clone(&store), Some(snapshots.clone()));
        assert_eq!(size(&service, &ws).await, 50);
        assert_eq!(
            loads(&service),
            (1, 0, 1),
            "discarded, then rebuilt from the store"
        );
        // the rebuild writes a good snapshot in its place
        service.persist_all();
        let rewritten = std::fs::read(&file).unwrap();
        assert_eq!(
            LiveIndex::from_snapshot_bytes(&rewritten).map(|l| l.len()),
            Ok(100)
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_evaluation_never_blocks_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let (store, a) = store(dir.path()).await;
        let b = store.create_workspace("b", NOW).await.unwrap();
        track(&store, &a, 0, 10).await;
        track(&store, &b, 0, 4).await;
        let service = SegmentService::with_snapshots(Arc::clone(&store), None);
        // A's evaluation holds its thread until B has been answered: on the one runtime thread
        // of this test, that only ends if evaluations run elsewhere
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let slow = service.with_fresh(a.id, move |_| {
            rx.recv_timeout(Duration::from_secs(20)).is_ok()
        });
        let quick = async {
            let n = service.with_fresh(b.id, |live| live.len()).await.unwrap();
            tx.send(()).unwrap();
            n
        };
        let (released, n) = tokio::join!(slow, quick);
        assert_eq!(n, 4);
        assert!(
            released.unwrap(),
            "B was answered while A's evaluation was running"
        );
    }
}
