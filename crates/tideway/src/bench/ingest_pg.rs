//! `tideway bench ingest --database-url URL`: `/users/track` throughput on PostgreSQL, with one
//! node and with two, beside the database's own limit measured in the same run.
//!
//! Phases (closed loop, `--clients` clients, `--seconds` each):
//! 1. **one node**: an in-process Tideway (the real app over a `PgStore`) on the database;
//! 2. **two nodes**: two in-process Tideways, each with its own `PgStore` (own pool, own
//!    group-commit workers), on the same database, the clients spread over both as a load
//!    balancer would. On one machine the "nodes" share its cores with PostgreSQL, so this
//!    measures that a second node adds no contention of its own (the per-workspace log
//!    counter, row locks), not that it adds hardware;
//! 3. **one node again**: as 1, on a fresh workspace. Each phase runs on the database the
//!    phases before grew, and every phase slows down as it grows, so a ×2 phase run only
//!    after the ×1 one would be judged against an easier ×1. The ×1 figure is the mean of
//!    phases 1 and 3 (A-B-A), which cancels a steady drift;
//! 4. **raw PostgreSQL**: a limit — the same objects as rows, inserted by `--clients`
//!    connections with one multi-row `INSERT` of a request's 75 objects per transaction into
//!    one plain table, nothing else;
//! 5. **SQL floor**: the other limit — the least SQL any store must run per object while it
//!    keeps profiles and the event log in PostgreSQL (rewrite the user's profile row, append a
//!    log row), multi-row, one request per transaction, with every contention and all of
//!    Tideway's own work taken away (`floor_postgres`). It bounds what Tideway can reach on
//!    the machine: a target above it cannot be met by any change to Tideway;
//! 6. **schema floor**: the same work on copies of Tideway's own `users` and `event_log`
//!    (every index, partial ones included), users created on first sight as the node phases
//!    create theirs, rows shaped as Tideway writes them ([`FloorShape::Schema`]). Its CPU per
//!    object is what PostgreSQL needs on this schema before any Tideway code runs, so the
//!    summary prints what the target's budget leaves for Tideway's own work;
//! 7. **summaries floor**: the schema floor's work with event and purchase summaries kept out
//!    of the profile row ([`FloorShape::Summaries`]): only attribute objects rewrite a profile,
//!    an event or purchase only finds (or creates) its user. It prices the data-model change
//!    that keeps summaries out of the profile (derived from the log) before anyone makes it.
//!
//! Each node phase also prints the CPU it took per object (`bench/cpu.rs`): this process's (the
//! nodes and the load generator) and the whole machine's, so with the database on the same
//! machine the difference is PostgreSQL's. The summary sets ×1's figure beside the CPU the
//! target leaves an object (cores / target): a throughput target is within reach only if an
//! object fits in it.
//!
//! Each run uses a workspace of its own (`bench-<random>`), so the database may be reused.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tideway_core::keys::{IpAllowlist, Permission, PermissionSet};
use tideway_core::store::Store;
use tideway_server::{RateLimits, ServerConfig};
use tideway_store::postgres::PgStore;

use crate::bench::cpu::{self, ThreadCpu};
use crate::bench::limits::rows;
use crate::bench::load::{self, OBJECTS, Stats, Target, millis, thousands};
use crate::config::redact_url;
use crate::data;
use crate::serve::InProcess;

/// Issue 10: ≥ 50,000 objects/s with one node on this 2-core machine (the database shares it).
pub const DEFAULT_TARGET: u64 = 50_000;

/// How the PostgreSQL run is shaped (from `bench ingest`'s flags).
pub struct PgBench<'a> {
    pub url: &'a str,
    pub clients: u64,
    pub users: u64,
    pub duration: Duration,
    pub target: u64,
    pub skip_limits: bool,
}

pub async fn run(bench: PgBench<'_>) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")?;
    eprintln!(
        "bench ingest on PostgreSQL {}: closed loop, {} clients, {OBJECTS} objects per request, {} users, {} s per phase",
        redact_url(bench.url),
        bench.clients,
        thousands(bench.users as f64),
        bench.duration.as_secs()
    );
    let suffix = uuid::Uuid::new_v4().simple().to_string();

    // One node, before and after the two.
    let (mut single, single_cpu) =
        one_node(&bench, &client, &format!("bench-{}", &suffix[..12])).await?;
    // Two nodes on the same database, a fresh workspace so both start from the same state.
    let workspace = format!("bench-{}-2", &suffix[..12]);
    let (a, key) = start_node(bench.url, &workspace, None).await?;
    let (b, _) = start_node(bench.url, &workspace, Some(&key)).await?;
    let target = Target {
        client: client.clone(),
        url: format!("http://{}/users/track", a.addr),
        api_key: Some(key),
        spread: vec![format!("http://{}/users/track", b.addr)],
    };
    let (mut double, double_cpu) = measured_loop(&bench, &target, "tideway ×2").await;
    a.stop().await?;
    b.stop().await?;
    report("tideway ×2", &mut double, double_cpu);
    ensure_clean(&double)?;
    let (again, again_cpu) =
        one_node(&bench, &client, &format!("bench-{}-3", &suffix[..12])).await?;
    let (before_rate, after_rate) = (single.objects_per_sec(), again.objects_per_sec());
    let single_cpu = single_cpu.zip(again_cpu).map(|(a, b)| a.plus(b));
    single.then(again);

    let (raw, floors) = if bench.skip_limits {
        (None, Vec::new())
    } else {
        let raw = limit_phase("raw PostgreSQL", "row", bench.clients, async {
            raw_postgres(bench.url, bench.clients, bench.users, bench.duration).await
        })
        .await?;
        let mut floors = Vec::new();
        for shape in [FloorShape::Any, FloorShape::Schema, FloorShape::Summaries] {
            let figure = limit_phase(shape.label(), "object", bench.clients, async {
                floor_postgres(bench.url, bench.clients, bench.users, bench.duration, shape).await
            })
            .await?;
            floors.push((shape, figure));
        }
        (Some(raw), floors)
    };
    let floor_of = |wanted: FloorShape| {
        floors
            .iter()
            .find(|(shape, _)| *shape == wanted)
            .map(|(_, figure)| *figure)
    };
    let (floor, schema_floor) = (floor_of(FloorShape::Any), floor_of(FloorShape::Schema));

    let (one_rate, two_rate) = (single.objects_per_sec(), double.objects_per_sec());
    let mut parts = vec![
        format!(
            "tideway ×1 on PostgreSQL: {} objects/s (mean of {} before and {} after ×2; p50 {}, p99 {})",
            thousands(one_rate),
            thousands(before_rate),
            thousands(after_rate),
            millis(single.percentile(50.0)),
            millis(single.percentile(99.0))
        ),
        format!(
            "tideway ×2: {} objects/s (p50 {}, p99 {}; ratio to ×1 {:.2})",
            thousands(two_rate),
            millis(double.percentile(50.0)),
            millis(double.percentile(99.0)),
            two_rate / one_rate
        ),
    ];
    if let Some(raw) = raw {
        parts.push(format!(
            "raw PostgreSQL inserts: {} rows/s (ratio {:.2})",
            thousands(raw.per_sec),
            one_rate / raw.per_sec
        ));
    }
    for (shape, floor) in &floors {
        parts.push(format!(
            "{}: {} objects/s (ratio {:.2})",
            shape.label(),
            thousands(floor.per_sec),
            one_rate / floor.per_sec
        ));
    }
    let budget = cpu::budget_per_object(cpu::cores(), bench.target);
    if let Some(spent) = single_cpu {
        // What the target leaves an object on this machine's cores, beside what ×1 took.
        parts.push(format!(
            "×1 {}; the target leaves {budget:.1} µs an object on {} cores",
            spent.per_object(single.objects()),
            cpu::cores()
        ));
    }
    if let Some(floor_cpu) = schema_floor.and_then(|floor| floor.cpu_per_unit) {
        // The database's share of an object on Tideway's tables, with nothing of Tideway's
        // running: what is left of the budget is all Tideway's own work may take.
        parts.push(format!(
            "the schema floor takes {floor_cpu:.1} µs an object with no Tideway running, leaving {:.1} µs of the budget for Tideway's own work",
            budget - floor_cpu
        ));
    }
    let verdict = |pass: bool| if pass { "PASS" } else { "FAIL" };
    let beyond = match (floor, schema_floor) {
        // Tideway does a floor's work and more, so a target above either floor cannot be met
        // on this machine: above the SQL floor by any store, above the schema floor by any
        // change to Tideway that keeps its tables.
        (Some(floor), _) if floor.per_sec < bench.target as f64 => {
            " (above this machine's SQL floor)"
        }
        (_, Some(floor)) if floor.per_sec < bench.target as f64 => {
            " (above this machine's floor for Tideway's schema)"
        }
        _ => "",
    };
    parts.push(format!(
        "target {} objects/s: {}{beyond}",
        thousands(bench.target as f64),
        verdict(one_rate >= bench.target as f64)
    ));
    // "Not slower" with the noise of a shared 2-core machine: within 5 %.
    parts.push(format!(
        "target 2 nodes not slower than 1: {}",
        verdict(two_rate >= 0.95 * one_rate)
    ));
    println!("{}", parts.join(" | "));
    Ok(())
}

/// Runs a limit phase under a spinner and prints its figure.
async fn limit_phase(
    label: &str,
    unit: &str,
    clients: u64,
    phase: impl Future<Output = anyhow::Result<LimitRun>>,
) -> anyhow::Result<LimitFigure> {
    let bar = indicatif::ProgressBar::new_spinner().with_message(format!("{label}…"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let run = phase.await?;
    bar.finish_and_clear();
    let figure = LimitFigure {
        per_sec: run.count as f64 / run.took.as_secs_f64(),
        cpu_per_unit: run
            .machine_cpu
            .map(|spent| cpu::per_object(spent, run.count)),
    };
    let spent = figure.cpu_per_unit.map_or(String::new(), |cpu| {
        format!("; CPU per {unit} {cpu:.1} µs on the machine")
    });
    eprintln!(
        "{label:>16}: {} {unit}s in {:.1} s, {} {unit}s/s ({OBJECTS} per transaction, {clients} connections{spent})",
        thousands(run.count as f64),
        run.took.as_secs_f64(),
        thousands(figure.per_sec),
    );
    Ok(figure)
}

/// A limit phase's figures: its rate, and the machine's CPU per row or object (`None` off
/// Linux).
#[derive(Debug, Clone, Copy)]
struct LimitFigure {
    per_sec: f64,
    cpu_per_unit: Option<f64>,
}

/// What a limit phase's connections did: rows or objects written, in how long, and the
/// machine's busy CPU meanwhile (`None` off Linux).
struct LimitRun {
    count: u64,
    took: Duration,
    machine_cpu: Option<Duration>,
}

/// One closed-loop phase against one in-process node on a workspace of its own.
async fn one_node(
    bench: &PgBench<'_>,
    client: &reqwest::Client,
    workspace: &str,
) -> anyhow::Result<(Stats, Option<Cpu>)> {
    let (node, key) = start_node(bench.url, workspace, None).await?;
    let target = Target {
        client: client.clone(),
        url: format!("http://{}/users/track", node.addr),
        api_key: Some(key),
        spread: Vec::new(),
    };
    let (mut stats, cpu) = measured_loop(bench, &target, "tideway ×1").await;
    node.stop().await?;
    report("tideway ×1", &mut stats, cpu);
    ensure_clean(&stats)?;
    Ok((stats, cpu))
}

/// A node phase's closed loop against `target`, and the CPU it took.
async fn measured_loop(bench: &PgBench<'_>, target: &Target, label: &str) -> (Stats, Option<Cpu>) {
    let before = Cpu::read();
    let stats = load::closed_loop(
        target,
        label,
        bench.clients as usize,
        bench.users,
        bench.duration,
    )
    .await;
    (stats, Cpu::since(Cpu::read(), before))
}

/// CPU spent in a phase: by this process (the in-process nodes and the load generator) and
/// by the whole machine (PostgreSQL included when it runs here).
#[derive(Debug, Clone, Copy)]
struct Cpu {
    process: Duration,
    machine: Duration,
}

impl Cpu {
    fn read() -> Option<Cpu> {
        Some(Cpu {
            process: ThreadCpu::read()?.total,
            machine: cpu::machine_busy()?,
        })
    }

    fn since(after: Option<Cpu>, before: Option<Cpu>) -> Option<Cpu> {
        let (after, before) = (after?, before?);
        Some(Cpu {
            process: after.process.saturating_sub(before.process),
            machine: after.machine.saturating_sub(before.machine),
        })
    }

    fn plus(self, other: Cpu) -> Cpu {
        Cpu {
            process: self.process + other.process,
            machine: self.machine + other.machine,
        }
    }

    /// "CPU per object X µs on the machine (Tideway Y µs …)", over `objects` objects.
    fn per_object(self, objects: u64) -> String {
        let machine = cpu::per_object(self.machine, objects);
        let process = cpu::per_object(self.process, objects);
        format!(
            "CPU per object {machine:.1} µs on the machine (Tideway {process:.1} µs with the load generator, the rest {:.1} µs: PostgreSQL and anything else running here)",
            (machine - process).max(0.0)
        )
    }
}

/// An in-process node on the database: a `PgStore` of its own and the real app. Creates the
/// workspace and a tracking key on the first node (`key` = `None`); a second node reuses them.
async fn start_node(
    url: &str,
    workspace: &str,
    key: Option<&str>,
) -> anyhow::Result<(InProcess, String)> {
    let store: Arc<dyn Store> = Arc::new(PgStore::open(url).await.with_context(|| {
        format!(
            "cannot use PostgreSQL at {}; is it running, and may this user create tables?",
            redact_url(url)
        )
    })?);
    let secret = match key {
        Some(key) => key.to_owned(),
        None => {
            let now = data::now();
            let ws = store
                .create_workspace(workspace, now)
                .await
                .context("cannot create the bench workspace")?;
            let permissions: PermissionSet = [Permission::UsersTrack].into_iter().collect();
            let (secret, key) =
                data::mint_key(ws.id, "bench", permissions, IpAllowlist::default(), now);
            store
                .create_api_key(key)
                .await
                .context("cannot create the bench key")?;
            secret.expose().to_owned()
        }
    };
    let config = ServerConfig {
        rate_limits: RateLimits::unlimited(),
        ..ServerConfig::default()
    };
    Ok((InProcess::start(store, config).await?, secret))
}

fn report(label: &str, stats: &mut Stats, spent: Option<Cpu>) {
    let (p50, p99) = (stats.percentile(50.0), stats.percentile(99.0));
    eprintln!(
        "{label:>16}: {} requests, {} objects/s, p50 {}, p99 {}, {} errors",
        stats.requests,
        thousands(stats.objects_per_sec()),
        millis(p50),
        millis(p99),
        stats.errors
    );
    if let Some(spent) = spent {
        eprintln!("{label:>16}: {}", spent.per_object(stats.objects()));
    }
}

fn ensure_clean(stats: &Stats) -> anyhow::Result<()> {
    if stats.requests == 0 || stats.errors > 0 {
        anyhow::bail!(
            "{} of {} requests failed; first error: {}",
            stats.errors,
            stats.requests + stats.errors,
            stats.first_error.as_deref().unwrap_or("none")
        );
    }
    Ok(())
}

/// One connection's work in a limit phase: the batches it sends (a batch is one request's
/// objects as arrays of external ids, kinds and JSON bodies), round robin, one transaction each.
type Batches = Vec<(Vec<String>, Vec<&'static str>, Vec<String>)>;

/// The workload's objects cut into batches of one request's size (`OBJECTS`).
fn batches(objects: &[(String, &'static str, String)]) -> Batches {
    objects
        .chunks(OBJECTS)
        .map(|chunk| {
            let mut batch = (Vec::new(), Vec::new(), Vec::new());
            for (id, kind, body) in chunk {
                batch.0.push(id.clone());
                batch.1.push(*kind);
                batch.2.push(body.clone());
            }
            batch
        })
        .collect()
}

/// The database's own limit: `clients` connections inserting the workload's objects as rows
/// (external id, kind, JSON body) into a fresh plain table, one multi-row `INSERT` of one
/// request's objects per transaction. Returns the rows inserted.
async fn raw_postgres(
    url: &str,
    clients: u64,
    users: u64,
    duration: Duration,
) -> anyhow::Result<LimitRun> {
    let pool = rows(200, users)?;
    let table = format!("bench_raw_{}", uuid::Uuid::new_v4().simple());
    let setup = connect(url).await?;
    setup
        .batch_execute(&format!(
            "CREATE TABLE {table} (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, external_id text NOT NULL, kind text NOT NULL, body text NOT NULL)"
        ))
        .await
        .context("cannot create the raw table")?;
    // Each connection starts at a different request of the same pool.
    let work = (0..clients as usize)
        .map(|client| {
            let mut pool = batches(&pool);
            let start = client % pool.len().max(1);
            pool.rotate_left(start);
            pool
        })
        .collect();
    let insert = format!(
        "INSERT INTO {table} (external_id, kind, body) SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
    );
    let done = connections(url, work, &insert, duration).await;
    setup
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .context("cannot drop the raw table")?;
    done
}

/// A floor: the least work a store must do for an object of `/users/track` while it keeps
/// profiles and the event log in PostgreSQL, with no Tideway in the way. Per object, rewrite
/// its user's profile row (found through the unique external-id index, so locked) and append
/// one row to an ordered log; one request's objects per transaction, in one multi-row
/// statement, each commit durable. Either shape is an upper bound on what Tideway can reach
/// here: each connection owns a disjoint set of users (no row-lock waits), the log takes its
/// order from a plain sequence (no per-workspace counter), and nothing parses HTTP or JSON.
/// [`FloorShape`] says which tables. Returns the objects written.
async fn floor_postgres(
    url: &str,
    clients: u64,
    users: u64,
    duration: Duration,
    shape: FloorShape,
) -> anyhow::Result<LimitRun> {
    let floor = Floor::create(url, users, shape).await?;
    let done = floor.run(clients, duration).await;
    floor.drop_tables().await?;
    done
}

/// Which tables a floor writes, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloorShape {
    /// The least SQL any store must run: a two-column profile table the objects' users are
    /// seeded into, a log of (user, kind, body) rows; each profile replaced by its object.
    Any,
    /// The same work on Tideway's own table shapes: scratch copies of `users` and `event_log`
    /// with every index and constraint they have (`LIKE … INCLUDING ALL`, so the unique
    /// external-id and braze-id indexes, the email and phone indexes, the log's partial index of
    /// behaviours), rows as Tideway writes them (a braze id, an event id, the Currents event
    /// type), each user created on first sight as the node phases create theirs, and each
    /// profile rewritten from the one it replaces (`INSERT … ON CONFLICT DO UPDATE`, the read
    /// and the write in one statement). Still an upper bound for Tideway: no separate locking
    /// read, no per-workspace log counter, no foreign key to `workspaces`, no segment change
    /// rows, log bodies the size of the objects rather than of Currents events.
    Schema,
    /// The schema floor's work with event and purchase summaries kept out of the profile row
    /// (derived from the log instead): only attribute objects rewrite their user's profile;
    /// an event or purchase creates its user if new and otherwise only reads its seq by the
    /// external-id index. Everything else as the schema floor.
    Summaries,
}

impl FloorShape {
    fn label(self) -> &'static str {
        match self {
            FloorShape::Any => "SQL floor",
            FloorShape::Schema => "schema floor",
            FloorShape::Summaries => "summaries floor",
        }
    }

    /// The `event_log.event_type` an object of the workload's `kind` logs.
    fn event_type(kind: &'static str) -> &'static str {
        match kind {
            "event" => "users.behaviors.CustomEvent",
            "purchase" => "users.behaviors.Purchase",
            _ => "users.profile.Update",
        }
    }
}

/// A floor's two tables (fresh, named after a random id) and the objects it writes.
struct Floor {
    url: String,
    setup: tokio_postgres::Client,
    shape: FloorShape,
    users_table: String,
    log_table: String,
    objects: Vec<(String, &'static str, String)>,
}

impl Floor {
    /// Creates the tables; the `Any` floor also gets one user per external id of the workload's
    /// objects. The `Schema` floor copies Tideway's tables, so their schema must be there
    /// (a node has migrated the database).
    async fn create(url: &str, users: u64, shape: FloorShape) -> anyhow::Result<Floor> {
        let mut objects = rows(1000, users)?;
        if shape != FloorShape::Any {
            for object in &mut objects {
                object.1 = FloorShape::event_type(object.1);
            }
        }
        let prefix = format!("bench_floor_{}", uuid::Uuid::new_v4().simple());
        let (users_table, log_table) = (format!("{prefix}_users"), format!("{prefix}_log"));
        let setup = connect(url).await?;
        let create = match shape {
            FloorShape::Any => format!(
                "CREATE TABLE {users_table} (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, external_id text NOT NULL UNIQUE, profile text NOT NULL) WITH (fillfactor = 80);
                 CREATE TABLE {log_table} (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_seq bigint NOT NULL, kind text NOT NULL, body text NOT NULL);"
            ),
            // `users` has fillfactor 80 (migration 11); `LIKE` copies columns, not storage
            // parameters. Sequences owned by their tables go when the tables are dropped.
            FloorShape::Schema | FloorShape::Summaries => format!(
                "CREATE TABLE {users_table} (LIKE users INCLUDING ALL) WITH (fillfactor = 80);
                 CREATE SEQUENCE {users_table}_seq OWNED BY {users_table}.seq;
                 CREATE TABLE {log_table} (LIKE event_log INCLUDING ALL);
                 CREATE SEQUENCE {log_table}_seq OWNED BY {log_table}.seq;"
            ),
        };
        setup
            .batch_execute(&create)
            .await
            .context("cannot create the floor tables (the schema floor needs Tideway's schema)")?;
        let floor = Floor {
            url: url.to_owned(),
            setup,
            shape,
            users_table,
            log_table,
            objects,
        };
        // The tables exist from here on: a failure drops them again before it is reported.
        if shape == FloorShape::Any
            && let Err(e) = floor.seed().await
        {
            if let Err(drop) = floor.drop_tables().await {
                tracing::warn!(error = %drop, "the floor tables could not be dropped after a failed setup");
            }
            return Err(e);
        }
        Ok(floor)
    }

    /// One user per distinct external id of the objects, then fresh statistics.
    async fn seed(&self) -> anyhow::Result<()> {
        let ids: Vec<&str> = self.objects.iter().map(|(id, _, _)| id.as_str()).collect();
        let users_table = &self.users_table;
        self.setup
            .execute(
                &format!(
                    "INSERT INTO {users_table} (external_id, profile) SELECT DISTINCT id, '{{}}' FROM unnest($1::text[]) AS id"
                ),
                &[&ids],
            )
            .await
            .context("cannot seed the floor's users")?;
        self.setup
            .batch_execute(&format!("ANALYZE {users_table}"))
            .await
            .context("cannot analyse the floor's users")?;
        Ok(())
    }

    /// The one statement a transaction runs: `$1` external ids, `$2` kinds (event types for
    /// the schema floor), `$3` JSON bodies.
    fn statement(&self) -> String {
        let (users, log) = (&self.users_table, &self.log_table);
        let objects = "objects AS (
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS o(external_id, kind, body, n)),
             latest AS (
                 SELECT DISTINCT ON (external_id) external_id, body FROM objects ORDER BY external_id, n DESC)";
        match self.shape {
            FloorShape::Any => format!(
                "WITH {objects},
                 rewritten AS (
                     UPDATE {users} u SET profile = left(l.body, 140) FROM latest l
                     WHERE u.external_id = l.external_id RETURNING u.seq, u.external_id)
                 INSERT INTO {log} (user_seq, kind, body)
                 SELECT r.seq, o.kind, o.body FROM objects o JOIN rewritten r USING (external_id) ORDER BY o.n"
            ),
            // One workspace (1), times in milliseconds as Tideway stores them, profiles kept
            // to about the size of the node phases' (≈ 210 bytes).
            FloorShape::Schema => format!(
                "WITH {objects},
                 clock AS (SELECT (extract(epoch FROM statement_timestamp()) * 1000)::bigint AS now),
                 written AS (
                     INSERT INTO {users} AS u (workspace_id, seq, braze_id, external_id, created_at, updated_at, profile)
                     SELECT 1, nextval('{users}_seq'), left(md5(l.external_id), 24), l.external_id, c.now, c.now, left(l.body, 210)
                     FROM latest l CROSS JOIN clock c
                     ON CONFLICT (workspace_id, external_id) WHERE external_id IS NOT NULL
                     DO UPDATE SET profile = left(EXCLUDED.profile || u.profile, 210), updated_at = EXCLUDED.updated_at
                     RETURNING u.seq, u.external_id)
                 INSERT INTO {log} (workspace_id, seq, user_seq, event_id, event_type, time, body)
                 SELECT 1, nextval('{log}_seq'), w.seq, gen_random_uuid()::text, o.kind, c.now, o.body
                 FROM objects o JOIN written w USING (external_id) CROSS JOIN clock c ORDER BY o.n"
            ),
            FloorShape::Summaries => format!(
                "WITH objects AS (
                     SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS o(external_id, kind, body, n)),
                 clock AS (SELECT (extract(epoch FROM statement_timestamp()) * 1000)::bigint AS now),
                 attrs AS (
                     SELECT DISTINCT ON (external_id) external_id, body FROM objects
                     WHERE kind = 'users.profile.Update' ORDER BY external_id, n DESC),
                 written AS (
                     INSERT INTO {users} AS u (workspace_id, seq, braze_id, external_id, created_at, updated_at, profile)
                     SELECT 1, nextval('{users}_seq'), left(md5(l.external_id), 24), l.external_id, c.now, c.now, left(l.body, 210)
                     FROM attrs l CROSS JOIN clock c
                     ON CONFLICT (workspace_id, external_id) WHERE external_id IS NOT NULL
                     DO UPDATE SET profile = left(EXCLUDED.profile || u.profile, 210), updated_at = EXCLUDED.updated_at
                     RETURNING u.seq, u.external_id),
                 others AS (
                     SELECT DISTINCT external_id FROM objects WHERE kind <> 'users.profile.Update'
                     EXCEPT SELECT external_id FROM attrs),
                 created AS (
                     INSERT INTO {users} AS u (workspace_id, seq, braze_id, external_id, created_at, updated_at, profile)
                     SELECT 1, nextval('{users}_seq'), left(md5(o.external_id), 24), o.external_id, c.now, c.now, '{{}}'
                     FROM others o CROSS JOIN clock c
                     ON CONFLICT (workspace_id, external_id) WHERE external_id IS NOT NULL DO NOTHING
                     RETURNING u.seq, u.external_id),
                 -- One index probe a user (`OFFSET 0` keeps the planner from turning the
                 -- probes into a join over the whole table).
                 found AS (
                     SELECT x.seq, o.external_id FROM others o CROSS JOIN LATERAL (
                         SELECT u.seq FROM {users} u
                         WHERE u.workspace_id = 1 AND u.external_id = o.external_id OFFSET 0) x),
                 everyone AS (
                     SELECT * FROM written UNION ALL SELECT * FROM created UNION ALL SELECT * FROM found)
                 INSERT INTO {log} (workspace_id, seq, user_seq, event_id, event_type, time, body)
                 SELECT 1, nextval('{log}_seq'), w.seq, gen_random_uuid()::text, o.kind, c.now, o.body
                 FROM objects o JOIN everyone w USING (external_id) CROSS JOIN clock c ORDER BY o.n"
            ),
        }
    }

    /// `clients` connections write the objects for `duration`, connection c those whose user
    /// hashes to c, so no two transactions in flight share a user.
    async fn run(&self, clients: u64, duration: Duration) -> anyhow::Result<LimitRun> {
        let clients = clients.max(1);
        let mut owned = vec![Vec::new(); clients as usize];
        for object in &self.objects {
            let owner =
                BuildHasherDefault::<DefaultHasher>::default().hash_one(&object.0) % clients;
            owned[owner as usize].push(object.clone());
        }
        let work = owned.iter().map(|objects| batches(objects)).collect();
        connections(&self.url, work, &self.statement(), duration).await
    }

    async fn drop_tables(&self) -> anyhow::Result<()> {
        self.setup
            .batch_execute(&format!(
                "DROP TABLE {}, {}",
                self.users_table, self.log_table
            ))
            .await
            .context("cannot drop the floor tables")
    }
}

/// A connection to `url` whose driver runs in the background.
async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect for a limit phase")?;
    tokio::spawn(connection);
    Ok(client)
}

/// One connection per entry of `work`, each running `statement` once per transaction over its
/// batches in turn for `duration`, and what they did.
async fn connections(
    url: &str,
    work: Vec<Batches>,
    statement: &str,
    duration: Duration,
) -> anyhow::Result<LimitRun> {
    let sent = Arc::new(AtomicU64::new(0));
    let busy_before = cpu::machine_busy();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for batches in work.into_iter().filter(|batches| !batches.is_empty()) {
        let (url, statement, sent) = (url.to_owned(), statement.to_owned(), Arc::clone(&sent));
        tasks.spawn(async move {
            let mut conn = connect(&url).await?;
            // The statement is prepared while the floor's tables are empty, and its generic
            // plan would then read a user by scanning them all (the summaries floor's lookup,
            // tens of ms a batch once they have grown); Tideway's statements run on tables
            // the planner has statistics for.
            conn.batch_execute("SET enable_seqscan = off").await?;
            let statement = conn.prepare(&statement).await?;
            for (ids, kinds, bodies) in batches.iter().cycle() {
                if start.elapsed() >= duration {
                    break;
                }
                let tx = conn.transaction().await?;
                tx.execute(&statement, &[ids, kinds, bodies]).await?;
                tx.commit().await?;
                sent.fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a limit connection panicked")?
            .context("a limit connection failed")?;
    }
    let took = start.elapsed();
    Ok(LimitRun {
        count: sent.load(Ordering::Relaxed),
        took,
        machine_cpu: busy_before
            .zip(cpu::machine_busy())
            .map(|(before, after)| after.saturating_sub(before)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideway_store::testing::TestDb;

    #[test]
    fn batches_are_requests_of_objects_in_order() {
        let objects: Vec<(String, &'static str, String)> = (0..OBJECTS + 5)
            .map(|i| (format!("u{i}"), "event", format!("{{\"n\":{i}}}")))
            .collect();
        let batches = batches(&objects);
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].0.len(), OBJECTS);
        assert_eq!(batches[1].0, ["u75", "u76", "u77", "u78", "u79"]);
        assert_eq!(batches[1].2[4], "{\"n\":79}");
    }

    /// The floor does the work it stands for: a log row per object sent, each naming the user
    /// of its object's external id, whose profile was rewritten from the object.
    #[tokio::test]
    async fn the_floor_logs_every_object_against_its_user() {
        let db = TestDb::create().await;
        let floor = Floor::create(&db.url, 500, FloorShape::Any).await.unwrap();
        let LimitRun {
            count: sent, took, ..
        } = floor.run(3, Duration::from_millis(300)).await.unwrap();
        assert!(sent > 0 && took >= Duration::from_millis(300));
        let check = db.client().await;
        let (users, log) = (&floor.users_table, &floor.log_table);
        let row = check
            .query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE l.body LIKE '%\"' || u.external_id || '\"%'),
                            (SELECT count(*) FROM {users} WHERE profile <> '{{}}')
                     FROM {log} l JOIN {users} u ON u.seq = l.user_seq"
                ),
                &[],
            )
            .await
            .unwrap();
        let (logged, matching, rewritten): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(logged as u64, sent, "one log row per object sent");
        assert_eq!(matching, logged, "each row names its object's user");
        assert!(rewritten > 0);
        drop_and_check_nothing_is_left(&floor, &check).await;
    }

    /// Drops the floor's tables and checks that no relation of theirs (table, index,
    /// sequence) is left behind.
    async fn drop_and_check_nothing_is_left(floor: &Floor, check: &tokio_postgres::Client) {
        floor.drop_tables().await.unwrap();
        let left: i64 = check
            .query_one(
                "SELECT count(*) FROM pg_class WHERE relname LIKE 'bench_floor_%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "tables, indexes and sequences are all dropped");
    }

    /// A floor of `shape` over `users` users, run by 3 connections for 300 ms on a migrated
    /// database (a node migrates it before the limits run; here the store does): the database,
    /// the floor, the objects it sent (some), and a connection to check its tables with.
    async fn ran_floor(
        shape: FloorShape,
        users: u64,
    ) -> (TestDb, Floor, u64, tokio_postgres::Client) {
        let db = TestDb::create().await;
        PgStore::open(&db.url).await.unwrap();
        let floor = Floor::create(&db.url, users, shape).await.unwrap();
        let LimitRun { count: sent, .. } = floor.run(3, Duration::from_millis(300)).await.unwrap();
        assert!(sent > 0);
        let check = db.client().await;
        (db, floor, sent, check)
    }

    /// The schema floor writes Tideway's table shapes as Tideway would: a user created once per
    /// external id (then rewritten), a log row per object sent with its Currents event type and
    /// its user, and copies that carry the real tables' indexes, partial ones included.
    #[tokio::test]
    async fn the_schema_floor_writes_tideway_shaped_rows_into_copies_of_its_tables() {
        let (_db, floor, sent, check) = ran_floor(FloorShape::Schema, 500).await;
        let (users, log) = (&floor.users_table, &floor.log_table);
        let row = check
            .query_one(
                &format!(
                    "SELECT count(*),
                            count(*) FILTER (WHERE l.body LIKE '%\"' || u.external_id || '\"%'),
                            count(DISTINCT l.event_id),
                            count(*) FILTER (WHERE l.event_type NOT IN ('users.profile.Update', 'users.behaviors.CustomEvent', 'users.behaviors.Purchase')),
                            (SELECT count(*) FROM {users}),
                            (SELECT count(DISTINCT external_id) FROM {users})
                     FROM {log} l JOIN {users} u ON u.workspace_id = l.workspace_id AND u.seq = l.user_seq"
                ),
                &[],
            )
            .await
            .unwrap();
        let count = |i: usize| row.get::<_, i64>(i);
        let (logged, matching, event_ids) = (count(0), count(1), count(2));
        let (foreign_types, created, distinct) = (count(3), count(4), count(5));
        assert_eq!(logged as u64, sent, "one log row per object sent");
        assert_eq!(matching, logged, "each row names its object's user");
        assert_eq!(event_ids, logged, "each row has an event id of its own");
        assert_eq!(foreign_types, 0, "rows carry the Currents event types");
        assert!(created > 0);
        assert_eq!(created, distinct, "a user is created once, then rewritten");
        let indexes = |table: String| {
            let check = &check;
            async move {
                check
                    .query(
                        "SELECT indexdef FROM pg_indexes WHERE tablename = $1 ORDER BY indexname",
                        &[&table],
                    )
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            }
        };
        let (real, copied) = (
            indexes("event_log".into()).await,
            indexes(log.clone()).await,
        );
        assert_eq!(copied.len(), real.len(), "{copied:?} against {real:?}");
        assert!(copied.iter().any(|def| def.contains("WHERE")), "{copied:?}");
        assert_eq!(
            indexes(users.clone()).await.len(),
            indexes("users".into()).await.len()
        );
        drop_and_check_nothing_is_left(&floor, &check).await;
    }

    /// The summaries floor logs every object against its user as the schema floor does, but
    /// rewrites only the profiles of users an attribute object named: a user only events or
    /// purchases named keeps the empty profile it was created with.
    #[tokio::test]
    async fn the_summaries_floor_rewrites_profiles_only_for_attribute_objects() {
        // Users enough that some are named by events only in the first batches.
        let (_db, floor, sent, check) = ran_floor(FloorShape::Summaries, 100_000).await;
        let (users, log) = (&floor.users_table, &floor.log_table);
        let row = check
            .query_one(
                &format!(
                    "SELECT count(*),
                            count(*) FILTER (WHERE l.body LIKE '%\"' || u.external_id || '\"%'),
                            (SELECT count(*) FROM {users}),
                            (SELECT count(DISTINCT external_id) FROM {users}),
                            (SELECT count(*) FROM {users} x WHERE x.profile <> '{{}}' AND NOT EXISTS (
                                SELECT 1 FROM {log} a WHERE a.user_seq = x.seq AND a.event_type = 'users.profile.Update')),
                            (SELECT count(*) FROM {users} x WHERE x.profile = '{{}}' AND EXISTS (
                                SELECT 1 FROM {log} a WHERE a.user_seq = x.seq AND a.event_type = 'users.profile.Update')),
                            (SELECT count(*) FROM {users} x WHERE x.profile = '{{}}')
                     FROM {log} l JOIN {users} u ON u.workspace_id = l.workspace_id AND u.seq = l.user_seq"
                ),
                &[],
            )
            .await
            .unwrap();
        let count = |i: usize| row.get::<_, i64>(i);
        assert_eq!(count(0) as u64, sent, "one log row per object sent");
        assert_eq!(count(1), count(0), "each row names its object's user");
        assert_eq!(count(2), count(3), "a user is created once");
        assert_eq!(count(4), 0, "no profile rewritten for events or purchases");
        assert_eq!(
            count(5),
            0,
            "every attribute object rewrote its user's profile"
        );
        assert!(
            count(6) > 0,
            "users named only by events keep an empty profile"
        );
        drop_and_check_nothing_is_left(&floor, &check).await;
    }
}
