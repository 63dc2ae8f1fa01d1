//! `tideway bench send`: campaigns through the webhook channel (issue targets: ≥ 20,000
//! sends/s for a 1,000,000-user audience with every `webhook.Send` event written; partner
//! cohort delta → action-based webhook → its `webhook.Send` at a Current's receiver with p50
//! < 1 s and p99 < 2 s over 1,000 users entering).
//!
//! The limit measured in the same run is the webhook receiver's own maximum: `--clients`
//! concurrent clients posting the same request a send makes, as fast as it answers. Then,
//! through a real in-process server (the same app as `tideway serve`, messaging engine and
//! Currents exporter running, SQLite in a temporary directory):
//! 1. throughput: an API-triggered campaign broadcast to `--users` users, timed from the
//!    request to the last send settled (every `webhook.Send` written with it);
//! 2. latency: an action-based campaign on a Heap cohort's entry; `--entering` users enter
//!    one per partner request at `--rate` per second, and a Current delivers the campaign's
//!    events to a receiver that timestamps each `webhook.Send`; latency is from the cohort
//!    request's start to that arrival.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tideway_core::store::prelude::*;

use anyhow::{Context, bail};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use tideway_core::egress::EgressPolicy;
use tideway_core::keys::{IpAllowlist, PermissionSet, Secret};
use tideway_core::store::Workspace;
use tideway_core::track::parse_track;
use tideway_currents::{Clock, Exporter, ExporterConfig};
use tideway_messaging::dispatcher::{Channels, Tracking};
use tideway_messaging::engine::EngineConfig;
use tideway_messaging::tracking::{TrackingKey, TrackingUrls};
use tideway_messaging::webhook::WebhookSender;
use tideway_server::{CurrentsApi, MessagingOptions, ServerConfig};

use crate::bench::load::millis;
use crate::data;
use crate::serve::InProcess;

fn thousands(n: u64) -> String {
    crate::bench::load::thousands(n as f64)
}

const TARGET_RATE: f64 = 20_000.0;
const TARGET_P50: Duration = Duration::from_secs(1);
const TARGET_P99: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// Users in the broadcast audience
    #[arg(long, default_value_t = 1_000_000)]
    pub users: usize,
    /// Users entering the cohort for the latency figure
    #[arg(long, default_value_t = 1_000)]
    pub entering: usize,
    /// Users entering per second (one partner request each)
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Concurrent clients measuring the receiver's own maximum
    #[arg(long, default_value_t = 128)]
    pub clients: usize,
    /// Seconds the receiver-limit measurement runs
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Run on PostgreSQL (a workspace of its own in this database) instead of a temporary
    /// SQLite file
    #[arg(long)]
    pub database_url: Option<String>,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

// ---- receivers ---------------------------------------------------------------------------

/// The webhook receiver: counts requests and answers 200.
async fn hook(State(count): State<Arc<AtomicU64>>, body: Bytes) -> &'static str {
    std::hint::black_box(&body);
    count.fetch_add(1, Ordering::Relaxed);
    "{}"
}

/// The Currents receiver of the latency figure: the arrival of each `webhook.Send`, by
/// external id.
#[derive(Clone)]
struct Arrivals {
    at: Arc<Mutex<HashMap<String, Instant>>>,
}

async fn currents(State(a): State<Arrivals>, body: Bytes) -> &'static str {
    let now = Instant::now();
    if let Ok(v) = serde_json::from_slice::<Value>(&body)
        && let Ok(mut at) = a.at.lock()
    {
        for e in v["events"].as_array().into_iter().flatten() {
            if e["event_type"] == "users.messages.webhook.Send"
                && let Some(id) = e["user"]["external_user_id"].as_str()
            {
                at.entry(id.to_owned()).or_insert(now);
            }
        }
    }
    "{}"
}

pub(super) async fn serve(router: axum::Router) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(addr)
}

/// The receiver's own maximum: requests/s of `clients` concurrent clients for `seconds`.
pub(super) async fn receiver_max(url: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", format!("tw-1-{i}-{sent}"))
                    .body(format!("{{\"user\": \"bench-{i}\", \"plan\": \"pro\"}}"))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("receiver answered {}", r.status());
                }
                sent += 1;
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

pub(super) async fn seed(
    store: &Arc<dyn Store>,
    ws: &Workspace,
    users: usize,
) -> anyhow::Result<()> {
    let progress = indicatif::ProgressBar::new(users as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("seeding users {bar:40} {pos}/{len} ({eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (store, ws, next, progress) = (
            Arc::clone(store),
            ws.clone(),
            Arc::clone(&next),
            progress.clone(),
        );
        tasks.spawn(async move {
            loop {
                let start = next.fetch_add(75, Ordering::Relaxed) as usize;
                if start >= users {
                    return Ok::<(), anyhow::Error>(());
                }
                let end = (start + 75).min(users);
                let attributes: Vec<Value> = (start..end)
                    .map(|i| json!({"external_id": format!("bench-{i}"), "plan": "pro"}))
                    .collect();
                let body = json!({ "attributes": attributes });
                let request = parse_track(body.as_object().context("object")?)
                    .map_err(|e| anyhow::anyhow!("seed body: {e:?}"))?;
                store.track(&ws, request, data::now()).await?;
                progress.inc((end - start) as u64);
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.context("a seeding task panicked")??;
    }
    progress.finish_and_clear();
    Ok(())
}

struct Api {
    client: reqwest::Client,
    url: String,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let r = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{path} answered {status}: {body}");
        }
        Ok(body)
    }

    async fn launch(&self, campaign: Value) -> anyhow::Result<String> {
        let created = self
            .call(reqwest::Method::POST, "/api/v1/campaigns", campaign)
            .await?;
        let id = created["campaign"]["id"]
            .as_str()
            .context("no campaign id")?
            .to_owned();
        self.call(
            reqwest::Method::POST,
            &format!("/api/v1/campaigns/{id}/launch"),
            json!({}),
        )
        .await?;
        Ok(id)
    }
}

pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    if args.entering > args.users {
        bail!("--entering must be at most --users");
    }
    let hits = Arc::new(AtomicU64::new(0));
    let hook_addr = serve(
        axum::Router::new()
            .route("/hook", post(hook))
            .with_state(Arc::clone(&hits)),
    )
    .await?;
    let hook_url = format!("http://{hook_addr}/hook");
    let limit = receiver_max(&hook_url, args.clients, args.seconds).await?;
    println!(
        "receiver: {} requests/s with {} clients (its own maximum)",
        thousands(limit as u64),
        args.clients
    );

    let dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let store = super::open_store(dir.path(), args.database_url.as_deref()).await?;
    let now = data::now();
    let ws = store
        .create_workspace(
            &format!("bench-send-{}", uuid::Uuid::new_v4().simple()),
            now,
        )
        .await?;
    let (secret, key) = data::mint_key(
        ws.id,
        "bench",
        PermissionSet::all(),
        IpAllowlist::default(),
        now,
    );
    store.create_api_key(key).await?;
    let seeded = Instant::now();
    seed(&store, &ws, args.users).await?;
    println!(
        "seeded:   {} users in {:.1} s",
        thousands(args.users as u64),
        seeded.elapsed().as_secs_f64()
    );

    let exporter = Arc::new(Exporter::start(
        Arc::clone(&store) as Arc<dyn CurrentsStore>,
        ExporterConfig {
            owner: "bench".into(),
            ..ExporterConfig::default()
        },
    ));
    let currents_api = CurrentsApi {
        store: Arc::clone(&store) as Arc<dyn CurrentsStore>,
        exporter: Arc::clone(&exporter),
    };
    let listener_probe = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let public = format!("http://{}", listener_probe.local_addr()?);
    drop(listener_probe);
    let messaging = MessagingOptions {
        channels: Channels {
            webhook: WebhookSender::new(EgressPolicy::default(), Duration::from_secs(30))
                .context("webhook client")?,
            smtp: None,
        },
        tracking: Tracking {
            key: TrackingKey::new([9; 32]),
            urls: TrackingUrls::new(&public),
        },
        clock: Clock::system(),
        engine: EngineConfig::default(),
    };
    let metrics = tideway_server::install_metrics_recorder()
        .context("cannot install the metrics recorder")?;
    let router = tideway_server::app_with_messaging(
        Arc::clone(&store),
        ServerConfig::default(),
        metrics,
        Some(currents_api),
        None,
        Some(messaging),
    );
    let server = InProcess::serve_router(router).await?;
    let api = Api {
        client: reqwest::Client::new(),
        url: format!("http://{}", server.addr),
        key: secret.expose().to_owned(),
    };

    // 1. throughput: a broadcast to everyone.
    let broadcast = api
        .launch(json!({
            "name": "bench broadcast",
            "messages": [{"channel": "webhook", "url": hook_url, "request_method": "POST",
                          "body": "{\"user\": \"{{${user_id}}}\", \"plan\": \"{{custom_attribute.${plan}}}\"}"}],
            "delivery": {"type": "api_triggered"},
        }))
        .await?;
    let before = hits.load(Ordering::Relaxed);
    let progress = indicatif::ProgressBar::new(args.users as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("sending {bar:40} {pos}/{len} ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    api.call(
        reqwest::Method::POST,
        "/campaigns/trigger/send",
        json!({"campaign_id": broadcast, "broadcast": true}),
    )
    .await?;
    let deadline = started + Duration::from_secs(3_600);
    // Watch the receiver's counter (free) until every webhook arrived, then the store (a
    // count over the campaign's sends, which would steal CPU from the run if polled
    // throughout) until every send is settled with its event.
    while hits.load(Ordering::Relaxed) - before < args.users as u64 {
        progress.set_position(hits.load(Ordering::Relaxed) - before);
        if Instant::now() > deadline {
            bail!("the broadcast did not reach the receiver within an hour");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let counts = store.campaign_send_counts(ws.id, &broadcast).await?;
        progress.set_position(counts.sent + counts.failed);
        if counts.sent + counts.failed >= args.users as u64 {
            if counts.failed > 0 {
                bail!("{} sends failed", counts.failed);
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("the broadcast did not finish within an hour: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let received = hits.load(Ordering::Relaxed) - before;
    let rate = args.users as f64 / elapsed.as_secs_f64();
    println!(
        "throughput: {} sends/s ({} users in {:.1} s, {} webhooks received, every webhook.Send written)",
        thousands(rate as u64),
        thousands(args.users as u64),
        elapsed.as_secs_f64(),
        thousands(received)
    );
    println!(
        "  ratio to the receiver's own maximum: {:.2}   [{} ≥ {} sends/s]",
        rate / limit,
        verdict(rate >= TARGET_RATE),
        thousands(TARGET_RATE as u64)
    );

    // 2. latency: cohort entry → webhook → its webhook.Send at a Current's receiver.
    let arrivals = Arrivals {
        at: Arc::new(Mutex::new(HashMap::new())),
    };
    let currents_addr = serve(
        axum::Router::new()
            .route("/currents", post(currents))
            .with_state(arrivals.clone()),
    )
    .await?;
    api.call(
        reqwest::Method::POST,
        "/api/v1/currents",
        json!({"name": "bench", "kind": "custom_http", "endpoint": format!("http://{currents_addr}/currents"),
               "event_types": ["users.messages.webhook.Send"], "batch_size": 100, "flush_interval_ms": 50, "launch": true}),
    )
    .await?;
    api.launch(json!({
        "name": "bench cohort entry",
        "messages": [{"channel": "webhook", "url": hook_url, "request_method": "POST", "body": "{\"user\": \"{{${user_id}}}\"}"}],
        "delivery": {"type": "action_based", "triggers": [{"cohort_entry": {"partner": "heap", "cohort_id": "bench-entry"}}]},
    }))
    .await?;
    let partner = store
        .partner_api_key("heap", Secret::new("bench-heap-partner".into()), now)
        .await?;
    store
        .create_import_key(ws.id, "heap", &Secret::new("bench-import".into()), now)
        .await?;
    let mut sent_at: HashMap<String, Instant> = HashMap::new();
    let gap = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let entering_started = Instant::now();
    for i in 0..args.entering {
        let id = format!("bench-{i}");
        let due = entering_started + gap * i as u32;
        tokio::time::sleep_until(due.into()).await;
        sent_at.insert(id.clone(), Instant::now());
        let body = json!({"partner_api_key": partner.expose(), "client_secret": "bench-import",
                          "cohort_id": "bench-entry", "cohort_changes": [{"user_ids": [id]}]});
        let r = api
            .client
            .post(format!("{}/partners/heap/cohorts/users", api.url))
            .json(&body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("the cohort import answered {}", r.status());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = arrivals.at.lock().map(|a| a.len()).unwrap_or(0);
        if got >= args.entering {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {got} of {} webhook.Send events reached the Current",
                args.entering
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies: Vec<Duration> = {
        let at = arrivals
            .at
            .lock()
            .map_err(|_| anyhow::anyhow!("a receiver panicked"))?;
        sent_at
            .iter()
            .filter_map(|(id, start)| at.get(id).map(|a| a.duration_since(*start)))
            .collect()
    };
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
    println!(
        "latency: cohort entry → webhook.Send at a Current's receiver over {} users at {}/s: p50 {} [{} < 1 s], p99 {} [{} < 2 s]",
        latencies.len(),
        args.rate,
        millis(p50),
        verdict(p50 < TARGET_P50),
        millis(p99),
        verdict(p99 < TARGET_P99),
    );
    server.stop().await?;
    if let Ok(exporter) = Arc::try_unwrap(exporter) {
        exporter.stop().await;
    }
    Ok(())
}
