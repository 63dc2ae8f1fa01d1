//! `tideway bench currents`: the Currents exporter against local receivers (DESIGN.md §4:
//! ≥ 100,000 events/s delivered in batches of 100, p99 event-to-delivery < 2 s below
//! saturation, memory flat with a 10 M-event backlog).
//!
//! Limits measured in the same run: each receiver's own maximum for the same 100-event
//! batches (several concurrent clients posting pre-built batches with fresh ids as fast as it
//! answers). Then, through the real exporter on a real SQLite event log:
//! 1. throughput: a backlog of `--events` drained to `tideway sink` and to a no-op receiver;
//! 2. latency: events appended at `--rate` (below saturation) to a receiver that timestamps
//!    each arrival, p50/p99 from append commit to arrival;
//! 3. memory: the peak resident set size of a real `tideway serve` process draining a 1 M
//!    backlog, and of a fresh one with `--backlog` (10 M) queued.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tideway_core::store::prelude::*;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Map, Value, json};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventUser};
use tideway_core::currents_store::{Current, CurrentStatus, CurrentsStore, StatusChange};
use tideway_core::ids::{BrazeId, EventId, ExternalId, UserSeq};
use tideway_core::keys::{IpAllowlist, PermissionSet};
use tideway_core::store::Workspace;
use tideway_currents::spec::parse_spec;
use tideway_currents::{Exporter, ExporterConfig};
use tideway_heap::sink::{self, SinkConfig};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use crate::bench::load;

fn thousands(n: u64) -> String {
    load::thousands(n as f64)
}

const TARGET_RATE: f64 = 100_000.0;
const TARGET_P99: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct CurrentsArgs {
    /// Backlog drained for the throughput figures
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Backlog for the memory figure (RSS is compared with a 1 M backlog)
    #[arg(long, default_value_t = 10_000_000)]
    pub backlog: usize,
    /// Events per second appended for the latency figure (half the 100,000/s target; 0: half
    /// the measured no-op throughput, which on a 2-core machine saturates the appends instead)
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// Seconds each receiver-limit and latency measurement runs
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Concurrent clients measuring a receiver's own maximum
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Batches in flight per Current
    #[arg(long, default_value_t = 2)]
    pub max_in_flight: u32,
    /// Where the SQLite files go (default: a temporary directory, removed afterwards)
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

// ---- receivers ---------------------------------------------------------------------------

/// A receiver that reads the body and answers 200 (counting events by a cheap scan), and
/// optionally timestamps each event's arrival (`custom_properties.t_us`, micros since `base`).
#[derive(Clone)]
struct Noop {
    events: Arc<AtomicU64>,
    latencies: Option<Arc<Mutex<Vec<u64>>>>,
    base: Instant,
}

async fn noop(State(n): State<Noop>, body: Bytes) -> &'static str {
    match &n.latencies {
        None => {
            let count = memchr_count(&body, b"\"event_type\"");
            n.events.fetch_add(count, Ordering::Relaxed);
        }
        Some(lat) => {
            let now = n.base.elapsed().as_micros() as u64;
            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                let mut got = Vec::new();
                for e in v["events"].as_array().into_iter().flatten() {
                    if let Some(t) = e["properties"]["custom_properties"]["t_us"].as_u64() {
                        got.push(now.saturating_sub(t));
                    }
                }
                n.events.fetch_add(got.len() as u64, Ordering::Relaxed);
                if let Ok(mut l) = lat.lock() {
                    l.extend(got);
                }
            }
        }
    }
    "{}"
}

fn memchr_count(hay: &[u8], needle: &[u8]) -> u64 {
    hay.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

async fn start_noop(n: Noop) -> anyhow::Result<(SocketAddr, tokio::sync::oneshot::Sender<()>)> {
    let app = axum::Router::new().route("/", post(noop)).with_state(n);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok((addr, stop))
}

/// A Currents batch of 100 custom events with fresh ids (`prefix-n`).
fn batch(prefix: &str, start: u64) -> String {
    let mut body = String::with_capacity(100 * 330);
    body.push_str("{\"events\":[");
    for i in 0..100 {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            "{{\"event_type\":\"users.behaviors.CustomEvent\",\"id\":\"{prefix}-{:016x}\",\"time\":1700000000,\"user\":{{\"user_id\":\"0123456789abcdef01234567\",\"external_user_id\":\"u{}\"}},\"properties\":{{\"app_group_id\":\"ag\",\"name\":\"opened\",\"custom_properties\":{{\"plan\":\"pro\",\"seats\":3}}}}}}",
            (start + i).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            (start + i) % 1000
        ));
    }
    body.push_str("]}");
    body
}

/// A receiver's own maximum for 100-event batches: events/s over `seconds`.
async fn receiver_max(
    url: &str,
    clients: usize,
    seconds: u64,
    prefix: &str,
) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, next, url, prefix) = (
            client.clone(),
            Arc::clone(&next),
            url.to_owned(),
            prefix.to_owned(),
        );
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let start = next.fetch_add(100, Ordering::Relaxed);
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("braze-currents-version", "1")
                    .body(batch(&prefix, start))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    anyhow::bail!("receiver answered {}", r.status());
                }
                sent += 100;
            }
            Ok::<u64, anyhow::Error>(sent)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

// ---- the event log -----------------------------------------------------------------------

fn event(i: u64, t_us: Option<u64>) -> (Option<UserSeq>, CurrentsEvent) {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&(i % 100_000).to_be_bytes());
    let braze = BrazeId::from_bytes(bytes);
    let ext = ExternalId::parse(&format!("u{}", i % 100_000)).unwrap_or_else(|_| unreachable_ext());
    let user = EventUser {
        braze_id: &braze,
        external_id: Some(&ext),
        device_id: None,
        time_zone: None,
    };
    let mut props = Map::new();
    props.insert("plan".into(), json!("pro"));
    if let Some(t) = t_us {
        props.insert("t_us".into(), json!(t));
    }
    let id = EventId(uuid::Uuid::new_v4().hyphenated().to_string());
    (
        Some(UserSeq((i % 100_000) as u32 + 1)),
        CurrentsEvent::custom_event(
            id,
            Millis(1_700_000_000_000),
            &user,
            "ag",
            None,
            "opened",
            &props,
        ),
    )
}

#[cold]
fn unreachable_ext() -> ExternalId {
    // "u<digits>" always parses; this keeps the bench free of panics.
    ExternalId::parse("u").unwrap_or_else(|_| unreachable_ext())
}

async fn append(store: &SqliteStore, ws: &Workspace, n: usize, from: u64) -> anyhow::Result<()> {
    const CHUNK: usize = 5_000;
    let mut done = 0;
    let mut pending = Vec::new();
    while done < n {
        let take = CHUNK.min(n - done);
        let events: Vec<_> = (0..take)
            .map(|k| event(from + (done + k) as u64, None))
            .collect();
        pending.push(store.append_events(ws.id, events));
        done += take;
        if pending.len() == 4 {
            for f in pending.drain(..) {
                f.await.context("append to the event log")?;
            }
        }
    }
    for f in pending {
        f.await.context("append to the event log")?;
    }
    Ok(())
}

fn spec(url: &str, max_in_flight: u32) -> Value {
    json!({"name": "bench", "kind": "custom_http", "endpoint": url, "event_types": ["users.behaviors.CustomEvent"],
           "batch_size": 100, "max_in_flight": max_in_flight})
}

async fn paused(
    store: &SqliteStore,
    ws: &Workspace,
    url: &str,
    max_in_flight: u32,
) -> anyhow::Result<Current> {
    let spec = parse_spec(&spec(url, max_in_flight)).context("bench Current spec")?;
    let c = store
        .create_current(ws.id, spec, CurrentStatus::Active, crate::data::now())
        .await?;
    Ok(store
        .change_status(c.id, StatusChange::Pause, None, crate::data::now())
        .await?)
}

/// Resumes `c` and measures how fast it drains `n` events.
async fn drain(
    exporter: &Exporter,
    store: &SqliteStore,
    c: &Current,
    n: u64,
) -> anyhow::Result<f64> {
    let start_count = c.counters.delivered;
    store
        .change_status(c.id, StatusChange::Resume, None, crate::data::now())
        .await?;
    let started = Instant::now();
    exporter.sync().await;
    let (after, ok) = exporter
        .wait_for(c.id, Duration::from_secs(3_600), |x| {
            x.counters.delivered >= start_count + n
        })
        .await?;
    anyhow::ensure!(ok, "the backlog did not drain: {:?}", after.counters);
    let rate = n as f64 / started.elapsed().as_secs_f64();
    store
        .change_status(c.id, StatusChange::Pause, None, crate::data::now())
        .await?;
    exporter.sync().await;
    Ok(rate)
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_micros(sorted[i.min(sorted.len() - 1)])
}

pub async fn run(args: CurrentsArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir_in(args.dir.clone().unwrap_or_else(std::env::temp_dir))
        .context("temporary directory")?;
    let data_dir = tmp.path().join("data");
    let store = Arc::new(crate::data::open(&data_dir, SqliteOptions::default())?);
    let ws = store.create_workspace("bench", crate::data::now()).await?;
    println!(
        "tideway bench currents: batches of 100, {} batches in flight per Current, {} clients for receiver limits",
        args.max_in_flight, args.clients
    );

    // Receivers and their own maxima.
    let sink = sink::start(SinkConfig::new(
        "127.0.0.1:0".parse()?,
        tmp.path().join("sink"),
    ))
    .await?;
    let sink_url = format!("http://{}/", sink.addr);
    let noop_state = Noop {
        events: Arc::new(AtomicU64::new(0)),
        latencies: None,
        base: Instant::now(),
    };
    let (noop_addr, noop_stop) = start_noop(noop_state.clone()).await?;
    let noop_url = format!("http://{noop_addr}/");
    let sink_max = receiver_max(&sink_url, args.clients, args.seconds, "limit").await?;
    let noop_max = receiver_max(&noop_url, args.clients, args.seconds, "limit").await?;
    println!(
        "receiver limits:      tideway sink {:>10} events/s | no-op {:>10} events/s",
        thousands(sink_max as u64),
        thousands(noop_max as u64)
    );

    // Throughput: one backlog, drained by one Current per receiver.
    let exporter = Exporter::start(
        store.clone(),
        ExporterConfig {
            owner: "bench".into(),
            poll_interval_ms: 5,
            ..ExporterConfig::default()
        },
    );
    let to_sink = paused(&store, &ws, &sink_url, args.max_in_flight).await?;
    let to_noop = paused(&store, &ws, &noop_url, args.max_in_flight).await?;
    let t = Instant::now();
    append(&store, &ws, args.events, 0).await?;
    println!(
        "backlog:              {} events appended in {:.1} s",
        thousands(args.events as u64),
        t.elapsed().as_secs_f64()
    );
    let rate_sink = drain(&exporter, &store, &to_sink, args.events as u64).await?;
    let rate_noop = drain(&exporter, &store, &to_noop, args.events as u64).await?;
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!(
        "export → tideway sink {:>10} events/s = {:.2} × the sink's own max   [{} ≥ 100,000/s]",
        thousands(rate_sink as u64),
        rate_sink / sink_max,
        verdict(rate_sink >= TARGET_RATE)
    );
    println!(
        "export → no-op        {:>10} events/s = {:.2} × the no-op's own max  [{} ≥ 100,000/s]",
        thousands(rate_noop as u64),
        rate_noop / noop_max,
        verdict(rate_noop >= TARGET_RATE)
    );

    // Latency below saturation.
    let rate = if args.rate > 0 {
        args.rate
    } else {
        (rate_noop / 2.0) as u64
    };
    let lat_state = Noop {
        events: Arc::new(AtomicU64::new(0)),
        latencies: Some(Arc::new(Mutex::new(Vec::new()))),
        base: Instant::now(),
    };
    let (lat_addr, lat_stop) = start_noop(lat_state.clone()).await?;
    let spec = parse_spec(&spec(&format!("http://{lat_addr}/"), args.max_in_flight))?;
    let live = store
        .create_current(ws.id, spec, CurrentStatus::Active, crate::data::now())
        .await?;
    exporter.sync().await;
    let tick = Duration::from_millis(10);
    let per_tick = (rate as f64 * tick.as_secs_f64()).max(1.0) as usize;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut appended = 0u64;
    let mut writes = Vec::new();
    while Instant::now() < deadline {
        ticker.tick().await;
        let t_us = lat_state.base.elapsed().as_micros() as u64;
        let events: Vec<_> = (0..per_tick)
            .map(|k| event(appended + k as u64, Some(t_us)))
            .collect();
        appended += per_tick as u64;
        let (store, ws_id) = (Arc::clone(&store), ws.id);
        writes.push(tokio::spawn(async move {
            store.append_events(ws_id, events).await
        }));
    }
    for w in writes {
        w.await??;
    }
    let (_, ok) = exporter
        .wait_for(live.id, Duration::from_secs(600), |c| {
            c.counters.delivered >= appended
        })
        .await?;
    anyhow::ensure!(ok, "the latency run did not drain");
    let mut lat = lat_state
        .latencies
        .as_ref()
        .map(|l| l.lock().map(|v| v.clone()).unwrap_or_default())
        .unwrap_or_default();
    lat.sort_unstable();
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    println!(
        "latency at {:>7} events/s ({:.0}% of no-op export): p50 {:>6.1} ms, p99 {:>6.1} ms over {} events   [{} p99 < 2 s]",
        thousands(rate),
        rate as f64 / rate_noop * 100.0,
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        thousands(lat.len() as u64),
        verdict(p99 < TARGET_P99)
    );
    store
        .change_status(live.id, StatusChange::Pause, None, crate::data::now())
        .await?;
    exporter.sync().await;

    // Memory: a real `tideway serve` on this data directory, draining 1 M and then `backlog`
    // queued events to the no-op receiver; its peak RSS in each case.
    exporter.stop().await;
    let (secret, key) = crate::data::mint_key(
        ws.id,
        "bench",
        PermissionSet::all(),
        IpAllowlist::default(),
        crate::data::now(),
    );
    store.create_api_key(key).await?;
    let mem = paused(&store, &ws, &noop_url, args.max_in_flight).await?;
    let small = 1_000_000.min(args.backlog);
    append(&store, &ws, small, 50_000_000).await?;
    let small_queued = store.lag(mem.id, None).await?.events;
    let (idle_small, rss_small) =
        serve_rss(&data_dir, secret.expose(), mem.id.0, args.seconds).await?;
    let left = store.lag(mem.id, None).await?.events;
    let more = (args.backlog as u64).saturating_sub(left);
    let t = Instant::now();
    append(&store, &ws, more as usize, 60_000_000).await?;
    println!(
        "backlog:              {} more events appended in {:.1} s",
        thousands(more),
        t.elapsed().as_secs_f64()
    );
    let big_queued = store.lag(mem.id, None).await?.events;
    let (idle_big, rss_big) = serve_rss(&data_dir, secret.expose(), mem.id.0, args.seconds).await?;
    println!(
        "memory: tideway serve peak RSS draining {rss_small:.0} MiB with {} queued, {rss_big:.0} MiB with {} queued: ratio {:.2}   [{} flat: ≤ 1.25]",
        thousands(small_queued),
        thousands(big_queued),
        rss_big / rss_small.max(1.0),
        verdict(rss_big <= rss_small * 1.25)
    );
    println!(
        "        (the same servers idle, Current paused: {idle_small:.0} MiB and {idle_big:.0} MiB; draining adds {:+.0} and {:+.0} MiB)",
        rss_small - idle_small,
        rss_big - idle_big
    );

    let _ = lat_stop.send(());
    let _ = noop_stop.send(());
    sink.stop().await;
    Ok(())
}

pub(super) fn rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Starts `tideway serve` on `data_dir`, resumes Current `id` through the API, samples the
/// server's RSS every 100 ms for `seconds`, pauses the Current and stops the server; returns
/// the peak RSS idle (2 s before resuming) and while draining.
async fn serve_rss(
    data_dir: &std::path::Path,
    key: &str,
    id: i64,
    seconds: u64,
) -> anyhow::Result<(f64, f64)> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().context("the tideway executable")?;
    let mut child = tokio::process::Command::new(exe)
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start tideway serve")?;
    let pid = child.id().context("the server's pid")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let url = loop {
        let line = lines.next_line().await?.context("tideway serve exited")?;
        if let Some(url) = line.strip_prefix(crate::serve::LISTENING_LINE) {
            break url.trim().to_owned();
        }
    };
    // The idle server first (store, caches, other services), then the same server draining.
    let mut idle: f64 = 0.0;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..20 {
        ticker.tick().await;
        idle = idle.max(rss_of(pid));
    }
    let client = reqwest::Client::new();
    let action = |what: &'static str| {
        client
            .post(format!("{url}/api/v1/currents/{id}/{what}"))
            .bearer_auth(key)
            .send()
    };
    anyhow::ensure!(
        action("resume").await?.status().is_success(),
        "cannot resume the Current"
    );
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut peak: f64 = 0.0;
    while Instant::now() < deadline {
        ticker.tick().await;
        peak = peak.max(rss_of(pid));
    }
    anyhow::ensure!(
        action("pause").await?.status().is_success(),
        "cannot pause the Current"
    );
    child.kill().await.context("stop tideway serve")?;
    Ok((idle, peak))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_batches_hold_100_events_with_fresh_ids() {
        let v: Value = serde_json::from_str(&batch("p", 500)).unwrap();
        let events = v["events"].as_array().unwrap();
        assert_eq!(events.len(), 100);
        let ids: std::collections::HashSet<&str> =
            events.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 100);
        assert!(
            ids.contains(format!("p-{:016x}", 500u64.wrapping_mul(0x9E37_79B9_7F4A_7C15)).as_str())
        );
        assert_eq!(
            memchr_count(batch("p", 0).as_bytes(), b"\"event_type\""),
            100
        );
    }
}
