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
//! 4. **raw PostgreSQL**: the limit — the same objects as rows, inserted by `--clients`
//!    connections with one multi-row `INSERT` of a request's 75 objects per transaction into
//!    one plain table, nothing else.
//!
//! Each run uses a workspace of its own (`bench-<random>`), so the database may be reused.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tideway_core::keys::{IpAllowlist, Permission, PermissionSet};
use tideway_core::store::Store;
use tideway_server::{RateLimits, ServerConfig};
use tideway_store::postgres::PgStore;

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
    let mut single = one_node(&bench, &client, &format!("bench-{}", &suffix[..12])).await?;
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
    let mut double = load::closed_loop(
        &target,
        "tideway ×2",
        bench.clients as usize,
        bench.users,
        bench.duration,
    )
    .await;
    a.stop().await?;
    b.stop().await?;
    report("tideway ×2", &mut double);
    ensure_clean(&double)?;
    let again = one_node(&bench, &client, &format!("bench-{}-3", &suffix[..12])).await?;
    let (before_rate, after_rate) = (single.objects_per_sec(), again.objects_per_sec());
    single.then(again);

    let raw = if bench.skip_limits {
        None
    } else {
        let bar = indicatif::ProgressBar::new_spinner().with_message("raw PostgreSQL inserts…");
        bar.enable_steady_tick(Duration::from_millis(200));
        let (rows, took) =
            raw_postgres(bench.url, bench.clients, bench.users, bench.duration).await?;
        bar.finish_and_clear();
        let per_sec = rows as f64 / took.as_secs_f64();
        eprintln!(
            "{:>16}: {} rows in {:.1} s, {} rows/s ({OBJECTS} rows per transaction, {} connections)",
            "raw PostgreSQL",
            thousands(rows as f64),
            took.as_secs_f64(),
            thousands(per_sec),
            bench.clients
        );
        Some(per_sec)
    };

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
            thousands(raw),
            one_rate / raw
        ));
    }
    let verdict = |pass: bool| if pass { "PASS" } else { "FAIL" };
    parts.push(format!(
        "target {} objects/s: {}",
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

/// One closed-loop phase against one in-process node on a workspace of its own.
async fn one_node(
    bench: &PgBench<'_>,
    client: &reqwest::Client,
    workspace: &str,
) -> anyhow::Result<Stats> {
    let (node, key) = start_node(bench.url, workspace, None).await?;
    let target = Target {
        client: client.clone(),
        url: format!("http://{}/users/track", node.addr),
        api_key: Some(key),
        spread: Vec::new(),
    };
    let mut stats = load::closed_loop(
        &target,
        "tideway ×1",
        bench.clients as usize,
        bench.users,
        bench.duration,
    )
    .await;
    node.stop().await?;
    report("tideway ×1", &mut stats);
    ensure_clean(&stats)?;
    Ok(stats)
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

fn report(label: &str, stats: &mut Stats) {
    let (p50, p99) = (stats.percentile(50.0), stats.percentile(99.0));
    eprintln!(
        "{label:>16}: {} requests, {} objects/s, p50 {}, p99 {}, {} errors",
        stats.requests,
        thousands(stats.objects_per_sec()),
        millis(p50),
        millis(p99),
        stats.errors
    );
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

/// The database's own limit: `clients` connections inserting the workload's objects as rows
/// (external id, kind, JSON body) into a fresh plain table, one multi-row `INSERT` of one
/// request's objects per transaction. Returns (rows inserted, time taken).
async fn raw_postgres(
    url: &str,
    clients: u64,
    users: u64,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let pool = Arc::new(rows(200, users)?);
    let table = format!("bench_raw_{}", uuid::Uuid::new_v4().simple());
    let (setup, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect for the raw PostgreSQL phase")?;
    tokio::spawn(connection);
    setup
        .batch_execute(&format!(
            "CREATE TABLE {table} (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, external_id text NOT NULL, kind text NOT NULL, body text NOT NULL)"
        ))
        .await
        .context("cannot create the raw table")?;
    let inserted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (url, table, pool, inserted) = (
            url.to_owned(),
            table.clone(),
            Arc::clone(&pool),
            Arc::clone(&inserted),
        );
        tasks.spawn(async move {
            let (mut conn, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let insert = conn
                .prepare(&format!(
                    "INSERT INTO {table} (external_id, kind, body) SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
                ))
                .await?;
            let mut next = client as usize * OBJECTS;
            while start.elapsed() < duration {
                let (mut ids, mut kinds, mut bodies) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..OBJECTS {
                    let (id, kind, body) = &pool[next % pool.len()];
                    ids.push(id.as_str());
                    kinds.push(*kind);
                    bodies.push(body.as_str());
                    next += 1;
                }
                let tx = conn.transaction().await?;
                tx.execute(&insert, &[&ids, &kinds, &bodies]).await?;
                tx.commit().await?;
                inserted.fetch_add(OBJECTS as u64, Ordering::Relaxed);
            }
            Ok::<_, tokio_postgres::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a raw insert task panicked")?
            .context("a raw insert failed")?;
    }
    let took = start.elapsed();
    setup
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .context("cannot drop the raw table")?;
    Ok((inserted.load(Ordering::Relaxed), took))
}
