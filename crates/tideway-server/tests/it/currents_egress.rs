//! The Currents management API and the egress policy: refused endpoints and alert webhooks
//! are 400s naming the field and the rule, `deny-private-endpoints` refuses private and
//! loopback addresses, `test` reports a status and a reason but never the receiver's body,
//! and path ids are canonical decimal. A real server with a running exporter on a temp
//! SQLite store, and real local receivers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tideway_core::store::prelude::*;

use axum::http::StatusCode;
use serde_json::{Value, json};
use tideway_core::currents_store::{CurrentStatus, CurrentsStore};
use tideway_core::egress::EgressPolicy;
use tideway_core::keys::{IpAllowlist, PermissionSet, Secret};
use tideway_core::store::{NewApiKey, Store, Workspace};
use tideway_currents::spec::parse_spec;
use tideway_currents::{Exporter, ExporterConfig};
use tideway_server::{CurrentsApi, ServerConfig, app_with_currents, install_metrics_recorder};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};
use tokio::sync::oneshot;

use crate::harness::NOW;

/// A body no answer of Tideway's may quote.
const SECRET: &str = "AKIA-SECRET-aws_secret_access_key=wJalrXUtnFEMI";

struct Api {
    base: String,
    key: String,
    store: Arc<SqliteStore>,
    ws: Workspace,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

struct Reply {
    status: u16,
    body: Value,
}

impl Api {
    async fn start(egress: EgressPolicy) -> Api {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("tideway.sqlite"), SqliteOptions::default())
                .unwrap(),
        );
        let ws = store.create_workspace("w", NOW).await.unwrap();
        let key = uuid::Uuid::new_v4().simple().to_string();
        store
            .create_api_key(NewApiKey {
                workspace: ws.id,
                name: "admin".into(),
                prefix: key[..8].to_owned(),
                hash: Secret::new(key.clone()).hash(),
                permissions: PermissionSet::all(),
                allow: IpAllowlist::default(),
                created_at: NOW,
            })
            .await
            .unwrap();
        let config = ExporterConfig {
            owner: "test".into(),
            egress,
            ..ExporterConfig::default()
        };
        let exporter = Arc::new(Exporter::start(store.clone(), config));
        let currents = CurrentsApi {
            store: store.clone(),
            exporter,
        };
        let router = app_with_currents(
            store.clone() as Arc<dyn Store>,
            ServerConfig::default(),
            install_metrics_recorder().unwrap(),
            Some(currents),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
        });
        Api {
            base: format!("http://{addr}"),
            key,
            store,
            ws,
            client: reqwest::Client::new(),
            _dir: dir,
            _stop: stop,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Reply {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    async fn create(&self, body: Value) -> Reply {
        self.call(reqwest::Method::POST, "/api/v1/currents", Some(body))
            .await
    }
}

fn current(endpoint: &str) -> Value {
    json!({"name": "c", "kind": "custom_http", "endpoint": endpoint, "categories": ["user"],
           "retry": {"request_timeout_ms": 5000}})
}

/// A receiver answering every request with `status` and the secret body, counting requests.
async fn secret_receiver(status: u16) -> (SocketAddr, Arc<AtomicUsize>, oneshot::Sender<()>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let app = axum::Router::new().fallback(move || {
        let counted = Arc::clone(&counted);
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            (StatusCode::from_u16(status).unwrap(), SECRET)
        }
    });
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
    (addr, hits, stop)
}

fn assert_refused(r: &Reply, field: &str, rule: &str, what: &str) {
    assert_eq!(r.status, 400, "{what}: {:?}", r.body);
    let message = r.body["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("{field}: refused by egress policy: ")),
        "{what}: {message}"
    );
    assert_eq!(r.body["errors"][0]["field"], field, "{what}");
    assert_eq!(r.body["errors"][0]["rule"], rule, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_endpoints_and_alert_webhooks_are_400_naming_the_rule() {
    let api = Api::start(EgressPolicy::default()).await;
    for (endpoint, rule) in [
        ("http://169.254.169.254/latest/meta-data/iam/", "metadata"),
        ("http://2852039166/", "metadata"),
        ("http://0251.0376.0251.0376/", "metadata"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://[fd00:ec2::254]/", "metadata"),
        (
            "http://metadata.google.internal/computeMetadata/v1/",
            "metadata",
        ),
        ("http://METADATA.GOOGLE.INTERNAL./", "metadata"),
        ("http://metadata/", "metadata"),
        ("http://metadata.azure.com/metadata/instance", "metadata"),
        ("http://instance-data/latest/", "metadata"),
        ("http://169.254.10.20:8080/", "link_local"),
        ("https://[fe80::1]/", "link_local"),
        ("http://[::ffff:169.254.1.1]/", "link_local"),
        ("http://224.0.0.1/", "not_unicast"),
    ] {
        let r = api.create(current(endpoint)).await;
        assert_refused(&r, "endpoint", rule, endpoint);
        let message = r.body["message"].as_str().unwrap();
        let named = match rule {
            "metadata" => "cloud metadata service",
            "link_local" => "link-local address",
            _ => "multicast",
        };
        assert!(message.contains(named), "{endpoint}: {message}");
    }
    let mut body = current("http://127.0.0.1:9/");
    body["alert_webhook"] = json!("http://169.254.169.254/alert");
    assert_refused(
        &api.create(body).await,
        "alert_webhook",
        "metadata",
        "alert webhook",
    );

    // Private and loopback addresses are allowed by default (a local receiver is a main use).
    for endpoint in [
        "http://127.0.0.1:9/",
        "http://10.0.0.5/",
        "http://192.168.1.10:9400/",
        "http://[::1]:9/",
    ] {
        let r = api.create(current(endpoint)).await;
        assert_eq!(r.status, 201, "{endpoint}: {:?}", r.body);
    }
    let list = api
        .call(reqwest::Method::GET, "/api/v1/currents", None)
        .await;
    assert_eq!(list.body["currents"].as_array().unwrap().len(), 4);

    // An update to a refused endpoint is refused and changes nothing.
    let id = list.body["currents"][0]["id"].as_i64().unwrap();
    let r = api
        .call(
            reqwest::Method::PUT,
            &format!("/api/v1/currents/{id}"),
            Some(current("http://169.254.169.254/")),
        )
        .await;
    assert_refused(&r, "endpoint", "metadata", "update");
    let one = api
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/currents/{id}"),
            None,
        )
        .await;
    assert_eq!(one.body["endpoint"], "http://127.0.0.1:9/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_private_endpoints_refuses_private_addresses_but_not_names() {
    let api = Api::start(EgressPolicy::DENY_PRIVATE).await;
    for (endpoint, rule) in [
        ("http://127.0.0.1:9400/", "loopback"),
        ("http://2130706433/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://10.1.2.3/", "private"),
        ("http://172.16.0.1/", "private"),
        ("http://192.168.0.1/", "private"),
        ("http://100.64.0.1/", "private"),
        ("http://[fd12:3456::1]/", "private"),
        ("http://0.0.0.0:4000/", "unspecified"),
        ("http://169.254.169.254/", "metadata"),
    ] {
        let r = api.create(current(endpoint)).await;
        assert_refused(&r, "endpoint", rule, endpoint);
        if rule != "metadata" {
            let message = r.body["message"].as_str().unwrap();
            assert!(message.contains("deny-private-endpoints"), "{message}");
        }
    }
    let mut body = current("https://receiver.example/c");
    body["alert_webhook"] = json!("http://192.168.1.1/alert");
    assert_refused(&api.create(body).await, "alert_webhook", "private", "alert");
    // A name passes here; it is judged by what it resolves to at connect time.
    let r = api.create(current("http://localhost:9400/")).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_reports_the_status_and_a_reason_never_the_body() {
    let api = Api::start(EgressPolicy::default()).await;
    let send_test = |id: i64| {
        let api = &api;
        async move {
            api.call(
                reqwest::Method::POST,
                &format!("/api/v1/currents/{id}/test"),
                None,
            )
            .await
        }
    };

    let (failing, failing_hits, _s1) = secret_receiver(500).await;
    let c = api.create(current(&format!("http://{failing}/c"))).await;
    let r = send_test(c.body["id"].as_i64().unwrap()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], 500);
    assert_eq!(r.body["accepted"], false);
    assert_eq!(r.body["message"], "receiver answered 500: will be retried");
    assert!(!r.body.to_string().contains("AKIA"), "{}", r.body);
    assert_eq!(failing_hits.load(Ordering::SeqCst), 1);

    let (ok, _, _s2) = secret_receiver(200).await;
    let c = api.create(current(&format!("http://{ok}/c"))).await;
    let r = send_test(c.body["id"].as_i64().unwrap()).await;
    assert_eq!(
        (&r.body["status"], &r.body["accepted"], &r.body["message"]),
        (&json!(200), &json!(true), &json!("delivered"))
    );
    assert!(!r.body.to_string().contains("AKIA"), "{}", r.body);

    let (unauthorised, _, _s3) = secret_receiver(401).await;
    let c = api
        .create(current(&format!("http://{unauthorised}/c")))
        .await;
    let r = send_test(c.body["id"].as_i64().unwrap()).await;
    assert_eq!(r.body["status"], 401);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .starts_with("receiver answered 401: the Current would halt"),
        "{}",
        r.body
    );
    assert!(!r.body.to_string().contains("AKIA"), "{}", r.body);

    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let c = api.create(current(&format!("http://{free}/c"))).await;
    let r = send_test(c.body["id"].as_i64().unwrap()).await;
    assert_eq!(r.body["status"], Value::Null);
    assert_eq!(r.body["message"], "connection refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_is_refused_by_the_policy_when_connecting_and_for_stored_addresses() {
    let api = Api::start(EgressPolicy::DENY_PRIVATE).await;
    let (receiver, hits, _s) = secret_receiver(200).await;
    // By name: passes the definition check, refused at connect time (localhost → loopback).
    let c = api
        .create(current(&format!("http://localhost:{}/c", receiver.port())))
        .await;
    assert_eq!(c.status, 201, "{:?}", c.body);
    let id = c.body["id"].as_i64().unwrap();
    let r = api
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/currents/{id}/test"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["status"], Value::Null);
    assert_eq!(r.body["accepted"], false);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .starts_with("refused by egress policy: loopback address"),
        "{}",
        r.body
    );
    // By address, stored before the setting was on (the store does not judge URLs).
    let stored = api
        .store
        .create_current(
            api.ws.id,
            parse_spec(&current(&format!("http://{receiver}/c"))).unwrap(),
            CurrentStatus::Draft,
            NOW,
        )
        .await
        .unwrap();
    let r = api
        .call(
            reqwest::Method::POST,
            &format!("/api/v1/currents/{}/test", stored.id),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .starts_with("refused by egress policy: loopback address 127.0.0.1"),
        "{}",
        r.body
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "nothing reached the receiver"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_ids_are_canonical_decimal() {
    let api = Api::start(EgressPolicy::default()).await;
    let c = api.create(current("http://127.0.0.1:9/")).await;
    let id = c.body["id"].as_i64().unwrap();
    let ok = api
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/currents/{id}"),
            None,
        )
        .await;
    assert_eq!(ok.status, 200);
    for raw in [
        format!("+{id}"),
        format!("0{id}"),
        format!("00{id}"),
        format!("%20{id}"),
        format!("{id}%20"),
        format!("%2B{id}"),
    ] {
        let shown = raw.replace("%20", " ").replace("%2B", "+");
        let not_found = json!({"message": format!("no Current '{shown}' in this workspace")});
        for (method, path, body) in [
            (
                reqwest::Method::GET,
                format!("/api/v1/currents/{raw}"),
                None,
            ),
            (
                reqwest::Method::PUT,
                format!("/api/v1/currents/{raw}"),
                Some(current("http://127.0.0.1:10/")),
            ),
            (
                reqwest::Method::POST,
                format!("/api/v1/currents/{raw}/pause"),
                None,
            ),
            (
                reqwest::Method::GET,
                format!("/api/v1/currents/{raw}/dead_letters"),
                None,
            ),
            (
                reqwest::Method::DELETE,
                format!("/api/v1/currents/{raw}"),
                None,
            ),
        ] {
            let r = api.call(method.clone(), &path, body).await;
            assert_eq!((r.status, &r.body), (404, &not_found), "{method} {path}");
        }
    }
    let after = api
        .call(
            reqwest::Method::GET,
            &format!("/api/v1/currents/{id}"),
            None,
        )
        .await;
    assert_eq!(after.status, 200, "the Current is still there");
    assert_eq!(after.body["endpoint"], "http://127.0.0.1:9/");
    assert_eq!(after.body["status"], "draft");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_body_is_optional_but_must_be_json_when_given() {
    let api = Api::start(EgressPolicy::default()).await;
    let c = api.create(current("http://127.0.0.1:9/")).await;
    let id = c.body["id"].as_i64().unwrap();
    let replay = async |body: &'static str| {
        let res = api
            .client
            .post(format!("{}/api/v1/currents/{id}/replay", api.base))
            .bearer_auth(&api.key)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        (status, res.json::<Value>().await.unwrap())
    };
    let (status, body) = replay("not json").await;
    assert_eq!(
        (status, &body["message"]),
        (400, &json!("Bad Request")),
        "{body}"
    );
    // No body reads as {}: the answer names what a replay needs.
    let (status, body) = replay("").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("from"), "{body}");
}
