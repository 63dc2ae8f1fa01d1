//! The embedded SQLite store: one writer thread doing group commit, a pool of readers.
//!
//! Why a single writer: SQLite allows one writer at a time anyway, and a transaction's cost is
//! dominated by its commit (the WAL append and, with `synchronous=FULL`, the fsync). So the
//! writer drains every job that is waiting (up to `max_batch`), runs them all in one
//! transaction, commits once, and only then answers each caller. A request is therefore
//! acknowledged only after its data and its Currents events are durable, and many concurrent
//! requests share one commit.
//!
//! Jobs run optimistically, without savepoints (a savepoint copies every page a job touches
//! into a sub-journal, which cost the ingest path a quarter of its time). Jobs rarely fail, and
//! they are re-runnable: when one does, the whole batch is rolled back and run again with one
//! savepoint per job, so the failing job rolls back alone. After the jobs, in the same
//! transaction, the writer does a bounded step of the work kept behind the acknowledgements
//! (`behind`: profile rows, the behaviour index).
//!
//! Readers use their own connections (WAL lets them run beside the writer) on tokio's blocking
//! pool. Other processes (the admin CLI) may open the same file: SQLite's locking plus a busy
//! timeout keep that safe.

mod admin;
mod behind;
pub(crate) mod canvas;
mod cohorts;
pub mod currents;
mod dashboard;
#[cfg(feature = "failpoints")]
mod failpoints;
pub(crate) mod messaging;
mod schema;
pub(crate) mod segments;
mod users;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use tideway_core::clock::Millis;
use tideway_core::cohorts::CohortId;
use tideway_core::ids::{AliasLabel, BrazeId, WorkspaceId};
use tideway_core::keys::{ApiKey, KeyHash, Secret};
use tideway_core::store::{
    AdminStore, CohortMember, CohortStore, CohortSummary, HeapWebhook, ImportKeyInfo,
    ImportKeyOwner, NewApiKey, ReadWork, SegmentStore, StoreError, StoreFuture, UnitOfWork,
    UserCohort, UserStore, WorkOutput, Workspace,
};
use tideway_core::users::WriteCtx;
use tokio::sync::{mpsc, oneshot};

use crate::ids::RandomIds;
#[cfg(feature = "failpoints")]
pub use failpoints::Failpoints;
pub use users::SqlUsers;
use users::UserCache;

/// How hard SQLite syncs each commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// WAL + NORMAL: a commit survives a process crash (`kill -9`); the last commits may be
    /// lost on power failure or an OS crash.
    Normal,
    /// WAL + FULL: every commit is fsynced before it is acknowledged.
    Full,
}

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub synchronous: Synchronous,
    /// Most jobs committed in one transaction.
    pub max_batch: usize,
    /// Longest array custom attribute (Braze's default is 25).
    pub max_array_len: usize,
    /// About how long the writer takes to write deferred profile rows (one sweep, see
    /// `behind`): longer coalesces more changes per row write; shorter keeps `user_log`
    /// (replayed after a crash) shorter.
    pub sweep_period: Duration,
    /// Most users the writer keeps in memory beyond those whose rows are behind (~1 KB each).
    pub max_cached_users: usize,
    /// Bound on the WAL file, in bytes. When a batch leaves the WAL larger, the writer
    /// checkpoints it (RESTART) before the next batch, so the next commit writes it from the
    /// start again; and a WAL restarted from a larger size is truncated to this
    /// (`journal_size_limit`). The file stays within about this plus one batch, unless a
    /// reader holds an old snapshot through the checkpoint (it is retried every 500 ms until
    /// the reader is done).
    pub wal_limit: u64,
    /// Planned failure points armed by tests.
    #[cfg(feature = "failpoints")]
    pub failpoints: Arc<Failpoints>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Normal,
            max_batch: 512,
            max_array_len: 25,
            sweep_period: behind::SWEEP_PERIOD,
            max_cached_users: 200_000,
            wal_limit: DEFAULT_WAL_LIMIT,
            #[cfg(feature = "failpoints")]
            failpoints: Arc::default(),
        }
    }
}

/// What the writer thread keeps between jobs.
struct WriterEnv {
    ids: RandomIds,
    options: SqliteOptions,
    /// The writer's view of users, the truth for the users it holds (see `UserCache`).
    cache: UserCache,
    behind: behind::Behind,
    /// A rollback cleared the cache and the replay of `user_log` that must follow it failed:
    /// the `users` rows may be stale, so no job runs (each is refused as unavailable) until a
    /// replay, retried at every batch and tick, succeeds.
    rows_stale: bool,
}

/// One caller's operation. `run` may be called more than once (a failed optimistic batch is
/// re-run with savepoints); each run leaves its result for `answer`, which is called once with
/// the outcome of the commit.
struct Job {
    run: JobRun,
    answer: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
}

type JobRun = Box<dyn FnMut(&Connection, &mut WriterEnv) -> Result<(), StoreError> + Send>;

/// The SQLite-backed [`Store`](tideway_core::store::Store).
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    /// Dropped with the store, which ends the checkpoint thread.
    _checkpoint_stop: std::sync::mpsc::Sender<()>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    options: SqliteOptions,
    /// [`SegmentStore::lock_segment_definitions`]: one process owns the file (it holds the
    /// writer), so a lock of the process serialises every segment change. One for every
    /// workspace: changes are rare and short.
    segment_definitions: Arc<tokio::sync::Mutex<()>>,
}

/// What a SQLite failure means to a caller, decided once and exhaustively: a database that
/// is busy, full, unreadable or unwritable right now is `Unavailable` (503, retry or fix the
/// disk); a broken uniqueness rule is a `Conflict` (409); a damaged file, or SQL this crate
/// should never have sent, is `Corrupt` (500, the detail logged here, never sent).
pub(crate) fn sql_err(e: rusqlite::Error) -> StoreError {
    crate::counted(mapped(e))
}

fn mapped(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as C;
    let rusqlite::Error::SqliteFailure(failure, _) = &e else {
        // Column types, conversions, missing rows: the data is not what the schema promises.
        tracing::error!(error = %e, "unexpected SQLite result");
        return StoreError::Corrupt(e.to_string());
    };
    match failure.code {
        C::DatabaseBusy
        | C::DatabaseLocked
        | C::OutOfMemory
        | C::ReadOnly
        | C::SystemIoFailure
        | C::DiskFull
        | C::CannotOpen
        | C::FileLockingProtocolFailed
        | C::PermissionDenied
        | C::OperationInterrupted
        | C::OperationAborted
        | C::SchemaChanged
        | C::NoLargeFileSupport => StoreError::Unavailable(e.to_string()),
        C::ConstraintViolation => {
            tracing::debug!(error = %e, "uniqueness rule broken");
            StoreError::Conflict("a record with the same key".to_owned())
        }
        _ => {
            tracing::error!(error = %e, "SQLite failure that retrying cannot fix");
            StoreError::Corrupt(e.to_string())
        }
    }
}

/// How long a connection waits for a lock another one holds (the admin CLI beside the server).
/// The name of the store's writer thread (benches read its CPU time by this name).
pub const WRITER_THREAD_NAME: &str = "tideway-writer";

const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Each connection's page cache is 8 MiB. More does not help here and costs: SQLite scans a
/// connection's whole page-cache hash table at the end of every write transaction (and a
/// reader drops its cache whenever the WAL moved on), which with 64 MiB was 5 % of the
/// ingest writer's time. The writer reads little (it keeps the users it writes in memory).
fn open_connection(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sql_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_err)?;
    let sync = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA cache_size = -8192; PRAGMA temp_store = MEMORY;"
    ))
    .map_err(sql_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// `path` with `suffix` appended to its file name (`tideway.sqlite` → `tideway.sqlite-wal`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes the database files readable by their owner only: they hold Currents bearer tokens,
/// the Heap webhook secret, partner API keys and every user's profile. SQLite gives the
/// `-wal` and `-shm` files it creates the database file's mode, so creating that file 0600
/// before SQLite opens it covers them; files an older version left looser are tightened.
fn restrict_files(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let cannot = |what: &str, file: &Path, e: std::io::Error| {
        StoreError::Unavailable(format!("cannot {what} {}: {e}", file.display()))
    };
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        // An empty file is an empty database to SQLite.
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(cannot("create", path, e)),
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let file = sibling(path, suffix);
        let mode = match std::fs::metadata(&file) {
            Ok(meta) => meta.permissions().mode(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(cannot("inspect", &file, e)),
        };
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| cannot("restrict the permissions of", &file, e))?;
            tracing::info!(file = %file.display(), was = format!("{:o}", mode & 0o777), "made a database file readable by its owner only (0600)");
        }
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, migrates it, and starts the writer.
    /// The database files are made readable by their owner only (see `restrict_files`).
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        restrict_files(path)?;
        let mut conn = open_connection(path, options.synchronous)?;
        // A newer build's database: its tables may mean what this build does not know, so it
        // is not touched (as PostgreSQL's `schema_migrations` check does).
        let found = schema::version(&conn).map_err(sql_err)?;
        if found > schema::SCHEMA_VERSION {
            return Err(StoreError::Invalid(format!(
                "the database schema is version {found}, newer than this build's {}: run the \
                 Tideway release that wrote it (or a later one)",
                schema::SCHEMA_VERSION
            )));
        }
        schema::migrate(&mut conn).map_err(sql_err)?;
        // Profiles logged but not yet written to their rows (a crash, or another process
        // stopped) are written now, before anything reads the rows.
        {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(sql_err)?;
            let replayed = behind::replay(&tx)?;
            tx.commit().map_err(sql_err)?;
            if replayed > 0 {
                tracing::info!(
                    users = replayed,
                    "wrote deferred profiles from the user log"
                );
            }
        }
        // The channel bound is backpressure: when the writer falls behind, callers wait here
        // instead of piling up unbounded memory.
        let (jobs, rx) = mpsc::channel::<Job>(options.max_batch * 4);
        // Checkpoints run on their own thread and connection: done inside the writer's commit
        // (SQLite's default) they would stall every acknowledgement behind copying the WAL back.
        // Only when the WAL passes its bound does the writer checkpoint, between batches (see
        // `WalBound`); a WAL restarted from beyond the bound is truncated back to it.
        conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {};",
            i64::try_from(options.wal_limit).unwrap_or(i64::MAX)
        ))
        .map_err(sql_err)?;
        let writer_options = options.clone();
        let checkpointing = Arc::new(Mutex::new(()));
        let wal = WalBound {
            path: sibling(path, "-wal"),
            limit: options.wal_limit,
            retry_at: None,
            checkpointing: Arc::clone(&checkpointing),
        };
        std::thread::Builder::new()
            .name(WRITER_THREAD_NAME.into())
            .spawn(move || writer_loop(conn, rx, writer_options, wal))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        // An idle writer still finishes the work it keeps behind: a tick is an empty job,
        // and every batch ends with a step of that work. The tick holds only a weak sender, so
        // dropping the store still stops the writer.
        let weak = jobs.downgrade();
        std::thread::Builder::new()
            .name("tideway-tick".into())
            .spawn(move || {
                while let Some(jobs) = weak.upgrade() {
                    if jobs.capacity() == jobs.max_capacity() {
                        let _ = jobs.try_send(Job {
                            run: Box::new(|_, _| Ok(())),
                            answer: Box::new(|_| ()),
                        });
                    }
                    drop(jobs);
                    std::thread::sleep(behind::TICK);
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the tick thread: {e}")))?;
        let (checkpoint_stop, stopped) = std::sync::mpsc::channel::<()>();
        let checkpointer = open_connection(path, options.synchronous)?;
        std::thread::Builder::new()
            .name("tideway-ckpt".into())
            .spawn(move || checkpoint_loop(&checkpointer, &stopped, &checkpointing))
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the checkpoint thread: {e}"))
            })?;
        Ok(SqliteStore {
            jobs,
            _checkpoint_stop: checkpoint_stop,
            readers: Arc::new(Mutex::new(Vec::new())),
            path: path.to_owned(),
            options,
            segment_definitions: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Runs `f` in the writer's current transaction and answers after the commit. `f` may run
    /// more than once (only the last run's effects are committed).
    fn write<T, F>(&self, mut f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &mut RandomIds, &SqliteOptions) -> Result<T, StoreError>
            + Send
            + 'static,
    {
        self.write_env(move |conn, env| f(conn, &mut env.ids, &env.options))
    }

    /// [`SqliteStore::write`] with access to the whole writer environment (the user cache).
    fn write_env<T, F>(&self, mut f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnMut(&Connection, &mut WriterEnv) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, StoreError>>();
        let slot = Arc::new(Mutex::new(None::<Result<T, StoreError>>));
        let run_slot = Arc::clone(&slot);
        let job = Job {
            run: Box::new(move |conn, env| {
                let result = f(conn, env);
                let failed = result.as_ref().err().cloned();
                if let Ok(mut slot) = run_slot.lock() {
                    *slot = Some(result);
                }
                failed.map_or(Ok(()), Err)
            }),
            answer: Box::new(move |commit| {
                let result = slot
                    .lock()
                    .ok()
                    .and_then(|mut s| s.take())
                    .unwrap_or_else(|| {
                        Err(StoreError::Unavailable("the write did not run".into()))
                    });
                let _ = reply.send(commit.and(result));
            }),
        };
        Box::pin(async move {
            self.jobs
                .send(job)
                .await
                .map_err(|_| StoreError::Unavailable("the writer has stopped".into()))?;
            answer.await.map_err(|_| {
                StoreError::Unavailable("the writer stopped before answering".into())
            })?
        })
    }

    /// Makes the workspace's `users` rows and behaviour index current (the writer keeps some
    /// of both behind its acknowledgements): readers of profiles call it first, so they see
    /// every write acknowledged before them.
    fn flush_workspace(&self, workspace: WorkspaceId) -> StoreFuture<'_, ()> {
        self.write_env(move |conn, env| behind::flush_workspace(conn, &mut env.cache, workspace.0))
    }

    /// Runs a workspace-scoped user service in the writer.
    fn write_users<T, F>(&self, workspace: &Workspace, now: Millis, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnMut(&mut SqlUsers<'_>, &mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let workspace = workspace.clone();
        let mut f = f;
        self.write_env(move |conn, env| {
            let mut tx = SqlUsers::writer(conn, workspace.id, &mut env.cache);
            let mut ctx = WriteCtx {
                workspace: &workspace,
                now,
                ids: &mut env.ids,
                max_array_len: env.options.max_array_len,
            };
            let out = f(&mut tx, &mut ctx)?;
            tx.finish()?;
            Ok(out)
        })
    }

    /// Runs `f` on a pooled reader connection on the blocking thread pool.
    fn read<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let readers = Arc::clone(&self.readers);
        let path = self.path.clone();
        let sync = self.options.synchronous;
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let pooled = readers
                    .lock()
                    .map_err(|_| StoreError::Unavailable("reader pool poisoned".into()))?
                    .pop();
                let conn = match pooled {
                    Some(c) => c,
                    None => open_connection(&path, sync)?,
                };
                let result = f(&conn);
                if let Ok(mut pool) = readers.lock() {
                    pool.push(conn);
                }
                result
            })
            .await
            .map_err(|e| StoreError::Unavailable(format!("reader task failed: {e}")))?
        })
    }
}

/// How often committed WAL frames are copied back into the database file. A page rewritten by
/// many commits in between (the tail pages of the logs) is copied, and synced, once. Copying
/// back is not enough to bound the WAL under continuous writes (SQLite reuses it from the
/// start only when a write begins with every frame copied back and no reader in it): the
/// writer does that part ([`WalBound`]), and these checkpoints keep what is left for it, which
/// it copies while the next batch waits, to about this much ingest. (Measured with `tideway
/// bench ingest`: every 1 s, a forced checkpoint stalled the writer 60-320 ms; every 250 ms,
/// 70-130 ms; every 100 ms, no better, with more syncs.)
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The default [`SqliteOptions::wal_limit`]: DESIGN.md §4 wants the WAL ≤ 256 MiB under
/// sustained ingest, and this leaves room for the batch that passes it and for a forced
/// checkpoint a reader delays.
pub const DEFAULT_WAL_LIMIT: u64 = 128 << 20;

/// How long a forced checkpoint waits for the checkpoint thread and for readers of older
/// snapshots; every batch waits with it, so it is short, and it is retried.
const FORCED_CHECKPOINT_WAIT: Duration = Duration::from_millis(250);

/// After a forced checkpoint that could not finish (a long read, such as a segment load, still
/// needs the WAL), the writer carries on this long before it tries again, instead of stalling
/// every batch on that reader.
const FORCED_CHECKPOINT_RETRY: Duration = Duration::from_millis(500);

/// Copies committed WAL frames back into the database file every [`CHECKPOINT_EVERY`]
/// (PASSIVE: never blocks the writer or readers), until the store is dropped.
/// `checkpointing` is held while checkpointing, shared with the writer's forced checkpoints:
/// SQLite answers a checkpoint that finds another one running with BUSY at once, without
/// waiting, so the two take turns here instead.
fn checkpoint_loop(
    conn: &Connection,
    stop: &std::sync::mpsc::Receiver<()>,
    checkpointing: &Mutex<()>,
) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        let _turn = checkpointing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
        }
    }
    // A last full checkpoint so a cleanly stopped store leaves a small WAL behind.
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
}

/// Keeps the WAL file within [`SqliteOptions::wal_limit`]: after a batch that leaves it larger,
/// the writer itself runs a RESTART checkpoint (it copies back what the checkpoint thread has
/// not, waits for readers to leave the WAL), so the next commit writes the WAL from its start
/// again, and `journal_size_limit` cuts the file back to the limit. The writer is the one
/// connection that can do it: any checkpoint that waits for writers to pause would wait for it
/// forever under continuous ingest.
struct WalBound {
    /// The `-wal` file, whose size is the measure.
    path: PathBuf,
    limit: u64,
    /// Set when a forced checkpoint could not finish: not before then again.
    retry_at: Option<std::time::Instant>,
    /// Taken in turns with the checkpoint thread (see [`checkpoint_loop`]).
    checkpointing: Arc<Mutex<()>>,
}

impl WalBound {
    /// Between batches: measures the WAL and checkpoints it if it is past the limit.
    fn after_batch(&mut self, conn: &Connection) {
        let Ok(size) = std::fs::metadata(&self.path).map(|m| m.len()) else {
            // No WAL file (yet): nothing to bound.
            return;
        };
        metrics::gauge!("tideway_store_wal_bytes").set(size as f64);
        if size <= self.limit {
            return;
        }
        let now = std::time::Instant::now();
        if self.retry_at.is_some_and(|at| now < at) {
            return;
        }
        metrics::counter!("tideway_store_wal_forced_checkpoints_total").increment(1);
        let _turn = self
            .checkpointing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = conn.busy_timeout(FORCED_CHECKPOINT_WAIT);
        // The row is (busy, frames in the log, frames copied back); busy = 1 when a reader
        // kept the checkpoint from finishing.
        let busy = conn
            .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0))
            .map_err(sql_err);
        let _ = conn.busy_timeout(BUSY_TIMEOUT);
        // How long the next batch waited: what bounding the WAL costs the ingest path.
        metrics::histogram!("tideway_store_wal_forced_checkpoint_seconds")
            .record(now.elapsed().as_secs_f64());
        match busy {
            Ok(0) => self.retry_at = None,
            outcome => {
                metrics::counter!("tideway_store_wal_checkpoints_delayed_total").increment(1);
                tracing::debug!(
                    wal_bytes = size,
                    ?outcome,
                    "forced WAL checkpoint could not finish (a reader is still in the WAL); retried shortly"
                );
                self.retry_at = Some(now + FORCED_CHECKPOINT_RETRY);
            }
        }
    }
}

fn writer_loop(
    conn: Connection,
    mut rx: mpsc::Receiver<Job>,
    options: SqliteOptions,
    mut wal: WalBound,
) {
    let mut env = WriterEnv {
        ids: RandomIds::default(),
        options: options.clone(),
        cache: UserCache::with_limit(options.max_cached_users),
        behind: behind::Behind::new(options.sweep_period),
        rows_stale: false,
    };
    let mut batch: Vec<Job> = Vec::with_capacity(options.max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < options.max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let size = batch.len();
        let started = std::time::Instant::now();
        let committed = if env.rows_stale {
            replay_owed(&conn, &mut env)
        } else {
            Ok(())
        }
        .and_then(|()| run_batch(&conn, &mut env, &mut batch));
        if committed.is_err() && !env.rows_stale {
            // Rolled back: the cache may remember what was undone. (Rows already stale are
            // replayed before the next batch instead.)
            let _ = reset(&conn, &mut env);
        }
        env.cache.trim();
        metrics::counter!("tideway_store_commits_total").increment(1);
        metrics::histogram!("tideway_store_commit_batch_jobs").record(size as f64);
        metrics::histogram!("tideway_store_commit_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = &committed {
            tracing::error!(error = %e, jobs = size, "commit failed; every job in the batch is answered with an error");
        }
        for job in batch.drain(..) {
            (job.answer)(committed.clone());
        }
        // After the answers: a forced checkpoint delays the next batch, not this one.
        wal.after_batch(&conn);
    }
    // Shutting down: write what is behind, so a clean stop leaves no log to replay.
    if conn.execute_batch("BEGIN IMMEDIATE").is_ok() {
        match behind::replay(&conn) {
            Ok(_) => {
                let _ = conn.execute_batch("COMMIT");
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not write deferred profiles at shutdown; they are replayed at the next open");
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
    }
}

/// What a job is answered while the writer cannot trust the `users` rows: unavailable (503),
/// so the caller retries; nothing of it ran.
fn refused() -> StoreError {
    StoreError::Unavailable(
        "the store is recovering from a failed write; nothing was applied, retry shortly".into(),
    )
}

/// After a rollback that may have undone what the writer's cache remembers: forgets it and
/// replays `user_log` into `users` (in the caller's transaction, or in autocommit mode). If
/// the replay fails, the rows may be stale — a job computing a user's next state from one
/// would overwrite acknowledged changes — so the writer marks them stale and runs no job
/// until a replay succeeds ([`replay_owed`]); the error returned is the refusal.
fn reset(conn: &Connection, env: &mut WriterEnv) -> Result<(), StoreError> {
    behind::forget(&mut env.cache, &mut env.behind);
    #[cfg(feature = "failpoints")]
    let planned = env.options.failpoints.before_replay();
    #[cfg(not(feature = "failpoints"))]
    let planned = Ok(());
    match planned.and_then(|()| behind::replay(conn)) {
        Ok(_) => Ok(()),
        Err(e) => {
            if !env.rows_stale {
                tracing::error!(error = %e, "replaying the user log after a rollback failed; writes are refused (503) until a replay succeeds, retried at every batch");
            }
            env.rows_stale = true;
            metrics::counter!("tideway_store_replay_failures_total").increment(1);
            metrics::gauge!("tideway_store_refusing_writes").set(1.0);
            Err(refused())
        }
    }
}

/// Before a batch, while the rows are stale: the replay a failed [`reset`] left owed, in its
/// own transaction. Until it commits, the batch is refused.
fn replay_owed(conn: &Connection, env: &mut WriterEnv) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|_| refused())?;
    let replayed = reset(conn, env).and_then(|()| conn.execute_batch("COMMIT").map_err(sql_err));
    if replayed.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(refused());
    }
    env.rows_stale = false;
    metrics::gauge!("tideway_store_refusing_writes").set(0.0);
    tracing::info!("replayed the user log; writes are accepted again");
    Ok(())
}

/// Runs a batch in one transaction and commits it: optimistically without savepoints first;
/// if a job fails, rolls everything back and runs the batch again with one savepoint per job.
/// Then the step of work kept behind (in its own savepoint: if it fails, it is only delayed).
/// If a replay after a rollback fails, the whole batch is rolled back and refused.
fn run_batch(conn: &Connection, env: &mut WriterEnv, batch: &mut [Job]) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql_err)?;
    let next = behind::next_log_id(conn);
    match next {
        Ok(next) => env.cache.next_log_id = env.cache.next_log_id.max(next),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    let failed = batch.iter_mut().any(|job| (job.run)(conn, env).is_err());
    if failed {
        metrics::counter!("tideway_store_batch_reruns_total").increment(1);
        conn.execute_batch("ROLLBACK").map_err(sql_err)?;
        reset(conn, env)?;
        conn.execute_batch("BEGIN IMMEDIATE").map_err(sql_err)?;
        for job in batch.iter_mut() {
            if let Err(refusal) = run_in_savepoint(job, conn, env) {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(refusal);
            }
        }
    }
    if conn.execute_batch("SAVEPOINT behind").is_ok() {
        let stepped = behind::step(conn, &mut env.cache, &mut env.behind);
        if let Err(e) = stepped {
            tracing::warn!(error = %e, "work behind the log failed; retried after the next batch");
            let _ = conn.execute_batch("ROLLBACK TO behind");
            // What the step marked clean may have been rolled back with it.
            if let Err(refusal) = reset(conn, env) {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(refusal);
            }
        }
        let _ = conn.execute_batch("RELEASE behind");
    }
    let committed = conn.execute_batch("COMMIT").map_err(sql_err);
    if committed.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    committed
}

/// Runs one job inside its own savepoint, rolling back only it if it fails. An error is a
/// refusal of the whole batch: the job could not be isolated, or the replay after its
/// rollback failed.
fn run_in_savepoint(
    job: &mut Job,
    conn: &Connection,
    env: &mut WriterEnv,
) -> Result<(), StoreError> {
    if let Err(e) = conn.execute_batch("SAVEPOINT job") {
        // Not run again, the job would be answered with its rolled-back optimistic result.
        tracing::error!(error = %e, "cannot open a savepoint; the batch is refused");
        return Err(refused());
    }
    let undo = if (job.run)(conn, env).is_err() {
        "ROLLBACK TO job; RELEASE job"
    } else {
        "RELEASE job"
    };
    if let Err(e) = conn.execute_batch(undo) {
        tracing::error!(error = %e, "savepoint release failed");
    }
    if undo.starts_with("ROLLBACK") {
        // The cache may remember what the savepoint undid; the replay makes the rows (this
        // transaction's view of them) the truth again.
        reset(conn, env)?;
    }
    Ok(())
}

impl AdminStore for SqliteStore {
    fn create_workspace(&self, name: &str, now: Millis) -> StoreFuture<'_, Workspace> {
        let name = name.to_owned();
        self.write(move |conn, _, _| admin::create_workspace(conn, &name, now))
    }

    fn workspace_by_name(&self, name: &str) -> StoreFuture<'_, Option<Workspace>> {
        let name = name.to_owned();
        self.read(move |conn| admin::workspace_by_name(conn, &name))
    }

    fn list_workspaces(&self) -> StoreFuture<'_, Vec<Workspace>> {
        self.read(admin::list_workspaces)
    }

    fn accepts_writes(&self) -> StoreFuture<'_, bool> {
        // An empty job through the writer: it commits with the batch it joins (an empty
        // transaction writes nothing to the WAL), or is refused while the writer recovers.
        let empty = self.write(|_, _, _| Ok(()));
        Box::pin(async move {
            match empty.await {
                Ok(()) => Ok(true),
                Err(StoreError::Unavailable(_)) => Ok(false),
                Err(other) => Err(other),
            }
        })
    }

    fn create_api_key(&self, key: NewApiKey) -> StoreFuture<'_, ApiKey> {
        self.write(move |conn, _, _| admin::create_api_key(conn, key.clone()))
    }

    fn list_api_keys(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<ApiKey>> {
        self.read(move |conn| admin::list_api_keys(conn, workspace))
    }

    fn revoke_api_key(
        &self,
        workspace: WorkspaceId,
        id_or_prefix: &str,
        now: Millis,
    ) -> StoreFuture<'_, bool> {
        let key = id_or_prefix.to_owned();
        self.write(move |conn, _, _| admin::revoke_api_key(conn, workspace, &key, now))
    }

    fn find_api_key(&self, hash: KeyHash) -> StoreFuture<'_, Option<(ApiKey, Workspace)>> {
        self.read(move |conn| admin::find_api_key(conn, hash))
    }

    fn partner_api_key(
        &self,
        partner: &str,
        fresh: Secret,
        now: Millis,
    ) -> StoreFuture<'_, Secret> {
        let partner = partner.to_owned();
        self.write(move |conn, _, _| cohorts::partner_api_key(conn, &partner, &fresh, now))
    }

    fn check_partner_api_key(&self, partner: &str, key: Secret) -> StoreFuture<'_, bool> {
        let partner = partner.to_owned();
        self.read(move |conn| cohorts::check_partner_api_key(conn, &partner, &key))
    }

    fn create_import_key(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        secret: &Secret,
        now: Millis,
    ) -> StoreFuture<'_, ImportKeyInfo> {
        let (partner, secret) = (partner.to_owned(), secret.clone());
        self.write(move |conn, _, _| {
            cohorts::create_import_key(conn, workspace, &partner, &secret, now)
        })
    }

    fn list_import_keys(
        &self,
        workspace: WorkspaceId,
        partner: &str,
    ) -> StoreFuture<'_, Vec<ImportKeyInfo>> {
        let partner = partner.to_owned();
        self.read(move |conn| cohorts::list_import_keys(conn, workspace, &partner))
    }

    fn invalidate_import_key(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        id_or_prefix: &str,
        now: Millis,
    ) -> StoreFuture<'_, bool> {
        let (partner, key) = (partner.to_owned(), id_or_prefix.to_owned());
        self.write(move |conn, _, _| {
            cohorts::invalidate_import_key(conn, workspace, &partner, &key, now)
        })
    }

    fn set_partner_enabled(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        enabled: bool,
    ) -> StoreFuture<'_, ()> {
        let partner = partner.to_owned();
        self.write(move |conn, _, _| {
            cohorts::set_partner_enabled(conn, workspace, &partner, enabled)
        })
    }

    fn touch_import_key(&self, partner: &str, hash: KeyHash, now: Millis) -> StoreFuture<'_, ()> {
        let partner = partner.to_owned();
        self.write(move |conn, _, _| cohorts::touch_import_key(conn, &partner, hash, now))
    }

    fn partner_enabled(&self, workspace: WorkspaceId, partner: &str) -> StoreFuture<'_, bool> {
        let partner = partner.to_owned();
        self.read(move |conn| cohorts::partner_enabled(conn, workspace, &partner))
    }

    fn find_import_key(
        &self,
        partner: &str,
        hash: KeyHash,
    ) -> StoreFuture<'_, Option<ImportKeyOwner>> {
        let partner = partner.to_owned();
        self.read(move |conn| cohorts::find_import_key(conn, &partner, hash))
    }

    fn heap_webhook(
        &self,
        workspace: WorkspaceId,
        fresh: Secret,
        alias_label: Option<Option<AliasLabel>>,
    ) -> StoreFuture<'_, HeapWebhook> {
        self.write(move |conn, _, _| {
            cohorts::heap_webhook(conn, workspace, &fresh, alias_label.clone())
        })
    }

    fn heap_webhooks(&self) -> StoreFuture<'_, Vec<HeapWebhook>> {
        self.read(cohorts::heap_webhooks)
    }
}

impl UserStore for SqliteStore {
    fn run_unit(
        &self,
        workspace: &Workspace,
        now: Millis,
        mut work: UnitOfWork,
    ) -> StoreFuture<'_, WorkOutput> {
        self.write_users(workspace, now, move |tx, ctx| work(tx, ctx))
    }

    fn read_unit(&self, workspace: WorkspaceId, work: ReadWork) -> StoreFuture<'_, WorkOutput> {
        Box::pin(async move {
            // The writer keeps profile rows behind its acknowledgements: write this
            // workspace's first, so the read sees every acknowledged write.
            self.flush_workspace(workspace).await?;
            self.read(move |conn| work(&mut SqlUsers::reader(conn, workspace)))
                .await
        })
    }
}

impl CohortStore for SqliteStore {
    fn list_cohorts(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<CohortSummary>> {
        self.read(move |conn| cohorts::list_cohorts(conn, workspace))
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
        self.read(move |conn| {
            cohorts::cohort_members(conn, workspace, &partner, &cohort_id, after, limit)
        })
    }

    fn user_cohorts(
        &self,
        workspace: WorkspaceId,
        braze_id: BrazeId,
    ) -> StoreFuture<'_, Option<Vec<UserCohort>>> {
        self.read(move |conn| cohorts::user_cohorts(conn, workspace, &braze_id))
    }

    fn recent_cohort_changes(
        &self,
        workspace: WorkspaceId,
        last: usize,
    ) -> StoreFuture<'_, Vec<tideway_core::store::RecentCohortChanges>> {
        self.read(move |conn| cohorts::recent_cohort_changes(conn, workspace, last))
    }
}

impl SegmentStore for SqliteStore {
    fn create_segment(
        &self,
        workspace: WorkspaceId,
        segment: tideway_core::segments::Segment,
    ) -> StoreFuture<'_, tideway_core::segments::Segment> {
        self.write(move |conn, _, _| segments::create_segment(conn, workspace, segment.clone()))
    }

    fn segment(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, Option<tideway_core::segments::Segment>> {
        let id = id.to_owned();
        self.read(move |conn| segments::segment(conn, workspace, &id))
    }

    fn list_segments(
        &self,
        workspace: WorkspaceId,
    ) -> StoreFuture<'_, Vec<tideway_core::segments::Segment>> {
        self.read(move |conn| segments::list_segments(conn, workspace))
    }

    fn update_segment(
        &self,
        workspace: WorkspaceId,
        id: &str,
        name: String,
        filter: serde_json::Value,
        now: Millis,
    ) -> StoreFuture<'_, Option<tideway_core::segments::Segment>> {
        let id = id.to_owned();
        self.write(move |conn, _, _| {
            segments::update_segment(conn, workspace, &id, &name, &filter, now)
        })
    }

    fn delete_segment(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        self.write(move |conn, _, _| segments::delete_segment(conn, workspace, &id))
    }

    fn lock_segment_definitions(
        &self,
        _workspace: WorkspaceId,
    ) -> StoreFuture<'_, tideway_core::store::DefinitionsLock> {
        let lock = Arc::clone(&self.segment_definitions);
        Box::pin(async move {
            Ok(tideway_core::store::DefinitionsLock::new(
                lock.lock_owned().await,
            ))
        })
    }

    fn segment_profiles(
        &self,
        workspace: WorkspaceId,
    ) -> StoreFuture<'_, tideway_core::segments::ProfileSnapshot> {
        Box::pin(async move {
            self.flush_workspace(workspace).await?;
            self.read(move |conn| segments::snapshot(conn, workspace))
                .await
        })
    }

    fn segment_profile_changes(
        &self,
        workspace: WorkspaceId,
        after: tideway_core::segments::FeedPosition,
    ) -> StoreFuture<'_, tideway_core::segments::ProfileChanges> {
        // No flush: the feed reads pending profiles from `user_log` (see `segments.rs`).
        self.read(move |conn| segments::changes(conn, workspace, after))
    }

    fn segment_feed_head(
        &self,
        workspace: WorkspaceId,
    ) -> StoreFuture<'_, tideway_core::segments::FeedPosition> {
        self.read(move |conn| segments::feed_head(conn, workspace))
    }
}
