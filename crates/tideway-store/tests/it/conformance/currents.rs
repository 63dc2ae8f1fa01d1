//! Currents as the exporter and the management API use them: a Current starts at the end of
//! the log, a claim after its position sees only later events, an acknowledgement moves the
//! position, the lease fences off every owner but the holder; failure streaks, dead letters
//! and their replay; lag and retention by the log clock.

use std::sync::Arc;

use serde_json::json;
use tideway_core::clock::Millis;
use tideway_core::currents::EventCategory;
use tideway_core::currents_store::{
    Ack, BatchSource, Claimed, Counters, CurrentKind, CurrentSpec, CurrentStatus,
    DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_INTERVAL_MS, DEFAULT_MAX_IN_FLIGHT, DeadLetterPick,
    DeadLetterReason, EndpointUrl, Lag, LastError, NewDeadLetter, Ordering, RetryPolicy, Selection,
    StatusChange, Windows,
};
use tideway_core::store::prelude::*;
use tideway_core::store::{StoreError, Workspace};

use super::{NOW, all_events, track};

const CUSTOM: &str = "users.behaviors.CustomEvent";

fn spec(name: &str) -> CurrentSpec {
    CurrentSpec {
        name: name.to_owned(),
        kind: CurrentKind::CustomHttp,
        endpoint: EndpointUrl::parse("https://receiver.example/currents").unwrap(),
        bearer_token: None,
        selection: Selection::Categories(vec![EventCategory::CustomerBehavior]),
        batch_size: DEFAULT_BATCH_SIZE,
        flush_interval_ms: DEFAULT_FLUSH_INTERVAL_MS,
        transformations: vec![],
        ordering: Ordering::Unordered,
        max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        retry: RetryPolicy::default(),
        windows: Windows::default(),
        alert_webhook: None,
        heap: None,
    }
}

/// One request with an attribute update and `n` custom events named `name`.
async fn some_events(store: &dyn Store, ws: &Workspace, name: &str, n: usize) {
    let events: Vec<_> = (0..n)
        .map(|_| json!({"external_id": "u", "name": name, "time": "2025-01-01T00:00:00Z"}))
        .collect();
    let body = json!({"attributes": [{"external_id": "u", "last": name}], "events": events});
    track(store, ws, body).await;
}

/// The event ids of a claim, with their positions.
fn claimed(c: &Claimed) -> Vec<(i64, String)> {
    c.events
        .iter()
        .map(|e| (e.seq, e.event_id.clone()))
        .collect()
}

/// A Current's id is never given to another, even after it is deleted: consumers, leases and
/// metrics keyed by id would take the new Current for the old one.
pub(super) async fn current_ids_are_never_reused(store: Arc<dyn Store>) {
    let store = &*store;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let mut seen = Vec::new();
    for round in 0..3 {
        let current = store
            .create_current(
                ws.id,
                spec(&format!("c{round}")),
                CurrentStatus::Active,
                NOW,
            )
            .await
            .unwrap();
        assert!(
            !seen.contains(&current.id),
            "{:?} reused: {seen:?}",
            current.id
        );
        seen.push(current.id);
        assert!(store.delete_current(ws.id, current.id).await.unwrap());
    }
}

/// A new Current sits at the end of the log: a claim after its position sees only what comes
/// later, in order, filtered by type; it is visible in its own workspace only; launching it
/// later moves it to the head again.
pub(super) async fn a_current_starts_at_the_end_of_the_log(store: Arc<dyn Store>) {
    let store = &*store;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let other = store.create_workspace("other", NOW).await.unwrap();
    some_events(store, &ws, "old", 3).await;
    let head = all_events(store, &ws).await.last().unwrap().seq;
    let current = store
        .create_current(ws.id, spec("c"), CurrentStatus::Draft, NOW)
        .await
        .unwrap();
    assert_eq!(
        (
            current.workspace,
            current.status,
            current.counters,
            current.created_at
        ),
        (ws.id, CurrentStatus::Draft, Counters::default(), NOW)
    );
    // At the end: past every event so far (positions may be shared by workspaces, so not
    // necessarily this workspace's last one).
    assert!(current.position >= head, "{current:?}");
    assert_eq!(current.spec, spec("c"));
    assert_eq!(
        store.get_current(ws.id, current.id).await.unwrap(),
        Some(current.clone())
    );
    assert_eq!(store.get_current(other.id, current.id).await.unwrap(), None);
    assert_eq!(
        store.list_currents(ws.id).await.unwrap(),
        vec![current.clone()]
    );
    assert_eq!(store.list_currents(other.id).await.unwrap(), vec![]);

    let nothing = store
        .claim(ws.id, current.position, 100, None)
        .await
        .unwrap();
    assert_eq!(nothing.events, vec![]);
    some_events(store, &ws, "new", 2).await;
    some_events(store, &other, "elsewhere", 2).await;
    let later: Vec<_> = store
        .read_events(ws.id, head, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.event.id.0, e.event.event_type.as_str()))
        .collect();
    assert_eq!(later.len(), 3, "an update and two events");
    let all = store
        .claim(ws.id, current.position, 100, None)
        .await
        .unwrap();
    assert_eq!(
        claimed(&all),
        later
            .iter()
            .map(|(seq, id, _)| (*seq, id.clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!((all.scanned_to, all.scanned), (later[2].0, 3));
    assert_eq!(all.events[1].event_type, CUSTOM);
    let custom_only = store
        .claim(ws.id, current.position, 100, Some(vec![CUSTOM.to_owned()]))
        .await
        .unwrap();
    assert_eq!(
        claimed(&custom_only),
        later
            .iter()
            .filter(|(_, _, t)| *t == CUSTOM)
            .map(|(seq, id, _)| (*seq, id.clone()))
            .collect::<Vec<_>>()
    );
    assert_eq!(custom_only.scanned_to, later[2].0);
    let first_two = store.claim(ws.id, current.position, 2, None).await.unwrap();
    assert_eq!(claimed(&first_two), claimed(&all)[..2]);
    assert_eq!(first_two.scanned_to, later[1].0);

    // A Current in draft cannot be resumed; launched, it starts at the head of the log.
    assert!(matches!(
        store
            .change_status(current.id, StatusChange::Resume, None, NOW)
            .await,
        Err(StoreError::Conflict(_))
    ));
    let launched = store
        .change_status(current.id, StatusChange::Launch, None, Millis(NOW.0 + 1))
        .await
        .unwrap();
    assert_eq!(launched.status, CurrentStatus::Active);
    assert!(launched.position >= later[2].0, "{launched:?}");
    let at_head = store
        .claim(ws.id, launched.position, 100, None)
        .await
        .unwrap();
    assert_eq!(at_head.events, vec![]);
    some_events(store, &ws, "launched", 1).await;
    let after_launch = store
        .claim(ws.id, launched.position, 100, None)
        .await
        .unwrap();
    assert_eq!(
        after_launch
            .events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["users.profile.Update", CUSTOM]
    );
    assert!(launched.revision > current.revision);
}

/// An acknowledgement of a live batch moves the position and the counters; the next claim
/// after it starts past the acknowledged events.
pub(super) async fn an_ack_moves_the_position(store: Arc<dyn Store>) {
    let store = &*store;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let current = store
        .create_current(ws.id, spec("c"), CurrentStatus::Active, NOW)
        .await
        .unwrap();
    some_events(store, &ws, "first", 2).await;
    assert!(
        store
            .acquire_lease(current.id, "node-a", NOW, 30_000)
            .await
            .unwrap()
    );
    let batch = store
        .claim(ws.id, current.position, 100, None)
        .await
        .unwrap();
    assert_eq!(batch.events.len(), 3);
    let at = Millis(NOW.0 + 10);
    store
        .ack(Ack {
            current: current.id,
            owner: "node-a".into(),
            source: BatchSource::Live {
                resolved_to: batch.scanned_to,
            },
            delivered: 3,
            skipped: 0,
            dead_letters: vec![],
            at,
        })
        .await
        .unwrap();
    let acked = store.get_current(ws.id, current.id).await.unwrap().unwrap();
    assert_eq!(acked.position, batch.scanned_to);
    assert_eq!(
        acked.counters,
        Counters {
            delivered: 3,
            ..Counters::default()
        }
    );
    assert_eq!(acked.last_success_at, Some(at));
    assert_eq!(
        store
            .claim(ws.id, acked.position, 100, None)
            .await
            .unwrap()
            .events,
        vec![]
    );
    some_events(store, &ws, "second", 1).await;
    let next = store.claim(ws.id, acked.position, 100, None).await.unwrap();
    assert_eq!(next.events.len(), 2);
    assert!(next.events.iter().all(|e| e.seq > batch.scanned_to));
    assert_eq!(
        next.events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["users.profile.Update", CUSTOM]
    );
}

/// The lease: held by one owner until it expires (renewable by its owner); progress written
/// by anyone else is refused with `Conflict` and changes nothing, also for the old owner once
/// another has taken an expired lease.
pub(super) async fn leases_fence_a_second_owner(store: Arc<dyn Store>) {
    let store = &*store;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let current = store
        .create_current(ws.id, spec("c"), CurrentStatus::Active, NOW)
        .await
        .unwrap();
    some_events(store, &ws, "e", 3).await;
    let events = all_events(store, &ws).await;
    let at = |ms: u64| Millis(NOW.0 + ms as i64);
    assert!(
        store
            .acquire_lease(current.id, "a", at(0), 1_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_lease(current.id, "b", at(500), 1_000)
            .await
            .unwrap(),
        "held by a"
    );
    assert!(
        store
            .acquire_lease(current.id, "a", at(900), 1_000)
            .await
            .unwrap(),
        "renewed by its owner"
    );
    let ack_by = |owner: &str, resolved_to: i64| Ack {
        current: current.id,
        owner: owner.into(),
        source: BatchSource::Live { resolved_to },
        delivered: 1,
        skipped: 0,
        dead_letters: vec![],
        at: at(1_000),
    };
    assert!(matches!(
        store.ack(ack_by("b", events[0].seq)).await,
        Err(StoreError::Conflict(_))
    ));
    let unchanged = store.get_current(ws.id, current.id).await.unwrap().unwrap();
    assert_eq!((unchanged.position, unchanged.counters.delivered), (0, 0));
    store.ack(ack_by("a", events[0].seq)).await.unwrap();
    assert!(
        !store
            .acquire_lease(current.id, "b", at(1_800), 1_000)
            .await
            .unwrap(),
        "the renewal at 900 holds until 1,900"
    );
    assert!(
        store
            .acquire_lease(current.id, "b", at(2_000), 1_000)
            .await
            .unwrap(),
        "expired: taken over"
    );
    assert!(
        matches!(
            store.ack(ack_by("a", events[2].seq)).await,
            Err(StoreError::Conflict(_))
        ),
        "the old owner is fenced off"
    );
    let after = store.get_current(ws.id, current.id).await.unwrap().unwrap();
    assert_eq!(
        (after.position, after.counters.delivered),
        (events[0].seq, 1)
    );
    store.ack(ack_by("b", events[1].seq)).await.unwrap();
    assert!(
        !store
            .acquire_lease(current.id, "a", at(2_500), 1_000)
            .await
            .unwrap(),
        "a cannot take it back while b holds it"
    );
    store.release_lease(current.id, "b").await.unwrap();
    assert!(
        store
            .acquire_lease(current.id, "a", at(2_600), 1_000)
            .await
            .unwrap(),
        "released: free at once"
    );
    let last = store.get_current(ws.id, current.id).await.unwrap().unwrap();
    assert_eq!((last.position, last.counters.delivered), (events[1].seq, 2));
}

/// A failure streak keeps its start until a delivery ends it; dead letters are stored with the
/// acknowledgement, counted once, replayed on request, kept (one attempt more) when refused
/// again and removed when accepted; a fenced owner cannot record a failure.
pub(super) async fn failures_and_dead_letters_are_recorded_and_replayed(store: Arc<dyn Store>) {
    let store = &*store;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let current = store
        .create_current(ws.id, spec("c"), CurrentStatus::Active, NOW)
        .await
        .unwrap();
    some_events(store, &ws, "e", 3).await;
    assert!(
        store
            .acquire_lease(current.id, "a", NOW, 60_000)
            .await
            .unwrap()
    );
    let error = |at: i64| LastError {
        at: Millis(NOW.0 + at),
        status: Some(503),
        message: "HTTP 503".into(),
    };
    assert_eq!(
        store
            .record_failure(current.id, "a", error(10), 4)
            .await
            .unwrap(),
        Millis(NOW.0 + 10)
    );
    assert_eq!(
        store
            .record_failure(current.id, "a", error(20), 4)
            .await
            .unwrap(),
        Millis(NOW.0 + 10),
        "the streak keeps its start"
    );
    assert!(matches!(
        store.record_failure(current.id, "b", error(30), 4).await,
        Err(StoreError::Conflict(_))
    ));
    let failing = store.get_current(ws.id, current.id).await.unwrap().unwrap();
    assert_eq!(
        (
            failing.failing_since,
            failing.counters.retried,
            failing.last_error.clone()
        ),
        (Some(Millis(NOW.0 + 10)), 8, Some(error(20)))
    );
    let batch = store
        .claim(ws.id, current.position, 100, None)
        .await
        .unwrap();
    assert_eq!(batch.events.len(), 4);
    let refused = NewDeadLetter {
        event: batch.events[1].clone(),
        reason: DeadLetterReason::Rejected,
        detail: "HTTP 400".into(),
        response_status: Some(400),
        response_body: Some("bad".into()),
    };
    let ack = Ack {
        current: current.id,
        owner: "a".into(),
        source: BatchSource::Live {
            resolved_to: batch.scanned_to,
        },
        delivered: 3,
        skipped: 0,
        dead_letters: vec![refused.clone()],
        at: Millis(NOW.0 + 40),
    };
    store.ack(ack.clone()).await.unwrap();
    let acked = store.get_current(ws.id, current.id).await.unwrap().unwrap();
    assert_eq!(
        (
            acked.position,
            acked.failing_since,
            acked.counters,
            acked.last_success_at
        ),
        (
            batch.scanned_to,
            None,
            Counters {
                delivered: 3,
                retried: 8,
                dead_lettered: 1,
                ..Counters::default()
            },
            Some(Millis(NOW.0 + 40))
        )
    );
    let dead = store.list_dead_letters(current.id, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].current,
            &dead[0].event,
            dead[0].reason,
            dead[0].detail.as_str(),
            dead[0].response_status,
            dead[0].response_body.as_deref(),
            dead[0].attempts,
            dead[0].replay_pending,
        ),
        (
            current.id,
            &refused.event,
            DeadLetterReason::Rejected,
            "HTTP 400",
            Some(400),
            Some("bad"),
            1,
            false
        )
    );
    assert_eq!(
        store.claim_dead_letters(current.id, 10).await.unwrap(),
        vec![],
        "nothing to replay until asked"
    );
    assert_eq!(
        store
            .replay_dead_letters(current.id, DeadLetterPick::Ids(vec![dead[0].id]))
            .await
            .unwrap(),
        1
    );
    let pending = store.claim_dead_letters(current.id, 10).await.unwrap();
    assert_eq!(
        pending.iter().map(|d| d.id).collect::<Vec<_>>(),
        [dead[0].id]
    );
    // Refused again: it stays, with one more attempt, and is not counted twice.
    let again = Ack {
        source: BatchSource::DeadLetters {
            ids: vec![dead[0].id],
        },
        delivered: 0,
        ..ack.clone()
    };
    store.ack(again).await.unwrap();
    let dead = store.list_dead_letters(current.id, 0, 10).await.unwrap();
    assert_eq!(
        (dead.len(), dead[0].attempts, dead[0].replay_pending),
        (1, 2, false)
    );
    let counted = store.get_current(ws.id, current.id).await.unwrap().unwrap();
    assert_eq!(counted.counters.dead_lettered, 1);
    // Replayed and accepted: it leaves the store.
    assert_eq!(
        store
            .replay_dead_letters(current.id, DeadLetterPick::All)
            .await
            .unwrap(),
        1
    );
    let accepted = Ack {
        source: BatchSource::DeadLetters {
            ids: vec![dead[0].id],
        },
        delivered: 1,
        dead_letters: vec![],
        ..ack
    };
    store.ack(accepted).await.unwrap();
    assert_eq!(
        store.list_dead_letters(current.id, 0, 10).await.unwrap(),
        vec![]
    );
    let done = store.get_current(ws.id, current.id).await.unwrap().unwrap();
    assert_eq!(
        (done.position, done.counters.delivered),
        (batch.scanned_to, 4)
    );
}

/// Lag counts the selected events after the position, dated by the log clock; retention drops
/// what entered the log before its cutoff (moving the position past it) once, and records it.
pub(super) async fn the_log_clock_drives_lag_and_retention(store: Arc<dyn Store>) {
    let store = &*store;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let current = store
        .create_current(ws.id, spec("c"), CurrentStatus::Active, NOW)
        .await
        .unwrap();
    assert!(
        store
            .acquire_lease(current.id, "a", NOW, 3_600_000)
            .await
            .unwrap()
    );
    let at = |s: i64| Millis(NOW.0 + s * 1_000);
    assert_eq!(
        store.lag(current.id, None).await.unwrap(),
        Lag {
            events: 0,
            exact: true,
            oldest_logged_at: None
        }
    );
    some_events(store, &ws, "early", 2).await;
    store.tick_log_clock(at(1), 3_600_000).await.unwrap();
    let early_head = all_events(store, &ws).await.last().unwrap().seq;
    some_events(store, &ws, "late", 2).await;
    store.tick_log_clock(at(2), 3_600_000).await.unwrap();
    let head = all_events(store, &ws).await.last().unwrap().seq;
    assert_eq!(
        store.lag(current.id, None).await.unwrap(),
        Lag {
            events: 6,
            exact: true,
            oldest_logged_at: Some(at(1))
        }
    );
    assert_eq!(
        store
            .lag(current.id, Some(vec![CUSTOM.to_owned()]))
            .await
            .unwrap()
            .events,
        4
    );
    assert_eq!(
        store
            .lag(current.id, Some(vec!["users.behaviors.Purchase".into()]))
            .await
            .unwrap()
            .events,
        0
    );
    // Retention at 1.5 s: the three events logged by 1 s are dropped.
    let dropped = store
        .apply_retention(current.id, "a", Millis(NOW.0 + 1_500), None, at(3))
        .await
        .unwrap()
        .expect("something was dropped");
    assert_eq!(
        (
            dropped.current,
            dropped.from_seq,
            dropped.to_seq,
            dropped.count,
            dropped.at
        ),
        (current.id, current.position, early_head, 3, at(3))
    );
    assert_eq!(
        store
            .apply_retention(current.id, "a", Millis(NOW.0 + 1_500), None, at(3))
            .await
            .unwrap(),
        None,
        "nothing more to drop"
    );
    // Another owner, with something to drop, is fenced off and drops nothing.
    assert!(matches!(
        store
            .apply_retention(current.id, "b", Millis(NOW.0 + 2_500), None, at(3))
            .await,
        Err(StoreError::Conflict(_))
    ));
    let after = store.get_current(ws.id, current.id).await.unwrap().unwrap();
    assert_eq!((after.position, after.counters.dropped), (early_head, 3));
    assert_eq!(
        store.list_drops(current.id, 10).await.unwrap(),
        vec![dropped]
    );
    assert_eq!(
        store.lag(current.id, None).await.unwrap(),
        Lag {
            events: 3,
            exact: true,
            oldest_logged_at: Some(at(2))
        }
    );
    let rest = store.claim(ws.id, after.position, 100, None).await.unwrap();
    assert_eq!(rest.scanned_to, head);
    assert_eq!(rest.events.len(), 3);
}
