//! Test harness: a real server on `127.0.0.1:0` over a real store — SQLite in a temp dir, or a
//! fresh PostgreSQL database when `TIDEWAY_TEST_BACKEND=postgres` (`scripts/test` runs this
//! suite on both) — keys made through the `Store` trait, and a small `reqwest` client that keeps
//! status, headers and JSON body of each answer.

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::header::HeaderMap;
use serde_json::Value;
use tideway_core::clock::Millis;
use tideway_core::currents::EventType;
use tideway_core::keys::{IpAllowlist, Permission, PermissionSet, Secret};
use tideway_core::store::{LoggedEvent, NewApiKey, Store, Workspace};
use tideway_server::{ServerConfig, app, install_metrics_recorder};
use tideway_store::testing::TestStore;

pub const NOW: Millis = Millis(1_750_000_000_000);

pub struct Server {
    pub base: String,
    pub store: Arc<dyn Store>,
    pub client: reqwest::Client,
    _backend: TestStore,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One answer: status, headers and the body as JSON (or a JSON string of the raw text).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `(limit, remaining, reset)` from the `X-RateLimit-*` headers, all required present.
    pub fn rate(&self) -> (String, String, String) {
        let get = |n: &str| {
            self.header(n)
                .unwrap_or_else(|| panic!("missing header {n} in {self:?}"))
                .to_owned()
        };
        (
            get("x-ratelimit-limit"),
            get("x-ratelimit-remaining"),
            get("x-ratelimit-reset"),
        )
    }
}

/// A way to send the key.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    None,
    Bearer(&'a str),
    Query(&'a str),
}

impl Server {
    /// The PostgreSQL database this server runs on (`None` on SQLite).
    pub fn database(&self) -> Option<&tideway_store::testing::TestDb> {
        self._backend.database()
    }

    pub async fn start() -> Server {
        Server::with_config(ServerConfig::default()).await
    }

    /// A server with one workspace, "w", and an admin key of it: what most tests start from.
    pub async fn with_admin() -> (Server, Workspace, String) {
        let s = Server::start().await;
        let ws = s.workspace("w").await;
        let key = s.admin_key(&ws).await;
        (s, ws, key)
    }

    pub async fn with_config(config: ServerConfig) -> Server {
        let backend = TestStore::from_env().await;
        let store = Arc::clone(&backend.store);
        let metrics = install_metrics_recorder().expect("metrics recorder");
        let router = app(Arc::clone(&store), config, metrics);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
        });
        Server {
            base: format!("http://{addr}"),
            store,
            client: reqwest::Client::new(),
            _backend: backend,
            stop: Some(stop),
        }
    }

    /// A server with the messaging engine running; `options` gets the server's base URL (the
    /// public URL of its tracking links).
    pub async fn with_messaging(
        options: impl FnOnce(&str) -> tideway_server::MessagingOptions,
    ) -> Server {
        let backend = TestStore::from_env().await;
        let store = Arc::clone(&backend.store);
        let metrics = install_metrics_recorder().expect("metrics recorder");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let base = format!("http://{addr}");
        let router = tideway_server::app_with_messaging(
            Arc::clone(&store),
            ServerConfig::default(),
            metrics,
            None,
            None,
            Some(options(&base)),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
        });
        Server {
            base,
            store,
            client: reqwest::Client::new(),
            _backend: backend,
            stop: Some(stop),
        }
    }

    pub async fn workspace(&self, name: &str) -> Workspace {
        self.store
            .create_workspace(name, NOW)
            .await
            .expect("create workspace")
    }

    /// A new key of `ws` with these permissions and allowlist; returns the secret.
    pub async fn key_with(
        &self,
        ws: &Workspace,
        permissions: PermissionSet,
        allow: IpAllowlist,
    ) -> String {
        let secret = uuid::Uuid::new_v4().simple().to_string();
        let hashed = Secret::new(secret.clone()).hash();
        self.store
            .create_api_key(NewApiKey {
                workspace: ws.id,
                name: "test key".into(),
                prefix: secret[..8].to_owned(),
                hash: hashed,
                permissions,
                allow,
                created_at: NOW,
            })
            .await
            .expect("create key");
        secret
    }

    /// A key with every permission, usable from anywhere.
    pub async fn admin_key(&self, ws: &Workspace) -> String {
        self.key_with(ws, PermissionSet::all(), IpAllowlist::default())
            .await
    }

    pub async fn key_for(&self, ws: &Workspace, permissions: &[Permission]) -> String {
        self.key_with(
            ws,
            permissions.iter().copied().collect(),
            IpAllowlist::default(),
        )
        .await
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<Vec<u8>>,
        json: bool,
    ) -> Answer {
        let url = match auth {
            Auth::Query(k) => format!("{}{path}?api_key={k}", self.base),
            _ => format!("{}{path}", self.base),
        };
        let mut req = self.client.request(method, url);
        if let Auth::Bearer(k) = auth {
            req = req.bearer_auth(k);
        }
        if json {
            req = req.header("content-type", "application/json");
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let res = req.send().await.expect("request");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            headers,
            body,
        }
    }

    /// POSTs JSON with a bearer key.
    pub async fn post(&self, path: &str, key: &str, body: Value) -> Answer {
        self.send(
            reqwest::Method::POST,
            path,
            Auth::Bearer(key),
            Some(body.to_string().into_bytes()),
            true,
        )
        .await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(reqwest::Method::GET, path, Auth::None, None, false)
            .await
    }

    /// Exports one user by external id (all fields); `None` if there is no such user.
    pub async fn export_external(&self, key: &str, external_id: &str) -> Option<Value> {
        let a = self
            .post(
                "/users/export/ids",
                key,
                serde_json::json!({"external_ids": [external_id]}),
            )
            .await;
        assert_eq!(a.status, 201, "{a:?}");
        a.body["users"].as_array().and_then(|u| u.first().cloned())
    }

    pub async fn events(&self, ws: &Workspace) -> Vec<LoggedEvent> {
        let mut out: Vec<LoggedEvent> = Vec::new();
        loop {
            let after = out.last().map_or(0, |e| e.seq);
            let page = self
                .store
                .read_events(ws.id, after, 1000)
                .await
                .expect("read events");
            if page.is_empty() {
                return out;
            }
            out.extend(page);
        }
    }

    /// The logged events whose type is `name` (e.g. `users.messages.webhook.Send`), as JSON.
    pub async fn events_named(&self, ws: &Workspace, name: &str) -> Vec<Value> {
        self.events(ws)
            .await
            .into_iter()
            .filter(|e| e.event.event_type.as_str() == name)
            .map(|e| e.event.body_value())
            .collect()
    }

    pub async fn events_of_type(&self, ws: &Workspace, t: EventType) -> Vec<LoggedEvent> {
        self.events(ws)
            .await
            .into_iter()
            .filter(|e| e.event.event_type == t)
            .collect()
    }
}
