//! PostgreSQL store: segments. Segment CRUD answers as on SQLite, and a damaged filter is
//! `Corrupt`.

use std::fmt::Debug;

use serde_json::json;
use tideway_core::clock::Millis;
use tideway_core::ids::WorkspaceId;
use tideway_core::segments::Segment;
use tideway_core::store::{AdminStore, SegmentStore, StoreError};
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
