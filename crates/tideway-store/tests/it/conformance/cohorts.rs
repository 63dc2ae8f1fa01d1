//! Cohort membership through the services: the matching rules, set semantics, merges and
//! deletes moving members, Heap sync pages applied once, and the keys partners authenticate
//! with.

use std::sync::Arc;

use serde_json::json;
use tideway_core::clock::Millis;
use tideway_core::cohorts::{
    self, CohortChange, CohortIdentifier, CohortUpsert, MembershipOutcome,
};
use tideway_core::ids::{ExternalId, UserSeq};
use tideway_core::keys::Secret;
use tideway_core::store::prelude::*;
use tideway_core::store::{
    CohortSummary, ImportKeyInfo, SegmentSyncOutcome, SegmentSyncPage, StoreError, Workspace,
    run_unit,
};
use tideway_core::users::{DeleteRequest, IdentifyItem, IdentifySource, UserKey};

use super::{NOW, alias, cid, dev, export_one, ext, track};

fn by_ext(s: &str) -> CohortIdentifier {
    CohortIdentifier::External(ext(s))
}

fn by_dev(s: &str) -> CohortIdentifier {
    CohortIdentifier::Device(dev(s))
}

fn add(identifiers: Vec<CohortIdentifier>) -> Vec<CohortChange> {
    vec![CohortChange {
        identifiers,
        remove: false,
    }]
}

/// The external ids of a cohort's members, in `seq` order.
async fn member_ids(store: &dyn Store, ws: &Workspace, cohort: &str) -> Vec<String> {
    store
        .cohort_members(ws.id, "heap", cid(cohort), 0, 100)
        .await
        .unwrap()
        .expect("the cohort exists")
        .into_iter()
        .map(|m| {
            m.external_id
                .as_ref()
                .map_or("-", ExternalId::as_str)
                .to_owned()
        })
        .collect()
}

/// Import matches by external id, alias, and device only while its user is anonymous; never
/// creates users; adds and removes with set semantics; a cohort is named by its id until named.
pub(super) async fn membership_follows_the_matching_rules_and_set_semantics(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&*store, &ws, json!({"attributes": [
        {"external_id": "known", "x": 1},
        {"device_id": "anon-dev", "x": 1},
        {"device_id": "was-anon", "x": 1},
        {"user_alias": {"alias_name": "a@b", "alias_label": "email"}, "_update_existing_only": false, "x": 1},
    ]}))
    .await;
    // was-anon becomes identified: its device no longer matches for cohort import.
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "now-known", "device_id": "was-anon"}]}),
    )
    .await;
    let changes = add(vec![
        by_ext("known"),
        by_ext("unknown"),
        by_dev("anon-dev"),
        by_dev("was-anon"),
        CohortIdentifier::Alias(alias("email", "a@b")),
        by_ext("known"),
        CohortIdentifier::Unusable,
    ]);
    let out = store
        .apply_cohort_changes(&ws, "heap", cid("c1"), changes, NOW)
        .await
        .unwrap();
    assert_eq!(
        out,
        MembershipOutcome {
            matched: 4,
            ignored: 3,
            added: 3,
            removed: 0
        }
    );
    assert_eq!(
        export_one(&*store, &ws, "unknown").await,
        None,
        "never creates"
    );
    let listed = store.list_cohorts(ws.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].partner.as_str(),
            listed[0].cohort_id.as_str(),
            listed[0].name.as_str(),
            listed[0].member_count,
            listed[0].created_at,
        ),
        ("heap", "c1", "c1", 3, NOW),
        "named by its id until named"
    );
    assert_eq!(member_ids(&*store, &ws, "c1").await, ["known", "-", "-"]);
    // Adding members again is a no-op.
    let out = store
        .apply_cohort_changes(&ws, "heap", cid("c1"), add(vec![by_ext("known")]), NOW)
        .await
        .unwrap();
    assert_eq!((out.matched, out.added), (1, 0));
    // Removing a non-member is a no-op; removing a member counts; the last mention wins.
    let later = Millis(NOW.0 + 1_000);
    let out = store
        .apply_cohort_changes(
            &ws,
            "heap",
            cid("c1"),
            vec![
                CohortChange {
                    identifiers: vec![by_ext("now-known"), by_ext("known")],
                    remove: true,
                },
                CohortChange {
                    identifiers: vec![by_dev("anon-dev")],
                    remove: true,
                },
                CohortChange {
                    identifiers: vec![by_dev("anon-dev")],
                    remove: false,
                },
            ],
            later,
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        MembershipOutcome {
            matched: 4,
            ignored: 0,
            added: 0,
            removed: 1
        }
    );
    store
        .upsert_cohort(
            &ws,
            "heap",
            CohortUpsert {
                cohort_id: cid("c1"),
                name: "Abandoned checkout".into(),
                created_at: NOW,
            },
            later,
        )
        .await
        .unwrap();
    let listed = store.list_cohorts(ws.id).await.unwrap();
    assert_eq!(
        (
            listed[0].name.as_str(),
            listed[0].member_count,
            listed[0].updated_at
        ),
        ("Abandoned checkout", 2, later)
    );
    assert_eq!(member_ids(&*store, &ws, "c1").await, ["-", "-"]);
    // Empty changes on an unknown cohort create nothing (partners test credentials so).
    let out = store
        .apply_cohort_changes(&ws, "heap", cid("credential-check"), add(vec![]), NOW)
        .await
        .unwrap();
    assert_eq!(out, MembershipOutcome::default());
    assert_eq!(store.list_cohorts(ws.id).await.unwrap().len(), 1);
    assert_eq!(
        store
            .cohort_members(ws.id, "heap", cid("nope"), 0, 10)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .cohort_members(ws.id, "amplitude", cid("c1"), 0, 10)
            .await
            .unwrap(),
        None,
        "cohorts are per partner"
    );
    // Members page in `seq` order after a cursor.
    let all = store
        .cohort_members(ws.id, "heap", cid("c1"), 0, 10)
        .await
        .unwrap()
        .unwrap();
    let rest = store
        .cohort_members(ws.id, "heap", cid("c1"), all[0].user.0, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, all[1..]);
    let first = store
        .cohort_members(ws.id, "heap", cid("c1"), 0, 1)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, all[..1]);
}

/// A merge moves the merged user's memberships to the survivor (the union); a delete leaves
/// every cohort. A user's cohorts are listed by partner, name, then cohort id.
pub(super) async fn merges_keep_the_union_and_deletes_leave(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&*store, &ws, json!({"attributes": [{"external_id": "alice", "x": 1}, {"device_id": "d", "x": 1}, {"external_id": "bob", "x": 1}]})).await;
    store
        .apply_cohort_changes(&ws, "heap", cid("a"), add(vec![by_dev("d")]), NOW)
        .await
        .unwrap();
    store
        .apply_cohort_changes(
            &ws,
            "heap",
            cid("b"),
            add(vec![by_ext("alice"), by_ext("bob")]),
            NOW,
        )
        .await
        .unwrap();
    let item = IdentifyItem {
        external_id: ext("alice"),
        source: IdentifySource::Device(dev("d")),
    };
    store.identify(&ws, vec![(0, item)], NOW).await.unwrap();
    let members = store
        .cohort_members(ws.id, "heap", cid("a"), 0, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].external_id, Some(ext("alice")));
    let mine: Vec<(String, String)> = store
        .user_cohorts(ws.id, members[0].braze_id.clone())
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|c| (c.partner, c.cohort_id.as_str().to_owned()))
        .collect();
    assert_eq!(
        mine,
        [("heap".into(), "a".into()), ("heap".into(), "b".into())]
    );
    // Cohorts of one name are listed by cohort id, whatever order they were made in.
    for id in ["c3", "c2"] {
        store
            .upsert_cohort(
                &ws,
                "heap",
                CohortUpsert {
                    cohort_id: cid(id),
                    name: "Same".into(),
                    created_at: NOW,
                },
                NOW,
            )
            .await
            .unwrap();
        store
            .apply_cohort_changes(&ws, "heap", cid(id), add(vec![by_ext("alice")]), NOW)
            .await
            .unwrap();
    }
    let named: Vec<(String, String)> = store
        .user_cohorts(ws.id, members[0].braze_id.clone())
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|c| (c.name, c.cohort_id.as_str().to_owned()))
        .collect();
    assert_eq!(
        named,
        [
            ("Same".into(), "c2".into()),
            ("Same".into(), "c3".into()),
            ("a".into(), "a".into()),
            ("b".into(), "b".into())
        ]
    );
    let counts = |listed: Vec<CohortSummary>| -> Vec<(String, u64)> {
        listed
            .into_iter()
            .map(|c| (c.cohort_id.as_str().to_owned(), c.member_count))
            .collect()
    };
    assert_eq!(
        counts(store.list_cohorts(ws.id).await.unwrap()),
        [
            ("c2".into(), 1),
            ("c3".into(), 1),
            ("a".into(), 1),
            ("b".into(), 2)
        ]
    );
    let del = DeleteRequest {
        users: vec![UserKey::External(ext("bob"))],
    };
    store.delete_users(&ws, del, NOW).await.unwrap();
    assert_eq!(
        counts(store.list_cohorts(ws.id).await.unwrap()),
        [
            ("c2".into(), 1),
            ("c3".into(), 1),
            ("a".into(), 1),
            ("b".into(), 1)
        ]
    );
    assert_eq!(member_ids(&*store, &ws, "b").await, ["alice"]);
}

/// Heap's sync pages: a page seen before (same task and number) is acknowledged without being
/// applied again; a drain removes every member; a page names a new cohort.
pub(super) async fn sync_pages_apply_once_and_drain_empties(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "u1", "x": 1}, {"external_id": "u2", "x": 1}, {"external_id": "u3", "x": 1}]}),
    )
    .await;
    let page = SegmentSyncPage {
        cohort_id: cid("1338065"),
        name: Some("Free Customers".into()),
        page_key: Some(("task".into(), 1)),
        drain: false,
        changes: add(vec![by_ext("u1"), by_ext("u2")]),
    };
    let first = store
        .apply_segment_sync(&ws, "heap", page.clone(), NOW)
        .await
        .unwrap();
    assert_eq!(
        first,
        SegmentSyncOutcome {
            membership: MembershipOutcome {
                matched: 2,
                ignored: 0,
                added: 2,
                removed: 0
            },
            replayed: false,
        }
    );
    // The same page again, even with other changes, is not applied.
    let again = SegmentSyncPage {
        changes: vec![CohortChange {
            identifiers: vec![by_ext("u1")],
            remove: true,
        }],
        ..page.clone()
    };
    assert_eq!(
        store
            .apply_segment_sync(&ws, "heap", again, NOW)
            .await
            .unwrap(),
        SegmentSyncOutcome {
            membership: MembershipOutcome::default(),
            replayed: true,
        }
    );
    let second = SegmentSyncPage {
        page_key: Some(("task".into(), 2)),
        changes: add(vec![by_ext("u3")]),
        ..page.clone()
    };
    let out = store
        .apply_segment_sync(&ws, "heap", second, NOW)
        .await
        .unwrap();
    assert_eq!((out.replayed, out.membership.added), (false, 1));
    let listed = store.list_cohorts(ws.id).await.unwrap();
    assert_eq!(
        (listed[0].name.as_str(), listed[0].member_count),
        ("Free Customers", 3)
    );
    assert_eq!(
        member_ids(&*store, &ws, "1338065").await,
        ["u1", "u2", "u3"]
    );
    let drain = SegmentSyncPage {
        page_key: None,
        drain: true,
        changes: vec![],
        ..page
    };
    let out = store
        .apply_segment_sync(&ws, "heap", drain, NOW)
        .await
        .unwrap();
    assert_eq!(
        out.membership,
        MembershipOutcome {
            matched: 0,
            ignored: 0,
            added: 0,
            removed: 3
        }
    );
    assert_eq!(store.list_cohorts(ws.id).await.unwrap()[0].member_count, 0);
    assert_eq!(
        member_ids(&*store, &ws, "1338065").await,
        Vec::<String>::new()
    );
}

/// Partner API keys are created once per partner; data import keys rotate (several valid at
/// once, each invalidated alone) and belong to one partner; disabling the partner is seen at
/// once.
pub(super) async fn import_keys_rotate_and_partner_keys_are_per_partner(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let heap = store
        .partner_api_key("heap", Secret::new("heap-key".into()), NOW)
        .await
        .unwrap();
    assert_eq!(heap.expose(), "heap-key");
    let again = store
        .partner_api_key("heap", Secret::new("other".into()), NOW)
        .await
        .unwrap();
    assert_eq!(again.expose(), "heap-key", "created once, then shown again");
    assert!(
        store
            .check_partner_api_key("heap", heap.clone())
            .await
            .unwrap()
    );
    assert!(
        !store
            .check_partner_api_key("heap", Secret::new("other".into()))
            .await
            .unwrap()
    );
    assert!(
        !store
            .check_partner_api_key("amplitude", heap)
            .await
            .unwrap()
    );
    let k1 = Secret::new("import-one-xyz".into());
    let k2 = Secret::new("import-two-xyz".into());
    let info1 = store
        .create_import_key(a.id, "heap", &k1, NOW)
        .await
        .unwrap();
    assert_eq!(
        (
            info1.workspace,
            info1.partner.as_str(),
            info1.created_at,
            info1.invalidated_at
        ),
        (a.id, "heap", NOW, None)
    );
    assert!(k1.expose().starts_with(&info1.prefix) && !info1.prefix.is_empty());
    store
        .create_import_key(a.id, "heap", &k2, NOW)
        .await
        .unwrap();
    let owner = store
        .find_import_key("heap", k1.hash())
        .await
        .unwrap()
        .expect("k1 is valid");
    assert_eq!((owner.workspace, owner.partner_enabled), (a.clone(), true));
    assert_eq!(
        store.find_import_key("amplitude", k1.hash()).await.unwrap(),
        None
    );
    let later = Millis(NOW.0 + 5);
    assert!(
        store
            .invalidate_import_key(a.id, "heap", "import-o", later)
            .await
            .unwrap()
    );
    assert_eq!(
        store.find_import_key("heap", k1.hash()).await.unwrap(),
        None
    );
    assert!(
        store
            .find_import_key("heap", k2.hash())
            .await
            .unwrap()
            .is_some(),
        "the other key keeps working"
    );
    assert!(store.partner_enabled(a.id, "heap").await.unwrap());
    assert!(!store.partner_enabled(a.id, "amplitude").await.unwrap());
    store
        .set_partner_enabled(a.id, "heap", false)
        .await
        .unwrap();
    assert!(!store.partner_enabled(a.id, "heap").await.unwrap());
    assert!(
        !store
            .find_import_key("heap", k2.hash())
            .await
            .unwrap()
            .unwrap()
            .partner_enabled
    );
    let listed = store.list_import_keys(a.id, "heap").await.unwrap();
    assert_eq!(
        listed.iter().map(|k| k.invalidated_at).collect::<Vec<_>>(),
        [Some(later), None]
    );
    assert_eq!(
        listed[0],
        ImportKeyInfo {
            invalidated_at: Some(later),
            ..info1
        }
    );
    assert_eq!(
        store.list_import_keys(a.id, "amplitude").await.unwrap(),
        vec![]
    );
    // A key's last use is recorded to the minute: a use within a minute of the recorded one
    // writes nothing.
    assert_eq!(listed[1].last_used_at, None);
    store
        .touch_import_key("heap", k2.hash(), NOW)
        .await
        .unwrap();
    store
        .touch_import_key("heap", k2.hash(), Millis(NOW.0 + 59_999))
        .await
        .unwrap();
    let used = |at: i64| Some(Millis(at));
    let listed = store.list_import_keys(a.id, "heap").await.unwrap();
    assert_eq!(listed[1].last_used_at, used(NOW.0));
    assert_eq!(listed[0].last_used_at, None, "only the key used");
    store
        .touch_import_key("heap", k2.hash(), Millis(NOW.0 + 60_000))
        .await
        .unwrap();
    let listed = store.list_import_keys(a.id, "heap").await.unwrap();
    assert_eq!(listed[1].last_used_at, used(NOW.0 + 60_000));
    // The hash of another partner's key, or of no key: nothing recorded, no error.
    store
        .touch_import_key("amplitude", k2.hash(), Millis(NOW.0 + 200_000))
        .await
        .unwrap();
    assert_eq!(
        store.list_import_keys(a.id, "heap").await.unwrap()[1].last_used_at,
        used(NOW.0 + 60_000)
    );
}

/// Cohort import inside a unit that then fails: no cohort, no membership.
pub(super) async fn a_failed_import_changes_no_membership(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "u1", "x": 1}]}),
    )
    .await;
    store
        .apply_cohort_changes(&ws, "heap", cid("kept"), add(vec![by_ext("u1")]), NOW)
        .await
        .unwrap();
    let failed = run_unit(&*store, &ws, NOW, |tx, _| {
        let changes = add(vec![by_ext("u1")]);
        cohorts::apply_partner_changes(tx, "heap", &cid("new"), &changes, NOW)?;
        let removal = vec![CohortChange {
            identifiers: vec![by_ext("u1")],
            remove: true,
        }];
        cohorts::apply_partner_changes(tx, "heap", &cid("kept"), &removal, NOW)?;
        Err::<UserSeq, _>(StoreError::Unavailable("planned failure".into()))
    })
    .await;
    assert_eq!(
        failed,
        Err(StoreError::Unavailable("planned failure".into()))
    );
    let listed = store.list_cohorts(ws.id).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|c| (c.cohort_id.as_str(), c.member_count))
            .collect::<Vec<_>>(),
        [("kept", 1)]
    );
    assert_eq!(member_ids(&*store, &ws, "kept").await, ["u1"]);
}

/// Concurrent imports into one new cohort: it is created once, and every member is counted
/// once however many requests name them.
pub(super) async fn concurrent_imports_count_every_member_once(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let attributes: Vec<_> = (0..70)
        .map(|i| json!({"external_id": format!("u{i}"), "x": 1}))
        .collect();
    track(&*store, &ws, json!({"attributes": attributes})).await;
    let mut tasks = Vec::new();
    for t in 0..12 {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            // Five of its own, and the ten shared by every request.
            let ids: Vec<String> = (0..5)
                .map(|k| format!("u{}", 10 + t * 5 + k))
                .chain((0..10).map(|k| format!("u{k}")))
                .collect();
            let changes = add(ids.iter().map(|s| by_ext(s)).collect());
            store
                .apply_cohort_changes(&ws, "heap", cid("c"), changes, NOW)
                .await
                .unwrap()
        }));
    }
    let mut added = 0;
    for t in tasks {
        let out = t.await.unwrap();
        assert_eq!((out.matched, out.ignored, out.removed), (15, 0, 0));
        added += out.added;
    }
    assert_eq!(added, 70, "each member entered once");
    let listed = store.list_cohorts(ws.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].member_count, 70);
    let mut members = member_ids(&*store, &ws, "c").await;
    members.sort_by_key(|m| m[1..].parse::<u32>().unwrap());
    let expected: Vec<String> = (0..70).map(|i| format!("u{i}")).collect();
    assert_eq!(members, expected);
}

/// The newest membership changes, summed per cohort, newest cohort first; bounded by `last`.
pub(super) async fn recent_changes_are_summed_per_cohort(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let other = store.create_workspace("o", NOW).await.unwrap();
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "a"}, {"external_id": "b"}, {"external_id": "c"}]}),
    )
    .await;
    track(
        &*store,
        &other,
        json!({"attributes": [{"external_id": "a"}]}),
    )
    .await;
    assert!(
        store
            .recent_cohort_changes(ws.id, 100)
            .await
            .unwrap()
            .is_empty()
    );
    let at = |ms: i64| Millis(NOW.0 + ms);
    store
        .apply_cohort_changes(
            &ws,
            "heap",
            cid("c1"),
            add(vec![by_ext("a"), by_ext("b")]),
            at(1),
        )
        .await
        .unwrap();
    store
        .apply_cohort_changes(&ws, "heap", cid("c2"), add(vec![by_ext("c")]), at(2))
        .await
        .unwrap();
    let remove = vec![CohortChange {
        identifiers: vec![by_ext("a")],
        remove: true,
    }];
    store
        .apply_cohort_changes(&ws, "heap", cid("c1"), remove, at(3))
        .await
        .unwrap();
    store
        .apply_cohort_changes(&other, "heap", cid("c9"), add(vec![by_ext("a")]), at(4))
        .await
        .unwrap();
    let recent = store.recent_cohort_changes(ws.id, 100).await.unwrap();
    let summary: Vec<_> = recent
        .iter()
        .map(|r| {
            (
                r.cohort_id.as_str(),
                r.entered,
                r.left,
                r.first_at,
                r.last_at,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("c1", 2, 1, at(1), at(3)), ("c2", 1, 0, at(2), at(2))]
    );
    assert_eq!(recent[0].partner, "heap");
    // Only the newest `last` changes count.
    let newest = store.recent_cohort_changes(ws.id, 2).await.unwrap();
    let summary: Vec<_> = newest
        .iter()
        .map(|r| (r.cohort_id.as_str(), r.entered, r.left))
        .collect();
    assert_eq!(summary, [("c1", 0, 1), ("c2", 1, 0)]);
}
