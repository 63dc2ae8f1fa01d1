//! `tideway bench canvas`: Canvas timers (issue targets: 1,000,000 users waiting in Delay steps
//! with ≤ 200 bytes each beyond the store; 100,000 timers falling due at once all processed,
//! with their Currents events, within 10 s; timer lateness p99 < 1 s below saturation).
//!
//! The limit measured in the same run is the webhook receiver's own maximum (as `bench
//! send`). Then, on a SQLite store in a temporary directory with the messaging engine running
//! (this process, system clock):
//! 1. `--users` users enter an API-triggered Canvas (Delay until one moment → webhook). The
//!    process's resident set is sampled before the entries and once every user waits: the
//!    growth per waiting user is reported (it includes SQLite's page cache, i.e. it is an
//!    upper bound on what the engine holds — the engine itself keeps nothing per user).
//! 2. The moment comes: the time until every journey is settled (`in_step` 0 at the Delay;
//!    each settlement writes the Progression, the exit Progression and the queued send) and
//!    until every webhook reached the receiver, beside the receiver's maximum.
//! 3. Lateness: `--spread-users` more users wait for moments spread over `--spread-seconds`;
//!    each webhook carries its user's due time (`canvas_entry_properties`), and the receiver
//!    records arrival − due (timer lateness plus the dispatcher's hand-off: an upper bound).

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
use tideway_core::store::prelude::*;
use tideway_core::store::{CanvasRecord, Workspace};
use tideway_currents::Clock;
use tideway_messaging::canvas::Entrant;
use tideway_messaging::dispatcher::Channels;
use tideway_messaging::engine::{Engine, EngineConfig};
use tideway_messaging::webhook::WebhookSender;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::currents::rss_of;
use super::send::{percentile, receiver_max, seed, serve};

#[derive(Debug, clap::Args)]
pub struct CanvasArgs {
    /// Users waiting in the Delay whose timers fall due at once
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Users whose timers are spread over `--spread-seconds` (the lateness figure)
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

pub async fn run(args: CanvasArgs) -> anyhow::Result<()> {
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
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("bench.sqlite"), SqliteOptions::default())
            .context("open the SQLite store")?,
    );
    let ws = store
        .create_workspace("bench", Clock::system().now())
        .await?;
    let total = args.users + args.spread_users;
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
    let seqs: Vec<_> = store
        .users_by_seq(
            ws.id,
            (1..=u32::try_from(total)?)
                .map(tideway_core::ids::UserSeq)
                .collect(),
        )
        .await?
        .into_iter()
        .map(|u| u.seq)
        .collect();
    if seqs.len() != total {
        bail!("seeded {} users, found {}", total, seqs.len());
    }

    // 1. Everyone waits in the Delay; the process's growth per waiting user.
    let rss_before = rss_of(std::process::id());
    let lead = Duration::from_secs(5 + args.users as u64 / 5_000);
    let entered_start = Instant::now();
    let due = Millis(Clock::system().now().0 + i64::try_from(lead.as_millis())?);
    let burst = canvas("burst", due, &hook_url, "{\"u\": \"{{${user_id}}}\"}")?;
    store.create_canvas(ws.id, burst.clone()).await?;
    for chunk in seqs[..args.users].chunks(1_000) {
        let entrants = chunk
            .iter()
            .map(|&user| Entrant {
                user,
                properties: None,
                due_at: None,
            })
            .collect();
        engine.canvas().enter(ws.id, &burst, entrants, None).await?;
    }
    let entering = entered_start.elapsed();
    if Clock::system().now().0 >= due.0 {
        bail!("entering took {entering:?}, past the due moment: use fewer --users");
    }
    let waiting = in_step(&store, &ws, "burst").await?;
    let rss_waiting = rss_of(std::process::id());
    let per_user = (rss_waiting - rss_before).max(0.0) * 1_048_576.0 / waiting.max(1) as f64;
    println!(
        "{waiting} users waiting (entered in {:.1} s): process grew {:.1} MiB, {per_user:.0} bytes per waiting user (incl. SQLite's cache; target ≤ 200 beyond the store)",
        entering.as_secs_f64(),
        rss_waiting - rss_before
    );

    // 2. The moment comes.
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
        if settled.is_some() && hits.load(Ordering::Relaxed) >= args.users as u64 {
            break;
        }
        if fired.elapsed() > Duration::from_secs(600) {
            bail!("timers still pending after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled = settled.unwrap_or_default();
    let delivered = fired.elapsed();
    let settle_rate = args.users as f64 / settled.as_secs_f64().max(1e-9);
    let deliver_rate = args.users as f64 / delivered.as_secs_f64().max(1e-9);
    println!(
        "{} timers due at once: all settled (Progressions, exits, sends queued) in {:.2} s = {settle_rate:.0}/s ({:.2}× the receiver's max; target ≤ 10 s: {}); all webhooks delivered in {:.2} s = {deliver_rate:.0}/s ({:.2}× the receiver's max)",
        args.users,
        settled.as_secs_f64(),
        settle_rate / limit,
        if settled <= Duration::from_secs(10) {
            "PASS"
        } else {
            "FAIL"
        },
        delivered.as_secs_f64(),
        deliver_rate / limit,
    );

    // 3. Lateness below saturation.
    let start = Clock::system().now().0 + 2_000;
    let spread_ms = i64::try_from(args.spread_seconds)? * 1_000;
    let late_url = format!("http://{late_addr}/late");
    for (i, chunk) in seqs[args.users..].chunks(100).enumerate() {
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
        if p99 < Duration::from_secs(1) {
            "PASS"
        } else {
            "FAIL"
        },
    );
    drop(engine);
    Ok(())
}
