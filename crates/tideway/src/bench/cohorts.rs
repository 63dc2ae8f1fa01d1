//! `tideway bench cohorts`: partner cohort import throughput. One million membership changes
//! (requests of 1,000 identifiers from 4 concurrent clients) against one million existing
//! users, through the real HTTP endpoint, beside the same requests sent to a handler that only
//! parses them (DESIGN.md §4: ≤ 10 s for 1,000,000 changes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tideway_core::store::prelude::*;

use anyhow::{Context, bail};
use axum::http::StatusCode;
use axum::routing::post;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tideway_core::keys::Secret;
use tideway_core::store::Store;
use tideway_core::track::parse_track;
use tideway_server::{RateLimits, ServerConfig};
use tideway_store::sqlite::SqliteOptions;

use crate::bench::load::thousands;
use crate::data;
use crate::serve::InProcess;

const TARGET: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct CohortsArgs {
    /// Existing users the changes name
    #[arg(long, default_value_t = 1_000_000)]
    pub users: usize,
    /// Membership changes to send
    #[arg(long, default_value_t = 1_000_000)]
    pub changes: usize,
    /// Identifiers per request (at most 1,000)
    #[arg(long, default_value_t = 1000)]
    pub chunk: usize,
    /// Concurrent HTTP clients
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{bar:40}} {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Creates `users` users (`u0`, `u1`, …) through the store, 75 per transaction.
async fn seed(
    store: &Arc<tideway_store::sqlite::SqliteStore>,
    ws: &tideway_core::store::Workspace,
    users: usize,
) -> anyhow::Result<()> {
    let progress = bar(users as u64, "seeding users");
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, ws, next, progress) = (
            Arc::clone(store),
            ws.clone(),
            Arc::clone(&next),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(75, Ordering::Relaxed);
                if start >= users {
                    return Ok::<(), anyhow::Error>(());
                }
                let end = (start + 75).min(users);
                let attributes: Vec<Value> = (start..end)
                    .map(|i| json!({"external_id": format!("u{i}"), "plan": "pro"}))
                    .collect();
                let body = json!({ "attributes": attributes });
                let request =
                    parse_track(body.as_object().context("object")?).context("seed body")?;
                store
                    .track(&ws, request, data::now())
                    .await
                    .context("seeding failed")?;
                progress.inc((end - start) as u64);
            }
        }));
    }
    for t in tasks {
        t.await.context("a seeding task panicked")??;
    }
    progress.finish_and_clear();
    Ok(())
}

/// The request bodies: every change adds a distinct existing user to one cohort.
fn bodies(args: &CohortsArgs, partner_key: &str, import_key: &str) -> Vec<String> {
    (0..args.changes)
        .collect::<Vec<_>>()
        .chunks(args.chunk)
        .map(|chunk| {
            let ids: Vec<String> = chunk.iter().map(|i| format!("u{}", i % args.users)).collect();
            json!({"partner_api_key": partner_key, "client_secret": import_key, "cohort_id": "bench",
                   "cohort_changes": [{"user_ids": ids}]})
            .to_string()
        })
        .collect()
}

/// Sends every body with `clients` concurrent clients; returns the elapsed time and the sum of
/// `added` the server reported.
async fn drive(
    addr: SocketAddr,
    bodies: Arc<Vec<String>>,
    clients: usize,
    label: &str,
) -> anyhow::Result<(Duration, u64)> {
    let progress = bar(bodies.len() as u64, label);
    let next = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/partners/heap/cohorts/users");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (bodies, next, http, url, progress) = (
            Arc::clone(&bodies),
            Arc::clone(&next),
            http.clone(),
            url.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut added = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return Ok::<u64, anyhow::Error>(added);
                };
                let res = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = res.status();
                let answer: Value = res.json().await.unwrap_or(Value::Null);
                if !status.is_success() {
                    bail!("request {i} answered {status}: {answer}");
                }
                added += answer["added"].as_u64().unwrap_or(0);
                progress.inc(1);
            }
        }));
    }
    let mut added = 0;
    for t in tasks {
        added += t.await.context("a client panicked")??;
    }
    progress.finish_and_clear();
    Ok((started.elapsed(), added))
}

/// The limit: a handler that parses the same requests (credentials and changes) and answers 201.
async fn parse_only(body: axum::body::Bytes) -> (StatusCode, axum::Json<Value>) {
    let parsed = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| match v {
            Value::Object(map) => Some(map),
            _ => None,
        });
    let ok = parsed.is_some_and(|map| {
        tideway_core::cohorts::parse_credentials(&map).is_ok()
            && tideway_core::cohorts::parse_changes(&map).is_ok()
    });
    let status = if ok {
        StatusCode::CREATED
    } else {
        StatusCode::BAD_REQUEST
    };
    (
        status,
        axum::Json(json!({"message": "success", "added": 0})),
    )
}

pub async fn run(args: CohortsArgs) -> anyhow::Result<()> {
    if !(1..=1000).contains(&args.chunk) {
        bail!("--chunk must be 1..=1000 (the API's limit)");
    }
    let dir = tempfile::Builder::new()
        .prefix("tideway-bench-cohorts")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let store = Arc::new(data::open(dir.path(), SqliteOptions::default())?);
    let now = data::now();
    let ws = store
        .create_workspace("bench", now)
        .await
        .context("cannot create the workspace")?;
    let partner_key = store
        .partner_api_key("heap", Secret::new(uuid::Uuid::new_v4().to_string()), now)
        .await?;
    let import_key = Secret::new(uuid::Uuid::new_v4().to_string());
    store
        .create_import_key(ws.id, "heap", &import_key, now)
        .await?;
    eprintln!(
        "bench cohorts: {} changes in requests of {} from {} clients, against {} existing users",
        thousands(args.changes as f64),
        args.chunk,
        args.clients,
        thousands(args.users as f64)
    );
    let seeded = Instant::now();
    seed(&store, &ws, args.users).await?;
    eprintln!(
        "{:>18}: {} users in {:.1} s",
        "seeded",
        thousands(args.users as f64),
        seeded.elapsed().as_secs_f64()
    );

    let bodies = Arc::new(bodies(&args, partner_key.expose(), import_key.expose()));
    let config = ServerConfig {
        rate_limits: RateLimits::unlimited(),
        max_body_bytes: 4 * 1024 * 1024,
        ..ServerConfig::default()
    };
    let shared: Arc<dyn Store> = store.clone();
    let server = InProcess::start(shared, config).await?;
    let (took, added) = drive(server.addr, Arc::clone(&bodies), args.clients, "tideway").await?;
    server.stop().await?;
    let rate = args.changes as f64 / took.as_secs_f64();
    eprintln!(
        "{:>18}: {} changes in {:.2} s, {} changes/s, {} users entered the cohort",
        "tideway",
        thousands(args.changes as f64),
        took.as_secs_f64(),
        thousands(rate),
        thousands(added as f64)
    );
    let distinct = args.changes.min(args.users) as u64;
    if added != distinct {
        bail!(
            "the server reported {added} users entering the cohort, expected {distinct}: the figures are not valid"
        );
    }

    let router = axum::Router::new().route("/partners/heap/cohorts/users", post(parse_only));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot bind a loopback port")?;
    let addr = listener.local_addr()?;
    let noop = tokio::spawn(async move { axum::serve(listener, router).await });
    let (limit_took, _) = drive(addr, bodies, args.clients, "parse-only").await?;
    noop.abort();
    let limit_rate = args.changes as f64 / limit_took.as_secs_f64();
    eprintln!(
        "{:>18}: {} changes in {:.2} s, {} changes/s",
        "parse-only handler",
        thousands(args.changes as f64),
        limit_took.as_secs_f64(),
        thousands(limit_rate)
    );
    let scaled_target = TARGET.as_secs_f64() * args.changes as f64 / 1_000_000.0;
    println!(
        "cohort import: {} changes in {:.2} s ({} changes/s) | parse-only handler: {} changes/s (ratio {:.2}) | target {} changes in ≤ {:.1} s: {}",
        thousands(args.changes as f64),
        took.as_secs_f64(),
        thousands(rate),
        thousands(limit_rate),
        rate / limit_rate,
        thousands(args.changes as f64),
        scaled_target,
        if took.as_secs_f64() <= scaled_target {
            "PASS"
        } else {
            "FAIL"
        }
    );
    Ok(())
}
