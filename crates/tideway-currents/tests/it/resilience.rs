//! Outage and isolation: a receiver down for a long (time-compressed) stretch gets everything
//! once it is back, with counters and status right at every stage; one Current's dead or slow
//! receiver does not slow another Current.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use tideway_core::clock::Millis;
use tideway_core::currents_store::{CurrentStatus, CurrentsStore, StatusChange};
use tideway_heap::sink::{self, Faults, SinkConfig};

use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_then_recovery_with_counters_and_status_at_every_stage() {
    let h = Harness::new().await;
    let alerts = Capture::start().await;
    let sink_dir = tempfile::tempdir().unwrap();
    let start_sink = |addr: std::net::SocketAddr| {
        let dir = sink_dir.path().to_path_buf();
        async move { sink::start(SinkConfig::new(addr, dir)).await.unwrap() }
    };
    let first = start_sink("127.0.0.1:0".parse().unwrap()).await;
    let addr = first.addr;
    let mut s = spec(&url(addr));
    // Time-compressed windows: 5 days → 1.5 s, 7 days → 3 s, 24 h → 0.6 s.
    s["failure_window_ms"] = json!(1_500);
    s["retention_ms"] = json!(3_000);
    s["alert_after_ms"] = json!(600);
    s["alert_webhook"] = json!(format!("http://{}/alerts", alerts.addr));
    let c = h.current(s).await;

    // Stage 1: healthy.
    h.append(100).await;
    let c = h
        .wait(&c, "stage 1 delivered", |c| c.counters.delivered == 100)
        .await;
    assert_eq!(
        (
            c.status,
            c.failing_since,
            c.counters.retried,
            c.counters.dropped
        ),
        (CurrentStatus::Active, None, 0, 0)
    );

    // Stage 2: the receiver goes down; events queue up, retries are counted, status stays active.
    first.stop().await;
    h.append(200).await;
    let c = h
        .wait(&c, "stage 2 failing", |c| {
            c.failing_since.is_some() && c.counters.retried >= 200
        })
        .await;
    assert_eq!(
        (c.status, c.counters.delivered, c.counters.dead_lettered),
        (CurrentStatus::Active, 100, 0)
    );
    assert!(
        c.last_error
            .as_ref()
            .unwrap()
            .message
            .starts_with("connection error")
    );
    assert_eq!(
        h.store.lag(c.id, None).await.unwrap().events,
        200,
        "every undelivered event is still queued"
    );

    // Stage 3: back within the failure window: everything arrives, the streak ends.
    let second = start_sink(addr).await;
    let c = h
        .wait(&c, "stage 3 delivered", |c| c.counters.delivered == 300)
        .await;
    assert_eq!(
        (c.status, c.failing_since, c.counters.dropped),
        (CurrentStatus::Active, None, 0)
    );
    assert_eq!(sink_ids(&second).await.len(), 300);
    assert_eq!(h.store.lag(c.id, None).await.unwrap().events, 0);

    // Stage 4: down for longer than the failure window: disabled, loudly.
    second.stop().await;
    h.append(50).await;
    let c = h
        .wait(&c, "stage 4 disabled", |c| {
            c.status == CurrentStatus::Disabled
        })
        .await;
    assert_eq!(c.counters.delivered, 300);
    assert!(
        c.last_error
            .as_ref()
            .unwrap()
            .message
            .contains("failure window"),
        "{:?}",
        c.last_error
    );
    alerts
        .wait("a disabled alert", |seen| {
            seen.iter().any(|s| s.body["alert"] == "disabled")
        })
        .await;
    assert!(
        alerts.seen().iter().any(|s| s.body["alert"] == "stuck"),
        "stuck longer than alert_after"
    );

    // Stage 5: still disabled at the end of retention: the 50 queued events are dropped,
    // counted and recorded.
    let c = h
        .wait(&c, "stage 5 dropped", |c| c.counters.dropped == 50)
        .await;
    assert_eq!(c.status, CurrentStatus::Disabled);
    let drops = h.store.list_drops(c.id, 10).await.unwrap();
    assert_eq!(drops.iter().map(|d| d.count).sum::<u64>(), 50);
    assert_eq!(h.store.lag(c.id, None).await.unwrap().events, 0);

    // Stage 6: receiver back, Current re-enabled: new events flow again.
    let third = start_sink(addr).await;
    let fresh = h.append(10).await;
    h.store
        .change_status(c.id, StatusChange::Enable, None, Millis(9))
        .await
        .unwrap();
    h.exporter().refresh();
    let c = h
        .wait(&c, "stage 6 delivered", |c| c.counters.delivered == 310)
        .await;
    assert_eq!(
        (
            c.status,
            c.failing_since,
            c.counters.dropped,
            c.counters.dead_lettered
        ),
        (CurrentStatus::Active, None, 50, 0)
    );
    let ids: HashSet<String> = sink_ids(&third).await.into_iter().collect();
    assert_eq!(ids.len(), 310);
    assert!(fresh.iter().all(|id| ids.contains(id)));
}

/// Median event-to-delivery latency of `rounds` partial batches to the capture receiver.
async fn latency(h: &Harness, cap: &Capture, rounds: usize) -> Duration {
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let before = tokio::time::Instant::now();
        let ids = h.append(10).await;
        let want: HashSet<String> = ids.into_iter().collect();
        cap.wait("the round", |seen| {
            let got: HashSet<String> = seen
                .iter()
                .filter(|s| s.status == 200)
                .flat_map(Seen::ids)
                .collect();
            want.is_subset(&got)
        })
        .await;
        let arrived = cap
            .seen()
            .iter()
            .filter(|s| s.ids().iter().any(|i| want.contains(i)))
            .map(|s| s.at)
            .max()
            .unwrap();
        samples.push(arrived - before);
    }
    samples.sort();
    samples[rounds / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_slow_receiver_does_not_slow_another_current() {
    let h = Harness::new().await;
    let healthy = Capture::start().await;
    let mut s = spec(&url(healthy.addr));
    s["flush_interval_ms"] = json!(50);
    h.current(s).await;
    let solo = latency(&h, &healthy, 15).await;

    // A second Current whose receiver refuses connections, retrying as fast as it may.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut down = spec(&url(dead));
    down["max_in_flight"] = json!(4);
    down["batch_size"] = json!(5);
    let failing = h.current(down).await;
    h.append(10).await;
    h.wait(&failing, "the other Current failing", |c| {
        c.failing_since.is_some()
    })
    .await;
    let with_dead = latency(&h, &healthy, 15).await;

    // And a third whose receiver takes 2 s per request.
    let (slow, _d) = sink_with(
        Faults {
            delay_ms: 2_000,
            ..Faults::default()
        },
        None,
    )
    .await;
    let mut sl = spec(&url(slow.addr));
    sl["retry"]["request_timeout_ms"] = json!(10_000);
    h.current(sl).await;
    let with_slow = latency(&h, &healthy, 15).await;

    eprintln!(
        "healthy Current latency: solo {solo:?}, beside a dead receiver {with_dead:?}, beside a slow one {with_slow:?}"
    );
    assert!(
        with_dead <= solo * 2,
        "dead receiver slowed another Current: {with_dead:?} vs {solo:?}"
    );
    assert!(
        with_slow <= solo * 2,
        "slow receiver slowed another Current: {with_slow:?} vs {solo:?}"
    );
}
