//! Integration tests of the exporter: real SQLite stores in temp directories, real local HTTP
//! receivers (`tideway sink` in-process, and a scriptable capture receiver), no mocks of our
//! own traits and no sleeps as synchronisation (waits are on progress notifications with a
//! generous limit as a failure detector).

mod conformance;
mod egress;
mod model;
mod resilience;
mod rules;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tideway_core::store::prelude::*;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventUser};
use tideway_core::currents_store::{Current, CurrentStatus, CurrentsStore};
use tideway_core::ids::{BrazeId, EventId, ExternalId, UserSeq};
use tideway_core::store::Workspace;
use tideway_currents::spec::parse_spec;
use tideway_currents::{Exporter, ExporterConfig};
use tideway_heap::sink::{self, Faults, RunningSink, SinkConfig};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};
use tokio::sync::{Notify, oneshot};

pub const LIMIT: Duration = Duration::from_secs(30);

pub fn fast_config() -> ExporterConfig {
    ExporterConfig {
        owner: "test-node".into(),
        lease_ttl_ms: 5_000,
        poll_interval_ms: 5,
        rescan_interval_ms: 100,
        clock_tick_ms: 20,
        maintenance_interval_ms: 50,
        ..ExporterConfig::default()
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub store: Arc<SqliteStore>,
    pub ws: Workspace,
    pub exporter: Option<Exporter>,
    pub config: ExporterConfig,
}

impl Harness {
    pub async fn new() -> Harness {
        Self::with_config(fast_config()).await
    }

    pub async fn with_config(config: ExporterConfig) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("t.sqlite"), SqliteOptions::default()).unwrap(),
        );
        let ws = store
            .create_workspace("w", Millis(1_700_000_000_000))
            .await
            .unwrap();
        let exporter = Some(Exporter::start(store.clone(), config.clone()));
        Harness {
            dir,
            store,
            ws,
            exporter,
            config,
        }
    }

    pub fn exporter(&self) -> &Exporter {
        self.exporter.as_ref().unwrap()
    }

    /// Stops the exporter and starts a fresh one on the same store (a process restart).
    pub async fn restart(&mut self) {
        if let Some(e) = self.exporter.take() {
            e.stop().await;
        }
        self.exporter = Some(Exporter::start(self.store.clone(), self.config.clone()));
    }

    /// Creates and launches a Current from its JSON definition.
    pub async fn current(&self, spec: Value) -> Current {
        let spec = parse_spec(&spec).unwrap();
        let c = self
            .store
            .create_current(self.ws.id, spec, CurrentStatus::Active, Millis(1))
            .await
            .unwrap();
        self.exporter().refresh();
        c
    }

    /// Appends `n` custom events (users u0..u{users}) and returns their ids in log order.
    pub async fn append(&self, n: usize) -> Vec<String> {
        self.append_for(n, 5, "opened").await
    }

    pub async fn append_for(&self, n: usize, users: usize, name: &str) -> Vec<String> {
        let mut events = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let (user, ev) = custom_event(i % users.max(1), name, &Map::new());
            ids.push(ev.id.0.clone());
            events.push((Some(user), ev));
        }
        self.store.append_events(self.ws.id, events).await.unwrap();
        ids
    }

    pub async fn append_purchase(&self) -> String {
        let braze = BrazeId::from_bytes([9; 12]);
        let ext = ExternalId::parse("buyer").unwrap();
        let user = EventUser {
            braze_id: &braze,
            external_id: Some(&ext),
            device_id: None,
            time_zone: None,
        };
        let id = uuid::Uuid::new_v4().to_string();
        let ev = CurrentsEvent::purchase(
            EventId(id.clone()),
            Millis(1_700_000_000_000),
            &user,
            "ag",
            None,
            "sku",
            "USD",
            9.5,
            &Map::new(),
        );
        self.store
            .append_events(self.ws.id, vec![(None, ev)])
            .await
            .unwrap();
        id
    }

    pub async fn wait(
        &self,
        c: &Current,
        what: &str,
        done: impl FnMut(&Current) -> bool,
    ) -> Current {
        let (current, ok) = self.exporter().wait_for(c.id, LIMIT, done).await.unwrap();
        assert!(ok, "timed out waiting for {what}: {current:#?}");
        current
    }
}

pub fn custom_event(
    user: usize,
    name: &str,
    props: &Map<String, Value>,
) -> (UserSeq, CurrentsEvent) {
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&(user as u64).to_be_bytes());
    let braze = BrazeId::from_bytes(bytes);
    let ext = ExternalId::parse(&format!("u{user}")).unwrap();
    let eu = EventUser {
        braze_id: &braze,
        external_id: Some(&ext),
        device_id: None,
        time_zone: None,
    };
    let id = EventId(uuid::Uuid::new_v4().to_string());
    (
        UserSeq(user as u32 + 1),
        CurrentsEvent::custom_event(id, Millis(1_700_000_000_000), &eu, "ag", None, name, props),
    )
}

pub fn spec(url: &str) -> Value {
    json!({
        "name": "test", "kind": "custom_http", "endpoint": url,
        "categories": ["message_engagement", "customer_behavior", "user"],
        "flush_interval_ms": 20,
        "retry": {"base_ms": 1, "cap_ms": 20, "request_timeout_ms": 2000},
    })
}

pub async fn sink_with(faults: Faults, token: Option<&str>) -> (RunningSink, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SinkConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
    config.faults = faults;
    config.bearer_token = token.map(str::to_owned);
    (sink::start(config).await.unwrap(), dir)
}

pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/currents?workspace=a")
}

/// All distinct event ids the sink stored.
pub async fn sink_ids(s: &RunningSink) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = s
            .state
            .store()
            .events(after, 10_000, None, sink::Order::Oldest)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        out.extend(page.into_iter().map(|e| e.id));
    }
    out
}

// ---- the capture receiver: answers from a script, records everything ----------------------

/// What the capture receiver answers one request with.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// 429 with `Retry-After: secs`.
    RetryAfter(u16, u64),
    /// Answer 200 only after this long (the sender times out first).
    Hang(Duration),
}

/// One request the capture receiver saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: tokio::time::Instant,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Value,
    pub status: u16,
}

impl Seen {
    pub fn ids(&self) -> Vec<String> {
        self.body["events"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A request handed to the test, with where to send its answer.
pub type Pending = (Seen, oneshot::Sender<Reply>);

#[derive(Default)]
pub struct CaptureState {
    pub script: Mutex<VecDeque<Reply>>,
    pub seen: Mutex<Vec<Seen>>,
    pub notify: Notify,
    /// When set, requests wait for a reply pushed through `manual` (model test).
    pub manual: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Pending>>>,
}

pub struct Capture {
    pub addr: SocketAddr,
    pub state: Arc<CaptureState>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Serves `app` on a free loopback port until the returned sender is dropped or fired.
pub async fn serve_on_loopback(app: axum::Router) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    (addr, stop)
}

impl Capture {
    pub async fn start() -> Capture {
        let state = Arc::new(CaptureState::default());
        let app = axum::Router::new()
            .fallback(capture)
            .with_state(state.clone());
        let (addr, stop) = serve_on_loopback(app).await;
        Capture {
            addr,
            state,
            stop: Some(stop),
        }
    }

    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Ids acknowledged with 2xx.
    pub fn acked_ids(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| (200..300).contains(&s.status))
            .flat_map(Seen::ids)
            .collect()
    }

    /// Waits until `done(seen)` holds.
    pub async fn wait(&self, what: &str, mut done: impl FnMut(&[Seen]) -> bool) {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let notified = self.state.notify.notified();
            if done(&self.seen()) {
                return;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => panic!("timed out waiting for {what}; saw {} requests", self.seen().len()),
            }
        }
    }
}

async fn capture(
    State(state): State<Arc<CaptureState>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut seen = Seen {
        at: tokio::time::Instant::now(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers,
        body: parsed,
        status: 200,
    };
    let manual = state.manual.lock().unwrap().clone();
    let reply = match manual {
        Some(tx) => {
            let (rtx, rrx) = oneshot::channel();
            if tx.send((seen.clone(), rtx)).is_err() {
                Reply::Status(503)
            } else {
                rrx.await.unwrap_or(Reply::Status(503))
            }
        }
        None => state
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Reply::Status(200)),
    };
    let response = match reply {
        Reply::Status(code) => {
            seen.status = code;
            (StatusCode::from_u16(code).unwrap(), "{}").into_response()
        }
        Reply::RetryAfter(code, secs) => {
            seen.status = code;
            let mut r = (StatusCode::from_u16(code).unwrap(), "slow down").into_response();
            r.headers_mut().insert(
                "retry-after",
                HeaderValue::from_str(&secs.to_string()).unwrap(),
            );
            r
        }
        Reply::Hang(d) => {
            seen.status = 0;
            tokio::time::sleep(d).await;
            (StatusCode::OK, "{}").into_response()
        }
    };
    state.seen.lock().unwrap().push(seen);
    state.notify.notify_waiters();
    response
}
