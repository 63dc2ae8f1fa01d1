//! Units of domain work over PostgreSQL ([`UserStore`]), the user and cohort primitives they run
//! on ([`UserLookup`], [`UserTx`], [`CohortTx`] for `PgTx`), and the cohort reads
//! ([`CohortStore`]).
//!
//! **Group commit.** [`UserStore::run_unit`] queues the unit; a few batch workers
//! ([`WORKERS`]) each take the waiting units of one workspace (up to [`MAX_BATCH_UNITS`]) and
//! run them in one transaction on one connection, so many concurrent requests share one
//! commit and a few multi-row statements. A batch first runs optimistically, all units in one
//! transaction without savepoints; if anything fails it is rolled back and run again with a
//! SAVEPOINT per unit, so a failing unit fails alone while its neighbours commit. Every unit is
//! answered only after the commit.
//!
//! **The front of a workspace.** Looking users up locks them, unit after unit, so two batches
//! of one workspace doing it at once would lock users in different orders and deadlock (and
//! PostgreSQL takes a second to notice). So a batch runs its units holding the workspace's
//! *front*: in the process (one batch per workspace takes it; batches of other workspaces run
//! in parallel) and in the database (a session-level advisory lock, so the batches of every
//! node take turns). A batch that only changed existing users' profiles and created users by
//! locked keys (the ingest case; see "Key locks") gives the front up as soon as its units are
//! done, before it writes and commits: the next batch then looks users up while this one
//! writes, and sees what it would see after this one's commit, since it can reach those users
//! only by waiting for their row or key locks (see `PgTx::plain`). A batch that changed
//! identifiers, moved aliases or devices, or changed cohorts keeps the front until its commit.
//! Batches past their front wait only for batches
//! before them (counter locks), never after them, so nothing deadlocks.
//!
//! **Keyed batches.** A unit that named its users up front ([`UserStore::run_keyed_unit`]:
//! track requests) may run in a *keyed* batch, which holds the front shared with the other
//! keyed batches of its workspace (in the process and with `pg_advisory_lock_shared`), so
//! several of them look users up at once. It first locks every key its units named, found or
//! not, sorted, in one statement ([`PgTx::lock_named`]), then loads them: it waits only for
//! the keys of units already sent back [`MAX_DEFERRALS`] times, before it holds any lock, and
//! only tries the others; a unit whose key another transaction holds goes back to the queue
//! ([`lock_named`]). So keyed batches never wait for each other in a cycle over keys. One
//! user named by two different keys in two batches can make them wait for each other's rows;
//! PostgreSQL detects it (class 40) and the batch runs again alone, as does any keyed batch
//! that fails. A batch with any other unit takes the front alone, after the keyed ones leave.
//!
//! **Conflicts.** Write lookups lock the users they load (`FOR NO KEY UPDATE`: not the key,
//! so foreign-key checks of other writers do not wait), so no update is lost: the second
//! writer waits, then reads the first one's commit. A writer that does not take the front
//! (another version, a script) may still create the external id a unit creates: the unit's
//! insert breaks the unique index after that commit, and the unit is rolled back and run
//! again (it then finds the user). A deadlock or serialization failure (SQLSTATE class 40)
//! reruns the batch. Both are bounded ([`MAX_ATTEMPTS`], with a small jittered backoff), then
//! the error is the answer.
//!
//! **Synchronous primitives over an async client.** The traits are synchronous and
//! tokio-postgres is async: a batch runs on tokio's blocking pool and drives each statement
//! with [`Handle::block_on`]. To keep round trips few, `PgTx` keeps what the transaction has
//! loaded or written: users by seq (locked, so the cache is the truth for them) with indexes
//! from external id, braze id, alias, device and deprecated external id to seq, including
//! "no such user" answers. [`UserLookup::prefetch`] loads every user a request names with one
//! statement per key kind, all sent at once (pipelined). Saves, aliases, devices, deprecated
//! ids and cohort membership are buffered and written at the end with multi-row statements
//! (`unnest` of arrays; `INSERT … ON CONFLICT` for users), or earlier when a statement must
//! see them (a delete, a merge, a lookup by email or phone). Keyed statements are shaped so
//! that each key is one probe of a unique index whatever the planner's statistics say (see
//! the lookups' comment).
//!
//! **Sequences.** A new user's `seq` comes from a block the store reserved from the
//! workspace's `users` counter in a transaction of its own ([`SeqSource`]), so creating users
//! locks no counter: seqs are unique and never reused, with holes (a block's rest when a node
//! stops, creations rolled back). The event log, cohort membership changes and segment user
//! changes take their ranges last, just before the commit (their rows are buffered until
//! then), so their order is commit order. They are always taken in one order, so they never
//! deadlock against each other.
//!
//! **Key locks.** A write lookup by external id, alias or device that finds nobody locks the
//! key (a transaction-level advisory lock on a hash of workspace, kind and key, taken in one
//! sorted statement while the batch holds its front) and looks again ([`PgTx::lock_missing`]).
//! A batch that creates a user by such a key may therefore give up its front before it writes
//! and commits: a later batch looking for that key waits on the lock until the commit, then
//! finds the user. A user created with an email or phone, or by a key that was not locked,
//! keeps the front to the commit as before.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::Transaction;
use rustc_hash::{FxHashMap, FxHashSet};
use tideway_core::clock::Millis;
use tideway_core::cohorts::{CohortId, CohortKey, CohortTx};
use tideway_core::currents::CurrentsEvent;
use tideway_core::ids::{
    AliasLabel, AliasName, BrazeId, DeviceId, Email, ExternalId, Phone, UserAlias, UserSeq,
    WorkspaceId,
};
use tideway_core::profile::UserRecord;
use tideway_core::store::{
    CohortMember, CohortStore, CohortSummary, LockKey, Lookup, ReadWork, StoreError, StoreFuture,
    UnitOfWork, UserCohort, UserLookup, UserStore, UserTx, WorkOutput, Workspace,
};
use tideway_core::users::WriteCtx;
use tokio::runtime::Handle;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

use super::sequence::{Sequence, range_then, reserve};
use super::{PgPool, PgStore, pg_err};
use crate::ids::RandomIds;
use crate::profile_codec;

/// Batch workers per store. Each holds one connection while it runs a batch: batches of
/// different workspaces, or of one workspace once the one before has given up its front.
pub const WORKERS: usize = 3;

/// Most units of work in one batch (one transaction). A track request is about 75 objects, so
/// a full batch is a few thousand objects: enough to spread the commit, small enough that one
/// transaction's locks and statements stay short.
pub const MAX_BATCH_UNITS: usize = 64;

/// Units waiting or running before `run_unit` waits for room: backpressure, so a database
/// that falls behind holds callers instead of growing the queue without bound.
const QUEUE_UNITS: usize = 1024;

/// How many times a batch (or one unit) that hit a conflict or a deadlock is run before its
/// error is the answer.
pub const MAX_ATTEMPTS: u32 = 5;

/// The first retry waits about this long; each further one twice as long, with jitter.
const BACKOFF: Duration = Duration::from_millis(2);
/// How long a batch whose connection was lost with its commit in flight waits to learn from
/// another connection whether it committed (the old backend may still be finishing).
const AMBIGUOUS_COMMIT_WAIT: Duration = Duration::from_secs(2);

// --- The queue and its workers ---------------------------------------------------------------

/// One caller's unit of work, waiting for or in a batch.
struct Job {
    workspace: Workspace,
    now: Millis,
    work: UnitOfWork,
    /// Every user the work looks up, named up front ([`UserStore::run_keyed_unit`]).
    keys: Option<Vec<LockKey>>,
    /// Times a keyed batch sent it back to the queue (a key it named was busy).
    deferred: u32,
    /// Statements of another context run in the unit's transaction around its work.
    around: Option<Box<dyn AroundUnit>>,
    reply: oneshot::Sender<Result<WorkOutput, StoreError>>,
    /// Its place in the queue's bound, given back when the job is answered (dropped).
    _room: OwnedSemaphorePermit,
}

impl Job {
    /// True if the job may run in a keyed batch, beside other batches of its workspace: it
    /// named its users, not too many to lock, and runs no other context's statements.
    fn keyed(&self) -> bool {
        self.around.is_none()
            && self
                .keys
                .as_ref()
                .is_some_and(|keys| keys.len() <= MAX_KEY_LOCKS)
    }

    fn key_count(&self) -> usize {
        self.keys.as_ref().map_or(0, Vec::len)
    }
}

/// Another bounded context's writes that must commit with a unit of domain work, run in the
/// unit's transaction (its savepoint when the batch runs unit by unit): a Canvas settlement
/// whose journey ran a User Update step (`postgres::canvas`), so the update is applied exactly
/// when the journey moves past its step. Like the work, both steps may run more than once (a
/// rerun batch); only the last run commits.
pub(super) trait AroundUnit: Send {
    /// Before the work, with the workspace's front held: `false` skips the work and
    /// [`AroundUnit::after`], and the unit answers [`Skipped`].
    fn before(&mut self, rt: &Handle, tx: &Transaction<'_>) -> Result<bool, StoreError>;
    /// After the work, before the commit.
    fn after(&mut self, rt: &Handle, tx: &Transaction<'_>) -> Result<(), StoreError>;
}

/// The answer of a unit whose [`AroundUnit::before`] said not to run it.
pub(super) struct Skipped;

/// Runs `around.before`, then (unless it said no) the work and `around.after`, for one unit.
fn run_job(
    rt: &Handle,
    tx: &Transaction<'_>,
    ptx: &mut PgTx<'_, '_>,
    ctx: &mut WriteCtx<'_>,
    work: &mut UnitOfWork,
    mut around: Option<&mut (dyn AroundUnit + 'static)>,
) -> Result<WorkOutput, StoreError> {
    if let Some(around) = around.as_deref_mut()
        && !around.before(rt, tx).map_err(|e| ptx.fail_mapped(e))?
    {
        return Ok(Box::new(Skipped));
    }
    let out = work(ptx, ctx)?;
    if let Some(around) = around {
        around.after(rt, tx).map_err(|e| ptx.fail_mapped(e))?;
    }
    Ok(out)
}

/// The group-commit queue of a [`PgStore`]: cheap to clone; the workers stop once the last
/// clone is dropped.
#[derive(Clone)]
pub(super) struct Units {
    queue: Arc<Queue>,
    _open: Arc<Open>,
}

impl Default for Units {
    fn default() -> Self {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            wake: Notify::new(),
            front_free: Condvar::new(),
            room: Arc::new(Semaphore::new(QUEUE_UNITS)),
            seq_blocks: SeqBlocks::default(),
        });
        Units {
            _open: Arc::new(Open(Arc::clone(&queue))),
            queue,
        }
    }
}

impl std::fmt::Debug for Units {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.queue.lock().jobs.len();
        f.debug_struct("Units").field("waiting", &waiting).finish()
    }
}

/// Closes the queue when the last store clone lets go of it.
struct Open(Arc<Queue>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_waiters();
    }
}

struct Queue {
    state: Mutex<QueueState>,
    /// Woken when a job arrives, a workspace's front is released, or the queue closes.
    wake: Notify,
    /// The same, for a batch waiting on its blocking thread to take its front back.
    front_free: Condvar,
    room: Arc<Semaphore>,
    /// Users' seqs reserved ahead, per workspace ([`SeqSource`]).
    seq_blocks: SeqBlocks,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// Workspaces whose *front* is held: batches are running units of work there (looking
    /// users up and locking them). Either one batch at a time, which may lock users in any
    /// order, or several keyed batches side by side, each having locked its named users in
    /// one sorted statement first; batches past their front (writing and committing) may be
    /// several either way.
    fronts: FxHashMap<i64, Holders>,
    /// Batches waiting to take a workspace's front back (to run again): no new batch of that
    /// workspace starts before them.
    returning: FxHashMap<i64, usize>,
    closed: bool,
    /// Worker tasks alive. They live on the runtime of the call that started them; if that
    /// runtime is gone, the next call starts new ones on its own.
    workers: usize,
}

/// Who holds a workspace's front: keyed batches (shared) or one batch alone.
#[derive(Debug, Clone, Copy)]
enum Holders {
    Keyed(usize),
    Alone,
}

enum Take {
    /// A batch, and whether it is keyed (holds the front shared).
    Batch(Vec<Job>, bool),
    Wait,
    Closed,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // The state stays consistent under every operation (no panics while it is held).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The oldest waiting job whose workspace's front it can take, with jobs of the same
    /// workspace queued after it; the front is taken. A keyed job joins the keyed batches
    /// running there and takes the keyed jobs behind it (up to the first one that is not, so
    /// that one is next and no keyed batch overtakes it); any other waits for the front to
    /// be free and takes every job of its workspace. A workspace's jobs start in their order.
    fn take(&self) -> Take {
        let mut state = self.lock();
        let mut blocked = FxHashSet::default();
        let mut found = None;
        for job in &state.jobs {
            let ws = job.workspace.id.0;
            if blocked.contains(&ws) {
                continue;
            }
            let keyed = job.keyed();
            let free = !state.returning.contains_key(&ws)
                && match state.fronts.get(&ws) {
                    None => true,
                    Some(Holders::Keyed(_)) => keyed,
                    Some(Holders::Alone) => false,
                };
            if free {
                found = Some((ws, keyed));
                break;
            }
            blocked.insert(ws);
        }
        let Some((ws, keyed)) = found else {
            return if state.closed && state.jobs.is_empty() {
                Take::Closed
            } else {
                Take::Wait
            };
        };
        let mut batch = Vec::new();
        let mut keys = 0;
        let mut open = true;
        let mut rest = VecDeque::with_capacity(state.jobs.len());
        for job in state.jobs.drain(..) {
            if open && job.workspace.id.0 == ws {
                let fits = batch.len() < MAX_BATCH_UNITS
                    && (!keyed
                        || (job.keyed()
                            && (batch.is_empty() || keys + job.key_count() <= MAX_KEY_LOCKS)));
                if fits {
                    keys += job.key_count();
                    batch.push(job);
                    continue;
                }
                open = false;
            }
            rest.push_back(job);
        }
        state.jobs = rest;
        let holders = match (state.fronts.get(&ws), keyed) {
            (Some(Holders::Keyed(n)), true) => Holders::Keyed(n + 1),
            (_, true) => Holders::Keyed(1),
            (_, false) => Holders::Alone,
        };
        state.fronts.insert(ws, holders);
        Take::Batch(batch, keyed)
    }

    fn release_front(&self, ws: i64) {
        {
            let mut state = self.lock();
            match state.fronts.get(&ws) {
                Some(Holders::Keyed(n)) if *n > 1 => {
                    let left = Holders::Keyed(n - 1);
                    state.fronts.insert(ws, left);
                }
                _ => {
                    state.fronts.remove(&ws);
                }
            }
        }
        self.wake.notify_waiters();
        self.front_free.notify_all();
    }

    /// Puts jobs back at the head of the queue, in their order: units of a keyed batch that
    /// named a key another batch holds ([`lock_named`]).
    fn requeue(&self, jobs: Vec<Job>) {
        {
            let mut state = self.lock();
            for job in jobs.into_iter().rev() {
                state.jobs.push_front(job);
            }
        }
        self.wake.notify_waiters();
    }

    /// Waits (on a blocking thread) until the workspace's front is free, and takes it alone.
    fn take_front_back(&self, ws: i64) {
        let mut state = self.lock();
        *state.returning.entry(ws).or_default() += 1;
        while state.fronts.contains_key(&ws) {
            state = self
                .front_free
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.fronts.insert(ws, Holders::Alone);
        if let Some(n) = state.returning.get_mut(&ws) {
            *n -= 1;
            if *n == 0 {
                state.returning.remove(&ws);
            }
        }
    }
}

/// A batch's hold on its workspace's front, given back when dropped (also when a unit
/// panics).
struct Front {
    queue: Arc<Queue>,
    ws: i64,
    held: bool,
    /// Held beside other keyed batches (the batch locks its named users first).
    keyed: bool,
}

impl Front {
    /// Lets the next batch of the workspace start: this one will lock no more users.
    fn release(&mut self) {
        if self.held {
            self.held = false;
            self.queue.release_front(self.ws);
        }
    }

    /// Takes the front back, alone, before running the batch again: a keyed batch that
    /// failed (a deadlock over users named by two keys, say) runs again the old way, one
    /// batch at a time, which cannot deadlock over its lookups.
    fn retake(&mut self) {
        if self.held && !self.keyed {
            return;
        }
        self.release();
        self.queue.take_front_back(self.ws);
        self.held = true;
        self.keyed = false;
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.release();
    }
}

/// Counts a live worker task; dropped with the task (also when its runtime shuts down).
struct Alive(Arc<Queue>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.lock().workers -= 1;
    }
}

/// Takes batches off the queue and runs each on the blocking pool, until the queue closes.
async fn worker(alive: Alive, pool: PgPool, max_array_len: usize) {
    let queue = Arc::clone(&alive.0);
    let mut ids = Some(RandomIds::default());
    loop {
        let notified = queue.wake.notified();
        tokio::pin!(notified);
        // Registered before looking, so a wake between the look and the wait is not lost.
        notified.as_mut().enable();
        let (batch, keyed) = match queue.take() {
            Take::Batch(batch, keyed) => (batch, keyed),
            Take::Wait => {
                notified.await;
                continue;
            }
            Take::Closed => return,
        };
        let front = Front {
            queue: Arc::clone(&queue),
            ws: batch[0].workspace.id.0,
            held: true,
            keyed,
        };
        let rt = Handle::current();
        let pool = pool.clone();
        let mut worker_ids = ids.take().unwrap_or_default();
        let ran = tokio::task::spawn_blocking(move || {
            let mut env = BatchEnv {
                rt: &rt,
                pool: &pool,
                ids: &mut worker_ids,
                max_array_len,
                front,
                front_from: std::time::Instant::now(),
            };
            run_batch(&mut env, batch);
            worker_ids
        })
        .await;
        match ran {
            Ok(returned) => ids = Some(returned),
            // A unit panicked: its batch was dropped, so each caller gets "stopped before
            // answering" (Unavailable); the transaction was rolled back with its connection.
            Err(e) => tracing::error!(error = %e, "a PostgreSQL batch did not finish"),
        }
    }
}

impl PgStore {
    /// [`UserStore::run_unit`] with another context's writes in the same transaction
    /// ([`AroundUnit`]); the work's output, or [`Skipped`].
    pub(super) async fn run_unit_around(
        &self,
        workspace: &Workspace,
        now: Millis,
        work: UnitOfWork,
        around: Box<dyn AroundUnit>,
    ) -> Result<WorkOutput, StoreError> {
        self.queue_unit(workspace.clone(), now, work, None, Some(around))
            .await
    }

    async fn queue_unit(
        &self,
        workspace: Workspace,
        now: Millis,
        work: UnitOfWork,
        keys: Option<Vec<LockKey>>,
        around: Option<Box<dyn AroundUnit>>,
    ) -> Result<WorkOutput, StoreError> {
        let queue = &self.units.queue;
        let room = Arc::clone(&queue.room)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("the PostgreSQL writer has stopped".into()))?;
        let (reply, answer) = oneshot::channel();
        {
            let mut state = queue.lock();
            while state.workers < WORKERS {
                state.workers += 1;
                tokio::spawn(worker(
                    Alive(Arc::clone(queue)),
                    self.pool.clone(),
                    self.options.max_array_len,
                ));
            }
            state.jobs.push_back(Job {
                workspace,
                now,
                work,
                keys,
                deferred: 0,
                around,
                reply,
                _room: room,
            });
        }
        queue.wake.notify_waiters();
        answer.await.map_err(|_| {
            StoreError::Unavailable("the PostgreSQL writer stopped before answering".into())
        })?
    }
}

impl UserStore for PgStore {
    fn run_unit(
        &self,
        workspace: &Workspace,
        now: Millis,
        work: UnitOfWork,
    ) -> StoreFuture<'_, WorkOutput> {
        Box::pin(self.queue_unit(workspace.clone(), now, work, None, None))
    }

    fn uses_keys(&self) -> bool {
        true
    }

    fn run_keyed_unit(
        &self,
        workspace: &Workspace,
        now: Millis,
        keys: Vec<LockKey>,
        work: UnitOfWork,
    ) -> StoreFuture<'_, WorkOutput> {
        Box::pin(self.queue_unit(workspace.clone(), now, work, Some(keys), None))
    }

    fn read_unit(&self, workspace: WorkspaceId, work: ReadWork) -> StoreFuture<'_, WorkOutput> {
        let pool = self.pool.clone();
        Box::pin(async move {
            let rt = Handle::current();
            tokio::task::spawn_blocking(move || {
                let mut client = rt.block_on(pool.client())?;
                // One snapshot for the whole read; it includes every commit acknowledged before.
                let tx = rt
                    .block_on(
                        client
                            .build_transaction()
                            .isolation_level(IsolationLevel::RepeatableRead)
                            .read_only(true)
                            .start(),
                    )
                    .map_err(pg_err)?;
                let mut reader = PgTx::new(&rt, &tx, workspace, Mode::Read, None);
                let out = work(&mut reader)?;
                drop(reader);
                rt.block_on(tx.commit()).map_err(pg_err)?;
                Ok(out)
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("the read did not finish: {e}")))?
        })
    }
}

// --- Running a batch -------------------------------------------------------------------------

/// What a batch runs with on its blocking thread.
struct BatchEnv<'a> {
    rt: &'a Handle,
    pool: &'a PgPool,
    ids: &'a mut RandomIds,
    max_array_len: usize,
    front: Front,
    /// When the pass began taking its front in the database (`tideway_store_front_seconds`).
    front_from: std::time::Instant,
}

impl<'a> BatchEnv<'a> {
    /// The store's queue (its seq blocks), held apart from `self` so that a transaction can
    /// take seqs while the batch goes on using `self`.
    fn queue(&self) -> Arc<Queue> {
        Arc::clone(&self.front.queue)
    }

    fn seq_source<'q>(&self, queue: &'q Queue) -> SeqSource<'q>
    where
        'a: 'q,
    {
        SeqSource {
            pool: self.pool,
            blocks: &queue.seq_blocks,
        }
    }
}

/// Why a transaction failed, as far as running it again is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// A unique index was broken by a row another transaction committed (two nodes created
    /// the same user): running the work again finds that row.
    Conflict,
    /// Deadlock or serialization failure (SQLSTATE class 40): nothing was done; run again.
    Transient,
    /// Anything else: the work's own error or a broken connection.
    Other,
    /// The commit was sent and its answer lost: it may have committed, so it is not run again.
    Ambiguous,
}

impl Failure {
    fn of(e: &tokio_postgres::Error) -> Failure {
        match e.code() {
            Some(code) if *code == SqlState::UNIQUE_VIOLATION => Failure::Conflict,
            Some(code) if code.code().starts_with("40") => Failure::Transient,
            _ => Failure::Other,
        }
    }

    /// The class of an error a helper already mapped (`sequence::allocate`): `pg_err` maps
    /// class 40 to `Unavailable` and a unique violation to `Conflict`.
    fn of_mapped(e: &StoreError) -> Failure {
        match e {
            StoreError::Conflict(_) => Failure::Conflict,
            StoreError::Unavailable(_) => Failure::Transient,
            _ => Failure::Other,
        }
    }

    fn retryable(self) -> bool {
        matches!(self, Failure::Conflict | Failure::Transient)
    }
}

/// The outcome of one pass over a batch.
enum Pass {
    /// Committed; each unit's own result (in the isolated pass a unit may have failed alone).
    Committed(Vec<Result<WorkOutput, StoreError>>),
    /// Nothing committed.
    Failed(StoreError, Failure),
}

/// Runs `jobs` (all of one workspace) and answers each: optimistically together, then, if that
/// fails, with a savepoint per unit; passes that hit a conflict or a deadlock are run again, a
/// bounded number of times.
fn run_batch(env: &mut BatchEnv<'_>, mut jobs: Vec<Job>) {
    let started = std::time::Instant::now();
    let mut isolate = false;
    let mut attempt = 1;
    let results = loop {
        let pass = if isolate {
            isolated(env, &mut jobs)
        } else {
            together(env, &mut jobs)
        };
        let (error, failure) = match pass {
            Pass::Committed(results) => {
                metrics::counter!("tideway_store_commits_total").increment(1);
                metrics::histogram!("tideway_store_commit_batch_jobs").record(jobs.len() as f64);
                metrics::histogram!("tideway_store_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                break results;
            }
            Pass::Failed(error, failure) => (error, failure),
        };
        let rerun = failure != Failure::Ambiguous
            && attempt < MAX_ATTEMPTS
            && (failure.retryable() || (jobs.len() > 1 && !isolate));
        if !rerun {
            if jobs.len() == 1 && failure == Failure::Other {
                // The unit's own error, answered to its caller.
                tracing::debug!(error = %error, "a unit of work failed");
            } else {
                tracing::warn!(error = %error, ?failure, units = jobs.len(), attempts = attempt, "a PostgreSQL batch failed");
            }
            break jobs.iter().map(|_| Err(error.clone())).collect();
        }
        metrics::counter!("tideway_store_batch_reruns_total").increment(1);
        if failure.retryable() {
            backoff(attempt);
        }
        env.front.retake();
        isolate = jobs.len() > 1;
        attempt += 1;
    };
    for (job, result) in jobs.into_iter().zip(results) {
        // A caller that gave up is no longer listening; nothing to do for it.
        let _ = job.reply.send(result);
    }
}

/// Sleeps before attempt `attempt + 1`: about [`BACKOFF`] × 2^(attempt - 1), jittered so two
/// nodes that collided do not collide again in step.
fn backoff(attempt: u32) {
    let base = BACKOFF.saturating_mul(1 << attempt.saturating_sub(1).min(5));
    let jitter = f64::from(getrandom::u32().unwrap_or(0)) / f64::from(u32::MAX);
    std::thread::sleep(base.mul_f64(0.5 + jitter));
}

/// A pooled connection and a transaction on it, or the failure.
fn begin<'c>(
    env: &BatchEnv<'_>,
    client: &'c mut deadpool_postgres::Client,
) -> Result<Transaction<'c>, (StoreError, Failure)> {
    env.rt
        .block_on(client.transaction())
        .map_err(|e| (pg_err(e), Failure::Other))
}

fn connect(env: &BatchEnv<'_>) -> Result<deadpool_postgres::Client, Pass> {
    env.rt
        .block_on(env.pool.client())
        .map_err(|e| Pass::Failed(e, Failure::Other))
}

/// Commits; a refusal from the server (nothing committed) is an ordinary failure, a lost
/// answer is [`Failure::Ambiguous`].
fn commit(env: &BatchEnv<'_>, tx: Transaction<'_>) -> Result<(), Pass> {
    env.rt.block_on(tx.commit()).map_err(|e| {
        let failure = if e.as_db_error().is_some() {
            Failure::of(&e)
        } else {
            Failure::Ambiguous
        };
        Pass::Failed(pg_err(e), failure)
    })
}

fn rollback(env: &BatchEnv<'_>, tx: Transaction<'_>) {
    // A failed rollback leaves nothing behind either: the connection is then broken and the
    // server ends the transaction with it.
    let _ = env.rt.block_on(tx.rollback());
}

/// Key class of the session-level advisory lock that is a workspace's front in the database
/// ("tdfr" in ASCII); the second key is the workspace.
const FRONT_LOCK_CLASS: i32 = 0x7464_6672;

/// A pooled connection for one pass over a batch, holding the workspace's front in the
/// database ([`DbFront`]). A pass that ends without releasing it (a unit panicked) takes the
/// connection out of the pool: closing it releases the lock.
struct Session {
    client: Option<deadpool_postgres::Client>,
    front: DbFront,
}

/// A workspace's front in the database: a session-level advisory lock, taken before the
/// transaction and released (with the in-process [`Front`]) once the batch will lock no more
/// users, or after it ends. So the batches of every node look the users of a workspace up one
/// at a time and never deadlock on user rows: two batches locking users unit by unit in
/// different orders would, and PostgreSQL takes a second (`deadlock_timeout`) to notice.
struct DbFront {
    key: i32,
    held: bool,
    /// Taken shared, beside other keyed batches ([`Front::keyed`]).
    keyed: bool,
}

impl DbFront {
    /// Releases it, in the transaction or after it, and the in-process front with it.
    fn release<C: tokio_postgres::GenericClient + Sync>(
        &mut self,
        env: &mut BatchEnv<'_>,
        on: &C,
    ) -> Result<(), tokio_postgres::Error> {
        if self.held {
            let unlock = if self.keyed {
                "SELECT pg_advisory_unlock_shared($1, $2)"
            } else {
                "SELECT pg_advisory_unlock($1, $2)"
            };
            env.rt
                .block_on(on.execute(unlock, &[&FRONT_LOCK_CLASS, &self.key]))?;
            self.held = false;
        }
        env.front.release();
        Ok(())
    }
}

impl Session {
    fn open(env: &BatchEnv<'_>, ws: WorkspaceId) -> Result<Session, Pass> {
        let client = connect(env)?;
        // Workspaces beyond 2^31 share keys with others: they only wait for each other more.
        let key = i32::try_from(ws.0.rem_euclid(i64::from(i32::MAX))).unwrap_or_default();
        let keyed = env.front.keyed;
        let lock = if keyed {
            "SELECT pg_advisory_lock_shared($1, $2)"
        } else {
            "SELECT pg_advisory_lock($1, $2)"
        };
        env.rt
            .block_on(client.execute(lock, &[&FRONT_LOCK_CLASS, &key]))
            .map_err(|e| Pass::Failed(pg_err(e), Failure::Other))?;
        Ok(Session {
            client: Some(client),
            front: DbFront {
                key,
                held: true,
                keyed,
            },
        })
    }

    /// After the transaction: releases the front if the pass still holds it, and gives the
    /// connection back.
    fn close(mut self, env: &mut BatchEnv<'_>) {
        if let Some(client) = self.client.take() {
            let plain: &tokio_postgres::Client = &client;
            if self.front.release(env, plain).is_err() {
                // Not returned to the pool with the lock held: dropped, the connection closes.
                drop(deadpool_postgres::Client::take(client));
                self.front.held = false;
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.front.held
            && let Some(client) = self.client.take()
        {
            drop(deadpool_postgres::Client::take(client));
        }
    }
}

fn no_connection() -> Pass {
    Pass::Failed(
        StoreError::Unavailable("the pass lost its connection".into()),
        Failure::Other,
    )
}

/// Every unit in one transaction, no savepoints; the first failure fails the pass.
fn together(env: &mut BatchEnv<'_>, jobs: &mut Vec<Job>) -> Pass {
    let ws = jobs[0].workspace.id;
    env.front_from = std::time::Instant::now();
    let mut session = match Session::open(env, ws) {
        Ok(s) => s,
        Err(pass) => return pass,
    };
    let pass = together_in(env, &mut session, jobs);
    session.close(env);
    pass
}

fn together_in(env: &mut BatchEnv<'_>, session: &mut Session, jobs: &mut Vec<Job>) -> Pass {
    let ws = jobs[0].workspace.id;
    let Some(client) = session.client.as_mut() else {
        return no_connection();
    };
    let tx = match begin(env, client) {
        Ok(tx) => tx,
        Err((e, f)) => return Pass::Failed(e, f),
    };
    let mut outputs = Vec::with_capacity(jobs.len());
    let mut failed = None;
    let mut logs = Logs::default();
    {
        let queue = env.queue();
        let mut ptx = PgTx::new(env.rt, &tx, ws, Mode::Write, Some(env.seq_source(&queue)));
        if session.front.keyed {
            match lock_named(&mut ptx, jobs) {
                Ok(deferred) if !deferred.is_empty() => {
                    metrics::counter!("tideway_store_keyed_units_deferred_total")
                        .increment(deferred.len() as u64);
                    queue.requeue(deferred);
                }
                Ok(_) => {}
                Err(e) => failed = Some((e, ptx.failure.unwrap_or(Failure::Other))),
            }
        }
        for job in jobs.iter_mut() {
            if failed.is_some() {
                break;
            }
            let mut ctx = WriteCtx {
                workspace: &job.workspace,
                now: job.now,
                ids: &mut *env.ids,
                max_array_len: env.max_array_len,
            };
            match run_job(
                env.rt,
                &tx,
                &mut ptx,
                &mut ctx,
                &mut job.work,
                job.around.as_deref_mut(),
            ) {
                Ok(out) => outputs.push(Ok(out)),
                Err(e) => {
                    failed = Some((e, ptx.failure.unwrap_or(Failure::Other)));
                    break;
                }
            }
        }
        let plain = failed.is_none() && ptx.plain();
        // How long batches of a workspace wait on each other: the front is the serial part
        // of ingest into one workspace (BENCHMARKS.md, ingest on PostgreSQL).
        let front = env.front_from.elapsed().as_secs_f64();
        metrics::histogram!("tideway_store_front_seconds").record(front);
        if !plain {
            metrics::counter!("tideway_store_front_kept_to_commit_total").increment(1);
        }
        tracing::debug!(
            units = jobs.len(),
            plain,
            front_ms = front * 1e3,
            "batch units done"
        );
        if plain {
            // Only writes and the commit are left, and they wait for nothing the next batch
            // holds: let it start looking users up.
            let on: &tokio_postgres::Transaction<'_> = &tx;
            if let Err(e) = session.front.release(env, on) {
                failed = Some((pg_err(e), Failure::Other));
            }
        }
        if failed.is_none() {
            match ptx.sync() {
                Ok(()) => logs = std::mem::take(&mut ptx.logs),
                Err(e) => failed = Some((e, ptx.failure.unwrap_or(Failure::Other))),
            }
        }
    }
    if let Some((e, failure)) = failed {
        rollback(env, tx);
        return Pass::Failed(e, failure);
    }
    let r = match logs.commit(env, tx, ws) {
        Ok(()) => Pass::Committed(outputs),
        Err(pass) => pass,
    };
    tracing::debug!(
        total_ms = env.front_from.elapsed().as_secs_f64() * 1e3,
        "batch committed"
    );
    r
}

/// Sent back this many times, a unit's keys are waited for: it cannot be overtaken for ever.
const MAX_DEFERRALS: u32 = 2;

/// Locks and loads what a keyed batch's units named ([`PgTx::lock_named`]) and takes out of
/// `jobs` the units that named a key another transaction holds, to be queued again. A unit
/// already sent back [`MAX_DEFERRALS`] times is waited for, before anything is held (so no
/// cycle of key waits can form); if every unit is sent back, the first is waited for next
/// time.
fn lock_named(ptx: &mut PgTx<'_, '_>, jobs: &mut Vec<Job>) -> Result<Vec<Job>, StoreError> {
    let keys = |waits: bool| -> Vec<&LockKey> {
        jobs.iter()
            .filter(|j| (j.deferred >= MAX_DEFERRALS) == waits)
            .flat_map(|j| j.keys.iter().flatten())
            .collect()
    };
    let (waited, tried) = (keys(true), keys(false));
    let busy = ptx.lock_named(&waited, &tried)?;
    if busy.is_empty() {
        let all: Vec<&LockKey> = jobs.iter().flat_map(|j| j.keys.iter().flatten()).collect();
        ptx.load_named(&all)?;
        return Ok(Vec::new());
    }
    let ws = ptx.ws.0;
    let blocked: Vec<bool> = jobs
        .iter()
        .map(|job| {
            job.deferred < MAX_DEFERRALS
                && job
                    .keys
                    .iter()
                    .flatten()
                    .any(|k| busy.contains(&lock_name(ws, k)))
        })
        .collect();
    if blocked.iter().all(|b| *b) {
        // Nothing can run: every unit goes back, the first to be waited for next time, by a
        // batch that holds no key yet (this one holds some: waiting now could close a cycle).
        if let Some(first) = jobs.first_mut() {
            first.deferred = MAX_DEFERRALS - 1;
        }
    }
    let mut deferred = Vec::new();
    let mut kept = Vec::with_capacity(jobs.len());
    for (job, blocked) in jobs.drain(..).zip(blocked) {
        if blocked {
            let mut job = job;
            job.deferred += 1;
            deferred.push(job);
        } else {
            kept.push(job);
        }
    }
    *jobs = kept;
    let kept: Vec<&LockKey> = jobs.iter().flat_map(|j| j.keys.iter().flatten()).collect();
    ptx.load_named(&kept)?;
    Ok(deferred)
}

/// Every unit in its own savepoint: a unit that fails is rolled back alone (after running it
/// again if it hit a conflict); a deadlock fails the pass.
fn isolated(env: &mut BatchEnv<'_>, jobs: &mut [Job]) -> Pass {
    let ws = jobs[0].workspace.id;
    let mut session = match Session::open(env, ws) {
        Ok(s) => s,
        Err(pass) => return pass,
    };
    let pass = isolated_in(env, &mut session, jobs);
    session.close(env);
    pass
}

fn isolated_in(env: &mut BatchEnv<'_>, session: &mut Session, jobs: &mut [Job]) -> Pass {
    let ws = jobs[0].workspace.id;
    let Some(client) = session.client.as_mut() else {
        return no_connection();
    };
    let tx = match begin(env, client) {
        Ok(tx) => tx,
        Err((e, f)) => return Pass::Failed(e, f),
    };
    let mut results = Vec::with_capacity(jobs.len());
    let mut logs = Logs::default();
    let mut failed = None;
    'jobs: for job in jobs.iter_mut() {
        let mut attempt = 1;
        loop {
            if let Err(e) = env.rt.block_on(tx.batch_execute("SAVEPOINT unit")) {
                failed = Some((pg_err(e), Failure::Other));
                break 'jobs;
            }
            let queue = env.queue();
            let mut ptx = PgTx::new(env.rt, &tx, ws, Mode::Write, Some(env.seq_source(&queue)));
            let mut ctx = WriteCtx {
                workspace: &job.workspace,
                now: job.now,
                ids: &mut *env.ids,
                max_array_len: env.max_array_len,
            };
            let ran = run_job(
                env.rt,
                &tx,
                &mut ptx,
                &mut ctx,
                &mut job.work,
                job.around.as_deref_mut(),
            )
            .and_then(|out| ptx.sync().map(|()| out));
            match ran {
                Ok(out) => {
                    let unit_logs = std::mem::take(&mut ptx.logs);
                    drop(ptx);
                    if let Err(e) = env.rt.block_on(tx.batch_execute("RELEASE SAVEPOINT unit")) {
                        failed = Some((pg_err(e), Failure::Other));
                        break 'jobs;
                    }
                    logs.append(unit_logs);
                    results.push(Ok(out));
                    break;
                }
                Err(e) => {
                    let failure = ptx.failure.unwrap_or(Failure::Other);
                    drop(ptx);
                    if let Err(undo) = env
                        .rt
                        .block_on(tx.batch_execute("ROLLBACK TO SAVEPOINT unit"))
                    {
                        failed = Some((pg_err(undo), Failure::Other));
                        break 'jobs;
                    }
                    match failure {
                        // The locks this transaction holds may be part of the cycle: the
                        // whole batch goes back and runs again.
                        Failure::Transient => {
                            failed = Some((e, failure));
                            break 'jobs;
                        }
                        // The row it collided with has committed; run the unit again, which
                        // now sees it.
                        Failure::Conflict if attempt < MAX_ATTEMPTS => {
                            attempt += 1;
                            backoff(attempt);
                        }
                        _ => {
                            results.push(Err(e));
                            break;
                        }
                    }
                }
            }
        }
    }
    if let Some((e, failure)) = failed {
        rollback(env, tx);
        return Pass::Failed(e, failure);
    }
    match logs.commit(env, tx, ws) {
        Ok(()) => Pass::Committed(results),
        Err(pass) => pass,
    }
}

// --- The transaction's logs ------------------------------------------------------------------

/// Rows of the three position-ordered logs a transaction wrote, inserted just before its
/// commit, after taking their ranges ([`Logs::write`]).
#[derive(Default)]
struct Logs {
    events: Vec<(Option<u32>, CurrentsEvent)>,
    /// `(cohort, user, entered, at)`.
    membership_changes: Vec<(i64, u32, bool, Millis)>,
    /// Users created or whose identifiers changed (the segment feed reloads them).
    user_changes: Vec<u32>,
}

impl Logs {
    fn append(&mut self, mut other: Logs) {
        self.events.append(&mut other.events);
        self.membership_changes
            .append(&mut other.membership_changes);
        self.user_changes.append(&mut other.user_changes);
    }

    /// Takes each log's range (in the fixed order event log, membership changes, user
    /// changes), inserts its rows and commits. Each log is one statement that takes its range
    /// and inserts ([`sequence::range_then`]), and the commit follows in the same round trip:
    /// each range's counter row stays locked until the commit, so from the first of these
    /// statements to the commit is the part of a batch no other batch of the workspace can
    /// overlap, and sent at once it runs in the database without waiting for this thread.
    ///
    /// tokio-postgres's `Transaction` ends only by its own `commit` or `rollback`, so the
    /// real commit is sent as `COMMIT; BEGIN` and the `Transaction` then commits that second,
    /// empty transaction. A statement that failed aborted the transaction, and its `COMMIT`
    /// then rolled back (PostgreSQL answers it without an error): the statement's error is
    /// the answer.
    fn commit(self, env: &BatchEnv<'_>, tx: Transaction<'_>, ws: WorkspaceId) -> Result<(), Pass> {
        if self.is_empty() {
            return commit(env, tx);
        }
        let count = |n: usize| {
            i64::try_from(n)
                .ok()
                .filter(|n| *n <= i64::from(u32::MAX))
                .ok_or_else(|| Pass::Failed(too_many("log rows"), Failure::Other))
        };
        let events = count(self.events.len())?;
        // One INSERT over arrays: measured faster here than a binary COPY of the same rows
        // (8.6 against 12 µs a row), whose writer flushes every 4 KB.
        let users: Vec<Option<i64>> = self.events.iter().map(|(u, _)| u.map(i64::from)).collect();
        let ids: Vec<&str> = self.events.iter().map(|(_, e)| e.id.0.as_str()).collect();
        let types: Vec<&str> = self
            .events
            .iter()
            .map(|(_, e)| e.event_type.as_str())
            .collect();
        let times: Vec<i64> = self.events.iter().map(|(_, e)| e.time).collect();
        let bodies: Vec<&str> = self.events.iter().map(|(_, e)| e.body.as_str()).collect();
        let changes = &self.membership_changes;
        let memberships = count(changes.len())?;
        let cohorts: Vec<i64> = changes.iter().map(|r| r.0).collect();
        let members: Vec<i64> = changes.iter().map(|r| i64::from(r.1)).collect();
        let entered: Vec<bool> = changes.iter().map(|r| r.2).collect();
        let at: Vec<i64> = changes.iter().map(|r| r.3.0).collect();
        // One row per user is enough: the feed reloads the user as they are.
        let mut seen = FxHashSet::default();
        let changed: Vec<i64> = self
            .user_changes
            .iter()
            .filter(|u| seen.insert(**u))
            .map(|u| i64::from(*u))
            .collect();
        let user_changes = count(changed.len())?;
        let event_params: &Params<'_> = &[&ws.0, &events, &users, &ids, &types, &times, &bodies];
        let membership_params: &Params<'_> =
            &[&ws.0, &memberships, &cohorts, &members, &entered, &at];
        let user_params: &Params<'_> = &[&ws.0, &user_changes, &changed];
        let sent = env.rt.block_on(async {
            // Prepared first, all of them: a statement still to prepare would send its
            // execution after one already prepared, and the counters must be taken in their
            // order (two transactions taking two of them in opposite orders deadlock).
            let (a, b, c, x) = tokio::join!(
                tx.prepare_cached(INSERT_EVENTS),
                tx.prepare_cached(INSERT_MEMBERSHIP_CHANGES),
                tx.prepare_cached(INSERT_USER_CHANGES),
                tx.prepare_cached("SELECT txid_current()"),
            );
            let (a, b, c, x) = (a?, b?, c?, x?);
            // Each is sent when first polled, in this order, the commit last. The
            // transaction's id comes back before the commit is even read, so a commit whose
            // answer is lost can be looked up (`transaction_committed`).
            let (a, b, c, xid, end) = tokio::join!(
                execute_unless(&tx, events == 0, &a, event_params),
                execute_unless(&tx, memberships == 0, &b, membership_params),
                execute_unless(&tx, user_changes == 0, &c, user_params),
                tx.query_one(&x, &[]),
                tx.batch_execute("COMMIT; BEGIN"),
            );
            a?;
            b?;
            c?;
            let xid = xid.ok().and_then(|row| row.try_get::<_, i64>(0).ok());
            Ok::<_, tokio_postgres::Error>((xid, end))
        });
        match sent {
            Err(e) => {
                // Refused by the server: rolled back, and the empty transaction after it ends
                // with the `Transaction`. Lost on the way: the commit after it may have run.
                let failure = if e.as_db_error().is_some() {
                    Failure::of(&e)
                } else {
                    Failure::Ambiguous
                };
                rollback(env, tx);
                Err(Pass::Failed(pg_err(e), failure))
            }
            Ok((xid, Err(e))) => {
                // A refusal from the server: nothing committed. No answer: the connection was
                // lost with the commit in flight, so ask another connection how the
                // transaction ended; committed is a success (answering 503 would have the
                // client write it twice), rolled back runs the batch again, not known stays
                // ambiguous (503). The `Transaction` is dropped (a ROLLBACK, answered or not).
                if e.as_db_error().is_some() {
                    let failure = Failure::of(&e);
                    return Err(Pass::Failed(pg_err(e), failure));
                }
                let outcome = xid.and_then(|xid| {
                    env.rt.block_on(super::transaction_committed(
                        env.pool,
                        xid,
                        AMBIGUOUS_COMMIT_WAIT,
                    ))
                });
                metrics::counter!("tideway_store_lost_commit_answers_total", "outcome" => match outcome {
                    Some(true) => "committed",
                    Some(false) => "rolled_back",
                    None => "unknown",
                })
                .increment(1);
                tracing::warn!(error = %e, committed = ?outcome, "the connection was lost with a commit in flight");
                match outcome {
                    Some(true) => Ok(()),
                    Some(false) => Err(Pass::Failed(pg_err(e), Failure::Transient)),
                    None => Err(Pass::Failed(pg_err(e), Failure::Ambiguous)),
                }
            }
            Ok((_, Ok(()))) => {
                // Committed. Ending the empty transaction can fail only with the connection,
                // which the pool then replaces.
                if let Err(e) = env.rt.block_on(tx.commit()) {
                    tracing::debug!(error = %e, "ending the empty transaction after a commit failed");
                }
                Ok(())
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.membership_changes.is_empty() && self.user_changes.is_empty()
    }
}

/// Event log rows, seqs taken from the workspace's counter in the same statement.
const INSERT_EVENTS: &str = concat!(
    range_then!("event_log"),
    "INSERT INTO event_log (workspace_id, seq, user_seq, event_id, event_type, time, body)
     SELECT $1, range.before + k.n, k.u, k.id, k.t, k.tm, k.b
     FROM range, unnest($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::text[])
       WITH ORDINALITY AS k(u, id, t, tm, b, n)"
);

const INSERT_MEMBERSHIP_CHANGES: &str = concat!(
    range_then!("cohort_membership_changes"),
    "INSERT INTO cohort_membership_changes (workspace_id, change_seq, cohort, seq, entered, at)
     SELECT $1, range.before + k.n, k.c, k.u, k.e, k.a
     FROM range, unnest($3::bigint[], $4::bigint[], $5::bool[], $6::bigint[])
       WITH ORDINALITY AS k(c, u, e, a, n)"
);

const INSERT_USER_CHANGES: &str = concat!(
    range_then!("segment_user_changes"),
    "INSERT INTO segment_user_changes (workspace_id, change_seq, seq)
     SELECT $1, range.before + k.n, k.u
     FROM range, unnest($3::bigint[]) WITH ORDINALITY AS k(u, n)"
);

async fn execute_unless(
    tx: &Transaction<'_>,
    skip: bool,
    statement: &tokio_postgres::Statement,
    params: &Params<'_>,
) -> Result<u64, tokio_postgres::Error> {
    if skip {
        return Ok(0);
    }
    tx.execute(statement, params).await
}

fn too_many(what: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "more {what} in one transaction than a counter can number"
    ))
}

// --- Statements ------------------------------------------------------------------------------

/// The columns a user is read from, in [`user_at`]'s order, for a `users u` in the statement
/// (a macro so statements are `concat!`ed at compile time and the statement cache keys on
/// fixed text).
macro_rules! user_columns {
    () => {
        "u.seq, u.braze_id, u.external_id, u.email, u.phone, u.created_at, u.updated_at, u.profile"
    };
}

/// A lookup statement in both modes, from a macro that takes the locking clause: writers
/// lock the users they read (`FOR NO KEY UPDATE`: the key never changes, so other writers'
/// foreign-key checks are not blocked), readers do not.
macro_rules! both_modes {
    ($statement:ident) => {
        Statement {
            write: $statement!(" FOR NO KEY UPDATE"),
            read: $statement!(""),
        }
    };
}

/// A statement's text for writers and for readers.
struct Statement {
    write: &'static str,
    read: &'static str,
}

// Keyed lookups are written as `unnest(keys) CROSS JOIN LATERAL (… LIMIT 1)`: one probe of a
// unique index per key, whatever the planner believes about the table. The plain form
// (`workspace_id = $1 AND key = ANY($2)`) lets it scan the whole workspace and filter when its
// statistics say the workspace is small — a fresh table, or a generic plan with a big
// workspace among many small ones — which was measured at 40 ms per 70 keys on 17k users.

/// The live user of the outer column `$seq`, as the LATERAL subquery `u`.
macro_rules! user_of_seq {
    ($seq:literal, $lock:literal) => {
        concat!(
            " CROSS JOIN LATERAL (SELECT ",
            user_columns!(),
            " FROM users u WHERE u.workspace_id = $1 AND u.seq = ",
            $seq,
            " AND u.deleted_at IS NULL LIMIT 1",
            $lock,
            ") u"
        )
    };
}

macro_rules! by_external {
    ($lock:literal) => {
        concat!(
            "SELECT ",
            user_columns!(),
            " FROM unnest($2::text[]) AS k(key) CROSS JOIN LATERAL (SELECT ",
            user_columns!(),
            " FROM users u WHERE u.workspace_id = $1 AND u.external_id = k.key LIMIT 1",
            $lock,
            ") u"
        )
    };
}
const BY_EXTERNAL: Statement = both_modes!(by_external);

macro_rules! by_braze {
    ($lock:literal) => {
        concat!(
            "SELECT ",
            user_columns!(),
            " FROM unnest($2::text[]) AS k(key) CROSS JOIN LATERAL (SELECT ",
            user_columns!(),
            " FROM users u WHERE u.workspace_id = $1 AND u.braze_id = k.key AND u.deleted_at IS NULL LIMIT 1",
            $lock,
            ") u"
        )
    };
}
const BY_BRAZE: Statement = both_modes!(by_braze);

macro_rules! by_seq {
    ($lock:literal) => {
        concat!(
            "SELECT ",
            user_columns!(),
            " FROM unnest($2::bigint[]) AS k(seq)",
            user_of_seq!("k.seq", $lock)
        )
    };
}
const BY_SEQ: Statement = both_modes!(by_seq);

macro_rules! by_deprecated {
    ($lock:literal) => {
        concat!(
            "SELECT k.key, ",
            user_columns!(),
            " FROM unnest($2::text[]) AS k(key) CROSS JOIN LATERAL (SELECT d.seq FROM deprecated_external_ids d
               WHERE d.workspace_id = $1 AND d.external_id = k.key LIMIT 1) d",
            user_of_seq!("d.seq", $lock)
        )
    };
}
const BY_DEPRECATED: Statement = both_modes!(by_deprecated);

macro_rules! by_device {
    ($lock:literal) => {
        concat!(
            "SELECT k.key, ",
            user_columns!(),
            " FROM unnest($2::text[]) AS k(key) CROSS JOIN LATERAL (SELECT d.seq FROM user_devices d
               WHERE d.workspace_id = $1 AND d.device_id = k.key LIMIT 1) d",
            user_of_seq!("d.seq", $lock)
        )
    };
}
const BY_DEVICE: Statement = both_modes!(by_device);

macro_rules! by_alias {
    ($lock:literal) => {
        concat!(
            "SELECT k.label, k.name, ",
            user_columns!(),
            " FROM unnest($2::text[], $3::text[]) AS k(label, name) CROSS JOIN LATERAL (SELECT a.seq FROM user_aliases a
               WHERE a.workspace_id = $1 AND a.label = k.label AND a.name = k.name LIMIT 1) a",
            user_of_seq!("a.seq", $lock)
        )
    };
}
const BY_ALIAS: Statement = both_modes!(by_alias);

// By email or phone: the index is on (workspace_id, email) and the value is one, so the probe
// is on the whole key.
macro_rules! by_email {
    ($lock:literal) => {
        concat!(
            "SELECT ",
            user_columns!(),
            " FROM users u WHERE u.workspace_id = $1 AND u.email = $2",
            $lock
        )
    };
}
const BY_EMAIL: Statement = both_modes!(by_email);

macro_rules! by_phone {
    ($lock:literal) => {
        concat!(
            "SELECT ",
            user_columns!(),
            " FROM users u WHERE u.workspace_id = $1 AND u.phone = $2",
            $lock
        )
    };
}
const BY_PHONE: Statement = both_modes!(by_phone);

type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Runs a statement (prepared once per connection) and returns its rows.
fn query(
    rt: &Handle,
    tx: &Transaction<'_>,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    rt.block_on(async {
        let stmt = tx.prepare_cached(sql).await?;
        tx.query(&stmt, params).await
    })
}

/// Runs a statement (prepared once per connection) and returns the rows it changed.
fn execute(
    rt: &Handle,
    tx: &Transaction<'_>,
    sql: &str,
    params: &Params<'_>,
) -> Result<u64, tokio_postgres::Error> {
    rt.block_on(async {
        let stmt = tx.prepare_cached(sql).await?;
        tx.execute(&stmt, params).await
    })
}

/// Runs a statement once per row of parameters, all sent before the first answer is awaited
/// (pipelined: one round trip); returns the rows changed in all. For deletes by a whole key,
/// which as one statement over an array could be planned as a scan of the workspace.
fn execute_each(
    rt: &Handle,
    tx: &Transaction<'_>,
    sql: &str,
    rows: &[Vec<&(dyn ToSql + Sync)>],
) -> Result<u64, tokio_postgres::Error> {
    rt.block_on(async {
        let stmt = tx.prepare_cached(sql).await?;
        let mut sent: Vec<_> = rows
            .iter()
            .map(|params| (Box::pin(tx.execute(&stmt, params)), None))
            .collect();
        // The first poll of each sends its request; answers come back in order.
        std::future::poll_fn(|cx| {
            for (future, out) in sent.iter_mut() {
                if let std::task::Poll::Ready(answer) = future.as_mut().poll(cx) {
                    *out = Some(answer);
                }
            }
            std::task::Poll::Ready(())
        })
        .await;
        let mut changed = 0;
        for (future, out) in sent {
            changed += match out {
                Some(answer) => answer?,
                None => future.await?,
            };
        }
        Ok(changed)
    })
}

/// `($1, $2)` parameter rows: the workspace and each key.
fn key_rows<'a>(ws: &'a i64, keys: &'a [&'a str]) -> Vec<Vec<&'a (dyn ToSql + Sync)>> {
    keys.iter()
        .map(|k| vec![ws as &(dyn ToSql + Sync), k as &(dyn ToSql + Sync)])
        .collect()
}

/// The rows of `sql`, or none without running it when `skip` (pipelined lookups: a kind of
/// key the request does not name).
async fn rows_unless(
    tx: &Transaction<'_>,
    skip: bool,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, tokio_postgres::Error> {
    if skip {
        return Ok(Vec::new());
    }
    let stmt = tx.prepare_cached(sql).await?;
    tx.query(&stmt, params).await
}

fn get<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r Row,
    at: usize,
) -> Result<T, StoreError> {
    row.try_get(at).map_err(pg_err)
}

fn seq_from(raw: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(raw).map_err(|_| StoreError::Corrupt(format!("{what} {raw} is not a user seq")))
}

fn parsed<T, E>(
    raw: String,
    what: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, StoreError> {
    parse(&raw).map_err(|_| StoreError::Corrupt(format!("{what} {raw:?}")))
}

fn parsed_opt<T, E>(
    raw: Option<String>,
    what: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<Option<T>, StoreError> {
    raw.map(|r| parsed(r, what, parse)).transpose()
}

/// A user from the eight columns starting at `at` ([`user_columns`]).
fn user_at(row: &Row, at: usize) -> Result<UserRecord, StoreError> {
    let profile: String = get(row, at + 7)?;
    Ok(UserRecord {
        seq: UserSeq(seq_from(get(row, at)?, "users.seq")?),
        braze_id: parsed(get(row, at + 1)?, "users.braze_id", BrazeId::parse)?,
        external_id: parsed_opt(get(row, at + 2)?, "users.external_id", ExternalId::parse)?,
        email: parsed_opt(get(row, at + 3)?, "users.email", Email::parse)?,
        phone: parsed_opt(get(row, at + 4)?, "users.phone", Phone::parse)?,
        created_at: Millis(get(row, at + 5)?),
        updated_at: Millis(get(row, at + 6)?),
        profile: profile_codec::decode(&profile)?,
    })
}

fn alias_at(row: &Row, at: usize) -> Result<UserAlias, StoreError> {
    Ok(UserAlias {
        label: parsed(get(row, at)?, "user_aliases.label", AliasLabel::parse)?,
        name: parsed(get(row, at + 1)?, "user_aliases.name", AliasName::parse)?,
    })
}

// --- The transaction -------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A unit of work: lookups lock, writes are buffered and flushed.
    Write,
    /// A read-only snapshot: no locks, no writes.
    Read,
}

/// The identifier columns of a user's row as the database has them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identifiers {
    external_id: Option<ExternalId>,
    email: Option<Email>,
    phone: Option<Phone>,
}

impl Identifiers {
    /// True if `user` still has these identifiers.
    fn match_user(&self, user: &UserRecord) -> bool {
        self.external_id == user.external_id && self.email == user.email && self.phone == user.phone
    }

    fn of(user: &UserRecord) -> Self {
        Identifiers {
            external_id: user.external_id.clone(),
            email: user.email.clone(),
            phone: user.phone.clone(),
        }
    }

    fn any(&self) -> bool {
        self.external_id.is_some() || self.email.is_some() || self.phone.is_some()
    }
}

/// What the database holds of a cached user.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stored {
    /// Created in this transaction and not inserted yet.
    New,
    /// A row with these identifiers.
    Row(Identifiers),
    /// Saved without having been loaded here: a row whose identifiers are not known.
    Unknown,
}

/// A user this transaction loaded (and, writing, locked) or created: the truth about them.
struct Cached {
    user: UserRecord,
    stored: Stored,
    /// Saved since it was last written.
    dirty: bool,
}

/// Which user an alias, device or deprecated external id belongs to (`None`: nobody), and
/// whether that differs from the database.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: Option<u32>,
    dirty: bool,
}

/// A user's membership of a cohort as this transaction knows it.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// The database has the row.
    stored: bool,
    /// A member (since then) or not.
    current: Option<Millis>,
    /// Set or removed here: the row is rewritten.
    touched: bool,
}

/// Users' seqs are handed out in blocks of this many, reserved from the workspace's `users`
/// counter in a transaction of their own. A node that stops leaves the rest of its block
/// unused: holes, which cost the segment index nothing (its bitmaps and columns are indexed by
/// seq, and a seq is never reused either way).
const USER_SEQ_BLOCK: u32 = 1000;

/// Most key locks one transaction takes ([`PgTx::lock_missing`]). Advisory locks live in
/// PostgreSQL's shared lock table (`max_locks_per_transaction` × connections, 6,400 slots by
/// default), so a few batches per node must stay well inside it.
const MAX_KEY_LOCKS: usize = 768;

/// Locks a set of keys in one order (sorted), so two transactions never wait for each other
/// in a cycle over them. The 64-bit key is a hash of the workspace, the kind and the key; a
/// collision only makes one lookup wait for an unrelated commit.
const LOCK_KEYS: &str = "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0)))
     FROM (SELECT DISTINCT k FROM unnest($1::text[]) AS k ORDER BY k) AS keys";

/// [`LOCK_KEYS`] without waiting: takes each key that is free and returns the keys another
/// transaction holds.
const TRY_LOCK_KEYS: &str =
    "SELECT k FROM (SELECT DISTINCT k FROM unnest($1::text[]) AS k ORDER BY k) AS keys
     WHERE NOT pg_try_advisory_xact_lock(hashtextextended(k, 0))";

/// The name a key of a keyed unit is locked by ([`key_lock_name`]).
fn lock_name(ws: i64, key: &LockKey) -> String {
    match key {
        LockKey::External(e) => key_lock_name(ws, 'e', e.as_str(), ""),
        LockKey::Alias(a) => key_lock_name(ws, 'a', a.label.as_str(), a.name.as_str()),
        LockKey::Braze(b) => key_lock_name(ws, 'b', b.as_str(), ""),
        LockKey::Device(d) => key_lock_name(ws, 'd', d.as_str(), ""),
    }
}

/// The text a key lock is hashed from: workspace, kind (`e`xternal id, `a`lias, `d`evice,
/// `b`raze id: only keyed batches lock those),
/// and the key (an alias's label length-prefixed, so that no label and name pair reads as
/// another; PostgreSQL text cannot hold a NUL separator).
fn key_lock_name(ws: i64, kind: char, key: &str, second: &str) -> String {
    format!("tideway-key:{ws}:{kind}:{}:{key}:{second}", key.len())
}

/// True if the transaction knows `key` belongs to nobody, as the database said (not changed
/// here since).
fn is_free<K: std::hash::Hash + Eq>(slots: &FxHashMap<K, Slot>, key: &K) -> bool {
    slots.get(key).is_some_and(|s| s.seq.is_none() && !s.dirty)
}

/// Keys a writing transaction found free and locked until its commit.
#[derive(Default)]
struct LockedKeys {
    externals: FxHashSet<ExternalId>,
    aliases: FxHashSet<UserAlias>,
    devices: FxHashSet<DeviceId>,
    count: usize,
}

/// Per workspace, the seqs reserved and not handed out yet: `next..end`.
#[derive(Default)]
struct SeqBlocks(Mutex<FxHashMap<i64, (u32, u32)>>);

/// Where a writing transaction takes new users' seqs: the store's blocks, refilled from the
/// workspace's counter on a pooled connection of its own (autocommit), so the counter's row
/// lock lasts one statement instead of the creating transaction.
#[derive(Clone, Copy)]
struct SeqSource<'a> {
    pool: &'a PgPool,
    blocks: &'a SeqBlocks,
}

impl SeqSource<'_> {
    fn take(&self, ws: i64) -> Option<u32> {
        let mut blocks = self.blocks.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (next, end) = blocks.get_mut(&ws)?;
        (*next < *end).then(|| {
            *next += 1;
            *next - 1
        })
    }

    async fn next(&self, ws: WorkspaceId) -> Result<u32, StoreError> {
        if let Some(seq) = self.take(ws.0) {
            return Ok(seq);
        }
        let client = self.pool.client().await?;
        let first = reserve(&client, ws, Sequence::Users, USER_SEQ_BLOCK).await?;
        let first = seq_from(first, "the users counter")?;
        let end = first
            .checked_add(USER_SEQ_BLOCK)
            .ok_or_else(|| too_many("users"))?;
        let mut blocks = self.blocks.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Another batch may have refilled meanwhile; its block's rest is given up (holes).
        blocks.insert(ws.0, (first + 1, end));
        Ok(first)
    }
}

#[derive(Default)]
struct Cache {
    users: FxHashMap<u32, Cached>,
    /// Deleted in this transaction.
    deleted: FxHashSet<u32>,
    /// Current external ids (`None`: no user has it now).
    by_external: FxHashMap<ExternalId, Option<u32>>,
    by_braze: FxHashMap<BrazeId, Option<u32>>,
    aliases: FxHashMap<UserAlias, Slot>,
    devices: FxHashMap<DeviceId, Slot>,
    deprecated: FxHashMap<ExternalId, Slot>,
    members: FxHashMap<(i64, u32), Member>,
    /// Member count changes per cohort: the sum and the latest time.
    counts: FxHashMap<i64, (i64, Millis)>,
}

impl Cache {
    /// Takes a user read from the database. A user already cached (or deleted here) keeps
    /// what this transaction knows; the row may be older than that.
    fn adopt(&mut self, user: UserRecord) -> u32 {
        let seq = user.seq.0;
        if self.deleted.contains(&seq) || self.users.contains_key(&seq) {
            return seq;
        }
        if let Some(ext) = &user.external_id {
            point(&mut self.by_external, &self.users, ext, seq);
        }
        point(&mut self.by_braze, &self.users, &user.braze_id, seq);
        self.users.insert(
            seq,
            Cached {
                stored: Stored::Row(Identifiers::of(&user)),
                user,
                dirty: false,
            },
        );
        seq
    }

    fn live(&self, seq: u32) -> Option<&UserRecord> {
        self.users.get(&seq).map(|c| &c.user)
    }

    /// Forgets every slot that points at `seq` (its rows were deleted).
    fn unpoint_slots(&mut self, seq: u32) {
        for slot in self
            .aliases
            .values_mut()
            .chain(self.devices.values_mut())
            .chain(self.deprecated.values_mut())
        {
            if slot.seq == Some(seq) {
                *slot = Slot {
                    seq: None,
                    dirty: false,
                };
            }
        }
    }
}

/// Points `key` at `seq` unless it points at another user this transaction holds (whose
/// state is the truth).
fn point<K: std::hash::Hash + Eq + Clone>(
    index: &mut FxHashMap<K, Option<u32>>,
    users: &FxHashMap<u32, Cached>,
    key: &K,
    seq: u32,
) {
    match index.get(key) {
        Some(Some(other)) if *other != seq && users.contains_key(other) => {}
        Some(Some(other)) if *other == seq => {}
        _ => {
            index.insert(key.clone(), Some(seq));
        }
    }
}

/// Records `seq` for `key` unless the transaction already knows the key's owner.
fn learn<K: std::hash::Hash + Eq + Clone>(
    slots: &mut FxHashMap<K, Slot>,
    key: &K,
    seq: Option<u32>,
) {
    if !slots.contains_key(key) {
        slots.insert(key.clone(), Slot { seq, dirty: false });
    }
}

/// Points a slot at `seq` (or at nobody); true if that changed it.
fn set_slot<K: std::hash::Hash + Eq + Clone>(
    slots: &mut FxHashMap<K, Slot>,
    key: &K,
    seq: Option<u32>,
) -> bool {
    match slots.get_mut(key) {
        Some(slot) if slot.seq == seq => false,
        Some(slot) => {
            *slot = Slot { seq, dirty: true };
            true
        }
        None => {
            slots.insert(key.clone(), Slot { seq, dirty: true });
            true
        }
    }
}

/// One workspace's view inside a transaction: the [`UserTx`] and [`CohortTx`] a unit of work
/// runs on (or, reading, the [`UserLookup`]).
struct PgTx<'t, 'c> {
    rt: &'t Handle,
    tx: &'t Transaction<'c>,
    ws: WorkspaceId,
    mode: Mode,
    cache: Cache,
    logs: Logs,
    /// The class of the first database error: it decides whether the work runs again.
    failure: Option<Failure>,
    /// Did more than change existing users' profiles and create users under key locks:
    /// created users whose keys are not locked, changed identifiers, moved aliases or devices,
    /// changed cohorts or memberships. Until then a batch may let the next one of its
    /// workspace start before it commits ([`PgTx::plain`]).
    reshaped: bool,
    /// Where new users' seqs come from (none when reading).
    seqs: Option<SeqSource<'t>>,
    /// Keys this transaction looked up, found free and locked ([`PgTx::lock_missing`]).
    locked: LockedKeys,
}

impl<'t, 'c> PgTx<'t, 'c> {
    fn new(
        rt: &'t Handle,
        tx: &'t Transaction<'c>,
        ws: WorkspaceId,
        mode: Mode,
        seqs: Option<SeqSource<'t>>,
    ) -> Self {
        PgTx {
            rt,
            tx,
            ws,
            mode,
            cache: Cache::default(),
            logs: Logs::default(),
            failure: None,
            reshaped: false,
            seqs,
            locked: LockedKeys::default(),
        }
    }
}

impl PgTx<'_, '_> {
    /// Notes a database error's class (the first one counts: after it the transaction only
    /// refuses) and maps it.
    fn fail(&mut self, e: tokio_postgres::Error) -> StoreError {
        let failure = Failure::of(&e);
        self.failure.get_or_insert(failure);
        pg_err(e)
    }

    fn fail_mapped(&mut self, e: StoreError) -> StoreError {
        self.failure.get_or_insert(Failure::of_mapped(&e));
        e
    }

    /// True if the transaction only changed the profiles of existing users it holds locked
    /// and created users (with fresh aliases and devices) under key locks. Another batch of
    /// the workspace can then look users up before this one commits and see what it would see
    /// after: every user this one changed, it can reach only by waiting for that user's lock;
    /// every key this one created, only by waiting for that key's lock (a lookup that finds
    /// nothing takes it, then looks again); nothing this one renamed can hide from its lookups.
    fn plain(&self) -> bool {
        !self.reshaped
            && self
                .cache
                .users
                .values()
                .filter(|c| c.dirty)
                .all(|c| match &c.stored {
                    Stored::Row(ids) => ids.match_user(&c.user),
                    Stored::New => self.created_under_locks(&c.user),
                    Stored::Unknown => false,
                })
    }

    /// True if every key another batch could find `user` by, before this transaction commits,
    /// is locked by it: the external id (looked up, found free, locked). The braze id is new
    /// and unknown outside; an email or phone is not locked, so a user created with one keeps
    /// the front (a lookup by email would not wait for it).
    fn created_under_locks(&self, user: &UserRecord) -> bool {
        user.email.is_none()
            && user.phone.is_none()
            && user
                .external_id
                .as_ref()
                .is_none_or(|e| self.locked.externals.contains(e))
    }

    fn query(&mut self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, StoreError> {
        query(self.rt, self.tx, sql, params).map_err(|e| self.fail(e))
    }

    fn execute(&mut self, sql: &str, params: &Params<'_>) -> Result<u64, StoreError> {
        execute(self.rt, self.tx, sql, params).map_err(|e| self.fail(e))
    }

    fn text(&self, statement: &Statement) -> &'static str {
        match self.mode {
            Mode::Write => statement.write,
            Mode::Read => statement.read,
        }
    }

    /// Loads the users these keys name, and what each key points at (nobody included), with
    /// one statement per kind of key, all sent at once. Keys already known are skipped. Writing,
    /// the keys found free are then locked and looked up again ([`PgTx::lock_missing`]).
    fn load(
        &mut self,
        externals: &[&ExternalId],
        aliases: &[&UserAlias],
        brazes: &[&BrazeId],
        devices: &[&DeviceId],
    ) -> Result<(), StoreError> {
        self.load_once(externals, aliases, brazes, devices)?;
        if self.mode == Mode::Write {
            self.lock_missing(externals, aliases, devices)?;
        }
        Ok(())
    }

    /// Locks the keys among these that no user has (as loaded, not changed here since), and
    /// loads them again: a batch that created one of them and gave up its front before its
    /// commit holds its lock, so this waits for that commit and then finds its user. A batch
    /// that creates a user by a key it locked need not keep its front to its commit
    /// ([`PgTx::plain`]). Keys are taken in one sorted statement; at most [`MAX_KEY_LOCKS`]
    /// per transaction (PostgreSQL's lock table is shared and finite), past which keys stay
    /// unlocked and a user created by one keeps the batch's front.
    fn lock_missing(
        &mut self,
        externals: &[&ExternalId],
        aliases: &[&UserAlias],
        devices: &[&DeviceId],
    ) -> Result<(), StoreError> {
        if self.reshaped {
            // The batch keeps its front to its commit whatever it creates: nothing to gain.
            return Ok(());
        }
        let c = &self.cache;
        let locked = &self.locked;
        let ext: Vec<&ExternalId> = externals
            .iter()
            .copied()
            .filter(|e| {
                c.by_external.get(*e) == Some(&None)
                    && is_free(&c.deprecated, e)
                    && !locked.externals.contains(*e)
            })
            .collect::<FxHashSet<_>>()
            .into_iter()
            .collect();
        let ali: Vec<&UserAlias> = aliases
            .iter()
            .copied()
            .filter(|a| is_free(&c.aliases, a) && !locked.aliases.contains(*a))
            .collect::<FxHashSet<_>>()
            .into_iter()
            .collect();
        let dev: Vec<&DeviceId> = devices
            .iter()
            .copied()
            .filter(|d| is_free(&c.devices, d) && !locked.devices.contains(*d))
            .collect::<FxHashSet<_>>()
            .into_iter()
            .collect();
        let n = ext.len() + ali.len() + dev.len();
        if n == 0 || self.locked.count + n > MAX_KEY_LOCKS {
            return Ok(());
        }
        let ws = self.ws.0;
        let keys: Vec<String> = ext
            .iter()
            .map(|e| key_lock_name(ws, 'e', e.as_str(), ""))
            .chain(
                ali.iter()
                    .map(|a| key_lock_name(ws, 'a', a.label.as_str(), a.name.as_str())),
            )
            .chain(dev.iter().map(|d| key_lock_name(ws, 'd', d.as_str(), "")))
            .collect();
        self.query(LOCK_KEYS, &[&keys])?;
        self.locked.count += n;
        for e in &ext {
            self.cache.by_external.remove(*e);
            self.cache.deprecated.remove(*e);
            self.locked.externals.insert((*e).clone());
        }
        for a in &ali {
            self.cache.aliases.remove(*a);
            self.locked.aliases.insert((*a).clone());
        }
        for d in &dev {
            self.cache.devices.remove(*d);
            self.locked.devices.insert((*d).clone());
        }
        self.load_once(&ext, &ali, &[], &dev)
    }

    /// The front of a keyed batch: locks the keys its units named (external ids, aliases,
    /// braze ids, devices; found or not), each set in one sorted statement (the caller then
    /// loads the users they name, [`PgTx::load_named`]; the lookups lock the users found).
    /// `first`'s keys (the oldest unit's)
    /// are waited for; each of `rest` is only tried (`pg_try_advisory_xact_lock`), and the
    /// names of those another transaction holds are returned: the caller sends their units
    /// back to the queue rather than wait for the batch that holds them. So a keyed batch
    /// waits at most once, for its first unit's keys, before it holds any lock, and two
    /// keyed batches never deadlock over keys; over users only if one user is named by
    /// different keys in each (an alias here, its external id there), which PostgreSQL
    /// detects and the batch runs again alone. Past [`MAX_KEY_LOCKS`] nothing is locked here
    /// and the units lock as they look.
    fn lock_named(
        &mut self,
        first: &[&LockKey],
        rest: &[&LockKey],
    ) -> Result<FxHashSet<String>, StoreError> {
        let ws = self.ws.0;
        let mut waited: Vec<String> = first.iter().map(|k| lock_name(ws, k)).collect();
        let mut tried: Vec<String> = rest.iter().map(|k| lock_name(ws, k)).collect();
        waited.sort_unstable();
        waited.dedup();
        tried.sort_unstable();
        tried.dedup();
        let mut busy = FxHashSet::default();
        let n = waited.len() + tried.len();
        let locking = n > 0 && self.locked.count + n <= MAX_KEY_LOCKS;
        if locking {
            let (rt, tx) = (self.rt, self.tx);
            let (took, failed) = rt
                .block_on(async {
                    let (wait, attempt) = tokio::join!(
                        tx.prepare_cached(LOCK_KEYS),
                        tx.prepare_cached(TRY_LOCK_KEYS)
                    );
                    let (wait, attempt) = (wait?, attempt?);
                    // Sent back to back: the tries run once the waited-for keys are held.
                    Ok::<_, tokio_postgres::Error>(tokio::join!(
                        async {
                            if waited.is_empty() {
                                Ok(Vec::new())
                            } else {
                                tx.query(&wait, &[&waited]).await
                            }
                        },
                        async {
                            if tried.is_empty() {
                                Ok(Vec::new())
                            } else {
                                tx.query(&attempt, &[&tried]).await
                            }
                        }
                    ))
                })
                .map_err(|e| self.fail(e))?;
            took.map_err(|e| self.fail(e))?;
            for row in failed.map_err(|e| self.fail(e))? {
                busy.insert(get::<String>(&row, 0)?);
            }
            self.locked.count += n;
        }
        if locking {
            for key in first.iter().chain(rest).copied() {
                if !busy.is_empty() && busy.contains(&lock_name(ws, key)) {
                    continue;
                }
                match key {
                    LockKey::External(e) => self.locked.externals.insert(e.clone()),
                    LockKey::Alias(a) => self.locked.aliases.insert(a.clone()),
                    LockKey::Device(d) => self.locked.devices.insert(d.clone()),
                    LockKey::Braze(_) => false,
                };
            }
        }
        Ok(busy)
    }

    /// Loads what these keys name, as [`UserLookup::prefetch`] does (each kind in one
    /// statement, all sent at once; keys already locked are not locked again).
    fn load_named(&mut self, keys: &[&LockKey]) -> Result<(), StoreError> {
        let lookups: Vec<Lookup<'_>> = keys.iter().map(|k| k.as_lookup()).collect();
        self.prefetch(&lookups)
    }

    /// [`PgTx::load`] without the key locks.
    fn load_once(
        &mut self,
        externals: &[&ExternalId],
        aliases: &[&UserAlias],
        brazes: &[&BrazeId],
        devices: &[&DeviceId],
    ) -> Result<(), StoreError> {
        let c = &self.cache;
        let mut seen = FxHashSet::default();
        let ext: Vec<&str> = externals
            .iter()
            .filter(|e| !c.by_external.contains_key(**e) && seen.insert(e.as_str()))
            .map(|e| e.as_str())
            .collect();
        let mut seen = FxHashSet::default();
        let dep: Vec<&str> = externals
            .iter()
            .filter(|e| !c.deprecated.contains_key(**e) && seen.insert(e.as_str()))
            .map(|e| e.as_str())
            .collect();
        let mut seen = FxHashSet::default();
        let mut pairs: Vec<(&str, &str)> = aliases
            .iter()
            .filter(|a| !c.aliases.contains_key(**a) && seen.insert(**a))
            .map(|a| (a.label.as_str(), a.name.as_str()))
            .collect();
        let mut seen = FxHashSet::default();
        let braze: Vec<&str> = brazes
            .iter()
            .filter(|b| !c.by_braze.contains_key(**b) && seen.insert(b.as_str()))
            .map(|b| b.as_str())
            .collect();
        let mut seen = FxHashSet::default();
        let dev: Vec<&str> = devices
            .iter()
            .filter(|d| !c.devices.contains_key(**d) && seen.insert(d.as_str()))
            .map(|d| d.as_str())
            .collect();
        // Each statement locks the users it finds in its array's order: sorted, two
        // transactions locking some of the same users through the same kind of key take
        // them in one order.
        let (mut ext, mut dep, mut braze, mut dev) = (ext, dep, braze, dev);
        for keys in [&mut ext, &mut dep, &mut braze, &mut dev] {
            keys.sort_unstable();
        }
        pairs.sort_unstable();
        let (labels, names): (Vec<&str>, Vec<&str>) = pairs.into_iter().unzip();
        if ext.is_empty()
            && dep.is_empty()
            && labels.is_empty()
            && braze.is_empty()
            && dev.is_empty()
        {
            return Ok(());
        }
        let (rt, tx, ws) = (self.rt, self.tx, self.ws.0);
        let sql = [
            self.text(&BY_EXTERNAL),
            self.text(&BY_DEPRECATED),
            self.text(&BY_ALIAS),
            self.text(&BY_BRAZE),
            self.text(&BY_DEVICE),
        ];
        // Sent back to back on the connection: one round trip for all of them.
        let params: [&Params<'_>; 5] = [
            &[&ws, &ext],
            &[&ws, &dep],
            &[&ws, &labels, &names],
            &[&ws, &braze],
            &[&ws, &dev],
        ];
        let (by_ext, by_dep, by_alias, by_braze, by_dev) = rt.block_on(async {
            tokio::join!(
                rows_unless(tx, ext.is_empty(), sql[0], params[0]),
                rows_unless(tx, dep.is_empty(), sql[1], params[1]),
                rows_unless(tx, labels.is_empty(), sql[2], params[2]),
                rows_unless(tx, braze.is_empty(), sql[3], params[3]),
                rows_unless(tx, dev.is_empty(), sql[4], params[4]),
            )
        });
        let (by_ext, by_dep, by_alias, by_braze, by_dev) = (
            by_ext.map_err(|e| self.fail(e))?,
            by_dep.map_err(|e| self.fail(e))?,
            by_alias.map_err(|e| self.fail(e))?,
            by_braze.map_err(|e| self.fail(e))?,
            by_dev.map_err(|e| self.fail(e))?,
        );
        let cache = &mut self.cache;
        for row in &by_ext {
            cache.adopt(user_at(row, 0)?);
        }
        for row in &by_braze {
            cache.adopt(user_at(row, 0)?);
        }
        for row in &by_dep {
            let key = parsed(
                get(row, 0)?,
                "deprecated_external_ids.external_id",
                ExternalId::parse,
            )?;
            let seq = cache.adopt(user_at(row, 1)?);
            learn(&mut cache.deprecated, &key, Some(seq));
        }
        for row in &by_alias {
            let alias = alias_at(row, 0)?;
            let seq = cache.adopt(user_at(row, 2)?);
            learn(&mut cache.aliases, &alias, Some(seq));
        }
        for row in &by_dev {
            let device = parsed(get(row, 0)?, "user_devices.device_id", DeviceId::parse)?;
            let seq = cache.adopt(user_at(row, 1)?);
            learn(&mut cache.devices, &device, Some(seq));
        }
        // What was asked and not found belongs to nobody.
        for e in externals {
            cache.by_external.entry((*e).clone()).or_insert(None);
            learn(&mut cache.deprecated, *e, None);
        }
        for a in aliases {
            learn(&mut cache.aliases, *a, None);
        }
        for b in brazes {
            cache.by_braze.entry((*b).clone()).or_insert(None);
        }
        for d in devices {
            learn(&mut cache.devices, *d, None);
        }
        Ok(())
    }

    /// `seq` if that user is alive, loading them if this transaction has not yet.
    fn live(&mut self, seq: u32) -> Result<Option<u32>, StoreError> {
        let ws = self.ws.0;
        if self.cache.users.contains_key(&seq) {
            return Ok(Some(seq));
        }
        if self.cache.deleted.contains(&seq) {
            return Ok(None);
        }
        let sql = self.text(&BY_SEQ);
        let rows = self.query(sql, &[&ws, &vec![i64::from(seq)]])?;
        for row in &rows {
            self.cache.adopt(user_at(row, 0)?);
        }
        Ok(self.cache.users.contains_key(&seq).then_some(seq))
    }

    fn resolve_external(&mut self, id: &ExternalId) -> Result<Option<u32>, StoreError> {
        if !self.cache.by_external.contains_key(id) || !self.cache.deprecated.contains_key(id) {
            self.load(&[id], &[], &[], &[])?;
        }
        if let Some(Some(seq)) = self.cache.by_external.get(id).copied()
            && let Some(seq) = self.live(seq)?
        {
            return Ok(Some(seq));
        }
        match self.cache.deprecated.get(id).and_then(|s| s.seq) {
            Some(seq) => self.live(seq),
            None => Ok(None),
        }
    }

    fn resolve_alias(&mut self, alias: &UserAlias) -> Result<Option<u32>, StoreError> {
        if !self.cache.aliases.contains_key(alias) {
            self.load(&[], &[alias], &[], &[])?;
        }
        match self.cache.aliases.get(alias).and_then(|s| s.seq) {
            Some(seq) => self.live(seq),
            None => Ok(None),
        }
    }

    fn resolve_device(&mut self, device: &DeviceId) -> Result<Option<u32>, StoreError> {
        if !self.cache.devices.contains_key(device) {
            self.load(&[], &[], &[], &[device])?;
        }
        match self.cache.devices.get(device).and_then(|s| s.seq) {
            Some(seq) => self.live(seq),
            None => Ok(None),
        }
    }

    fn record(&self, seq: Option<u32>) -> Option<UserRecord> {
        seq.and_then(|s| self.cache.live(s)).cloned()
    }

    /// Every live user whose `column` (email or phone) is `value`, most recently updated
    /// first. Pending writes go first, so the database's index answers for every user.
    fn by_contact(
        &mut self,
        statement: &Statement,
        value: &str,
    ) -> Result<Vec<UserRecord>, StoreError> {
        let ws = self.ws.0;
        self.sync()?;
        let sql = self.text(statement);
        let rows = self.query(sql, &[&ws, &value])?;
        let mut seqs = Vec::with_capacity(rows.len());
        for row in &rows {
            seqs.push(self.cache.adopt(user_at(row, 0)?));
        }
        let mut users: Vec<UserRecord> = seqs
            .into_iter()
            .filter_map(|s| self.cache.live(s).cloned())
            .collect();
        users.sort_by_key(|u| std::cmp::Reverse((u.updated_at, u.seq.0)));
        Ok(users)
    }

    /// `seq`'s rows of a slot table (aliases or devices) as this transaction sees them: the
    /// database's, less those it moved or removed, plus those it gave `seq`.
    fn owned<K: std::hash::Hash + Eq + Clone>(
        stored: Vec<K>,
        slots: &FxHashMap<K, Slot>,
        seq: u32,
    ) -> Vec<K> {
        let mut out: Vec<K> = stored
            .into_iter()
            .filter(|k| slots.get(k).is_none_or(|s| s.seq == Some(seq)))
            .collect();
        for (k, slot) in slots {
            if slot.seq == Some(seq) && !out.contains(k) {
                out.push(k.clone());
            }
        }
        out
    }

    // --- writing -----------------------------------------------------------------------------

    /// A fresh seq from the workspace's block reserved ahead ([`SeqSource`]): creating a user
    /// locks no counter, so batches that create users need not commit one at a time.
    fn new_seq(&mut self) -> Result<u32, StoreError> {
        let Some(source) = self.seqs else {
            return Err(StoreError::Corrupt(
                "a reading transaction cannot create users".into(),
            ));
        };
        let rt = self.rt;
        rt.block_on(source.next(self.ws))
            .map_err(|e| self.fail_mapped(e))
    }

    fn create(
        &mut self,
        braze_id: BrazeId,
        external_id: Option<&ExternalId>,
        now: Millis,
    ) -> Result<UserRecord, StoreError> {
        let seq = self.new_seq()?;
        let mut user = UserRecord::new(UserSeq(seq), braze_id, now);
        user.external_id = external_id.cloned();
        let cache = &mut self.cache;
        if let Some(ext) = external_id {
            cache.by_external.insert(ext.clone(), Some(seq));
        }
        cache.by_braze.insert(user.braze_id.clone(), Some(seq));
        cache.users.insert(
            seq,
            Cached {
                user: user.clone(),
                stored: Stored::New,
                dirty: true,
            },
        );
        Ok(user)
    }

    /// Writes everything buffered except the logs: users, aliases, devices, deprecated ids,
    /// cohort membership and counts, and books the users created. After it the database holds
    /// what this transaction knows.
    fn sync(&mut self) -> Result<(), StoreError> {
        if self.mode == Mode::Read {
            return Ok(());
        }
        self.write_users()?;
        self.write_slots()?;
        self.write_members()
    }

    /// Inserts the new users and updates the saved ones, in one statement (two when an external
    /// id moved: it is cleared first, so a swap within the batch does not trip the unique index
    /// halfway).
    fn write_users(&mut self) -> Result<(), StoreError> {
        let mut dirty: Vec<u32> = self
            .cache
            .users
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(s, _)| *s)
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        dirty.sort_unstable();
        let users = &self.cache.users;
        // One statement inserts the new and updates the saved (`ON CONFLICT`), so both are a
        // probe of the primary key per row whatever the planner thinks of the table.
        let (new, saved): (Vec<u32>, Vec<u32>) = dirty
            .iter()
            .partition(|s| users.get(s).is_some_and(|c| c.stored == Stored::New));
        let changed: Vec<u32> = saved
            .iter()
            .copied()
            .filter(|s| {
                users.get(s).is_some_and(|c| match &c.stored {
                    Stored::Row(ids) => !ids.match_user(&c.user),
                    Stored::New | Stored::Unknown => true,
                })
            })
            .collect();
        let moved: Vec<u32> = changed
            .iter()
            .copied()
            .filter(|s| {
                users.get(s).is_some_and(|c| match &c.stored {
                    Stored::Row(ids) => {
                        ids.external_id.is_some() && ids.external_id != c.user.external_id
                    }
                    Stored::New | Stored::Unknown => true,
                })
            })
            .collect();
        // Once written, a new user looks like a stored one to `plain`: decide for it now.
        if !changed.is_empty()
            || new.iter().any(|s| {
                users
                    .get(s)
                    .is_some_and(|c| !self.created_under_locks(&c.user))
            })
        {
            self.reshaped = true;
        }
        let (rt, tx, ws) = (self.rt, self.tx, self.ws.0);
        let result = (|| {
            if !moved.is_empty() {
                Columns::of(users, &moved)
                    .without_external_ids()
                    .upsert(rt, tx, ws)?;
            }
            Columns::of(users, &dirty).upsert(rt, tx, ws)
        })();
        let written = result.map_err(|e| self.fail(e))?;
        if written != dirty.len() as u64 {
            // A save of a user whose row is a tombstone (deleted by another transaction before
            // this one locked it): as SQLite answers a save that changes no row.
            return Err(StoreError::NotFound(format!(
                "{} of {} saved users",
                dirty.len() as u64 - written.min(dirty.len() as u64),
                dirty.len()
            )));
        }
        self.logs.user_changes.extend(new.iter().chain(&changed));
        for seq in dirty {
            if let Some(c) = self.cache.users.get_mut(&seq) {
                if !matches!(&c.stored, Stored::Row(ids) if ids.match_user(&c.user)) {
                    c.stored = Stored::Row(Identifiers::of(&c.user));
                }
                c.dirty = false;
            }
        }
        Ok(())
    }

    fn write_slots(&mut self) -> Result<(), StoreError> {
        let (rt, tx, ws) = (self.rt, self.tx, self.ws.0);
        let cache = &self.cache;
        let result = (|| {
            let (put, gone) = dirty_slots(&cache.aliases);
            if !gone.is_empty() {
                let keys: Vec<(&str, &str)> = gone
                    .iter()
                    .map(|a| (a.label.as_str(), a.name.as_str()))
                    .collect();
                let rows: Vec<Vec<&(dyn ToSql + Sync)>> = keys
                    .iter()
                    .map(|(label, name)| vec![&ws as &(dyn ToSql + Sync), label, name])
                    .collect();
                execute_each(
                    rt,
                    tx,
                    "DELETE FROM user_aliases WHERE workspace_id = $1 AND label = $2 AND name = $3",
                    &rows,
                )?;
            }
            if !put.is_empty() {
                let (labels, names): (Vec<&str>, Vec<&str>) = put
                    .iter()
                    .map(|(a, _)| (a.label.as_str(), a.name.as_str()))
                    .unzip();
                let seqs: Vec<i64> = put.iter().map(|(_, s)| *s).collect();
                execute(
                    rt,
                    tx,
                    "INSERT INTO user_aliases (workspace_id, label, name, seq)
                     SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[])
                     ON CONFLICT (workspace_id, label, name) DO UPDATE SET seq = EXCLUDED.seq",
                    &[&ws, &labels, &names, &seqs],
                )?;
            }
            let (put, gone) = dirty_slots(&cache.devices);
            if !gone.is_empty() {
                let keys: Vec<&str> = gone.iter().map(|d| d.as_str()).collect();
                execute_each(
                    rt,
                    tx,
                    "DELETE FROM user_devices WHERE workspace_id = $1 AND device_id = $2",
                    &key_rows(&ws, &keys),
                )?;
            }
            if !put.is_empty() {
                let keys: Vec<&str> = put.iter().map(|(d, _)| d.as_str()).collect();
                let seqs: Vec<i64> = put.iter().map(|(_, s)| *s).collect();
                execute(
                    rt,
                    tx,
                    "INSERT INTO user_devices (workspace_id, device_id, seq)
                     SELECT $1, * FROM unnest($2::text[], $3::bigint[])
                     ON CONFLICT (workspace_id, device_id) DO UPDATE SET seq = EXCLUDED.seq",
                    &[&ws, &keys, &seqs],
                )?;
            }
            let (put, gone) = dirty_slots(&cache.deprecated);
            if !gone.is_empty() {
                let keys: Vec<&str> = gone.iter().map(|e| e.as_str()).collect();
                execute_each(
                    rt,
                    tx,
                    "DELETE FROM deprecated_external_ids WHERE workspace_id = $1 AND external_id = $2",
                    &key_rows(&ws, &keys),
                )?;
            }
            if !put.is_empty() {
                let keys: Vec<&str> = put.iter().map(|(e, _)| e.as_str()).collect();
                let seqs: Vec<i64> = put.iter().map(|(_, s)| *s).collect();
                execute(
                    rt,
                    tx,
                    "INSERT INTO deprecated_external_ids (workspace_id, external_id, seq)
                     SELECT $1, * FROM unnest($2::text[], $3::bigint[])
                     ON CONFLICT (workspace_id, external_id) DO UPDATE SET seq = EXCLUDED.seq",
                    &[&ws, &keys, &seqs],
                )?;
            }
            Ok(())
        })();
        result.map_err(|e| self.fail(e))?;
        let cache = &mut self.cache;
        for slot in cache
            .aliases
            .values_mut()
            .chain(cache.devices.values_mut())
            .chain(cache.deprecated.values_mut())
        {
            slot.dirty = false;
        }
        Ok(())
    }

    /// Writes membership rows set or removed here and the member counts.
    fn write_members(&mut self) -> Result<(), StoreError> {
        let touched: Vec<((i64, u32), Member)> = self
            .cache
            .members
            .iter()
            .filter(|(_, m)| m.touched)
            .map(|(k, m)| (*k, *m))
            .collect();
        if touched.is_empty() && self.cache.counts.is_empty() {
            return Ok(());
        }
        let (gone_c, gone_u): (Vec<i64>, Vec<i64>) = touched
            .iter()
            .filter(|(_, m)| m.stored)
            .map(|((c, u), _)| (*c, i64::from(*u)))
            .unzip();
        let mut put_c = Vec::new();
        let mut put_u = Vec::new();
        let mut put_at = Vec::new();
        for ((c, u), m) in &touched {
            if let Some(at) = m.current {
                put_c.push(*c);
                put_u.push(i64::from(*u));
                put_at.push(at.0);
            }
        }
        let mut counts: Vec<(i64, i64, i64)> = self
            .cache
            .counts
            .iter()
            .map(|(c, (d, at))| (*c, *d, at.0))
            .collect();
        counts.sort_unstable();
        let (rt, tx, ws) = (self.rt, self.tx, self.ws.0);
        let result = (|| {
            let mut deleted = 0;
            if !gone_c.is_empty() {
                let rows: Vec<Vec<&(dyn ToSql + Sync)>> = gone_c
                    .iter()
                    .zip(&gone_u)
                    .map(|(c, u)| vec![&ws as &(dyn ToSql + Sync), c, u])
                    .collect();
                deleted = execute_each(
                    rt,
                    tx,
                    "DELETE FROM cohort_members WHERE workspace_id = $1 AND cohort = $2 AND seq = $3",
                    &rows,
                )?;
            }
            if !put_c.is_empty() {
                execute(
                    rt,
                    tx,
                    "INSERT INTO cohort_members (workspace_id, cohort, seq, entered_at)
                     SELECT $1, * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[])",
                    &[&ws, &put_c, &put_u, &put_at],
                )?;
            }
            if !counts.is_empty() {
                let ids: Vec<i64> = counts.iter().map(|c| c.0).collect();
                let deltas: Vec<i64> = counts.iter().map(|c| c.1).collect();
                let at: Vec<i64> = counts.iter().map(|c| c.2).collect();
                execute(
                    rt,
                    tx,
                    "UPDATE cohorts AS c SET member_count = c.member_count + v.delta, updated_at = v.at
                     FROM unnest($2::bigint[], $3::bigint[], $4::bigint[]) AS v(id, delta, at)
                     WHERE c.workspace_id = $1 AND c.id = v.id",
                    &[&ws, &ids, &deltas, &at],
                )?;
            }
            Ok(deleted)
        })();
        let deleted = result.map_err(|e| self.fail(e))?;
        if deleted != gone_c.len() as u64 {
            // Another transaction removed a membership this one read: run the work again.
            self.failure.get_or_insert(Failure::Conflict);
            return Err(StoreError::Conflict(
                "cohort membership changed by another transaction".into(),
            ));
        }
        for ((c, u), m) in touched {
            self.cache.members.insert(
                (c, u),
                Member {
                    stored: m.current.is_some(),
                    current: m.current,
                    touched: false,
                },
            );
        }
        self.cache.counts.clear();
        Ok(())
    }

    /// Makes sure the membership of `user` in `cohort` is known, loading it for every user
    /// this transaction holds at once (cohort import sets many members of one cohort).
    fn know_membership(&mut self, cohort: i64, user: u32) -> Result<(), StoreError> {
        let ws = self.ws.0;
        if self.cache.members.contains_key(&(cohort, user)) {
            return Ok(());
        }
        let mut seqs: Vec<u32> = self
            .cache
            .users
            .keys()
            .copied()
            .filter(|s| *s != user && !self.cache.members.contains_key(&(cohort, *s)))
            .collect();
        seqs.push(user);
        let wanted: Vec<i64> = seqs.iter().map(|s| i64::from(*s)).collect();
        let rows = self.query(
            // One probe of the primary key per user, however big the cohort (see the lookups).
            "SELECT k.seq, m.entered_at FROM unnest($3::bigint[]) AS k(seq) CROSS JOIN LATERAL
               (SELECT m.entered_at FROM cohort_members m
                WHERE m.workspace_id = $1 AND m.cohort = $2 AND m.seq = k.seq LIMIT 1) m",
            &[&ws, &cohort, &wanted],
        )?;
        for s in seqs {
            self.cache.members.insert(
                (cohort, s),
                Member {
                    stored: false,
                    current: None,
                    touched: false,
                },
            );
        }
        for row in &rows {
            let seq = seq_from(get(row, 0)?, "cohort_members.seq")?;
            self.cache.members.insert(
                (cohort, seq),
                Member {
                    stored: true,
                    current: Some(Millis(get(row, 1)?)),
                    touched: false,
                },
            );
        }
        Ok(())
    }

    /// The cohorts `user` is a member of (written memberships first, so the table answers).
    fn cohorts_of(&mut self, user: u32) -> Result<Vec<i64>, StoreError> {
        let ws = self.ws.0;
        self.write_members()?;
        let rows = self.query(
            "SELECT cohort FROM cohort_members WHERE workspace_id = $1 AND seq = $2 ORDER BY cohort",
            &[&ws, &i64::from(user)],
        )?;
        rows.iter().map(|r| get(r, 0)).collect()
    }
}

/// The dirty slots of a map: those now pointing at a user, and those pointing at nobody.
fn dirty_slots<K: std::hash::Hash + Eq>(slots: &FxHashMap<K, Slot>) -> (Vec<(&K, i64)>, Vec<&K>) {
    let mut put = Vec::new();
    let mut gone = Vec::new();
    for (k, slot) in slots.iter().filter(|(_, s)| s.dirty) {
        match slot.seq {
            Some(seq) => put.push((k, i64::from(seq))),
            None => gone.push(k),
        }
    }
    (put, gone)
}

/// The `users` columns of some cached users, as arrays for `unnest`.
struct Columns<'a> {
    seq: Vec<i64>,
    braze_id: Vec<&'a str>,
    external_id: Vec<Option<&'a str>>,
    email: Vec<Option<&'a str>>,
    phone: Vec<Option<&'a str>>,
    created_at: Vec<i64>,
    updated_at: Vec<i64>,
    profile: Vec<String>,
}

impl<'a> Columns<'a> {
    /// The same rows with every external id cleared.
    fn without_external_ids(mut self) -> Self {
        self.external_id.iter_mut().for_each(|e| *e = None);
        self
    }

    /// Inserts the rows, or updates the live ones that exist; returns how many it wrote.
    fn upsert(
        &self,
        rt: &Handle,
        tx: &Transaction<'_>,
        ws: i64,
    ) -> Result<u64, tokio_postgres::Error> {
        execute(
            rt,
            tx,
            "INSERT INTO users AS u (workspace_id, seq, braze_id, external_id, email, phone, created_at, updated_at, profile)
             SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::text[])
             ON CONFLICT (workspace_id, seq) DO UPDATE SET external_id = EXCLUDED.external_id, email = EXCLUDED.email,
                 phone = EXCLUDED.phone, created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,
                 profile = EXCLUDED.profile
             WHERE u.deleted_at IS NULL",
            &[&ws, &self.seq, &self.braze_id, &self.external_id, &self.email, &self.phone, &self.created_at, &self.updated_at, &self.profile],
        )
    }

    fn of(users: &'a FxHashMap<u32, Cached>, seqs: &[u32]) -> Self {
        let mut cols = Columns {
            seq: Vec::with_capacity(seqs.len()),
            braze_id: Vec::with_capacity(seqs.len()),
            external_id: Vec::with_capacity(seqs.len()),
            email: Vec::with_capacity(seqs.len()),
            phone: Vec::with_capacity(seqs.len()),
            created_at: Vec::with_capacity(seqs.len()),
            updated_at: Vec::with_capacity(seqs.len()),
            profile: Vec::with_capacity(seqs.len()),
        };
        for user in seqs.iter().filter_map(|s| users.get(s)).map(|c| &c.user) {
            cols.seq.push(i64::from(user.seq.0));
            cols.braze_id.push(user.braze_id.as_str());
            cols.external_id
                .push(user.external_id.as_ref().map(ExternalId::as_str));
            cols.email.push(user.email.as_ref().map(Email::as_str));
            cols.phone.push(user.phone.as_ref().map(Phone::as_str));
            cols.created_at.push(user.created_at.0);
            cols.updated_at.push(user.updated_at.0);
            cols.profile.push(profile_codec::encode(&user.profile));
        }
        cols
    }
}

impl UserLookup for PgTx<'_, '_> {
    fn user_by_external_id(&mut self, id: &ExternalId) -> Result<Option<UserRecord>, StoreError> {
        let seq = self.resolve_external(id)?;
        Ok(self.record(seq))
    }

    fn user_by_alias(&mut self, alias: &UserAlias) -> Result<Option<UserRecord>, StoreError> {
        let seq = self.resolve_alias(alias)?;
        Ok(self.record(seq))
    }

    fn user_by_braze_id(&mut self, id: &BrazeId) -> Result<Option<UserRecord>, StoreError> {
        if !self.cache.by_braze.contains_key(id) {
            self.load(&[], &[], &[id], &[])?;
        }
        let seq = match self.cache.by_braze.get(id).copied().flatten() {
            Some(seq) => self.live(seq)?,
            None => None,
        };
        Ok(self.record(seq))
    }

    fn user_by_device(&mut self, device: &DeviceId) -> Result<Option<UserRecord>, StoreError> {
        let seq = self.resolve_device(device)?;
        Ok(self.record(seq))
    }

    fn users_by_email(&mut self, email: &Email) -> Result<Vec<UserRecord>, StoreError> {
        self.by_contact(&BY_EMAIL, email.as_str())
    }

    fn users_by_phone(&mut self, phone: &Phone) -> Result<Vec<UserRecord>, StoreError> {
        self.by_contact(&BY_PHONE, phone.as_str())
    }

    fn aliases_of(&mut self, user: UserSeq) -> Result<Vec<UserAlias>, StoreError> {
        let ws = self.ws.0;
        let rows = self.query(
            "SELECT label, name FROM user_aliases WHERE workspace_id = $1 AND seq = $2",
            &[&ws, &i64::from(user.0)],
        )?;
        let stored = rows
            .iter()
            .map(|r| alias_at(r, 0))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Self::owned(stored, &self.cache.aliases, user.0);
        out.sort_by(|a, b| {
            (a.label.as_str(), a.name.as_str()).cmp(&(b.label.as_str(), b.name.as_str()))
        });
        Ok(out)
    }

    fn devices_of(&mut self, user: UserSeq) -> Result<Vec<DeviceId>, StoreError> {
        let ws = self.ws.0;
        let rows = self.query(
            "SELECT device_id FROM user_devices WHERE workspace_id = $1 AND seq = $2",
            &[&ws, &i64::from(user.0)],
        )?;
        let stored = rows
            .iter()
            .map(|r| parsed(get(r, 0)?, "user_devices.device_id", DeviceId::parse))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Self::owned(stored, &self.cache.devices, user.0);
        out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(out)
    }

    fn is_deprecated_external_id(&mut self, id: &ExternalId) -> Result<bool, StoreError> {
        if !self.cache.deprecated.contains_key(id) {
            self.load(&[id], &[], &[], &[])?;
        }
        Ok(self
            .cache
            .deprecated
            .get(id)
            .is_some_and(|s| s.seq.is_some()))
    }

    fn prefetch(&mut self, keys: &[Lookup<'_>]) -> Result<(), StoreError> {
        let mut externals = Vec::new();
        let mut aliases = Vec::new();
        let mut brazes = Vec::new();
        let mut devices = Vec::new();
        for key in keys {
            match key {
                Lookup::External(e) => externals.push(*e),
                Lookup::Alias(a) => aliases.push(*a),
                Lookup::Braze(b) => brazes.push(*b),
                Lookup::Device(d) => devices.push(*d),
                // Answered by the database's index after pending writes (`by_contact`):
                // loading them here would not save that statement.
                Lookup::Email(_) | Lookup::Phone(_) => {}
            }
        }
        self.load(&externals, &aliases, &brazes, &devices)
    }

    fn seq_by_external_id(&mut self, id: &ExternalId) -> Result<Option<UserSeq>, StoreError> {
        Ok(self.resolve_external(id)?.map(UserSeq))
    }

    fn seq_by_alias(&mut self, alias: &UserAlias) -> Result<Option<UserSeq>, StoreError> {
        Ok(self.resolve_alias(alias)?.map(UserSeq))
    }

    fn anonymous_seq_by_device(
        &mut self,
        device: &DeviceId,
    ) -> Result<Option<UserSeq>, StoreError> {
        let seq = self.resolve_device(device)?;
        Ok(seq
            .filter(|s| self.cache.live(*s).is_some_and(|u| !u.is_identified()))
            .map(UserSeq))
    }
}

impl UserTx for PgTx<'_, '_> {
    fn create_user(&mut self, braze_id: BrazeId, now: Millis) -> Result<UserRecord, StoreError> {
        self.create(braze_id, None, now)
    }

    fn create_user_with_external_id(
        &mut self,
        braze_id: BrazeId,
        external_id: &ExternalId,
        now: Millis,
    ) -> Result<UserRecord, StoreError> {
        self.create(braze_id, Some(external_id), now)
    }

    fn save_user(&mut self, user: UserRecord) -> Result<(), StoreError> {
        let seq = user.seq.0;
        if self.cache.deleted.contains(&seq) {
            return Err(StoreError::NotFound(format!("user {}", user.braze_id)));
        }
        let cache = &mut self.cache;
        let old_ext = match cache.users.get(&seq) {
            Some(c) => c.user.external_id.clone(),
            None => None,
        };
        if old_ext != user.external_id {
            if let Some(old) = old_ext
                && cache.by_external.get(&old) == Some(&Some(seq))
            {
                cache.by_external.insert(old, None);
            }
            if let Some(new) = &user.external_id {
                cache.by_external.insert(new.clone(), Some(seq));
            }
        }
        match cache.users.get_mut(&seq) {
            Some(c) => {
                c.user = user;
                c.dirty = true;
            }
            None => {
                cache.by_braze.insert(user.braze_id.clone(), Some(seq));
                cache.users.insert(
                    seq,
                    Cached {
                        user,
                        stored: Stored::Unknown,
                        dirty: true,
                    },
                );
            }
        }
        Ok(())
    }

    fn delete_user(&mut self, user: UserSeq, now: Millis) -> Result<(), StoreError> {
        let ws = self.ws.0;
        let seq = user.0;
        if self.live(seq)?.is_none() {
            return Ok(());
        }
        self.reshaped = true;
        for cohort in self.cohorts_of(seq)? {
            if self.set_member(CohortKey(cohort), user, false, now)? {
                self.adjust_member_count(CohortKey(cohort), -1, now)?;
            }
        }
        // Everything pending goes first: the deletes below act on the tables.
        self.sync()?;
        let params: [&(dyn ToSql + Sync); 2] = [&ws, &i64::from(seq)];
        for sql in [
            "DELETE FROM user_aliases WHERE workspace_id = $1 AND seq = $2",
            "DELETE FROM user_devices WHERE workspace_id = $1 AND seq = $2",
            "DELETE FROM deprecated_external_ids WHERE workspace_id = $1 AND seq = $2",
        ] {
            self.execute(sql, &params)?;
        }
        self.execute(
            "UPDATE users SET external_id = NULL, email = NULL, phone = NULL, profile = '{}', deleted_at = $3, updated_at = $3
             WHERE workspace_id = $1 AND seq = $2",
            &[&ws, &i64::from(seq), &now.0],
        )?;
        let cache = &mut self.cache;
        if let Some(gone) = cache.users.remove(&seq) {
            // As SQLite's trigger: the segment feed hears of it when identifiers were erased.
            if Identifiers::of(&gone.user).any() {
                self.logs.user_changes.push(seq);
            }
            if let Some(ext) = gone.user.external_id {
                cache.by_external.insert(ext, None);
            }
            cache.by_braze.insert(gone.user.braze_id, None);
        }
        cache.deleted.insert(seq);
        cache.unpoint_slots(seq);
        Ok(())
    }

    fn put_alias(&mut self, user: UserSeq, alias: &UserAlias) -> Result<(), StoreError> {
        let fresh = self.locked.aliases.contains(alias) && is_free(&self.cache.aliases, alias);
        self.reshaped |= set_slot(&mut self.cache.aliases, alias, Some(user.0)) && !fresh;
        Ok(())
    }

    fn remove_alias(&mut self, alias: &UserAlias) -> Result<(), StoreError> {
        if !self.cache.aliases.contains_key(alias) {
            self.load(&[], &[alias], &[], &[])?;
        }
        self.reshaped |= set_slot(&mut self.cache.aliases, alias, None);
        Ok(())
    }

    fn put_device(&mut self, user: UserSeq, device: &DeviceId) -> Result<(), StoreError> {
        let fresh = self.locked.devices.contains(device) && is_free(&self.cache.devices, device);
        self.reshaped |= set_slot(&mut self.cache.devices, device, Some(user.0)) && !fresh;
        Ok(())
    }

    fn put_deprecated_external_id(
        &mut self,
        user: UserSeq,
        old: &ExternalId,
    ) -> Result<(), StoreError> {
        self.reshaped |= set_slot(&mut self.cache.deprecated, old, Some(user.0));
        Ok(())
    }

    fn remove_deprecated_external_id(&mut self, old: &ExternalId) -> Result<bool, StoreError> {
        if !self.cache.deprecated.contains_key(old) {
            self.load(&[old], &[], &[], &[])?;
        }
        let existed = self
            .cache
            .deprecated
            .get(old)
            .is_some_and(|s| s.seq.is_some());
        if existed {
            self.reshaped = true;
            set_slot(&mut self.cache.deprecated, old, None);
        }
        Ok(existed)
    }

    fn append_event(
        &mut self,
        user: Option<UserSeq>,
        event: CurrentsEvent,
    ) -> Result<(), StoreError> {
        self.logs.events.push((user.map(|u| u.0), event));
        Ok(())
    }

    fn move_cohort_memberships(
        &mut self,
        from: UserSeq,
        to: UserSeq,
        now: Millis,
    ) -> Result<(), StoreError> {
        for cohort in self.cohorts_of(from.0)? {
            let cohort = CohortKey(cohort);
            self.set_member(cohort, from, false, now)?;
            let joined = self.set_member(cohort, to, true, now)?;
            // The source left; the target joined unless it was a member already.
            self.adjust_member_count(cohort, if joined { 0 } else { -1 }, now)?;
        }
        Ok(())
    }

    fn record_merge(
        &mut self,
        from: UserSeq,
        into: UserSeq,
        now: Millis,
    ) -> Result<(), StoreError> {
        let ws = self.ws.0;
        self.reshaped = true;
        // Both users' rows must exist (foreign keys): write what is pending first.
        self.sync()?;
        self.execute(
            "INSERT INTO user_merges (workspace_id, from_seq, into_seq, at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (workspace_id, from_seq) DO UPDATE SET into_seq = EXCLUDED.into_seq, at = EXCLUDED.at",
            &[&ws, &i64::from(from.0), &i64::from(into.0), &now.0],
        )?;
        Ok(())
    }
}

impl CohortTx for PgTx<'_, '_> {
    fn upsert_cohort(
        &mut self,
        partner: &str,
        cohort_id: &CohortId,
        name: Option<&str>,
        created_at: Millis,
        now: Millis,
    ) -> Result<CohortKey, StoreError> {
        let ws = self.ws.0;
        self.reshaped = true;
        // Locked: membership of one cohort changes one transaction at a time, so what this
        // one reads of it stays true until its commit.
        let rows = self.query(
            "SELECT id, name FROM cohorts WHERE workspace_id = $1 AND partner = $2 AND cohort_id = $3 FOR NO KEY UPDATE",
            &[&ws, &partner, &cohort_id.as_str()],
        )?;
        if let Some(row) = rows.first() {
            let id: i64 = get(row, 0)?;
            let old: String = get(row, 1)?;
            if let Some(name) = name.filter(|n| *n != old) {
                self.execute(
                    "UPDATE cohorts SET name = $3, updated_at = $4 WHERE workspace_id = $1 AND id = $2",
                    &[&ws, &id, &name, &now.0],
                )?;
            }
            return Ok(CohortKey(id));
        }
        // Two nodes creating it at once: the second breaks the unique key and runs again.
        let rows = self.query(
            "INSERT INTO cohorts (workspace_id, partner, cohort_id, name, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            &[
                &ws,
                &partner,
                &cohort_id.as_str(),
                &name.unwrap_or(cohort_id.as_str()),
                &created_at.0,
                &now.0,
            ],
        )?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("INSERT … RETURNING returned no row".into()))?;
        Ok(CohortKey(get(row, 0)?))
    }

    fn set_member(
        &mut self,
        cohort: CohortKey,
        user: UserSeq,
        member: bool,
        now: Millis,
    ) -> Result<bool, StoreError> {
        self.know_membership(cohort.0, user.0)?;
        let Some(state) = self.cache.members.get_mut(&(cohort.0, user.0)) else {
            return Err(StoreError::Corrupt("membership not loaded".into()));
        };
        if state.current.is_some() == member {
            return Ok(false);
        }
        state.current = member.then_some(now);
        state.touched = true;
        self.reshaped = true;
        self.logs
            .membership_changes
            .push((cohort.0, user.0, member, now));
        Ok(true)
    }

    fn adjust_member_count(
        &mut self,
        cohort: CohortKey,
        delta: i64,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.reshaped = true;
        let entry = self.cache.counts.entry(cohort.0).or_insert((0, now));
        entry.0 += delta;
        entry.1 = now;
        Ok(())
    }

    fn members(&mut self, cohort: CohortKey) -> Result<Vec<UserSeq>, StoreError> {
        let ws = self.ws.0;
        self.write_members()?;
        let rows = self.query(
            "SELECT seq, entered_at FROM cohort_members WHERE workspace_id = $1 AND cohort = $2 ORDER BY seq",
            &[&ws, &cohort.0],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq = seq_from(get(row, 0)?, "cohort_members.seq")?;
            self.cache.members.insert(
                (cohort.0, seq),
                Member {
                    stored: true,
                    current: Some(Millis(get(row, 1)?)),
                    touched: false,
                },
            );
            out.push(UserSeq(seq));
        }
        Ok(out)
    }

    fn mark_sync_page(&mut self, task: &str, page: i64, now: Millis) -> Result<bool, StoreError> {
        self.reshaped = true;
        let ws = self.ws.0;
        let inserted = self.execute(
            "INSERT INTO heap_sync_pages (workspace_id, sync_task_id, page_number, applied_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&ws, &task, &page, &now.0],
        )?;
        Ok(inserted == 1)
    }
}

// --- Cohort reads ----------------------------------------------------------------------------

fn cohort_id_at(row: &Row, at: usize) -> Result<CohortId, StoreError> {
    let raw: String = get(row, at)?;
    CohortId::parse(&raw).ok_or_else(|| StoreError::Corrupt(format!("cohorts.cohort_id {raw:?}")))
}

impl CohortStore for PgStore {
    fn list_cohorts(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<CohortSummary>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            // Byte order, as SQLite sorts, whatever the database's collation.
            let rows = client
                .query(
                    "SELECT partner, cohort_id, name, member_count, created_at, updated_at FROM cohorts
                     WHERE workspace_id = $1 ORDER BY partner COLLATE \"C\", name COLLATE \"C\", cohort_id COLLATE \"C\"",
                    &[&workspace.0],
                )
                .await
                .map_err(pg_err)?;
            rows.iter()
                .map(|r| {
                    let count: i64 = get(r, 3)?;
                    Ok(CohortSummary {
                        partner: get(r, 0)?,
                        cohort_id: cohort_id_at(r, 1)?,
                        name: get(r, 2)?,
                        member_count: u64::try_from(count).map_err(|_| {
                            StoreError::Corrupt(format!("cohorts.member_count {count}"))
                        })?,
                        created_at: Millis(get(r, 4)?),
                        updated_at: Millis(get(r, 5)?),
                    })
                })
                .collect()
        })
    }

    fn cohort_members(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        cohort_id: CohortId,
        after: u32,
        limit: usize,
    ) -> StoreFuture<'_, Option<Vec<CohortMember>>> {
        let partner = partner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let cohort = client
                .query_opt(
                    "SELECT id FROM cohorts WHERE workspace_id = $1 AND partner = $2 AND cohort_id = $3",
                    &[&workspace.0, &partner, &cohort_id.as_str()],
                )
                .await
                .map_err(pg_err)?;
            let Some(cohort) = cohort else {
                return Ok(None);
            };
            let cohort: i64 = get(&cohort, 0)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    "SELECT m.seq, u.braze_id, u.external_id, m.entered_at FROM
                       (SELECT seq, entered_at FROM cohort_members
                        WHERE workspace_id = $1 AND cohort = $2 AND seq > $3 ORDER BY seq LIMIT $4) m
                     CROSS JOIN LATERAL (SELECT braze_id, external_id FROM users
                        WHERE workspace_id = $1 AND seq = m.seq LIMIT 1) u
                     ORDER BY m.seq",
                    &[&workspace.0, &cohort, &i64::from(after), &limit],
                )
                .await
                .map_err(pg_err)?;
            rows.iter()
                .map(|r| {
                    Ok(CohortMember {
                        user: UserSeq(seq_from(get(r, 0)?, "cohort_members.seq")?),
                        braze_id: parsed(get(r, 1)?, "users.braze_id", BrazeId::parse)?,
                        external_id: parsed_opt(
                            get(r, 2)?,
                            "users.external_id",
                            ExternalId::parse,
                        )?,
                        entered_at: Millis(get(r, 3)?),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
                .map(Some)
        })
    }

    fn user_cohorts(
        &self,
        workspace: WorkspaceId,
        braze_id: BrazeId,
    ) -> StoreFuture<'_, Option<Vec<UserCohort>>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let user = client
                .query_opt(
                    "SELECT seq FROM users WHERE workspace_id = $1 AND braze_id = $2 AND deleted_at IS NULL",
                    &[&workspace.0, &braze_id.as_str()],
                )
                .await
                .map_err(pg_err)?;
            let Some(user) = user else {
                return Ok(None);
            };
            let seq: i64 = get(&user, 0)?;
            let rows = client
                .query(
                    "SELECT c.partner, c.cohort_id, c.name, m.entered_at FROM cohort_members m
                     JOIN cohorts c ON c.workspace_id = m.workspace_id AND c.id = m.cohort
                     WHERE m.workspace_id = $1 AND m.seq = $2 ORDER BY c.partner COLLATE \"C\", c.name COLLATE \"C\", c.cohort_id COLLATE \"C\"",
                    &[&workspace.0, &seq],
                )
                .await
                .map_err(pg_err)?;
            rows.iter()
                .map(|r| {
                    Ok(UserCohort {
                        partner: get(r, 0)?,
                        cohort_id: cohort_id_at(r, 1)?,
                        name: get(r, 2)?,
                        entered_at: Millis(get(r, 3)?),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
                .map(Some)
        })
    }

    fn recent_cohort_changes(
        &self,
        workspace: WorkspaceId,
        last: usize,
    ) -> StoreFuture<'_, Vec<tideway_core::store::RecentCohortChanges>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let last = i64::try_from(last).unwrap_or(i64::MAX);
            let rows = client
                .query(
                    "SELECT c.partner, c.cohort_id, c.name,
                            SUM(CASE WHEN r.entered THEN 1 ELSE 0 END)::bigint,
                            SUM(CASE WHEN r.entered THEN 0 ELSE 1 END)::bigint,
                            MIN(r.at), MAX(r.at)
                     FROM (SELECT cohort, entered, at FROM cohort_membership_changes
                           WHERE workspace_id = $1 ORDER BY change_seq DESC LIMIT $2) r
                     JOIN cohorts c ON c.workspace_id = $1 AND c.id = r.cohort
                     GROUP BY c.id, c.partner, c.cohort_id, c.name
                     ORDER BY MAX(r.at) DESC, c.id",
                    &[&workspace.0, &last],
                )
                .await
                .map_err(pg_err)?;
            rows.iter()
                .map(|r| {
                    let entered: i64 = get(r, 3)?;
                    let left: i64 = get(r, 4)?;
                    Ok(tideway_core::store::RecentCohortChanges {
                        partner: get(r, 0)?,
                        cohort_id: cohort_id_at(r, 1)?,
                        name: get(r, 2)?,
                        entered: u64::try_from(entered).unwrap_or(0),
                        left: u64::try_from(left).unwrap_or(0),
                        first_at: Millis(get(r, 5)?),
                        last_at: Millis(get(r, 6)?),
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log statements name their counters as literals (`range_then!` builds SQL text at
    /// compile time); they must be the counters' names.
    #[test]
    fn log_statements_take_their_own_counters() {
        for (statement, sequence) in [
            (INSERT_EVENTS, Sequence::EventLog),
            (INSERT_MEMBERSHIP_CHANGES, Sequence::CohortMembershipChanges),
            (INSERT_USER_CHANGES, Sequence::SegmentUserChanges),
        ] {
            assert!(
                statement.contains(&format!("VALUES ($1, '{}',", sequence.name())),
                "{statement}"
            );
        }
    }
}
