//! Every status-code rule and header of the connector contract, against `tideway sink` (and
//! the capture receiver where a rule needs a response the sink does not make, such as
//! `Retry-After` or a hang).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tideway_core::clock::Millis;
use tideway_core::currents_store::{
    CurrentStatus, CurrentsStore, DeadLetterPick, DeadLetterReason, StatusChange,
};
use tideway_currents::spec::parse_spec;
use tideway_heap::sink::Faults;

use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_batches_with_the_contract_headers() {
    let h = Harness::new().await;
    let (sink, _d) = sink_with(Faults::default(), Some("0p3n5354m3==")).await;
    let mut s = spec(&url(sink.addr));
    s["bearer_token"] = json!("0p3n5354m3==");
    let c = h.current(s).await;
    let ids = h.append(250).await;
    let c = h
        .wait(&c, "250 delivered", |c| c.counters.delivered >= 250)
        .await;
    assert_eq!(c.counters.delivered, 250);
    assert_eq!(c.status, CurrentStatus::Active);
    let got: HashSet<String> = sink_ids(&sink).await.into_iter().collect();
    assert_eq!(
        got,
        ids.iter().cloned().collect::<HashSet<_>>(),
        "every event, with its original id"
    );
    let headers = sink.state.stats().last_headers();
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("content-type").as_deref(), Some("application/json"));
    assert_eq!(get("braze-currents-version").as_deref(), Some("1"));
    assert_eq!(get("authorization").as_deref(), Some("Bearer <redacted>"));
    assert_eq!(
        sink.state
            .stats()
            .unauthorized
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // 250 events in batches of at most 100 (+ the empty credential probe).
    assert!(
        sink.state
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_hold_at_most_batch_size_events_and_keep_the_query_string() {
    let h = Harness::new().await;
    let cap = Capture::start().await;
    let mut s = spec(&format!(
        "http://{}/in?your_app_group_key=Brand%20A",
        cap.addr
    ));
    s["batch_size"] = json!(7);
    let c = h.current(s).await;
    h.append(30).await;
    h.wait(&c, "30 delivered", |c| c.counters.delivered >= 30)
        .await;
    let seen = cap.seen();
    assert!(seen.iter().all(|s| s.ids().len() <= 7));
    assert!(seen.iter().all(|s| s.path == "/in"));
    assert!(
        seen.iter()
            .all(|s| s.headers.get("authorization").is_none()),
        "no token, no Authorization header"
    );
    assert_eq!(
        seen[0].body,
        json!({"events": []}),
        "the first request is the credential probe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_halts_the_current_and_enable_replays_the_kept_queue() {
    let h = Harness::new().await;
    let (sink, _d) = sink_with(Faults::default(), Some("right")).await;
    let mut s = spec(&url(sink.addr));
    s["bearer_token"] = json!("wrong");
    let c = h.current(s.clone()).await;
    let c = h
        .wait(&c, "halted", |c| {
            c.status == CurrentStatus::HaltedCredentials
        })
        .await;
    assert_eq!(
        c.last_error.as_ref().and_then(|e| e.status),
        Some(401),
        "the empty probe got 401"
    );
    let ids = h.append(40).await;
    assert!(sink_ids(&sink).await.is_empty());
    // Fix the credentials and re-enable: the queue kept while halted is delivered.
    s["bearer_token"] = json!("right");
    h.store
        .update_current(h.ws.id, c.id, parse_spec(&s).unwrap(), Millis(2))
        .await
        .unwrap();
    h.store
        .change_status(c.id, StatusChange::Enable, None, Millis(3))
        .await
        .unwrap();
    h.exporter().refresh();
    let c = h
        .wait(&c, "40 delivered after enable", |c| {
            c.counters.delivered >= 40
        })
        .await;
    assert_eq!(c.status, CurrentStatus::Active);
    assert_eq!(sink_ids(&sink).await.len(), ids.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_mid_stream_halts_without_losing_the_batch() {
    let h = Harness::new().await;
    let cap = Capture::start().await;
    cap.push([Reply::Status(200), Reply::Status(401)]); // the probe passes, the first batch is refused
    let c = h.current(spec(&url(cap.addr))).await;
    let ids = h.append(10).await;
    let c = h
        .wait(&c, "halted", |c| {
            c.status == CurrentStatus::HaltedCredentials
        })
        .await;
    assert_eq!(c.counters.delivered, 0);
    h.store
        .change_status(c.id, StatusChange::Enable, None, Millis(3))
        .await
        .unwrap();
    h.exporter().refresh();
    h.wait(&c, "replayed", |c| c.counters.delivered >= 10).await;
    let acked: HashSet<String> = cap.acked_ids().into_iter().collect();
    assert!(ids.iter().all(|i| acked.contains(i)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_403_and_404_halt_too() {
    for code in [403, 404] {
        let h = Harness::new().await;
        let (sink, _d) = sink_with(
            Faults {
                status: Some(code),
                ..Faults::default()
            },
            None,
        )
        .await;
        let c = h.current(spec(&url(sink.addr))).await;
        let c = h
            .wait(&c, "halted", |c| {
                c.status == CurrentStatus::HaltedCredentials
            })
            .await;
        assert_eq!(c.last_error.unwrap().status, Some(code));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_400_splits_and_dead_letters_only_the_refused_event_which_can_be_replayed() {
    let h = Harness::new().await;
    let faults = Faults {
        reject_event_type: Some("users.behaviors.Purchase".into()),
        ..Faults::default()
    };
    let (sink, _d) = sink_with(faults, None).await;
    let c = h.current(spec(&url(sink.addr))).await;
    let mut ids = h.append(20).await;
    let bad = h.append_purchase().await;
    ids.extend(h.append(20).await);
    let c = h
        .wait(&c, "resolved", |c| {
            c.counters.delivered + c.counters.dead_lettered >= 41
        })
        .await;
    assert_eq!((c.counters.delivered, c.counters.dead_lettered), (40, 1));
    let dead = h.store.list_dead_letters(c.id, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.event_id, bad);
    assert_eq!(dead[0].reason, DeadLetterReason::Rejected);
    assert_eq!(dead[0].response_status, Some(400));
    assert!(
        dead[0]
            .response_body
            .as_deref()
            .unwrap()
            .contains("malformed")
    );
    assert_eq!(sink_ids(&sink).await.len(), 40);
    // Point the Current at a receiver that takes it, and replay the dead letter.
    let (good, _d2) = sink_with(Faults::default(), None).await;
    h.store
        .update_current(
            h.ws.id,
            c.id,
            parse_spec(&spec(&url(good.addr))).unwrap(),
            Millis(5),
        )
        .await
        .unwrap();
    h.exporter().refresh();
    assert_eq!(
        h.store
            .replay_dead_letters(c.id, DeadLetterPick::All)
            .await
            .unwrap(),
        1
    );
    h.exporter().poke(c.id).await;
    h.wait(&c, "dead letter replayed", |c| c.counters.delivered >= 41)
        .await;
    assert!(
        h.store
            .list_dead_letters(c.id, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(sink_ids(&good).await, vec![bad]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_413_halves_until_batches_fit_and_a_single_413_is_dead_lettered() {
    let h = Harness::new().await;
    let (sink, _d) = sink_with(
        Faults {
            max_events: Some(30),
            ..Faults::default()
        },
        None,
    )
    .await;
    let c = h.current(spec(&url(sink.addr))).await;
    h.append(200).await;
    let c = h
        .wait(&c, "200 delivered", |c| c.counters.delivered >= 200)
        .await;
    assert_eq!(c.counters.dead_lettered, 0);
    assert_eq!(sink_ids(&sink).await.len(), 200);
    assert!(
        sink.state
            .stats()
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "some batches got 413"
    );

    let h = Harness::new().await;
    let (sink, _d) = sink_with(
        Faults {
            max_events: Some(0),
            ..Faults::default()
        },
        None,
    )
    .await;
    let c = h.current(spec(&url(sink.addr))).await;
    h.append(3).await;
    let c = h
        .wait(&c, "3 dead letters", |c| c.counters.dead_lettered >= 3)
        .await;
    let dead = h.store.list_dead_letters(c.id, 0, 10).await.unwrap();
    assert!(dead.iter().all(
        |d| d.reason == DeadLetterReason::TooLargeForReceiver && d.response_status == Some(413)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_backoff_until_delivered() {
    let h = Harness::new().await;
    let (sink, _d) = sink_with(
        Faults {
            fail_first: 5,
            ..Faults::default()
        },
        None,
    )
    .await;
    let c = h.current(spec(&url(sink.addr))).await;
    h.append(50).await;
    let c = h
        .wait(&c, "50 delivered", |c| c.counters.delivered >= 50)
        .await;
    assert!(c.counters.retried >= 50, "{:?}", c.counters);
    assert_eq!(c.failing_since, None, "a success ends the failure streak");
    assert_eq!(
        c.last_error.unwrap().status,
        Some(500),
        "the last error is kept for the status page"
    );
    assert_eq!(sink_ids(&sink).await.len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_429_honours_retry_after_and_other_codes_are_retried() {
    let h = Harness::new().await;
    let cap = Capture::start().await;
    cap.push([
        Reply::Status(200),
        Reply::RetryAfter(429, 1),
        Reply::Status(302),
        Reply::Status(418),
    ]);
    let c = h.current(spec(&url(cap.addr))).await;
    h.append(5).await;
    h.wait(&c, "delivered", |c| c.counters.delivered >= 5).await;
    let seen = cap.seen();
    let batch: Vec<_> = seen.iter().filter(|s| !s.ids().is_empty()).collect();
    assert_eq!(
        batch.iter().map(|s| s.status).collect::<Vec<_>>(),
        [429, 302, 418, 200]
    );
    assert!(
        batch[1].at - batch[0].at >= Duration::from_secs(1),
        "waited for Retry-After"
    );
}

/// A receiver on loopback that answers every request with `head` followed by `body`, then
/// keeps the connection open without another byte (`hang`) or closes it.
async fn raw_receiver(head: &'static str, body: Vec<u8>, hang: bool) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                // The request is small: read until its head and body have arrived.
                let mut request = Vec::new();
                let mut buf = [0u8; 65536];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().to_owned())
                            })
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body).await;
                if hang {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                }
            });
        }
    });
    addr
}

/// The status decides, and only the start of an answer's body is read: a 2xx whose body
/// breaks off is delivered (not re-sent without end), and an error whose body never ends is
/// that error at once, with a bounded body to show, not a timeout after the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_start_of_an_answers_body_is_read() {
    let h = Harness::new().await;
    let cut_short = raw_receiver(
        "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        b"hello".to_vec(),
        false,
    )
    .await;
    let c = h.current(spec(&url(cut_short))).await;
    h.append(30).await;
    let c = h
        .wait(&c, "30 delivered", |c| c.counters.delivered >= 30)
        .await;
    assert_eq!(
        (c.counters.delivered, c.counters.retried),
        (30, 0),
        "{c:#?}"
    );

    let endless = raw_receiver(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 3000000000\r\n\r\n",
        vec![b'x'; 65536],
        true,
    )
    .await;
    let mut s = spec(&url(endless));
    // A timeout the test never reaches: the old reading of the whole body ended only there.
    s["retry"]["request_timeout_ms"] = json!(600_000);
    let c = h.current(s).await;
    h.append(1).await;
    let c = h
        .wait(&c, "the 500 seen", |c| {
            c.last_error.as_ref().is_some_and(|e| e.status == Some(500))
        })
        .await;
    let message = &c.last_error.as_ref().unwrap().message;
    assert!(message.len() < 8192, "{} bytes", message.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_refused_connections_are_retried() {
    let h = Harness::new().await;
    let cap = Capture::start().await;
    cap.push([Reply::Status(200), Reply::Hang(Duration::from_millis(600))]);
    let mut s = spec(&url(cap.addr));
    s["retry"]["request_timeout_ms"] = json!(150);
    let c = h.current(s).await;
    h.append(5).await;
    let c = h
        .wait(&c, "delivered after a timeout", |c| {
            c.counters.delivered >= 5
        })
        .await;
    assert!(c.counters.retried >= 5);
    // A port nobody listens on.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let h2 = Harness::new().await;
    let c2 = h2.current(spec(&url(free))).await;
    h2.append(3).await;
    let c2 = h2
        .wait(&c2, "failing", |c| {
            c.failing_since.is_some() && c.counters.retried >= 6
        })
        .await;
    assert_eq!(c2.status, CurrentStatus::Active);
    assert!(
        c2.last_error
            .unwrap()
            .message
            .starts_with("connection error")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_the_size_limit_are_dead_lettered_unsent() {
    let mut config = fast_config();
    config.max_event_bytes = 2_000;
    let h = Harness::with_config(config).await;
    let (sink, _d) = sink_with(Faults::default(), None).await;
    let c = h.current(spec(&url(sink.addr))).await;
    h.append(5).await;
    let mut props = Map::new();
    props.insert("blob".into(), json!("x".repeat(5_000)));
    let (user, big) = custom_event(1, "big", &props);
    let big_id = big.id.0.clone();
    h.store
        .append_events(h.ws.id, vec![(Some(user), big)])
        .await
        .unwrap();
    h.append(5).await;
    let c = h
        .wait(&c, "resolved", |c| {
            c.counters.delivered + c.counters.dead_lettered >= 11
        })
        .await;
    assert_eq!((c.counters.delivered, c.counters.dead_lettered), (10, 1));
    let dead = h.store.list_dead_letters(c.id, 0, 10).await.unwrap();
    assert_eq!(
        (dead[0].event.event_id.as_str(), dead[0].reason),
        (big_id.as_str(), DeadLetterReason::Oversized)
    );
    assert!(!sink_ids(&sink).await.contains(&big_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transformations_redact_and_hash_before_sending() {
    let h = Harness::new().await;
    let cap = Capture::start().await;
    let mut s = spec(&url(cap.addr));
    s["transformations"] = json!([{"field": "external_user_id", "action": "hash"}, {"field": "name", "action": "remove"}]);
    let c = h.current(s).await;
    h.append(1).await;
    h.wait(&c, "delivered", |c| c.counters.delivered >= 1).await;
    let event = cap
        .seen()
        .into_iter()
        .find(|s| !s.ids().is_empty())
        .unwrap()
        .body["events"][0]
        .clone();
    assert_eq!(event["properties"]["name"], "[REDACTED]");
    use sha2::Digest;
    assert_eq!(
        event["user"]["external_user_id"],
        hex::encode(sha2::Sha256::digest(b"u0"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_filters_event_types() {
    let h = Harness::new().await;
    let (sink, _d) = sink_with(Faults::default(), None).await;
    let mut s = spec(&url(sink.addr));
    s.as_object_mut().unwrap().remove("categories");
    s["event_types"] = json!(["users.behaviors.Purchase"]);
    let c = h.current(s).await;
    h.append(30).await;
    let p = h.append_purchase().await;
    h.append(30).await;
    let c = h
        .wait(&c, "the purchase", |c| c.counters.delivered >= 1)
        .await;
    assert_eq!(sink_ids(&sink).await, vec![p]);
    // The position moves past the other types too (no lag left).
    let c = h
        .wait(&c, "position at the head", |x| x.position >= 61)
        .await;
    assert_eq!(
        h.store
            .lag(c.id, Some(vec!["users.behaviors.Purchase".into()]))
            .await
            .unwrap()
            .events,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_events_sends_one_placeholder_per_selected_type_within_the_cap() {
    let mut config = fast_config();
    config.test_event_cap = 5;
    let h = Harness::with_config(config).await;
    let (sink, _d) = sink_with(Faults::default(), None).await;
    let mut s = spec(&url(sink.addr));
    s["categories"] = json!(["user"]);
    let c = h.current(s).await;
    let report = h.exporter().send_test(&c).await.unwrap();
    assert_eq!(
        (report.events, report.status, report.accepted),
        (3, Some(200), true)
    );
    let totals = sink.state.store().totals().await.unwrap();
    let mut types: Vec<String> = totals.per_type.into_iter().map(|(t, _)| t).collect();
    types.sort();
    assert_eq!(
        types,
        [
            "users.UserDeleteRequest",
            "users.UserOrphan",
            "users.profile.Update"
        ]
    );
    assert!(
        h.exporter().send_test(&c).await.is_err(),
        "over the cap of 5 per window"
    );
}

/// Logs a delete request of a user with no external id: an event `heap_track` cannot carry.
async fn append_without_identity(h: &Harness) {
    let anon = tideway_core::currents::CurrentsEvent::delete_request(
        tideway_core::ids::EventId("no-identity".into()),
        Millis(1_700_000_000_000),
        &tideway_core::ids::BrazeId::from_bytes([3; 12]),
        "ag",
    );
    h.store
        .append_events(h.ws.id, vec![(None, anon)])
        .await
        .unwrap();
}

/// A `heap_track` Current to `cap` for custom events and delete requests (the latter carry no
/// identity, so `heap_track` cannot send them).
fn heap_track_spec(cap: &Capture) -> Value {
    json!({"name": "heap", "kind": "heap_track", "endpoint": format!("http://{}", cap.addr),
        "event_types": ["users.behaviors.CustomEvent", "users.UserDeleteRequest"], "flush_interval_ms": 20,
        "heap": {"app_id": "11", "prefix": true}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_track_forwards_mapped_events_and_counts_skips() {
    let h = Harness::new().await;
    let cap = Capture::start().await;
    let c = h.current(heap_track_spec(&cap)).await;
    let ids = h.append(4).await;
    append_without_identity(&h).await;
    let c = h
        .wait(&c, "forwarded", |c| {
            c.counters.delivered + c.counters.skipped >= 5
        })
        .await;
    assert_eq!((c.counters.delivered, c.counters.skipped), (4, 1));
    let seen = cap.seen();
    assert!(
        seen.iter()
            .all(|s| s.path == "/api/track" && s.headers.get("braze-currents-version").is_none())
    );
    let events: Vec<_> = seen
        .iter()
        .flat_map(|s| s.body["events"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(seen[0].body["app_id"], "11");
    let keys: Vec<&str> = events
        .iter()
        .map(|e| e["idempotency_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(events[0]["event"], "braze-users.behaviors.CustomEvent");
    assert_eq!(events[0]["identity"], "u0");
    assert_eq!(events[0]["timestamp"], "2023-11-14T22:13:20+00:00");
}

/// An event `heap_track` cannot carry (no identity) was never in the request, so a 413 or 400
/// for the request does not dead-letter it: it is skipped, as on a 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_track_skips_rather_than_dead_letters_what_it_did_not_send() {
    let h = Harness::new().await;
    let cap = Capture::start().await;
    cap.push([Reply::Status(413)]);
    let c = h.current(heap_track_spec(&cap)).await;
    append_without_identity(&h).await;
    let ids = h.append(1).await;
    let c = h
        .wait(&c, "settled", |c| {
            c.counters.dead_lettered + c.counters.skipped >= 2
        })
        .await;
    assert_eq!(
        (c.counters.dead_lettered, c.counters.skipped),
        (1, 1),
        "{c:#?}"
    );
    let dead = h.store.list_dead_letters(c.id, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event.event_id.as_str(), ids[0].as_str());
}

/// Delivers 25 events, stores a replay of a window holding them all, signals the consumer or
/// not (`poke`), and checks each event went out again once and the window is gone.
async fn replay_a_window_of_delivered_events(poke: bool) {
    let h = Harness::new().await;
    let (sink, _d) = sink_with(Faults::default(), None).await;
    let c = h.current(spec(&url(sink.addr))).await;
    let ids = h.append(25).await;
    let c = h
        .wait(&c, "delivered", |c| c.counters.delivered >= 25)
        .await;
    // Make sure the log clock has covered them, then replay everything so far.
    let clock = h.exporter().clock();
    h.store
        .tick_log_clock(clock.now(), 86_400_000)
        .await
        .unwrap();
    let w = h
        .store
        .replay_window(c.id, Millis(0), clock.now())
        .await
        .unwrap()
        .expect("a window");
    assert_eq!(w.to_seq, c.position);
    if poke {
        h.exporter().poke(c.id).await;
    }
    h.wait(&c, "replayed", |c| c.counters.delivered >= 50).await;
    assert!(
        h.store.next_replay_window(c.id).await.unwrap().is_none(),
        "a finished window is removed"
    );
    let totals = sink.state.store().totals().await.unwrap();
    assert_eq!(
        (totals.unique, totals.duplicates),
        (ids.len() as u64, ids.len() as u64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_time_window_re_sends_delivered_events() {
    replay_a_window_of_delivered_events(true).await;
}

/// A replay asked of another node — a row in the shared store, with no signal to this node's
/// consumer — still runs: the consumer looks for replays every rescan interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_asked_of_another_node_runs_without_a_signal() {
    replay_a_window_of_delivered_events(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_ordering_keeps_each_users_events_in_log_order() {
    let h = Harness::new().await;
    let cap = Capture::start().await;
    cap.push([
        Reply::Status(200),
        Reply::Status(500),
        Reply::Status(400),
        Reply::Status(200),
        Reply::Status(503),
    ]);
    let mut s = spec(&url(cap.addr));
    s["per_user_ordering"] = json!(true);
    s["batch_size"] = json!(10);
    let c = h.current(s).await;
    let ids = h.append(100).await;
    h.wait(&c, "delivered", |c| c.counters.delivered >= 100)
        .await;
    let order: Vec<String> = cap.acked_ids();
    let pos = |id: &String| order.iter().position(|x| x == id).unwrap();
    for user in 0..5 {
        let theirs: Vec<usize> = ids.iter().skip(user).step_by(5).map(pos).collect();
        assert!(
            theirs.windows(2).all(|w| w[0] < w[1]),
            "user {user} out of order"
        );
    }
}
