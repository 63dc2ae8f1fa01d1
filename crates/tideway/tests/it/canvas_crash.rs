//! Canvas journeys survive `kill -9` of a `tideway serve` child process: users entered through
//! `/canvas/trigger/send` get the first step's webhook and wait in a Delay; the server is
//! killed while they wait (the journeys are checked to be at the Delay in the database file),
//! restarted on the same data directory, and killed again as soon as the Delay's timers have
//! started firing. After the last restart every user has the next step's webhook: none is
//! lost, and a user who got a step's message twice got the same `Idempotency-Key` twice —
//! the only duplicates are messages that were in flight at a kill (delivered to the receiver,
//! not yet settled as sent in the store, so sent again after the restart). A journey's move
//! itself is never repeated: the second step is queued once per user.
//! No clock is injected into the binary: the Delay is a short real one, and the test waits for
//! what it observes (webhooks, rows), never for a guessed time.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::campaigns::Hooks;
use crate::support::{Api, Server, initial_admin_key, management, open_db};

const USERS: usize = 40;
/// Long enough that entering everyone and sending the first step is done before it ends.
const DELAY_SECONDS: u64 = 6;
const DEADLINE: Duration = Duration::from_secs(60);

/// `(user, step)` of every journey in the data directory's database.
fn journeys(data_dir: &Path) -> Vec<(i64, String)> {
    let conn = open_db(data_dir);
    let mut stmt = conn
        .prepare("SELECT user_seq, step_id FROM canvas_journeys ORDER BY user_seq")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// `(user, dispatch)` pairs with more than one send row: a journey step queued twice.
fn sends_queued_twice(data_dir: &Path) -> Vec<(i64, String)> {
    let conn = open_db(data_dir);
    let mut stmt = conn
        .prepare(
            "SELECT user_seq, dispatch_id FROM sends
             GROUP BY user_seq, dispatch_id HAVING COUNT(*) > 1",
        )
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Hits of one step (the body's `step`), by user: their idempotency keys in arrival order.
fn by_user(hooks: &Hooks, step: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (key, user) in hooks.got.lock().unwrap().iter() {
        if let Some(u) = user.strip_suffix(&format!("@{step}")) {
            out.entry(u.to_owned()).or_default().push(key.clone());
        }
    }
    out
}

async fn wait_step(hooks: &Hooks, step: &str, users: usize) -> HashMap<String, Vec<String>> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = by_user(hooks, step);
        if got.len() >= users {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {users} users got step {step}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_waiting_in_a_delay_get_the_next_step_exactly_once_across_kill9s() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (hooks, hook_url) = Hooks::start(Duration::ZERO).await;
    let server = Server::start(&data, &[]).await;
    let key = initial_admin_key(&data);
    let api = Api::new(&server.url);
    let users: Vec<String> = (0..USERS).map(|i| format!("crash-{i}")).collect();
    for chunk in users.chunks(50) {
        let attributes: Vec<_> = chunk.iter().map(|u| json!({"external_id": u})).collect();
        let (status, body) = api
            .post_ok("/users/track", &key, &json!({"attributes": attributes}))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let body = |step: &str| format!("{{\"user\": \"{{{{${{user_id}}}}}}@{step}\"}}");
    let (status, canvas) = management(
        &api,
        reqwest::Method::POST,
        "/api/v1/canvases",
        &key,
        Some(json!({
            "name": "Crash",
            "entry": {"type": "api_triggered"},
            "steps": [
                {"id": "first", "type": "message", "next": "wait",
                 "message": {"channel": "webhook", "url": hook_url, "body": body("first")}},
                {"id": "wait", "type": "delay", "delay": {"seconds": DELAY_SECONDS}, "next": "second"},
                {"id": "second", "type": "message",
                 "message": {"channel": "webhook", "url": hook_url, "body": body("second")}}
            ]
        })),
    )
    .await;
    assert_eq!(status, 201, "{canvas}");
    let id = canvas["canvas"]["id"].as_str().unwrap().to_owned();
    let (status, launched) = management(
        &api,
        reqwest::Method::POST,
        &format!("/api/v1/canvases/{id}/launch"),
        &key,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{launched}");
    for chunk in users.chunks(50) {
        let recipients: Vec<_> = chunk
            .iter()
            .map(|u| json!({"external_user_id": u}))
            .collect();
        let (status, body) = api
            .post_ok(
                "/canvas/trigger/send",
                &key,
                &json!({"canvas_id": id, "recipients": recipients}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    wait_step(&hooks, "first", USERS).await;

    // Kill 1: everyone is waiting in the Delay (a row each, at the step).
    server.kill9().await;
    let waiting = journeys(&data);
    assert_eq!(waiting.len(), USERS, "every journey is a row");
    assert!(
        waiting.iter().all(|(_, step)| step == "wait"),
        "everyone was waiting in the Delay at the kill: {waiting:?}"
    );

    // Restart; kill 2 as soon as the Delay's timers start firing (messages in flight).
    let server = Server::start(&data, &[]).await;
    wait_step(&hooks, "second", 1).await;
    server.kill9().await;

    // Restart: every user gets the second step; a second copy is a resend of one that was in
    // flight at kill 2 (the same idempotency key), never a second send.
    let server = Server::start(&data, &[]).await;
    wait_step(&hooks, "second", USERS).await;
    // The journeys end with their last step: once none is left, every send is queued.
    let deadline = Instant::now() + DEADLINE;
    while !journeys(&data).is_empty() {
        assert!(
            Instant::now() < deadline,
            "journeys left after the last step"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        sends_queued_twice(&data),
        Vec::new(),
        "a journey step queued twice"
    );
    let second = by_user(&hooks, "second");
    assert_eq!(second.len(), USERS);
    for (user, keys) in &second {
        assert!(
            keys.iter().all(|k| k == &keys[0] && !k.is_empty()),
            "{user} got the second step twice under different keys: {keys:?}"
        );
    }
    // The first step's messages may have been in flight at kill 1 (received, not yet
    // settled as sent): a copy carries the same key.
    let first = by_user(&hooks, "first");
    assert_eq!(first.len(), USERS);
    for (user, keys) in &first {
        assert!(
            keys.iter().all(|k| k == &keys[0] && !k.is_empty()),
            "{user} got the first step twice under different keys: {keys:?}"
        );
    }
    let (status, detail) = management(
        &Api::new(&server.url),
        reqwest::Method::GET,
        &format!("/api/v1/canvases/{id}"),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 200, "{detail}");
    let steps = detail["canvas"]["step_stats"].as_array().unwrap();
    let second_step = steps.iter().find(|s| s["id"] == "second").unwrap();
    assert_eq!(second_step["entered"], USERS, "{detail}");
    assert!(server.terminate().await, "a clean stop");
}
