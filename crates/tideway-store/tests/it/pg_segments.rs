//! PostgreSQL store: segments and the change feed. Segment CRUD answers as on SQLite, and a
//! damaged filter is `Corrupt`. The feed is held to a full load as SQLite's is
//! (`segment_feed.rs`): an index built from `segment_profiles` at some point and caught up step
//! by step from `segment_profile_changes` must answer every filter as one built from every
//! profile at the end — after random operations written through two nodes (two `PgStore`s on
//! one database) and read through the other, and with writers on both nodes running while the
//! reader catches up, so a catch-up reads in the middle of commits. And the full load itself
//! answers as SQLite's after the same operations, and skips a damaged event body as SQLite does.

use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::json;
use tideway_core::clock::Millis;
use tideway_core::ids::WorkspaceId;
use tideway_core::segments::{LiveIndex, Member, Segment};
use tideway_core::store::{AdminStore, SegmentStore, StoreError, Workspace};
use tideway_segment::Filter;
use tideway_store::postgres::PgStore;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::pg::TestDb;

const NOW: Millis = Millis(1_750_000_000_000);

fn segment(id: &str, name: &str, at: i64) -> Segment {
    Segment {
        id: id.to_owned(),
        name: name.to_owned(),
        filter: json!({"attribute": {"name": "plan", "op": "equals", "value": name}}),
        created_at: Millis(NOW.0 + at),
        updated_at: Millis(NOW.0 + at),
    }
}

/// Every segment call, with its edge cases, on `store`; the answers as text.
async fn crud_script<S: AdminStore + SegmentStore>(store: &S) -> Vec<String> {
    let mut lines = Vec::new();
    let mut note = |what: &str, answer: &dyn Debug| lines.push(format!("{what}: {answer:?}"));
    let a = store.create_workspace("a", NOW).await.unwrap().id;
    let b = store.create_workspace("b", NOW).await.unwrap().id;
    // Listed by creation time, then id: "s-b" and "s-a" share a time.
    for (id, name, at) in [("s-c", "first", 0), ("s-b", "tie", 5), ("s-a", "tie2", 5)] {
        note(
            "create",
            &store.create_segment(a, segment(id, name, at)).await,
        );
    }
    note(
        "create in b",
        &store.create_segment(b, segment("s-z", "other", 1)).await,
    );
    note("get", &store.segment(a, "s-b").await);
    note("get from other ws", &store.segment(b, "s-b").await);
    note("get missing", &store.segment(a, "nope").await);
    note("list a", &store.list_segments(a).await);
    note("list b", &store.list_segments(b).await);
    let filter = json!({"and": [{"identified": true}]});
    let later = Millis(NOW.0 + 99);
    note(
        "update",
        &store
            .update_segment(a, "s-c", "renamed".into(), filter.clone(), later)
            .await,
    );
    note(
        "update missing",
        &store
            .update_segment(a, "nope", "x".into(), filter.clone(), later)
            .await,
    );
    note(
        "update in other ws",
        &store
            .update_segment(b, "s-c", "x".into(), filter, later)
            .await,
    );
    note("delete", &store.delete_segment(a, "s-b").await);
    note("delete again", &store.delete_segment(a, "s-b").await);
    note("delete in other ws", &store.delete_segment(b, "s-a").await);
    note("list a after", &store.list_segments(a).await);
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_calls_answer_as_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("t.sqlite"), SqliteOptions::default()).unwrap();
    let expected = crud_script(&sqlite).await;
    let db = TestDb::create().await;
    let got = crud_script(&db.store().await).await;
    for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(got, expected, "answer {i} differs from SQLite's");
    }
    assert_eq!(got.len(), expected.len());
    assert!(got.contains(&"delete: Ok(true)".to_owned()));
    assert!(got.contains(&"update missing: Ok(None)".to_owned()));
    let listed = got.iter().find(|l| l.starts_with("list a:")).unwrap();
    let order: Vec<usize> = ["\"s-c\"", "\"s-a\"", "\"s-b\""]
        .iter()
        .map(|id| listed.find(id).unwrap())
        .collect();
    assert!(order.is_sorted(), "oldest first, then by id: {listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_of_a_missing_workspace_is_not_found_and_a_damaged_filter_corrupt() {
    let db = TestDb::create().await;
    let store = db.store().await;
    assert_eq!(
        store
            .create_segment(WorkspaceId(777), segment("s", "x", 0))
            .await,
        Err(StoreError::NotFound("workspace 777".into()))
    );
    let ws = store.create_workspace("w", NOW).await.unwrap().id;
    store
        .create_segment(ws, segment("s", "x", 0))
        .await
        .unwrap();
    assert!(matches!(
        store.create_segment(ws, segment("s", "again", 0)).await,
        Err(StoreError::Conflict(_))
    ));
    db.client()
        .await
        .execute("UPDATE segments SET filter = '{not json'", &[])
        .await
        .unwrap();
    assert!(matches!(
        store.segment(ws, "s").await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.list_segments(ws).await,
        Err(StoreError::Corrupt(_))
    ));
}

// --- the feed against a full load -----------------------------------------------------------------

use super::feed_model::{Op, answers, catch_up, every_leaf, filter, op, run};

/// `live`, caught up once more, against a full load read through `store`.
async fn agrees_with_a_full_load(
    store: &PgStore,
    ws: WorkspaceId,
    mut live: LiveIndex,
    filters: &[Filter],
) -> Result<(), TestCaseError> {
    catch_up(store, ws, &mut live).await;
    let full = LiveIndex::from_snapshot(store.segment_profiles(ws).await.unwrap());
    prop_assert_eq!(live.position(), full.position());
    prop_assert_eq!(store.segment_feed_head(ws).await.unwrap(), full.position());
    prop_assert_eq!(live.len(), full.len());
    let (got, expected) = (answers(&live, filters), answers(&full, filters));
    for ((f, got), expected) in filters.iter().zip(&got).zip(&expected) {
        prop_assert_eq!(got, expected, "filter {}", f.to_json());
    }
    Ok(())
}

/// Runs `ops` in a fresh workspace, writing through one node and reading the feed through the
/// other (the index is fully loaded after `load_at` of them and caught up at each `CatchUp`),
/// then compares it, caught up, with a full load.
async fn differential(
    nodes: &[PgStore; 2],
    ws: &Workspace,
    ops: &[Op],
    load_at: usize,
    filters: &[Filter],
) -> Result<(), TestCaseError> {
    let mut writer = 0;
    let reader = |writer: usize| &nodes[1 - writer];
    let mut live: Option<LiveIndex> = None;
    for (i, op) in ops.iter().enumerate() {
        if i == load_at.min(ops.len()) {
            let snapshot = reader(writer).segment_profiles(ws.id).await.unwrap();
            live = Some(LiveIndex::from_snapshot(snapshot));
        }
        match op {
            Op::CatchUp => {
                if let Some(live) = live.as_mut() {
                    catch_up(reader(writer), ws.id, live).await;
                }
            }
            Op::Disrupt => writer = 1 - writer,
            op => run(&nodes[writer], ws, op).await,
        }
    }
    let live = match live {
        Some(live) => live,
        None => LiveIndex::from_snapshot(reader(writer).segment_profiles(ws.id).await.unwrap()),
    };
    agrees_with_a_full_load(reader(writer), ws.id, live, filters).await
}

/// Two nodes on one database, for a whole property run (one workspace per case).
fn two_nodes(rt: &tokio::runtime::Runtime) -> (TestDb, [PgStore; 2]) {
    rt.block_on(async {
        let db = TestDb::create().await;
        let nodes = [db.store().await, db.store().await];
        (db, nodes)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn an_index_caught_up_incrementally_answers_as_a_full_load() {
    let rt = runtime();
    let (db, nodes) = two_nodes(&rt);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    let strategy = (vec(op(), 1..40), 0usize..12, vec(filter(), 1..12));
    let cases = AtomicUsize::new(0);
    let outcome = runner.run(&strategy, |(ops, load_at, filters)| {
        let case = cases.fetch_add(1, Ordering::Relaxed);
        rt.block_on(async {
            let ws = nodes[0]
                .create_workspace(&format!("w{case}"), NOW)
                .await
                .unwrap();
            differential(&nodes, &ws, &ops, load_at, &filters).await
        })
    });
    drop(nodes);
    drop(rt);
    drop(db);
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// Two nodes on one database: a workspace's segment definitions lock held by one is waited
/// for by the other, and released (unlocked, its connection back in the pool) on drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_definitions_lock_excludes_the_other_node_and_not_other_workspaces() {
    use std::time::Duration;
    let db = TestDb::create().await;
    let (one, two) = (db.store().await, db.store().await);
    let a = one.create_workspace("a", NOW).await.unwrap().id;
    let b = one.create_workspace("b", NOW).await.unwrap().id;
    let held = one.lock_segment_definitions(a).await.unwrap();
    let other_ws = tokio::time::timeout(Duration::from_secs(10), two.lock_segment_definitions(b))
        .await
        .expect("another workspace's lock is free")
        .unwrap();
    let waiter = {
        let two = two.clone();
        tokio::spawn(async move { two.lock_segment_definitions(a).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the other node took a held lock");
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("released on the first node, the lock passes to the second")
        .unwrap()
        .unwrap();
    drop(other_ws);
    // The connections went back to the pool unlocked: the first node takes both again.
    for ws in [a, b] {
        let again = tokio::time::timeout(Duration::from_secs(10), one.lock_segment_definitions(ws))
            .await
            .expect("free again");
        drop(again.unwrap());
    }
}

/// Two writers, one per node, run random operations while a reader catches up in a loop: a
/// catch-up lands between and during their commits, and must still miss nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_while_two_nodes_write_misses_nothing() {
    let db = TestDb::create().await;
    let nodes = [db.store().await, db.store().await];
    let ws = nodes[0].create_workspace("w", NOW).await.unwrap();
    let mut runner = TestRunner::deterministic();
    let mut writers = Vec::new();
    for node in &nodes {
        let ops: Vec<Op> = (0..60)
            .map(|_| op().new_tree(&mut runner).unwrap().current())
            .collect();
        let (node, ws) = (node.clone(), ws.clone());
        writers.push(tokio::spawn(async move {
            for op in &ops {
                run(&node, &ws, op).await;
            }
        }));
    }
    let reader = db.store().await;
    let mut live = LiveIndex::from_snapshot(reader.segment_profiles(ws.id).await.unwrap());
    let mut rounds = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        catch_up(&reader, ws.id, &mut live).await;
        rounds += 1;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(rounds > 1, "the reader caught up while the writers ran");
    agrees_with_a_full_load(&reader, ws.id, live, &every_leaf())
        .await
        .unwrap();
}

/// Members without the random braze_id, which differs between two stores.
/// Each answer as its members' external ids, sorted: PostgreSQL numbers users from blocks
/// reserved ahead (seqs with holes), SQLite densely, so the same user has different seqs.
fn ids(answers: Vec<Vec<Member>>) -> Vec<Vec<Option<String>>> {
    answers
        .into_iter()
        .map(|members| {
            let mut ids: Vec<Option<String>> = members.into_iter().map(|m| m.external_id).collect();
            ids.sort();
            ids
        })
        .collect()
}

#[test]
fn a_full_load_answers_as_sqlite_after_the_same_operations() {
    let rt = runtime();
    let (db, nodes) = two_nodes(&rt);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    });
    let strategy = (vec(op(), 1..40), vec(filter(), 1..12));
    let cases = AtomicUsize::new(0);
    let outcome = runner.run(&strategy, |(ops, filters)| {
        let case = cases.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::tempdir().unwrap();
        let sqlite =
            SqliteStore::open(&dir.path().join("t.sqlite"), SqliteOptions::default()).unwrap();
        rt.block_on(async {
            let pg_ws = nodes[0]
                .create_workspace(&format!("w{case}"), NOW)
                .await
                .unwrap();
            let sqlite_ws = sqlite.create_workspace("w", NOW).await.unwrap();
            let mut writer = 0;
            for op in &ops {
                if let Op::Disrupt = op {
                    writer = 1 - writer;
                }
                run(&nodes[writer], &pg_ws, op).await;
                run(&sqlite, &sqlite_ws, op).await;
            }
            let pg = LiveIndex::from_snapshot(nodes[0].segment_profiles(pg_ws.id).await.unwrap());
            let expected =
                LiveIndex::from_snapshot(sqlite.segment_profiles(sqlite_ws.id).await.unwrap());
            prop_assert_eq!(pg.len(), expected.len());
            let (got, expected) = (
                ids(answers(&pg, &filters)),
                ids(answers(&expected, &filters)),
            );
            for ((f, got), expected) in filters.iter().zip(&got).zip(&expected) {
                prop_assert_eq!(got, expected, "filter {}", f.to_json());
            }
            Ok(())
        })
    });
    drop(nodes);
    drop(rt);
    drop(db);
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// A custom event whose body does not decode is skipped by both reads, as SQLite skips it; it
/// still moves the position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_event_body_is_skipped_by_the_load_and_the_feed() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    run(
        &store,
        &ws,
        &Op::Track {
            user: 1,
            plan: None,
            score: None,
            email: None,
            event: Some(("open", 0)),
            purchase: None,
        },
    )
    .await;
    let mut live = LiveIndex::from_snapshot(store.segment_profiles(ws.id).await.unwrap());
    let user_seq: i64 = db
        .client()
        .await
        .query_one("SELECT seq FROM users WHERE workspace_id = $1", &[&ws.id.0])
        .await
        .unwrap()
        .get(0);
    // A row appended as a writer would (the counter, then the row), with a body that is not
    // JSON and one without the event's name.
    for body in ["{not json", r#"{"properties":{"nom":"open"}}"#] {
        db.client()
            .await
            .execute(
                "WITH s AS (
                     INSERT INTO workspace_sequences AS c (workspace_id, name, head)
                     VALUES ($1, 'event_log', 1)
                     ON CONFLICT (workspace_id, name) DO UPDATE SET head = c.head + 1
                     RETURNING head
                 )
                 INSERT INTO event_log (workspace_id, seq, user_seq, event_id, event_type, time, body)
                 SELECT $1, s.head, $2, md5(s.head::text), 'users.behaviors.CustomEvent', 1750000000, $3
                 FROM s",
                &[&ws.id.0, &user_seq, &body],
            )
            .await
            .unwrap();
    }
    let changes = store
        .segment_profile_changes(ws.id, live.position())
        .await
        .unwrap();
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(changes.position.event_seq, live.position().event_seq + 2);
    live.apply(&changes);
    let once =
        Filter::from_json(&json!({"event": {"name": "open", "op": "count_at_least", "value": 1}}))
            .unwrap();
    let twice =
        Filter::from_json(&json!({"event": {"name": "open", "op": "count_at_least", "value": 2}}))
            .unwrap();
    let full = LiveIndex::from_snapshot(store.segment_profiles(ws.id).await.unwrap());
    assert_eq!(full.position(), live.position());
    for index in [&live, &full] {
        assert_eq!(
            answers(index, &[once.clone(), twice.clone()])
                .into_iter()
                .map(|members| members
                    .into_iter()
                    .map(|m| (m.seq.0, m.external_id))
                    .collect())
                .collect::<Vec<Vec<_>>>(),
            [vec![(user_seq as u32, Some("u1".to_owned()))], vec![]]
        );
    }

    // A profile that does not decode fails the load as damaged data, not with a panic.
    db.client()
        .await
        .execute(
            "UPDATE users SET profile = '[' WHERE workspace_id = $1",
            &[&ws.id.0],
        )
        .await
        .unwrap();
    assert!(matches!(
        store.segment_profiles(ws.id).await,
        Err(StoreError::Corrupt(_))
    ));
}
