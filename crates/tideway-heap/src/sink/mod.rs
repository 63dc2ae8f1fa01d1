//! `tideway sink`: a local receiver that behaves like Heap's Currents intake
//! (`reference/heap.md` §4), so the whole Heap loop runs on one laptop and every status-code
//! rule of the exporter can be exercised against a real server.
//!
//! `POST` (any path) handling, in order:
//! 1. `--delay-ms`: wait (a slow receiver).
//! 2. With `--bearer-token`: `Authorization: Bearer <token>` (scheme case-insensitive,
//!    constant-time compare) *before the body is read*, empty bodies included; else `401`
//!    with `WWW-Authenticate: Bearer`.
//! 3. Injected faults: the first `--fail-first N` requests get 500; `--status CODE` answers
//!    every request with CODE; `--fail-rate P` answers 500 with probability P.
//! 4. Body over `--max-body-bytes` → 413; empty/whitespace, `{}` or `{"events":[]}` → 200
//!    no-op; non-JSON or a non-array `events` → 400.
//! 5. `--max-events N`: more than N events → 413. `--reject-event-type T`: a batch with an
//!    event of type T → 400 (a "malformed event").
//! 6. Elements that are not objects or lack a string `id` / `event_type` are counted and
//!    skipped; the rest is stored, deduplicated on `id`; answer `200 {}` after the commit.
//!
//! `GET /` is an HTML page (counts per event type, latest events), `GET /events` the same as
//! JSON with paging (`after`, `limit`, `event_type`), `GET /health` a liveness probe.

mod page;
mod storage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

pub use storage::{Incoming, Order, SinkStore, StoredEvent, Totals, Written};

use crate::HeapError;

/// Fault injection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// The first N authorised requests get 500.
    pub fail_first: u64,
    /// Each authorised request gets 500 with this probability (0..=1).
    pub fail_rate: f64,
    /// Every authorised request gets this status (no body processing).
    pub status: Option<u16>,
    /// Every request waits this long first.
    pub delay_ms: u64,
    /// A batch holding an event of this type gets 400.
    pub reject_event_type: Option<String>,
    /// A batch of more than this many events gets 413.
    pub max_events: Option<usize>,
}

/// How the sink runs.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    pub listen: SocketAddr,
    /// Required `Authorization: Bearer` token; `None` accepts any request.
    pub bearer_token: Option<String>,
    /// Holds `sink.sqlite`.
    pub data_dir: PathBuf,
    pub max_body_bytes: usize,
    pub faults: Faults,
}

impl SinkConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        SinkConfig {
            listen,
            bearer_token: None,
            data_dir,
            max_body_bytes: 32 * 1024 * 1024,
            faults: Faults::default(),
        }
    }
}

/// Counters since start (not persisted).
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub injected: AtomicU64,
    pub empty: AtomicU64,
    pub rejected: AtomicU64,
    pub malformed_skipped: AtomicU64,
    pub accepted_events: AtomicU64,
    /// The headers of the last `POST` (the `Authorization` value redacted to its scheme).
    pub last_headers: std::sync::Mutex<Vec<(String, String)>>,
}

impl Stats {
    pub fn last_headers(&self) -> Vec<(String, String)> {
        self.last_headers
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default()
    }
}

struct Inner {
    config: SinkConfig,
    store: SinkStore,
    stats: Stats,
    authorised: AtomicU64,
    rng: AtomicU64,
}

/// Shared state of a running sink.
#[derive(Clone)]
pub struct SinkState {
    inner: Arc<Inner>,
}

impl SinkState {
    pub fn open(config: SinkConfig) -> Result<SinkState, HeapError> {
        let store = SinkStore::open(&config.data_dir)?;
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(1);
            h.finish() | 1
        };
        Ok(SinkState {
            inner: Arc::new(Inner {
                config,
                store,
                stats: Stats::default(),
                authorised: AtomicU64::new(0),
                rng: AtomicU64::new(seed),
            }),
        })
    }

    pub fn store(&self) -> &SinkStore {
        &self.inner.store
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// A uniform draw in [0, 1) (splitmix64; quality is plenty for fault injection).
    fn draw(&self) -> f64 {
        let mut z = self
            .inner
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The sink's routes.
pub fn router(state: SinkState) -> Router {
    Router::new()
        .route("/", get(page::index).post(receive))
        .route("/events", get(events_json))
        .route("/health", get(|| async { "ok" }))
        .fallback(fallback)
        .with_state(state)
}

async fn fallback(
    State(state): State<SinkState>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method == axum::http::Method::POST {
        receive(State(state), headers, body).await
    } else {
        (StatusCode::NOT_FOUND, "not found").into_response()
    }
}

/// A running sink (in-process: tests and `tideway bench`).
pub struct RunningSink {
    pub addr: SocketAddr,
    pub state: SinkState,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningSink {
    /// Stops accepting and waits for in-flight requests.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Binds `config.listen` and serves in a background task.
pub async fn start(config: SinkConfig) -> Result<RunningSink, HeapError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| HeapError::Io(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| HeapError::Io(e.to_string()))?;
    let state = SinkState::open(config)?;
    let app = router(state.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(RunningSink {
        addr,
        state,
        stop,
        task,
    })
}

/// Serves until `shutdown` resolves (the `tideway sink` command); `on_ready` gets the bound
/// address.
pub async fn serve(
    config: SinkConfig,
    on_ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), HeapError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| HeapError::Io(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| HeapError::Io(e.to_string()))?;
    let state = SinkState::open(config)?;
    on_ready(addr);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| HeapError::Io(e.to_string()))
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body.to_string(),
    )
        .into_response()
}

fn authorised(expected: &str, headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && bool::from(token.trim().as_bytes().ct_eq(expected.as_bytes()))
}

fn status_of(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// `POST`: one Currents batch.
async fn receive(State(state): State<SinkState>, headers: HeaderMap, body: Body) -> Response {
    let inner = &state.inner;
    let faults = &inner.config.faults;
    inner.stats.requests.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut last) = inner.stats.last_headers.lock() {
        *last = headers
            .iter()
            .map(|(k, v)| {
                let v = v.to_str().unwrap_or("");
                let v = if *k == header::AUTHORIZATION {
                    v.split(' ').next().unwrap_or("").to_owned() + " <redacted>"
                } else {
                    v.to_owned()
                };
                (k.as_str().to_owned(), v)
            })
            .collect();
    }
    if faults.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
    }
    if let Some(token) = &inner.config.bearer_token
        && !authorised(token, &headers)
    {
        inner.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
        let mut resp = json_response(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid or missing bearer token"}),
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    let n = inner.authorised.fetch_add(1, Ordering::Relaxed);
    let injected = if n < faults.fail_first {
        Some(500)
    } else if let Some(code) = faults.status {
        Some(code)
    } else if faults.fail_rate > 0.0 && state.draw() < faults.fail_rate {
        Some(500)
    } else {
        None
    };
    if let Some(code) = injected {
        inner.stats.injected.fetch_add(1, Ordering::Relaxed);
        return json_response(status_of(code), json!({"error": "injected failure"}));
    }
    let bytes: Bytes = match axum::body::to_bytes(body, inner.config.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "body too large"}),
            );
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        inner.stats.empty.fetch_add(1, Ordering::Relaxed);
        return json_response(StatusCode::OK, json!({}));
    }
    let parsed: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            inner.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("not JSON: {e}")}),
            );
        }
    };
    let events = match parsed.get("events") {
        None => {
            inner.stats.empty.fetch_add(1, Ordering::Relaxed);
            return json_response(StatusCode::OK, json!({}));
        }
        Some(Value::Array(events)) => events,
        Some(_) => {
            inner.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": "events must be an array"}),
            );
        }
    };
    if events.is_empty() {
        inner.stats.empty.fetch_add(1, Ordering::Relaxed);
        return json_response(StatusCode::OK, json!({}));
    }
    if let Some(max) = faults.max_events
        && events.len() > max
    {
        inner.stats.rejected.fetch_add(1, Ordering::Relaxed);
        return json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("more than {max} events")}),
        );
    }
    if let Some(bad) = &faults.reject_event_type
        && events
            .iter()
            .any(|e| e.get("event_type").and_then(Value::as_str) == Some(bad.as_str()))
    {
        inner.stats.rejected.fetch_add(1, Ordering::Relaxed);
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("malformed event of type {bad}")}),
        );
    }
    let mut incoming = Vec::with_capacity(events.len());
    for e in events {
        let id = e.get("id").and_then(Value::as_str);
        let event_type = e.get("event_type").and_then(Value::as_str);
        match (id, event_type) {
            (Some(id), Some(t)) if !id.is_empty() => incoming.push(Incoming {
                id: id.to_owned(),
                event_type: t.to_owned(),
                time: e.get("time").and_then(Value::as_i64),
                body: e.to_string(),
            }),
            _ => {
                inner
                    .stats
                    .malformed_skipped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let count = incoming.len() as u64;
    let received_at = time::OffsetDateTime::now_utc().unix_timestamp() * 1000
        + i64::from(time::OffsetDateTime::now_utc().millisecond());
    match inner.store.write(incoming, received_at).await {
        Ok(_) => {
            inner
                .stats
                .accepted_events
                .fetch_add(count, Ordering::Relaxed);
            json_response(StatusCode::OK, json!({}))
        }
        Err(e) => {
            tracing::error!(error = %e, "sink could not store a batch");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "storage unavailable"}),
            )
        }
    }
}

/// `GET /events?after=SEQ&limit=N&event_type=T`
async fn events_json(
    State(state): State<SinkState>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let get = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let after = get("after").and_then(|v| v.parse().ok()).unwrap_or(0);
    let limit = get("limit")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100usize)
        .min(10_000);
    let event_type = get("event_type").map(str::to_owned);
    let store = state.store();
    let (totals, events) = match tokio::try_join!(
        store.totals(),
        store.events(after, limit, event_type, Order::Oldest)
    ) {
        Ok(x) => x,
        Err(e) => {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": e.to_string()}),
            );
        }
    };
    let next_after = events.last().map_or(after, |e| e.seq);
    let stats = state.stats();
    json_response(
        StatusCode::OK,
        json!({
            "unique": totals.unique,
            "duplicates": totals.duplicates,
            "counts": totals.per_type.iter().map(|(t, n)| (t.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "requests": stats.requests.load(Ordering::Relaxed),
            "unauthorized": stats.unauthorized.load(Ordering::Relaxed),
            "injected_failures": stats.injected.load(Ordering::Relaxed),
            "malformed_skipped": stats.malformed_skipped.load(Ordering::Relaxed),
            "last_request_headers": stats.last_headers().into_iter().map(|(k, v)| (k, json!(v))).collect::<serde_json::Map<_, _>>(),
            "next_after": next_after,
            "events": events.iter().map(|e| json!({
                "seq": e.seq, "id": e.id, "event_type": e.event_type, "time": e.time,
                "received_at": e.received_at, "deliveries": e.deliveries, "event": e.body,
            })).collect::<Vec<_>>(),
        }),
    )
}
