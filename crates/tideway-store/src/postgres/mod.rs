//! The PostgreSQL store ([`PgStore`]): several `tideway serve` nodes on one database.
//!
//! Parts: a connection pool and error mapping (here), the schema with its migrations and
//! distribution table (`schema.rs`), the per-workspace commit sequences that order the logs
//! (`sequence.rs`), and one file per bounded context of the store contract: `admin.rs`
//! (workspaces and credentials), `users.rs` (the unit-of-work transaction, cohort reads),
//! `segments.rs` (segments and the change feed), `currents.rs` (the event log and Currents),
//! `messaging.rs` (campaigns, dispatches, the send queue), `dashboard.rs` (dashboard users,
//! sessions, failed sign-ins).
//! Tested against a real PostgreSQL 15 (`tests/it/postgres.rs` and the conformance suite;
//! `scripts/test` starts a throwaway server).
//!
//! The client is `tokio-postgres` behind a `deadpool-postgres` pool, without TLS (the database
//! is on loopback or a private network). Not sqlx: its SQLite driver links a different
//! `libsqlite3-sys` than rusqlite.

mod admin;
mod canvas;
mod currents;
mod dashboard;
mod messaging;
pub mod schema;
mod segments;
pub mod sequence;
mod users;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use tideway_core::store::StoreError;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

pub use schema::{DISTRIBUTION, Distribution, MigrateOutcome, migrate};
pub use sequence::{Sequence, allocate};

/// A pooled client; derefs to `tokio_postgres::Client` (and its transactions to
/// `tokio_postgres::Transaction`).
pub type PgClient = deadpool_postgres::Client;

/// How long a caller waits for a pooled connection, or for a new one to be made, before the
/// database counts as unavailable (rather than hanging a request behind a dead server).
const POOL_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections per process. Each node of a cluster holds its own pool, so this times the
/// number of nodes must stay under the server's `max_connections` (100 by default).
const POOL_SIZE: usize = 16;

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not a PostgreSQL connection string; retrying will not help.
    #[error(
        "invalid database URL: {0} (percent-encode any of @ : / ? # in the user name or password)"
    )]
    InvalidUrl(String),
    /// The URL parsed but the server could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database answers but holds no Tideway schema ([`PgStore::open_existing`]).
    #[error("the database has no Tideway schema")]
    NoSchema,
}

/// A pool of connections to one PostgreSQL database.
#[derive(Clone)]
pub struct PgPool {
    pool: Pool,
    sessions: Arc<Sessions>,
}

/// What the pool knows about its sessions' settings going stale.
///
/// A PostgreSQL session keeps the defaults it started with: after an operator's `ALTER
/// DATABASE … SET default_transaction_read_only = on` is reset, connections opened while it
/// was on still refuse every write, and a pool that never closes its connections would refuse
/// writes for ever. So a refusal for being read-only (SQLSTATE 25006, counted process-wide in
/// [`READ_ONLY_REFUSALS`] where errors are mapped) makes the pool retire its idle
/// connections, at most once a [`RETIRE_AT_MOST_EVERY`], and connections are retired after
/// [`MAX_CONNECTION_AGE`] anyway.
#[derive(Debug)]
struct Sessions {
    /// The [`READ_ONLY_REFUSALS`] count when this pool last retired its idle connections.
    refusals_seen: AtomicU64,
    /// When it did.
    retired_at: Mutex<Option<Instant>>,
}

/// Read-only refusals (SQLSTATE 25006) mapped in this process, by any pool.
static READ_ONLY_REFUSALS: AtomicU64 = AtomicU64::new(0);

/// The least time between two retirements of a pool's idle connections after read-only
/// refusals: while the database really is read-only, every write is refused, and the pool
/// should not reconnect for each.
const RETIRE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Idle connections older than this are closed by the sampler, so settings changed for new
/// sessions (per database or per role) reach every connection within this time.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(600);

impl std::fmt::Debug for PgPool {
    // The config holds the password; show only the pool's shape.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.pool.status();
        f.debug_struct("PgPool")
            .field("size", &status.size)
            .field("available", &status.available)
            .finish()
    }
}

impl PgPool {
    fn new(pool: Pool) -> PgPool {
        let sessions = Sessions {
            // Refusals before this pool existed are no reason to close its connections.
            refusals_seen: AtomicU64::new(READ_ONLY_REFUSALS.load(Ordering::Relaxed)),
            retired_at: Mutex::new(None),
        };
        PgPool {
            pool,
            sessions: Arc::new(sessions),
        }
    }

    /// A connection from the pool (made if none is idle), or `Unavailable`.
    pub async fn client(&self) -> Result<PgClient, StoreError> {
        self.retire_after_read_only_refusals();
        self.pool.get().await.map_err(pool_err)
    }

    /// Closes the idle connections if a write was refused as read-only since this pool last
    /// did (see [`Sessions`]). One atomic load when nothing was refused.
    fn retire_after_read_only_refusals(&self) {
        let refusals = READ_ONLY_REFUSALS.load(Ordering::Relaxed);
        if refusals == self.sessions.refusals_seen.load(Ordering::Relaxed) {
            return;
        }
        let mut retired_at = self
            .sessions
            .retired_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if retired_at.is_some_and(|at| at.elapsed() < RETIRE_AT_MOST_EVERY) {
            return;
        }
        *retired_at = Some(Instant::now());
        self.sessions
            .refusals_seen
            .store(refusals, Ordering::Relaxed);
        let closed = self.pool.retain(|_, _| false).removed.len();
        tracing::info!(
            closed,
            "writes were refused as read-only; idle PostgreSQL connections closed so new sessions take the database's current settings"
        );
    }

    /// Whether a pooled connection's transactions may write: the server is not a standby
    /// (`pg_is_in_recovery()`) and transactions are not read-only by default (what an operator
    /// sets, `default_transaction_read_only`, to stop writes without stopping the server).
    /// A connection that says no may only remember an old default (see `Sessions`): it is
    /// closed with the idle ones, and a new connection answers. Sets the
    /// `tideway_store_refusing_writes` gauge, as the SQLite store does, and the pool's.
    pub async fn accepts_writes(&self) -> Result<bool, StoreError> {
        self.record_gauges();
        let mut writable = false;
        for _ in 0..2 {
            let client = self.client().await?;
            let row = query_one(
                &client,
                "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'",
                &[],
            )
            .await?;
            writable = get(&row, 0)?;
            if writable {
                break;
            }
            drop(deadpool_postgres::Client::take(client));
            self.pool.retain(|_, _| false);
        }
        metrics::gauge!(REFUSING_WRITES).set(if writable { 0.0 } else { 1.0 });
        Ok(writable)
    }

    /// The pool's connections as gauges: open, idle, in use, and callers waiting for one.
    fn record_gauges(&self) {
        let status = self.pool.status();
        let idle = status.available;
        metrics::gauge!(POOL_CONNECTIONS, "state" => "idle").set(idle as f64);
        metrics::gauge!(POOL_CONNECTIONS, "state" => "in_use")
            .set(status.size.saturating_sub(idle) as f64);
        metrics::gauge!(POOL_WAITING).set(status.waiting as f64);
    }
}

/// 1 while the database refuses writes (read-only, a standby), 0 when it takes them; the SQLite
/// store sets the same gauge while it recovers from a failed write.
const REFUSING_WRITES: &str = "tideway_store_refusing_writes";
/// Connections of this node's pool by `state` (`idle`, `in_use`).
const POOL_CONNECTIONS: &str = "tideway_store_pool_connections";
/// Callers waiting for a pooled connection (at [`POOL_SIZE`] in use, requests queue here).
const POOL_WAITING: &str = "tideway_store_pool_waiting";

/// How often the pool's gauges and the database's writability are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples the pool's gauges and whether the database takes writes every [`SAMPLE_EVERY`],
/// and closes idle connections past [`MAX_CONNECTION_AGE`], until the pool is dropped (the
/// task holds it weakly).
fn spawn_sampler(pool: &PgPool) {
    let weak = pool.pool.weak();
    let sessions = Arc::clone(&pool.sessions);
    tokio::spawn(async move {
        loop {
            let Some(pool) = weak.upgrade().map(|pool| PgPool {
                pool,
                sessions: Arc::clone(&sessions),
            }) else {
                return;
            };
            pool.pool
                .retain(|_, metrics| metrics.created.elapsed() < MAX_CONNECTION_AGE);
            if let Err(error) = pool.accepts_writes().await {
                tracing::debug!(%error, "sampling whether PostgreSQL takes writes failed");
            }
            drop(pool);
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    });
}

/// How long data sent to the server may stay unacknowledged before the connection counts as
/// dead (`TCP_USER_TIMEOUT`). Without it a connection to a server that vanished from the
/// network (a partition, a host powered off) keeps retransmitting for about 15 minutes, and
/// every request on it hangs that long; with it the statement fails as `Unavailable` (a commit
/// in flight is looked up) and the pool makes a new connection.
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Keepalive probes find a dead server behind an *idle* pooled connection (nothing sent, so
/// nothing unacknowledged): the first after 15 s of silence, then every 5 s, dead after 3
/// unanswered, so a pool does not hand out a connection that died in the night.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// The client settings for `url`: its own (user, host, database, password, options) plus
/// Tideway's timeouts and keepalives, and `application_name` "tideway" unless the URL names one.
fn client_config(url: &str) -> Result<tokio_postgres::Config, ConnectError> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| ConnectError::InvalidUrl(e.to_string()))?;
    if config.get_application_name().is_none() {
        config.application_name("tideway");
    }
    config
        .connect_timeout(POOL_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .tcp_user_timeout(DEAD_PEER_TIMEOUT);
    Ok(config)
}

/// Opens a pool on `url` (`postgres://USER[:PASSWORD]@HOST:PORT/DB`) and checks that the server
/// answers, so a wrong URL or a server that is down fails at start, not at the first request.
pub async fn connect(url: &str) -> Result<PgPool, ConnectError> {
    let config = client_config(url)?;
    let manager = Manager::from_config(
        config,
        NoTls,
        // `Fast` trusts a returned connection unless it is closed; a broken one fails its next
        // statement with `Unavailable`, which callers already retry.
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(POOL_TIMEOUT))
        .recycle_timeout(Some(POOL_TIMEOUT))
        .build()
        .map_err(|e| ConnectError::InvalidUrl(e.to_string()))?;
    let pool = PgPool::new(pool);
    pool.client()
        .await?
        .simple_query("SELECT 1")
        .await
        .map_err(pg_err)?;
    Ok(pool)
}

/// What a [`PgStore`] is told besides where the database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgOptions {
    /// Longest array custom attribute (Braze's default is 25), as in `SqliteOptions`.
    pub max_array_len: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { max_array_len: 25 }
    }
}

/// The PostgreSQL backend of the store contract. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    options: PgOptions,
    /// The group-commit queue of units of work (`users.rs`).
    units: users::Units,
}

impl PgStore {
    /// Connects to `url`, runs the migrations (serialised between nodes by an advisory lock),
    /// and returns the store with default options.
    pub async fn open(url: &str) -> Result<PgStore, ConnectError> {
        PgStore::open_with(url, PgOptions::default()).await
    }

    /// [`PgStore::open`] with options.
    pub async fn open_with(url: &str, options: PgOptions) -> Result<PgStore, ConnectError> {
        PgStore::opened(connect(url).await?, options).await
    }

    /// [`PgStore::open_with`] on a database a node has already set up: one without Tideway's
    /// schema is refused ([`ConnectError::NoSchema`]) rather than given one, so an admin
    /// command pointed at the wrong database says so instead of creating tables there.
    pub async fn open_existing(url: &str, options: PgOptions) -> Result<PgStore, ConnectError> {
        let pool = connect(url).await?;
        let row = query_one(
            &pool.client().await?,
            "SELECT to_regclass('schema_migrations') IS NOT NULL",
            &[],
        )
        .await?;
        if !get::<bool>(&row, 0)? {
            return Err(ConnectError::NoSchema);
        }
        PgStore::opened(pool, options).await
    }

    async fn opened(pool: PgPool, options: PgOptions) -> Result<PgStore, ConnectError> {
        migrate(&pool).await?;
        spawn_sampler(&pool);
        Ok(PgStore {
            pool,
            options,
            units: users::Units::default(),
        })
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &PgOptions {
        &self.options
    }

    /// The pool this store uses (tests and benchmarks read the database through it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Maps a pool failure: timeouts and a closed pool are `Unavailable`; a backend error is mapped
/// by [`pg_err`].
pub fn pool_err(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_err(e),
        PoolError::Timeout(kind) => {
            let what = match kind {
                TimeoutType::Wait => "waiting for a free connection",
                TimeoutType::Create => "connecting",
                TimeoutType::Recycle => "checking a pooled connection",
            };
            StoreError::Unavailable(format!("PostgreSQL timed out {what}"))
        }
        PoolError::Closed => StoreError::Unavailable("the PostgreSQL pool is closed".to_owned()),
        // Both are wiring bugs (the pool is built with a runtime and without hooks), not
        // something a retry fixes.
        PoolError::NoRuntimeSpecified => {
            StoreError::Corrupt("the PostgreSQL pool has no runtime".to_owned())
        }
        PoolError::PostCreateHook(e) => {
            StoreError::Corrupt(format!("PostgreSQL connection hook failed: {e}"))
        }
    }
}

// ---- statements ---------------------------------------------------------------------------
// Every statement goes through the connection's statement cache (`prepare_cached`): the
// exporter and the dispatcher run the same few at high rates, and an unprepared `query` costs
// a second round trip each time. They run on a pooled client or inside a transaction alike.

/// Column `idx` of `row`, typed.
pub(super) fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    idx: usize,
) -> Result<T, StoreError> {
    row.try_get(idx).map_err(pg_err)
}

pub(super) async fn query<C: deadpool_postgres::GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, StoreError> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
    c.query(&stmt, params).await.map_err(pg_err)
}

pub(super) async fn query_opt<C: deadpool_postgres::GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<tokio_postgres::Row>, StoreError> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
    c.query_opt(&stmt, params).await.map_err(pg_err)
}

pub(super) async fn query_one<C: deadpool_postgres::GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<tokio_postgres::Row, StoreError> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
    c.query_one(&stmt, params).await.map_err(pg_err)
}

pub(super) async fn execute<C: deadpool_postgres::GenericClient>(
    c: &C,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<u64, StoreError> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
    c.execute(&stmt, params).await.map_err(pg_err)
}

/// Whether `id`, a caller's name for a stored thing (a campaign, dispatch, Canvas or segment
/// id), cannot name anything stored: PostgreSQL's text cannot hold a NUL character, so no row
/// has such an id. Lookups by it answer "none" without asking the database (which would refuse
/// the parameter), as SQLite, which can store a NUL, finds nothing: the caller's own not-found
/// answer (`Invalid Campaign ID`, `Invalid schedule_id`, …) is the same on both backends.
pub(super) fn names_nothing(id: &str) -> bool {
    id.contains('\0')
}

/// Whether the transaction `xid` (its `txid_current()`) committed, asked on another
/// connection when its own was lost with the answer to its `COMMIT`: `Some(true)` committed,
/// `Some(false)` rolled back, `None` not known (still running after `wait`, forgotten, or the
/// database unreachable), which leaves the outcome ambiguous.
pub async fn transaction_committed(
    pool: &PgPool,
    xid: i64,
    wait: std::time::Duration,
) -> Option<bool> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(client) = pool.client().await
            && let Ok(row) = client.query_one("SELECT txid_status($1)", &[&xid]).await
        {
            match row
                .try_get::<_, Option<String>>(0)
                .ok()
                .flatten()
                .as_deref()
            {
                Some("committed") => return Some(true),
                Some("aborted") => return Some(false),
                // In progress: its backend has not seen the connection go yet.
                Some(_) => {}
                None => return None,
            }
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// What an error says, for logs and `StoreError`s: the server's SQLSTATE and message (the
/// client's own text for a server error is only "db error"), or the client's text with its
/// cause (e.g. why a connection was refused).
fn described(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Maps a PostgreSQL error to what a caller can act on, as `sqlite::sql_err` does for SQLite:
/// `Unavailable` when retrying later may work (connection and IO failures, resource limits,
/// shutdown, a cancelled or conflicting transaction), `Conflict` for a broken uniqueness rule,
/// `Invalid` for text PostgreSQL cannot store, `Corrupt` for everything else (a statement or
/// data that does not match the schema: a bug). Each is counted in
/// `tideway_store_errors_total{kind}`.
pub fn pg_err(e: tokio_postgres::Error) -> StoreError {
    crate::counted(mapped(e))
}

fn mapped(e: tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        // Not a server answer: the socket (closed, IO error, timeout) or the client decoding
        // rows that do not have the types the code expects.
        if e.is_closed() || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
        {
            return StoreError::Unavailable(described(&e));
        }
        tracing::error!(error = %described(&e), "unexpected PostgreSQL client error");
        return StoreError::Corrupt(described(&e));
    };
    let code = db.code();
    if *code == SqlState::UNIQUE_VIOLATION {
        // Often expected (a name taken, nodes racing to create the first admin): debug.
        tracing::debug!(error = %described(&e), "uniqueness rule broken");
        return StoreError::Conflict("a record with the same key".to_owned());
    }
    // The caller's text, which PostgreSQL cannot store: a NUL character (a JSON `\u0000` in a
    // value that is stored as it is rather than as JSON), or a key past a B-tree entry's limit.
    if *code == SqlState::CHARACTER_NOT_IN_REPERTOIRE {
        tracing::info!(error = %described(&e), "text with a NUL character refused");
        return StoreError::Invalid("text must not contain a NUL character (\\u0000)".to_owned());
    }
    if *code == SqlState::PROGRAM_LIMIT_EXCEEDED {
        tracing::info!(error = %described(&e), "a value too long for an index refused");
        return StoreError::Invalid("a value is too long to be stored as a key".to_owned());
    }
    // A lock another session holds (`NOWAIT`, `lock_timeout`) or a read-only server (a standby
    // after a failover) pass; so does a statement refused because one before it in the same
    // transaction failed (statements are pipelined, so the error answered may be the
    // follower's, e.g. after a read-only refusal): the transaction did nothing.
    if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
        READ_ONLY_REFUSALS.fetch_add(1, Ordering::Relaxed);
    }
    if *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        || *code == SqlState::IN_FAILED_SQL_TRANSACTION
    {
        return StoreError::Unavailable(described(&e));
    }
    match &code.code()[..2] {
        // 08 connection exception, 53 insufficient resources (disk full, out of memory, too many
        // connections), 57 operator intervention (shutdown, cancel, cannot connect now), 58
        // system error (IO), 40 transaction rollback (serialization failure, deadlock: the
        // transaction did nothing and can be run again).
        "08" | "53" | "57" | "58" | "40" => StoreError::Unavailable(described(&e)),
        // 28 the login refused (a wrong or rotated password, a role that is gone), 3D the
        // database does not exist, 42501 a privilege missing: the server's configuration,
        // not damaged data. Nothing was done, and the operator's fix makes a retry work.
        "28" | "3D" => refused_by_configuration(&e),
        _ if *code == SqlState::INSUFFICIENT_PRIVILEGE => refused_by_configuration(&e),
        _ => {
            tracing::error!(error = %described(&e), "PostgreSQL failure that retrying cannot fix");
            StoreError::Corrupt(described(&e))
        }
    }
}

/// A refusal the database's configuration makes (login, database, privilege): `Unavailable`,
/// logged as what the operator must fix.
fn refused_by_configuration(e: &tokio_postgres::Error) -> StoreError {
    tracing::warn!(
        error = %described(e),
        "PostgreSQL refuses Tideway: check the user, password and database of the database URL and the user's privileges"
    );
    StoreError::Unavailable(described(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_notice_a_server_gone_from_the_network() {
        let config = client_config("postgres://u@127.0.0.1:5432/db?application_name=x").unwrap();
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), KEEPALIVE_IDLE);
        assert_eq!(config.get_keepalives_interval(), Some(KEEPALIVE_INTERVAL));
        assert_eq!(config.get_keepalives_retries(), Some(KEEPALIVE_RETRIES));
        assert_eq!(config.get_tcp_user_timeout(), Some(&DEAD_PEER_TIMEOUT));
        assert_eq!(config.get_connect_timeout(), Some(&POOL_TIMEOUT));
        assert_eq!(config.get_application_name(), Some("x"));
        assert_eq!(config.get_dbname(), Some("db"));
        let plain = client_config("postgres://u@127.0.0.1:5432/db").unwrap();
        assert_eq!(plain.get_application_name(), Some("tideway"));
    }

    #[tokio::test]
    async fn a_malformed_url_is_invalid_and_an_unreachable_server_unavailable() {
        assert!(matches!(
            connect("postgres://a@b:notaport/db").await,
            Err(ConnectError::InvalidUrl(_))
        ));
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        match connect("postgres://postgres@127.0.0.1:1/postgres").await {
            Err(ConnectError::Store(StoreError::Unavailable(_))) => {}
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
