//! The work the writer keeps behind its acknowledgements: profile rows written later from
//! `user_log`, replayed after a crash, swept when idle; the behaviour index filled behind the
//! log; and the optimistic batch that re-runs with savepoints when a job fails.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tideway_core::store::prelude::*;

use rusqlite::Connection;
use serde_json::json;
use tideway_core::segments::Segment;
use tideway_core::store::StoreError;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::{NOW, export_one, track};

fn open_with(dir: &tempfile::TempDir, sweep_period: Duration) -> SqliteStore {
    let options = SqliteOptions {
        sweep_period,
        ..SqliteOptions::default()
    };
    SqliteStore::open(&dir.path().join("t.sqlite"), options).expect("open store")
}

fn raw(dir: &tempfile::TempDir) -> Connection {
    Connection::open(dir.path().join("t.sqlite")).unwrap()
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// The profile text in a user's row, read straight from the file.
fn row_profile(conn: &Connection, external_id: &str) -> String {
    conn.query_row(
        "SELECT profile FROM users WHERE external_id = ?1",
        [external_id],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_logged_but_not_yet_in_their_rows_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    // A sweep period far longer than the test: rows stay behind unless replayed.
    let store = open_with(&dir, Duration::from_secs(3600));
    let ws = store.create_workspace("w", NOW).await.unwrap();
    for round in 0..3 {
        let attributes: Vec<_> = (0..50)
            .map(|i| json!({"external_id": format!("u{i}"), "round": round, "first_name": format!("N{round}")}))
            .collect();
        track(&store, &ws, json!({"attributes": attributes})).await;
    }
    let file = raw(&dir);
    assert!(
        count(&file, "SELECT COUNT(*) FROM user_log") > 0,
        "the acknowledged profiles are in the log"
    );
    assert!(
        !row_profile(&file, "u7").contains("\"round\":2"),
        "and not yet in their rows (this test exercises the replay)"
    );
    // A crash: the writer never gets to write the rows or replay at shutdown.
    std::mem::forget(store);
    let store = open_with(&dir, Duration::from_secs(3600));
    assert_eq!(
        count(&file, "SELECT COUNT(*) FROM user_log"),
        0,
        "replayed on open"
    );
    assert!(row_profile(&file, "u7").contains("\"round\":2"));
    let ws = store.workspace_by_name("w").await.unwrap().unwrap();
    for i in [0, 7, 49] {
        let user = export_one(&store, &ws, &format!("u{i}")).await.unwrap();
        assert_eq!(user["custom_attributes"]["round"], 2);
        assert_eq!(user["first_name"], "N2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_every_acknowledged_write_though_rows_are_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&dir, Duration::from_secs(3600));
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &store,
        &ws,
        json!({"attributes": [{"external_id": "a", "plan": "free"}]}),
    )
    .await;
    track(
        &store,
        &ws,
        json!({"attributes": [{"external_id": "a", "plan": "pro", "visits": {"inc": 2}}]}),
    )
    .await;
    let user = export_one(&store, &ws, "a").await.unwrap();
    assert_eq!(user["custom_attributes"]["plan"], "pro");
    assert_eq!(user["custom_attributes"]["visits"], 2);
    // The segment feed reads rows too: it sees the same.
    let snapshot = store.segment_profiles(ws.id).await.unwrap();
    assert_eq!(snapshot.users.len(), 1);
    assert_eq!(
        snapshot.users[0].profile.attributes.get("plan"),
        Some(&json!("pro"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_writer_sweeps_every_row_and_empties_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&dir, Duration::from_millis(200));
    let ws = store.create_workspace("w", NOW).await.unwrap();
    for chunk in 0..4 {
        let attributes: Vec<_> = (chunk * 75..(chunk + 1) * 75)
            .map(|i| json!({"external_id": format!("u{i}"), "plan": "pro"}))
            .collect();
        track(&store, &ws, json!({"attributes": attributes})).await;
    }
    track(
        &store,
        &ws,
        json!({"events": [{"external_id": "u1", "name": "opened", "time": "2025-01-01T00:00:00Z"}]}),
    )
    .await;
    let file = raw(&dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logged = count(&file, "SELECT COUNT(*) FROM user_log");
        let behind = count(
            &file,
            "SELECT COUNT(*) FROM users WHERE profile NOT LIKE '%\"plan\":\"pro\"%'",
        );
        if logged == 0 && behind == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still behind: {logged} logged, {behind} rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing reads the per-user behaviour index until a segment exists; then it fills.
    assert_eq!(count(&file, "SELECT COUNT(*) FROM user_behaviors"), 0);
    store
        .create_segment(
            ws.id,
            Segment {
                id: "s1".into(),
                name: "everyone".into(),
                filter: json!({"and": []}),
                created_at: NOW,
                updated_at: NOW,
            },
        )
        .await
        .unwrap();
    while count(&file, "SELECT COUNT(*) FROM user_behaviors") != 1 {
        assert!(
            Instant::now() < deadline,
            "the behaviour index never filled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_in_an_optimistic_batch_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_with(&dir, Duration::from_secs(3600)));
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..120 {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            if i % 20 == 0 {
                // Conflicts: fails inside the batch it lands in.
                Err(store.create_workspace("w", NOW).await.err())
            } else {
                Ok(track(
                    &store,
                    &ws,
                    json!({"attributes": [{"external_id": format!("u{i}"), "n": i}],
                           "events": [{"external_id": format!("u{i}"), "name": "e", "time": "2025-01-01T00:00:00Z"}]}),
                )
                .await)
            }
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(out) => assert_eq!((out.attributes_processed, out.events_processed), (1, 1)),
            Err(e) => assert!(matches!(e, Some(StoreError::Conflict(_))), "job {i}: {e:?}"),
        }
    }
    let events = store.read_events(ws.id, 0, 10_000).await.unwrap();
    assert_eq!(events.len(), 2 * 114, "every successful job's events, once");
    for i in [1, 57, 119] {
        let user = export_one(&store, &ws, &format!("u{i}")).await.unwrap();
        assert_eq!(user["custom_attributes"]["n"], i);
    }
    assert_eq!(store.list_workspaces().await.unwrap().len(), 1);
}

/// Runs one scenario touching every way a user changes (attributes of every kind, events,
/// purchases, email-addressed updates, device identification and merge, renames, deletes),
/// exporting along the way, and returns every export. Exports name users by external id, so
/// two stores given the same scenario must answer the same, braze ids aside.
async fn scenario(store: &SqliteStore) -> Vec<serde_json::Value> {
    use tideway_core::ids::{DeviceId, ExternalId};
    use tideway_core::users::{
        DeleteRequest, ExportRequest, IdentifyItem, IdentifySource, RenameItem, UserKey,
    };
    let ext = |s: &str| ExternalId::parse(s).unwrap();
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let names: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    let mut exports = Vec::new();
    for round in 0..6 {
        let attributes: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                json!({"external_id": n, "first_name": format!("F{round}"), "visits": {"inc": i},
                       "tags": {"add": [format!("t{round}")], "remove": [format!("t{}", round.max(1) - 1)]},
                       "nested": {"a": round, "b": [i]}})
            })
            .collect();
        let events: Vec<_> = names
            .iter()
            .map(|n| json!({"external_id": n, "name": format!("e{}", round % 3), "time": "2025-01-01T00:00:00Z", "properties": {"r": round}}))
            .collect();
        let purchases: Vec<_> = names
            .iter()
            .take(4)
            .map(|n| json!({"external_id": n, "product_id": "p", "currency": "USD", "price": 2.5, "quantity": 2, "time": "2025-01-01T00:00:00Z"}))
            .collect();
        track(
            store,
            &ws,
            json!({"attributes": attributes, "events": events, "purchases": purchases}),
        )
        .await;
        // The same user many times in one request.
        let many: Vec<_> = (0..20)
            .map(|k| json!({"external_id": "u1", "name": "burst", "time": "2025-01-01T00:00:00Z", "properties": {"k": k}}))
            .collect();
        track(
            store,
            &ws,
            json!({"events": many, "attributes": [{"external_id": "u1", "burst": {"inc": 1}}]}),
        )
        .await;
        match round {
            1 => {
                track(
                    store,
                    &ws,
                    json!({"attributes": [{"external_id": "u2", "email": "two@example.com"}]}),
                )
                .await;
                track(
                    store,
                    &ws,
                    json!({"attributes": [{"email": "two@example.com", "via_email": true}]}),
                )
                .await;
            }
            2 => {
                track(
                    store,
                    &ws,
                    json!({"attributes": [{"device_id": "d9", "anon": 1}]}),
                )
                .await;
                let items = vec![(
                    0,
                    IdentifyItem {
                        external_id: ext("u9"),
                        source: IdentifySource::Device(DeviceId::parse("d9").unwrap()),
                    },
                )];
                store.identify(&ws, items, NOW).await.unwrap();
                track(
                    store,
                    &ws,
                    json!({"attributes": [{"device_id": "d10", "anon": 2}]}),
                )
                .await;
                track(store, &ws, json!({"attributes": [{"external_id": "fresh", "device_id": "d10", "identified": true}]})).await;
            }
            3 => {
                store
                    .rename_external_ids(
                        &ws,
                        vec![RenameItem {
                            current: ext("u3"),
                            new: ext("u3b"),
                        }],
                        NOW,
                    )
                    .await
                    .unwrap();
                track(
                    store,
                    &ws,
                    json!({"attributes": [{"external_id": "u3", "after_rename": true}]}),
                )
                .await;
            }
            4 => {
                let request = DeleteRequest {
                    users: vec![UserKey::External(ext("u5"))],
                };
                store.delete_users(&ws, request, NOW).await.unwrap();
                track(
                    store,
                    &ws,
                    json!({"attributes": [{"external_id": "u5", "reborn": true}]}),
                )
                .await;
            }
            _ => {}
        }
        let mut ids = names.clone();
        ids.extend(["u3b".to_owned(), "fresh".to_owned()]);
        let req = ExportRequest {
            external_ids: ids.iter().map(|s| ExternalId::parse(s).unwrap()).collect(),
            ..ExportRequest::default()
        };
        let mut users = store.export_ids(&ws, req).await.unwrap().users;
        for u in &mut users {
            // Braze ids (and what derives from them) differ between stores.
            for key in ["braze_id", "appboy_id", "random_bucket"] {
                u.remove(key);
            }
        }
        users.sort_by_key(|u| u["external_id"].to_string());
        exports.push(serde_json::Value::from(
            users
                .into_iter()
                .map(serde_json::Value::Object)
                .collect::<Vec<_>>(),
        ));
    }
    exports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_forgets_and_sweeps_constantly_answers_like_one_that_remembers() {
    let remembering = tempfile::tempdir().unwrap();
    let expected = scenario(&open_with(&remembering, Duration::from_secs(3600))).await;
    let forgetting = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        sweep_period: Duration::from_millis(1),
        max_cached_users: 1,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&forgetting.path().join("t.sqlite"), options).unwrap();
    let got = scenario(&store).await;
    assert_eq!(expected.len(), got.len());
    for (round, (e, g)) in expected.iter().zip(&got).enumerate() {
        assert_eq!(e, g, "exports differ after round {round}");
    }
    // What the scenario did, so the comparison means something.
    let last = expected.last().unwrap().as_array().unwrap();
    let user = |id: &str| last.iter().find(|u| u["external_id"] == id).unwrap();
    assert_eq!(user("u1")["custom_attributes"]["burst"], 6);
    assert_eq!(user("u2")["custom_attributes"]["via_email"], true);
    assert_eq!(user("u9")["custom_attributes"]["anon"], 1);
    assert_eq!(user("fresh")["custom_attributes"]["anon"], 2);
    assert_eq!(user("u3b")["custom_attributes"]["after_rename"], true);
    // Deleted in round 4, then a new user: only round 5's increment, not six rounds' worth.
    assert_eq!(user("u5")["custom_attributes"]["reborn"], true);
    assert_eq!(user("u5")["custom_attributes"]["visits"], 5);
    assert_eq!(user("u4")["custom_attributes"]["visits"], 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scenario_survives_a_crash_with_every_row_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&dir, Duration::from_secs(3600));
    let expected = scenario(&store).await;
    std::mem::forget(store);
    let store = open_with(&dir, Duration::from_secs(3600));
    let ws = store.workspace_by_name("w").await.unwrap().unwrap();
    let before = expected.last().unwrap().as_array().unwrap();
    for user in before {
        let id = user["external_id"].as_str().unwrap();
        let mut after = export_one(&store, &ws, id).await.unwrap();
        for key in ["braze_id", "appboy_id", "random_bucket"] {
            after.remove(key);
        }
        assert_eq!(&serde_json::Value::Object(after), user, "{id}");
    }
}
