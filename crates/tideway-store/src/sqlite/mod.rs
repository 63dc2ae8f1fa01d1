//! The embedded SQLite store: one writer thread doing group commit, a pool of readers.
//!
//! Why a single writer: SQLite allows one writer at a time anyway, and a transaction's cost is
//! dominated by its commit (the WAL append and, with `synchronous=FULL`, the fsync). So the
//! writer drains every job that is waiting (up to `max_batch`), runs them all in one
//! transaction — each inside its own savepoint, so one failing job rolls back alone — commits
//! once, and only then answers each caller. A request is therefore acknowledged only after its
//! data and its Currents events are durable, and many concurrent requests share one commit.
//!
//! Readers use their own connections (WAL lets them run beside the writer) on tokio's blocking
//! pool. Other processes (the admin CLI) may open the same file: SQLite's locking plus a busy
//! timeout keep that safe.

mod admin;
mod cohorts;
pub mod currents;
mod schema;
mod segments;
mod users;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;
use tideway_core::clock::Millis;
use tideway_core::cohorts::{CohortChange, CohortId, CohortTx, CohortUpsert, MembershipOutcome};
use tideway_core::ids::{AliasLabel, BrazeId, ExternalId, WorkspaceId};
use tideway_core::keys::{ApiKey, KeyHash, Secret};
use tideway_core::store::{
    CohortMember, CohortSummary, HeapWebhook, ImportKeyInfo, ImportKeyOwner, LoggedEvent,
    NewApiKey, SegmentSyncOutcome, SegmentSyncPage, Store, StoreError, StoreFuture, UserCohort,
    Workspace,
};
use tideway_core::track::TrackRequest;
use tideway_core::users::{
    self as services, AliasNewItem, AliasUpdateItem, DeleteOutcome, DeleteRequest, ExportOutcome,
    ExportRequest, IdentifyItem, ItemOutcome, MergeItem, RemoveOutcome, RenameItem, RenameOutcome,
    TrackOutcome, WriteCtx,
};
use tokio::sync::{mpsc, oneshot};

use crate::ids::RandomIds;
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
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Normal,
            max_batch: 512,
            max_array_len: 25,
        }
    }
}

/// What the writer hands back after running a job: whether it failed (so its savepoint is
/// rolled back) and how to answer its caller once the commit outcome is known.
struct JobDone {
    failed: bool,
    answer: Box<dyn FnOnce(Result<(), StoreError>) + Send>,
}

/// What the writer thread keeps between jobs.
struct WriterEnv {
    ids: RandomIds,
    options: SqliteOptions,
    /// Users the writer has read or written recently. The writer is the only one that writes
    /// users, so its cache stays true; it is dropped whenever a job or a commit fails, since a
    /// rollback may have undone what it remembers.
    cache: UserCache,
}

type Job = Box<dyn FnOnce(&Connection, &mut WriterEnv) -> JobDone + Send>;

/// The SQLite-backed [`Store`].
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    /// Dropped with the store, which ends the checkpoint thread.
    _checkpoint_stop: std::sync::mpsc::Sender<()>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    options: SqliteOptions,
}

pub(crate) fn sql_err(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(code, _)
            if matches!(
                code.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        rusqlite::Error::SqliteFailure(code, _)
            if code.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(e.to_string())
        }
        rusqlite::Error::InvalidColumnType(..) | rusqlite::Error::FromSqlConversionFailure(..) => {
            StoreError::Corrupt(e.to_string())
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn open_connection(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(sql_err)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql_err)?;
    let sync = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY;"
    ))
    .map_err(sql_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, migrates it, and starts the writer.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        let mut conn = open_connection(path, options.synchronous)?;
        schema::migrate(&mut conn).map_err(sql_err)?;
        // The channel bound is backpressure: when the writer falls behind, callers wait here
        // instead of piling up unbounded memory.
        let (jobs, rx) = mpsc::channel::<Job>(options.max_batch * 4);
        // Checkpoints run on their own thread and connection: done inside the writer's commit
        // (SQLite's default) they would stall every acknowledgement behind copying the WAL back.
        conn.execute_batch("PRAGMA wal_autocheckpoint = 0")
            .map_err(sql_err)?;
        let writer_options = options.clone();
        std::thread::Builder::new()
            .name("tideway-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, writer_options))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        let (checkpoint_stop, stopped) = std::sync::mpsc::channel::<()>();
        let checkpointer = open_connection(path, options.synchronous)?;
        std::thread::Builder::new()
            .name("tideway-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpointer, &stopped))
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the checkpoint thread: {e}"))
            })?;
        Ok(SqliteStore {
            jobs,
            _checkpoint_stop: checkpoint_stop,
            readers: Arc::new(Mutex::new(Vec::new())),
            path: path.to_owned(),
            options,
        })
    }

    /// Runs `f` in the writer's current transaction (inside its own savepoint) and answers
    /// after the commit.
    fn write<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut RandomIds, &SqliteOptions) -> Result<T, StoreError>
            + Send
            + 'static,
    {
        self.write_env(move |conn, env| f(conn, &mut env.ids, &env.options))
    }

    /// [`SqliteStore::write`] with access to the whole writer environment (the user cache).
    fn write_env<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriterEnv) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Result<T, StoreError>>();
        let job: Job = Box::new(move |conn, env| {
            let result = f(conn, env);
            JobDone {
                failed: result.is_err(),
                answer: Box::new(move |commit| {
                    let _ = reply.send(commit.and(result));
                }),
            }
        });
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

    /// Runs a workspace-scoped user service in the writer.
    fn write_users<T, F>(&self, workspace: &Workspace, now: Millis, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&mut SqlUsers<'_>, &mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let workspace = workspace.clone();
        self.write_env(move |conn, env| {
            let mut tx = SqlUsers::writer(conn, workspace.id, &mut env.cache);
            let mut ctx = WriteCtx {
                workspace: &workspace,
                now,
                ids: &mut env.ids,
                max_array_len: env.options.max_array_len,
            };
            f(&mut tx, &mut ctx)
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

/// Copies committed WAL frames back into the database file every 200 ms (PASSIVE: never
/// blocks the writer or readers), until the store is dropped.
fn checkpoint_loop(conn: &Connection, stop: &std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        stop.recv_timeout(Duration::from_millis(200))
    {
        if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
        }
    }
    // A last full checkpoint so a cleanly stopped store leaves a small WAL behind.
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
}

fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<Job>, options: SqliteOptions) {
    let mut env = WriterEnv {
        ids: RandomIds,
        options: options.clone(),
        cache: UserCache::default(),
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
        let mut answers = Vec::with_capacity(size);
        let begun = conn.execute_batch("BEGIN IMMEDIATE").map_err(sql_err);
        if let Err(e) = begun {
            tracing::error!(error = %e, jobs = size, "cannot begin a write transaction");
            for job in batch.drain(..) {
                // The job never ran; answer its caller with the error via a no-op run.
                let done = run_isolated_failure(job, &conn, &mut env);
                (done.answer)(Err(e.clone()));
            }
            env.cache.clear();
            continue;
        }
        for job in batch.drain(..) {
            answers.push(run_in_savepoint(job, &conn, &mut env));
        }
        let committed = conn.execute_batch("COMMIT").map_err(sql_err);
        if committed.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
            env.cache.clear();
        }
        env.cache.trim();
        metrics::counter!("tideway_store_commits_total").increment(1);
        metrics::histogram!("tideway_store_commit_batch_jobs").record(size as f64);
        metrics::histogram!("tideway_store_commit_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = &committed {
            tracing::error!(error = %e, jobs = size, "commit failed; every job in the batch is answered with an error");
        }
        for answer in answers {
            answer(committed.clone());
        }
    }
}

fn run_in_savepoint(
    job: Job,
    conn: &Connection,
    env: &mut WriterEnv,
) -> Box<dyn FnOnce(Result<(), StoreError>) + Send> {
    if let Err(e) = conn.execute_batch("SAVEPOINT job") {
        let done = run_isolated_failure(job, conn, env);
        let e = sql_err(e);
        return Box::new(move |_| (done.answer)(Err(e)));
    }
    let done = job(conn, env);
    let undo = if done.failed {
        env.cache.clear();
        "ROLLBACK TO job; RELEASE job"
    } else {
        "RELEASE job"
    };
    if let Err(e) = conn.execute_batch(undo) {
        tracing::error!(error = %e, "savepoint release failed");
    }
    done.answer
}

/// Runs a job inside a savepoint that is always rolled back, used only to obtain its answer
/// channel when the transaction could not be started.
fn run_isolated_failure(job: Job, conn: &Connection, env: &mut WriterEnv) -> JobDone {
    let _ = conn.execute_batch("SAVEPOINT discard");
    let done = job(conn, env);
    let _ = conn.execute_batch("ROLLBACK TO discard; RELEASE discard");
    env.cache.clear();
    JobDone {
        failed: true,
        answer: done.answer,
    }
}

impl Store for SqliteStore {
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

    fn create_api_key(&self, key: NewApiKey) -> StoreFuture<'_, ApiKey> {
        self.write(move |conn, _, _| admin::create_api_key(conn, key))
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

    fn track(
        &self,
        workspace: &Workspace,
        request: TrackRequest,
        now: Millis,
    ) -> StoreFuture<'_, TrackOutcome> {
        self.write_users(workspace, now, move |tx, ctx| {
            services::track(tx, ctx, &request)
        })
    }

    fn identify(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, IdentifyItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome> {
        self.write_users(workspace, now, move |tx, ctx| {
            services::identify(tx, ctx, &items)
        })
    }

    fn alias_new(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, AliasNewItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome> {
        self.write_users(workspace, now, move |tx, ctx| {
            services::alias_new(tx, ctx, &items)
        })
    }

    fn alias_update(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, AliasUpdateItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome> {
        self.write_users(workspace, now, move |tx, ctx| {
            services::alias_update(tx, ctx, &items)
        })
    }

    fn merge_users(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, MergeItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome> {
        self.write_users(workspace, now, move |tx, ctx| {
            services::merge_users(tx, ctx, &items)
        })
    }

    fn delete_users(
        &self,
        workspace: &Workspace,
        request: DeleteRequest,
        now: Millis,
    ) -> StoreFuture<'_, DeleteOutcome> {
        self.write_users(workspace, now, move |tx, ctx| {
            services::delete_users(tx, ctx, &request)
        })
    }

    fn rename_external_ids(
        &self,
        workspace: &Workspace,
        items: Vec<RenameItem>,
        now: Millis,
    ) -> StoreFuture<'_, RenameOutcome> {
        self.write_users(workspace, now, move |tx, ctx| {
            services::rename_external_ids(tx, ctx, &items)
        })
    }

    fn remove_external_ids(
        &self,
        workspace: &Workspace,
        ids: Vec<ExternalId>,
    ) -> StoreFuture<'_, RemoveOutcome> {
        let now = workspace.created_at;
        self.write_users(workspace, now, move |tx, _| {
            services::remove_external_ids(tx, &ids)
        })
    }

    fn export_ids(
        &self,
        workspace: &Workspace,
        request: ExportRequest,
    ) -> StoreFuture<'_, ExportOutcome> {
        let ws = workspace.id;
        self.read(move |conn| {
            let mut lookup = SqlUsers::reader(conn, ws);
            services::export_ids(&mut lookup, &request)
        })
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
        self.write(move |conn, _, _| cohorts::heap_webhook(conn, workspace, &fresh, alias_label))
    }

    fn heap_webhooks(&self) -> StoreFuture<'_, Vec<HeapWebhook>> {
        self.read(cohorts::heap_webhooks)
    }

    fn upsert_cohort(
        &self,
        workspace: &Workspace,
        partner: &str,
        upsert: CohortUpsert,
        now: Millis,
    ) -> StoreFuture<'_, ()> {
        let partner = partner.to_owned();
        self.write_users(workspace, now, move |tx, _| {
            cohorts::upsert_cohort(tx, &partner, &upsert, now)
        })
    }

    fn apply_cohort_changes(
        &self,
        workspace: &Workspace,
        partner: &str,
        cohort_id: CohortId,
        changes: Vec<CohortChange>,
        now: Millis,
    ) -> StoreFuture<'_, MembershipOutcome> {
        let partner = partner.to_owned();
        self.write_users(workspace, now, move |tx, _| {
            if changes.iter().all(|c| c.identifiers.is_empty()) {
                // Partners test credentials with empty changes on made-up cohort ids: answer
                // without creating a cohort.
                return Ok(MembershipOutcome::default());
            }
            let cohort = tx.upsert_cohort(&partner, &cohort_id, None, now, now)?;
            tideway_core::cohorts::apply_changes(tx, cohort, &changes, now)
        })
    }

    fn apply_segment_sync(
        &self,
        workspace: &Workspace,
        partner: &str,
        page: SegmentSyncPage,
        now: Millis,
    ) -> StoreFuture<'_, SegmentSyncOutcome> {
        let partner = partner.to_owned();
        self.write_users(workspace, now, move |tx, _| {
            cohorts::apply_segment_sync(tx, &partner, &page, now)
        })
    }

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

    fn read_events(
        &self,
        workspace: WorkspaceId,
        after: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<LoggedEvent>> {
        self.read(move |conn| admin::read_events(conn, workspace, after, limit))
    }

    fn create_segment(
        &self,
        workspace: WorkspaceId,
        segment: tideway_core::segments::Segment,
    ) -> StoreFuture<'_, tideway_core::segments::Segment> {
        self.write(move |conn, _, _| segments::create_segment(conn, workspace, segment))
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

    fn segment_profiles(
        &self,
        workspace: WorkspaceId,
    ) -> StoreFuture<'_, tideway_core::segments::ProfileSnapshot> {
        self.read(move |conn| segments::snapshot(conn, workspace))
    }

    fn segment_profile_changes(
        &self,
        workspace: WorkspaceId,
        after: tideway_core::segments::FeedPosition,
    ) -> StoreFuture<'_, tideway_core::segments::ProfileChanges> {
        self.read(move |conn| segments::changes(conn, workspace, after))
    }
}
