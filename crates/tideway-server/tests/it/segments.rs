//! Segments over HTTP: the guide's flow (users tracked, a Heap cohort imported through the
//! partner API, a segment on cohort ∧ attribute ∧ ¬cohort, its size and members, then a cohort
//! removal seen by the very next request), invalid filters, permissions, workspace isolation,
//! Braze's read endpoints, and the incremental index against a fresh build and the naive
//! evaluator.

use serde_json::{Value, json};
use tideway_core::keys::{Permission, Secret};
use tideway_core::segments::{LiveIndex, segment_lookup};
use tideway_core::store::Workspace;
use tideway_segment::{Filter, matches};

use crate::harness::{Answer, Auth, NOW, Server};

const PARTNER_KEY: &str = "heap-partner-key";

async fn heap_import_key(s: &Server, ws: &Workspace, secret: &str) -> String {
    s.store
        .partner_api_key("heap", Secret::new(PARTNER_KEY.into()), NOW)
        .await
        .unwrap();
    s.store
        .create_import_key(ws.id, "heap", &Secret::new(secret.into()), NOW)
        .await
        .unwrap();
    secret.to_owned()
}

/// Adds (or with `remove`, removes) external ids to a Heap cohort through the partner API.
async fn cohort(s: &Server, secret: &str, cohort_id: &str, ids: &[&str], remove: bool) {
    let body = json!({
        "partner_api_key": PARTNER_KEY,
        "client_secret": secret,
        "cohort_id": cohort_id,
        "cohort_changes": [{"user_ids": ids, "should_remove": remove}],
    });
    let a = s
        .send(
            reqwest::Method::POST,
            "/partners/heap/cohorts/users",
            Auth::None,
            Some(body.to_string().into_bytes()),
            true,
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
}

async fn get(s: &Server, path: &str, key: &str) -> Answer {
    s.send(reqwest::Method::GET, path, Auth::Bearer(key), None, false)
        .await
}

async fn put(s: &Server, path: &str, key: &str, body: Value) -> Answer {
    s.send(
        reqwest::Method::PUT,
        path,
        Auth::Bearer(key),
        Some(body.to_string().into_bytes()),
        true,
    )
    .await
}

async fn delete(s: &Server, path: &str, key: &str) -> Answer {
    s.send(
        reqwest::Method::DELETE,
        path,
        Auth::Bearer(key),
        None,
        false,
    )
    .await
}

async fn track(s: &Server, key: &str, body: Value) {
    let a = s.post("/users/track", key, body).await;
    assert_eq!(a.status, 201, "{a:?}");
}

async fn size(s: &Server, key: &str, id: &str) -> u64 {
    let a = get(s, &format!("/api/v1/segments/{id}/size"), key).await;
    assert_eq!(a.status, 200, "{a:?}");
    a.body["size"].as_u64().unwrap()
}

async fn create(s: &Server, key: &str, name: &str, filter: Value) -> String {
    let a = s
        .post(
            "/api/v1/segments",
            key,
            json!({"name": name, "filter": filter}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    a.body["id"].as_str().unwrap().to_owned()
}

fn guide_filter() -> Value {
    json!({"and": [
        {"cohort": {"partner": "heap", "cohort_id": "active", "op": "includes"}},
        {"attribute": {"name": "plan", "op": "equals", "value": "pro"}},
        {"not": {"cohort": {"partner": "heap", "cohort_id": "churned", "op": "includes"}}},
    ]})
}

async fn seed(s: &Server, key: &str) {
    track(
        s,
        key,
        json!({
            "attributes": [
                {"external_id": "u1", "plan": "pro", "country": "FR"},
                {"external_id": "u2", "plan": "free"},
                {"external_id": "u3", "plan": "pro"},
                {"external_id": "u4", "plan": "pro"},
                {"external_id": "u5", "plan": "pro", "email": "u5@example.com"},
            ],
            "events": [
                {"external_id": "u1", "name": "checkout_started", "time": "2025-06-15T10:00:00Z"},
                {"external_id": "u1", "name": "checkout_started", "time": "2025-06-15T11:00:00Z"},
                {"external_id": "u3", "name": "checkout_started", "time": "2025-06-15T11:00:00Z"},
            ],
            "purchases": [
                {"external_id": "u5", "product_id": "sku-1", "currency": "USD", "price": 30.0, "time": "2025-06-15T12:00:00Z"},
            ],
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guide_flow_cohort_attribute_and_exclusion_stay_fresh() {
    let (s, ws, key) = Server::with_admin().await;
    seed(&s, &key).await;
    let secret = heap_import_key(&s, &ws, "import-secret").await;
    cohort(&s, &secret, "active", &["u1", "u2", "u3", "u5"], false).await;
    cohort(&s, &secret, "churned", &["u3"], false).await;

    let id = create(&s, &key, "Active pro, not churned", guide_filter()).await;
    let a = get(&s, &format!("/api/v1/segments/{id}"), &key).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["filter"], guide_filter());
    assert_eq!(a.body["name"], "Active pro, not churned");

    assert_eq!(size(&s, &key, &id).await, 2);
    let a = get(&s, &format!("/api/v1/segments/{id}/members"), &key).await;
    assert_eq!(a.status, 200, "{a:?}");
    let ext: Vec<&str> = a.body["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["external_id"].as_str().unwrap())
        .collect();
    assert_eq!(ext, ["u1", "u5"]);
    assert_eq!(a.body["next_cursor"], Value::Null);
    let u1_braze = a.body["members"][0]["braze_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Paging: one member per page.
    let a = get(&s, &format!("/api/v1/segments/{id}/members?limit=1"), &key).await;
    assert_eq!(a.body["members"][0]["external_id"], "u1");
    let cursor = a.body["next_cursor"].as_str().unwrap().to_owned();
    let a = get(
        &s,
        &format!("/api/v1/segments/{id}/members?limit=1&cursor={cursor}"),
        &key,
    )
    .await;
    assert_eq!(a.body["members"][0]["external_id"], "u5");

    // A cohort removal through the partner API is visible on the very next request.
    cohort(&s, &secret, "active", &["u1"], true).await;
    assert_eq!(size(&s, &key, &id).await, 1);
    // So are an attribute update and a cohort entry.
    track(
        &s,
        &key,
        json!({"attributes": [{"external_id": "u2", "plan": "pro"}]}),
    )
    .await;
    assert_eq!(size(&s, &key, &id).await, 2);
    cohort(&s, &secret, "churned", &["u2"], false).await;
    assert_eq!(size(&s, &key, &id).await, 1);

    // Estimate (exact below 100 000 users, and says so).
    let a = get(
        &s,
        &format!("/api/v1/segments/{id}/size?estimate=true"),
        &key,
    )
    .await;
    assert_eq!(a.body, json!({"size": 1, "estimate": false}));

    // Preview of unsaved filters: event counts, purchases, in_segment, identified.
    let preview = |filter: Value| {
        let s = &s;
        let key = &key;
        async move {
            let a = s
                .post("/api/v1/segments/preview", key, json!({"filter": filter}))
                .await;
            assert_eq!(a.status, 200, "{a:?}");
            a.body["size"].as_u64().unwrap()
        }
    };
    assert_eq!(
        preview(json!({"event": {"name": "checkout_started", "op": "count_at_least", "value": 2}}))
            .await,
        1
    );
    assert_eq!(
        preview(json!({"event": {"name": "checkout_started", "op": "count_at_least", "value": 1}}))
            .await,
        2
    );
    assert_eq!(
        preview(json!({"purchase": {"product_id": "sku-1", "op": "count_at_least", "value": 1}}))
            .await,
        1
    );
    assert_eq!(preview(json!({"in_segment": id})).await, 1);
    assert_eq!(preview(json!({"identified": true})).await, 5);
    assert_eq!(
        preview(json!({"attribute": {"name": "email", "op": "exists", "value": true}})).await,
        1
    );
    // A tracked event is visible at once too.
    track(&s, &key, json!({"events": [{"external_id": "u4", "name": "checkout_started", "time": "2025-06-15T11:00:00Z"}]})).await;
    assert_eq!(
        preview(json!({"event": {"name": "checkout_started", "op": "count_at_least", "value": 1}}))
            .await,
        3
    );

    // The user's segments: u1 left "active", so none; u5 is in it.
    let a = get(&s, &format!("/api/v1/users/{u1_braze}/segments"), &key).await;
    assert_eq!(a.body, json!({"segments": []}), "{a:?}");
    let a = get(&s, &format!("/api/v1/segments/{id}/members"), &key).await;
    let u5_braze = a.body["members"][0]["braze_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = get(&s, &format!("/api/v1/users/{u5_braze}/segments"), &key).await;
    assert_eq!(a.body["segments"][0]["id"], id.as_str());
    let a = get(&s, "/api/v1/users/000000000000000000000000/segments", &key).await;
    assert_eq!(a.status, 404);

    // Deleting a user removes them.
    let a = s
        .post("/users/delete", &key, json!({"external_ids": ["u5"]}))
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(size(&s, &key, &id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_list_update_delete_and_braze_read_endpoints() {
    let (s, _, key) = Server::with_admin().await;
    seed(&s, &key).await;
    let a_id = create(
        &s,
        &key,
        "A",
        json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}}),
    )
    .await;
    let b_id = create(
        &s,
        &key,
        "B",
        json!({"and": [{"in_segment": a_id}, {"random_bucket": {"min": 0, "max": 9999}}]}),
    )
    .await;
    assert_eq!(size(&s, &key, &b_id).await, 4);

    let a = get(&s, "/api/v1/segments", &key).await;
    let names: Vec<&str> = a.body["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["A", "B"]);

    let a = put(&s, &format!("/api/v1/segments/{a_id}"), &key, json!({"name": "A2", "filter": {"attribute": {"name": "plan", "op": "equals", "value": "free"}}})).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["name"], "A2");
    assert_eq!(size(&s, &key, &b_id).await, 1, "B follows A's new filter");

    // A cycle through in_segment is refused with its path.
    let a = put(
        &s,
        &format!("/api/v1/segments/{a_id}"),
        &key,
        json!({"filter": {"or": [{"identified": true}, {"in_segment": b_id}]}}),
    )
    .await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .starts_with("$.or[1].in_segment"),
        "{a:?}"
    );

    // Braze's read endpoints.
    let a = get(&s, "/segments/list", &key).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["message"], "success");
    assert_eq!(
        a.body["segments"][0],
        json!({"id": a_id, "name": "A2", "analytics_tracking_enabled": false, "tags": []})
    );
    assert!(a.header("x-ratelimit-limit").is_some());
    let a = get(&s, "/segments/list?sort_direction=desc", &key).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["segments"][0]["id"], b_id.as_str(), "{a:?}");
    let a = get(&s, "/segments/list?sort_direction=bogus", &key).await;
    assert_eq!(a.status, 400, "{a:?}");
    let a = get(&s, &format!("/segments/details?segment_id={b_id}"), &key).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        (a.body["message"].as_str(), a.body["name"].as_str()),
        (Some("success"), Some("B"))
    );
    assert!(a.body["created_at"].is_string() && a.body["tags"] == json!([]));
    assert_eq!(
        get(&s, "/segments/details?segment_id=nope", &key)
            .await
            .status,
        404
    );

    // A is used by B: deleting it is refused; B then A works.
    assert_eq!(
        delete(&s, &format!("/api/v1/segments/{a_id}"), &key)
            .await
            .status,
        409
    );
    assert_eq!(
        delete(&s, &format!("/api/v1/segments/{b_id}"), &key)
            .await
            .status,
        204
    );
    assert_eq!(
        delete(&s, &format!("/api/v1/segments/{a_id}"), &key)
            .await
            .status,
        204
    );
    assert_eq!(
        get(&s, &format!("/api/v1/segments/{a_id}"), &key)
            .await
            .status,
        404
    );
    assert_eq!(
        delete(&s, &format!("/api/v1/segments/{a_id}"), &key)
            .await
            .status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_filters_are_400_with_the_json_path() {
    let (s, ws, key) = Server::with_admin().await;
    let secret = heap_import_key(&s, &ws, "import-secret").await;
    seed(&s, &key).await;
    cohort(&s, &secret, "active", &["u1"], false).await;
    let cases = [
        (
            json!({"and": [{"identified": true}, {"attribute": {"name": "plan", "op": "bigger", "value": "x"}}]}),
            "$.and[1].attribute.op: ",
        ),
        (
            json!({"attribute": {"name": "country", "op": "equals", "value": 3}}),
            "$.attribute.value: ",
        ),
        (
            json!({"cohort": {"partner": "heap", "cohort_id": "nope", "op": "includes"}}),
            "$.cohort",
        ),
        (json!({"in_segment": "missing"}), "$.in_segment"),
        (json!({"frobnicate": 1}), "$"),
    ];
    for (filter, path) in cases {
        for a in [
            s.post(
                "/api/v1/segments",
                &key,
                json!({"name": "x", "filter": filter}),
            )
            .await,
            s.post("/api/v1/segments/preview", &key, json!({"filter": filter}))
                .await,
        ] {
            assert_eq!(a.status, 400, "{filter} {a:?}");
            let message = a.body["message"].as_str().unwrap();
            assert!(message.starts_with(path), "{filter}: {message}");
        }
    }
    // The known cohort is accepted.
    create(
        &s,
        &key,
        "ok",
        json!({"cohort": {"partner": "heap", "cohort_id": "active", "op": "excludes"}}),
    )
    .await;
    let a = s
        .post(
            "/api/v1/segments",
            &key,
            json!({"filter": {"identified": true}}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (400, Some("'name' is required"))
    );
    let a = s.post("/api/v1/segments", &key, json!({"name": "n"})).await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (400, Some("'filter' is required"))
    );
    let a = s
        .post(
            "/api/v1/segments",
            &key,
            json!({"name": "n".repeat(256), "filter": {"identified": true}}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["message"].as_str()),
        (400, Some("'name' must be at most 255 characters"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_are_enforced() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    let admin = s.admin_key(&ws).await;
    let id = create(&s, &admin, "all", json!({"identified": false})).await;
    let read = s.key_for(&ws, &[Permission::SegmentsRead]).await;
    let manage = s.key_for(&ws, &[Permission::SegmentsManage]).await;
    let other = s.key_for(&ws, &[Permission::CohortsRead]).await;

    let a = s
        .post(
            "/api/v1/segments",
            &read,
            json!({"name": "x", "filter": {"identified": true}}),
        )
        .await;
    assert_eq!(a.status, 403);
    assert!(a.header("x-ratelimit-limit").is_some());
    assert_eq!(
        put(
            &s,
            &format!("/api/v1/segments/{id}"),
            &read,
            json!({"name": "y"})
        )
        .await
        .status,
        403
    );
    assert_eq!(
        delete(&s, &format!("/api/v1/segments/{id}"), &read)
            .await
            .status,
        403
    );
    assert_eq!(
        get(&s, &format!("/api/v1/segments/{id}/size"), &read)
            .await
            .status,
        200
    );
    assert_eq!(
        get(&s, &format!("/api/v1/segments/{id}/size"), &manage)
            .await
            .status,
        403
    );
    assert_eq!(get(&s, "/api/v1/segments", &other).await.status, 403);
    assert_eq!(
        get(&s, "/segments/list", &read).await.status,
        403,
        "needs segments.list"
    );
    assert_eq!(
        get(&s, &format!("/segments/details?segment_id={id}"), &read)
            .await
            .status,
        403
    );
    let list = s.key_for(&ws, &[Permission::SegmentsList]).await;
    assert_eq!(get(&s, "/segments/list", &list).await.status, 200);
    assert_eq!(get(&s, "/api/v1/segments", "not-a-key").await.status, 401);
    let doc = s.get("/openapi.json").await.body;
    for path in [
        "/api/v1/segments",
        "/api/v1/segments/{id}",
        "/api/v1/segments/{id}/size",
        "/api/v1/segments/preview",
        "/api/v1/segments/{id}/members",
        "/api/v1/users/{braze_id}/segments",
        "/segments/list",
        "/segments/details",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_are_isolated() {
    let s = Server::start().await;
    let w1 = s.workspace("w1").await;
    let w2 = s.workspace("w2").await;
    let k1 = s.admin_key(&w1).await;
    let k2 = s.admin_key(&w2).await;
    seed(&s, &k1).await;
    track(
        &s,
        &k2,
        json!({"attributes": [{"external_id": "z", "plan": "pro"}]}),
    )
    .await;
    let pro = json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}});
    let id1 = create(&s, &k1, "pro", pro.clone()).await;
    let id2 = create(&s, &k2, "pro", pro).await;
    assert_eq!(size(&s, &k1, &id1).await, 4);
    assert_eq!(size(&s, &k2, &id2).await, 1);
    assert_eq!(
        get(&s, &format!("/api/v1/segments/{id1}"), &k2)
            .await
            .status,
        404
    );
    assert_eq!(
        get(&s, &format!("/api/v1/segments/{id1}/size"), &k2)
            .await
            .status,
        404
    );
    assert_eq!(
        delete(&s, &format!("/api/v1/segments/{id1}"), &k2)
            .await
            .status,
        404
    );
    let a = s
        .post(
            "/api/v1/segments/preview",
            &k2,
            json!({"filter": {"in_segment": id1}}),
        )
        .await;
    assert_eq!(a.status, 400, "another workspace's segment is unknown here");
    let a = get(&s, "/api/v1/segments", &k2).await;
    assert_eq!(a.body["segments"].as_array().unwrap().len(), 1);
}

/// The index kept up to date from the change feed equals one built afresh, and both equal the
/// naive evaluator over the store's profiles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_index_equals_fresh_build_and_naive() {
    let (s, ws, key) = Server::with_admin().await;
    let secret = heap_import_key(&s, &ws, "import-secret").await;
    let mut live = LiveIndex::from_snapshot(s.store.segment_profiles(ws.id).await.unwrap());
    assert!(live.is_empty());

    seed(&s, &key).await;
    cohort(&s, &secret, "active", &["u1", "u2", "u3"], false).await;
    live.apply(
        &s.store
            .segment_profile_changes(ws.id, live.position())
            .await
            .unwrap(),
    );
    track(&s, &key, json!({"attributes": [{"external_id": "u6", "plan": "pro"}, {"external_id": "u2", "plan": null}],
        "events": [{"external_id": "u6", "name": "checkout_started", "time": "2025-06-15T09:00:00Z"}]})).await;
    cohort(&s, &secret, "active", &["u2"], true).await;
    cohort(&s, &secret, "churned", &["u6", "u1"], false).await;
    assert_eq!(
        s.post("/users/delete", &key, json!({"external_ids": ["u4"]}))
            .await
            .status,
        201
    );
    // Changes that write no behaviour event: a new user without attributes, an identify, a
    // rename, and a merge (the survivor absorbs the other's attributes).
    track(&s, &key, json!({"attributes": [{"user_alias": {"alias_name": "anon-1", "alias_label": "crm"}, "_update_existing_only": false, "plan": "trial"}]})).await;
    let a = s.post("/users/external_ids/rename", &key, json!({"external_id_renames": [{"current_external_id": "u3", "new_external_id": "u3b"}]})).await;
    assert_eq!(a.status, 201, "{a:?}");
    let a = s.post("/users/identify", &key, json!({"aliases_to_identify": [{"external_id": "u7", "user_alias": {"alias_name": "anon-1", "alias_label": "crm"}}]})).await;
    assert_eq!(a.status, 201, "{a:?}");
    track(
        &s,
        &key,
        json!({"attributes": [{"external_id": "u8", "vip": true}]}),
    )
    .await;
    let a = s.post("/users/merge", &key, json!({"merge_updates": [{"identifier_to_merge": {"external_id": "u8"}, "identifier_to_keep": {"external_id": "u5"}}]})).await;
    assert_eq!(a.status, 201, "{a:?}");
    live.apply(
        &s.store
            .segment_profile_changes(ws.id, live.position())
            .await
            .unwrap(),
    );

    let snapshot = s.store.segment_profiles(ws.id).await.unwrap();
    let ext: Vec<Option<&str>> = snapshot
        .users
        .iter()
        .map(|u| u.profile.external_id.as_deref())
        .collect();
    assert!(
        ext.contains(&Some("u3b")) && ext.contains(&Some("u7")) && !ext.contains(&Some("u8")),
        "{ext:?}"
    );
    assert_eq!(snapshot.position, live.position());
    let u1 = snapshot
        .users
        .iter()
        .find(|u| u.profile.external_id.as_deref() == Some("u1"))
        .unwrap();
    assert_eq!(u1.profile.events["checkout_started"].count(), 2);
    assert_eq!(u1.profile.attributes["country"], "FR");
    assert!(
        u1.profile
            .cohorts
            .contains(&("heap".into(), "churned".into()))
    );
    let fresh = LiveIndex::from_snapshot(snapshot.clone());
    let segments = s.store.list_segments(ws.id).await.unwrap();
    let lookup = segment_lookup(&segments);
    let now = NOW.secs();
    let filters = [
        guide_filter(),
        json!({"event": {"name": "checkout_started", "op": "count_at_least", "value": 1, "within_days": 30}}),
        json!({"event": {"name": "checkout_started", "op": "count_at_most", "value": 1}}),
        json!({"purchase": {"op": "total_spend_at_least", "value": 10}}),
        json!({"attribute": {"name": "plan", "op": "exists", "value": false}}),
        json!({"or": [{"identified": true}, {"random_bucket": {"min": 0, "max": 4999}}]}),
        json!({"cohort": {"partner": "heap", "cohort_id": "active", "op": "excludes"}}),
        json!({"attribute": {"name": "vip", "op": "equals", "value": true}}),
        json!({"attribute": {"name": "plan", "op": "equals", "value": "trial"}}),
        json!({"identified": false}),
    ];
    for raw in filters {
        let filter = Filter::from_json(&raw).unwrap();
        let incremental: Vec<u32> = live
            .index()
            .evaluate(&filter, now, &lookup)
            .iter()
            .collect();
        let rebuilt: Vec<u32> = fresh
            .index()
            .evaluate(&filter, now, &lookup)
            .iter()
            .collect();
        let naive: Vec<u32> = snapshot
            .users
            .iter()
            .filter(|u| matches(&filter, &u.profile, now, &lookup))
            .map(|u| u.profile.uid)
            .collect();
        assert_eq!(incremental, rebuilt, "{raw}");
        assert_eq!(incremental, naive, "{raw}");
    }
    let vip =
        Filter::from_json(&json!({"attribute": {"name": "vip", "op": "equals", "value": true}}))
            .unwrap();
    let survivors: Vec<_> = live
        .members(&vip, now, &lookup, 0, 10)
        .into_iter()
        .map(|m| m.external_id)
        .collect();
    assert_eq!(
        survivors,
        [Some("u5".to_owned())],
        "the merge's survivor has the absorbed attribute"
    );
}

/// After an anonymous user is merged into an identified one, the events the anonymous user
/// did count for the survivor (Braze merges event data), in a fresh index and after catch-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_users_events_count_for_the_survivor() {
    let (s, ws, key) = Server::with_admin().await;
    let opened = |who: Value| {
        let mut event = json!({"name": "opened", "time": "2025-06-15T09:00:00Z"});
        event
            .as_object_mut()
            .unwrap()
            .extend(who.as_object().unwrap().clone());
        event
    };
    track(&s, &key, json!({"events": [opened(json!({"device_id": "d1"})), opened(json!({"device_id": "d1"})), opened(json!({"external_id": "alice"}))]})).await;
    let three = create(
        &s,
        &key,
        "opened thrice",
        json!({"event": {"name": "opened", "op": "count_at_least", "value": 3}}),
    )
    .await;
    assert_eq!(size(&s, &key, &three).await, 0);
    let a = s
        .post(
            "/users/identify",
            &key,
            json!({"aliases_to_identify": [{"external_id": "alice", "device_id": "d1"}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(
        size(&s, &key, &three).await,
        1,
        "the live index after catch-up"
    );
    let fresh = LiveIndex::from_snapshot(s.store.segment_profiles(ws.id).await.unwrap());
    assert_eq!(fresh.len(), 1, "the orphaned user is gone");
    let a = s
        .post(
            "/api/v1/segments/preview",
            &key,
            json!({"filter": {"event": {"name": "opened", "op": "count_exactly", "value": 3}}}),
        )
        .await;
    assert_eq!(a.body["size"], 1, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_never_save_a_cycle_or_a_reference_to_a_deleted_segment() {
    let (s, _, key) = Server::with_admin().await;
    let create = async |name: &str, filter: Value| {
        let a = s
            .post(
                "/api/v1/segments",
                &key,
                json!({"name": name, "filter": filter}),
            )
            .await;
        (
            a.status,
            a.body["id"].as_str().unwrap_or_default().to_owned(),
        )
    };
    for round in 0..10 {
        let (_, a) = create(&format!("a{round}"), json!({"identified": true})).await;
        let (_, b) = create(&format!("b{round}"), json!({"identified": true})).await;
        let (path_a, path_b) = (
            format!("/api/v1/segments/{a}"),
            format!("/api/v1/segments/{b}"),
        );
        let (to_b, to_a) = tokio::join!(
            put(&s, &path_a, &key, json!({"filter": {"in_segment": b}})),
            put(&s, &path_b, &key, json!({"filter": {"in_segment": a}})),
        );
        assert!(
            !(to_b.status == 200 && to_a.status == 200),
            "both halves of a cycle were saved: {to_b:?} {to_a:?}"
        );
        let (_, c) = create(&format!("c{round}"), json!({"identified": true})).await;
        let (name_d, path_c) = (format!("d{round}"), format!("/api/v1/segments/{c}"));
        let ((made, _), gone) = tokio::join!(
            create(&name_d, json!({"in_segment": c})),
            delete(&s, &path_c, &key),
        );
        assert!(
            !(made == 201 && gone.status == 204),
            "a segment was saved naming one deleted at the same time"
        );
    }
}
