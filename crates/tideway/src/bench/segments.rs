//! `tideway bench segments`: a segment's size right after a restart, and under ingest load.
//!
//! Seeds a workspace of `--users` users (a `plan` attribute each, half of them in a Heap
//! cohort) and a segment (cohort includes ∧ `plan` = "pro"), serves it with segment
//! snapshots in the data directory, asks its size once (the index is built from every profile:
//! the limit this benchmark measures beside its figures), stops the server (a clean shutdown
//! writes the snapshot), starts a new one on the same data and times the first
//! `/api/v1/segments/{id}/size` (DESIGN.md §4: ≤ 2 s on 3 M users). Then `--clients`
//! closed-loop `/users/track` clients drive the bench ingest workload over the same users while
//! one client asks the size back to back: p50 / p99 under load (target p99 ≤ 100 ms).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tideway_core::store::prelude::*;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tideway_core::cohorts::{CohortId, parse_changes};
use tideway_core::keys::{IpAllowlist, Permission, PermissionSet};
use tideway_core::segments::Segment;
use tideway_core::store::{Store, Workspace};
use tideway_core::track::parse_track;
use tideway_server::{RateLimits, ServerConfig};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use crate::bench::load::{self, Stats, Target, millis, thousands};
use crate::data;
use crate::serve::InProcess;

const FIRST_SIZE_TARGET: Duration = Duration::from_secs(2);
const P99_TARGET: Duration = Duration::from_millis(100);
const PLANS: [&str; 3] = ["free", "trial", "pro"];

#[derive(Debug, clap::Args)]
pub struct SegmentsArgs {
    /// Users in the workspace
    #[arg(long, default_value_t = 3_000_000)]
    pub users: usize,
    /// Concurrent /users/track clients during the load phase
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Seconds of the load phase
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
}

async fn start(store: Arc<dyn Store>, snapshots: &Path) -> anyhow::Result<InProcess> {
    let metrics = tideway_server::install_metrics_recorder()
        .context("cannot install the metrics recorder")?;
    let config = ServerConfig {
        rate_limits: RateLimits::unlimited(),
        ..ServerConfig::default()
    };
    let router =
        tideway_server::app_with_options(store, config, metrics, None, Some(snapshots.to_owned()));
    InProcess::serve_router(router).await
}

async fn seed(store: &Arc<SqliteStore>, ws: &Workspace, users: usize) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..8 {
        let (store, ws, next) = (Arc::clone(store), ws.clone(), Arc::clone(&next));
        tasks.spawn(async move {
            loop {
                let start = next.fetch_add(75, std::sync::atomic::Ordering::Relaxed);
                if start >= users {
                    return Ok::<(), anyhow::Error>(());
                }
                let attributes: Vec<Value> = (start..(start + 75).min(users))
                    .map(|i| json!({"external_id": format!("bench-{i}"), "plan": PLANS[i % 3]}))
                    .collect();
                let body = json!({ "attributes": attributes });
                let request = parse_track(body.as_object().context("object")?)
                    .map_err(|e| anyhow::anyhow!("seed body: {e:?}"))?;
                store.track(&ws, request, data::now()).await?;
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.context("a seeding task panicked")??;
    }
    // half of the users enter the cohort
    let cohort = CohortId::parse("bench").context("cohort id")?;
    for chunk in (0..users).step_by(2).collect::<Vec<_>>().chunks(1000) {
        let ids: Vec<String> = chunk.iter().map(|i| format!("bench-{i}")).collect();
        let body = json!({"cohort_changes": [{"user_ids": ids}]});
        let changes = parse_changes(body.as_object().context("object")?)
            .map_err(|e| anyhow::anyhow!("cohort body: {e:?}"))?;
        store
            .apply_cohort_changes(ws, "heap", cohort.clone(), changes, data::now())
            .await?;
    }
    Ok(())
}

async fn size(client: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<u64> {
    let response = client.get(url).bearer_auth(key).send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("HTTP {status}: {body}");
    }
    body["size"].as_u64().context("no size in the answer")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

pub async fn run(args: SegmentsArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let snapshots = dir.path().join("segment-index");
    let open = || data::open(dir.path(), SqliteOptions::default());
    let store = Arc::new(open()?);
    let now = data::now();
    let ws = store.create_workspace("bench", now).await?;
    let permissions: PermissionSet = [Permission::UsersTrack, Permission::SegmentsRead]
        .into_iter()
        .collect();
    let (secret, key) = data::mint_key(ws.id, "bench", permissions, IpAllowlist::default(), now);
    store.create_api_key(key).await?;
    let key = secret.expose().to_owned();
    let filter = json!({"and": [
        {"cohort": {"partner": "heap", "cohort_id": "bench", "op": "includes"}},
        {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}
    ]});
    store
        .create_segment(
            ws.id,
            Segment {
                id: "bench-segment".into(),
                name: "bench".into(),
                filter,
                created_at: now,
                updated_at: now,
            },
        )
        .await?;
    eprintln!(
        "bench segments: {} users, segment = cohort includes ∧ plan = pro",
        thousands(args.users as f64)
    );
    let seeded = Instant::now();
    seed(&store, &ws, args.users).await?;
    eprintln!("{:>24}: {:.1} s", "seeded", seeded.elapsed().as_secs_f64());
    // even users in the cohort, users ≡ 2 (mod 3) on pro
    let expected = (0..args.users).filter(|i| i % 6 == 2).count() as u64;
    let client = reqwest::Client::new();

    // the limit: the index built from every profile (no snapshot yet)
    let server = start(store.clone() as Arc<dyn Store>, &snapshots).await?;
    let url = format!("http://{}/api/v1/segments/bench-segment/size", server.addr);
    let t = Instant::now();
    // a first build longer than the server's first-load wait answers 503: ask again
    let cold = loop {
        match size(&client, &url, &key).await {
            Ok(n) => break n,
            Err(e) if e.to_string().contains("503") && t.elapsed() < Duration::from_secs(600) => {}
            Err(e) => return Err(e),
        }
    };
    let full_build = t.elapsed();
    eprintln!(
        "{:>24}: {} (size {cold}, expected about {expected})",
        "first size, full build",
        millis(full_build)
    );
    server.stop().await?;
    drop(store);
    let file = snapshots.join(format!("{}.snap", ws.id.0));
    // the service writes it when its last user lets go (its worker may finish a step first)
    let waited = Instant::now();
    while !file.exists() && waited.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snapshot_bytes = std::fs::metadata(&file)
        .context("no snapshot after a clean shutdown")?
        .len();
    let t = Instant::now();
    let bytes = std::fs::read(&file)?;
    let loaded = tideway_core::segments::LiveIndex::from_snapshot_bytes(&bytes)
        .context("the snapshot does not load")?;
    let load_time = t.elapsed();
    drop((loaded, bytes));
    eprintln!(
        "{:>24}: {:.1} MB, read + decoded in {}",
        "snapshot",
        snapshot_bytes as f64 / 1e6,
        millis(load_time)
    );

    // restart
    let store = Arc::new(open()?);
    let server = start(store.clone() as Arc<dyn Store>, &snapshots).await?;
    let url = format!("http://{}/api/v1/segments/bench-segment/size", server.addr);
    let t = Instant::now();
    let warm = size(&client, &url, &key).await?;
    let first = t.elapsed();
    eprintln!(
        "{:>24}: {} (size {warm})",
        "first size after restart",
        millis(first)
    );
    if cold != expected || warm != cold {
        bail!("sizes {cold} before and {warm} after the restart; expected {expected}");
    }

    // under load
    let target = Target {
        client: reqwest::Client::new(),
        url: format!("http://{}/users/track", server.addr),
        api_key: Some(key.clone()),
        spread: Vec::new(),
    };
    let duration = Duration::from_secs(args.seconds);
    let users = args.users as u64;
    let clients = args.clients;
    let ingest = tokio::spawn(async move {
        load::closed_loop(&target, "ingest", clients, users, duration).await
    });
    let deadline = Instant::now() + duration;
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let t = Instant::now();
        size(&client, &url, &key).await?;
        latencies.push(t.elapsed());
    }
    let mut ingest: Stats = ingest.await.context("the ingest task panicked")?;
    latencies.sort_unstable();
    let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
    eprintln!(
        "{:>24}: {} sizes, p50 {}, p99 {}, max {}; ingest {} objects/s, p99 {}, {} errors",
        "size under ingest",
        latencies.len(),
        millis(p50),
        millis(p99),
        millis(percentile(&latencies, 100.0)),
        thousands(ingest.objects_per_sec()),
        millis(ingest.percentile(99.0)),
        ingest.errors
    );
    server.stop().await?;
    // where the time of the freshness wait goes (the segment service's own histograms)
    let rendered = tideway_server::install_metrics_recorder()
        .context("cannot read the metrics")?
        .render();
    for line in rendered.lines().filter(|l| {
        l.starts_with("tideway_segment_")
            && (l.contains("quantile=\"0.5\"")
                || l.contains("quantile=\"0.99\"")
                || l.contains("quantile=\"1\"")
                || l.contains("_count"))
    }) {
        eprintln!("{:>24}  {line}", "");
    }
    let pass = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!(
        "first size after restart {} vs full build {} ({:.0}x faster; target ≤ {}: {}); snapshot {:.1} MB loads in {}; size under {clients}-client ingest p50 {} p99 {} (target p99 ≤ {}: {})",
        millis(first),
        millis(full_build),
        full_build.as_secs_f64() / first.as_secs_f64().max(1e-9),
        millis(FIRST_SIZE_TARGET),
        pass(first <= FIRST_SIZE_TARGET),
        snapshot_bytes as f64 / 1e6,
        millis(load_time),
        millis(p50),
        millis(p99),
        millis(P99_TARGET),
        pass(p99 <= P99_TARGET),
    );
    if ingest.errors > 0 {
        bail!(
            "{} ingest requests failed; the figures are not valid",
            ingest.errors
        );
    }
    Ok(())
}
