//! `tideway bench canvas`: Canvas timers (issue targets: 1,000,000 users waiting in Delay steps
//! with ≤ 200 bytes each beyond the store; 100,000 timers falling due at once all processed,
//! with their Currents events, within 10 s; timer lateness p99 < 1 s below saturation).
//!
//! The limit measured in the same run is the webhook receiver's own maximum (as `bench
//! send`). Then, on a SQLite store in a temporary directory with the messaging engine running
//! (this process, system clock):
//! 1. `--users` users enter an API-triggered Canvas whose Delay ends in a day (so they all
//!    stay waiting for the rest of the run), in chunks of 1,000 through
//!    [`CanvasEngine::enter`](tideway_messaging::canvas::CanvasEngine::enter), the path of
//!    `/canvas/trigger/send`. The process's anonymous resident memory (`RssAnon`: heap,
//!    stacks, SQLite's page cache, which this store keeps on the heap; not the binary or
//!    mapped files) is sampled after each tenth of the entries. The figure is the *slope*
//!    between the first tenth and all: bytes per additional waiting user, so fixed costs
//!    (page caches that fill up to their bound, allocator arenas, pools, the Canvas version
//!    cache) do not count per user, while anything the process keeps per waiting user does.
//! 2. `--burst` more journeys (the first `--burst` of the same users, in a second Canvas) wait
//!    for one moment, beside the waiting ones. The moment comes: the time until every one is
//!    settled (`in_step` 0 at the Delay; each settlement writes the Progression, the exit
//!    Progression and the queued send in one transaction), against the 10 s target and beside
//!    the time the receiver alone needs for as many requests; and until every webhook
//!    reached the receiver.
//! 3. Lateness: `--spread-users` more journeys wait for moments spread over
//!    `--spread-seconds`; each webhook carries its due time (`canvas_entry_properties`), and
//!    the receiver records arrival − due (timer lateness plus the dispatcher's hand-off: an
//!    upper bound).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use tideway_core::campaigns::CampaignStatus;
use tideway_core::clock::Millis;
use tideway_core::egress::EgressPolicy;
use tideway_core::ids::UserSeq;
use tideway_core::store::prelude::*;
use tideway_core::store::{CanvasRecord, Workspace};
use tideway_currents::Clock;
use tideway_messaging::canvas::Entrant;
use tideway_messaging::dispatcher::Channels;
use tideway_messaging::engine::{Engine, EngineConfig};
use tideway_messaging::webhook::WebhookSender;

use super::send::{percentile, receiver_max, seed, serve};

#[derive(Debug, clap::Args)]
pub struct CanvasArgs {
    /// Users waiting in a Delay for the memory figure (they stay waiting all run)
    #[arg(long, default_value_t = 1_000_000)]
    pub users: usize,
    /// Journeys whose timers fall due at once (the first of the same users, in a second Canvas)
    #[arg(long, default_value_t = 100_000)]
    pub burst: usize,
    /// Journeys whose timers are spread over `--spread-seconds` (the lateness figure)
    #[arg(long, default_value_t = 2_000)]
    pub spread_users: usize,
    #[arg(long, default_value_t = 10)]
    pub spread_seconds: u64,
    /// Concurrent clients measuring the receiver's own maximum
    #[arg(long, default_value_t = 128)]
    pub clients: usize,
    /// Seconds the receiver-limit measurement runs
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Run on PostgreSQL (a workspace of its own in this database) instead of a temporary
    /// SQLite file (the memory figure then leaves out the database, which is another process)
    #[arg(long)]
    pub database_url: Option<String>,
}

/// Bytes per waiting user the issue allows beyond the store.
const TARGET_BYTES_PER_USER: f64 = 200.0;

/// The process's anonymous resident memory (`RssAnon` in /proc/self/status), in bytes.
fn rss_anon() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .context("no RssAnon in /proc/self/status")?;
    Ok(kib * 1024.0)
}

/// Waits until the process's anonymous memory is steady before the first entry: idle blocking
/// threads (tokio keeps them 10 s) and the allocator give back what seeding and the receiver
/// measurement used. Samples 1 s apart until five in a row lie within 1 MiB, at most 90 s;
/// returns the last sample and the time taken.
async fn settle() -> anyhow::Result<(f64, Duration)> {
    let started = Instant::now();
    let mut recent = vec![rss_anon()?];
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        recent.push(rss_anon()?);
        let window = &recent[recent.len().saturating_sub(5)..];
        let (lo, hi) = window
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &b| (lo.min(b), hi.max(b)));
        if window.len() == 5 && hi - lo <= 1_048_576.0 {
            return Ok((recent[recent.len() - 1], started.elapsed()));
        }
        if started.elapsed() > Duration::from_secs(90) {
            bail!(
                "anonymous memory not steady after 90 s: {:.0}..{:.0} MiB",
                lo / 1_048_576.0,
                hi / 1_048_576.0
            );
        }
    }
}

fn progress(len: usize, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:40}} {{pos}}/{{len}} ({{per_sec}}, {{eta}})"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

async fn hook(State(count): State<Arc<AtomicU64>>, body: Bytes) -> &'static str {
    std::hint::black_box(&body);
    count.fetch_add(1, Ordering::Relaxed);
    "{}"
}

/// The lateness receiver: arrival − the due time the body carries, in ms.
async fn late(State(l): State<Arc<Mutex<Vec<i64>>>>, body: Bytes) -> &'static str {
    let now = Clock::system().now().0;
    if let Ok(v) = serde_json::from_slice::<Value>(&body)
        && let Some(due) = v["due"].as_str().and_then(|d| d.parse::<i64>().ok())
        && let Ok(mut l) = l.lock()
    {
        l.push(now - due);
    }
    "{}"
}

fn canvas(id: &str, until: Millis, url: &str, body: &str) -> anyhow::Result<CanvasRecord> {
    let raw = json!({
        "entry": {"type": "api_triggered"},
        "frequency_capping": false,
        "steps": [
            {"id": "wait", "type": "delay", "delay": {"until": until.to_iso()}, "next": "hook"},
            {"id": "hook", "type": "message", "message": {"channel": "webhook", "url": url, "body": body}}
        ]
    });
    let (_, definition) = tideway_core::canvas::CanvasDefinition::parse(&raw, || "x".into())
        .map_err(|e| anyhow::anyhow!("bench Canvas: {e}"))?;
    let now = Clock::system().now();
    Ok(CanvasRecord {
        id: id.to_owned(),
        name: id.to_owned(),
        description: String::new(),
        tags: Vec::new(),
        status: CampaignStatus::Active,
        version: 1,
        definition,
        created_at: now,
        updated_at: now,
        launched_at: Some(now),
        next_run: None,
        first_entry: None,
        last_entry: None,
        entries: 0,
    })
}

async fn in_step(store: &Arc<dyn Store>, ws: &Workspace, id: &str) -> anyhow::Result<u64> {
    Ok(store
        .canvas_step_counts(ws.id, id)
        .await?
        .iter()
        .find(|c| c.step_id == "wait")
        .map_or(0, |c| c.in_step))
}

/// Enters `users` into `canvas` in chunks of 1,000 through the engine's entry path; calls
/// `each_tenth` after each tenth of them (with how many are in); the number entered.
async fn enter_all<F>(
    engine: &Engine<dyn Store>,
    ws: &Workspace,
    canvas: &CanvasRecord,
    users: &[UserSeq],
    bar: &indicatif::ProgressBar,
    mut each_tenth: F,
) -> anyhow::Result<u64>
where
    F: FnMut(usize) -> anyhow::Result<()>,
{
    let mut entered = 0;
    let mut next_tenth = 1;
    for (i, chunk) in users.chunks(1_000).enumerate() {
        let entrants = chunk
            .iter()
            .map(|&user| Entrant {
                user,
                properties: None,
                due_at: None,
            })
            .collect();
        entered += engine
            .canvas()
            .enter(ws.id, canvas, entrants, None)
            .await?
            .entered;
        bar.inc(chunk.len() as u64);
        let done = (i * 1_000 + chunk.len()).min(users.len());
        while next_tenth <= 10 && done * 10 >= users.len() * next_tenth {
            each_tenth(done)?;
            next_tenth += 1;
        }
    }
    Ok(entered)
}

pub async fn run(args: CanvasArgs) -> anyhow::Result<()> {
    if args.users < 10 {
        bail!("--users must be at least 10 (the memory slope needs a tenth of them)");
    }
    let hits = Arc::new(AtomicU64::new(0));
    let lateness = Arc::new(Mutex::new(Vec::new()));
    let hook_addr = serve(
        axum::Router::new()
            .route("/hook", post(hook))
            .with_state(Arc::clone(&hits)),
    )
    .await?;
    let late_addr = serve(
        axum::Router::new()
            .route("/late", post(late))
            .with_state(Arc::clone(&lateness)),
    )
    .await?;
    let hook_url = format!("http://{hook_addr}/hook");
    let limit = receiver_max(&hook_url, args.clients, args.seconds).await?;
    hits.store(0, Ordering::Relaxed);
    println!("webhook receiver's own maximum: {limit:.0} requests/s");

    let dir = tempfile::tempdir()?;
    let store = super::open_store(dir.path(), args.database_url.as_deref()).await?;
    let ws = store
        .create_workspace(
            &format!("bench-canvas-{}", uuid::Uuid::new_v4().simple()),
            Clock::system().now(),
        )
        .await?;
    let total = args.users.max(args.burst + args.spread_users);
    seed(&store, &ws, total).await?;
    let audiences = tideway_server::standalone_audiences(Arc::clone(&store));
    let engine = Engine::start(
        Arc::clone(&store),
        audiences,
        Channels {
            webhook: WebhookSender::new(EgressPolicy::default(), Duration::from_secs(90))?,
            smtp: None,
        },
        None,
        Clock::system(),
        EngineConfig::default(),
    );
    // The seeded users, checked in chunks (profiles loaded at once would be a transient
    // gigabyte at 1 M users, and the memory figure below would start while it is returned).
    let seqs: Vec<UserSeq> = (1..=u32::try_from(total)?).map(UserSeq).collect();
    for chunk in seqs.chunks(10_000) {
        let found = store.users_by_seq(ws.id, chunk.to_vec()).await?.len();
        if found != chunk.len() {
            bail!(
                "seeded users {:?}…: {found} of {} found",
                chunk[0],
                chunk.len()
            );
        }
    }
    let (anon_start, settled_in) = settle().await?;

    // 1. `--users` users wait in a Delay that ends in a day; RssAnon after each tenth.
    let hold = canvas(
        "hold",
        Millis(Clock::system().now().0 + 86_400_000),
        &hook_url,
        "{\"u\": \"{{${user_id}}}\"}",
    )?;
    store.create_canvas(ws.id, hold.clone()).await?;
    let mut samples: Vec<(usize, f64)> = Vec::new();
    let bar = progress(args.users, "entering users");
    let entering = Instant::now();
    let entered = enter_all(&engine, &ws, &hold, &seqs[..args.users], &bar, |done| {
        samples.push((done, rss_anon()?));
        Ok(())
    })
    .await?;
    let entering = entering.elapsed();
    bar.finish_and_clear();
    let waiting = in_step(&store, &ws, "hold").await?;
    if entered != args.users as u64 || waiting != args.users as u64 {
        bail!(
            "{} users entered, {entered} entries made, {waiting} waiting",
            args.users
        );
    }
    let entry_rate = args.users as f64 / entering.as_secs_f64().max(1e-9);
    let (first_n, first_anon) = samples[0];
    let (last_n, last_anon) = samples[samples.len() - 1];
    if first_n >= last_n {
        bail!(
            "--users {} is too small for a slope: the first tenth and all fall in one chunk of 1,000",
            args.users
        );
    }
    let slope = (last_anon - first_anon) / (last_n - first_n).max(1) as f64;
    println!(
        "{waiting} users entered and waiting in a Delay in {:.1} s = {entry_rate:.0} entries/s (chunks of 1,000 through the API-trigger entry path)",
        entering.as_secs_f64()
    );
    println!(
        "anonymous resident memory (RssAnon) at each tenth of them: {} MiB (before: {:.1} MiB, steady after {:.0} s)",
        samples
            .iter()
            .map(|(_, b)| format!("{:.1}", b / 1_048_576.0))
            .collect::<Vec<_>>()
            .join(", "),
        anon_start / 1_048_576.0,
        settled_in.as_secs_f64(),
    );
    println!(
        "memory per waiting user (RssAnon growth from {first_n} to {last_n} waiting users): {slope:.1} bytes = {:.3}× the 200-byte target: {} (whole growth from before the first entry, fixed costs included: {:.0} bytes per user)",
        slope / TARGET_BYTES_PER_USER,
        verdict(slope <= TARGET_BYTES_PER_USER),
        (last_anon - anon_start) / last_n as f64,
    );

    // 2. `--burst` more journeys wait for one moment, beside the waiting ones.
    let lead_ms = 5_000.0 + 2_000.0 * args.burst as f64 / entry_rate;
    let due = Millis(Clock::system().now().0 + lead_ms as i64);
    let burst = canvas("burst", due, &hook_url, "{\"u\": \"{{${user_id}}}\"}")?;
    store.create_canvas(ws.id, burst.clone()).await?;
    let bar = progress(args.burst, "entering the burst");
    let entered = enter_all(&engine, &ws, &burst, &seqs[..args.burst], &bar, |_| Ok(())).await?;
    bar.finish_and_clear();
    if entered != args.burst as u64 {
        bail!("{} burst entries asked, {entered} made", args.burst);
    }
    if Clock::system().now().0 >= due.0 {
        bail!("entering the burst went past its due moment: use a smaller --burst");
    }
    tokio::time::sleep(Duration::from_millis(u64::try_from(
        (due.0 - Clock::system().now().0).max(0),
    )?))
    .await;
    let fired = Instant::now();
    let mut settled = None;
    loop {
        if settled.is_none() && in_step(&store, &ws, "burst").await? == 0 {
            settled = Some(fired.elapsed());
        }
        if settled.is_some() && hits.load(Ordering::Relaxed) >= args.burst as u64 {
            break;
        }
        if fired.elapsed() > Duration::from_secs(600) {
            bail!("timers still pending after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled = settled.unwrap_or_default();
    let delivered = fired.elapsed();
    let receiver_alone = args.burst as f64 / limit;
    println!(
        "{} timers due at once (beside {} waiting): all settled (Progressions, exits, sends queued) in {:.2} s = {:.0}/s; the receiver alone takes {receiver_alone:.2} s for as many requests: {:.2}× that; target ≤ 10 s: {}",
        args.burst,
        args.users,
        settled.as_secs_f64(),
        args.burst as f64 / settled.as_secs_f64().max(1e-9),
        settled.as_secs_f64() / receiver_alone,
        verdict(settled <= Duration::from_secs(10)),
    );
    println!(
        "…and every webhook delivered in {:.2} s = {:.0}/s = {:.2}× the receiver's max (within 10 s: {})",
        delivered.as_secs_f64(),
        args.burst as f64 / delivered.as_secs_f64().max(1e-9),
        args.burst as f64 / delivered.as_secs_f64().max(1e-9) / limit,
        verdict(delivered <= Duration::from_secs(10)),
    );

    // 3. Lateness below saturation.
    let start = Clock::system().now().0 + 2_000;
    let spread_ms = i64::try_from(args.spread_seconds)? * 1_000;
    let late_url = format!("http://{late_addr}/late");
    let spread = &seqs[args.burst..args.burst + args.spread_users];
    for (i, chunk) in spread.chunks(100).enumerate() {
        let at = Millis(
            start + spread_ms * i64::try_from(i * 100)? / i64::try_from(args.spread_users.max(1))?,
        );
        let c = canvas(
            &format!("spread-{i}"),
            at,
            &late_url,
            "{\"due\": \"{{canvas_entry_properties.${due}}}\"}",
        )?;
        store.create_canvas(ws.id, c.clone()).await?;
        let entrants = chunk
            .iter()
            .map(|&user| Entrant {
                user,
                properties: Some(json!({"due": at.0.to_string()}).to_string()),
                due_at: None,
            })
            .collect();
        engine.canvas().enter(ws.id, &c, entrants, None).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(args.spread_seconds + 120);
    while lateness.lock().map(|l| l.len()).unwrap_or(0) < args.spread_users {
        if Instant::now() > deadline {
            bail!("spread timers still pending");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut l: Vec<Duration> = lateness
        .lock()
        .map_err(|_| anyhow::anyhow!("lateness poisoned"))?
        .iter()
        .map(|ms| Duration::from_millis(u64::try_from((*ms).max(0)).unwrap_or(0)))
        .collect();
    l.sort_unstable();
    let p99 = percentile(&l, 99.0);
    println!(
        "lateness of {} timers spread over {} s (due → webhook at the receiver): p50 {:.0} ms, p99 {:.0} ms (target p99 < 1 s: {})",
        l.len(),
        args.spread_seconds,
        percentile(&l, 50.0).as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        verdict(p99 < Duration::from_secs(1)),
    );
    drop(engine);
    Ok(())
}
