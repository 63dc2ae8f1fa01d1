//! `tideway bench ingest`: `/users/track` throughput (closed loop) or latency at a given rate
//! (open loop, `--rate`), against an in-process Tideway on a fresh temporary data directory or
//! an external one (`--url` + `--api-key`), with the limits measured in the same run.
//!
//! The in-process server is the real thing: the SQLite store with group commit at the chosen
//! `--synchronous`, the full axum app with auth, validation and metrics. Only its rate limits
//! are lifted, since the point is to find the machine's limit, not the configured one. Its
//! WAL file is sampled while it runs: sustained ingest must not grow it without bound.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tideway_core::store::prelude::*;

use anyhow::Context;
use tideway_core::keys::{IpAllowlist, Permission, PermissionSet};
use tideway_core::store::Store;
use tideway_server::{RateLimits, ServerConfig};
use tideway_store::sqlite::SqliteOptions;

use crate::bench::cpu::{self, ThreadCpu};
use crate::bench::limits::{NoopServer, raw_sqlite};
use crate::bench::load::{self, OBJECTS, Stats, Target, millis, thousands};
use crate::config::SyncMode;
use crate::data;
use crate::serve::InProcess;

/// DESIGN.md §4: ≥ 100,000 objects/s sustained, p99 < 50 ms at half that rate.
const TARGET_P99: Duration = Duration::from_millis(50);

/// DESIGN.md §4: the SQLite WAL stays ≤ 256 MiB under sustained ingest.
const TARGET_WAL_BYTES: u64 = 256 << 20;

/// How often the in-process server's WAL file is measured.
const WAL_SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// Concurrent HTTP clients (closed loop: each sends its next request when the last is
    /// answered)
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    clients: u64,
    /// Distinct external ids the objects are spread over
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    users: u64,
    /// Length of each measured phase
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Open loop: offer this many objects/s (in requests of 75) and report latency; the
    /// latency target applies at half the throughput target (e.g. --rate 50000)
    #[arg(long, value_name = "OBJECTS_PER_SEC", value_parser = clap::value_parser!(u64).range(75..))]
    rate: Option<u64>,
    /// Throughput target in objects/s that PASS/FAIL is judged against [default: 100000 on
    /// SQLite, 50000 on PostgreSQL]
    #[arg(long)]
    target: Option<u64>,
    /// Run on this PostgreSQL database instead of SQLite: one in-process node, then two on the
    /// same database, then one again (×2 is judged against both), then two limits: raw
    /// multi-row inserts, and the SQL floor (the least SQL any store must run per object:
    /// rewrite the user's profile row, append a log row) (closed loop only)
    #[arg(long, value_name = "URL", conflicts_with_all = ["url", "rate"])]
    database_url: Option<String>,
    /// Drive an external Tideway at this base URL (e.g. http://127.0.0.1:4000) instead of an
    /// in-process one; mind its --track-rate-limit
    #[arg(long, value_name = "URL", requires = "api_key")]
    url: Option<String>,
    /// REST API key with users.track for --url
    #[arg(
        long,
        env = "TIDEWAY_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// SQLite durability of the in-process server
    #[arg(long, value_enum, default_value = "normal")]
    synchronous: SyncMode,
    /// Measure Tideway only, not the limits (no-op handler and raw SQLite; on PostgreSQL raw
    /// inserts and the SQL floor)
    #[arg(long)]
    skip_limits: bool,
}

pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    if let Some(url) = &args.database_url {
        return crate::bench::ingest_pg::run(crate::bench::ingest_pg::PgBench {
            url,
            clients: args.clients,
            users: args.users,
            duration,
            target: args
                .target
                .unwrap_or(crate::bench::ingest_pg::DEFAULT_TARGET),
            skip_limits: args.skip_limits,
        })
        .await;
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(4096)
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")?;
    let mode = match args.rate {
        Some(rate) => format!("open loop at {} objects/s", thousands(rate as f64)),
        None => format!("closed loop, {} clients", args.clients),
    };
    eprintln!(
        "bench ingest: {mode}, {OBJECTS} objects per request ({} attributes, {} events, {} purchases), {} users, {} s per phase",
        load::ATTRIBUTES,
        load::EVENTS,
        load::PURCHASES,
        thousands(args.users as f64),
        args.seconds
    );

    // Tideway itself.
    let scratch = tempfile::Builder::new()
        .prefix("tideway-bench-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let (target, server) = match &args.url {
        Some(url) => {
            let target = Target {
                client: client.clone(),
                url: format!("{}/users/track", url.trim_end_matches('/')),
                api_key: args.api_key.clone(),
                spread: Vec::new(),
            };
            eprintln!("driving the external Tideway at {url}");
            (target, None)
        }
        None => {
            let (server, key) = start_tideway(scratch.path(), args.synchronous).await?;
            eprintln!(
                "driving an in-process Tideway at http://{} (synchronous={:?}, data in {})",
                server.addr,
                args.synchronous,
                scratch.path().display()
            );
            let target = Target {
                client: client.clone(),
                url: format!("http://{}/users/track", server.addr),
                api_key: Some(key),
                spread: Vec::new(),
            };
            (target, Some(server))
        }
    };
    let sampler = server
        .is_some()
        .then(|| WalSampler::start(wal_path(scratch.path())));
    let cpu_before = ThreadCpu::read();
    let mut tideway = drive(&target, "tideway", &args, duration).await;
    let cpu = ThreadCpu::since(ThreadCpu::read(), cpu_before);
    let wal = sampler.map(WalSampler::finish);
    if let Some(server) = server {
        server.stop().await?;
    }
    report_phase("tideway", &mut tideway);
    if let Some(wal) = &wal {
        eprintln!(
            "{:>16}: largest WAL {} ({} samples, one every {} ms; the store bounds it at {})",
            "tideway",
            mebibytes(wal.largest),
            wal.samples,
            WAL_SAMPLE_EVERY.as_millis(),
            mebibytes(SqliteOptions::default().wal_limit),
        );
    }
    if let Some(cpu) = cpu {
        let objects = tideway.requests * OBJECTS as u64;
        let per_object = |d: Duration| cpu::per_object(d, objects);
        eprintln!(
            "{:>16}: CPU per object {:.1} µs in all (SQLite writer thread {:.1} µs, the rest {:.1} µs, load generator included)",
            "tideway",
            per_object(cpu.total),
            per_object(cpu.writer),
            per_object(cpu.total.saturating_sub(cpu.writer)),
        );
    }
    if tideway.requests == 0 {
        anyhow::bail!(
            "no request succeeded: {}",
            tideway
                .first_error
                .as_deref()
                .unwrap_or("no request was sent (is --seconds too short?)")
        );
    }

    if args.skip_limits {
        println!("{}", summary(&args, &mut tideway, wal.as_ref(), None, None));
        return check_errors(&tideway);
    }

    // Limit (a): HTTP + JSON only.
    let noop = NoopServer::start().await?;
    let noop_target = Target {
        client: client.clone(),
        url: format!("http://{}/users/track", noop.addr),
        api_key: None,
        spread: Vec::new(),
    };
    let mut noop_stats = drive(&noop_target, "no-op handler", &args, duration).await;
    noop.stop().await?;
    report_phase("no-op handler", &mut noop_stats);

    // Limit (b): the writes alone (throughput mode only: it has no latency to compare).
    let sqlite = if args.rate.is_none() {
        // One group commit holds at most one request per client (each client has one in
        // flight), so the raw inserts get transactions of that many requests' rows.
        let rows_per_transaction =
            (args.clients as usize).min(SqliteOptions::default().max_batch) * OBJECTS;
        let dir = scratch.path().to_owned();
        let users = args.users;
        let bar = indicatif::ProgressBar::new_spinner().with_message("raw SQLite inserts…");
        bar.enable_steady_tick(Duration::from_millis(200));
        let (rows, took) = tokio::task::spawn_blocking(move || {
            raw_sqlite(&dir, users, rows_per_transaction, duration)
        })
        .await
        .context("the raw SQLite phase panicked")??;
        bar.finish_and_clear();
        let per_sec = rows as f64 / took.as_secs_f64();
        eprintln!(
            "{:>16}: {} rows in {:.1} s, {} rows/s ({rows_per_transaction} rows per transaction)",
            "raw SQLite",
            thousands(rows as f64),
            took.as_secs_f64(),
            thousands(per_sec)
        );
        Some(per_sec)
    } else {
        None
    };

    println!(
        "{}",
        summary(
            &args,
            &mut tideway,
            wal.as_ref(),
            Some(&mut noop_stats),
            sqlite
        )
    );
    check_errors(&tideway)?;
    check_errors(&noop_stats)
}

/// Starts the real server on a fresh store in `dir`, with a key that may track.
async fn start_tideway(
    dir: &std::path::Path,
    synchronous: SyncMode,
) -> anyhow::Result<(InProcess, String)> {
    let store = Arc::new(data::open(
        dir,
        SqliteOptions {
            synchronous: synchronous.into(),
            ..SqliteOptions::default()
        },
    )?);
    let now = data::now();
    let workspace = store
        .create_workspace("bench", now)
        .await
        .context("cannot create the bench workspace")?;
    let permissions: PermissionSet = [Permission::UsersTrack, Permission::UsersExportIds]
        .into_iter()
        .collect();
    let (secret, key) = data::mint_key(
        workspace.id,
        "bench",
        permissions,
        IpAllowlist::default(),
        now,
    );
    store
        .create_api_key(key)
        .await
        .context("cannot create the bench key")?;
    let config = ServerConfig {
        rate_limits: RateLimits::unlimited(),
        ..ServerConfig::default()
    };
    let store: Arc<dyn Store> = store;
    let server = InProcess::start(store, config).await?;
    Ok((server, secret.expose().to_owned()))
}

async fn drive(target: &Target, label: &str, args: &IngestArgs, duration: Duration) -> Stats {
    match args.rate {
        Some(rate) => load::open_loop(target, label, rate, args.users, duration).await,
        None => load::closed_loop(target, label, args.clients as usize, args.users, duration).await,
    }
}

fn report_phase(label: &str, stats: &mut Stats) {
    eprintln!(
        "{label:>16}: {} requests in {:.1} s, {} requests/s, {} objects/s, p50 {}, p99 {}, max {}, {} errors",
        thousands(stats.requests as f64),
        stats.elapsed.as_secs_f64(),
        thousands(stats.requests_per_sec()),
        thousands(stats.objects_per_sec()),
        millis(stats.percentile(50.0)),
        millis(stats.percentile(99.0)),
        millis(stats.percentile(100.0)),
        stats.errors,
    );
    if let Some(e) = &stats.first_error {
        eprintln!("{:>16}  first error: {e}", "");
    }
}

fn check_errors(stats: &Stats) -> anyhow::Result<()> {
    match &stats.first_error {
        None => Ok(()),
        Some(e) => anyhow::bail!(
            "{} requests failed, the figures are not valid; first error: {e}",
            stats.errors
        ),
    }
}

/// The one-line result, e.g. `tideway: 112,000 objects/s (p50 4.1 ms, p99 21 ms, largest
/// WAL 130 MiB) | no-op handler: 400,000 objects/s (ratio 0.28) | raw SQLite inserts: 900,000
/// rows/s (ratio 0.12) | target 100,000 objects/s: PASS | target WAL ≤ 256 MiB: PASS`.
fn summary(
    args: &IngestArgs,
    tideway: &mut Stats,
    wal: Option<&WalSamples>,
    noop: Option<&mut Stats>,
    sqlite_rows_per_sec: Option<f64>,
) -> String {
    let clean = tideway.errors == 0;
    let target = args.target.unwrap_or(100_000);
    let ok = |pass: bool| if pass && clean { "PASS" } else { "FAIL" };
    let (p50, p99) = (tideway.percentile(50.0), tideway.percentile(99.0));
    let tideway_rate = tideway.objects_per_sec();
    let largest_wal = wal.map_or(String::new(), |w| {
        format!(", largest WAL {}", mebibytes(w.largest))
    });
    let wal_target = wal.map(|w| {
        format!(
            "target WAL ≤ {}: {}",
            mebibytes(TARGET_WAL_BYTES),
            ok(w.largest <= TARGET_WAL_BYTES)
        )
    });
    match args.rate {
        None => {
            let mut parts = vec![format!(
                "tideway: {} objects/s (p50 {}, p99 {}{largest_wal})",
                thousands(tideway_rate),
                millis(p50),
                millis(p99)
            )];
            if let Some(noop) = noop {
                let rate = noop.objects_per_sec();
                parts.push(format!(
                    "no-op handler: {} objects/s (ratio {:.2})",
                    thousands(rate),
                    tideway_rate / rate
                ));
            }
            if let Some(rows) = sqlite_rows_per_sec {
                parts.push(format!(
                    "raw SQLite inserts: {} rows/s (ratio {:.2})",
                    thousands(rows),
                    tideway_rate / rows
                ));
            }
            parts.push(format!(
                "target {} objects/s: {}",
                thousands(target as f64),
                ok(tideway_rate >= target as f64)
            ));
            parts.extend(wal_target);
            parts.join(" | ")
        }
        Some(rate) => {
            let mut parts = vec![format!(
                "tideway at {} objects/s offered: {} objects/s (p50 {}, p99 {}{largest_wal})",
                thousands(rate as f64),
                thousands(tideway_rate),
                millis(p50),
                millis(p99)
            )];
            if let Some(noop) = noop {
                parts.push(format!(
                    "no-op handler at the same rate: p50 {}, p99 {}",
                    millis(noop.percentile(50.0)),
                    millis(noop.percentile(99.0))
                ));
            }
            // The schedule must have been kept (within 5 %) for the latency to mean anything.
            let kept = tideway_rate >= 0.95 * rate as f64;
            parts.push(format!(
                "target p99 < {} ms at {} objects/s: {}",
                TARGET_P99.as_millis(),
                thousands(rate as f64),
                ok(kept && p99 < TARGET_P99)
            ));
            parts.extend(wal_target);
            parts.join(" | ")
        }
    }
}

/// The in-process server's WAL file: `<data dir>/tideway.sqlite-wal`.
fn wal_path(data_dir: &std::path::Path) -> PathBuf {
    let mut name = crate::config::database_path(data_dir).into_os_string();
    name.push("-wal");
    PathBuf::from(name)
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1 << 20))
}

/// What the WAL sampler saw over a phase.
#[derive(Debug, Clone, Copy)]
struct WalSamples {
    largest: u64,
    samples: u64,
}

/// Measures the WAL file every [`WAL_SAMPLE_EVERY`] on its own thread while a phase runs: the
/// size on disk, whatever the store believes, is what the bound is about.
struct WalSampler {
    /// Dropped to stop the thread.
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<WalSamples>,
}

impl WalSampler {
    fn start(path: PathBuf) -> WalSampler {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut seen = WalSamples {
                largest: 0,
                samples: 0,
            };
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(WAL_SAMPLE_EVERY)
            {
                // No file yet is a WAL of size 0.
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                seen.largest = seen.largest.max(size);
                seen.samples += 1;
            }
            seen
        });
        WalSampler { stop, thread }
    }

    fn finish(self) -> WalSamples {
        drop(self.stop);
        self.thread.join().unwrap_or(WalSamples {
            largest: u64::MAX,
            samples: 0,
        })
    }
}
