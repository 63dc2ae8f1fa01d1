//! Campaigns that send, over HTTP with the engine running: a real server on loopback, a real
//! webhook receiver (axum) and a real SMTP server (`SmtpSink`) in the test process.
//!
//! - API-triggered webhook with `trigger_properties`, Liquid and the idempotency key, and the
//!   `users.messages.webhook.Send` event with the campaign's fields;
//! - email: Liquid, `Message-ID`, `List-Unsubscribe`, the open pixel, click redirects and the
//!   unsubscribe link, each with its Currents event; unsubscribed users are not sent to;
//! - retries (503 → `Failure` not terminal + `Retry`), terminal failures (404);
//! - re-eligibility, frequency caps and the rate limit under concurrent requests;
//! - bad input: a template that does not parse, an unknown campaign, no recipients — a 400
//!   naming the problem, and nothing sent.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::any;
use serde_json::{Value, json};
use tideway_core::egress::EgressPolicy;
use tideway_core::store::Workspace;
use tideway_currents::Clock;
use tideway_messaging::dispatcher::{Channels, Tracking};
use tideway_messaging::email::{SmtpSender, SmtpUrl};
use tideway_messaging::engine::EngineConfig;
use tideway_messaging::smtp_sink::SmtpSink;
use tideway_messaging::tracking::{TrackingKey, TrackingUrls};
use tideway_messaging::webhook::WebhookSender;
use tideway_server::MessagingOptions;

use crate::harness::Server;

const DEADLINE: Duration = Duration::from_secs(20);

/// One request the receiver got.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

/// A local webhook receiver: answers the queued statuses in order, then 200.
#[derive(Clone, Default)]
pub(crate) struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    statuses: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    pub(crate) async fn start() -> (Receiver, String) {
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/hook", any(hook))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (receiver, format!("http://{addr}/hook"))
    }

    pub(crate) fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    fn answer(&self, statuses: &[u16]) {
        self.statuses.lock().unwrap().extend(statuses);
    }
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    r.hits.lock().unwrap().push(Hit { headers, body });
    let status = r.statuses.lock().unwrap().pop_front().unwrap_or(200);
    StatusCode::from_u16(status).unwrap()
}

pub(crate) struct Setup {
    pub(crate) s: Server,
    pub(crate) ws: Workspace,
    pub(crate) key: String,
    pub(crate) hooks: Receiver,
    pub(crate) hook_url: String,
    pub(crate) smtp: SmtpSink,
}

pub(crate) async fn setup() -> Setup {
    setup_with(EngineConfig::default()).await
}

/// [`setup`] with the engine configured.
pub(crate) async fn setup_with(engine: EngineConfig) -> Setup {
    let smtp = SmtpSink::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("start the SMTP sink");
    let smtp_url = smtp.url();
    let s = Server::with_messaging(|base| MessagingOptions {
        channels: Channels {
            webhook: WebhookSender::new(EgressPolicy::default(), Duration::from_secs(5))
                .expect("webhook client"),
            smtp: Some(
                SmtpSender::new(&SmtpUrl::parse(&smtp_url).expect("smtp url"))
                    .expect("smtp client"),
            ),
        },
        tracking: Tracking {
            key: TrackingKey::new([7; 32]),
            urls: TrackingUrls::new(base),
        },
        clock: Clock::system(),
        engine,
    })
    .await;
    let ws = s.workspace("w").await;
    let key = s.admin_key(&ws).await;
    let (hooks, hook_url) = Receiver::start().await;
    Setup {
        s,
        ws,
        key,
        hooks,
        hook_url,
        smtp,
    }
}

impl Setup {
    pub(crate) async fn track(&self, attributes: Value) {
        let a = self
            .s
            .post(
                "/users/track",
                &self.key,
                json!({ "attributes": attributes }),
            )
            .await;
        assert_eq!(a.status, 201, "{a:?}");
    }

    /// Creates and launches a campaign; returns its id.
    async fn campaign(&self, body: Value) -> String {
        let a = self.s.post("/api/v1/campaigns", &self.key, body).await;
        assert_eq!(a.status, 201, "{a:?}");
        let id = a.body["campaign"]["id"].as_str().unwrap().to_owned();
        let a = self
            .s
            .post(
                &format!("/api/v1/campaigns/{id}/launch"),
                &self.key,
                json!({}),
            )
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        id
    }

    fn webhook_campaign(&self, name: &str, extra: Value) -> Value {
        let mut body = json!({
            "name": name,
            "messages": [{
                "channel": "webhook",
                "url": self.hook_url,
                "request_method": "POST",
                "request_headers": {"X-Campaign": "{{campaign.${name}}}"},
                "body": "{\"plan\": \"{{api_trigger_properties.${plan} | default: 'none'}}\", \"name\": \"{{${first_name}}}\"}",
            }],
            "delivery": {"type": "api_triggered"},
        });
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        body
    }

    async fn trigger(&self, campaign: &str, recipients: Value) -> crate::harness::Answer {
        self.s
            .post(
                "/campaigns/trigger/send",
                &self.key,
                json!({"campaign_id": campaign, "recipients": recipients}),
            )
            .await
    }

    async fn events(&self, name: &str) -> Vec<Value> {
        self.s.events_named(&self.ws, name).await
    }

    /// Waits until at least `n` events named `name` are logged.
    pub(crate) async fn wait_events(&self, name: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let events = self.events(name).await;
            if events.len() >= n {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} {name} events: {events:?}",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub(crate) async fn wait_hits(&self, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let hits = self.hooks.hits();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} webhooks",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_triggered_webhook_renders_trigger_properties_and_logs_its_send() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1", "first_name": "Ada"}, {"external_id": "u2"}]))
        .await;
    let id = t.campaign(t.webhook_campaign("Welcome", json!({}))).await;
    let a = t
        .trigger(
            &id,
            json!([{"external_user_id": "u1", "trigger_properties": {"plan": "pro"}}, {"external_user_id": "u2"}]),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.body["message"], "success");
    let dispatch = a.body["dispatch_id"].as_str().unwrap().to_owned();
    let hits = t.wait_hits(2).await;
    let mut bodies: Vec<Value> = hits
        .iter()
        .map(|h| serde_json::from_str(&h.body).unwrap())
        .collect();
    bodies.sort_by_key(|b| b["name"].to_string());
    assert_eq!(
        bodies,
        vec![
            json!({"plan": "none", "name": ""}),
            json!({"plan": "pro", "name": "Ada"})
        ]
    );
    for h in &hits {
        assert_eq!(h.headers["x-campaign"], "Welcome");
        assert!(
            h.headers["idempotency-key"]
                .to_str()
                .unwrap()
                .starts_with("tw-")
        );
    }
    let keys: std::collections::HashSet<_> = hits
        .iter()
        .map(|h| h.headers["idempotency-key"].clone())
        .collect();
    assert_eq!(keys.len(), 2, "one key per send");
    let sends = t.wait_events("users.messages.webhook.Send", 2).await;
    for e in &sends {
        let p = &e["properties"];
        assert_eq!(p["campaign_id"], id.as_str());
        assert_eq!(p["campaign_name"], "Welcome");
        assert!(p["message_variation_id"].is_string(), "{e}");
        assert!(
            p["dispatch_id"].as_str().is_some_and(|d| !d.is_empty()),
            "{e}"
        );
        assert!(e["user"]["user_id"].is_string(), "{e}");
    }
    // The campaign's stats count them.
    let a = get_with(&t, &format!("/api/v1/campaigns/{id}"), &t.key).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["campaign"]["stats"]["sent"], 2, "{a:?}");
    let _ = dispatch;
}

/// `/messages/send` with an API campaign's `campaign_id` and one of its variations is that
/// campaign's send (braze-api.md: "needed for stats"): its events name the campaign and the
/// variation, and the campaign's stats count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_with_a_campaign_id_counts_for_that_campaign() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1"}, {"external_id": "u2"}]))
        .await;
    let id = t.campaign(t.webhook_campaign("Receipts", json!({}))).await;
    let a = t.trigger(&id, json!([{"external_user_id": "u1"}])).await;
    assert_eq!(a.status, 201, "{a:?}");
    let triggered = t.wait_events("users.messages.webhook.Send", 1).await;
    let variation = triggered[0]["properties"]["message_variation_id"].clone();
    let a =
        t.s.post(
            "/messages/send",
            &t.key,
            json!({
                "campaign_id": id,
                "send_id": "receipt-1",
                "external_user_ids": ["u2"],
                "messages": {"webhook": {
                    "url": t.hook_url,
                    "request_method": "POST",
                    "body": "ad hoc",
                    "message_variation_id": variation,
                }},
            }),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let sends = t.wait_events("users.messages.webhook.Send", 2).await;
    let properties = |e: &Value| {
        let p = &e["properties"];
        (
            p["campaign_id"].clone(),
            p["campaign_name"].clone(),
            p["message_variation_id"].clone(),
            p["message_variation_name"].clone(),
        )
    };
    assert_eq!(
        properties(&sends[1]),
        properties(&triggered[0]),
        "{sends:?}"
    );
    assert_eq!(sends[1]["properties"]["send_id"], "receipt-1", "{sends:?}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let a = get_with(&t, &format!("/api/v1/campaigns/{id}"), &t.key).await;
        assert_eq!(a.status, 200, "{a:?}");
        if a.body["campaign"]["stats"]["sends"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "not counted: {a:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // A scheduled send credited to the campaign stays credited when its messages change.
    let hook = |body: &str| {
        json!({"webhook": {"url": t.hook_url, "request_method": "POST", "body": body,
                           "message_variation_id": variation}})
    };
    let a =
        t.s.post(
            "/messages/schedule/create",
            &t.key,
            json!({"campaign_id": id, "send_id": "later-1", "external_user_ids": ["u1"],
                   "schedule": {"time": iso_in(1_500)}, "messages": hook("first")}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let schedule = a.body["schedule_id"].as_str().unwrap().to_owned();
    let mut other_variation = hook("second");
    other_variation["webhook"]["message_variation_id"] = json!("bogus");
    let a =
        t.s.post(
            "/messages/schedule/update",
            &t.key,
            json!({"schedule_id": schedule, "messages": other_variation}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (400, Some("Invalid Message Variant")),
        "{a:?}"
    );
    let a =
        t.s.post(
            "/messages/schedule/update",
            &t.key,
            json!({"schedule_id": schedule, "messages": hook("second")}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let sends = t.wait_events("users.messages.webhook.Send", 3).await;
    let later = sends
        .iter()
        .find(|e| e["properties"]["send_id"] == "later-1")
        .expect("the scheduled send");
    assert_eq!(properties(later), properties(&triggered[0]), "{later}");

    // A scheduled send credited to a campaign stopped before its time does not go out, as the
    // campaign's own scheduled sends do not.
    let a =
        t.s.post(
            "/messages/schedule/create",
            &t.key,
            json!({"campaign_id": id, "send_id": "later-2", "external_user_ids": ["u1"],
                   "schedule": {"time": iso_in(1_000)}, "messages": hook("never")}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let a =
        t.s.post(&format!("/api/v1/campaigns/{id}/stop"), &t.key, json!({}))
            .await;
    assert_eq!(a.status, 200, "{a:?}");
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let sends = t.events("users.messages.webhook.Send").await;
    assert!(
        !sends
            .iter()
            .any(|e| e["properties"]["send_id"] == "later-2"),
        "{sends:?}"
    );

    // Only a campaign /campaigns/trigger/send would send is credited.
    let stopped = t.campaign(t.webhook_campaign("Gone", json!({}))).await;
    let a =
        t.s.post(
            &format!("/api/v1/campaigns/{stopped}/stop"),
            &t.key,
            json!({}),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let a =
        t.s.post(
            "/messages/send",
            &t.key,
            json!({"campaign_id": stopped, "external_user_ids": ["u2"], "messages": hook("x")}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (400, Some("Invalid Campaign ID")),
        "{a:?}"
    );
}

/// Files an email message names in `attachments` are fetched when it is sent and attached
/// after its text and HTML; one that cannot be had (404) aborts that email, naming it. Per-send
/// attachments on a trigger and a BCC are refused, never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_attachments_are_fetched_and_attached() {
    let t = setup().await;
    t.track(json!([
        {"external_id": "u1", "email": "ada@example.com"},
        {"external_id": "u2", "email": "bo@example.com"},
    ]))
    .await;
    let fetched = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&fetched);
    let files = axum::Router::new().route(
        "/receipt.pdf",
        axum::routing::get(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/pdf")],
                    "PDF-1.4 tideway receipt 42",
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, files).await });
    let send = |attachments: Value| {
        json!({"external_user_ids": ["u1", "u2"], "messages": {"email": {
            "from": "Shop <shop@example.com>", "subject": "Receipt", "body": "<p>Thanks</p>",
            "attachments": attachments,
        }}})
    };
    let a =
        t.s.post(
            "/messages/send",
            &t.key,
            send(json!([{"file_name": "receipt.pdf", "url": format!("http://{at}/receipt.pdf")}])),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let mails = t.smtp.wait_for(2, DEADLINE).await;
    // Both got the file; it was fetched once for the two.
    assert_eq!(fetched.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(mails[1].data.contains("filename=\"receipt.pdf\""));
    let data = &mails[0].data;
    assert!(data.contains("multipart/mixed"), "{data}");
    assert!(data.contains("filename=\"receipt.pdf\""), "{data}");
    // The file's bytes, base64 (`PDF-1.4 tideway receipt 42`).
    assert!(
        data.contains("UERGLTEuNCB0aWRld2F5IHJlY2VpcHQgNDI="),
        "{data}"
    );
    assert!(
        mails[0].html().is_some_and(|h| h.contains("Thanks")),
        "{data}"
    );

    let a =
        t.s.post(
            "/messages/send",
            &t.key,
            send(json!([{"file_name": "gone.pdf", "url": format!("http://{at}/gone.pdf")}])),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let aborts = t.wait_events("users.messages.email.Abort", 2).await;
    assert_eq!(
        aborts[0]["properties"]["abort_type"], "attachment_unavailable",
        "{aborts:?}"
    );

    for bad in [
        json!([{"file_name": "x.pdf"}]),
        json!([{"file_name": "../x.pdf", "url": "http://h/x"}]),
        json!([{"file_name": "..", "url": "http://h/x"}]),
        json!([{"file_name": "x.pdf", "url": "ftp://h/x"}]),
        json!([{"file_name": "x.pdf", "url": "http://"}]),
        json!([{"file_name": "x.pdf", "url": "http:// bad"}]),
        json!("x.pdf"),
    ] {
        let a = t.s.post("/messages/send", &t.key, send(bad.clone())).await;
        assert_eq!(a.status, 400, "{bad}: {a:?}");
    }
    let mut with_bcc = send(json!([]));
    with_bcc["messages"]["email"]["bcc"] = json!("audit@example.com");
    let a = t.s.post("/messages/send", &t.key, with_bcc).await;
    assert_eq!(a.status, 400, "{a:?}");
    let id = t.campaign(t.webhook_campaign("Hooks", json!({}))).await;
    for attachments in [
        json!([{"file_name": "r.pdf", "url": format!("http://{at}/receipt.pdf")}]),
        json!({"file_name": "r.pdf", "url": format!("http://{at}/receipt.pdf")}),
        json!("r.pdf"),
    ] {
        let a =
            t.s.post(
                "/campaigns/trigger/send",
                &t.key,
                json!({"campaign_id": id, "recipients": [{"external_user_id": "u1"}],
                       "attachments": attachments}),
            )
            .await;
        assert_eq!(a.status, 400, "{attachments}: {a:?}");
    }
    // On /messages/send they belong in messages.email, not at the top.
    let mut top_level = send(json!([]));
    top_level["attachments"] = json!([{"file_name": "r.pdf", "url": "http://h/r.pdf"}]);
    let a = t.s.post("/messages/send", &t.key, top_level).await;
    assert_eq!(a.status, 400, "{a:?}");
    // A campaign's email message cannot name a BCC either.
    let a =
        t.s.post(
            "/api/v1/campaigns",
            &t.key,
            json!({"name": "With bcc", "delivery": {"type": "api_triggered"},
                   "messages": [{"channel": "email", "from": "a@example.com", "subject": "s",
                                 "body": "b", "bcc": "audit@example.com"}]}),
        )
        .await;
    assert_eq!(a.status, 400, "{a:?}");
}

/// A segment a campaign or Canvas targets cannot be deleted under it (that turned its audience
/// into nobody, and an unchanged edit of the campaign into everyone); once they are stopped,
/// it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_in_use_by_a_campaign_or_canvas_is_not_deleted() {
    let t = setup().await;
    let segment = |name: &str| {
        let t = &t;
        let body = json!({"name": name, "filter": {"identified": true}});
        async move {
            let a = t.s.post("/api/v1/segments", &t.key, body).await;
            assert_eq!(a.status, 201, "{a:?}");
            a.body["id"].as_str().unwrap().to_owned()
        }
    };
    let (targeted, filtered) = (segment("Targeted").await, segment("Filtered").await);
    let campaign = t
        .campaign(t.webhook_campaign("Uses it", json!({"audience": {"segment_ids": [targeted]}})))
        .await;
    let a =
        t.s.post(
            "/api/v1/canvases",
            &t.key,
            json!({
                "name": "Splits on it",
                "entry": {"type": "api_triggered"},
                "steps": [{"id": "split", "name": "In it?", "type": "decision_split",
                           "filter": {"in_segment": filtered}}],
            }),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let canvas = a.body["canvas"]["id"].as_str().unwrap().to_owned();
    let delete = |id: &str| {
        let t = &t;
        let path = format!("/api/v1/segments/{id}");
        async move {
            t.s.send(
                reqwest::Method::DELETE,
                &path,
                crate::harness::Auth::Bearer(&t.key),
                None,
                false,
            )
            .await
        }
    };
    let a = delete(&targeted).await;
    assert_eq!(a.status, 409, "{a:?}");
    let why = a.body["message"].as_str().unwrap();
    assert!(
        why.contains("campaign 'Uses it'") && why.contains(&campaign),
        "{why}"
    );
    let a = delete(&filtered).await;
    assert_eq!(a.status, 409, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("Canvas 'Splits on it'"),
        "{a:?}"
    );
    for (path, id) in [("campaigns", &campaign), ("canvases", &canvas)] {
        let a =
            t.s.post(&format!("/api/v1/{path}/{id}/stop"), &t.key, json!({}))
                .await;
        assert_eq!(a.status, 200, "{a:?}");
    }
    assert_eq!(delete(&targeted).await.status, 204);
    assert_eq!(delete(&filtered).await.status, 204);

    // A campaign saved while its segment is deleted: one of the two wins, never both.
    for round in 0..10 {
        let id = segment(&format!("Raced {round}")).await;
        let (created, deleted) = tokio::join!(
            t.s.post(
                "/api/v1/campaigns",
                &t.key,
                t.webhook_campaign(
                    &format!("Racer {round}"),
                    json!({"audience": {"segment_ids": [id]}})
                ),
            ),
            delete(&id),
        );
        assert!(
            !(created.status == 201 && deleted.status == 204),
            "round {round}: both won: {created:?} {deleted:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_retries_on_503_and_fails_for_good_on_404() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1"}, {"external_id": "u2"}]))
        .await;
    let id = t.campaign(t.webhook_campaign("Retry", json!({}))).await;
    t.hooks.answer(&[503]);
    let a = t.trigger(&id, json!([{"external_user_id": "u1"}])).await;
    assert_eq!(a.status, 201, "{a:?}");
    let failures = t.wait_events("users.messages.webhook.Failure", 1).await;
    assert_eq!(failures[0]["properties"]["http_status_code"], 503);
    assert_eq!(failures[0]["properties"]["is_terminal"], false);
    t.wait_events("users.messages.webhook.Retry", 1).await;
    assert!(t.events("users.messages.webhook.Send").await.is_empty());

    t.hooks.answer(&[404]);
    let a = t.trigger(&id, json!([{"external_user_id": "u2"}])).await;
    assert_eq!(a.status, 201, "{a:?}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let failures = t.events("users.messages.webhook.Failure").await;
        if let Some(f) = failures
            .iter()
            .find(|f| f["properties"]["http_status_code"] == 404)
        {
            assert_eq!(f["properties"]["is_terminal"], true, "{f}");
            break;
        }
        assert!(Instant::now() < deadline, "no 404 failure: {failures:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(t.hooks.hits().len(), 2, "the 404 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_is_rendered_tracked_and_unsubscribes() {
    let t = setup().await;
    t.track(json!([
        {"external_id": "u1", "first_name": "Ada", "email": "ada@example.com", "plan": "pro"},
        {"external_id": "nomail"},
    ]))
    .await;
    let id = t
        .campaign(json!({
            "name": "Trial",
            "messages": [{
                "channel": "email",
                "from": "Team <team@tideway.example>",
                "subject": "Hi {{${first_name} | default: 'there'}}",
                "body": "<html><body><p>Plan: {{custom_attribute.${plan}}}</p><a href=\"https://example.com/upgrade?x=1\">Upgrade</a></body></html>",
            }],
            "delivery": {"type": "api_triggered"},
        }))
        .await;
    let a = t
        .trigger(
            &id,
            json!([{"external_user_id": "u1"}, {"external_user_id": "nomail"}]),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let mails = t.smtp.wait_for(1, DEADLINE).await;
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.to, vec!["ada@example.com".to_owned()]);
    assert_eq!(mail.header("Subject").as_deref(), Some("Hi Ada"));
    assert!(
        mail.header("Message-ID").is_some_and(|m| m.contains("tw-")),
        "{:?}",
        mail.header("Message-ID")
    );
    let unsubscribe = mail
        .header("List-Unsubscribe")
        .expect("List-Unsubscribe")
        .trim_matches(['<', '>'])
        .to_owned();
    let html = mail.html().expect("an HTML part");
    assert!(html.contains("Plan: pro"), "{html}");
    assert!(
        !html.contains("https://example.com/upgrade"),
        "links are rewritten: {html}"
    );
    let links: Vec<String> = html
        .split('"')
        .filter(|p| p.starts_with(&t.s.base))
        .map(str::to_owned)
        .collect();
    let click = links
        .iter()
        .find(|l| l.contains("/t/c/"))
        .expect("a click link");
    let pixel = links
        .iter()
        .find(|l| l.contains("/t/o/"))
        .expect("an open pixel");
    t.wait_events("users.messages.email.Delivery", 1).await;
    assert_eq!(t.events("users.messages.email.Send").await.len(), 1);
    let aborts = t.wait_events("users.messages.email.Abort", 1).await;
    assert_eq!(aborts[0]["properties"]["abort_type"], "missing_email");

    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = plain.get(pixel.as_str()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/gif");
    let r = plain.get(click.as_str()).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "https://example.com/upgrade?x=1");
    let opens = t.wait_events("users.messages.email.Open", 1).await;
    assert_eq!(opens[0]["properties"]["campaign_id"], id.as_str());
    let clicks = t.wait_events("users.messages.email.Click", 1).await;
    assert_eq!(
        clicks[0]["properties"]["url"],
        "https://example.com/upgrade?x=1"
    );
    // A forged token is a 404 and records nothing.
    let forged = format!("{}x", &click[..click.len() - 1]);
    assert_eq!(plain.get(forged).send().await.unwrap().status(), 404);
    assert_eq!(t.events("users.messages.email.Click").await.len(), 1);

    // One-click unsubscribe (RFC 8058): POST to the List-Unsubscribe URL.
    let r = plain
        .post(unsubscribe.as_str())
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    t.wait_events("users.messages.email.Unsubscribe", 1).await;
    t.wait_events("users.behaviors.subscription.GlobalStateChange", 1)
        .await;
    let user = t.s.export_external(&t.key, "u1").await.unwrap();
    assert_eq!(user["email_subscribe"], "unsubscribed", "{user}");
    // An unsubscribed user is not sent to...
    let a = t.trigger(&id, json!([{"external_user_id": "u1"}])).await;
    assert_eq!(a.status, 201, "{a:?}");
    // ...unless a send asks for everyone (`recipient_subscription_state: all`, Braze's
    // transactional email); `subscribed` (the default) and `opted_in` still skip them.
    let email = |subject: &str| json!({"email": {"from": "Team <team@tideway.example>", "subject": subject, "body": "<p>x</p>"}});
    for (state, subject) in [
        (Value::Null, "default"),
        (json!("subscribed"), "subscribed"),
        (json!("opted_in"), "opted_in"),
        (json!("all"), "all"),
    ] {
        let a =
            t.s.post(
                "/messages/send",
                &t.key,
                json!({"external_user_ids": ["u1"], "recipient_subscription_state": state, "messages": email(subject)}),
            )
            .await;
        assert_eq!(a.status, 201, "{state}: {a:?}");
    }
    let mails = t.smtp.wait_for(2, DEADLINE).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let subjects: Vec<Option<String>> = t
        .smtp
        .messages()
        .iter()
        .map(|m| m.header("Subject"))
        .collect();
    assert_eq!(mails[1].header("Subject").as_deref(), Some("all"));
    assert_eq!(subjects.len(), 2, "{subjects:?}");
}

/// GETs `path` with the setup's key (or `key`).
async fn get_with(t: &Setup, path: &str, key: &str) -> crate::harness::Answer {
    t.s.send(
        reqwest::Method::GET,
        path,
        crate::harness::Auth::Bearer(key),
        None,
        false,
    )
    .await
}

/// `GET /sends/data_series` counts the messages sent with a send id, per UTC day and
/// variation: sends, deliveries, opens (unique too), unique recipients; messages of the same
/// campaign without the send id are not in it; bad parameters and keys are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_ids_daily_series_counts_its_messages() {
    let t = setup().await;
    t.track(json!([
        {"external_id": "u1", "email": "one@example.com"},
        {"external_id": "u2", "email": "two@example.com"},
        {"external_id": "u3", "email": "three@example.com"},
    ]))
    .await;
    let id = t
        .campaign(json!({
            "name": "Launch",
            "messages": [{
                "channel": "email",
                "from": "Team <team@tideway.example>",
                "subject": "News",
                "body": "<html><body><p>Hello</p></body></html>",
            }],
            "delivery": {"type": "api_triggered"},
        }))
        .await;
    let a =
        t.s.post(
            "/sends/id/create",
            &t.key,
            json!({"campaign_id": id, "send_id": "launch-1"}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let a =
        t.s.post(
            "/campaigns/trigger/send",
            &t.key,
            json!({"campaign_id": id, "send_id": "launch-1",
                   "recipients": [{"external_user_id": "u1"}, {"external_user_id": "u2"}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    // The same campaign without the send id: not in the series.
    let a = t.trigger(&id, json!([{"external_user_id": "u3"}])).await;
    assert_eq!(a.status, 201, "{a:?}");
    let mails = t.smtp.wait_for(3, DEADLINE).await;
    let to_u2 = mails
        .iter()
        .find(|m| m.to == ["two@example.com".to_owned()])
        .expect("a mail to u2");
    let pixel = to_u2
        .html()
        .expect("an HTML part")
        .split('"')
        .find(|p| p.starts_with(&t.s.base) && p.contains("/t/o/"))
        .expect("an open pixel")
        .to_owned();
    for _ in 0..2 {
        let r = reqwest::get(pixel.as_str()).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    t.wait_events("users.messages.email.Open", 2).await;
    let sends = t.wait_events("users.messages.email.Send", 3).await;
    let (variation_id, variation_name) = (
        &sends[0]["properties"]["message_variation_id"],
        &sends[0]["properties"]["message_variation_name"],
    );
    assert!(variation_id.is_string(), "{sends:?}");

    let path = format!("/sends/data_series?campaign_id={id}&send_id=launch-1&length=2");
    let deadline = Instant::now() + DEADLINE;
    let a = loop {
        let a = get_with(&t, &path, &t.key).await;
        assert_eq!(a.status, 200, "{a:?}");
        let email = &a.body["data"][1]["messages"]["email"][0];
        if email["unique_opens"] == 1 && email["delivered"] == 2 {
            break a;
        }
        if Instant::now() >= deadline {
            let c = get_with(&t, &format!("/api/v1/campaigns/{id}"), &t.key).await;
            panic!("not counted: {a:?}\n{sends:?}\n{c:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let today = now_iso()[..10].to_owned();
    let data = a.body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2, "{a:?}");
    assert_eq!(data[0]["messages"], json!({}), "yesterday: {a:?}");
    assert_eq!(data[1]["time"], today.as_str());
    assert_eq!(
        data[1]["messages"]["email"],
        json!([{"variation_name": variation_name, "variation_api_id": variation_id, "sent": 2, "delivered": 2, "bounces": 0,
                "opens": 2, "unique_opens": 1, "clicks": 0, "unique_clicks": 0,
                "unsubscribes": 0, "unique_recipients": 2}]),
        "{a:?}"
    );
    assert_eq!(data[1]["unique_recipients"], 2);
    assert_eq!(data[1]["conversions"], 0);
    // The campaign's own stats count all three messages, sent as soon as it was launched
    // (the trigger engine's cursor starts at the launch, not at its first look).
    let c = get_with(&t, &format!("/api/v1/campaigns/{id}"), &t.key).await;
    let stats = &c.body["campaign"]["stats"];
    assert_eq!(
        (
            &stats["sends"],
            &stats["deliveries"],
            &stats["opens"],
            &stats["unique_opens"]
        ),
        (&json!(3), &json!(3), &json!(2), &json!(1)),
        "{c:?}"
    );
    // A send id nothing was sent with: every day, empty.
    let a = get_with(
        &t,
        &format!("/sends/data_series?campaign_id={id}&send_id=other&length=1"),
        &t.key,
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["data"][0]["messages"], json!({}));

    // Refused: an unknown campaign, bad parameters, a key without sends.data_series.
    for (query, why) in [
        (
            "campaign_id=nope&send_id=launch-1&length=1".to_owned(),
            "Invalid Campaign ID",
        ),
        (format!("campaign_id={id}&length=1"), "send_id is required"),
        (
            format!("campaign_id={id}&send_id=launch-1&length=0"),
            "length",
        ),
        (
            format!("campaign_id={id}&send_id=launch-1&length=1&ending_at=soon"),
            "ending_at",
        ),
    ] {
        let a = get_with(&t, &format!("/sends/data_series?{query}"), &t.key).await;
        assert_eq!(a.status, 400, "{query}: {a:?}");
        assert!(a.body.to_string().contains(why), "{query}: {a:?}");
    }
    // A NUL character in an id is a 400 on every backend, never a 500.
    for (path, body) in [
        ("/sends/id/create", json!({"campaign_id": "a\u{0}b"})),
        (
            "/campaigns/trigger/send",
            json!({"campaign_id": "a\u{0}b", "broadcast": true}),
        ),
        (
            "/campaigns/trigger/send",
            json!({"campaign_id": id, "send_id": "a\u{0}b", "broadcast": true}),
        ),
        (
            "/messages/send",
            json!({"external_user_ids": ["a\u{0}b"], "messages": {"webhook": {"url": t.hook_url, "request_method": "POST", "body": "x"}}}),
        ),
    ] {
        let a = t.s.post(path, &t.key, body.clone()).await;
        assert_eq!(a.status, 400, "{path} {body}: {a:?}");
    }
    let a = get_with(
        &t,
        "/sends/data_series?campaign_id=a%00b&send_id=s&length=1",
        &t.key,
    )
    .await;
    assert_eq!(a.status, 400, "{a:?}");
    let limited =
        t.s.key_for(&t.ws, &[tideway_core::keys::Permission::CampaignsDetails])
            .await;
    let a = get_with(&t, &path, &limited).await;
    assert_eq!(a.status, 403, "{a:?}");
}

/// A NUL character in the id of a campaign, segment, schedule or Canvas names nothing, so the
/// answer is that field's documented not-found message on both backends (PostgreSQL cannot
/// hold the character, and once answered with its own wording for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_messaging_id_is_the_fields_not_found_answer() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1"}])).await;
    let id = t.campaign(t.webhook_campaign("News", json!({}))).await;
    let webhook = json!({"webhook": {"url": t.hook_url, "request_method": "POST", "body": "x"}});
    let later = json!({"time": "2999-01-01T00:00:00Z"});
    let nul = "a\u{0}b";
    for (path, body, message) in [
        (
            "/campaigns/trigger/send",
            json!({"campaign_id": nul, "broadcast": true}),
            "Invalid Campaign ID",
        ),
        (
            "/campaigns/trigger/send",
            json!({"campaign_id": id, "segment_id": nul}),
            "Invalid segment_id",
        ),
        (
            "/campaigns/trigger/schedule/create",
            json!({"campaign_id": nul, "broadcast": true, "schedule": later}),
            "Invalid Campaign ID",
        ),
        (
            "/campaigns/trigger/schedule/update",
            json!({"campaign_id": id, "schedule_id": nul, "schedule": later}),
            "Invalid schedule_id",
        ),
        (
            "/campaigns/trigger/schedule/delete",
            json!({"campaign_id": id, "schedule_id": nul}),
            "Invalid schedule_id",
        ),
        (
            "/messages/send",
            json!({"campaign_id": nul, "external_user_ids": ["u1"], "messages": webhook}),
            "Invalid Campaign ID",
        ),
        (
            "/messages/send",
            json!({"segment_id": nul, "messages": webhook}),
            "Invalid segment_id",
        ),
        (
            "/messages/schedule/update",
            json!({"schedule_id": nul, "schedule": later}),
            "Invalid schedule_id",
        ),
        (
            "/messages/schedule/delete",
            json!({"schedule_id": nul}),
            "Invalid schedule_id",
        ),
        (
            "/sends/id/create",
            json!({"campaign_id": nul}),
            "Invalid Campaign ID",
        ),
        (
            "/canvas/trigger/send",
            json!({"canvas_id": nul, "broadcast": true}),
            "canvas_id must be a string of the Canvas api identifier",
        ),
    ] {
        let a = t.s.post(path, &t.key, body.clone()).await;
        assert_eq!(
            (a.status, a.body["message"].as_str()),
            (400, Some(message)),
            "{path} {body}: {a:?}"
        );
    }
}

/// A NUL in a campaign's, an ad-hoc message's or a Canvas's definition is a 400 on save naming
/// where, on both backends: PostgreSQL would refuse it later, in the middle of a send (a
/// variation id every event carries) or of a Canvas scan (an event name it looks for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_definition_is_refused_on_save() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1"}])).await;
    let mut campaign = t.webhook_campaign("News", json!({}));
    campaign["messages"][0]["id"] = json!("v\u{0}");
    let webhook = json!({"url": t.hook_url, "request_method": "POST", "body": "x", "message_variation_id": "m\u{0}"});
    let canvas = json!({
        "name": "Exit",
        "entry": {"type": "api_triggered"},
        "exit_criteria": {"exception_events": [{"custom_event": {"name": "q\u{0}"}}]},
        "steps": [{"id": "w", "type": "delay", "delay": {"seconds": 5}}]
    });
    for (path, body, field) in [
        ("/api/v1/campaigns", campaign, "messages[0].id"),
        (
            "/messages/send",
            json!({"external_user_ids": ["u1"], "messages": {"webhook": webhook}}),
            "message_variation_id",
        ),
        (
            "/api/v1/canvases",
            canvas,
            "exit_criteria.exception_events[0].custom_event.name",
        ),
    ] {
        let a = t.s.post(path, &t.key, body).await;
        assert_eq!(a.status, 400, "{path}: {a:?}");
        let said = a.body.to_string();
        assert!(
            said.contains(field) && said.contains("NUL"),
            "{path}: {said}"
        );
    }
}

/// `GET /messages/scheduled_broadcasts` lists the launched campaigns scheduled by time whose
/// next occurrence falls before `end_time`, soonest first, each once: not API-triggered ones,
/// not paused ones, not those due later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_broadcasts_are_the_launched_schedules_due_before_end_time() {
    let t = setup().await;
    let now = tideway_core::clock::Millis(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    );
    let hour = 3_600_000;
    // Daily, six hours from now (local time); once, in three days; both launched.
    let time = tideway_core::clock::Millis(now.0 + 6 * hour).to_iso()[11..16].to_owned();
    let mut daily = t.webhook_campaign("Daily", json!({}));
    daily["delivery"] = json!({"type": "scheduled", "schedule": {"frequency": "daily", "time": time, "in_local_time": true}});
    let daily = t.campaign(daily).await;
    let mut once = t.webhook_campaign("Once", json!({}));
    let at = tideway_core::clock::Millis(now.0 + 72 * hour).to_iso();
    once["delivery"] = json!({"type": "scheduled", "schedule": {"frequency": "once", "at": at}});
    let once = t.campaign(once).await;
    t.campaign(t.webhook_campaign("Api", json!({}))).await;
    let mut paused = t.webhook_campaign("Paused", json!({}));
    paused["delivery"] =
        json!({"type": "scheduled", "schedule": {"frequency": "daily", "time": time}});
    let paused = t.campaign(paused).await;
    let a =
        t.s.post(
            &format!("/api/v1/campaigns/{paused}/pause"),
            &t.key,
            json!({}),
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");

    let listed = |days: i64| {
        let end = tideway_core::clock::Millis(now.0 + days * 24 * hour).to_iso();
        let t = &t;
        async move {
            let a = get_with(
                t,
                &format!("/messages/scheduled_broadcasts?end_time={end}"),
                &t.key,
            )
            .await;
            assert_eq!(a.status, 200, "{a:?}");
            a.body["scheduled_broadcasts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        b["id"].as_str().unwrap().to_owned(),
                        b["schedule_type"].as_str().unwrap().to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        listed(1).await,
        [(daily.clone(), "local_time_zones".to_owned())]
    );
    assert_eq!(
        listed(4).await,
        [
            (daily.clone(), "local_time_zones".to_owned()),
            (once.clone(), "UTC".to_owned())
        ]
    );
    // A far bound is "everything", as clients write it.
    let a = get_with(
        &t,
        "/messages/scheduled_broadcasts?end_time=9999-12-31T23:59:59Z",
        &t.key,
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.body["scheduled_broadcasts"].as_array().map(Vec::len),
        Some(2),
        "{a:?}"
    );
    for query in ["", "?end_time=soon"] {
        let a = get_with(
            &t,
            &format!("/messages/scheduled_broadcasts{query}"),
            &t.key,
        )
        .await;
        assert_eq!(a.status, 400, "{query}: {a:?}");
    }
    let weak =
        t.s.key_for(&t.ws, &[tideway_core::keys::Permission::CampaignsDetails])
            .await;
    let a = get_with(
        &t,
        "/messages/scheduled_broadcasts?end_time=2999-01-01T00:00:00Z",
        &weak,
    )
    .await;
    assert_eq!(a.status, 403, "{a:?}");
}

/// A broadcast of an API-triggered campaign without a `send_id` gets one (Braze's rule), named
/// in the answer and carried by its messages' events; a send to named recipients does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_without_a_send_id_gets_one() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1"}])).await;
    let id = t.campaign(t.webhook_campaign("News", json!({}))).await;
    let a =
        t.s.post(
            "/campaigns/trigger/send",
            &t.key,
            json!({"campaign_id": id, "broadcast": true}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let send_id = a.body["send_id"].as_str().expect("a send_id").to_owned();
    assert_eq!(send_id.len(), 32, "{a:?}");
    let sends = t.wait_events("users.messages.webhook.Send", 1).await;
    assert_eq!(sends[0]["properties"]["send_id"], send_id.as_str());
    let a = t.trigger(&id, json!([{"external_user_id": "u1"}])).await;
    assert_eq!(a.status, 201, "{a:?}");
    assert!(a.body.get("send_id").is_none(), "{a:?}");
}

/// A conversion after a campaign's message is credited to that message: its
/// `users.campaigns.Conversion` carries the message's dispatch, variation and `send_id`, and
/// counts in the campaign's stats and in the send id's series, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversion_is_credited_to_the_message_and_send_id_before_it() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1", "first_name": "Ada"}]))
        .await;
    let id = t
        .campaign(t.webhook_campaign(
            "Upgrade",
            json!({"conversion_events": [{"type": "custom_event", "name": "upgraded", "window_seconds": 86400}]}),
        ))
        .await;
    let a = t
        .s
        .post(
            "/campaigns/trigger/send",
            &t.key,
            json!({"campaign_id": id, "send_id": "promo-7", "recipients": [{"external_user_id": "u1"}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let sends = t.wait_events("users.messages.webhook.Send", 1).await;
    let sent = &sends[0]["properties"];
    let a =
        t.s.post(
            "/users/track",
            &t.key,
            json!({"events": [{"external_id": "u1", "name": "upgraded", "time": now_iso()}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let conversions = t.wait_events("users.campaigns.Conversion", 1).await;
    let p = &conversions[0]["properties"];
    assert_eq!(p["campaign_id"], id.as_str(), "{p}");
    assert_eq!(p["dispatch_id"], sent["dispatch_id"], "{p}");
    assert_eq!(p["send_id"], "promo-7", "{p}");
    assert_eq!(
        p["message_variation_id"], sent["message_variation_id"],
        "{p}"
    );
    assert_eq!(p["conversion_behavior_index"], 0, "{p}");

    let path = format!("/sends/data_series?campaign_id={id}&send_id=promo-7&length=1");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let a = get_with(&t, &path, &t.key).await;
        assert_eq!(a.status, 200, "{a:?}");
        if a.body["data"][0]["conversions"] == 1 {
            assert_eq!(
                a.body["data"][0]["messages"]["webhook"][0]["sent"], 1,
                "{a:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not counted: {a:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = get_with(&t, &format!("/api/v1/campaigns/{id}"), &t.key).await;
    assert_eq!(c.body["campaign"]["stats"]["conversions"], 1, "{c:?}");
    // The same event again converts nothing more: a conversion counts once.
    let a =
        t.s.post(
            "/users/track",
            &t.key,
            json!({"events": [{"external_id": "u1", "name": "upgraded", "time": now_iso()}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(t.events("users.campaigns.Conversion").await.len(), 1);

    // A user whose message failed for good still got the campaign: the conversion is credited
    // to that message.
    t.track(json!([{"external_id": "u2"}])).await;
    t.hooks.answer(&[404]);
    let a = t
        .s
        .post(
            "/campaigns/trigger/send",
            &t.key,
            json!({"campaign_id": id, "send_id": "promo-8", "recipients": [{"external_user_id": "u2"}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    t.wait_events("users.messages.webhook.Failure", 1).await;
    let a =
        t.s.post(
            "/users/track",
            &t.key,
            json!({"events": [{"external_id": "u2", "name": "upgraded", "time": now_iso()}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let conversions = t.wait_events("users.campaigns.Conversion", 2).await;
    let p = &conversions[1]["properties"];
    assert_eq!(p["send_id"], "promo-8", "{p}");
    assert!(p["dispatch_id"].is_string(), "{p}");
    assert_eq!(
        p["message_variation_id"], sent["message_variation_id"],
        "{p}"
    );

    // A control-group user (never sent a message) converts under the control variation.
    let mut holdout = t.webhook_campaign(
        "Holdout",
        json!({"control_percent": 100, "conversion_events": [{"type": "custom_event", "name": "upgraded", "window_seconds": 86400}]}),
    );
    holdout["messages"][0]["percent"] = json!(0);
    let holdout = t.campaign(holdout).await;
    t.track(json!([{"external_id": "u3"}])).await;
    let a = t
        .trigger(&holdout, json!([{"external_user_id": "u3"}]))
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let enrolled = t.wait_events("users.campaigns.EnrollInControl", 1).await;
    let a =
        t.s.post(
            "/users/track",
            &t.key,
            json!({"events": [{"external_id": "u3", "name": "upgraded", "time": now_iso()}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let conversions = t.wait_events("users.campaigns.Conversion", 3).await;
    let p = &conversions[2]["properties"];
    assert_eq!(p["campaign_id"], holdout.as_str(), "{p}");
    assert_eq!(
        p["message_variation_id"], enrolled[0]["properties"]["message_variation_id"],
        "{p}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_campaigns_and_sends_are_refused_naming_the_problem() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1"}])).await;
    let mut bad = t.webhook_campaign("Bad", json!({}));
    bad["messages"][0]["body"] = json!("{% if %}");
    let a = t.s.post("/api/v1/campaigns", &t.key, bad).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("messages[0].body"),
        "{a:?}"
    );
    let long = t.webhook_campaign(&"n".repeat(256), json!({}));
    let a = t.s.post("/api/v1/campaigns", &t.key, long).await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (400, Some("name: must be at most 255 characters")),
        "{a:?}"
    );
    let a = t
        .trigger("no-such-campaign", json!([{"external_user_id": "u1"}]))
        .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["message"], "Invalid Campaign ID");
    let id = t.campaign(t.webhook_campaign("Good", json!({}))).await;
    let a =
        t.s.post(
            "/campaigns/trigger/send",
            &t.key,
            json!({"campaign_id": id}),
        )
        .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["message"], "No Recipients");
    // A segment_id naming no segment would match nobody: refused, nothing queued.
    for (path, body) in [
        (
            "/campaigns/trigger/send",
            json!({"campaign_id": id, "broadcast": true, "segment_id": "nope"}),
        ),
        (
            "/messages/send",
            json!({"segment_id": "nope", "broadcast": true, "messages": {"webhook": {"url": t.hook_url, "body": "x"}}}),
        ),
    ] {
        let a = t.s.post(path, &t.key, body).await;
        assert_eq!(
            (a.status, a.body["message"].as_str()),
            (400, Some("Invalid segment_id")),
            "{path}: {a:?}"
        );
    }
    // An email template stands in for a body on Braze; Tideway says it keeps none.
    let a =
        t.s.post(
            "/messages/send",
            &t.key,
            json!({"external_user_ids": ["u1"], "messages": {"email": {"from": "a@example.com", "email_template_id": "tpl-1"}}}),
        )
        .await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["errors"][0]
            .as_str()
            .unwrap()
            .contains("keeps no email templates"),
        "{a:?}"
    );
    let many: Vec<Value> = (0..51)
        .map(|i| json!({"external_user_id": format!("x{i}")}))
        .collect();
    let a = t.trigger(&id, Value::Array(many)).await;
    assert_eq!(a.status, 400, "{a:?}");
    let a =
        t.s.post(
            "/campaigns/trigger/send",
            &t.key,
            json!({"campaign_id": id, "recipients": "u1"}),
        )
        .await;
    assert_eq!(a.status, 400, "{a:?}");
    // A key without the permission.
    let weak =
        t.s.key_for(&t.ws, &[tideway_core::keys::Permission::UsersTrack])
            .await;
    let a =
        t.s.post(
            "/campaigns/trigger/send",
            &weak,
            json!({"campaign_id": id, "recipients": [{"external_user_id": "u1"}]}),
        )
        .await;
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.body["message"], "Access Denied");
    // A one-off schedule whose time has passed would never send: its launch is refused and
    // it stays a draft.
    let mut past = t.webhook_campaign("Past", json!({}));
    past["delivery"] = json!({"type": "scheduled", "schedule": {"frequency": "once",
        "at": "2020-01-01T00:00:00.000Z"}});
    let a = t.s.post("/api/v1/campaigns", &t.key, past).await;
    assert_eq!(a.status, 201, "{a:?}");
    let past_id = a.body["campaign"]["id"].as_str().unwrap().to_owned();
    let a =
        t.s.post(
            &format!("/api/v1/campaigns/{past_id}/launch"),
            &t.key,
            json!({}),
        )
        .await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("delivery.schedule"),
        "{a:?}"
    );
    let a = get_with(&t, &format!("/api/v1/campaigns/{past_id}"), &t.key).await;
    assert_eq!(a.body["campaign"]["status"], "draft", "{a:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(t.hooks.hits().is_empty(), "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_triggers_respect_reeligibility() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1"}])).await;
    let id = t.campaign(t.webhook_campaign("Once", json!({}))).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = t.s.client.clone();
        let url = format!("{}/campaigns/trigger/send", t.s.base);
        let key = t.key.clone();
        let body = json!({"campaign_id": id, "recipients": [{"external_user_id": "u1"}]});
        tasks.push(tokio::spawn(async move {
            s.post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 201);
    }
    t.wait_hits(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(t.hooks.hits().len(), 1, "a campaign reaches a user once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_caps_hold_across_campaigns_sent_at_once() {
    let t = setup().await;
    let users: Vec<Value> = (0..20)
        .map(|i| json!({"external_id": format!("u{i}")}))
        .collect();
    t.track(Value::Array(users)).await;
    let a =
        t.s.send(
            reqwest::Method::PUT,
            "/api/v1/messaging/settings",
            crate::harness::Auth::Bearer(&t.key),
            Some(
                json!({"frequency_caps": [{"max": 1, "window_seconds": 86400}]})
                    .to_string()
                    .into_bytes(),
            ),
            true,
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let capped = json!({"frequency_capping": true});
    let first = t.campaign(t.webhook_campaign("A", capped.clone())).await;
    let second = t.campaign(t.webhook_campaign("B", capped)).await;
    let recipients: Vec<Value> = (0..20)
        .map(|i| json!({"external_user_id": format!("u{i}")}))
        .collect();
    let (a, b) = tokio::join!(
        t.trigger(&first, Value::Array(recipients.clone())),
        t.trigger(&second, Value::Array(recipients))
    );
    assert_eq!((a.status, b.status), (201, 201));
    t.wait_hits(20).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        t.hooks.hits().len(),
        20,
        "each user gets one message of the two campaigns"
    );
    // The other message of each user is not lost silently: an Abort says why.
    let aborts = t.wait_events("users.messages.webhook.Abort", 20).await;
    assert_eq!(aborts.len(), 20, "{aborts:?}");
    for abort in &aborts {
        assert_eq!(
            abort["properties"]["abort_type"], "frequency_capped",
            "{abort}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_for_concurrent_sends() {
    let t = setup().await;
    let users: Vec<Value> = (0..30)
        .map(|i| json!({"external_id": format!("u{i}")}))
        .collect();
    t.track(Value::Array(users)).await;
    let id = t
        .campaign(t.webhook_campaign("Slow", json!({"rate_limit_per_minute": 10})))
        .await;
    let recipients: Vec<Value> = (0..30)
        .map(|i| json!({"external_user_id": format!("u{i}")}))
        .collect();
    let a = t.trigger(&id, Value::Array(recipients)).await;
    assert_eq!(a.status, 201, "{a:?}");
    t.wait_hits(10).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let sent = t.hooks.hits().len();
    // The bucket starts with 10 and refills one every 6 s.
    assert!(
        (10..=11).contains(&sent),
        "sent {sent} within the first seconds"
    );
}

/// The wall-clock time now, as an ISO 8601 string (events trigger campaigns launched before
/// their time).
fn now_iso() -> String {
    iso_in(0)
}

/// A receiver that never answers in time.
async fn hanging_receiver() -> String {
    let app = axum::Router::new().route(
        "/hook",
        any(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "late"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/hook")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_does_not_slow_another_campaign() {
    let t = setup().await;
    let users: Vec<Value> = (0..300)
        .map(|i| json!({"external_id": format!("u{i}")}))
        .collect();
    for chunk in users.chunks(75) {
        t.track(Value::Array(chunk.to_vec())).await;
    }
    let mut stuck = t.webhook_campaign("Stuck", json!({}));
    stuck["messages"][0]["url"] = json!(hanging_receiver().await);
    let stuck = t.campaign(stuck).await;
    let healthy = t.campaign(t.webhook_campaign("Healthy", json!({}))).await;
    // More sends to the hanging receiver than the dispatcher has slots for one campaign.
    let a =
        t.s.post(
            "/campaigns/trigger/send",
            &t.key,
            json!({"campaign_id": stuck, "broadcast": true}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recipients: Vec<Value> = (0..50)
        .map(|i| json!({"external_user_id": format!("u{i}")}))
        .collect();
    let a = t.trigger(&healthy, Value::Array(recipients)).await;
    assert_eq!(a.status, 201, "{a:?}");
    t.wait_hits(50).await;
    t.wait_events("users.messages.webhook.Send", 50).await;
    // The hanging campaign's sends hold their slots until the 5 s timeout; the healthy ones
    // all went out before any of them timed out (no outcome of the stuck campaign yet).
    let stuck_outcomes: Vec<Value> = t
        .events("users.messages.webhook.Failure")
        .await
        .into_iter()
        .chain(t.events("users.messages.webhook.Retry").await)
        .filter(|e| e["properties"]["campaign_id"] == stuck.as_str())
        .collect();
    assert!(
        stuck_outcomes.is_empty(),
        "the healthy campaign waited for the stuck one: {stuck_outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_trigger_checks_the_audience_when_the_message_goes_out() {
    let t = setup().await;
    t.track(json!([{"external_id": "stays", "plan": "trial"}, {"external_id": "leaves", "plan": "trial"}]))
        .await;
    let mut campaign = t.webhook_campaign("Stuck in trial", json!({}));
    campaign["delivery"] = json!({"type": "action_based", "delay_seconds": 2,
        "triggers": [{"custom_event": {"name": "stuck"}}]});
    campaign["audience"] =
        json!({"filter": {"attribute": {"name": "plan", "op": "equals", "value": "trial"}}});
    t.campaign(campaign).await;
    let a =
        t.s.post(
            "/users/track",
            &t.key,
            json!({"events": [
                {"external_id": "stays", "name": "stuck", "time": now_iso()},
                {"external_id": "leaves", "name": "stuck", "time": now_iso()},
            ]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    // Both were in the audience when they triggered it; one leaves it during the delay.
    t.track(json!([{"external_id": "leaves", "plan": "pro"}]))
        .await;
    t.wait_hits(1).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let hits = t.hooks.hits();
    assert_eq!(hits.len(), 1, "only the user still in the audience");
    let body: Value = serde_json::from_str(&hits[0].body).unwrap();
    assert_eq!(body["name"], "");
    let sends = t.events("users.messages.webhook.Send").await;
    assert_eq!(sends.len(), 1);
    assert_eq!(sends[0]["user"]["external_user_id"], "stays");
}

/// Regression: a trigger cursor started on empty logs used to equal the never-started one, so
/// the next pass "started" it again at the logs' heads and jumped over the first events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_based_campaign_launched_on_empty_logs_sees_the_first_event() {
    let t = setup().await;
    let mut campaign = t.webhook_campaign("First event", json!({}));
    campaign["delivery"] =
        json!({"type": "action_based", "triggers": [{"custom_event": {"name": "first"}}]});
    t.campaign(campaign).await;
    assert_eq!(t.s.store.event_log_head(t.ws.id).await.unwrap(), 0);
    assert_eq!(t.s.store.cohort_changes_head(t.ws.id).await.unwrap(), 0);
    let deadline = Instant::now() + DEADLINE;
    while !t
        .s
        .store
        .trigger_cursor(t.ws.id)
        .await
        .unwrap()
        .is_started()
    {
        assert!(
            Instant::now() < deadline,
            "the trigger cursor never started"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let a =
        t.s.post(
            "/users/track",
            &t.key,
            json!({"events": [{"external_id": "early", "name": "first", "time": now_iso()}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    t.wait_hits(1).await;
    let sends = t.wait_events("users.messages.webhook.Send", 1).await;
    assert_eq!(sends[0]["user"]["external_user_id"], "early");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_time_schedule_reaches_each_user_at_their_wall_clock_time() {
    let t = setup().await;
    t.track(json!([
        {"external_id": "utc"},
        {"external_id": "kiritimati", "time_zone": "Pacific/Kiritimati"},
        {"external_id": "los_angeles", "time_zone": "America/Los_Angeles"},
    ]))
    .await;
    // Two seconds from now, read as a wall-clock time: in UTC that is in two seconds, at
    // UTC+14 it passed 14 hours ago (sent at once), in Los Angeles it is hours away.
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 2_000;
    let mut campaign = t.webhook_campaign("Local", json!({}));
    campaign["messages"][0]["body"] = json!("{\"user\": \"{{${user_id}}}\"}");
    campaign["delivery"] = json!({"type": "scheduled", "schedule": {"frequency": "once",
        "at": tideway_core::clock::Millis(at).to_iso(), "in_local_time": true}});
    let id = t.campaign(campaign).await;
    let hits = t.wait_hits(2).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let mut users: Vec<String> = t
        .hooks
        .hits()
        .iter()
        .map(|h| {
            serde_json::from_str::<Value>(&h.body).unwrap()["user"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    users.sort();
    assert_eq!(users, vec!["kiritimati", "utc"], "{hits:?}");
    let a = get_with(&t, &format!("/api/v1/campaigns/{id}"), &t.key).await;
    assert_eq!(a.body["campaign"]["stats"]["pending"], 1, "{a:?}");
}

/// Waits until the campaign's tracker of `segment` has followed the segment feed to its head
/// as of now (every write acknowledged so far is seen by the trigger engine).
async fn wait_tracker_at_head(t: &Setup, campaign: &str, segment: &str) {
    let head = t.s.store.segment_feed_head(t.ws.id).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let tracker =
            t.s.store
                .segment_tracker(t.ws.id, campaign, segment)
                .await
                .unwrap();
        if let Some(p) = tracker.map(|tr| tr.position)
            && p.event_seq >= head.event_seq
            && p.cohort_change_seq >= head.cohort_change_seq
            && p.user_change_seq >= head.user_change_seq
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the tracker of {campaign} did not reach {head:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Who got which campaign's webhook: (X-Campaign, first name), sorted.
fn deliveries(hits: &[Hit]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = hits
        .iter()
        .map(|h| {
            let body: Value = serde_json::from_str(&h.body).unwrap();
            (
                h.headers["x-campaign"].to_str().unwrap().to_owned(),
                body["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entering_a_segment_triggers_a_campaign_once_or_again_when_reeligible() {
    let t = setup().await;
    let a = t
        .s
        .post(
            "/api/v1/segments",
            &t.key,
            json!({"name": "Pro", "filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let segment = a.body["id"].as_str().unwrap().to_owned();
    t.track(json!([
        {"external_id": "a", "first_name": "A", "plan": "pro"},
        {"external_id": "b", "first_name": "B", "plan": "free"},
        {"external_id": "c", "first_name": "C", "plan": "free"},
    ]))
    .await;

    // A segment that does not exist is refused, naming the place.
    let mut bad = t.webhook_campaign("Nowhere", json!({}));
    bad["delivery"] = json!({"type": "action_based",
        "triggers": [{"segment_entry": {"segment_id": "no-such-segment"}}]});
    let a = t.s.post("/api/v1/campaigns", &t.key, bad).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("delivery.triggers[0].segment_entry.segment_id"),
        "{a:?}"
    );

    let on_entry = json!({"type": "action_based",
        "triggers": [{"segment_entry": {"segment_id": segment}}]});
    let mut once = t.webhook_campaign("Once", json!({}));
    once["delivery"] = on_entry.clone();
    let once = t.campaign(once).await;
    let mut again = t.webhook_campaign("Again", json!({"reeligibility": {"after_seconds": 0}}));
    again["delivery"] = on_entry;
    let again = t.campaign(again).await;
    // Both have looked at the segment: a, in it at launch, does not enter.
    wait_tracker_at_head(&t, &once, &segment).await;
    wait_tracker_at_head(&t, &again, &segment).await;

    t.track(json!([{"external_id": "b", "plan": "pro"}])).await;
    let hits = t.wait_hits(2).await;
    assert_eq!(
        deliveries(&hits),
        [("Again".into(), "B".into()), ("Once".into(), "B".into())]
    );

    // b leaves (seen by both), then enters again: only the re-eligible campaign sends again.
    t.track(json!([{"external_id": "b", "plan": "free"}])).await;
    wait_tracker_at_head(&t, &once, &segment).await;
    wait_tracker_at_head(&t, &again, &segment).await;
    t.track(json!([{"external_id": "b", "plan": "pro"}])).await;
    t.wait_hits(3).await;
    // c enters after b's return: once Once has sent to c, it has acted on b's return too.
    t.track(json!([{"external_id": "c", "plan": "pro"}])).await;
    let hits = t.wait_hits(5).await;
    assert_eq!(
        deliveries(&hits),
        [
            ("Again".into(), "B".into()),
            ("Again".into(), "B".into()),
            ("Again".into(), "C".into()),
            ("Once".into(), "B".into()),
            ("Once".into(), "C".into()),
        ]
    );
    let sends = t.events("users.messages.webhook.Send").await;
    assert!(
        sends.iter().all(|e| e["user"]["external_user_id"] != "a"),
        "a was in the segment before launch: {sends:?}"
    );
}

/// The wall-clock time `ms` from now, ISO 8601.
fn iso_in(ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    tideway_core::clock::Millis(now + ms).to_iso()
}

/// `/messages/schedule/update` replaces a scheduled send's `messages` (with or without a new
/// time), checked as `/messages/send` checks them, keeping its channels; the send then goes out
/// with the new content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_ad_hoc_send_gets_new_messages() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1"}])).await;
    let a =
        t.s.post(
            "/messages/schedule/create",
            &t.key,
            json!({"external_user_ids": ["u1"], "schedule": {"time": iso_in(3_600_000)},
                "messages": {"webhook": {"url": t.hook_url, "body": "old"}}}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.body["schedule_id"].as_str().unwrap().to_owned();
    let update = |body: Value| t.s.post("/messages/schedule/update", &t.key, body);
    for (body, message) in [
        (
            json!({"schedule_id": id, "messages": {"email": {"from": "a@example.com", "subject": "s", "body": "b"}}}),
            "messages must have the channels the send was scheduled with (webhook); to change channels delete the schedule and create it again",
        ),
        (
            json!({"schedule_id": id, "messages": {"webhook": {"url": t.hook_url, "body": "{% if %}"}}}),
            "",
        ),
        (
            json!({"schedule_id": id}),
            "schedule or messages is required",
        ),
    ] {
        let a = update(body.clone()).await;
        assert_eq!(a.status, 400, "{body}: {a:?}");
        if !message.is_empty() {
            assert_eq!(
                (&a.body["message"], &a.body["errors"][0]),
                (&json!("Bad Request"), &json!(message)),
                "{a:?}"
            );
        }
    }
    let a = update(
        json!({"schedule_id": id, "messages": {"webhook": {"url": t.hook_url, "body": "new"}}}),
    )
    .await;
    assert_eq!(a.status, 201, "{a:?}");
    let a = update(json!({"schedule_id": id, "schedule": {"time": iso_in(500)}})).await;
    assert_eq!(a.status, 201, "{a:?}");
    let hits = t.wait_hits(1).await;
    assert_eq!(hits[0].body, "new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_schedules_to_named_users_can_be_moved_and_deleted() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1", "first_name": "Ada"}, {"external_id": "u2"}]))
        .await;
    let moved = t.campaign(t.webhook_campaign("Moved", json!({}))).await;
    let deleted = t.campaign(t.webhook_campaign("Deleted", json!({}))).await;
    let schedule = async |campaign: &str, user: &str| {
        let a =
            t.s.post(
                "/campaigns/trigger/schedule/create",
                &t.key,
                json!({"campaign_id": campaign, "schedule": {"time": iso_in(3_600_000)},
                    "recipients": [{"external_user_id": user}]}),
            )
            .await;
        assert_eq!(a.status, 201, "{a:?}");
        assert_eq!(a.body["dispatch_id"], a.body["schedule_id"]);
        a.body["schedule_id"].as_str().unwrap().to_owned()
    };
    let to_move = schedule(&moved, "u1").await;
    let to_delete = schedule(&deleted, "u2").await;

    // Another campaign's schedule id, or an unknown one, is refused and changes nothing.
    for (campaign, id) in [(&deleted, &to_move), (&moved, &"nope".to_owned())] {
        let a =
            t.s.post(
                "/campaigns/trigger/schedule/update",
                &t.key,
                json!({"campaign_id": campaign, "schedule_id": id, "schedule": {"time": iso_in(1_000)}}),
            )
            .await;
        assert_eq!(a.status, 400, "{a:?}");
        assert_eq!(a.body["message"], "Invalid schedule_id", "{a:?}");
    }
    let a =
        t.s.post(
            "/campaigns/trigger/schedule/delete",
            &t.key,
            json!({"campaign_id": deleted, "schedule_id": to_delete}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let counts = t.s.store.campaign_send_counts(t.ws.id, &deleted).await;
    assert_eq!(
        counts.unwrap().pending,
        0,
        "the deleted schedule's send is gone"
    );
    // A deleted schedule is no longer one: moving or deleting it again is refused.
    for (path, body) in [
        (
            "/campaigns/trigger/schedule/update",
            json!({"campaign_id": deleted, "schedule_id": to_delete, "schedule": {"time": iso_in(1_000)}}),
        ),
        (
            "/campaigns/trigger/schedule/delete",
            json!({"campaign_id": deleted, "schedule_id": to_delete}),
        ),
    ] {
        let a = t.s.post(path, &t.key, body).await;
        assert_eq!(
            (a.status, a.body["message"].as_str()),
            (400, Some("Invalid schedule_id")),
            "{path}"
        );
    }
    let a =
        t.s.post(
            "/campaigns/trigger/schedule/update",
            &t.key,
            json!({"campaign_id": moved, "schedule_id": to_move, "schedule": {"time": iso_in(1_000)}}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let hits = t.wait_hits(1).await;
    assert_eq!(hits[0].headers["x-campaign"], "Moved");
    // The receiver answers before the send is settled: wait for the settlement.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let counts =
            t.s.store
                .campaign_send_counts(t.ws.id, &moved)
                .await
                .unwrap();
        if (counts.pending, counts.sent) == (0, 1) {
            break;
        }
        assert!(Instant::now() < deadline, "not settled: {counts:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // `/messages/schedule/*` to named users: moved, then deleted.
    let a =
        t.s.post(
            "/messages/schedule/create",
            &t.key,
            json!({"external_user_ids": ["u2"], "schedule": {"time": iso_in(3_600_000)},
                "messages": {"webhook": {"url": t.hook_url, "body": "ad hoc"}}}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.body["schedule_id"].as_str().unwrap().to_owned();
    for (path, body) in [
        (
            "/messages/schedule/update",
            json!({"schedule_id": id, "schedule": {"time": iso_in(7_200_000)}}),
        ),
        ("/messages/schedule/delete", json!({"schedule_id": id})),
    ] {
        let a = t.s.post(path, &t.key, body).await;
        assert_eq!(a.status, 201, "{path}: {a:?}");
    }
    // A send to named users now is not a schedule: it cannot be moved.
    let a = t.trigger(&moved, json!([{"external_user_id": "u2"}])).await;
    assert_eq!(a.status, 201, "{a:?}");
    let a =
        t.s.post(
            "/campaigns/trigger/schedule/update",
            &t.key,
            json!({"campaign_id": moved, "schedule_id": a.body["dispatch_id"], "schedule": {"time": iso_in(60_000)}}),
        )
        .await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.body["message"], "Invalid schedule_id", "{a:?}");
    // The deleted schedule took u2's receipt of a once-only campaign and gave it back: u2 may
    // receive that campaign now.
    let a = t
        .trigger(&deleted, json!([{"external_user_id": "u2"}]))
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let deadline = Instant::now() + DEADLINE;
    while !t
        .hooks
        .hits()
        .iter()
        .any(|h| h.headers["x-campaign"] == "Deleted")
    {
        assert!(
            Instant::now() < deadline,
            "the deleted schedule's user never got the campaign"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
