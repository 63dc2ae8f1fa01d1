//! Currents survive `kill -9`: a child `tideway serve` exports to a child `tideway sink` and is
//! SIGKILLed repeatedly mid-stream. At the end the sink holds every logged event at least once,
//! with its original id, and the duplicates are bounded by the batches in flight at each kill
//! (`max_in_flight × batch_size` per kill). Also the Currents management API end to end:
//! create, status, pause/resume, test events, dead-letter listing.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Api, Server, Sink, initial_admin_key, management, open_db};

const DEADLINE: Duration = Duration::from_secs(120);

/// Every event id in the server's log.
fn logged_ids(data_dir: &Path) -> Vec<String> {
    let conn = open_db(data_dir);
    let mut stmt = conn
        .prepare("SELECT event_id FROM event_log ORDER BY seq")
        .unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn track(api: &Api, key: &str, round: usize, n: usize) {
    for chunk in 0..n / 75 {
        let events: Vec<Value> = (0..75)
            .map(|i| json!({"external_id": format!("u{}", (chunk * 75 + i) % 500), "name": format!("e{round}"), "time": "2026-01-01T00:00:00Z"}))
            .collect();
        let (status, body) = api
            .post_ok("/users/track", key, &json!({"events": events}))
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_and_duplicates_stay_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // A slightly slow receiver, so each kill lands mid-stream.
    let sink = Sink::start(
        &tmp.path().join("sink"),
        &["--delay-ms", "3", "--bearer-token", "s3cret"],
    )
    .await;
    let mut server = Server::start(&data, &[]).await;
    let key = initial_admin_key(&data);
    let api = Api::new(&server.url);
    let (batch_size, in_flight) = (10u64, 2u64);
    let (status, current) = management(
        &api,
        reqwest::Method::POST,
        "/api/v1/currents",
        &key,
        Some(json!({"name": "sink", "kind": "heap_export", "endpoint": format!("{}/braze", sink.url), "bearer_token": "s3cret",
            "categories": ["message_engagement", "customer_behavior", "user"], "batch_size": batch_size, "max_in_flight": in_flight,
            "flush_interval_ms": 20, "launch": true})),
    )
    .await;
    assert_eq!(status, 201, "{current}");
    assert_eq!(current["status"], "active");
    assert!(
        current.get("bearer_token").is_none() && current["bearer_token_set"] == true,
        "tokens are never returned"
    );
    let id = current["id"].as_i64().unwrap();

    track(&api, &key, 0, 3_000).await;
    let mut kills = 0u64;
    for round in 1..=5 {
        // Kill once the sink has seen progress since this server started.
        let before = sink.unique().await;
        let started = Instant::now();
        while sink.unique().await < before + 200 {
            assert!(
                started.elapsed() < DEADLINE,
                "no delivery progress in round {round}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.kill9().await;
        kills += 1;
        server = Server::start(&data, &[]).await;
        let api = Api::new(&server.url);
        track(&api, &key, round, 1_500).await;
    }
    let api = Api::new(&server.url);
    let expected = logged_ids(&data);
    let started = Instant::now();
    while (sink.unique().await as usize) < expected.len() {
        assert!(
            started.elapsed() < DEADLINE,
            "the sink has {} of {} events",
            sink.unique().await,
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stored, duplicates) = sink.all().await;
    for id in &expected {
        assert!(stored.contains_key(id), "event {id} never reached the sink");
    }
    assert_eq!(
        stored.len(),
        expected.len(),
        "the sink holds only logged events, with their original ids"
    );
    let bound = kills * in_flight * batch_size;
    eprintln!(
        "{} events, {kills} kills, {duplicates} duplicate deliveries (bound {bound})",
        expected.len()
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates > {bound} (batches in flight at {kills} kills)"
    );

    // The status endpoint reflects it all.
    let (status, got) = management(
        &api,
        reqwest::Method::GET,
        &format!("/api/v1/currents/{id}"),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(got["status"], "active");
    assert!(got["counts"]["delivered"].as_u64().unwrap() >= expected.len() as u64);
    assert_eq!(got["counts"]["dead_lettered"], 0);
    server.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_currents_api_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sink = Sink::start(
        &tmp.path().join("sink"),
        &["--reject-event-type", "users.behaviors.Purchase"],
    )
    .await;
    let server = Server::start(&data, &[]).await;
    let key = initial_admin_key(&data);
    let api = Api::new(&server.url);
    let post = |path: String, body: Value| {
        let api = api.clone();
        let key = key.clone();
        async move { management(&api, reqwest::Method::POST, &path, &key, Some(body)).await }
    };
    let (status, bad) = post(
        "/api/v1/currents".into(),
        json!({"name": "x", "kind": "s3"}),
    )
    .await;
    assert_eq!(
        (status, bad["message"].as_str().unwrap()),
        (400, "kind: must be heap_export, custom_http or heap_track")
    );
    let (status, c) = post(
        "/api/v1/currents".into(),
        json!({"name": "draft", "kind": "custom_http", "endpoint": sink.url, "categories": ["customer_behavior"], "flush_interval_ms": 20}),
    )
    .await;
    assert_eq!((status, c["status"].as_str().unwrap()), (201, "draft"));
    let id = c["id"].as_i64().unwrap();
    assert_eq!(
        post(format!("/api/v1/currents/{id}/resume"), json!({}))
            .await
            .0,
        409,
        "a draft cannot resume"
    );
    let (status, test) = post(format!("/api/v1/currents/{id}/test"), json!({})).await;
    assert_eq!(status, 200);
    assert!(test["events"].as_u64().unwrap() >= 10, "{test}");
    assert_eq!(
        test["status"], 400,
        "the sink refuses the placeholder Purchase"
    );
    let (status, launched) = post(format!("/api/v1/currents/{id}/launch"), json!({})).await;
    assert_eq!(
        (status, launched["status"].as_str().unwrap()),
        (200, "active")
    );
    let (status, _) = api
        .post_ok(
            "/users/track",
            &key,
            &json!({"events": [{"external_id": "a", "name": "x", "time": "2026-01-01T00:00:00Z"}],
                    "purchases": [{"external_id": "a", "product_id": "p", "currency": "USD", "price": 1.0, "time": "2026-01-01T00:00:00Z"}]}),
        )
        .await;
    assert_eq!(status, 201);
    let started = Instant::now();
    let dead = loop {
        let (_, d) = management(
            &api,
            reqwest::Method::GET,
            &format!("/api/v1/currents/{id}/dead_letters"),
            &key,
            None,
        )
        .await;
        if !d["dead_letters"].as_array().unwrap().is_empty() {
            break d;
        }
        assert!(started.elapsed() < DEADLINE, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dead["dead_letters"][0]["reason"], "rejected");
    assert_eq!(dead["dead_letters"][0]["response_status"], 400);
    assert_eq!(
        dead["dead_letters"][0]["event_type"],
        "users.behaviors.Purchase"
    );
    let (status, replay) = post(
        format!("/api/v1/currents/{id}/replay"),
        json!({"dead_letters": "all"}),
    )
    .await;
    assert_eq!(
        (status, replay["replay"]["dead_letters"].as_u64()),
        (202, Some(1))
    );
    let (status, paused) = post(format!("/api/v1/currents/{id}/pause"), json!({})).await;
    assert_eq!(
        (status, paused["status"].as_str().unwrap()),
        (200, "paused")
    );
    let (status, list) =
        management(&api, reqwest::Method::GET, "/api/v1/currents", &key, None).await;
    assert_eq!(
        (status, list["currents"].as_array().unwrap().len()),
        (200, 1)
    );
    let (status, _) = management(
        &api,
        reqwest::Method::DELETE,
        &format!("/api/v1/currents/{id}"),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = management(
        &api,
        reqwest::Method::GET,
        &format!("/api/v1/currents/{id}"),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 404);
    server.terminate().await;
}
