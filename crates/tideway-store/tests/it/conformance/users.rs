//! Users through the services (`tideway_core::services::Services`): `/users/track` with its
//! per-object errors, identify, aliases, merge, delete, rename and remove, export; units of
//! work that commit together or fail alone; workspaces that never see each other.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, json};
use tideway_core::clock::Millis;
use tideway_core::cohorts::{CohortChange, CohortIdentifier};
use tideway_core::ids::{AliasName, BrazeId, Email, Phone, UserSeq};
use tideway_core::store::prelude::*;
use tideway_core::store::{StoreError, run_unit};
use tideway_core::track::{InputArray, MISSING_IDENTIFIER, ObjectError, parse_track};
use tideway_core::users::{
    self, AliasNewItem, AliasUpdateItem, DeleteOutcome, DeleteRequest, ExportRequest, IdentifyItem,
    IdentifySource, ItemOutcome, MergeItem, Prioritization, RenameItem, TrackOutcome, UserKey,
};

use super::{NOW, alias, all_events, cid, dev, export, export_one, ext, track, types};

const UPDATE: &str = "users.profile.Update";
const CUSTOM: &str = "users.behaviors.CustomEvent";
const PURCHASE: &str = "users.behaviors.Purchase";
const ORPHAN: &str = "users.UserOrphan";
const DELETE: &str = "users.UserDeleteRequest";

/// Two hundred concurrent requests, each one attribute update and one custom event of its own
/// user: every event is logged once, at increasing positions, and a unit's events keep their
/// order.
pub(super) async fn concurrent_writes_log_every_event_once_in_increasing_positions(
    store: Arc<dyn Store>,
) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            track(&*store, &ws, json!({
                "attributes": [{"external_id": format!("u{i}"), "plan": "pro"}],
                "events": [{"external_id": format!("u{i}"), "name": "opened", "time": "2025-01-01T00:00:00Z"}],
            }))
            .await
        }));
    }
    for t in tasks {
        let out = t.await.unwrap();
        assert_eq!(
            out,
            TrackOutcome {
                attributes_processed: 1,
                events_processed: 1,
                ..TrackOutcome::default()
            }
        );
    }
    let events = all_events(&*store, &ws).await;
    assert_eq!(events.len(), 400, "one profile update and one event each");
    let ids: HashSet<_> = events.iter().map(|e| e.event.id.0.clone()).collect();
    assert_eq!(ids.len(), 400, "event ids are unique");
    assert!(
        events.windows(2).all(|w| w[0].seq < w[1].seq),
        "positions increase"
    );
    assert!(events.iter().all(|e| e.workspace == ws.id));
    // Per user: the update, then the event (attributes are applied before events).
    let mut by_user: HashMap<UserSeq, Vec<&str>> = HashMap::new();
    for e in &events {
        by_user
            .entry(e.user.expect("every event is about a user"))
            .or_default()
            .push(e.event.event_type.as_str());
    }
    assert_eq!(by_user.len(), 200);
    assert!(
        by_user.values().all(|t| t == &[UPDATE, CUSTOM]),
        "{by_user:?}"
    );
    // Read page by page from each position, the log is the same.
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = store.read_events(ws.id, after, 7).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        assert!(page.len() <= 7);
        paged.extend(page);
    }
    assert_eq!(paged, events);
}

/// A unit of work that fails leaves nothing (user, cohort, events), while units and admin
/// calls running beside it commit; a conflicting admin call fails with `Conflict` alone.
pub(super) async fn a_failing_unit_rolls_back_alone(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let duplicate = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.create_workspace("w", NOW).await })
    };
    let doomed = {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tokio::spawn(async move {
            let body = json!({
                "attributes": [{"external_id": "doomed", "x": 1}],
                "events": [{"external_id": "doomed", "name": "e", "time": "2025-01-01T00:00:00Z"}],
            });
            let req = parse_track(body.as_object().unwrap()).unwrap();
            run_unit(&*store, &ws, NOW, move |tx, ctx| {
                users::track(tx, ctx, &req)?;
                let cohort = tx.upsert_cohort("heap", &cid("doomed"), None, ctx.now, ctx.now)?;
                let user = tx
                    .user_by_external_id(&ext("doomed"))?
                    .expect("created above");
                tx.set_member(cohort, user.seq, true, ctx.now)?;
                tx.adjust_member_count(cohort, 1, ctx.now)?;
                Err::<(), _>(StoreError::Corrupt("planned failure".into()))
            })
            .await
        })
    };
    let mut good = Vec::new();
    for i in 0..10 {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        good.push(tokio::spawn(async move {
            track(
                &*store,
                &ws,
                json!({"attributes": [{"external_id": format!("ok{i}"), "x": i}]}),
            )
            .await
        }));
    }
    assert!(matches!(
        duplicate.await.unwrap(),
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        doomed.await.unwrap(),
        Err(StoreError::Corrupt("planned failure".into()))
    );
    for t in good {
        assert_eq!(t.await.unwrap().attributes_processed, 1);
    }
    assert_eq!(export_one(&*store, &ws, "doomed").await, None);
    assert_eq!(
        export_one(&*store, &ws, "ok3").await.unwrap()["custom_attributes"],
        json!({"x": 3})
    );
    assert_eq!(store.list_cohorts(ws.id).await.unwrap(), vec![]);
    let events = all_events(&*store, &ws).await;
    assert_eq!(
        types(&events),
        vec![UPDATE; 10],
        "only the good units' events"
    );
    assert_eq!(store.list_workspaces().await.unwrap(), vec![ws]);
}

/// `/users/track`: valid objects apply (attributes, then events, then purchases), invalid ones
/// are reported by array and index without stopping the rest.
pub(super) async fn track_applies_valid_objects_and_reports_each_error(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let body = json!({
        "attributes": [
            {"external_id": "ann", "first_name": "Ann", "plan": "pro", "visits": {"inc": 2}},
            {"plan": "nobody"},
            {"braze_id": "000000000000000000000000", "x": 1},
            {"external_id": "ann", "visits": {"inc": 1}, "tags": ["x", "y"]},
        ],
        "events": [
            {"external_id": "ann", "name": "opened", "time": "2025-01-03T00:00:00Z"},
            {"external_id": "ann", "name": "opened", "time": "2025-01-01T00:00:00Z"},
            {"external_id": "ann", "time": "2025-01-01T00:00:00Z"},
        ],
        "purchases": [
            {"external_id": "ann", "product_id": "sku", "currency": "USD", "price": 2.5, "quantity": 3, "time": "2025-01-02T00:00:00Z"},
            {"external_id": "ben", "product_id": "sku", "currency": "USD", "price": 1, "time": "2025-01-02T00:00:00Z"},
        ],
    });
    let req = parse_track(body.as_object().unwrap()).unwrap();
    let parse_errors = req.errors.clone();
    assert_eq!(
        parse_errors
            .iter()
            .map(|e| (e.input_array, e.index))
            .collect::<Vec<_>>(),
        [(InputArray::Attributes, 1), (InputArray::Events, 2)]
    );
    let out = store.track(&ws, req, NOW).await.unwrap();
    assert_eq!(
        out,
        TrackOutcome {
            attributes_processed: 2,
            events_processed: 2,
            purchases_processed: 2,
            errors: vec![
                ObjectError {
                    input_array: InputArray::Attributes,
                    index: 1,
                    message: MISSING_IDENTIFIER.to_owned(),
                },
                ObjectError {
                    input_array: InputArray::Attributes,
                    index: 2,
                    message: "'braze_id' does not match an existing user".to_owned(),
                },
                parse_errors[1].clone(),
            ],
        }
    );
    let ann = export_one(&*store, &ws, "ann").await.unwrap();
    assert_eq!(ann["first_name"], "Ann");
    assert_eq!(
        ann["custom_attributes"],
        json!({"plan": "pro", "visits": 3, "tags": ["x", "y"]})
    );
    assert_eq!(
        ann["custom_events"],
        json!([{"name": "opened", "first": "2025-01-01T00:00:00.000Z", "last": "2025-01-03T00:00:00.000Z", "count": 2}])
    );
    assert_eq!(
        ann["purchases"],
        json!([{"name": "sku", "first": "2025-01-02T00:00:00.000Z", "last": "2025-01-02T00:00:00.000Z", "count": 3}])
    );
    assert_eq!(ann["total_revenue"], json!(7.5));
    let ben = export_one(&*store, &ws, "ben").await.unwrap();
    assert_eq!(ben["total_revenue"], json!(1.0));
    assert_eq!(ben["custom_attributes"], json!({}));
    let events = all_events(&*store, &ws).await;
    assert_eq!(
        types(&events),
        [
            UPDATE, UPDATE, CUSTOM, CUSTOM, PURCHASE, PURCHASE, PURCHASE, PURCHASE
        ],
        "a quantity of 3 logs three purchases"
    );
    let ann_seq = events[0].user;
    assert!(events[..7].iter().all(|e| e.user == ann_seq));
    assert_ne!(events[7].user, ann_seq);
}

/// `_update_existing_only: true` (and an alias-only object without the flag) updates a user
/// that exists and skips, without an error, one that does not.
pub(super) async fn update_existing_only_never_creates_users(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "known", "x": 1}]}),
    )
    .await;
    let out = track(&*store, &ws, json!({
        "attributes": [
            {"external_id": "ghost", "_update_existing_only": true, "x": 1},
            {"external_id": "known", "_update_existing_only": true, "x": 2},
            {"user_alias": {"alias_name": "a-1", "alias_label": "crm"}, "x": 1},
        ],
        "events": [
            {"external_id": "ghost", "_update_existing_only": true, "name": "e", "time": "2025-01-01T00:00:00Z"},
        ],
    }))
    .await;
    assert_eq!(
        out,
        TrackOutcome {
            attributes_processed: 1,
            ..TrackOutcome::default()
        }
    );
    assert_eq!(export_one(&*store, &ws, "ghost").await, None);
    assert_eq!(
        export_one(&*store, &ws, "known").await.unwrap()["custom_attributes"],
        json!({"x": 2})
    );
    let by_alias = || ExportRequest {
        aliases: vec![alias("crm", "a-1")],
        ..ExportRequest::default()
    };
    assert!(export(&*store, &ws, by_alias()).await.users.is_empty());
    // With `false`, the alias-only object creates its user.
    let out = track(
        &*store,
        &ws,
        json!({"attributes": [{"user_alias": {"alias_name": "a-1", "alias_label": "crm"}, "_update_existing_only": false, "x": 3}]}),
    )
    .await;
    assert_eq!(out.attributes_processed, 1);
    let users = export(&*store, &ws, by_alias()).await.users;
    assert_eq!(users.len(), 1);
    assert_eq!(users[0]["custom_attributes"], json!({"x": 3}));
    assert_eq!(
        users[0]["user_aliases"],
        json!([{"alias_name": "a-1", "alias_label": "crm"}])
    );
    assert_eq!(users[0].get("external_id"), None);
    assert_eq!(
        types(&all_events(&*store, &ws).await),
        [UPDATE, UPDATE, UPDATE]
    );
}

/// A device's anonymous user: a new external id identifies it in place; an existing one absorbs
/// it (its values win, the anonymous user's new ones are copied) and orphans it.
pub(super) async fn device_users_identify_in_place_or_merge_and_orphan(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&*store, &ws, json!({"attributes": [{"device_id": "d1", "color": "red"}, {"device_id": "d2", "color": "blue", "size": 3}]})).await;
    // d1's user becomes identified in place.
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "alice", "device_id": "d1", "plan": "pro"}]}),
    )
    .await;
    let alice = export_one(&*store, &ws, "alice").await.unwrap();
    assert_eq!(
        alice["custom_attributes"],
        json!({"color": "red", "plan": "pro"})
    );
    let alice_braze = alice["braze_id"].as_str().unwrap().to_owned();
    let d2 = export(
        &*store,
        &ws,
        ExportRequest {
            device_id: Some(dev("d2")),
            ..ExportRequest::default()
        },
    )
    .await;
    let d2_braze = d2.users[0]["braze_id"].as_str().unwrap().to_owned();
    // d2's anonymous user merges into the existing alice.
    let items = vec![(
        0,
        IdentifyItem {
            external_id: ext("alice"),
            source: IdentifySource::Device(dev("d2")),
        },
    )];
    assert_eq!(
        store.identify(&ws, items, NOW).await.unwrap(),
        ItemOutcome {
            processed: 1,
            errors: vec![]
        }
    );
    let alice = export_one(&*store, &ws, "alice").await.unwrap();
    assert_eq!(
        alice["braze_id"],
        alice_braze.as_str(),
        "identified in place"
    );
    assert_eq!(
        alice["custom_attributes"],
        json!({"color": "red", "plan": "pro", "size": 3})
    );
    assert_eq!(alice["device_ids"], json!(["d1", "d2"]));
    let events = all_events(&*store, &ws).await;
    assert_eq!(types(&events), [UPDATE, UPDATE, UPDATE, ORPHAN]);
    let orphan = events[3].event.body_value();
    assert_eq!(orphan["user"]["user_id"], d2_braze.as_str());
    assert_eq!(orphan["properties"]["orphaned_by_id"], alice_braze.as_str());
    // Both devices resolve to alice; the orphan's braze id no longer resolves.
    for device in ["d1", "d2"] {
        let by_device = export(
            &*store,
            &ws,
            ExportRequest {
                device_id: Some(dev(device)),
                ..ExportRequest::default()
            },
        )
        .await;
        assert_eq!(by_device.users.len(), 1);
        assert_eq!(by_device.users[0]["external_id"], "alice");
    }
    let by_braze = export(
        &*store,
        &ws,
        ExportRequest {
            braze_id: Some(BrazeId::parse(&d2_braze).unwrap()),
            ..ExportRequest::default()
        },
    )
    .await;
    assert!(by_braze.users.is_empty());
    // Identifying an already-identified user under another id is refused.
    let items = vec![(
        3,
        IdentifyItem {
            external_id: ext("bob"),
            source: IdentifySource::Device(dev("d1")),
        },
    )];
    assert_eq!(
        store.identify(&ws, items, NOW).await.unwrap(),
        ItemOutcome {
            processed: 0,
            errors: vec![(
                3,
                "the user to identify already has a different external_id".to_owned()
            )],
        }
    );
}

/// `/users/alias/new` and `/users/alias/update`, with one alias per label per user and a
/// (label, name) pair owned by one user.
pub(super) async fn aliases_are_added_and_renamed(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "alice", "x": 1}, {"external_id": "bob", "x": 1}]}),
    )
    .await;
    let new = |external_id: Option<&str>, label: &str, name: &str| AliasNewItem {
        external_id: external_id.map(ext),
        alias: alias(label, name),
    };
    let items = vec![
        (0, new(Some("alice"), "crm", "c-1")),
        (1, new(Some("bob"), "crm", "c-1")),
        (2, new(Some("alice"), "crm", "c-2")),
        (3, new(Some("nobody"), "web", "w-0")),
        (4, new(None, "web", "w-1")),
        (5, new(Some("alice"), "crm", "c-1")),
    ];
    assert_eq!(
        store.alias_new(&ws, items, NOW).await.unwrap(),
        ItemOutcome {
            processed: 4,
            errors: vec![
                (1, "this alias already belongs to another user".to_owned()),
                (2, "the user already has an alias labelled 'crm'".to_owned()),
            ],
        }
    );
    let by_alias = |label: &str, name: &str| ExportRequest {
        aliases: vec![alias(label, name)],
        ..ExportRequest::default()
    };
    let owner = export(&*store, &ws, by_alias("crm", "c-1")).await.users;
    assert_eq!(owner.len(), 1);
    assert_eq!(owner[0]["external_id"], "alice");
    assert!(
        export(&*store, &ws, by_alias("web", "w-0"))
            .await
            .users
            .is_empty(),
        "an unknown external id gets no alias"
    );
    let alias_only = export(&*store, &ws, by_alias("web", "w-1")).await.users;
    assert_eq!(alias_only.len(), 1, "an alias alone creates its user");
    assert_eq!(alias_only[0].get("external_id"), None);
    assert_eq!(
        alias_only[0]["user_aliases"],
        json!([{"alias_name": "w-1", "alias_label": "web"}])
    );
    let update = |label: &str, old: &str, new: &str| AliasUpdateItem {
        old: alias(label, old),
        new_name: AliasName::parse(new).unwrap(),
    };
    let items = vec![
        (0, update("crm", "c-1", "c-9")),
        (1, update("crm", "nope", "c-10")),
        (2, update("web", "w-1", "w-1")),
    ];
    assert_eq!(
        store.alias_update(&ws, items, NOW).await.unwrap(),
        ItemOutcome {
            processed: 1,
            errors: vec![
                (1, "no user has this alias".to_owned()),
                (2, "the new alias already exists".to_owned()),
            ],
        }
    );
    assert!(
        export(&*store, &ws, by_alias("crm", "c-1"))
            .await
            .users
            .is_empty()
    );
    let alice = export_one(&*store, &ws, "alice").await.unwrap();
    assert_eq!(
        alice["user_aliases"],
        json!([{"alias_name": "c-9", "alias_label": "crm"}])
    );
    assert_eq!(
        export(&*store, &ws, by_alias("crm", "c-9")).await.users[0]["external_id"],
        "alice"
    );
}

/// `/users/merge`: the kept user wins conflicts, gains what only the merged one had (attributes,
/// events, purchases, aliases of a new label), and the merged one is orphaned and gone.
pub(super) async fn merges_fold_one_profile_into_another(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&*store, &ws, json!({
        "attributes": [
            {"external_id": "alice", "plan": "pro", "user_alias": {"alias_name": "a-1", "alias_label": "crm"}},
            {"external_id": "bob", "plan": "free", "color": "red", "user_alias": {"alias_name": "b-1", "alias_label": "crm"}},
            {"external_id": "bob", "user_alias": {"alias_name": "b-2", "alias_label": "web"}},
        ],
        "events": [
            {"external_id": "alice", "name": "opened", "time": "2025-01-02T00:00:00Z"},
            {"external_id": "bob", "name": "opened", "time": "2025-01-01T00:00:00Z"},
            {"external_id": "bob", "name": "clicked", "time": "2025-01-01T00:00:00Z"},
        ],
        "purchases": [
            {"external_id": "bob", "product_id": "sku", "currency": "USD", "price": 4, "time": "2025-01-01T00:00:00Z"},
        ],
    }))
    .await;
    let bob_braze = export_one(&*store, &ws, "bob").await.unwrap()["braze_id"].clone();
    let items = vec![
        (
            0,
            MergeItem {
                merge: UserKey::External(ext("bob")),
                keep: UserKey::External(ext("alice")),
            },
        ),
        (
            1,
            MergeItem {
                merge: UserKey::External(ext("nobody")),
                keep: UserKey::External(ext("alice")),
            },
        ),
        (
            2,
            MergeItem {
                merge: UserKey::Alias(alias("crm", "a-1")),
                keep: UserKey::External(ext("alice")),
            },
        ),
    ];
    assert_eq!(
        store.merge_users(&ws, items, NOW).await.unwrap(),
        ItemOutcome {
            processed: 1,
            errors: vec![
                (
                    1,
                    "both 'identifier_to_merge' and 'identifier_to_keep' must match a user"
                        .to_owned()
                ),
                (
                    2,
                    "'identifier_to_merge' and 'identifier_to_keep' are the same user".to_owned()
                ),
            ],
        }
    );
    let alice = export_one(&*store, &ws, "alice").await.unwrap();
    assert_eq!(
        alice["custom_attributes"],
        json!({"plan": "pro", "color": "red"})
    );
    assert_eq!(
        alice["custom_events"],
        json!([
            {"name": "clicked", "first": "2025-01-01T00:00:00.000Z", "last": "2025-01-01T00:00:00.000Z", "count": 1},
            {"name": "opened", "first": "2025-01-01T00:00:00.000Z", "last": "2025-01-02T00:00:00.000Z", "count": 2},
        ])
    );
    assert_eq!(
        alice["purchases"],
        json!([{"name": "sku", "first": "2025-01-01T00:00:00.000Z", "last": "2025-01-01T00:00:00.000Z", "count": 1}])
    );
    assert_eq!(alice["total_revenue"], json!(4.0));
    let mut aliases: Vec<String> = alice["user_aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["alias_label"], a["alias_name"]))
        .collect();
    aliases.sort();
    assert_eq!(
        aliases,
        [r#""crm"/"a-1""#, r#""web"/"b-2""#],
        "a label alice has stays hers"
    );
    let gone = export(
        &*store,
        &ws,
        ExportRequest {
            external_ids: vec![ext("bob")],
            aliases: vec![alias("crm", "b-1")],
            ..ExportRequest::default()
        },
    )
    .await;
    assert!(gone.users.is_empty());
    assert_eq!(gone.invalid_user_ids, ["bob"]);
    let events = all_events(&*store, &ws).await;
    let last = events.last().unwrap();
    assert_eq!(last.event.event_type.as_str(), ORPHAN);
    assert_eq!(last.event.body_value()["user"]["user_id"], bob_braze);
    assert_eq!(
        last.event.body_value()["properties"]["orphaned_by_id"],
        alice["braze_id"]
    );
}

/// `/users/delete`: named users are erased (identifiers freed) and a delete request logged;
/// unknown ones are not counted.
pub(super) async fn deletes_erase_users_and_log_a_delete_request(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&*store, &ws, json!({"attributes": [
        {"external_id": "bob", "email": "bob@example.com", "phone": "+15550100", "user_alias": {"alias_name": "b-1", "alias_label": "crm"}, "x": 1},
        {"external_id": "carol", "x": 1},
    ]}))
    .await;
    let bob = export_one(&*store, &ws, "bob").await.unwrap();
    let request = DeleteRequest {
        users: vec![
            UserKey::External(ext("bob")),
            UserKey::External(ext("nobody")),
            UserKey::Alias(alias("crm", "b-1")),
        ],
    };
    assert_eq!(
        store.delete_users(&ws, request, NOW).await.unwrap(),
        DeleteOutcome { deleted: 1 }
    );
    let events = all_events(&*store, &ws).await;
    assert_eq!(types(&events), [UPDATE, UPDATE, DELETE]);
    assert_eq!(events[2].user, events[0].user, "about bob");
    assert_eq!(
        events[2].event.body_value()["user"]["user_id"],
        bob["braze_id"]
    );
    let gone = export(
        &*store,
        &ws,
        ExportRequest {
            external_ids: vec![ext("bob"), ext("carol")],
            aliases: vec![alias("crm", "b-1")],
            braze_id: Some(BrazeId::parse(bob["braze_id"].as_str().unwrap()).unwrap()),
            email: Some(Email::parse("bob@example.com").unwrap()),
            phone: Some(Phone::parse("+15550100").unwrap()),
            ..ExportRequest::default()
        },
    )
    .await;
    assert_eq!(gone.users.len(), 1);
    assert_eq!(gone.users[0]["external_id"], "carol");
    assert_eq!(gone.invalid_user_ids, ["bob"]);
    // The external id is free again: a new user.
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "bob", "y": 2}]}),
    )
    .await;
    let new_bob = export_one(&*store, &ws, "bob").await.unwrap();
    assert_ne!(new_bob["braze_id"], bob["braze_id"]);
    assert_eq!(new_bob["custom_attributes"], json!({"y": 2}));
    assert_eq!(new_bob["user_aliases"], json!([]));
    assert_eq!(new_bob.get("email"), None);
}

/// `/users/external_ids/rename` keeps the old id resolving to the user (deprecated) until
/// `/users/external_ids/remove`; a taken new id or a current id to remove are errors.
pub(super) async fn renamed_external_ids_resolve_until_removed(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "old", "x": 1}, {"external_id": "taken", "x": 2}]}),
    )
    .await;
    let out = store
        .rename_external_ids(
            &ws,
            vec![
                RenameItem {
                    current: ext("old"),
                    new: ext("new"),
                },
                RenameItem {
                    current: ext("taken"),
                    new: ext("new"),
                },
                RenameItem {
                    current: ext("missing"),
                    new: ext("other"),
                },
            ],
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(out.renamed, [ext("new")]);
    assert_eq!(
        out.errors,
        [
            (
                ext("taken"),
                "'new_external_id' is already in use".to_owned()
            ),
            (
                ext("missing"),
                "'current_external_id' does not match a user's current external_id".to_owned()
            ),
        ]
    );
    let renamed = export_one(&*store, &ws, "old").await.unwrap();
    assert_eq!(renamed["external_id"], "new");
    assert_eq!(renamed["custom_attributes"], json!({"x": 1}));
    assert_eq!(export_one(&*store, &ws, "new").await, Some(renamed));
    // A deprecated id cannot be renamed again: it is not the user's current one.
    let again = store
        .rename_external_ids(
            &ws,
            vec![RenameItem {
                current: ext("old"),
                new: ext("newer"),
            }],
            NOW,
        )
        .await
        .unwrap();
    assert!(again.renamed.is_empty());
    let removed = store
        .remove_external_ids(&ws, vec![ext("old"), ext("new")])
        .await
        .unwrap();
    assert_eq!(removed.removed, [ext("old")]);
    assert_eq!(
        removed.errors,
        [(ext("new"), "not a deprecated external_id".to_owned())],
        "a current id is not removable"
    );
    assert_eq!(export_one(&*store, &ws, "old").await, None);
    assert_eq!(
        export_one(&*store, &ws, "new").await.unwrap()["custom_attributes"],
        json!({"x": 1})
    );
}

/// `/users/export/ids` finds users by external id, alias, device, braze id, email and phone,
/// each once, in that order; unknown external ids are listed; `fields` narrows the profile.
pub(super) async fn export_finds_users_by_every_identifier(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&*store, &ws, json!({"attributes": [
        {"external_id": "alice", "email": "shared@example.com", "phone": "+15550101", "device_id": "d-a", "user_alias": {"alias_name": "a-1", "alias_label": "crm"}},
        {"external_id": "bob", "email": "shared@example.com"},
        {"device_id": "d-anon", "first_name": "Anon"},
    ]}))
    .await;
    let req = ExportRequest {
        external_ids: vec![ext("alice"), ext("nobody"), ext("bob")],
        aliases: vec![alias("crm", "a-1"), alias("crm", "none")],
        device_id: Some(dev("d-anon")),
        email: Some(Email::parse("shared@example.com").unwrap()),
        phone: Some(Phone::parse("+15550101").unwrap()),
        ..ExportRequest::default()
    };
    let out = export(&*store, &ws, req).await;
    assert_eq!(out.invalid_user_ids, ["nobody"]);
    let found: Vec<_> = out
        .users
        .iter()
        .map(|u| (u.get("external_id").cloned(), u.get("first_name").cloned()))
        .collect();
    assert_eq!(
        found,
        [
            (Some(json!("alice")), None),
            (Some(json!("bob")), None),
            (None, Some(json!("Anon"))),
        ]
    );
    let alice = &out.users[0];
    assert_eq!(alice["email"], "shared@example.com");
    assert_eq!(alice["phone"], "+15550101");
    assert_eq!(alice["device_ids"], json!(["d-a"]));
    assert_eq!(alice["braze_id"], alice["appboy_id"]);
    let braze = BrazeId::parse(alice["braze_id"].as_str().unwrap()).unwrap();
    let by_braze = export(
        &*store,
        &ws,
        ExportRequest {
            braze_id: Some(braze),
            fields: vec!["external_id".into(), "email".into()],
            ..ExportRequest::default()
        },
    )
    .await;
    assert_eq!(
        serde_json::Value::Object(by_braze.users[0].clone()),
        json!({"external_id": "alice", "email": "shared@example.com"})
    );
    // Reads see every acknowledged write, including one just made.
    track(
        &*store,
        &ws,
        json!({"attributes": [{"external_id": "alice", "first_name": "Alice"}]}),
    )
    .await;
    assert_eq!(
        export_one(&*store, &ws, "alice").await.unwrap()["first_name"],
        "Alice"
    );
}

/// The same external id in two workspaces is two users; events, cohorts and aliases of one
/// workspace are invisible from the other.
pub(super) async fn workspaces_are_isolated(store: Arc<dyn Store>) {
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    track(
        &*store,
        &a,
        json!({"attributes": [{"external_id": "same", "where": "a", "user_alias": {"alias_name": "n", "alias_label": "l"}}]}),
    )
    .await;
    track(
        &*store,
        &b,
        json!({"attributes": [{"external_id": "same", "where": "b"}], "events": [{"external_id": "same", "name": "e", "time": "2025-01-01T00:00:00Z"}]}),
    )
    .await;
    let in_a = export_one(&*store, &a, "same").await.unwrap();
    let in_b = export_one(&*store, &b, "same").await.unwrap();
    assert_eq!(in_a["custom_attributes"]["where"], "a");
    assert_eq!(in_b["custom_attributes"]["where"], "b");
    assert_ne!(in_a["braze_id"], in_b["braze_id"]);
    let events_a = all_events(&*store, &a).await;
    let events_b = all_events(&*store, &b).await;
    assert_eq!(types(&events_a), [UPDATE]);
    assert_eq!(types(&events_b), [UPDATE, CUSTOM]);
    assert!(events_a.iter().all(|e| e.workspace == a.id));
    assert!(events_b.iter().all(|e| e.workspace == b.id));
    assert_eq!(
        events_a[0].event.body_value()["properties"]["app_group_id"],
        a.app_group_id.as_str()
    );
    let req = ExportRequest {
        aliases: vec![alias("l", "n")],
        ..ExportRequest::default()
    };
    assert!(export(&*store, &b, req).await.users.is_empty());
    // a's braze id names no one in b.
    let braze = BrazeId::parse(in_a["braze_id"].as_str().unwrap()).unwrap();
    assert_eq!(store.user_cohorts(b.id, braze).await.unwrap(), None);
    store
        .apply_cohort_changes(
            &a,
            "heap",
            cid("c"),
            vec![CohortChange {
                identifiers: vec![CohortIdentifier::External(ext("same"))],
                remove: false,
            }],
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(store.list_cohorts(a.id).await.unwrap().len(), 1);
    assert_eq!(store.list_cohorts(b.id).await.unwrap(), vec![]);
    assert_eq!(
        store
            .cohort_members(b.id, "heap", cid("c"), 0, 10)
            .await
            .unwrap(),
        None
    );
}

/// Many concurrent requests on one new external id: one user is created, and no update is
/// lost (each increments a counter and sets an attribute of its own).
pub(super) async fn concurrent_updates_of_one_user_lose_nothing(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            track(
                &*store,
                &ws,
                json!({"attributes": [{"external_id": "same", "n": {"inc": 1}, format!("a{i}"): i}]}),
            )
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().attributes_processed, 1);
    }
    let user = export_one(&*store, &ws, "same").await.unwrap();
    let custom = user["custom_attributes"].as_object().unwrap();
    assert_eq!(custom["n"], 40);
    assert_eq!(custom.len(), 41, "{custom:?}");
    let events = all_events(&*store, &ws).await;
    assert_eq!(types(&events), vec![UPDATE; 40]);
    assert!(
        events.iter().all(|e| e.user == events[0].user),
        "about one user"
    );
}

/// Email and phone name users by recency: a write goes to the most recently updated user with
/// an external id (else the most recently updated one); identify and delete narrow the
/// candidates by their prioritization and need exactly one; export lists every match, most
/// recently updated first.
pub(super) async fn contact_identifiers_pick_users_by_recency_and_prioritization(
    store: Arc<dyn Store>,
) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let at = |s: i64| Millis(NOW.0 + s * 1_000);
    let track_at = |body: serde_json::Value, s: i64| {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        async move {
            let req = parse_track(body.as_object().unwrap()).unwrap();
            store.track(&ws, req, at(s)).await.unwrap()
        }
    };
    let email = || Email::parse("shared@example.com").unwrap();
    let by_email = || ExportRequest {
        email: Some(email()),
        ..ExportRequest::default()
    };
    let named = |out: &users::ExportOutcome| -> Vec<String> {
        out.users
            .iter()
            .map(|u| {
                u.get("external_id")
                    .and_then(|e| e.as_str())
                    .unwrap_or("-")
                    .to_owned()
            })
            .collect()
    };
    // An anonymous user with the email, then two identified ones.
    track_at(
        json!({"attributes": [{"email": "shared@example.com", "who": "anon"}]}),
        1,
    )
    .await;
    track_at(
        json!({"attributes": [{"external_id": "old", "email": "shared@example.com"}]}),
        2,
    )
    .await;
    track_at(
        json!({"attributes": [{"external_id": "new", "email": "shared@example.com"}]}),
        3,
    )
    .await;
    assert_eq!(
        named(&export(&*store, &ws, by_email()).await),
        ["new", "old", "-"]
    );
    // By email: the most recently updated identified user.
    track_at(
        json!({"attributes": [{"email": "shared@example.com", "hit": 1}]}),
        4,
    )
    .await;
    track_at(
        json!({"attributes": [{"external_id": "old", "touched": true}]}),
        5,
    )
    .await;
    track_at(
        json!({"attributes": [{"email": "shared@example.com", "hit": 2}]}),
        6,
    )
    .await;
    let hits = |u: &Map<String, serde_json::Value>| u["custom_attributes"].get("hit").cloned();
    assert_eq!(
        hits(&export_one(&*store, &ws, "new").await.unwrap()),
        Some(json!(1))
    );
    assert_eq!(
        hits(&export_one(&*store, &ws, "old").await.unwrap()),
        Some(json!(2))
    );
    assert_eq!(
        named(&export(&*store, &ws, by_email()).await),
        ["old", "new", "-"]
    );
    // Identify by email: the rules must leave exactly one user.
    let identify = |index, external: &str, rules: Vec<Prioritization>| {
        (
            index,
            IdentifyItem {
                external_id: ext(external),
                source: IdentifySource::Email(email(), rules),
            },
        )
    };
    let items = vec![
        identify(0, "x", vec![]),
        identify(
            1,
            "old",
            vec![
                Prioritization::Identified,
                Prioritization::MostRecentlyUpdated,
            ],
        ),
        identify(
            2,
            "zzz",
            vec![
                Prioritization::Identified,
                Prioritization::LeastRecentlyUpdated,
            ],
        ),
        identify(3, "anon-now", vec![Prioritization::Unidentified]),
    ];
    assert_eq!(
        store.identify(&ws, items, at(7)).await.unwrap(),
        ItemOutcome {
            processed: 2,
            errors: vec![
                (
                    0,
                    "no single user matches the identifier to identify".to_owned()
                ),
                (
                    2,
                    "the user to identify already has a different external_id".to_owned()
                ),
            ],
        }
    );
    let anon = export_one(&*store, &ws, "anon-now").await.unwrap();
    assert_eq!(anon["custom_attributes"], json!({"who": "anon"}));
    assert_eq!(
        named(&export(&*store, &ws, by_email()).await),
        ["anon-now", "old", "new"]
    );
    // Delete by email, least recently updated of the identified: "new".
    let delete = DeleteRequest {
        users: vec![UserKey::Email(
            email(),
            vec![
                Prioritization::Identified,
                Prioritization::LeastRecentlyUpdated,
            ],
        )],
    };
    assert_eq!(
        store.delete_users(&ws, delete, at(8)).await.unwrap(),
        DeleteOutcome { deleted: 1 }
    );
    assert_eq!(
        named(&export(&*store, &ws, by_email()).await),
        ["anon-now", "old"]
    );
    // Phone: the same rule for writes.
    track_at(json!({"attributes": [{"phone": "+15550199", "p": 1}]}), 9).await;
    track_at(
        json!({"attributes": [{"external_id": "old", "phone": "+15550199"}]}),
        10,
    )
    .await;
    track_at(json!({"attributes": [{"phone": "+15550199", "p": 2}]}), 11).await;
    let old = export_one(&*store, &ws, "old").await.unwrap();
    assert_eq!(old["custom_attributes"]["p"], 2);
    let by_phone = ExportRequest {
        phone: Some(Phone::parse("+15550199").unwrap()),
        ..ExportRequest::default()
    };
    assert_eq!(named(&export(&*store, &ws, by_phone).await), ["old", "-"]);
}

/// Attribute operations across requests: array add (re-adding moves to the end) and remove,
/// increments, `null` removes, nested objects replaced or deep-merged, arrays capped at the
/// most recent 25, standard fields set and cleared.
pub(super) async fn attribute_operations_apply_across_requests(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let one = |attributes: serde_json::Value| json!({"attributes": [attributes]});
    let long: Vec<String> = (0..30).map(|i| format!("v{i}")).collect();
    track(&*store, &ws, one(json!({
        "external_id": "u1", "first_name": "Ann", "tags": ["a", "b"], "n": {"inc": 5}, "gone": "soon",
        "address": {"city": "Oslo", "zip": "0150"}, "long": long,
    })))
    .await;
    track(&*store, &ws, one(json!({
        "external_id": "u1", "tags": {"add": ["c", "a"], "remove": ["b"]}, "n": {"inc": -2},
        "address": {"zip": "0151", "street": {"name": "Karl Johans gate"}}, "_merge_objects": true,
    })))
    .await;
    track(
        &*store,
        &ws,
        one(json!({"external_id": "u1", "tags": {"remove": ["x"]}, "gone": null, "first_name": null, "last_name": "Lee"})),
    )
    .await;
    let user = export_one(&*store, &ws, "u1").await.unwrap();
    let expected_long: Vec<String> = (5..30).map(|i| format!("v{i}")).collect();
    assert_eq!(
        user["custom_attributes"],
        json!({
            "tags": ["c", "a"],
            "n": 3,
            "address": {"city": "Oslo", "zip": "0151", "street": {"name": "Karl Johans gate"}},
            "long": expected_long,
        })
    );
    assert_eq!(user.get("first_name"), None);
    assert_eq!(user["last_name"], "Lee");
    // An object without `_merge_objects` replaces the stored one.
    track(
        &*store,
        &ws,
        one(json!({"external_id": "u1", "address": {"city": "Bergen"}})),
    )
    .await;
    let user = export_one(&*store, &ws, "u1").await.unwrap();
    assert_eq!(
        user["custom_attributes"]["address"],
        json!({"city": "Bergen"})
    );
    // A request that changes nothing logs nothing.
    let before = all_events(&*store, &ws).await.len();
    track(
        &*store,
        &ws,
        one(json!({"external_id": "u1", "last_name": "Lee", "n": 3})),
    )
    .await;
    assert_eq!(all_events(&*store, &ws).await.len(), before);
    assert_eq!(before, 4);
}

/// `/users/identify` by alias: an unknown external id identifies the alias's user in place;
/// a known one absorbs the alias's user (aliases move, the orphan is logged) unless it has an
/// alias of that label already; an unknown alias is an error.
pub(super) async fn alias_users_identify_in_place_or_merge(store: Arc<dyn Store>) {
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&*store, &ws, json!({"attributes": [
        {"user_alias": {"alias_name": "a-1", "alias_label": "crm"}, "_update_existing_only": false, "from": "a-1"},
        {"user_alias": {"alias_name": "a-2", "alias_label": "crm"}, "_update_existing_only": false, "from": "a-2", "only": "a-2"},
        {"user_alias": {"alias_name": "w-1", "alias_label": "web"}, "_update_existing_only": false, "from": "w-1"},
        {"external_id": "kept", "from": "kept", "user_alias": {"alias_name": "k-1", "alias_label": "crm"}},
    ]}))
    .await;
    let by_alias = |label: &str, name: &str| ExportRequest {
        aliases: vec![alias(label, name)],
        ..ExportRequest::default()
    };
    let a1 = export(&*store, &ws, by_alias("crm", "a-1")).await.users;
    let identify = |index, external: &str, label: &str, name: &str| {
        (
            index,
            IdentifyItem {
                external_id: ext(external),
                source: IdentifySource::Alias(alias(label, name)),
            },
        )
    };
    let items = vec![
        identify(0, "fresh", "crm", "a-1"),
        identify(1, "kept", "crm", "a-2"),
        identify(2, "kept", "web", "w-1"),
        identify(3, "kept", "crm", "missing"),
    ];
    assert_eq!(
        store.identify(&ws, items, NOW).await.unwrap(),
        ItemOutcome {
            processed: 2,
            errors: vec![
                (
                    1,
                    "the user with this external_id already has an alias labelled 'crm'".to_owned()
                ),
                (
                    3,
                    "no single user matches the identifier to identify".to_owned()
                ),
            ],
        }
    );
    let fresh = export_one(&*store, &ws, "fresh").await.unwrap();
    assert_eq!(fresh["braze_id"], a1[0]["braze_id"], "identified in place");
    assert_eq!(fresh["custom_attributes"], json!({"from": "a-1"}));
    let kept = export_one(&*store, &ws, "kept").await.unwrap();
    assert_eq!(kept["custom_attributes"], json!({"from": "kept"}));
    let mut aliases: Vec<String> = kept["user_aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{}/{}",
                a["alias_label"].as_str().unwrap(),
                a["alias_name"].as_str().unwrap()
            )
        })
        .collect();
    aliases.sort();
    assert_eq!(aliases, ["crm/k-1", "web/w-1"]);
    let a2 = export(&*store, &ws, by_alias("crm", "a-2")).await.users;
    assert_eq!(a2.len(), 1, "not merged");
    assert_eq!(a2[0].get("external_id"), None);
    assert_eq!(
        types(&all_events(&*store, &ws).await),
        [UPDATE, UPDATE, UPDATE, UPDATE, ORPHAN]
    );
}
