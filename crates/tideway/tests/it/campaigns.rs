//! Campaigns through the `tideway` binary, with real local receivers:
//!
//! - (a) a Heap cohort "Abandoned checkout" entry through the partner API starts an
//!   action-based email; it arrives at `tideway sink --smtp-listen`; its open pixel and a link
//!   are followed through Tideway's tracking URLs; `Send`, `Delivery`, `Open` and `Click`
//!   reach a Current's receiver (the same sink) with the campaign's fields;
//! - (b) a scheduled campaign to cohort X excluding cohort Y reaches exactly that set;
//! - `kill -9` mid-send: a scheduled broadcast and cohort-triggered sends survive the kill;
//!   after the restart every user is reached, and the only duplicates are sends that were in
//!   flight (the same idempotency key twice).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Value, json};

use crate::support::{Api, Server, Sink, initial_admin_key, management, tideway_ok};

const DEADLINE: Duration = Duration::from_secs(60);

/// Webhooks received: (idempotency key, user) in arrival order.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) got: Arc<Mutex<Vec<(String, String)>>>,
    delay: Duration,
}

async fn hook(State(h): State<Hooks>, headers: HeaderMap, body: String) -> &'static str {
    if !h.delay.is_zero() {
        tokio::time::sleep(h.delay).await;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let user = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["user"].as_str().map(str::to_owned))
        .unwrap_or_default();
    h.got.lock().unwrap().push((key, user));
    "{}"
}

impl Hooks {
    pub(crate) async fn start(delay: Duration) -> (Hooks, String) {
        let hooks = Hooks {
            got: Arc::default(),
            delay,
        };
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .with_state(hooks.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (hooks, format!("http://{addr}/hook"))
    }

    fn users(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(_, u)| u.clone())
            .collect()
    }

    fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    async fn wait_users(&self, n: usize) -> HashSet<String> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let users: HashSet<String> = self.users().into_iter().collect();
            if users.len() >= n {
                return users;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} users reached",
                users.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Partner {
    partner_key: String,
    import_key: String,
}

async fn partner(data: &Path) -> Partner {
    let dir = data.to_str().unwrap();
    let partner_key = tideway_ok(&["partners", "api-key", "--data-dir", dir])
        .await
        .trim()
        .to_owned();
    let import_key = tideway_ok(&[
        "partners",
        "import-key",
        "--data-dir",
        dir,
        "--workspace",
        "default",
    ])
    .await
    .trim()
    .to_owned();
    Partner {
        partner_key,
        import_key,
    }
}

async fn cohort(api: &Api, p: &Partner, cohort: &str, name: &str, users: &[String]) {
    let (status, body) = api
        .post_ok(
            "/partners/heap/cohorts",
            "",
            &json!({"partner_api_key": p.partner_key, "client_secret": p.import_key, "cohort_id": cohort,
                    "name": name, "created_at": "2026-11-01T00:00:00Z"}),
        )
        .await;
    assert!(status == 201 || status == 200, "{status} {body}");
    for chunk in users.chunks(1_000) {
        let (status, body) = api
            .post_ok(
                "/partners/heap/cohorts/users",
                "",
                &json!({"partner_api_key": p.partner_key, "client_secret": p.import_key, "cohort_id": cohort,
                        "cohort_changes": [{"user_ids": chunk}]}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

async fn track_users(api: &Api, key: &str, users: &[String], extra: impl Fn(&str) -> Value) {
    for chunk in users.chunks(75) {
        let attributes: Vec<Value> = chunk
            .iter()
            .map(|u| {
                let mut a = extra(u);
                a["external_id"] = json!(u);
                a
            })
            .collect();
        let (status, body) = api
            .post_ok("/users/track", key, &json!({ "attributes": attributes }))
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

async fn launch(api: &Api, key: &str, campaign: Value) -> String {
    let (status, created) = management(
        api,
        reqwest::Method::POST,
        "/api/v1/campaigns",
        key,
        Some(campaign),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["campaign"]["id"].as_str().unwrap().to_owned();
    let (status, launched) = management(
        api,
        reqwest::Method::POST,
        &format!("/api/v1/campaigns/{id}/launch"),
        key,
        None,
    )
    .await;
    assert_eq!(status, 200, "{launched}");
    id
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn iso_in(d: Duration) -> String {
    // Millisecond precision: a time rounded down to the second may already have passed
    // when the launch arrives (and a one-off schedule in the past is refused).
    let at = std::time::SystemTime::now() + d;
    let ms = at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    tideway_core::clock::Millis(ms).to_iso()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_campaign_reaches_cohort_x_excluding_cohort_y() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]).await;
    let key = initial_admin_key(&data);
    let api = Api::new(&server.url);
    let p = partner(&data).await;
    let (hooks, hook_url) = Hooks::start(Duration::ZERO).await;
    let all = names("u", 30);
    track_users(&api, &key, &all, |_| json!({})).await;
    cohort(&api, &p, "x", "Trial", &all[..20]).await;
    cohort(&api, &p, "y", "Churned", &all[10..15]).await;
    launch(
        &api,
        &key,
        json!({
            "name": "X but not Y",
            "messages": [{"channel": "webhook", "url": hook_url, "request_method": "POST",
                          "body": "{\"user\": \"{{${user_id}}}\"}"}],
            "audience": {"filter": {"and": [
                {"cohort": {"partner": "heap", "cohort_id": "x", "op": "includes"}},
                {"cohort": {"partner": "heap", "cohort_id": "y", "op": "excludes"}},
            ]}},
            "delivery": {"type": "scheduled", "schedule": {"frequency": "once", "at": iso_in(Duration::from_secs(2))}},
        }),
    )
    .await;
    let reached = hooks.wait_users(15).await;
    // Give a wrong extra send the time to show up.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let expected: HashSet<String> = all[..10].iter().chain(&all[15..20]).cloned().collect();
    assert_eq!(reached, expected);
    assert_eq!(hooks.len(), 15, "each user once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_send_loses_no_scheduled_or_triggered_send() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]).await;
    let key = initial_admin_key(&data);
    let api = Api::new(&server.url);
    let p = partner(&data).await;
    // A slow receiver, so the kill lands while sends are in flight.
    let (hooks, hook_url) = Hooks::start(Duration::from_millis(5)).await;
    let everyone = names("u", 1_500);
    track_users(&api, &key, &everyone, |_| json!({})).await;
    let message = json!([{"channel": "webhook", "url": hook_url, "request_method": "POST",
                          "body": "{\"user\": \"{{${user_id}}}\"}"}]);
    launch(
        &api,
        &key,
        json!({"name": "broadcast", "messages": message,
               "delivery": {"type": "scheduled", "schedule": {"frequency": "once", "at": iso_in(Duration::from_secs(1))}}}),
    )
    .await;
    launch(
        &api,
        &key,
        json!({"name": "entry", "messages": message,
               "delivery": {"type": "action_based", "triggers": [{"cohort_entry": {"partner": "heap", "cohort_id": "late"}}]}}),
    )
    .await;
    // Mid-stream: some sends done, most not.
    let deadline = Instant::now() + DEADLINE;
    while hooks.len() < 200 {
        assert!(Instant::now() < deadline, "the broadcast did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Triggered just before the kill: acknowledged, so it must not be lost.
    let late = names("late", 100);
    track_users(&api, &key, &late, |_| json!({})).await;
    cohort(&api, &p, "late", "Late", &late).await;
    server.kill9().await;
    let before = hooks.len();
    assert!(
        before < everyone.len(),
        "killed after the broadcast finished"
    );

    let server = Server::start(&data, &[]).await;
    let reached = hooks.wait_users(everyone.len() + late.len()).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let mut all: HashSet<String> = everyone.iter().cloned().collect();
    all.extend(late.iter().cloned());
    assert_eq!(reached, all, "every user reached once the server is back");
    // Duplicates: only sends in flight at the kill, each with its original idempotency key.
    let got = hooks.got.lock().unwrap().clone();
    let mut by_key: HashMap<&str, HashSet<&str>> = HashMap::new();
    for (k, u) in &got {
        assert!(!k.is_empty(), "every webhook carries an idempotency key");
        by_key.entry(k).or_default().insert(u);
    }
    assert!(
        by_key.values().all(|users| users.len() == 1),
        "one key, one user"
    );
    let duplicates = got.len() - by_key.len();
    // Only what was sent but not yet settled at the kill: the node's 512 sends in flight plus
    // those whose settlement was still being written (batched every few ms); twice the
    // concurrency bounds both. Parked sends were never sent, so they are not duplicated.
    assert!(duplicates <= 1_024, "{duplicates} duplicates");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_cohort_entry_email_is_opened_clicked_and_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let sink = Sink::start(&tmp.path().join("sink"), &["--smtp-listen", "127.0.0.1:0"]).await;
    let smtp = sink.smtp_url();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &["--smtp-url", &smtp]).await;
    let key = initial_admin_key(&data);
    let api = Api::new(&server.url);
    let p = partner(&data).await;
    let (status, current) = management(
        &api,
        reqwest::Method::POST,
        "/api/v1/currents",
        &key,
        Some(json!({"name": "heap", "kind": "heap_export", "endpoint": format!("{}/braze", sink.url),
                    "categories": ["message_engagement"], "batch_size": 10, "flush_interval_ms": 20, "launch": true})),
    )
    .await;
    assert_eq!(status, 201, "{current}");
    track_users(
        &api,
        &key,
        &["ada".to_owned()],
        |_| json!({"first_name": "Ada", "email": "ada@example.com"}),
    )
    .await;
    let campaign = launch(
        &api,
        &key,
        json!({
            "name": "Abandoned checkout",
            "messages": [{"channel": "email", "from": "shop@tideway.example",
                          "subject": "{{${first_name}}}, your cart is waiting",
                          "body": "<html><body><p>Hi {{${first_name}}}</p><a href=\"https://shop.example/cart\">Back to your cart</a></body></html>"}],
            "delivery": {"type": "action_based", "triggers": [{"cohort_entry": {"partner": "heap", "cohort_id": "abandoned"}}]},
        }),
    )
    .await;
    cohort(
        &api,
        &p,
        "abandoned",
        "Abandoned checkout",
        &["ada".to_owned()],
    )
    .await;
    let mail = sink.wait_mail(1, DEADLINE).await.remove(0);
    assert_eq!(mail["subject"], "Ada, your cart is waiting", "{mail}");
    assert_eq!(mail["to"][0], "ada@example.com");
    let html = mail["html"].as_str().expect("the mail's HTML");
    let links: Vec<&str> = html
        .split('"')
        .filter(|s| s.starts_with(&server.url))
        .collect();
    let click = links
        .iter()
        .find(|l| l.contains("/t/c/"))
        .expect("a tracked link");
    let pixel = links
        .iter()
        .find(|l| l.contains("/t/o/"))
        .expect("an open pixel");
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    assert_eq!(plain.get(*pixel).send().await.unwrap().status(), 200);
    let r = plain.get(*click).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "https://shop.example/cart");
    // Send, Delivery, Open and Click at the Current's receiver, with the campaign's fields.
    let deadline = Instant::now() + DEADLINE;
    let wanted = [
        "users.messages.email.Send",
        "users.messages.email.Delivery",
        "users.messages.email.Open",
        "users.messages.email.Click",
    ];
    loop {
        let events = sink.events().await;
        let found: Vec<&Value> = wanted
            .iter()
            .filter_map(|t| events.iter().find(|e| e["event_type"] == *t))
            .collect();
        if found.len() == wanted.len() {
            for e in found {
                let p = &e["properties"];
                assert_eq!(p["campaign_id"], campaign.as_str(), "{e}");
                assert_eq!(p["campaign_name"], "Abandoned checkout", "{e}");
                assert!(p["message_variation_id"].is_string(), "{e}");
                assert!(p["dispatch_id"].is_string(), "{e}");
                assert_eq!(e["user"]["external_user_id"], "ada", "{e}");
                assert_eq!(p["email_address"], "ada@example.com", "{e}");
            }
            let click = events
                .iter()
                .find(|e| e["event_type"] == "users.messages.email.Click")
                .unwrap();
            assert_eq!(click["properties"]["url"], "https://shop.example/cart");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every engagement event reached the Current: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(server);
}
