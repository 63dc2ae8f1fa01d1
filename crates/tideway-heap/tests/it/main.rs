//! `tideway sink` over real HTTP: the receiver rules of `reference/heap.md` §4 (token first,
//! empty batches, dedupe, malformed elements), its views, and its fault injection.

// Tests talk to servers and receivers they started on loopback: plain clients are right here.
#![allow(clippy::disallowed_methods)]

use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use tideway_heap::sink::{self, Faults, RunningSink, SinkConfig};

async fn start(token: Option<&str>, faults: Faults) -> (RunningSink, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SinkConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
    config.bearer_token = token.map(str::to_owned);
    config.faults = faults;
    (sink::start(config).await.unwrap(), dir)
}

fn event(id: &str, t: &str) -> Value {
    json!({"event_type": t, "id": id, "time": 2_033_802_504, "user": {}, "properties": {"x": "<script>alert(1)</script>"}})
}

async fn post(
    s: &RunningSink,
    auth: Option<&str>,
    body: &str,
) -> (u16, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{}/currents", s.addr))
        .body(body.to_owned());
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.headers().clone())
}

#[tokio::test]
async fn the_token_is_checked_first_even_for_an_empty_body() {
    let (s, _d) = start(Some("t0k3n=="), Faults::default()).await;
    let (code, headers) = post(&s, None, "").await;
    assert_eq!(code, 401);
    assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer");
    assert_eq!(
        post(&s, Some("Bearer wrong"), "{\"events\":[]}").await.0,
        401
    );
    assert_eq!(post(&s, Some("Basic t0k3n=="), "").await.0, 401);
    assert_eq!(
        post(&s, Some("bearer t0k3n=="), "").await.0,
        200,
        "scheme is case-insensitive; empty body is a no-op"
    );
    assert_eq!(
        post(&s, Some("Bearer t0k3n=="), "{\"events\":[]}").await.0,
        200
    );
    assert_eq!(
        post(&s, Some("Bearer t0k3n=="), "{}").await.0,
        200,
        "no events key: no-op"
    );
    assert_eq!(s.state.stats().unauthorized.load(Ordering::Relaxed), 3);
    assert_eq!(s.state.store().totals().await.unwrap().unique, 0);
}

#[tokio::test]
async fn batches_are_stored_once_per_id_and_malformed_elements_skipped() {
    let (s, _d) = start(None, Faults::default()).await;
    let batch = json!({"events": [event("a", "users.behaviors.CustomEvent"), event("b", "users.messages.email.Send"), 3, {"id": "c"}]});
    assert_eq!(post(&s, None, &batch.to_string()).await.0, 200);
    let again = json!({"events": [event("a", "users.behaviors.CustomEvent"), event("d", "future.Unknown")], "extra": true});
    assert_eq!(post(&s, None, &again.to_string()).await.0, 200);
    assert_eq!(post(&s, None, "not json").await.0, 400);
    assert_eq!(post(&s, None, "{\"events\": {}}").await.0, 400);
    let totals = s.state.store().totals().await.unwrap();
    assert_eq!((totals.unique, totals.duplicates), (3, 1));
    assert_eq!(s.state.stats().malformed_skipped.load(Ordering::Relaxed), 2);
    let page: Value = reqwest::get(format!("http://{}/events?limit=2", s.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["unique"], 3);
    assert_eq!(page["counts"]["users.behaviors.CustomEvent"], 1);
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["events"][0]["id"], "a");
    assert_eq!(page["events"][0]["deliveries"], 2);
    let next: Value = reqwest::get(format!(
        "http://{}/events?after={}",
        s.addr, page["next_after"]
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(next["events"][0]["id"], "d");
    let html = reqwest::get(format!("http://{}/", s.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("users.messages.email.Send"));
    assert!(
        html.contains("&lt;script&gt;") && !html.contains("<script>alert"),
        "event bodies are escaped"
    );
}

#[tokio::test]
async fn fault_injection() {
    let (s, _d) = start(
        Some("t"),
        Faults {
            fail_first: 2,
            ..Faults::default()
        },
    )
    .await;
    let body = json!({"events": [event("a", "x")]}).to_string();
    assert_eq!(
        post(&s, None, &body).await.0,
        401,
        "the token check comes before injected faults"
    );
    assert_eq!(post(&s, Some("Bearer t"), &body).await.0, 500);
    assert_eq!(post(&s, Some("Bearer t"), &body).await.0, 500);
    assert_eq!(post(&s, Some("Bearer t"), &body).await.0, 200);

    let (s, _d) = start(
        None,
        Faults {
            status: Some(429),
            ..Faults::default()
        },
    )
    .await;
    assert_eq!(post(&s, None, &body).await.0, 429);

    let (s, _d) = start(
        None,
        Faults {
            fail_rate: 1.0,
            ..Faults::default()
        },
    )
    .await;
    assert_eq!(post(&s, None, &body).await.0, 500);
    let (s, _d) = start(
        None,
        Faults {
            fail_rate: 0.5,
            ..Faults::default()
        },
    )
    .await;
    let mut fails = 0;
    for _ in 0..200 {
        if post(&s, None, &body).await.0 == 500 {
            fails += 1;
        }
    }
    assert!((60..140).contains(&fails), "{fails} of 200 at rate 0.5");

    let faults = Faults {
        max_events: Some(1),
        reject_event_type: Some("bad".into()),
        ..Faults::default()
    };
    let (s, _d) = start(None, faults).await;
    assert_eq!(
        post(
            &s,
            None,
            &json!({"events": [event("a", "x"), event("b", "x")]}).to_string()
        )
        .await
        .0,
        413
    );
    assert_eq!(
        post(
            &s,
            None,
            &json!({"events": [event("c", "bad")]}).to_string()
        )
        .await
        .0,
        400
    );
    assert_eq!(
        post(&s, None, &json!({"events": [event("d", "x")]}).to_string())
            .await
            .0,
        200
    );

    let (s, _d) = start(
        None,
        Faults {
            delay_ms: 300,
            ..Faults::default()
        },
    )
    .await;
    let t = std::time::Instant::now();
    assert_eq!(post(&s, None, &body).await.0, 200);
    assert!(t.elapsed() >= std::time::Duration::from_millis(300));
}

#[tokio::test]
async fn stored_events_survive_a_restart_and_keep_deduplicating() {
    let dir = tempfile::tempdir().unwrap();
    let config = SinkConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().to_path_buf());
    let s = sink::start(config.clone()).await.unwrap();
    assert_eq!(
        post(&s, None, &json!({"events": [event("a", "x")]}).to_string())
            .await
            .0,
        200
    );
    s.stop().await;
    let s = sink::start(config).await.unwrap();
    assert_eq!(
        post(
            &s,
            None,
            &json!({"events": [event("a", "x"), event("b", "x")]}).to_string()
        )
        .await
        .0,
        200
    );
    let totals = s.state.store().totals().await.unwrap();
    assert_eq!((totals.unique, totals.duplicates), (2, 1));
}

#[tokio::test]
async fn the_sink_keeps_its_files_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("sink-data");
    let config = SinkConfig::new("127.0.0.1:0".parse().unwrap(), dir.clone());
    let s = sink::start(config).await.unwrap();
    let body = json!({"events": [event("e1", "users.messages.email.Send")]}).to_string();
    assert_eq!(post(&s, None, &body).await.0, 200);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "the sink's directory");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert!(files >= 2, "sink.sqlite and its WAL at least");
}
