//! Cohort membership through the store: matching rules, set semantics, merges, deletes,
//! Heap sync pages replayed, import keys and partner keys.

use serde_json::json;
use tideway_core::cohorts::{CohortChange, CohortId, CohortIdentifier, CohortUpsert};
use tideway_core::ids::{AliasLabel, AliasName, BrazeId, DeviceId, ExternalId, UserAlias};
use tideway_core::keys::Secret;
use tideway_core::store::SegmentSyncPage;
use tideway_core::store::prelude::*;
use tideway_core::users::{IdentifyItem, IdentifySource};

use super::{NOW, open, track};

fn ext(s: &str) -> CohortIdentifier {
    CohortIdentifier::External(ExternalId::parse(s).unwrap())
}

fn dev(s: &str) -> CohortIdentifier {
    CohortIdentifier::Device(DeviceId::parse(s).unwrap())
}

fn cid(s: &str) -> CohortId {
    CohortId::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_follows_the_matching_rules_and_set_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&store, &ws, json!({"attributes": [
        {"external_id": "known", "x": 1},
        {"device_id": "anon-dev", "x": 1},
        {"device_id": "was-anon", "x": 1},
        {"user_alias": {"alias_name": "a@b", "alias_label": "email"}, "_update_existing_only": false, "x": 1},
    ]}))
    .await;
    // was-anon becomes identified: its device no longer matches for cohort import.
    track(
        &store,
        &ws,
        json!({"attributes": [{"external_id": "now-known", "device_id": "was-anon"}]}),
    )
    .await;
    let alias = CohortIdentifier::Alias(UserAlias {
        label: AliasLabel::parse("email").unwrap(),
        name: AliasName::parse("a@b").unwrap(),
    });
    let changes = vec![CohortChange {
        identifiers: vec![
            ext("known"),
            ext("unknown"),
            dev("anon-dev"),
            dev("was-anon"),
            alias,
            ext("known"),
        ],
        remove: false,
    }];
    let out = store
        .apply_cohort_changes(&ws, "heap", cid("c1"), changes, NOW)
        .await
        .unwrap();
    assert_eq!(
        (out.matched, out.ignored, out.added, out.removed),
        (4, 2, 3, 0)
    );
    let listed = store.list_cohorts(ws.id).await.unwrap();
    assert_eq!(
        (listed[0].name.as_str(), listed[0].member_count),
        ("c1", 3),
        "named by its id until named"
    );
    // Removing a non-member is a no-op; removing a member counts.
    let out = store
        .apply_cohort_changes(
            &ws,
            "heap",
            cid("c1"),
            vec![CohortChange {
                identifiers: vec![ext("now-known"), ext("known")],
                remove: true,
            }],
            NOW,
        )
        .await
        .unwrap();
    assert_eq!((out.added, out.removed), (0, 1));
    store
        .upsert_cohort(
            &ws,
            "heap",
            CohortUpsert {
                cohort_id: cid("c1"),
                name: "Abandoned checkout".into(),
                created_at: NOW,
            },
            NOW,
        )
        .await
        .unwrap();
    let listed = store.list_cohorts(ws.id).await.unwrap();
    assert_eq!(
        (listed[0].name.as_str(), listed[0].member_count),
        ("Abandoned checkout", 2)
    );
    // Empty changes on an unknown cohort create nothing.
    store
        .apply_cohort_changes(&ws, "heap", cid("credential-check"), vec![], NOW)
        .await
        .unwrap();
    assert_eq!(store.list_cohorts(ws.id).await.unwrap().len(), 1);
    assert!(
        store
            .cohort_members(ws.id, "heap", cid("nope"), 0, 10)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_keep_the_union_and_deletes_leave() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&store, &ws, json!({"attributes": [{"external_id": "alice", "x": 1}, {"device_id": "d", "x": 1}, {"external_id": "bob", "x": 1}]})).await;
    store
        .apply_cohort_changes(
            &ws,
            "heap",
            cid("a"),
            vec![CohortChange {
                identifiers: vec![dev("d")],
                remove: false,
            }],
            NOW,
        )
        .await
        .unwrap();
    store
        .apply_cohort_changes(
            &ws,
            "heap",
            cid("b"),
            vec![CohortChange {
                identifiers: vec![ext("alice"), ext("bob")],
                remove: false,
            }],
            NOW,
        )
        .await
        .unwrap();
    let item = IdentifyItem {
        external_id: ExternalId::parse("alice").unwrap(),
        source: IdentifySource::Device(DeviceId::parse("d").unwrap()),
    };
    store.identify(&ws, vec![(0, item)], NOW).await.unwrap();
    let alice = store
        .cohort_members(ws.id, "heap", cid("a"), 0, 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(alice.len(), 1);
    assert_eq!(
        alice[0].external_id.as_ref().map(ExternalId::as_str),
        Some("alice")
    );
    let braze: BrazeId = alice[0].braze_id.clone();
    let mine: Vec<String> = store
        .user_cohorts(ws.id, braze)
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|c| c.cohort_id.as_str().to_owned())
        .collect();
    assert_eq!(mine, ["a", "b"]);
    let del = tideway_core::users::DeleteRequest {
        users: vec![tideway_core::users::UserKey::External(
            ExternalId::parse("bob").unwrap(),
        )],
    };
    store.delete_users(&ws, del, NOW).await.unwrap();
    let b = store
        .list_cohorts(ws.id)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.cohort_id.as_str() == "b")
        .unwrap();
    assert_eq!(b.member_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pages_apply_once_and_drain_empties() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &store,
        &ws,
        json!({"attributes": [{"external_id": "u1", "x": 1}, {"external_id": "u2", "x": 1}]}),
    )
    .await;
    let page = SegmentSyncPage {
        cohort_id: cid("1338065"),
        name: Some("Free Customers".into()),
        page_key: Some(("task".into(), 1)),
        drain: false,
        changes: vec![CohortChange {
            identifiers: vec![ext("u1"), ext("u2")],
            remove: false,
        }],
    };
    let first = store
        .apply_segment_sync(&ws, "heap", page.clone(), NOW)
        .await
        .unwrap();
    assert_eq!((first.replayed, first.membership.added), (false, 2));
    let again = store
        .apply_segment_sync(&ws, "heap", page.clone(), NOW)
        .await
        .unwrap();
    assert!(again.replayed);
    let drain = SegmentSyncPage {
        page_key: None,
        drain: true,
        changes: vec![],
        ..page
    };
    assert_eq!(
        store
            .apply_segment_sync(&ws, "heap", drain, NOW)
            .await
            .unwrap()
            .membership
            .removed,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_keys_rotate_and_partner_keys_are_per_partner() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let a = store.create_workspace("a", NOW).await.unwrap();
    let heap = store
        .partner_api_key("heap", Secret::new("heap-key".into()), NOW)
        .await
        .unwrap();
    let again = store
        .partner_api_key("heap", Secret::new("other".into()), NOW)
        .await
        .unwrap();
    assert_eq!(heap, again, "created once, then shown again");
    assert!(
        store
            .check_partner_api_key("heap", heap.clone())
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
    store
        .create_import_key(a.id, "heap", &k1, NOW)
        .await
        .unwrap();
    store
        .create_import_key(a.id, "heap", &k2, NOW)
        .await
        .unwrap();
    assert!(
        store
            .find_import_key("heap", k1.hash())
            .await
            .unwrap()
            .is_some_and(|o| o.partner_enabled && o.workspace.id == a.id)
    );
    assert!(
        store
            .find_import_key("amplitude", k1.hash())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .invalidate_import_key(a.id, "heap", "import-o", NOW)
            .await
            .unwrap()
    );
    assert!(
        store
            .find_import_key("heap", k1.hash())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .find_import_key("heap", k2.hash())
            .await
            .unwrap()
            .is_some(),
        "the other key keeps working"
    );
    store
        .set_partner_enabled(a.id, "heap", false)
        .await
        .unwrap();
    assert!(
        !store
            .find_import_key("heap", k2.hash())
            .await
            .unwrap()
            .unwrap()
            .partner_enabled
    );
    assert_eq!(store.list_import_keys(a.id, "heap").await.unwrap().len(), 2);
}
