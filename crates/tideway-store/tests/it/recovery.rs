//! The writer's recovery from a failed replay: after a rollback the writer forgets its cache
//! and replays `user_log` into `users`; if that replay fails, the rows may be stale, and a
//! write computed from one would overwrite changes already acknowledged. The failure is
//! injected at a planned failure point of the real store (`Failpoints`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tideway_core::store::prelude::*;

use rusqlite::Connection;
use serde_json::{Value, json};
use tideway_core::store::StoreError;
use tideway_core::track::parse_track;
use tideway_store::sqlite::{Failpoints, SqliteOptions, SqliteStore};

use super::{NOW, export_one, track};

/// One request's worth (75 objects at most).
const USERS: usize = 75;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_replay_fails_writes_are_refused_and_no_acknowledged_write_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let failpoints = Arc::new(Failpoints::default());
    let options = SqliteOptions {
        // Rows stay behind their logged post-images for the whole test (a sweep writes about
        // one row a batch at this pace).
        sweep_period: Duration::from_secs(3600),
        failpoints: Arc::clone(&failpoints),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&dir.path().join("t.sqlite"), options).unwrap();
    let ws = store.create_workspace("w", NOW).await.unwrap();
    // Every acknowledged change: (user, attribute) → value.
    let mut acknowledged: BTreeMap<(String, String), Value> = BTreeMap::new();
    // Round 0 creates the users; round 1 changes them, which is only logged: rows stay behind.
    for round in 0..2 {
        let attributes: Vec<_> = (0..USERS)
            .map(|i| json!({"external_id": format!("u{i}"), format!("r{round}"): round}))
            .collect();
        track(&store, &ws, json!({"attributes": attributes})).await;
        for i in 0..USERS {
            acknowledged.insert((format!("u{i}"), format!("r{round}")), json!(round));
        }
    }
    let file = Connection::open(dir.path().join("t.sqlite")).unwrap();
    let row_of_last: String = file
        .query_row(
            "SELECT profile FROM users WHERE external_id = ?1",
            [format!("u{}", USERS - 1)],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        !row_of_last.contains("\"r1\""),
        "round 1 is logged, not in the rows (the stale rows this test is about)"
    );

    failpoints.fail_replays(true);
    // A failing job rolls the batch back, and the writer replays the log: the replay fails.
    let duplicate = store.create_workspace("w", NOW).await;
    assert!(duplicate.is_err(), "{duplicate:?}");
    assert!(
        failpoints.replays_failed() >= 1,
        "the planned failure was hit"
    );
    // Writes while the replay fails, to users whose rows are behind.
    let mut outcomes = Vec::new();
    for i in USERS - 5..USERS {
        let user = format!("u{i}");
        let body = json!({"attributes": [{"external_id": user, "during": i}]});
        let request = parse_track(body.as_object().unwrap()).unwrap();
        let outcome = store.track(&ws, request, NOW).await;
        if outcome.is_ok() {
            acknowledged.insert((user, "during".into()), json!(i));
        }
        outcomes.push(outcome);
    }
    failpoints.fail_replays(false);
    // Every acknowledged write is present (the first job after the failure replays first).
    let mut exported = BTreeMap::new();
    for ((user, attribute), value) in &acknowledged {
        if !exported.contains_key(user) {
            let profile = export_one(&store, &ws, user).await.expect("user exists");
            exported.insert(user.clone(), profile);
        }
        assert_eq!(
            &exported[user]["custom_attributes"][attribute], value,
            "{user}.{attribute} was acknowledged and is lost"
        );
    }
    // Nothing was acknowledged while the rows were stale: every write was refused as
    // unavailable (503 at the edge) and applied nothing.
    for (k, outcome) in outcomes.iter().enumerate() {
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "write {k} during the failure: {outcome:?}"
        );
    }
    for i in USERS - 5..USERS {
        let exported = export_one(&store, &ws, &format!("u{i}")).await.unwrap();
        assert!(exported["custom_attributes"].get("during").is_none());
    }
    // Writes are accepted again.
    let out = track(
        &store,
        &ws,
        json!({"attributes": [{"external_id": "u0", "after": true}]}),
    )
    .await;
    assert_eq!(out.attributes_processed, 1);
    let u0 = export_one(&store, &ws, "u0").await.unwrap();
    assert_eq!(u0["custom_attributes"]["after"], true);
    assert_eq!(u0["custom_attributes"]["r1"], 1);

    // Without any write, the writer retries a failed replay at every tick, and once one
    // succeeds the log is written into the rows.
    failpoints.fail_replays(true);
    assert!(store.create_workspace("w", NOW).await.is_err());
    let failed_so_far = failpoints.replays_failed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while failpoints.replays_failed() < failed_so_far + 2 {
        assert!(Instant::now() < deadline, "the replay is not retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    failpoints.fail_replays(false);
    let logged = || -> i64 {
        file.query_row("SELECT COUNT(*) FROM user_log", [], |r| r.get(0))
            .unwrap()
    };
    while logged() > 0 {
        assert!(Instant::now() < deadline, "the log was never replayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Canvas User Update step is applied in its journey's settlement: a failure between the
/// attribute write and the journey's move (a crash there) undoes both, and the journey
/// processed again increments once — not twice, as an update committed on its own would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_update_and_its_journeys_move_commit_together() {
    use tideway_core::campaigns::CampaignStatus;
    use tideway_core::canvas::Journey;
    use tideway_core::store::{CanvasRecord, CanvasScan, JourneySettlement, NewEntry, UserUpdate};

    let dir = tempfile::tempdir().unwrap();
    let failpoints = Arc::new(Failpoints::default());
    let options = SqliteOptions {
        failpoints: Arc::clone(&failpoints),
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&dir.path().join("t.sqlite"), options).unwrap();
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &store,
        &ws,
        json!({"attributes": [{"external_id": "u1", "visits": 0}]}),
    )
    .await;
    let user = store
        .users_by_seq(ws.id, vec![tideway_core::ids::UserSeq(1)])
        .await
        .unwrap()
        .remove(0);
    store
        .create_canvas(
            ws.id,
            CanvasRecord {
                id: "c".into(),
                name: "c".into(),
                description: String::new(),
                tags: Vec::new(),
                status: CampaignStatus::Active,
                version: 1,
                definition: json!({"steps": []}),
                created_at: NOW,
                updated_at: NOW,
                launched_at: Some(NOW),
                next_run: None,
                first_entry: None,
                last_entry: None,
                entries: 0,
            },
        )
        .await
        .unwrap();
    let journey = |step: &str| Journey {
        entry_id: "e1".into(),
        version: 1,
        variant_id: "v".into(),
        step_id: step.into(),
        entered_at: NOW,
        step_at: NOW,
        due_at: NOW,
        converted: 0,
        entry_properties: None,
        event_properties: None,
    };
    store
        .enter_canvas(
            ws.id,
            NOW,
            CanvasScan {
                entries: vec![NewEntry {
                    canvas_id: "c".into(),
                    user: user.seq,
                    journey: Some(journey("update")),
                    reentry_after_ms: None,
                    entry_limit: None,
                    events: Vec::new(),
                    stats: Vec::new(),
                }],
                ..CanvasScan::default()
            },
        )
        .await
        .unwrap();
    let body = json!({"attributes": [{"braze_id": user.braze_id.as_str(), "visits": {"inc": 1}}]});
    let settlement = JourneySettlement {
        workspace: ws.id,
        canvas_id: "c".into(),
        user: user.seq,
        entry_id: "e1".into(),
        journey: Some(Journey {
            due_at: tideway_core::clock::Millis(NOW.0 + 86_400_000),
            ..journey("wait")
        }),
        inbox_upto: None,
        events: Vec::new(),
        sends: Vec::new(),
        stats: Vec::new(),
        user_update: Some(UserUpdate {
            workspace: ws.clone(),
            request: parse_track(body.as_object().unwrap()).unwrap(),
        }),
        watch: None,
    };
    let visits = async || {
        export_one(&store, &ws, "u1").await.unwrap()["custom_attributes"]["visits"].clone()
    };

    // The node crashes between the attribute write and the journey's move.
    assert_eq!(
        store
            .claim_journeys("n", NOW, 60_000, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    failpoints.fail_settlements_after_user_update(true);
    assert!(matches!(
        store
            .settle_journeys("n", NOW, vec![settlement.clone()])
            .await,
        Err(StoreError::Unavailable(_))
    ));
    // (The writer runs a failed job again in a savepoint of its own: it fails twice.)
    assert!(failpoints.settlements_failed() >= 1);
    assert_eq!(
        visits().await,
        json!(0),
        "nothing of the failed settlement stays"
    );

    // Restarted: the journey is still at the User Update step and is processed again.
    failpoints.fail_settlements_after_user_update(false);
    store.release_journey_leases("n").await.unwrap();
    let claimed = store.claim_journeys("n", NOW, 60_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].journey.step_id, "update");
    assert_eq!(
        store
            .settle_journeys("n", NOW, vec![settlement.clone()])
            .await
            .unwrap(),
        0
    );
    assert_eq!(visits().await, json!(1), "incremented once");
    // A settlement whose lease is gone applies nothing.
    assert_eq!(
        store
            .settle_journeys("n", NOW, vec![settlement])
            .await
            .unwrap(),
        1
    );
    assert_eq!(visits().await, json!(1));
}
