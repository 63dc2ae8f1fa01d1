//! Canvas over HTTP with the engine running: the "Trial – stuck" journey end to end — a
//! Canvas created and launched through `/api/v1/canvases`, users entering through the partner
//! cohort API, an email at once, a three-day Delay, a Decision Split on `plan` (a webhook for
//! Pro, an email for the others), and an exit for whoever performs `upgraded` at any step —
//! with a real webhook receiver and SMTP server. The three days pass by starting a second
//! engine over the same store whose injected clock is three days ahead: a node restarted
//! later, finding users waiting in the Delay (their timers are rows, not memory), fires their
//! late timers at once. Plus bad definitions refused with the place named.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tideway_core::clock::Millis;
use tideway_core::egress::EgressPolicy;
use tideway_core::keys::Secret;
use tideway_currents::Clock;
use tideway_messaging::dispatcher::{Channels, Tracking};
use tideway_messaging::email::{SmtpSender, SmtpUrl};
use tideway_messaging::engine::{Engine, EngineConfig};
use tideway_messaging::tracking::{TrackingKey, TrackingUrls};
use tideway_messaging::webhook::WebhookSender;

use crate::messaging::setup;

const DEADLINE: Duration = Duration::from_secs(20);
const NOW: Millis = Millis(1_750_000_000_000);

fn trial(hook_url: &str) -> Value {
    json!({
        "name": "Trial – stuck",
        "tags": ["trial"],
        "entry": {"type": "action_based", "triggers": [{"cohort_entry": {"partner": "heap", "cohort_id": "trial-stuck"}}]},
        "exit_criteria": {"exception_events": [{"custom_event": {"name": "upgraded"}}]},
        "conversion_events": [{"type": "custom_event", "name": "upgraded"}],
        "steps": [
            {"id": "remind", "name": "Reminder", "type": "message", "next": "wait",
             "message": {"channel": "email", "from": "Trial <trial@example.com>", "subject": "Stuck, {{${first_name}}}?", "body": "<p>Need a hand?</p>"}},
            {"id": "wait", "name": "Three days", "type": "delay", "delay": {"seconds": 259200}, "next": "plan"},
            {"id": "plan", "name": "On Pro?", "type": "decision_split",
             "filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}, "yes": "hook", "no": "mail"},
            {"id": "hook", "name": "Tell sales", "type": "message",
             "message": {"channel": "webhook", "url": hook_url, "body": "{\"user\": \"{{${user_id}}}\", \"canvas\": \"{{canvas.${name}}}\"}"}},
            {"id": "mail", "name": "Second reminder", "type": "message",
             "message": {"channel": "email", "from": "Trial <trial@example.com>", "subject": "Still stuck?", "body": "<p>Again</p>"}}
        ]
    })
}

/// Creates the Canvas and launches it; its id.
async fn launched(t: &crate::messaging::Setup, def: Value) -> String {
    let a = t.s.post("/api/v1/canvases", &t.key, def).await;
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.body["canvas"]["id"].as_str().unwrap().to_owned();
    let a =
        t.s.post(&format!("/api/v1/canvases/{id}/launch"), &t.key, json!({}))
            .await;
    assert_eq!(a.status, 200, "{a:?}");
    id
}

fn now_ms() -> i64 {
    Clock::system().now().0
}

pub(crate) async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trial_stuck_journey_runs_end_to_end_across_a_restart() {
    let t = setup().await;
    t.track(json!([
        {"external_id": "u1", "plan": "pro", "first_name": "Ada", "email": "u1@example.com"},
        {"external_id": "u2", "plan": "free", "first_name": "Bo", "email": "u2@example.com"},
        {"external_id": "u3", "plan": "free", "first_name": "Cy", "email": "u3@example.com"},
    ]))
    .await;
    let a =
        t.s.post("/api/v1/canvases", &t.key, trial(&t.hook_url))
            .await;
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.body["canvas"]["id"].as_str().unwrap().to_owned();
    assert_eq!(a.body["canvas"]["version"], 1);
    let a =
        t.s.post(&format!("/api/v1/canvases/{id}/launch"), &t.key, json!({}))
            .await;
    assert_eq!(a.status, 200, "{a:?}");
    // The scan starts from the logs' heads once the Canvas is active.
    let store = std::sync::Arc::clone(&t.s.store);
    let ws = t.ws.id;
    until("the Canvas cursor", async || {
        store
            .canvas_cursor(ws)
            .await
            .unwrap()
            .is_started()
            .then_some(())
    })
    .await;

    // Cohort entry through the partner API.
    let partner =
        t.s.store
            .partner_api_key("heap", Secret::new("heap-partner-key".into()), NOW)
            .await
            .unwrap();
    t.s.store
        .create_import_key(t.ws.id, "heap", &Secret::new("import-secret".into()), NOW)
        .await
        .unwrap();
    let body = json!({
        "partner_api_key": partner.expose(), "client_secret": "import-secret",
        "cohort_id": "trial-stuck",
        "cohort_changes": [{"aliases": [], "device_ids": [], "user_ids": ["u1", "u2", "u3"]}]
    });
    let a =
        t.s.send(
            reqwest::Method::POST,
            "/partners/heap/cohorts/users",
            crate::harness::Auth::None,
            Some(body.to_string().into_bytes()),
            true,
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");

    // Everyone enters and gets the reminder at once, then waits in the Delay.
    let entries = t.wait_events("users.canvas.Entry", 3).await;
    for e in &entries {
        assert_eq!(e["properties"]["canvas_id"], id.as_str());
        assert_eq!(e["properties"]["canvas_step_id"], "remind");
        assert_eq!(e["properties"]["in_control_group"], false);
        assert!(e["properties"]["canvas_variation_id"].is_string());
    }
    let sends = t.wait_events("users.messages.email.Send", 3).await;
    for s in &sends {
        assert_eq!(s["properties"]["canvas_id"], id.as_str());
        assert_eq!(s["properties"]["canvas_step_id"], "remind");
        assert_eq!(s["properties"]["canvas_step_name"], "Reminder");
    }
    // Opening the step's email logs an Open with the same Canvas fields as its Send.
    let mails = t.smtp.wait_for(1, DEADLINE).await;
    let html = mails[0].html().expect("an HTML part");
    let pixel = html
        .split('"')
        .find(|p| p.starts_with(&t.s.base) && p.contains("/t/o/"))
        .expect("an open pixel")
        .to_owned();
    assert_eq!(t.s.client.get(pixel).send().await.unwrap().status(), 200);
    let opens = t.wait_events("users.messages.email.Open", 1).await;
    assert_eq!(opens[0]["properties"]["canvas_id"], id.as_str());
    assert_eq!(opens[0]["properties"]["canvas_step_id"], "remind");
    assert_eq!(opens[0]["properties"]["canvas_step_name"], "Reminder");
    let first =
        t.s.events_named(&t.ws, "users.canvasstep.Progression")
            .await;
    assert!(
        first
            .iter()
            .any(|p| p["properties"]["is_canvas_entry"] == true)
    );
    assert!(
        first
            .iter()
            .any(|p| p["properties"]["canvas_step_id"] == "remind"
                && p["properties"]["next_step_id"] == "wait"
                && p["properties"]["progression_type"] == "advance")
    );

    // u3 upgrades while waiting: converts and exits at once.
    let a = t
        .s
        .post(
            "/users/track",
            &t.key,
            json!({"events": [{"external_id": "u3", "name": "upgraded", "time": Millis(now_ms()).to_iso()}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let exits = t.wait_events("users.canvas.exit.PerformedEvent", 1).await;
    assert_eq!(exits[0]["properties"]["canvas_step_id"], "wait");
    assert_eq!(exits[0]["user"]["external_user_id"], "u3");
    let conv = t.wait_events("users.canvas.Conversion", 1).await;
    assert_eq!(conv[0]["properties"]["conversion_behavior_index"], 0);

    // Three days later: a node whose clock is three days ahead (a restart after the delay)
    // finds u1 and u2 waiting and fires their late timers at once.
    let later = Clock::starting_at(Millis(now_ms() + 259_200_000 + 60_000));
    let smtp_url = t.smtp.url();
    let audiences = tideway_server::standalone_audiences(std::sync::Arc::clone(&t.s.store));
    let _restarted = Engine::start(
        std::sync::Arc::clone(&t.s.store),
        audiences,
        Channels {
            webhook: WebhookSender::new(EgressPolicy::default(), Duration::from_secs(5)).unwrap(),
            smtp: Some(SmtpSender::new(&SmtpUrl::parse(&smtp_url).unwrap()).unwrap()),
        },
        Some(Tracking {
            key: TrackingKey::new([7; 32]),
            urls: TrackingUrls::new(&t.s.base),
        }),
        later,
        EngineConfig::default(),
    );
    let hits = t.wait_hits(1).await;
    let hook: Value = serde_json::from_str(&hits[0].body).unwrap();
    assert_eq!(hook, json!({"user": "u1", "canvas": "Trial – stuck"}));
    let sends = t.wait_events("users.messages.email.Send", 4).await;
    assert!(
        sends
            .iter()
            .any(|s| s["properties"]["canvas_step_id"] == "mail"
                && s["user"]["external_user_id"] == "u2")
    );
    let ended = until("two journeys at the end of their path", async || {
        let p =
            t.s.events_named(&t.ws, "users.canvasstep.Progression")
                .await;
        let n = p
            .iter()
            .filter(|p| p["properties"]["exit_reason"] == "end_of_path")
            .count();
        (n == 2).then_some(p)
    })
    .await;
    assert!(
        ended
            .iter()
            .any(|p| p["properties"]["exit_reason"] == "exception_event")
    );
    // Nothing more: exactly one webhook, four emails.
    assert_eq!(t.hooks.hits().len(), 1);

    // Per-step counts.
    let a =
        t.s.send(
            reqwest::Method::GET,
            &format!("/api/v1/canvases/{id}"),
            crate::harness::Auth::Bearer(&t.key),
            None,
            false,
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let steps = a.body["canvas"]["step_stats"].as_array().unwrap().clone();
    let step = |id: &str| steps.iter().find(|s| s["id"] == id).unwrap().clone();
    assert_eq!(step("remind")["entered"], 3);
    assert_eq!(
        step("remind")["messages"]["pending"].as_u64().unwrap()
            + step("remind")["messages"]["sent"].as_u64().unwrap(),
        3
    );
    assert_eq!(step("wait")["entered"], 3);
    assert_eq!(step("wait")["exited"], 1);
    assert_eq!(step("wait")["in_step"], 0);
    assert_eq!(step("hook")["entered"], 1);
    assert_eq!(step("mail")["entered"], 1);
    assert_eq!(a.body["canvas"]["entries"], 3);

    // Braze's details.
    let d =
        t.s.send(
            reqwest::Method::GET,
            &format!("/canvas/details?canvas_id={id}"),
            crate::harness::Auth::Bearer(&t.key),
            None,
            false,
        )
        .await;
    assert_eq!(d.status, 200, "{d:?}");
    assert_eq!(d.body["steps"].as_array().unwrap().len(), 5);
    assert_eq!(d.body["schedule_type"], "action_based");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_canvases_are_refused_naming_the_place_and_nothing_is_written() {
    let t = setup().await;
    let mut cycle = trial(&t.hook_url);
    cycle["steps"][3]["next"] = json!("wait");
    let a = t.s.post("/api/v1/canvases", &t.key, cycle).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.body["errors"][0]["field"], "steps[1]");
    let mut liquid = trial(&t.hook_url);
    liquid["steps"][0]["message"]["subject"] = json!("{% if %}");
    let a = t.s.post("/api/v1/canvases", &t.key, liquid).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.body["errors"][0]["field"], "steps[0].message.subject");
    let a =
        t.s.post("/api/v1/canvases", &t.key, json!({"name": "x"}))
            .await;
    assert_eq!(a.status, 400, "{a:?}");
    // A blank first step id would be saved and then fail to load (a 500 on every read).
    let mut blank = trial(&t.hook_url);
    blank["steps"][0]["id"] = json!("\u{3000} ");
    let a = t.s.post("/api/v1/canvases", &t.key, blank).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.body["errors"][0]["field"], "steps[0].id");
    let mut endless = trial(&t.hook_url);
    endless["reentry"] = json!({"after_seconds": i64::MAX});
    let a = t.s.post("/api/v1/canvases", &t.key, endless).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.body["errors"][0]["field"], "reentry.after_seconds");
    assert_eq!(t.s.store.list_canvases(t.ws.id).await.unwrap().len(), 0);
    let a =
        t.s.post(
            "/canvas/trigger/send",
            &t.key,
            json!({"canvas_id": "nope", "recipients": [{"external_user_id": "u1"}]}),
        )
        .await;
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(
        a.body["message"],
        "canvas_id must be a string of the Canvas api identifier"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_scheduled_entries_carry_entry_properties_into_liquid() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1", "plan": "pro"}, {"external_id": "u2", "plan": "free"}]))
        .await;
    let api = json!({
        "name": "API",
        "entry": {"type": "api_triggered"},
        "steps": [{"id": "hook", "type": "message", "message": {"channel": "webhook", "url": t.hook_url,
            "body": "{\"p\": \"{{canvas_entry_properties.${product}}}\", \"c\": \"{{context.${size}}}\", \"step\": \"{{campaign.${name}}}\"}"}}]
    });
    let a = t.s.post("/api/v1/canvases", &t.key, api).await;
    assert_eq!(a.status, 201, "{a:?}");
    let id = a.body["canvas"]["id"].as_str().unwrap().to_owned();
    // Not launched: accepted with Braze's notice, nobody enters.
    let body = json!({"canvas_id": id, "canvas_entry_properties": {"product": "shoes"},
        "recipients": [{"external_user_id": "u1", "context": {"size": "42"}}]});
    let a = t.s.post("/canvas/trigger/send", &t.key, body.clone()).await;
    assert_eq!(a.status, 201, "{a:?}");
    assert!(
        a.body["notice"].as_str().unwrap().contains("paused"),
        "{a:?}"
    );
    let a =
        t.s.post(&format!("/api/v1/canvases/{id}/launch"), &t.key, json!({}))
            .await;
    assert_eq!(a.status, 200, "{a:?}");
    let a = t.s.post("/canvas/trigger/send", &t.key, body).await;
    assert_eq!(a.status, 201, "{a:?}");
    let hits = t.wait_hits(1).await;
    let got: Value = serde_json::from_str(&hits[0].body).unwrap();
    assert_eq!(got, json!({"p": "shoes", "c": "42", "step": "hook"}));

    // A scheduled Canvas: at its occurrence its whole entry audience (Pro users) enters.
    let at = Millis(now_ms() + 1_500).to_iso();
    let scheduled = json!({
        "name": "Scheduled",
        "entry": {"type": "scheduled", "schedule": {"frequency": "once", "at": at}},
        "audience": {"filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}},
        "steps": [{"id": "s", "type": "message", "message": {"channel": "webhook", "url": t.hook_url, "body": "scheduled {{${user_id}}}"}}]
    });
    let a = t.s.post("/api/v1/canvases", &t.key, scheduled).await;
    assert_eq!(a.status, 201, "{a:?}");
    let sid = a.body["canvas"]["id"].as_str().unwrap().to_owned();
    let a =
        t.s.post(&format!("/api/v1/canvases/{sid}/launch"), &t.key, json!({}))
            .await;
    assert_eq!(a.status, 200, "{a:?}");
    let hits = t.wait_hits(2).await;
    assert_eq!(hits[1].body, "scheduled u1");
    let c = until("the occurrence to be used up", async || {
        let c = t.s.store.canvas(t.ws.id, &sid).await.unwrap().unwrap();
        c.next_run.is_none().then_some(c)
    })
    .await;
    assert_eq!(c.entries, 1);
    assert_eq!(t.hooks.hits().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_and_scheduled_entries_enter_in_chunks_and_can_be_moved_or_cancelled() {
    let mut engine = EngineConfig::default();
    // Two users per entry transaction, so a three-user broadcast takes two chunks.
    engine.canvas.entry_chunk = 2;
    let t = crate::messaging::setup_with(engine).await;
    t.track(json!([
        {"external_id": "u1", "plan": "pro", "tier": "gold"},
        {"external_id": "u2", "plan": "pro", "tier": "gold"},
        {"external_id": "u3", "plan": "pro", "tier": "gold"},
        {"external_id": "u4", "plan": "pro", "tier": "silver"},
        {"external_id": "u5", "plan": "free", "tier": "gold"},
    ]))
    .await;
    let def = json!({
        "name": "API",
        "entry": {"type": "api_triggered"},
        "audience": {"filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}},
        "steps": [{"id": "hook", "type": "message", "message": {"channel": "webhook", "url": t.hook_url,
            "body": "{{${user_id}}} {{context.${k}}}"}}]
    });
    let id = launched(&t, def).await;

    // Braze's errors: a recipients list with broadcast, and nobody named at all.
    for (body, message) in [
        (
            json!({"canvas_id": id, "broadcast": true, "recipients": [{"external_user_id": "u1"}]}),
            "Bad Request",
        ),
        (json!({"canvas_id": id}), "No Recipients"),
        (
            json!({"canvas_id": id, "broadcast": false}),
            "No Recipients",
        ),
    ] {
        let a = t.s.post("/canvas/trigger/send", &t.key, body).await;
        assert_eq!(a.status, 400, "{a:?}");
        assert_eq!(a.body["message"], message, "{a:?}");
    }

    // A broadcast narrowed by `audience`: the entry audience (Pro) ∩ gold = u1, u2, u3.
    let gold = json!({"custom_attribute": {"custom_attribute_name": "tier", "comparison": "equals", "value": "gold"}});
    let a =
        t.s.post(
            "/canvas/trigger/send",
            &t.key,
            json!({"canvas_id": id, "broadcast": true, "audience": gold, "context": {"k": "all"}}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let broadcast = a.body["dispatch_id"].as_str().unwrap().to_owned();
    let hits = t.wait_hits(3).await;
    let mut bodies: Vec<String> = hits.iter().map(|h| h.body.clone()).collect();
    bodies.sort();
    assert_eq!(bodies, ["u1 all", "u2 all", "u3 all"]);
    let store = std::sync::Arc::clone(&t.s.store);
    let ws = t.ws.id;
    until("the broadcast's expansion to end", async || {
        let d = store.dispatch(ws, &broadcast).await.unwrap().unwrap();
        d.expanding_after.is_none().then_some(())
    })
    .await;
    assert_eq!(t.s.store.canvas(ws, &id).await.unwrap().unwrap().entries, 3);

    // A scheduled entry of u4, moved later once; a second one (u5 is outside the entry
    // audience anyway) is cancelled.
    let soon = Millis(now_ms() + 1_000).to_iso();
    let a =
        t.s.post(
            "/canvas/trigger/schedule/create",
            &t.key,
            json!({"canvas_id": id, "schedule": {"time": soon},
                "recipients": [{"external_user_id": "u4", "context": {"k": "later"}}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let schedule = a.body["schedule_id"].as_str().unwrap().to_owned();
    assert_eq!(a.body["dispatch_id"], schedule.as_str());
    let moved = Millis(now_ms() + 1_500).to_iso();
    for (body, status, message) in [
        (
            json!({"canvas_id": id, "schedule_id": "nope", "schedule": {"time": moved}}),
            400,
            Some("Invalid schedule_id"),
        ),
        (
            json!({"canvas_id": "other", "schedule_id": schedule, "schedule": {"time": moved}}),
            400,
            Some("Invalid schedule_id"),
        ),
        (
            json!({"canvas_id": id, "schedule_id": schedule, "schedule": {"time": "2001-01-01T00:00:00Z"}}),
            400,
            None,
        ),
        (
            json!({"canvas_id": id, "schedule_id": schedule, "schedule": {"time": moved}}),
            201,
            None,
        ),
    ] {
        let a =
            t.s.post("/canvas/trigger/schedule/update", &t.key, body)
                .await;
        assert_eq!(a.status, status, "{a:?}");
        if let Some(m) = message {
            assert_eq!(a.body["message"], m, "{a:?}");
        }
    }
    let d = t.s.store.dispatch(ws, &schedule).await.unwrap().unwrap();
    assert_eq!(d.not_before.map(Millis::to_iso), Some(moved));
    let later = Millis(now_ms() + 3_600_000).to_iso();
    let a =
        t.s.post(
            "/canvas/trigger/schedule/create",
            &t.key,
            json!({"canvas_id": id, "schedule": {"time": later}, "broadcast": true}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let cancelled = a.body["schedule_id"].as_str().unwrap().to_owned();
    let a =
        t.s.post(
            "/canvas/trigger/schedule/delete",
            &t.key,
            json!({"canvas_id": id, "schedule_id": cancelled}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(
        t.s.store
            .dispatch(ws, &cancelled)
            .await
            .unwrap()
            .unwrap()
            .expanding_after,
        None
    );

    let hits = t.wait_hits(4).await;
    assert_eq!(hits[3].body, "u4 later");
    until("the scheduled entry to end", async || {
        let d = store.dispatch(ws, &schedule).await.unwrap().unwrap();
        d.expanding_after.is_none().then_some(())
    })
    .await;
    assert_eq!(t.s.store.canvas(ws, &id).await.unwrap().unwrap().entries, 4);
    assert_eq!(t.hooks.hits().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entering_a_segment_enters_a_canvas_once() {
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
        {"external_id": "a", "plan": "pro"},
        {"external_id": "b", "plan": "free"},
    ]))
    .await;
    let def = |segment: &str| {
        json!({
            "name": "On Pro",
            "entry": {"type": "action_based", "triggers": [{"segment_entry": {"segment_id": segment}}]},
            "steps": [{"id": "hook", "type": "message", "message": {"channel": "webhook", "url": t.hook_url,
                "body": "entered {{${user_id}}}"}}]
        })
    };
    let a = t.s.post("/api/v1/canvases", &t.key, def("nope")).await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("entry.triggers[0].segment_entry.segment_id"),
        "{a:?}"
    );
    let id = launched(&t, def(&segment)).await;
    // The first look records who is in already (a does not enter).
    let store = std::sync::Arc::clone(&t.s.store);
    let ws = t.ws.id;
    until("the Canvas's segment tracker", async || {
        store
            .segment_tracker(ws, &id, &segment)
            .await
            .unwrap()
            .map(|_| ())
    })
    .await;
    t.track(json!([{"external_id": "b", "plan": "pro"}])).await;
    let hits = t.wait_hits(1).await;
    assert_eq!(hits[0].body, "entered b");
    // b leaves and comes back: entered once ever (no re-entry), so nothing more; a later
    // entrant proves the tracker moved past b's return.
    t.track(json!([{"external_id": "b", "plan": "free"}])).await;
    t.track(json!([{"external_id": "b", "plan": "pro"}])).await;
    t.track(json!([{"external_id": "c", "plan": "pro"}])).await;
    let hits = t.wait_hits(2).await;
    assert_eq!(hits[1].body, "entered c");
    let c = until("two entries", async || {
        let c = store.canvas(ws, &id).await.unwrap().unwrap();
        (c.entries == 2).then_some(c)
    })
    .await;
    assert_eq!(c.entries, 2);
    assert_eq!(t.hooks.hits().len(), 2);
}

/// Regression: a Canvas cursor started on empty logs used to equal the never-started one, so
/// the next scan "started" it again at the logs' heads and jumped over the first events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canvas_launched_on_empty_logs_enters_on_the_first_event() {
    let t = setup().await;
    let def = json!({
        "name": "First event",
        "entry": {"type": "action_based", "triggers": [{"custom_event": {"name": "first"}}]},
        "steps": [{"id": "hook", "name": "Hello", "type": "message", "message": {"channel": "webhook", "url": t.hook_url,
            "body": "hello {{${user_id}}}"}}]
    });
    let id = launched(&t, def).await;
    let store = std::sync::Arc::clone(&t.s.store);
    let ws = t.ws.id;
    assert_eq!(store.event_log_head(ws).await.unwrap(), 0);
    assert_eq!(store.cohort_changes_head(ws).await.unwrap(), 0);
    until("the Canvas cursor", async || {
        store
            .canvas_cursor(ws)
            .await
            .unwrap()
            .is_started()
            .then_some(())
    })
    .await;
    let a =
        t.s.post(
            "/users/track",
            &t.key,
            json!({"events": [{"external_id": "early", "name": "first", "time": Millis(now_ms()).to_iso()}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let hits = t.wait_hits(1).await;
    assert_eq!(hits[0].body, "hello early");
    let entries = t.wait_events("users.canvas.Entry", 1).await;
    assert_eq!(entries[0]["properties"]["canvas_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversion_after_the_journey_ended_counts_once_within_the_window() {
    let t = setup().await;
    t.track(json!([{"external_id": "u1"}, {"external_id": "u2"}]))
        .await;
    // Something in the event log, so the scan's start at its head is visible.
    let a = t
        .s
        .post(
            "/users/track",
            &t.key,
            json!({"events": [{"external_id": "u2", "name": "signed_up", "time": Millis(now_ms()).to_iso()}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let def = json!({
        "name": "Convert later",
        "entry": {"type": "api_triggered"},
        "conversion_events": [{"type": "custom_event", "name": "bought", "window_seconds": 86400}],
        "steps": [{"id": "hook", "name": "Offer", "type": "message", "message": {"channel": "webhook", "url": t.hook_url,
            "body": "offer {{${user_id}}}"}}]
    });
    let id = launched(&t, def).await;
    let store = std::sync::Arc::clone(&t.s.store);
    let ws = t.ws.id;
    until("the Canvas cursor", async || {
        store
            .canvas_cursor(ws)
            .await
            .unwrap()
            .is_started()
            .then_some(())
    })
    .await;
    let a =
        t.s.post(
            "/canvas/trigger/send",
            &t.key,
            json!({"canvas_id": id, "recipients": [{"external_user_id": "u1"}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    // The journey is one Message step: it ends at once (end of path).
    until("u1's journey to end", async || {
        let p =
            t.s.events_named(&t.ws, "users.canvasstep.Progression")
                .await;
        p.iter()
            .any(|p| p["properties"]["exit_reason"] == "end_of_path")
            .then_some(())
    })
    .await;
    t.wait_hits(1).await;

    // u1 buys twice after leaving, u2 (never entered) once: one conversion, u1's, at the
    // step the journey ended at.
    let at = Millis(now_ms()).to_iso();
    let a =
        t.s.post(
            "/users/track",
            &t.key,
            json!({"events": [
                {"external_id": "u1", "name": "bought", "time": at},
                {"external_id": "u2", "name": "bought", "time": at},
                {"external_id": "u1", "name": "bought", "time": at},
            ]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let conv = t.wait_events("users.canvas.Conversion", 1).await;
    assert_eq!(conv[0]["user"]["external_user_id"], "u1");
    assert_eq!(conv[0]["properties"]["canvas_id"], id.as_str());
    assert_eq!(conv[0]["properties"]["canvas_step_id"], "hook");
    assert_eq!(conv[0]["properties"]["conversion_behavior_index"], 0);
    // Later purchases do not count again: once the scan has read past a marker event, still
    // one conversion.
    let a = t
        .s
        .post(
            "/users/track",
            &t.key,
            json!({"events": [{"external_id": "u1", "name": "bought", "time": Millis(now_ms()).to_iso()}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let head = t.s.store.event_log_head(ws).await.unwrap();
    until("the scan past the last purchase", async || {
        (store.canvas_cursor(ws).await.unwrap().events >= head).then_some(())
    })
    .await;
    assert_eq!(
        t.s.events_named(&t.ws, "users.canvas.Conversion")
            .await
            .len(),
        1
    );
    let a =
        t.s.send(
            reqwest::Method::GET,
            &format!("/api/v1/canvases/{id}"),
            crate::harness::Auth::Bearer(&t.key),
            None,
            false,
        )
        .await;
    assert_eq!(a.body["canvas"]["step_stats"][0]["conversions"], 1, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_time_occurrence_runs_each_users_first_step_at_their_wall_clock_time() {
    let t = setup().await;
    t.track(json!([
        {"external_id": "tokyo", "time_zone": "Asia/Tokyo"},
        {"external_id": "new_york", "time_zone": "America/New_York"},
    ]))
    .await;
    // The occurrence's wall-clock time, 20 h from now (whole minutes): Tokyo (UTC+9) reaches
    // it 9 h earlier than UTC, New York (UTC-4/-5) 4 or 5 h later.
    let wall = (now_ms() + 20 * 3_600_000) / 60_000 * 60_000;
    let def = json!({
        "name": "Local",
        "entry": {"type": "scheduled", "schedule": {"frequency": "once", "at": Millis(wall).to_iso(), "in_local_time": true}},
        "steps": [{"id": "s", "type": "message", "message": {"channel": "webhook", "url": t.hook_url, "body": "local {{${user_id}}}"}}]
    });
    let id = launched(&t, def).await;
    let c = t.s.store.canvas(t.ws.id, &id).await.unwrap().unwrap();
    assert_eq!(c.next_run, Some(Millis(wall)));

    // A node whose clock is a minute past Tokyo's time: the occurrence is expanded (14 h
    // early), both users enter, only Tokyo's first step is due.
    let clock = Clock::starting_at(Millis(wall - 9 * 3_600_000 + 60_000));
    let smtp_url = t.smtp.url();
    let audiences = tideway_server::standalone_audiences(std::sync::Arc::clone(&t.s.store));
    let _ahead = Engine::start(
        std::sync::Arc::clone(&t.s.store),
        audiences,
        Channels {
            webhook: WebhookSender::new(EgressPolicy::default(), Duration::from_secs(5)).unwrap(),
            smtp: Some(SmtpSender::new(&SmtpUrl::parse(&smtp_url).unwrap()).unwrap()),
        },
        Some(Tracking {
            key: TrackingKey::new([7; 32]),
            urls: TrackingUrls::new(&t.s.base),
        }),
        clock,
        EngineConfig::default(),
    );
    let hits = t.wait_hits(1).await;
    assert_eq!(hits[0].body, "local tokyo");
    let store = std::sync::Arc::clone(&t.s.store);
    let ws = t.ws.id;
    let c = until("both entries", async || {
        let c = store.canvas(ws, &id).await.unwrap().unwrap();
        (c.entries == 2).then_some(c)
    })
    .await;
    assert_eq!(c.next_run, None, "the only occurrence is used up");
    // New York waits at its first step for its own 09:00-equivalent.
    let counts = t.s.store.canvas_step_counts(ws, &id).await.unwrap();
    assert_eq!(counts[0].in_step, 1, "{counts:?}");
    assert_eq!(t.hooks.hits().len(), 1);
}
