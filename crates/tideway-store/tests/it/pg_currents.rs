//! PostgreSQL store: the event log and Currents, against a real PostgreSQL 15.
//!
//! The store-level Currents behaviours the SQLite store is tested for (`sqlite/currents.rs`),
//! ported — claim, ack and counters, dead letters and replays, retention, lag, the log clock,
//! test-send caps — plus what only several nodes on one database show: per-workspace positions
//! and clocks, leases fencing a second `PgStore` on the same database, one winner when two
//! nodes race for a free lease, and appends from two nodes read once each, in order. Events go
//! in through `append_events`, the contract's own append path.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::Map;
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventCategory, EventUser};
use tideway_core::currents_store::{
    Ack, BatchSource, BearerToken, CurrentId, CurrentKind, CurrentSpec, CurrentStatus,
    CurrentsStore, DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_INTERVAL_MS, DEFAULT_MAX_IN_FLIGHT,
    DeadLetterPick, DeadLetterReason, EndpointUrl, FieldAction, HeapIdentity, HeapTrackSettings,
    LAG_EXACT_UP_TO, Lag, LastError, NamePrefix, NewDeadLetter, Ordering, QueuedEvent, RetryPolicy,
    Selection, StatusChange, Transformation, Windows,
};
use tideway_core::ids::{BrazeId, EventId, UserSeq, WorkspaceId};
use tideway_core::store::StoreError;
use tideway_store::postgres::PgStore;

use super::pg::TestDb;

const CUSTOM: &str = "users.behaviors.CustomEvent";
const DELETE: &str = "users.UserDeleteRequest";

fn spec() -> CurrentSpec {
    CurrentSpec {
        name: "c".into(),
        kind: CurrentKind::HeapTrack,
        endpoint: EndpointUrl::parse("https://h.example/x?k=1").unwrap(),
        bearer_token: Some(BearerToken::parse("t0k==").unwrap()),
        selection: Selection::Categories(vec![
            EventCategory::User,
            EventCategory::CustomerBehavior,
        ]),
        batch_size: DEFAULT_BATCH_SIZE,
        flush_interval_ms: DEFAULT_FLUSH_INTERVAL_MS,
        transformations: vec![Transformation {
            field: "email_address".into(),
            action: FieldAction::Hash,
        }],
        ordering: Ordering::PerUser,
        max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        retry: RetryPolicy::default(),
        windows: Windows::default(),
        alert_webhook: Some(EndpointUrl::parse("http://alerts.example/").unwrap()),
        heap: Some(HeapTrackSettings {
            app_id: "11".into(),
            identity: HeapIdentity::UserId,
            prefix: NamePrefix::Braze,
            app_events_per_minute: 15_000,
            identity_events_per_minute: 1_000,
        }),
    }
}

/// A database with one migrated store and `n` workspaces (ids returned in order).
async fn setup(n: usize) -> (TestDb, PgStore, Vec<WorkspaceId>) {
    let db = TestDb::create().await;
    let store = db.store().await;
    let client = db.client().await;
    let mut workspaces = Vec::new();
    for i in 0..n {
        let name = format!("w{i}");
        let id: i64 = client
            .query_one(
                "INSERT INTO workspaces (name, app_group_id, created_at) VALUES ($1, $1, 0) RETURNING id",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        workspaces.push(WorkspaceId(id));
    }
    (db, store, workspaces)
}

/// `n` custom events (ids `{tag}{i}`), the `k`-th of which has user `k`.
fn custom_events(tag: &str, n: usize) -> Vec<(Option<UserSeq>, CurrentsEvent)> {
    let braze = BrazeId::from_bytes([1; 12]);
    let user = EventUser {
        braze_id: &braze,
        external_id: None,
        device_id: None,
        time_zone: None,
    };
    (0..n)
        .map(|i| {
            (
                Some(UserSeq(i as u32)),
                CurrentsEvent::custom_event(
                    EventId(format!("{tag}{i}")),
                    Millis(0),
                    &user,
                    "ag",
                    None,
                    "n",
                    &Map::new(),
                ),
            )
        })
        .collect()
}

async fn append(store: &PgStore, ws: WorkspaceId, n: usize) -> i64 {
    store
        .append_events(ws, custom_events("e", n))
        .await
        .unwrap()
}

async fn set_position(db: &TestDb, id: CurrentId, position: i64) {
    db.client()
        .await
        .execute(
            "UPDATE currents SET position = $2 WHERE id = $1",
            &[&id.0, &position],
        )
        .await
        .unwrap();
}

fn queued(seq: i64) -> QueuedEvent {
    QueuedEvent {
        seq,
        event_id: format!("e{seq}"),
        event_type: "t".into(),
        user: Some(UserSeq(7)),
        body: "{}".into(),
    }
}

fn live_ack(id: CurrentId, owner: &str, resolved_to: i64, delivered: u64, at: i64) -> Ack {
    Ack {
        current: id,
        owner: owner.into(),
        source: BatchSource::Live { resolved_to },
        delivered,
        skipped: 0,
        dead_letters: vec![],
        at: Millis(at),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_starts_at_its_workspaces_head_and_status_rules_hold() {
    let (_db, store, ws) = setup(2).await;
    let (a, b) = (ws[0], ws[1]);
    append(&store, a, 3).await;
    // Another workspace's log has positions of its own and does not move a's head.
    assert_eq!(append(&store, b, 10).await, 10);
    let c = store
        .create_current(a, spec(), CurrentStatus::Draft, Millis(1))
        .await
        .unwrap();
    assert_eq!(
        (c.position, c.status, c.revision, c.workspace),
        (3, CurrentStatus::Draft, 1, a)
    );
    assert_eq!(c.spec, spec(), "the spec round-trips");
    assert!(matches!(
        store
            .change_status(c.id, StatusChange::Resume, None, Millis(2))
            .await,
        Err(StoreError::Conflict(_))
    ));
    append(&store, a, 2).await;
    let c = store
        .change_status(c.id, StatusChange::Launch, None, Millis(2))
        .await
        .unwrap();
    assert_eq!(
        (c.status, c.position, c.revision),
        (CurrentStatus::Active, 5, 2),
        "launch starts at the head"
    );
    // A reason is recorded with the change; Enable ends the failure streak.
    let reason = LastError {
        at: Millis(3),
        status: Some(401),
        message: "HTTP 401".into(),
    };
    let c = store
        .change_status(c.id, StatusChange::Halt, Some(reason.clone()), Millis(3))
        .await
        .unwrap();
    assert_eq!(
        (c.status, c.last_error),
        (CurrentStatus::HaltedCredentials, Some(reason))
    );
    let c = store
        .change_status(c.id, StatusChange::Enable, None, Millis(4))
        .await
        .unwrap();
    assert_eq!((c.status, c.failing_since), (CurrentStatus::Active, None));
    assert!(matches!(
        store
            .change_status(CurrentId(9_999), StatusChange::Pause, None, Millis(4))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .create_current(WorkspaceId(9_999), spec(), CurrentStatus::Draft, Millis(1))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(
        store.get_current(b, c.id).await.unwrap().is_none(),
        "other workspaces cannot see it"
    );
    assert_eq!(store.get_current(a, c.id).await.unwrap(), Some(c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_update_list_and_delete_with_their_records() {
    let (db, store, ws) = setup(2).await;
    let (a, b) = (ws[0], ws[1]);
    let c1 = store
        .create_current(a, spec(), CurrentStatus::Active, Millis(1))
        .await
        .unwrap();
    let c2 = store
        .create_current(b, spec(), CurrentStatus::Draft, Millis(1))
        .await
        .unwrap();
    let mut plain = spec();
    plain.name = "renamed".into();
    plain.selection = Selection::EventTypes(vec![CUSTOM.into()]);
    plain.bearer_token = None;
    plain.heap = None;
    plain.alert_webhook = None;
    plain.ordering = Ordering::Unordered;
    let updated = store
        .update_current(a, c1.id, plain.clone(), Millis(5))
        .await
        .unwrap();
    assert_eq!(
        (&updated.spec, updated.revision, updated.updated_at),
        (&plain, 2, Millis(5))
    );
    assert!(matches!(
        store.update_current(b, c1.id, plain, Millis(5)).await,
        Err(StoreError::NotFound(_)),
    ));
    let ids = |v: Vec<tideway_core::currents_store::Current>| -> Vec<CurrentId> {
        v.into_iter().map(|c| c.id).collect()
    };
    assert_eq!(ids(store.list_currents(a).await.unwrap()), [c1.id]);
    assert_eq!(ids(store.all_currents().await.unwrap()), [c1.id, c2.id]);
    // Its records go with it.
    append(&store, a, 2).await;
    set_position(&db, c1.id, 0).await;
    store
        .record_test_events(c1.id, 1, 10, 1_000, Millis(0))
        .await
        .unwrap();
    assert!(
        store
            .acquire_lease(c1.id, "n", Millis(0), 60_000)
            .await
            .unwrap()
    );
    let mut with_dead = live_ack(c1.id, "n", 2, 1, 10);
    with_dead.dead_letters.push(NewDeadLetter {
        event: queued(2),
        reason: DeadLetterReason::Oversized,
        detail: "1 MB".into(),
        response_status: None,
        response_body: None,
    });
    store.ack(with_dead).await.unwrap();
    assert!(!store.delete_current(b, c1.id).await.unwrap(), "not b's");
    assert!(store.delete_current(a, c1.id).await.unwrap());
    assert!(!store.delete_current(a, c1.id).await.unwrap());
    let left: i64 = db
        .client()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM currents_dead_letters) + (SELECT count(*) FROM currents_test_sends)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert!(
        store
            .list_dead_letters(c1.id, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_filter_types_and_report_how_far_they_looked() {
    let (_db, store, ws) = setup(2).await;
    let a = ws[0];
    append(&store, a, 10).await;
    let all = store.claim(a, 2, 5, None).await.unwrap();
    assert_eq!((all.events.len(), all.scanned_to, all.scanned), (5, 7, 5));
    assert_eq!(
        all.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [3, 4, 5, 6, 7],
        "in log order"
    );
    let first = &all.events[0];
    assert_eq!(
        (
            first.event_id.as_str(),
            first.event_type.as_str(),
            first.user
        ),
        ("e2", CUSTOM, Some(UserSeq(2)))
    );
    let logged = store.read_events(a, 2, 1).await.unwrap();
    assert_eq!(
        first.body, logged[0].event.body,
        "the body exactly as logged"
    );
    let none = store
        .claim(a, 0, 100, Some(vec!["x".into()]))
        .await
        .unwrap();
    assert_eq!(
        (none.events.len(), none.scanned_to, none.scanned),
        (0, 10, 10)
    );
    // A mixed log: only the selected type comes back, the rest is scanned past.
    let braze = BrazeId::from_bytes([2; 12]);
    let deletes: Vec<_> = (0..3)
        .map(|i| {
            let ev =
                CurrentsEvent::delete_request(EventId(format!("d{i}")), Millis(0), &braze, "ag");
            (None, ev)
        })
        .collect();
    assert_eq!(store.append_events(a, deletes).await.unwrap(), 13);
    let typed = store
        .claim(a, 8, 100, Some(vec![DELETE.into()]))
        .await
        .unwrap();
    assert_eq!(
        typed
            .events
            .iter()
            .map(|e| (e.seq, e.event_id.as_str(), e.user))
            .collect::<Vec<_>>(),
        [(11, "d0", None), (12, "d1", None), (13, "d2", None)]
    );
    assert_eq!((typed.scanned_to, typed.scanned), (13, 5));
    let head = store.claim(a, 13, 100, None).await.unwrap();
    assert_eq!(
        (head.events.len(), head.scanned_to, head.scanned),
        (0, 13, 0)
    );
    assert_eq!(store.claim(ws[1], 0, 100, None).await.unwrap().scanned, 0);
    assert_eq!(store.append_events(a, vec![]).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_events_returns_the_log_after_a_position() {
    let (db, store, ws) = setup(2).await;
    let (a, b) = (ws[0], ws[1]);
    let events = custom_events("r", 6);
    assert_eq!(store.append_events(a, events.clone()).await.unwrap(), 6);
    append(&store, b, 4).await;
    let read = store.read_events(a, 2, 3).await.unwrap();
    assert_eq!(read.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
    for (got, (user, want)) in read.iter().zip(&events[2..]) {
        assert_eq!((got.workspace, got.user), (a, *user));
        assert_eq!(&got.event, want, "decoded as logged");
    }
    assert!(store.read_events(a, 6, 10).await.unwrap().is_empty());
    assert_eq!(store.read_events(b, 0, 100).await.unwrap().len(), 4);
    // A row that is not an event is damage, not a panic.
    db.client()
        .await
        .execute(
            "UPDATE event_log SET body = 'not json' WHERE workspace_id = $1 AND seq = 6",
            &[&a.0],
        )
        .await
        .unwrap();
    assert!(matches!(
        store.read_events(a, 5, 10).await,
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_fence_progress_writes_between_two_nodes() {
    let (db, node_a, ws) = setup(1).await;
    let node_b = db.store().await;
    append(&node_a, ws[0], 4).await;
    let c = node_a
        .create_current(ws[0], spec(), CurrentStatus::Active, Millis(1))
        .await
        .unwrap();
    set_position(&db, c.id, 0).await;
    assert!(
        node_a
            .acquire_lease(c.id, "a", Millis(0), 1_000)
            .await
            .unwrap()
    );
    assert!(
        !node_b
            .acquire_lease(c.id, "b", Millis(500), 1_000)
            .await
            .unwrap(),
        "held"
    );
    assert!(
        node_a
            .acquire_lease(c.id, "a", Millis(900), 1_000)
            .await
            .unwrap(),
        "renewed by its owner"
    );
    // Every progress write of a node without the lease is refused and changes nothing.
    assert!(matches!(
        node_b.ack(live_ack(c.id, "b", 2, 2, 1_000)).await,
        Err(StoreError::Conflict(_))
    ));
    let mut with_dead = live_ack(c.id, "b", 2, 1, 1_000);
    with_dead.dead_letters.push(NewDeadLetter {
        event: queued(1),
        reason: DeadLetterReason::Rejected,
        detail: "HTTP 400".into(),
        response_status: Some(400),
        response_body: None,
    });
    assert!(matches!(
        node_b.ack(with_dead).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(
        node_a
            .list_dead_letters(c.id, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let err = LastError {
        at: Millis(1_000),
        status: Some(503),
        message: "HTTP 503".into(),
    };
    assert!(matches!(
        node_b.record_failure(c.id, "b", err.clone(), 2).await,
        Err(StoreError::Conflict(_))
    ));
    node_a.tick_log_clock(Millis(100), 1_000_000).await.unwrap();
    assert!(matches!(
        node_b
            .apply_retention(c.id, "b", Millis(200), None, Millis(1_000))
            .await,
        Err(StoreError::Conflict(_))
    ));
    node_b.release_lease(c.id, "b").await.unwrap();
    let unchanged = node_a.get_current(ws[0], c.id).await.unwrap().unwrap();
    assert_eq!(
        (
            unchanged.position,
            unchanged.counters,
            unchanged.last_error,
            unchanged.failing_since
        ),
        (0, Default::default(), None, None)
    );
    // The holder's writes go through.
    node_a.ack(live_ack(c.id, "a", 2, 2, 1_000)).await.unwrap();
    assert!(
        node_b
            .acquire_lease(c.id, "b", Millis(2_000), 1_000)
            .await
            .unwrap(),
        "expired: taken over"
    );
    assert!(
        matches!(
            node_a.ack(live_ack(c.id, "a", 4, 2, 2_100)).await,
            Err(StoreError::Conflict(_))
        ),
        "the old owner is fenced off"
    );
    assert!(
        !node_a
            .acquire_lease(c.id, "a", Millis(2_500), 1_000)
            .await
            .unwrap()
    );
    node_a.release_lease(c.id, "a").await.unwrap();
    node_b.ack(live_ack(c.id, "b", 4, 2, 2_200)).await.unwrap();
    let c2 = node_a.get_current(ws[0], c.id).await.unwrap().unwrap();
    assert_eq!(
        (c2.position, c2.counters.delivered, c2.last_success_at),
        (4, 4, Some(Millis(2_200)))
    );
    // Released, it is free at once.
    node_b.release_lease(c.id, "b").await.unwrap();
    assert!(
        node_a
            .acquire_lease(c.id, "a", Millis(2_300), 1_000)
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_wins_a_free_lease_raced_from_two_nodes() {
    let (db, node_a, ws) = setup(1).await;
    let node_b = db.store().await;
    let c = node_a
        .create_current(ws[0], spec(), CurrentStatus::Active, Millis(1))
        .await
        .unwrap();
    for round in 0..20i64 {
        // Each round starts with the lease expired (the previous winner's ran out at `now`).
        let now = Millis(round * 10_000);
        let mut tasks = Vec::new();
        for k in 0..8 {
            let store = if k % 2 == 0 {
                node_a.clone()
            } else {
                node_b.clone()
            };
            tasks.push(tokio::spawn(async move {
                let owner = format!("r{round}-{k}");
                store
                    .acquire_lease(c.id, &owner, now, 5_000)
                    .await
                    .unwrap()
                    .then_some(owner)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            winners.extend(t.await.unwrap());
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_streaks_dead_letters_and_replays() {
    let (_db, store, ws) = setup(1).await;
    append(&store, ws[0], 4).await;
    let c = store
        .create_current(ws[0], spec(), CurrentStatus::Active, Millis(1))
        .await
        .unwrap();
    store
        .acquire_lease(c.id, "a", Millis(0), 60_000)
        .await
        .unwrap();
    let err = |at| LastError {
        at: Millis(at),
        status: Some(503),
        message: "HTTP 503".into(),
    };
    assert_eq!(
        store.record_failure(c.id, "a", err(10), 100).await.unwrap(),
        Millis(10)
    );
    assert_eq!(
        store.record_failure(c.id, "a", err(20), 100).await.unwrap(),
        Millis(10),
        "the streak keeps its start"
    );
    let dl = NewDeadLetter {
        event: queued(3),
        reason: DeadLetterReason::Rejected,
        detail: "HTTP 400".into(),
        response_status: Some(400),
        response_body: Some("bad".into()),
    };
    let a = Ack {
        current: c.id,
        owner: "a".into(),
        source: BatchSource::Live { resolved_to: 4 },
        delivered: 3,
        skipped: 0,
        dead_letters: vec![dl.clone()],
        at: Millis(30),
    };
    store.ack(a.clone()).await.unwrap();
    let c2 = store.get_current(ws[0], c.id).await.unwrap().unwrap();
    assert_eq!(
        (
            c2.position,
            c2.failing_since,
            c2.counters.retried,
            c2.counters.dead_lettered
        ),
        (4, None, 200, 1)
    );
    assert_eq!(c2.last_error.unwrap().status, Some(503));
    let dead = store.list_dead_letters(c.id, 0, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (
            dead[0].reason,
            dead[0].response_body.as_deref(),
            dead[0].response_status,
            dead[0].attempts,
            dead[0].replay_pending,
            &dead[0].event,
            dead[0].created_at,
        ),
        (
            DeadLetterReason::Rejected,
            Some("bad"),
            Some(400),
            1,
            false,
            &queued(3),
            Millis(30)
        )
    );
    assert!(
        store
            .list_dead_letters(c.id, dead[0].id, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.claim_dead_letters(c.id, 10).await.unwrap().is_empty());
    assert_eq!(
        store
            .replay_dead_letters(c.id, DeadLetterPick::Ids(vec![dead[0].id, 9_999]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.claim_dead_letters(c.id, 10).await.unwrap().len(), 1);
    // Refused again: it stays, with one more attempt, and is not counted twice.
    let again = Ack {
        source: BatchSource::DeadLetters {
            ids: vec![dead[0].id],
        },
        delivered: 0,
        ..a.clone()
    };
    store.ack(again).await.unwrap();
    let dead = store.list_dead_letters(c.id, 0, 10).await.unwrap();
    assert_eq!(
        (dead.len(), dead[0].attempts, dead[0].replay_pending),
        (1, 2, false)
    );
    assert_eq!(
        store
            .get_current(ws[0], c.id)
            .await
            .unwrap()
            .unwrap()
            .counters
            .dead_lettered,
        1
    );
    // Replayed and accepted: it leaves the store.
    assert_eq!(
        store
            .replay_dead_letters(c.id, DeadLetterPick::All)
            .await
            .unwrap(),
        1
    );
    let ok = Ack {
        source: BatchSource::DeadLetters {
            ids: vec![dead[0].id],
        },
        delivered: 1,
        dead_letters: vec![],
        ..a
    };
    store.ack(ok).await.unwrap();
    assert!(
        store
            .list_dead_letters(c.id, 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let c3 = store.get_current(ws[0], c.id).await.unwrap().unwrap();
    assert_eq!(
        (c3.position, c3.counters.delivered),
        (4, 4),
        "a dead-letter batch moves no position"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_clock_drives_retention_lag_and_replay_windows() {
    let (db, store, ws) = setup(1).await;
    let c = store
        .create_current(ws[0], spec(), CurrentStatus::Active, Millis(1))
        .await
        .unwrap();
    store
        .acquire_lease(c.id, "a", Millis(0), i64::MAX as u64 / 2)
        .await
        .unwrap();
    append(&store, ws[0], 5).await;
    store
        .tick_log_clock(Millis(1_000), 1_000_000)
        .await
        .unwrap();
    append(&store, ws[0], 5).await;
    store
        .tick_log_clock(Millis(2_000), 1_000_000)
        .await
        .unwrap();
    store
        .tick_log_clock(Millis(2_500), 1_000_000)
        .await
        .unwrap();
    append(&store, ws[0], 5).await;
    assert_eq!(
        store.lag(c.id, None).await.unwrap(),
        Lag {
            events: 15,
            exact: true,
            oldest_logged_at: Some(Millis(1_000))
        }
    );
    let typed = store
        .lag(c.id, Some(vec!["users.behaviors.Purchase".into()]))
        .await
        .unwrap();
    assert_eq!(
        typed,
        Lag {
            events: 0,
            exact: true,
            oldest_logged_at: None
        }
    );
    // Everything logged before 1.5 s (the first 5) passed retention.
    let drop = store
        .apply_retention(c.id, "a", Millis(1_500), None, Millis(3_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((drop.from_seq, drop.to_seq, drop.count), (0, 5, 5));
    assert!(
        store
            .apply_retention(c.id, "a", Millis(1_500), None, Millis(3_000))
            .await
            .unwrap()
            .is_none()
    );
    let c2 = store.get_current(ws[0], c.id).await.unwrap().unwrap();
    assert_eq!((c2.position, c2.counters.dropped), (5, 5));
    assert_eq!(store.list_drops(c.id, 10).await.unwrap(), [drop]);
    // Retention of unselected events moves the position and records nothing.
    assert!(
        store
            .apply_retention(
                c.id,
                "a",
                Millis(2_100),
                Some(vec![DELETE.into()]),
                Millis(3_000)
            )
            .await
            .unwrap()
            .is_none()
    );
    let c3 = store.get_current(ws[0], c.id).await.unwrap().unwrap();
    assert_eq!((c3.position, c3.counters.dropped), (10, 5));
    assert_eq!(store.list_drops(c.id, 10).await.unwrap().len(), 1);
    assert_eq!(
        store
            .replay_window(c.id, Millis(2_100), Millis(9_999))
            .await
            .unwrap(),
        None,
        "nothing resolved was logged after 2.1 s"
    );
    // Deliver up to 12; a window over (1 s, 2 s] is positions 6..=10.
    set_position(&db, c.id, 12).await;
    let w = store
        .replay_window(c.id, Millis(1_001), Millis(2_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((w.from_seq, w.to_seq, w.cursor), (6, 10, 5));
    let open_ended = store
        .replay_window(c.id, Millis(1_001), Millis(9_999))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(open_ended.to_seq, 12, "capped at the position");
    assert_eq!(store.next_replay_window(c.id).await.unwrap(), Some(w));
    let part = Ack {
        current: c.id,
        owner: "a".into(),
        source: BatchSource::Window {
            window: w.id,
            resolved_to: 8,
        },
        delivered: 3,
        skipped: 0,
        dead_letters: vec![],
        at: Millis(5_000),
    };
    store.ack(part.clone()).await.unwrap();
    assert_eq!(
        store
            .next_replay_window(c.id)
            .await
            .unwrap()
            .map(|x| x.cursor),
        Some(8),
        "the window's cursor moved"
    );
    let done = Ack {
        source: BatchSource::Window {
            window: w.id,
            resolved_to: 10,
        },
        delivered: 2,
        ..part
    };
    store.ack(done).await.unwrap();
    assert_eq!(
        store.next_replay_window(c.id).await.unwrap().map(|x| x.id),
        Some(open_ended.id)
    );
    let c4 = store.get_current(ws[0], c.id).await.unwrap().unwrap();
    assert_eq!(
        (c4.position, c4.counters.delivered),
        (12, 5),
        "a window moves no position"
    );
    // Old samples are forgotten, keeping the newest one before the cutoff.
    store.tick_log_clock(Millis(10_000), 5_000).await.unwrap();
    let kept: Vec<(i64, i64)> = db
        .client()
        .await
        .query("SELECT at, head FROM currents_log_clock ORDER BY at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(kept, [(2_000, 10), (10_000, 15)]);
    assert!(matches!(
        store.lag(CurrentId(9_999), None).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .replay_window(CurrentId(9_999), Millis(0), Millis(1))
            .await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_clock_is_per_workspace() {
    let (db, store, ws) = setup(3).await;
    let (a, b) = (ws[0], ws[1]);
    append(&store, a, 3).await;
    store
        .tick_log_clock(Millis(1_000), 1_000_000)
        .await
        .unwrap();
    append(&store, b, 7).await;
    store
        .tick_log_clock(Millis(2_000), 1_000_000)
        .await
        .unwrap();
    append(&store, a, 2).await;
    store
        .tick_log_clock(Millis(3_000), 1_000_000)
        .await
        .unwrap();
    let samples: Vec<(i64, i64, i64)> = db
        .client()
        .await
        .query(
            "SELECT workspace_id, at, head FROM currents_log_clock ORDER BY workspace_id, at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        samples,
        [(a.0, 1_000, 3), (a.0, 3_000, 5), (b.0, 2_000, 7)],
        "a sample when a workspace's head moved, none for an empty log"
    );
    // b's events entered its log at 2 s, whatever a's clock says.
    let c = store
        .create_current(b, spec(), CurrentStatus::Active, Millis(1))
        .await
        .unwrap();
    set_position(&db, c.id, 0).await;
    assert_eq!(
        store.lag(c.id, None).await.unwrap().oldest_logged_at,
        Some(Millis(2_000))
    );
    store
        .acquire_lease(c.id, "n", Millis(0), 60_000)
        .await
        .unwrap();
    assert!(
        store
            .apply_retention(c.id, "n", Millis(1_500), None, Millis(4_000))
            .await
            .unwrap()
            .is_none(),
        "nothing of b's is known before 1.5 s"
    );
    let dropped = store
        .apply_retention(c.id, "n", Millis(2_001), None, Millis(4_000))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((dropped.from_seq, dropped.to_seq, dropped.count), (0, 7, 7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lag_past_the_exact_cap_is_estimated_from_positions() {
    let (db, store, ws) = setup(1).await;
    let c = store
        .create_current(ws[0], spec(), CurrentStatus::Active, Millis(1))
        .await
        .unwrap();
    // Written in bulk by SQL: the counter row and the rows, as an append leaves them.
    let total = LAG_EXACT_UP_TO as i64 + 500;
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO event_log (workspace_id, seq, event_id, event_type, time, body)
             SELECT $1, g, 'e' || g, $3, 0, '{}' FROM generate_series(1, $2::bigint) g",
            &[&ws[0].0, &total, &CUSTOM],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO workspace_sequences (workspace_id, name, head) VALUES ($1, 'event_log', $2)",
            &[&ws[0].0, &total],
        )
        .await
        .unwrap();
    store.tick_log_clock(Millis(7), 1_000).await.unwrap();
    set_position(&db, c.id, 100).await;
    assert_eq!(
        store.lag(c.id, None).await.unwrap(),
        Lag {
            events: total as u64 - 100,
            exact: false,
            oldest_logged_at: Some(Millis(7))
        }
    );
    set_position(&db, c.id, 0).await;
    assert_eq!(
        store.lag(c.id, None).await.unwrap(),
        Lag {
            events: total as u64,
            exact: false,
            oldest_logged_at: Some(Millis(7))
        }
    );
    set_position(&db, c.id, 501).await;
    let exact = store.lag(c.id, None).await.unwrap();
    assert_eq!((exact.events, exact.exact), (LAG_EXACT_UP_TO - 1, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sends_are_capped_per_rolling_window() {
    let (db, store, ws) = setup(1).await;
    let node_b = db.store().await;
    let c = store
        .create_current(ws[0], spec(), CurrentStatus::Draft, Millis(1))
        .await
        .unwrap();
    store
        .record_test_events(c.id, 6, 10, 1_000, Millis(0))
        .await
        .unwrap();
    assert!(matches!(
        node_b
            .record_test_events(c.id, 6, 10, 1_000, Millis(500))
            .await,
        Err(StoreError::Conflict(_))
    ));
    store
        .record_test_events(c.id, 6, 10, 1_000, Millis(1_001))
        .await
        .unwrap();
    // Sends from two nodes at once cannot both fit under the cap.
    let (x, y) = tokio::join!(
        store.record_test_events(c.id, 3, 10, 1_000, Millis(1_500)),
        node_b.record_test_events(c.id, 3, 10, 1_000, Millis(1_500)),
    );
    assert_eq!(
        [x.is_ok(), y.is_ok()].iter().filter(|ok| **ok).count(),
        1,
        "{x:?} {y:?}"
    );
    assert!(matches!(
        store
            .record_test_events(CurrentId(9_999), 1, 10, 1_000, Millis(0))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store.delete_current(ws[0], c.id).await.unwrap());
    assert!(!store.delete_current(ws[0], c.id).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_two_nodes_are_claimed_once_each_in_order() {
    const WRITERS: usize = 4;
    const BATCHES: usize = 25;
    let (db, node_a, ws) = setup(1).await;
    let ws = ws[0];
    let node_b = db.store().await;
    let c = node_a
        .create_current(ws, spec(), CurrentStatus::Active, Millis(1))
        .await
        .unwrap();
    assert!(
        node_a
            .acquire_lease(c.id, "a", Millis(0), u64::MAX / 4)
            .await
            .unwrap()
    );
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = if w % 2 == 0 {
            node_a.clone()
        } else {
            node_b.clone()
        };
        writers.push(tokio::spawn(async move {
            for i in 0..BATCHES {
                let tag = format!("w{w}b{i}-");
                store
                    .append_events(ws, custom_events(&tag, 1 + (w + i) % 3))
                    .await
                    .unwrap();
            }
        }));
    }
    let total: usize = (0..WRITERS)
        .flat_map(|w| (0..BATCHES).map(move |i| 1 + (w + i) % 3))
        .sum();
    // The consumer claims and acknowledges while the writers run, as the exporter does.
    let consumer = {
        let store: Arc<PgStore> = Arc::new(node_a.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut position = c.position;
            while seen.len() < total {
                let claimed = store.claim(ws, position, 7, None).await.unwrap();
                if claimed.scanned == 0 {
                    tokio::task::yield_now().await;
                    continue;
                }
                for e in &claimed.events {
                    assert!(e.seq > position, "{} after {position}", e.seq);
                    seen.push((e.seq, e.event_id.clone()));
                }
                let n = claimed.events.len() as u64;
                store
                    .ack(live_ack(c.id, "a", claimed.scanned_to, n, 0))
                    .await
                    .unwrap();
                position = claimed.scanned_to;
            }
            seen
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    let seen = consumer.await.unwrap();
    let seqs: Vec<i64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=total as i64).collect::<Vec<_>>(),
        "gap-free, in order"
    );
    let ids: HashSet<&String> = seen.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), total, "every event once");
    let done = node_b.get_current(ws, c.id).await.unwrap().unwrap();
    assert_eq!(
        (done.position, done.counters.delivered),
        (total as i64, total as u64)
    );
}
