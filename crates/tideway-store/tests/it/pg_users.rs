//! PostgreSQL store: units of work and cohort reads. The same scripts of user and cohort
//! services run on SQLite and on PostgreSQL and must give the same answers (SQLite is the
//! reference); then what only the PostgreSQL store has: group commit with a unit failing alone,
//! log positions gap-free and in commit order under concurrent writers, and two nodes creating
//! the same users at once.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use serde_json::{Map, Value, json};
use tideway_core::clock::Millis;
use tideway_core::cohorts::{CohortChange, CohortId, CohortIdentifier, CohortUpsert};
use tideway_core::ids::{
    AliasLabel, AliasName, BrazeId, DeviceId, Email, ExternalId, UserAlias, WorkspaceId,
};
use tideway_core::store::prelude::*;
use tideway_core::store::{SegmentSyncPage, StoreError, Workspace, run_unit};
use tideway_core::track::parse_track;
use tideway_core::users::{
    AliasNewItem, AliasUpdateItem, DeleteRequest, ExportRequest, IdentifyItem, IdentifySource,
    MergeItem, RenameItem, UserKey,
};
use tideway_store::postgres::PgStore;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::pg::TestDb;

const NOW: Millis = Millis(1_750_000_000_000);

fn ext(s: &str) -> ExternalId {
    ExternalId::parse(s).unwrap()
}

fn alias(label: &str, name: &str) -> UserAlias {
    UserAlias {
        label: AliasLabel::parse(label).unwrap(),
        name: AliasName::parse(name).unwrap(),
    }
}

fn dev(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn cid(s: &str) -> CohortId {
    CohortId::parse(s).unwrap()
}

async fn track<S: Services + ?Sized>(store: &S, ws: &Workspace, body: Value) -> String {
    let req = parse_track(body.as_object().expect("object")).expect("parses");
    format!("{:?}", store.track(ws, req, NOW).await)
}

/// An exported profile without what is random per run (the braze id and what derives from it).
fn stable(mut user: Map<String, Value>) -> Map<String, Value> {
    for random in ["braze_id", "appboy_id", "random_bucket"] {
        user.remove(random);
    }
    user
}

async fn export<S: Services + ?Sized>(store: &S, ws: &Workspace, req: ExportRequest) -> String {
    match store.export_ids(ws, req).await {
        Ok(out) => {
            let users: Vec<_> = out.users.into_iter().map(stable).collect();
            format!("{users:?} invalid {:?}", out.invalid_user_ids)
        }
        Err(e) => format!("error {e:?}"),
    }
}

fn everyone() -> ExportRequest {
    ExportRequest {
        external_ids: ["alice", "alicia", "bob", "carol", "dave", "nobody"]
            .into_iter()
            .map(ext)
            .collect(),
        aliases: vec![
            alias("crm", "c-1"),
            alias("crm", "c-2"),
            alias("crm", "c-9"),
        ],
        device_id: Some(dev("d1")),
        email: Some(Email::parse("bob@example.com").unwrap()),
        ..ExportRequest::default()
    }
}

/// Every user service, with the identity rules' edge cases, on `store`; the answers as text.
async fn users_script<S: Store>(store: &S) -> (Workspace, Vec<String>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let mut lines = Vec::new();
    let mut note = |what: &str, answer: &dyn Debug| lines.push(format!("{what}: {answer:?}"));
    note(
        "track",
        &track(store, &ws, json!({
            "attributes": [
                {"external_id": "alice", "first_name": "Alice", "plan": "pro", "visits": {"inc": 1}},
                {"external_id": "bob", "email": "bob@example.com", "tags": ["a", "b"]},
                {"device_id": "d1", "color": "red", "size": 3},
                {"user_alias": {"alias_name": "c-1", "alias_label": "crm"}, "_update_existing_only": false, "tier": "gold"},
                {"external_id": "ghost", "_update_existing_only": true, "x": 1},
                {"braze_id": "000000000000000000000000", "x": 1},
            ],
            "events": [
                {"external_id": "alice", "name": "opened", "time": "2025-01-01T00:00:00Z"},
                {"external_id": "alice", "name": "opened", "time": "2025-01-02T00:00:00Z", "properties": {"k": "v"}},
                {"device_id": "d1", "name": "browsed", "time": "2025-01-01T00:00:00Z"},
            ],
            "purchases": [
                {"external_id": "bob", "product_id": "sku-1", "currency": "USD", "price": 9.99, "quantity": 2, "time": "2025-01-01T00:00:00Z"},
            ],
        }))
        .await,
    );
    // The same user twice in one request, then again: the visits counter adds up.
    note(
        "track again",
        &track(
            store,
            &ws,
            json!({"attributes": [
                {"external_id": "alice", "visits": {"inc": 1}},
                {"external_id": "alice", "visits": {"inc": 1}, "last_name": "Liddell"},
                {"email": "dave@example.com", "x": 1},
            ]}),
        )
        .await,
    );
    // Alice with d1's device: the anonymous d1 user is merged into her and orphaned.
    note(
        "track with device",
        &track(
            store,
            &ws,
            json!({"attributes": [{"external_id": "alice", "device_id": "d1", "size": 4, "user_alias": {"alias_name": "c-2", "alias_label": "crm"}}]}),
        )
        .await,
    );
    note("export", &export(store, &ws, everyone()).await);
    let identify = vec![
        (
            0,
            IdentifyItem {
                external_id: ext("carol"),
                source: IdentifySource::Alias(alias("crm", "c-1")),
            },
        ),
        (
            1,
            IdentifyItem {
                external_id: ext("zed"),
                source: IdentifySource::Alias(alias("crm", "missing")),
            },
        ),
        (
            2,
            IdentifyItem {
                external_id: ext("bob"),
                source: IdentifySource::Email(Email::parse("dave@example.com").unwrap(), vec![]),
            },
        ),
    ];
    note("identify", &store.identify(&ws, identify, NOW).await);
    let aliases = vec![
        (
            0,
            AliasNewItem {
                external_id: Some(ext("bob")),
                alias: alias("crm", "c-3"),
            },
        ),
        (
            1,
            AliasNewItem {
                external_id: Some(ext("alice")),
                alias: alias("crm", "c-3"),
            },
        ),
        (
            2,
            AliasNewItem {
                external_id: None,
                alias: alias("web", "w-1"),
            },
        ),
    ];
    note("alias new", &store.alias_new(&ws, aliases, NOW).await);
    let updates = vec![
        (
            0,
            AliasUpdateItem {
                old: alias("crm", "c-3"),
                new_name: AliasName::parse("c-9").unwrap(),
            },
        ),
        (
            1,
            AliasUpdateItem {
                old: alias("crm", "nope"),
                new_name: AliasName::parse("c-10").unwrap(),
            },
        ),
    ];
    note("alias update", &store.alias_update(&ws, updates, NOW).await);
    let merges = vec![
        (
            0,
            MergeItem {
                merge: UserKey::External(ext("carol")),
                keep: UserKey::External(ext("bob")),
            },
        ),
        (
            1,
            MergeItem {
                merge: UserKey::External(ext("bob")),
                keep: UserKey::External(ext("bob")),
            },
        ),
    ];
    note("merge", &store.merge_users(&ws, merges, NOW).await);
    note("export after merge", &export(store, &ws, everyone()).await);
    let renames = vec![
        RenameItem {
            current: ext("alice"),
            new: ext("alicia"),
        },
        RenameItem {
            current: ext("bob"),
            new: ext("alicia"),
        },
    ];
    note(
        "rename",
        &store.rename_external_ids(&ws, renames, NOW).await,
    );
    note(
        "export renamed",
        &export(
            store,
            &ws,
            ExportRequest {
                external_ids: vec![ext("alice")],
                ..ExportRequest::default()
            },
        )
        .await,
    );
    note(
        "remove",
        &store
            .remove_external_ids(&ws, vec![ext("alice"), ext("alicia")])
            .await,
    );
    let delete = DeleteRequest {
        users: vec![
            UserKey::External(ext("bob")),
            UserKey::Alias(alias("web", "w-1")),
            UserKey::External(ext("nobody")),
        ],
    };
    note("delete", &store.delete_users(&ws, delete, NOW).await);
    note("export at the end", &export(store, &ws, everyone()).await);
    // A deleted user's external id is free again: a new user, not the tombstone.
    note(
        "track deleted id",
        &track(
            store,
            &ws,
            json!({"attributes": [{"external_id": "bob", "x": 2}]}),
        )
        .await,
    );
    note(
        "export new bob",
        &export(
            store,
            &ws,
            ExportRequest {
                external_ids: vec![ext("bob")],
                ..ExportRequest::default()
            },
        )
        .await,
    );
    (ws, lines)
}

fn sqlite(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("t.sqlite"), SqliteOptions::default()).unwrap()
}

/// `(seq, user_seq, event_type)` of the workspace's event log, read with SQL.
async fn pg_events(store: &PgStore, ws: WorkspaceId) -> Vec<(i64, Option<i64>, String)> {
    let client = store.pool().client().await.unwrap();
    client
        .query(
            "SELECT seq, user_seq, event_type FROM event_log WHERE workspace_id = $1 ORDER BY seq",
            &[&ws.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The values of `column` in `table` for the workspace, in order.
async fn pg_column(store: &PgStore, ws: WorkspaceId, table: &str, column: &str) -> Vec<i64> {
    let client = store.pool().client().await.unwrap();
    client
        .query(
            &format!("SELECT {column} FROM {table} WHERE workspace_id = $1 ORDER BY {column}"),
            &[&ws.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn gap_free(seqs: &[i64]) -> bool {
    seqs.iter().copied().eq(1..=seqs.len() as i64)
}

/// Users' seqs come from blocks reserved ahead: unique and never reused, with holes where a
/// block's rest or a rolled-back creation was given up (`postgres/users.rs`, `SeqSource`).
fn distinct(seqs: &[i64]) -> bool {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.len() == seqs.len() && sorted.iter().all(|s| *s > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_services_answer_as_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let reference = sqlite(&dir);
    let (sq_ws, expected) = users_script(&reference).await;
    let db = TestDb::create().await;
    let store = db.store().await;
    let (ws, got) = users_script(&store).await;
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(e, g);
    }
    assert_eq!(expected.len(), got.len());

    // The same events about the same users, in the same order; gap-free positions.
    let sq_events: Vec<(Option<i64>, String)> = reference
        .read_events(sq_ws.id, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            (
                e.user.map(|u| i64::from(u.0)),
                e.event.event_type.as_str().to_owned(),
            )
        })
        .collect();
    let events = pg_events(&store, ws.id).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.0).collect();
    assert!(gap_free(&seqs), "{seqs:?}");
    let pg: Vec<(Option<i64>, String)> = events.into_iter().map(|e| (e.1, e.2)).collect();
    assert_eq!(pg, sq_events);
    // Users are numbered densely; the feed heard of every creation and identifier change.
    assert!(distinct(&pg_column(&store, ws.id, "users", "seq").await));
    let changes = pg_column(&store, ws.id, "segment_user_changes", "change_seq").await;
    assert!(gap_free(&changes) && changes.len() >= 7, "{changes:?}");
    let merges = pg_column(&store, ws.id, "user_merges", "from_seq").await;
    assert_eq!(
        merges.len(),
        3,
        "d1 into alice, dave's email user into bob, carol into bob"
    );
}

/// Cohort import, Heap sync pages, and the reads, with merges and deletes moving members.
async fn cohorts_script<S: Store>(store: &S) -> Vec<String> {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let mut lines = Vec::new();
    track(store, &ws, json!({"attributes": [
        {"external_id": "known", "x": 1},
        {"external_id": "other", "x": 1},
        {"device_id": "anon-dev", "x": 1},
        {"device_id": "was-anon", "x": 1},
        {"user_alias": {"alias_name": "a@b", "alias_label": "email"}, "_update_existing_only": false, "x": 1},
    ]}))
    .await;
    track(
        store,
        &ws,
        json!({"attributes": [{"external_id": "now-known", "device_id": "was-anon"}]}),
    )
    .await;
    let id = |s: &str| CohortIdentifier::External(ext(s));
    let change = |identifiers: Vec<CohortIdentifier>, remove: bool| CohortChange {
        identifiers,
        remove,
    };
    let mut note = |what: &str, answer: &dyn Debug| lines.push(format!("{what}: {answer:?}"));
    let changes = vec![change(
        vec![
            id("known"),
            id("unknown"),
            CohortIdentifier::Device(dev("anon-dev")),
            CohortIdentifier::Device(dev("was-anon")),
            CohortIdentifier::Alias(alias("email", "a@b")),
            id("known"),
            CohortIdentifier::Unusable,
        ],
        false,
    )];
    note(
        "import",
        &store
            .apply_cohort_changes(&ws, "heap", cid("c1"), changes, NOW)
            .await,
    );
    let changes = vec![
        change(vec![id("other"), id("known")], false),
        change(vec![id("other"), id("unknown")], true),
        change(vec![CohortIdentifier::Device(dev("anon-dev"))], true),
    ];
    note(
        "add and remove",
        &store
            .apply_cohort_changes(&ws, "heap", cid("c1"), changes, Millis(NOW.0 + 1))
            .await,
    );
    note(
        "credentials test",
        &store
            .apply_cohort_changes(
                &ws,
                "heap",
                cid("made-up"),
                vec![change(vec![], false)],
                NOW,
            )
            .await,
    );
    let upsert = CohortUpsert {
        cohort_id: cid("c1"),
        name: "Abandoned checkout".into(),
        created_at: NOW,
    };
    note(
        "rename",
        &store.upsert_cohort(&ws, "heap", upsert, NOW).await,
    );
    let page = |number: i64, drain: bool, changes: Vec<CohortChange>| SegmentSyncPage {
        cohort_id: cid("seg-7"),
        name: Some("Trial – stuck".into()),
        page_key: Some(("task-1".into(), number)),
        drain,
        changes,
    };
    note(
        "sync page",
        &store
            .apply_segment_sync(
                &ws,
                "heap",
                page(
                    1,
                    false,
                    vec![change(
                        vec![id("known"), id("other"), id("now-known")],
                        false,
                    )],
                ),
                NOW,
            )
            .await,
    );
    note(
        "sync page again",
        &store
            .apply_segment_sync(
                &ws,
                "heap",
                page(1, false, vec![change(vec![id("known")], true)]),
                NOW,
            )
            .await,
    );
    note(
        "sync page 2",
        &store
            .apply_segment_sync(
                &ws,
                "heap",
                page(2, false, vec![change(vec![id("other")], true)]),
                NOW,
            )
            .await,
    );
    // "other" merges into "known": known keeps the union of memberships.
    let merge = vec![(
        0,
        MergeItem {
            merge: UserKey::External(ext("other")),
            keep: UserKey::External(ext("known")),
        },
    )];
    note(
        "merge",
        &store.merge_users(&ws, merge, Millis(NOW.0 + 2)).await,
    );
    let delete = DeleteRequest {
        users: vec![UserKey::External(ext("now-known"))],
    };
    note(
        "delete",
        &store.delete_users(&ws, delete, Millis(NOW.0 + 3)).await,
    );
    note("list", &store.list_cohorts(ws.id).await);
    for (partner, cohort) in [
        ("heap", "c1"),
        ("heap", "seg-7"),
        ("heap", "made-up"),
        ("amplitude", "c1"),
    ] {
        let members = store
            .cohort_members(ws.id, partner, cid(cohort), 0, 100)
            .await
            .map(|m| {
                m.map(|m| {
                    m.into_iter()
                        .map(|m| (m.user, m.external_id, m.entered_at))
                        .collect::<Vec<_>>()
                })
            });
        note(&format!("members {partner} {cohort}"), &members);
    }
    let page = store.cohort_members(ws.id, "heap", cid("c1"), 1, 1).await;
    note("members page", &page.map(|m| m.map(|m| m.len())));
    let known = store
        .export_ids(
            &ws,
            ExportRequest {
                external_ids: vec![ext("known")],
                ..ExportRequest::default()
            },
        )
        .await
        .unwrap();
    let braze = BrazeId::parse(known.users[0]["braze_id"].as_str().unwrap()).unwrap();
    note("user cohorts", &store.user_cohorts(ws.id, braze).await);
    let nobody = BrazeId::parse("000000000000000000000000").unwrap();
    note("nobody's cohorts", &store.user_cohorts(ws.id, nobody).await);
    let drain = SegmentSyncPage {
        cohort_id: cid("seg-7"),
        name: None,
        page_key: None,
        drain: true,
        changes: vec![],
    };
    note(
        "drain",
        &store.apply_segment_sync(&ws, "heap", drain, NOW).await,
    );
    note("list after drain", &store.list_cohorts(ws.id).await);
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cohort_import_and_reads_answer_as_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let expected = cohorts_script(&sqlite(&dir)).await;
    let db = TestDb::create().await;
    let store = db.store().await;
    let got = cohorts_script(&store).await;
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(e, g);
    }
    assert_eq!(expected.len(), got.len());
    let ws = store.workspace_by_name("w").await.unwrap().unwrap().id;
    let changes = pg_column(&store, ws, "cohort_membership_changes", "change_seq").await;
    assert!(gap_free(&changes) && changes.len() >= 10, "{changes:?}");
}

/// A unit of work submitted and not yet answered.
type Unit<'a> = Pin<Box<dyn Future<Output = Result<String, StoreError>> + Send + 'a>>;

/// Polls every future once per wake-up, in order, until all are done: the units they submit
/// are queued in this order within one poll, before any batch worker runs (current-thread
/// runtime), so they share a batch.
async fn join_all<T>(futures: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut slots: Vec<_> = futures.into_iter().map(|f| (f, None)).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, out) in slots.iter_mut().filter(|(_, out)| out.is_none()) {
            match future.as_mut().poll(cx) {
                Poll::Ready(v) => *out = Some(v),
                Poll::Pending => pending = true,
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    slots.into_iter().filter_map(|(_, out)| out).collect()
}

#[tokio::test]
async fn a_failing_unit_leaves_nothing_while_its_batch_neighbours_commit() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let mut units: Vec<Unit<'_>> = Vec::new();
    for i in 0..20 {
        let ws = ws.clone();
        let store = &store;
        if i == 7 {
            // Creates a user, logs an event and joins a cohort, then fails.
            units.push(Box::pin(run_unit(store, &ws, NOW, |tx, ctx| {
                let user =
                    tx.create_user_with_external_id(ctx.ids.braze_id(), &ext("doomed"), ctx.now)?;
                let cohort =
                    tx.upsert_cohort("heap", &cid("doomed-cohort"), None, ctx.now, ctx.now)?;
                tx.set_member(cohort, user.seq, true, ctx.now)?;
                tx.adjust_member_count(cohort, 1, ctx.now)?;
                Err::<String, _>(StoreError::Corrupt("planned failure".into()))
            })));
        } else {
            units.push(Box::pin(async move {
                let body = json!({
                    "attributes": [{"external_id": format!("u{i}"), "n": i}],
                    "events": [{"external_id": format!("u{i}"), "name": "e", "time": "2025-01-01T00:00:00Z"}],
                });
                let req = parse_track(body.as_object().unwrap()).unwrap();
                // Not named up front (as `Services::track` does): a keyed batch never takes
                // unit 7, so the neighbours would commit in a batch of their own.
                run_unit(store, &ws, NOW, move |tx, ctx| {
                    tideway_core::users::track(tx, ctx, &req)
                })
                .await
                .map(|o| format!("{o:?}"))
            }));
        }
    }
    let results = join_all(units).await;
    for (i, result) in results.iter().enumerate() {
        if i == 7 {
            assert_eq!(result, &Err(StoreError::Corrupt("planned failure".into())));
        } else {
            assert!(result.is_ok(), "unit {i}: {result:?}");
        }
    }
    let client = store.pool().client().await.unwrap();
    let count = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(sql, &[&ws.id.0])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM users WHERE workspace_id = $1 AND external_id = 'doomed'")
            .await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM cohorts WHERE workspace_id = $1").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM cohort_membership_changes WHERE workspace_id = $1").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM users WHERE workspace_id = $1").await,
        19
    );
    // The neighbours committed together, in one transaction, with gap-free positions.
    assert_eq!(
        count("SELECT count(DISTINCT xmin::text) FROM event_log WHERE workspace_id = $1").await,
        1
    );
    let seqs = pg_column(&store, ws.id, "event_log", "seq").await;
    assert_eq!(seqs.len(), 38);
    assert!(gap_free(&seqs));
    assert!(distinct(&pg_column(&store, ws.id, "users", "seq").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_following_the_log_never_skips_an_event_that_commits_late() {
    let db = TestDb::create().await;
    // Two nodes write one workspace while a consumer follows its log by position.
    let (a, b) = (db.store().await, db.store().await);
    let ws = a.create_workspace("w", NOW).await.unwrap();
    let writers = 8;
    let requests = 25;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = if w % 2 == 0 { a.clone() } else { b.clone() };
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..requests {
                let events: Vec<Value> = (0..5)
                    .map(|e| json!({"external_id": format!("w{w}-{}", (r + e) % 7), "name": "e", "time": "2025-01-01T00:00:00Z"}))
                    .collect();
                let req = parse_track(json!({"events": events}).as_object().unwrap()).unwrap();
                store.track(&ws, req, NOW).await.unwrap();
            }
        }));
    }
    let follower = {
        let client = db.client().await;
        let ws = ws.id;
        let total = (writers * requests * 5) as i64;
        tokio::spawn(async move {
            let mut position = 0i64;
            while position < total {
                let rows = client
                    .query(
                        "SELECT seq FROM event_log WHERE workspace_id = $1 AND seq > $2 ORDER BY seq",
                        &[&ws.0, &position],
                    )
                    .await
                    .unwrap();
                for row in rows {
                    let seq: i64 = row.get(0);
                    // Whatever is visible is contiguous from the position: nothing below a
                    // visible seq can still commit.
                    assert_eq!(seq, position + 1, "a gap below a visible event");
                    position = seq;
                }
                tokio::task::yield_now().await;
            }
            position
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(follower.await.unwrap(), (writers * requests * 5) as i64);
    assert!(distinct(&pg_column(&a, ws.id, "users", "seq").await));
    assert_eq!(
        pg_column(&a, ws.id, "users", "seq").await.len(),
        writers * 7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_creating_the_same_users_at_once_end_with_one_each() {
    let db = TestDb::create().await;
    let (a, b) = (Arc::new(db.store().await), Arc::new(db.store().await));
    let ws = a.create_workspace("w", NOW).await.unwrap();
    let ids = 40;
    let mut tasks = Vec::new();
    for (node, store) in [("a", &a), ("b", &b)] {
        for round in 0..4 {
            let store = Arc::clone(store);
            let ws = ws.clone();
            tasks.push(tokio::spawn(async move {
                // Both nodes name the same ids, in different orders.
                let objects: Vec<Value> = (0..ids)
                    .map(|i| if node == "a" { i } else { ids - 1 - i })
                    .map(|i| json!({"external_id": format!("same-{i}"), format!("{node}{round}"): true}))
                    .collect();
                let req = parse_track(json!({"attributes": objects}).as_object().unwrap()).unwrap();
                store.track(&ws, req, NOW).await
            }));
        }
    }
    for t in tasks {
        let out = t.await.unwrap().expect("every request succeeds");
        assert_eq!(out.attributes_processed, ids as usize);
    }
    let client = a.pool().client().await.unwrap();
    let users: i64 = client
        .query_one(
            "SELECT count(*) FROM users WHERE workspace_id = $1",
            &[&ws.id.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, ids);
    assert!(distinct(&pg_column(&a, ws.id, "users", "seq").await));
    // No update was lost: every request's attribute is on every user.
    let out = b
        .export_ids(
            &ws,
            ExportRequest {
                external_ids: (0..ids).map(|i| ext(&format!("same-{i}"))).collect(),
                ..ExportRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(out.users.len(), ids as usize);
    for user in out.users {
        let custom = user["custom_attributes"].as_object().unwrap();
        assert_eq!(custom.len(), 8, "{custom:?}");
    }
}

/// The sum of the `visits` attribute over users `hot-0` … `hot-{users - 1}`.
async fn total_visits(store: &PgStore, ws: &Workspace, users: usize) -> i64 {
    let out = store
        .export_ids(
            ws,
            ExportRequest {
                external_ids: (0..users).map(|u| ext(&format!("hot-{u}"))).collect(),
                ..ExportRequest::default()
            },
        )
        .await
        .unwrap();
    out.users
        .iter()
        .map(|u| u["custom_attributes"]["visits"].as_i64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_through_two_nodes_lose_no_update() {
    let db = TestDb::create().await;
    let (a, b) = (Arc::new(db.store().await), Arc::new(db.store().await));
    let ws = a.create_workspace("w", NOW).await.unwrap();
    let users = 5;
    let objects: Vec<Value> = (0..users)
        .map(|u| json!({"external_id": format!("hot-{u}"), "visits": 0}))
        .collect();
    let req = parse_track(json!({"attributes": objects}).as_object().unwrap()).unwrap();
    a.track(&ws, req, NOW).await.unwrap();
    // Batches that only change existing profiles let the next batch of the workspace start
    // before they commit; every one of these requests is such a batch.
    let (tasks_per_node, requests) = (8, 20);
    let mut tasks = Vec::new();
    for (n, store) in [&a, &b].into_iter().enumerate() {
        for t in 0..tasks_per_node {
            let store = Arc::clone(store);
            let ws = ws.clone();
            tasks.push(tokio::spawn(async move {
                for r in 0..requests {
                    // Three of the five users, in an order that varies.
                    let objects: Vec<Value> = (0..3)
                        .map(|k| (n + t + r + k * 2) % users)
                        .map(|u| json!({"external_id": format!("hot-{u}"), "visits": {"inc": 1}}))
                        .collect();
                    let req =
                        parse_track(json!({"attributes": objects}).as_object().unwrap()).unwrap();
                    store.track(&ws, req, NOW).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = total_visits(&a, &ws, users).await;
    assert_eq!(total, (2 * tasks_per_node * requests * 3) as i64);
    let seqs = pg_column(&a, ws.id, "event_log", "seq").await;
    assert_eq!(seqs.len(), users + 2 * tasks_per_node * requests * 3);
    assert!(gap_free(&seqs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_batches_naming_one_user_by_different_keys_lose_no_update() {
    let db = TestDb::create().await;
    let (a, b) = (Arc::new(db.store().await), Arc::new(db.store().await));
    let ws = a.create_workspace("w", NOW).await.unwrap();
    let users = 4;
    for u in 0..users {
        let req = parse_track(
            json!({"attributes": [{"external_id": format!("hot-{u}"), "visits": 0}]})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        a.track(&ws, req, NOW).await.unwrap();
        let items = vec![(
            0,
            AliasNewItem {
                external_id: Some(ext(&format!("hot-{u}"))),
                alias: alias("crm", &format!("hot-{u}")),
            },
        )];
        a.alias_new(&ws, items, NOW).await.unwrap();
    }
    // Keyed batches lock the keys they name, but one user named by its external id in one
    // batch and by its alias in another is locked by two different keys: the two batches
    // may then wait for each other's user rows (PostgreSQL breaks the cycle, the batch runs
    // again alone). Mixed in: units not named up front (by email), which run alone.
    let (tasks_per_node, requests) = (4, 10);
    let mut tasks = Vec::new();
    for (n, store) in [&a, &b].into_iter().enumerate() {
        for t in 0..tasks_per_node {
            let store = Arc::clone(store);
            let ws = ws.clone();
            tasks.push(tokio::spawn(async move {
                for r in 0..requests {
                    let objects: Vec<Value> = (0..3)
                        .map(|k| (n + t + r + k) % users)
                        .enumerate()
                        .map(|(k, u)| {
                            let inc = json!({"inc": 1});
                            match (n + t + r + k) % 3 {
                                0 => json!({"external_id": format!("hot-{u}"), "visits": inc}),
                                1 => json!({
                                    "user_alias": {"alias_label": "crm", "alias_name": format!("hot-{u}")},
                                    "visits": inc,
                                }),
                                _ => json!({"email": format!("nobody-{n}-{t}@example.com"), "visits": 1}),
                            }
                        })
                        .collect();
                    let req =
                        parse_track(json!({"attributes": objects}).as_object().unwrap()).unwrap();
                    store.track(&ws, req, NOW).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = total_visits(&a, &ws, users).await;
    let named: i64 = (0..2)
        .flat_map(|n| (0..tasks_per_node).map(move |t| (n, t)))
        .flat_map(|(n, t)| (0..requests).map(move |r| (n, t, r)))
        .map(|(n, t, r)| (0..3).filter(|k| (n + t + r + k) % 3 != 2).count() as i64)
        .sum();
    assert_eq!(total, named);
    assert!(gap_free(&pg_column(&a, ws.id, "event_log", "seq").await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_that_collides_with_another_writers_new_user_runs_again_and_finds_it() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    // Another writer (not going through this store's queue) creates "racer" and holds its
    // transaction open: it has the users counter and the unique key.
    let other = db.client().await;
    other.batch_execute("BEGIN").await.unwrap();
    let seq: i64 = other
        .query_one(
            "INSERT INTO workspace_sequences AS s (workspace_id, name, head) VALUES ($1, 'users', 1)
             ON CONFLICT (workspace_id, name) DO UPDATE SET head = s.head + 1 RETURNING head",
            &[&ws.id.0],
        )
        .await
        .unwrap()
        .get(0);
    other
        .execute(
            "INSERT INTO users (workspace_id, seq, braze_id, external_id, created_at, updated_at, profile)
             VALUES ($1, $2, 'aaaaaaaaaaaaaaaaaaaaaaaa', 'racer', $3, $3, '{\"c\":{\"from\":\"other\"}}')",
            &[&ws.id.0, &seq, &NOW.0],
        )
        .await
        .unwrap();
    let tracking = {
        let store = store.clone();
        let ws = ws.clone();
        tokio::spawn(async move {
            let body = json!({"attributes": [{"external_id": "racer", "plan": "pro"}]});
            let req = parse_track(body.as_object().unwrap()).unwrap();
            store.track(&ws, req, NOW).await
        })
    };
    // The unit did not see the uncommitted user and waits to create its own.
    let watcher = db.client().await;
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    other.batch_execute("COMMIT").await.unwrap();
    let out = tracking.await.unwrap().expect("the rerun succeeds");
    assert_eq!(out.attributes_processed, 1);
    let count: i64 = watcher
        .query_one(
            "SELECT count(*) FROM users WHERE workspace_id = $1",
            &[&ws.id.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "the store's own creation was rolled back");
    let exported = store
        .export_ids(
            &ws,
            ExportRequest {
                external_ids: vec![ext("racer")],
                ..ExportRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        exported.users[0]["custom_attributes"],
        json!({"from": "other", "plan": "pro"})
    );
    // The rolled-back creation left no hole in the users' numbering.
    assert!(distinct(&pg_column(&store, ws.id, "users", "seq").await));
}
