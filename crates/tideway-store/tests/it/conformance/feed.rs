//! Stored segments and the segment change feed: an index loaded from `segment_profiles` and
//! caught up with `segment_profile_changes` (applied by `LiveIndex`) answers every filter as a
//! fresh load does, and the feed head moves past every acknowledged write so a reader waiting
//! for its index to cover the head never waits for nothing.

use std::sync::Arc;

use serde_json::{Value, json};
use tideway_core::clock::Millis;
use tideway_core::cohorts::{CohortChange, CohortIdentifier};
use tideway_core::segments::{FeedPosition, LiveIndex, Member, Segment};
use tideway_core::store::prelude::*;
use tideway_core::store::{SegmentSyncPage, Workspace};
use tideway_core::users::{
    DeleteRequest, IdentifyItem, IdentifySource, MergeItem, RenameItem, UserKey,
};
use tideway_segment::{Filter, NoSegments};

use super::{NOW, cid, dev, ext, track};

fn filter(v: Value) -> Filter {
    Filter::from_json(&v).expect("a valid filter")
}

fn segment(id: &str, name: &str, filter_json: Value, at: Millis) -> Segment {
    Segment {
        id: id.to_owned(),
        name: name.to_owned(),
        filter: filter(filter_json).to_json(),
        created_at: at,
        updated_at: at,
    }
}

/// The segment definitions lock: exclusive per workspace, free in another workspace, and
/// released when its guard is dropped (the next waiter then gets it).
pub(super) async fn segment_definitions_are_locked_one_change_at_a_time(store: Arc<dyn Store>) {
    use std::time::Duration;
    let a = store.create_workspace("a", NOW).await.unwrap();
    let held = store.lock_segment_definitions(a.id).await.unwrap();
    let waiter = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.lock_segment_definitions(a.id).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "a second holder got the lock");
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the lock is released when its guard is dropped")
        .unwrap()
        .unwrap();
    // Each waiter's guard was dropped too: it can be taken again, in turn.
    for _ in 0..3 {
        let again = tokio::time::timeout(
            Duration::from_secs(10),
            store.lock_segment_definitions(a.id),
        )
        .await
        .expect("the lock is free again");
        drop(again.unwrap());
    }
}

/// Segments: created, read and listed (oldest first) in their workspace only, updated (name
/// and filter, keeping `created_at`) and deleted once.
pub(super) async fn segments_are_created_listed_updated_and_deleted(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    let later = Millis(NOW.0 + 1_000);
    let pro = json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}});
    let s1 = segment(
        "6f0c7a52-3c3e-4bb5-9a47-1d0b1c6a7e01",
        "Pro",
        pro.clone(),
        NOW,
    );
    let s2 = segment(
        "6f0c7a52-3c3e-4bb5-9a47-1d0b1c6a7e02",
        "Openers",
        json!({"event": {"name": "open", "op": "count_at_least", "value": 2}}),
        later,
    );
    let s3 = segment(
        "6f0c7a52-3c3e-4bb5-9a47-1d0b1c6a7e03",
        "B's",
        json!({"identified": true}),
        NOW,
    );
    assert_eq!(store.list_segments(a.id).await.unwrap(), vec![]);
    assert_eq!(store.create_segment(a.id, s1.clone()).await.unwrap(), s1);
    assert_eq!(store.create_segment(a.id, s2.clone()).await.unwrap(), s2);
    assert_eq!(store.create_segment(b.id, s3.clone()).await.unwrap(), s3);
    assert_eq!(store.segment(a.id, &s1.id).await.unwrap(), Some(s1.clone()));
    assert_eq!(store.segment(b.id, &s1.id).await.unwrap(), None);
    assert_eq!(store.segment(a.id, "missing").await.unwrap(), None);
    assert_eq!(
        store.list_segments(a.id).await.unwrap(),
        vec![s1.clone(), s2.clone()]
    );
    assert_eq!(store.list_segments(b.id).await.unwrap(), vec![s3.clone()]);

    let cohort =
        filter(json!({"cohort": {"partner": "heap", "cohort_id": "c1", "op": "includes"}}))
            .to_json();
    let even_later = Millis(NOW.0 + 2_000);
    let updated = store
        .update_segment(a.id, &s1.id, "In c1".into(), cohort.clone(), even_later)
        .await
        .unwrap();
    let expected = Segment {
        name: "In c1".into(),
        filter: cohort.clone(),
        updated_at: even_later,
        ..s1.clone()
    };
    assert_eq!(updated, Some(expected.clone()));
    assert_eq!(
        store.segment(a.id, &s1.id).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        store
            .update_segment(b.id, &s1.id, "x".into(), cohort.clone(), even_later)
            .await
            .unwrap(),
        None,
        "not in b"
    );
    assert_eq!(
        store
            .update_segment(a.id, "missing", "x".into(), cohort, even_later)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.list_segments(a.id).await.unwrap(),
        vec![expected, s2.clone()]
    );
    assert!(!store.delete_segment(b.id, &s1.id).await.unwrap());
    assert!(store.delete_segment(a.id, &s1.id).await.unwrap());
    assert!(!store.delete_segment(a.id, &s1.id).await.unwrap());
    assert_eq!(store.segment(a.id, &s1.id).await.unwrap(), None);
    assert_eq!(store.list_segments(a.id).await.unwrap(), vec![s2]);
    assert_eq!(store.list_segments(b.id).await.unwrap(), vec![s3]);
}

/// Filters over everything the feed carries: attributes, identifiers, events (counted and
/// within a window), purchases, cohorts.
fn filters() -> Vec<(&'static str, Filter)> {
    [
        (
            "plan pro",
            json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}}),
        ),
        (
            "has plan",
            json!({"attribute": {"name": "plan", "op": "exists", "value": true}}),
        ),
        (
            "score > 1",
            json!({"attribute": {"name": "score", "op": "greater_than", "value": 1}}),
        ),
        (
            "email",
            json!({"attribute": {"name": "email_available", "op": "equals", "value": true}}),
        ),
        (
            "opened",
            json!({"event": {"name": "open", "op": "count_at_least", "value": 1}}),
        ),
        (
            "opened twice",
            json!({"event": {"name": "open", "op": "count_at_least", "value": 2}}),
        ),
        (
            "opened this week",
            json!({"event": {"name": "open", "op": "count_at_least", "value": 1, "within_days": 7}}),
        ),
        (
            "spent 10",
            json!({"purchase": {"op": "total_spend_at_least", "value": 10}}),
        ),
        (
            "bought p1",
            json!({"purchase": {"product_id": "p1", "op": "count_at_least", "value": 1}}),
        ),
        (
            "in c1",
            json!({"cohort": {"partner": "heap", "cohort_id": "c1", "op": "includes"}}),
        ),
        (
            "in c2",
            json!({"cohort": {"partner": "heap", "cohort_id": "c2", "op": "includes"}}),
        ),
        (
            "not in c1",
            json!({"cohort": {"partner": "heap", "cohort_id": "c1", "op": "excludes"}}),
        ),
        ("identified", json!({"identified": true})),
    ]
    .into_iter()
    .map(|(name, v)| (name, filter(v)))
    .collect()
}

fn members(live: &LiveIndex, f: &Filter) -> Vec<Member> {
    live.all_members(f, NOW.secs(), &NoSegments).collect()
}

/// The external ids (or `-`) of a filter's members, sorted.
fn ids(live: &LiveIndex, f: &Filter) -> Vec<String> {
    let mut ids: Vec<String> = members(live, f)
        .into_iter()
        .map(|m| m.external_id.unwrap_or_else(|| "-".into()))
        .collect();
    ids.sort();
    ids
}

async fn fresh(store: &dyn Store, ws: &Workspace) -> LiveIndex {
    LiveIndex::from_snapshot(store.segment_profiles(ws.id).await.unwrap())
}

async fn catch_up(store: &dyn Store, ws: &Workspace, live: &mut LiveIndex) {
    let changes = store
        .segment_profile_changes(ws.id, live.position())
        .await
        .unwrap();
    live.apply(&changes);
}

/// `live` answers every filter as a fresh load does, at the same position.
async fn assert_same_as_fresh(store: &dyn Store, ws: &Workspace, live: &LiveIndex, when: &str) {
    let full = fresh(store, ws).await;
    assert_eq!(live.position(), full.position(), "{when}: position");
    assert_eq!(live.len(), full.len(), "{when}: users");
    for (name, f) in filters() {
        assert_eq!(members(live, &f), members(&full, &f), "{when}: {name}");
    }
}

fn one_change(identifiers: &[&str], remove: bool) -> Vec<CohortChange> {
    vec![CohortChange {
        identifiers: identifiers
            .iter()
            .map(|s| CohortIdentifier::External(ext(s)))
            .collect(),
        remove,
    }]
}

/// Writes of every kind after a full load — attributes, new users, events, purchases, cohort
/// deltas and sync pages, identification, merge, delete, rename — then a catch-up: the index
/// answers as a fresh load, with the expected members. An index loaded from the empty
/// workspace and caught up once at the end agrees too.
pub(super) async fn an_index_caught_up_from_the_feed_answers_as_a_fresh_load(
    store: Arc<dyn Store>,
) {
    let store = &*store;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let mut from_empty = fresh(store, &ws).await;
    assert_eq!(from_empty.len(), 0);
    track(
        store,
        &ws,
        json!({
            "attributes": [
                {"external_id": "u1", "plan": "free"},
                {"external_id": "u2", "plan": "pro"},
                {"external_id": "u3", "plan": "free", "score": 5},
            ],
            "events": [{"external_id": "u1", "name": "open", "time": "2025-06-14T08:00:00Z"}],
        }),
    )
    .await;
    let mut live = fresh(store, &ws).await;
    assert_eq!(live.len(), 3);

    // Phase 1: attribute changes, a new user, events, a purchase, cohort deltas, identify.
    track(store, &ws, json!({
        "attributes": [
            {"external_id": "u1", "plan": "pro"},
            {"external_id": "u4", "plan": "pro", "email": "u4@example.com"},
            {"device_id": "d5", "plan": "pro"},
        ],
        "events": [
            {"external_id": "u2", "name": "open", "time": "2025-01-01T00:00:00Z"},
            {"external_id": "u2", "name": "open", "time": "2025-01-02T00:00:00Z"},
            {"external_id": "u3", "name": "open", "time": "2025-06-10T00:00:00Z"},
        ],
        "purchases": [
            {"external_id": "u3", "product_id": "p1", "currency": "USD", "price": 20, "time": "2025-06-01T00:00:00Z"},
        ],
    }))
    .await;
    store
        .apply_cohort_changes(
            &ws,
            "heap",
            cid("c1"),
            one_change(&["u1", "u2", "u3"], false),
            NOW,
        )
        .await
        .unwrap();
    store
        .apply_cohort_changes(&ws, "heap", cid("c1"), one_change(&["u2"], true), NOW)
        .await
        .unwrap();
    let identify = IdentifyItem {
        external_id: ext("u5"),
        source: IdentifySource::Device(dev("d5")),
    };
    store.identify(&ws, vec![(0, identify)], NOW).await.unwrap();
    catch_up(store, &ws, &mut live).await;
    assert_same_as_fresh(store, &ws, &live, "after phase 1").await;
    let f = |name: &str| filters().into_iter().find(|(n, _)| *n == name).unwrap().1;
    assert_eq!(ids(&live, &f("plan pro")), ["u1", "u2", "u4", "u5"]);
    assert_eq!(ids(&live, &f("in c1")), ["u1", "u3"]);
    assert_eq!(ids(&live, &f("opened twice")), ["u2"]);
    assert_eq!(ids(&live, &f("spent 10")), ["u3"]);

    // Phase 2: a merge (u3's event and purchase now count for u1), a delete, a rename, a sync page, a late event.
    let merge = MergeItem {
        merge: UserKey::External(ext("u3")),
        keep: UserKey::External(ext("u1")),
    };
    store.merge_users(&ws, vec![(0, merge)], NOW).await.unwrap();
    let delete = DeleteRequest {
        users: vec![UserKey::External(ext("u2"))],
    };
    store.delete_users(&ws, delete, NOW).await.unwrap();
    let rename = RenameItem {
        current: ext("u4"),
        new: ext("u4b"),
    };
    store
        .rename_external_ids(&ws, vec![rename], NOW)
        .await
        .unwrap();
    let page = SegmentSyncPage {
        cohort_id: cid("c2"),
        name: Some("Two".into()),
        page_key: Some(("task".into(), 1)),
        drain: false,
        changes: [one_change(&["u1", "u4b"], false), one_change(&["u1"], true)].concat(),
    };
    store
        .apply_segment_sync(&ws, "heap", page, NOW)
        .await
        .unwrap();
    track(
        store,
        &ws,
        json!({"events": [{"external_id": "u5", "name": "open", "time": "2025-06-15T00:00:00Z"}]}),
    )
    .await;
    catch_up(store, &ws, &mut live).await;
    assert_same_as_fresh(store, &ws, &live, "after phase 2").await;
    let expected: [(&str, &[&str]); 13] = [
        ("plan pro", &["u1", "u4b", "u5"]),
        ("has plan", &["u1", "u4b", "u5"]),
        ("score > 1", &["u1"]),
        ("email", &["u4b"]),
        ("opened", &["u1", "u5"]),
        ("opened twice", &["u1"]),
        ("opened this week", &["u1", "u5"]),
        ("spent 10", &["u1"]),
        ("bought p1", &["u1"]),
        ("in c1", &["u1"]),
        ("in c2", &["u4b"]),
        ("not in c1", &["u4b", "u5"]),
        ("identified", &["u1", "u4b", "u5"]),
    ];
    for (name, want) in expected {
        assert_eq!(ids(&live, &f(name)), want, "{name}");
    }
    catch_up(store, &ws, &mut from_empty).await;
    assert_same_as_fresh(store, &ws, &from_empty, "loaded empty, caught up once").await;
}

/// Every component of `p` is at or past `q`'s.
fn covers(p: FeedPosition, q: FeedPosition) -> bool {
    p.event_seq >= q.event_seq
        && p.cohort_change_seq >= q.cohort_change_seq
        && p.user_change_seq >= q.user_change_seq
}

/// The kinds of write the feed head must move past, in the order the check makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    NewUsers,
    Attribute,
    Event,
    Purchase,
    CohortAdd,
    CohortRemove,
    Rename,
    Merge,
    Delete,
}

impl Write {
    const ALL: [Write; 9] = [
        Write::NewUsers,
        Write::Attribute,
        Write::Event,
        Write::Purchase,
        Write::CohortAdd,
        Write::CohortRemove,
        Write::Rename,
        Write::Merge,
        Write::Delete,
    ];
}

/// One write of the kind `what`.
async fn write(store: &dyn Store, ws: &Workspace, what: Write) {
    match what {
        Write::NewUsers => {
            let body = json!({"attributes": [
                {"external_id": "a", "plan": "free"},
                {"external_id": "b", "plan": "free"},
            ]});
            assert_eq!(track(store, ws, body).await.attributes_processed, 2);
        }
        Write::Attribute => {
            let body = json!({"attributes": [{"external_id": "a", "plan": "pro"}]});
            assert_eq!(track(store, ws, body).await.attributes_processed, 1);
        }
        Write::Event => {
            let body = json!({"events": [
                {"external_id": "a", "name": "open", "time": "2025-06-14T00:00:00Z"},
            ]});
            assert_eq!(track(store, ws, body).await.events_processed, 1);
        }
        Write::Purchase => {
            let body = json!({"purchases": [{
                "external_id": "b", "product_id": "p1", "currency": "USD", "price": 12,
                "time": "2025-06-14T00:00:00Z",
            }]});
            assert_eq!(track(store, ws, body).await.purchases_processed, 1);
        }
        Write::CohortAdd => {
            let changes = one_change(&["a", "b"], false);
            let out = store
                .apply_cohort_changes(ws, "heap", cid("c1"), changes, NOW)
                .await
                .unwrap();
            assert_eq!(out.added, 2);
        }
        Write::CohortRemove => {
            let changes = one_change(&["b"], true);
            let out = store
                .apply_cohort_changes(ws, "heap", cid("c1"), changes, NOW)
                .await
                .unwrap();
            assert_eq!(out.removed, 1);
        }
        Write::Rename => {
            let rename = RenameItem {
                current: ext("b"),
                new: ext("b2"),
            };
            let out = store
                .rename_external_ids(ws, vec![rename], NOW)
                .await
                .unwrap();
            assert_eq!(out.renamed, [ext("b2")]);
        }
        Write::Merge => {
            let merge = MergeItem {
                merge: UserKey::External(ext("b2")),
                keep: UserKey::External(ext("a")),
            };
            let out = store.merge_users(ws, vec![(0, merge)], NOW).await.unwrap();
            assert_eq!(out.processed, 1);
        }
        Write::Delete => {
            let delete = DeleteRequest {
                users: vec![UserKey::External(ext("a"))],
            };
            assert_eq!(
                store.delete_users(ws, delete, NOW).await.unwrap().deleted,
                1
            );
        }
    }
}

/// After each kind of acknowledged write the feed head has moved (never back), a catch-up
/// reaches it, and a fresh load covers it; with no write the head stays and the feed is empty.
pub(super) async fn the_feed_head_moves_past_every_acknowledged_write(store: Arc<dyn Store>) {
    let store = &*store;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let start = store.segment_feed_head(ws.id).await.unwrap();
    let mut live = fresh(store, &ws).await;
    assert!(covers(live.position(), start));
    for what in Write::ALL {
        let before = store.segment_feed_head(ws.id).await.unwrap();
        write(store, &ws, what).await;
        let head = store.segment_feed_head(ws.id).await.unwrap();
        assert!(
            covers(head, before) && head != before,
            "{what:?}: {before:?} -> {head:?}"
        );
        let changes = store
            .segment_profile_changes(ws.id, live.position())
            .await
            .unwrap();
        assert!(
            covers(changes.position, head),
            "{what:?}: the feed reaches {:?}, not the head {head:?}",
            changes.position
        );
        assert!(!changes.is_empty(), "{what:?}: the feed carries the change");
        live.apply(&changes);
        let full = fresh(store, &ws).await;
        assert!(
            covers(full.position(), head),
            "{what:?}: a fresh load covers the head"
        );
        for (name, f) in filters() {
            assert_eq!(members(&live, &f), members(&full, &f), "{what:?}: {name}");
        }
    }
    assert_eq!(live.len(), 0, "everyone was merged or deleted");
    // Nothing written: the head stays, and the feed from it is empty.
    let head = store.segment_feed_head(ws.id).await.unwrap();
    assert_eq!(store.segment_feed_head(ws.id).await.unwrap(), head);
    let changes = store.segment_profile_changes(ws.id, head).await.unwrap();
    assert!(changes.is_empty(), "{changes:?}");
    assert_eq!(changes.position, head);
    // Another workspace's writes do not move this one's head.
    let other = store.create_workspace("other", NOW).await.unwrap();
    track(
        store,
        &other,
        json!({"attributes": [{"external_id": "x", "plan": "pro"}]}),
    )
    .await;
    assert_eq!(store.segment_feed_head(ws.id).await.unwrap(), head);
}

/// An index catching up again and again while writers commit (new users, attributes, events,
/// purchases, cohort deltas at once) never skips a change that commits late: once the writers
/// are done and it has caught up, it answers as a fresh load, with every event counted.
pub(super) async fn an_index_following_concurrent_writers_ends_as_a_fresh_load(
    store: Arc<dyn Store>,
) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let (writers, requests) = (4, 15);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..requests {
                let user = format!("w{w}-{}", r % 5);
                let body = json!({
                    "attributes": [{"external_id": user, "plan": if r % 2 == 0 { "pro" } else { "free" }, "score": r}],
                    "events": [{"external_id": user, "name": "open", "time": "2025-06-14T08:00:00Z"}],
                    "purchases": [{"external_id": user, "product_id": "p1", "currency": "USD", "price": 1, "time": "2025-06-14T08:00:00Z"}],
                });
                track(&*store, &ws, body).await;
                let changes = one_change(&[&user], r % 3 == 2);
                store
                    .apply_cohort_changes(&ws, "heap", cid("c1"), changes, NOW)
                    .await
                    .unwrap();
            }
        }));
    }
    let mut live = fresh(&*store, &ws).await;
    while !tasks.iter().all(|t| t.is_finished()) {
        catch_up(&*store, &ws, &mut live).await;
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    catch_up(&*store, &ws, &mut live).await;
    assert_same_as_fresh(&*store, &ws, &live, "after the writers").await;
    assert_eq!(live.len(), (writers * 5) as u64);
    // Every user had three requests (r, r + 5, r + 10): three events and three purchases.
    let three_opens =
        filter(json!({"event": {"name": "open", "op": "count_at_least", "value": 3}}));
    let four_opens = filter(json!({"event": {"name": "open", "op": "count_at_least", "value": 4}}));
    let spent_three = filter(json!({"purchase": {"op": "total_spend_at_least", "value": 3}}));
    assert_eq!(members(&live, &three_opens).len(), writers * 5);
    assert_eq!(members(&live, &four_opens).len(), 0);
    assert_eq!(members(&live, &spent_three).len(), writers * 5);
}
