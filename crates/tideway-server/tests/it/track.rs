//! `/users/track` through HTTP: counts, partial errors, 400s without writes, update-only,
//! array operations, the device-id rule, and the Currents events each change logs.

use std::collections::HashSet;

use serde_json::{Value, json};
use tideway_core::currents::EventType;
use tideway_core::track::MISSING_IDENTIFIER;

use crate::harness::Server;

const T: &str = "2025-01-01T00:00:00Z";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_events_and_purchases_are_applied_and_counted() {
    let (s, _, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({
                "attributes": [{"external_id": "u1", "first_name": "Ann", "plan": "pro", "tags": ["a", "b"]}],
                "events": [{"external_id": "u1", "name": "opened", "time": T, "properties": {"screen": "home"}}],
                "purchases": [{"external_id": "u1", "product_id": "p1", "currency": "usd", "price": 9.5, "quantity": 2, "time": T}],
            }),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            201,
            &json!({"message": "success", "attributes_processed": 1, "events_processed": 1, "purchases_processed": 1})
        )
    );
    let user = s.export_external(&key, "u1").await.expect("exported");
    assert_eq!(user["external_id"], "u1");
    assert_eq!(user["first_name"], "Ann");
    assert_eq!(
        user["custom_attributes"],
        json!({"plan": "pro", "tags": ["a", "b"]})
    );
    assert_eq!(
        user["custom_events"],
        json!([{"name": "opened", "first": "2025-01-01T00:00:00.000Z", "last": "2025-01-01T00:00:00.000Z", "count": 1}])
    );
    assert_eq!(user["purchases"][0]["name"], "p1");
    assert_eq!(user["purchases"][0]["count"], 2);
    assert_eq!(user["total_revenue"], json!(19.0));

    // Only the arrays present in the request are counted.
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"events": [{"external_id": "u1", "name": "opened", "time": T}]}),
        )
        .await;
    assert_eq!(a.body, json!({"message": "success", "events_processed": 1}));
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": "u1", "plan": "max"}], "events": []}),
        )
        .await;
    assert_eq!(
        a.body,
        json!({"message": "success", "attributes_processed": 1, "events_processed": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_reported_by_array_and_index_while_valid_ones_apply() {
    let (s, ws, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({
                "attributes": [{"external_id": "u1", "a": 1}, {"first_name": "nobody"}, {"braze_id": "0123456789abcdef01234567", "a": 2}],
                "events": [{"external_id": "u1", "name": "e", "time": T}, {"external_id": "u1", "name": "e"}],
                "purchases": [{"external_id": "u1", "product_id": "p", "currency": "USD", "price": 1, "quantity": 101, "time": T}],
            }),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            201,
            &json!({
                "message": "success",
                "attributes_processed": 1,
                "events_processed": 1,
                "purchases_processed": 0,
                "errors": [
                    {"type": MISSING_IDENTIFIER, "input_array": "attributes", "index": 1},
                    {"type": "'braze_id' does not match an existing user", "input_array": "attributes", "index": 2},
                    {"type": "'time' is required", "input_array": "events", "index": 1},
                    {"type": "'quantity' is not valid", "input_array": "purchases", "index": 0},
                ]
            })
        )
    );
    let types: Vec<EventType> = s
        .events(&ws)
        .await
        .iter()
        .map(|e| e.event.event_type)
        .collect();
    assert_eq!(types, [EventType::ProfileUpdate, EventType::CustomEvent]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_nothing_valid_is_a_400_and_writes_nothing() {
    let (s, ws, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({
                "attributes": [{"external_id": "ghost", "gender": "robot"}],
                "events": [{"external_id": "ghost", "name": "e"}],
                "purchases": [{"external_id": "ghost", "product_id": "p", "currency": "USD", "price": "free", "time": T}],
            }),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({
                "message": "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.",
                "errors": [
                    {"type": "'gender' is not valid", "input_array": "attributes", "index": 0},
                    {"type": "'time' is required", "input_array": "events", "index": 0},
                    {"type": "'price' is not valid", "input_array": "purchases", "index": 0},
                ]
            })
        )
    );
    let empty = s.post("/users/track", &key, json!({})).await;
    assert_eq!(
        (empty.status, &empty.body),
        (
            400,
            &json!({"message": "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.", "errors": []})
        )
    );
    let many: Vec<Value> = (0..76)
        .map(|i| json!({"external_id": format!("u{i}"), "x": 1}))
        .collect();
    let too_many = s
        .post("/users/track", &key, json!({"attributes": many}))
        .await;
    assert_eq!(
        (too_many.status, &too_many.body),
        (400, &json!({"message": "Max Input Length Exceeded"}))
    );
    let not_array = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": "u0", "x": 1}], "purchases": "p"}),
        )
        .await;
    assert_eq!(
        (not_array.status, &not_array.body),
        (
            400,
            &json!({"message": "'purchases' must be an array of objects"})
        )
    );

    assert!(
        s.events(&ws).await.is_empty(),
        "no Currents event from a rejected request"
    );
    assert!(
        s.export_external(&key, "ghost").await.is_none(),
        "no user from a rejected request"
    );
    assert!(
        s.export_external(&key, "u0").await.is_none(),
        "no partial write of a rejected request"
    );
    let seventy_five: Vec<Value> = (0..75)
        .map(|i| json!({"external_id": format!("u{i}"), "x": 1}))
        .collect();
    assert_eq!(
        s.post("/users/track", &key, json!({"attributes": seventy_five}))
            .await
            .body["attributes_processed"],
        75
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_existing_only_never_creates() {
    let (s, _, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": "new1", "_update_existing_only": true, "x": 1}]}),
        )
        .await;
    assert_eq!(
        a.body,
        json!({"message": "success", "attributes_processed": 0})
    );
    let export = s
        .post("/users/export/ids", &key, json!({"external_ids": ["new1"]}))
        .await;
    assert_eq!(
        export.body,
        json!({"message": "success", "users": [], "invalid_user_ids": ["new1"]})
    );

    // Alias-only objects are update-only unless `false` is explicit.
    let alias = json!({"alias_name": "a1", "alias_label": "crm"});
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"user_alias": alias, "x": 1}]}),
        )
        .await;
    assert_eq!(a.body["attributes_processed"], 0);
    assert_eq!(
        s.post("/users/export/ids", &key, json!({"user_aliases": [alias]}))
            .await
            .body["users"],
        json!([])
    );
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"user_alias": alias, "_update_existing_only": false, "x": 1}]}),
        )
        .await;
    assert_eq!(a.body["attributes_processed"], 1);
    let found = s
        .post("/users/export/ids", &key, json!({"user_aliases": [alias]}))
        .await;
    assert_eq!(found.body["users"][0]["custom_attributes"]["x"], 1);
    assert_eq!(found.body["users"][0]["user_aliases"], json!([alias]));

    // An existing user is updated with `true`.
    s.post(
        "/users/track",
        &key,
        json!({"attributes": [{"external_id": "u1", "x": 1}]}),
    )
    .await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": "u1", "_update_existing_only": true, "x": 2}]}),
        )
        .await;
    assert_eq!(a.body["attributes_processed"], 1);
    assert_eq!(
        s.export_external(&key, "u1").await.expect("u1")["custom_attributes"]["x"],
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_and_increment_operations() {
    let (s, _, key) = Server::with_admin().await;
    let attrs = |a: Value| json!({"attributes": [a]});
    s.post(
        "/users/track",
        &key,
        attrs(json!({"external_id": "u1", "tags": ["a", "b"], "n": {"inc": 5}, "gone": "soon"})),
    )
    .await;
    s.post("/users/track", &key, attrs(json!({"external_id": "u1", "tags": {"add": ["c", "a"], "remove": ["b"]}, "n": {"inc": -2}}))).await;
    s.post(
        "/users/track",
        &key,
        attrs(json!({"external_id": "u1", "tags": {"remove": ["c"]}, "gone": null})),
    )
    .await;
    let user = s.export_external(&key, "u1").await.expect("u1");
    assert_eq!(user["custom_attributes"], json!({"tags": ["a"], "n": 3}));
}

/// A change of `email_subscribe` through `/users/track` logs its `GlobalStateChange` (as the
/// unsubscribe link does), and one of a subscription group its `StateChange`, not an empty
/// profile update; other changes beside them still log one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_subscription_change_logs_its_state_change() {
    let (s, ws, key) = Server::with_admin().await;
    let track =
        |attributes: Value| s.post("/users/track", &key, json!({"attributes": [attributes]}));
    // The types of the events one attributes object logs.
    let logged_by = async |attributes: Value| -> Vec<String> {
        let before = s.events(&ws).await.len();
        let a = track(attributes).await;
        assert_eq!(a.status, 201, "{a:?}");
        s.events(&ws).await[before..]
            .iter()
            .map(|e| e.event.event_type.as_str().to_owned())
            .collect()
    };
    let a = track(json!({"external_id": "u1", "email": "u1@example.com"})).await;
    assert_eq!(a.status, 201);
    assert_eq!(
        logged_by(json!({"external_id": "u1", "email_subscribe": "unsubscribed"})).await,
        ["users.behaviors.subscription.GlobalStateChange"]
    );
    let changes = s
        .events_named(&ws, "users.behaviors.subscription.GlobalStateChange")
        .await;
    let p = &changes[0]["properties"];
    assert_eq!(
        (
            &p["subscription_status"],
            &p["channel"],
            &p["email_address"]
        ),
        (
            &json!("unsubscribed"),
            &json!("email"),
            &json!("u1@example.com")
        )
    );
    // The same value again changes nothing and logs nothing; with a name beside it, the
    // name's update only.
    assert_eq!(
        logged_by(
            json!({"external_id": "u1", "email_subscribe": "unsubscribed", "first_name": "Ada"})
        )
        .await,
        ["users.profile.Update"]
    );

    // A subscription group's state change logs its StateChange, one per group that changed.
    let groups = |a: &str, b: &str| {
        json!({"external_id": "u1", "subscription_groups": [
            {"subscription_group_id": "sg-1", "subscription_state": a},
            {"subscription_group_id": "sg-2", "subscription_state": b}]})
    };
    track(groups("subscribed", "subscribed")).await;
    assert_eq!(
        logged_by(groups("subscribed", "unsubscribed")).await,
        ["users.behaviors.subscriptiongroup.StateChange"]
    );
    let changes = s
        .events_named(&ws, "users.behaviors.subscriptiongroup.StateChange")
        .await;
    let p = &changes.last().expect("a state change")["properties"];
    assert_eq!(
        (&p["subscription_group_id"], &p["subscription_status"]),
        (&json!("sg-2"), &json!("unsubscribed"))
    );
    // A request names the groups it changes: the others keep their state, a new one is added.
    let one = json!({"external_id": "u1", "subscription_groups": [
        {"subscription_group_id": "sg-3", "subscription_state": "subscribed"}]});
    assert_eq!(
        logged_by(one).await,
        ["users.behaviors.subscriptiongroup.StateChange"]
    );
    let user = s.export_external(&key, "u1").await.unwrap();
    let states: Vec<(&str, &str)> = user["subscription_groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            (
                g["subscription_group_id"].as_str().unwrap(),
                g["subscription_state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("sg-1", "subscribed"),
            ("sg-2", "unsubscribed"),
            ("sg-3", "subscribed")
        ]
    );
    // `null` names no group, so it changes none.
    assert!(
        logged_by(json!({"external_id": "u1", "subscription_groups": null}))
            .await
            .is_empty()
    );
    let user = s.export_external(&key, "u1").await.unwrap();
    assert_eq!(
        user["subscription_groups"].as_array().map(Vec::len),
        Some(3),
        "{user}"
    );
    // Only Braze's two states, and a group id, are valid.
    for bad in [
        json!([{"subscription_group_id": "sg-1", "subscription_state": "bogus"}]),
        json!([{}]),
        json!([{"subscription_group_id": 7, "subscription_state": "subscribed"}]),
    ] {
        let a = track(json!({"external_id": "u1", "subscription_groups": bad})).await;
        assert_eq!(a.status, 400, "{bad}: {a:?}");
        assert_eq!(
            a.body["errors"][0]["type"], "'subscription_groups' is not valid",
            "{a:?}"
        );
    }
}

/// A push token gets a `device_id` when it comes without one (Braze: a random one), the same
/// one when the same app's token is sent again; a token without an app or a token is invalid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_tokens_get_a_device_id_and_keep_it() {
    let (s, _ws, key) = Server::with_admin().await;
    let track = |tokens: Value| {
        let s = &s;
        let key = &key;
        async move {
            s.post(
                "/users/track",
                key,
                json!({"attributes": [{"external_id": "u1", "push_tokens": tokens}]}),
            )
            .await
        }
    };
    let device = async || {
        let user = s.export_external(&key, "u1").await.unwrap();
        user["push_tokens"][0]["device_id"]
            .as_str()
            .map(str::to_owned)
    };
    let token = json!([{"app_id": "a", "token": "t"}]);
    assert_eq!(track(token.clone()).await.status, 201);
    let first = device().await.expect("a device id is given");
    assert_eq!(first.len(), 36, "{first}");
    assert_eq!(track(token).await.status, 201);
    assert_eq!(device().await, Some(first));
    let own = json!([{"app_id": "a", "token": "t", "device_id": "mine"}]);
    assert_eq!(track(own).await.status, 201);
    assert_eq!(device().await.as_deref(), Some("mine"));
    // The same app's token twice is one entry.
    let twice = json!([{"app_id": "a", "token": "t"}, {"app_id": "a", "token": "t"}]);
    assert_eq!(track(twice).await.status, 201);
    let user = s.export_external(&key, "u1").await.unwrap();
    assert_eq!(
        user["push_tokens"].as_array().map(Vec::len),
        Some(1),
        "{user}"
    );
    for bad in [
        json!([{}]),
        json!([{"app_id": 1, "token": 2}]),
        json!([{"app_id": "a"}]),
        json!([{"app_id": "a", "token": "t", "device_id": "a\u{0}b"}]),
        json!([{"app_id": "a", "token": "t", "device_id": "d".repeat(988)}]),
    ] {
        let a = track(bad.clone()).await;
        assert_eq!(a.status, 400, "{bad}: {a:?}");
    }
}

/// Braze's date formats reach the profile as times, `ddd MM dd HH:mm:ss.TZD YYYY` among them;
/// a session date in the future is stored as now (braze-api.md §3.2), while a custom time keeps
/// its future value, which "in the future" filters compare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_dates_in_every_documented_format_and_none_in_the_future() {
    let (s, _ws, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{
                "external_id": "u1",
                "date_of_last_session": "2999-01-01T00:00:00Z",
                "date_of_first_session": "Tue Jan 02 03:04:05 +0000 2024",
                "renewal": {"$time": "Thu 12 31 23:00:00.-01:00 2099"},
                "signed_up": {"$time": "Tue 01 02 05:04:05.+02:00 2024"},
            }]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let user = s.export_external(&key, "u1").await.unwrap();
    assert_eq!(
        user["custom_attributes"],
        json!({"renewal": "2100-01-01T00:00:00.000Z", "signed_up": "2024-01-02T03:04:05.000Z"}),
        "{user}"
    );
    let size = async |filter: Value| {
        let a = s
            .post("/api/v1/segments/preview", &key, json!({"filter": filter}))
            .await;
        assert_eq!(a.status, 200, "{a:?}");
        a.body["size"].as_u64().unwrap()
    };
    let attribute = |name: &str, op: &str, value: &str| json!({"attribute": {"name": name, "op": op, "value": value}});
    assert_eq!(
        size(attribute(
            "date_of_last_session",
            "after",
            "2100-01-01T00:00:00Z"
        ))
        .await,
        0,
        "a session in 2999 is stored as now"
    );
    assert_eq!(
        size(attribute(
            "date_of_last_session",
            "after",
            "2024-01-01T00:00:00Z"
        ))
        .await,
        1
    );
    assert_eq!(
        size(attribute(
            "date_of_first_session",
            "after",
            "2024-01-02T03:04:04Z"
        ))
        .await,
        1
    );
    assert_eq!(
        size(attribute(
            "date_of_first_session",
            "after",
            "2024-01-02T03:04:05Z"
        ))
        .await,
        0
    );
}

/// Each request's nested values are bounded when parsed, and so is what they add up to: an
/// object whose `$add` (or merge) would take a stored nested attribute past 100 KiB is refused
/// whole, reported by index, and the rest of the request applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_attributes_cannot_grow_past_the_bound_one_request_at_a_time() {
    let (s, ws, key) = Server::with_admin().await;
    let big = "x".repeat(40 * 1024);
    let add = |id: u32| json!({"$add": [{"id": id, "blob": big}]});
    for id in [1, 2] {
        let ok = s
            .post(
                "/users/track",
                &key,
                json!({"attributes": [{"external_id": "u1", "pets": add(id)}]}),
            )
            .await;
        assert_eq!(
            (ok.status, &ok.body["attributes_processed"]),
            (201, &json!(1))
        );
    }
    let before = s.events(&ws).await.len();
    let third = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [
                {"external_id": "u1", "pets": add(3), "plan": "pro"},
                {"external_id": "u2", "plan": "free"},
            ]}),
        )
        .await;
    assert_eq!(
        (third.status, &third.body),
        (
            201,
            &json!({
                "message": "success",
                "attributes_processed": 1,
                "errors": [{"type": "'pets' is not valid: it would grow past 100 KiB", "input_array": "attributes", "index": 0}],
            })
        )
    );
    let u1 = s.export_external(&key, "u1").await.expect("u1");
    let ids: Vec<&Value> = u1["custom_attributes"]["pets"]
        .as_array()
        .expect("pets")
        .iter()
        .map(|p| &p["id"])
        .collect();
    assert_eq!(ids, [&json!(1), &json!(2)]);
    assert_eq!(
        u1["custom_attributes"].get("plan"),
        None,
        "nothing of the refused object applies"
    );
    let u2 = s.export_external(&key, "u2").await.expect("u2");
    assert_eq!(u2["custom_attributes"]["plan"], json!("free"));
    assert_eq!(
        s.events(&ws).await.len(),
        before + 1,
        "one event: u2's update"
    );
    // Taking some away makes room again.
    let removed = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": "u1", "pets": {"$remove": [{"id": 1, "blob": big}]}}]}),
        )
        .await;
    assert_eq!(removed.body["attributes_processed"], json!(1));
    let again = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": "u1", "pets": add(3)}]}),
        )
        .await;
    assert_eq!(again.body["attributes_processed"], json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_id_makes_an_anonymous_user_that_external_id_later_identifies() {
    let (s, ws, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"events": [{"device_id": "dev1", "name": "browsed", "time": T}]}),
        )
        .await;
    assert_eq!(a.body, json!({"message": "success", "events_processed": 1}));
    let anon = s
        .post("/users/export/ids", &key, json!({"device_id": "dev1"}))
        .await
        .body["users"][0]
        .clone();
    assert!(anon.get("external_id").is_none(), "anonymous: {anon}");
    assert_eq!(anon["device_ids"], json!(["dev1"]));
    let custom = s.events_of_type(&ws, EventType::CustomEvent).await;
    assert_eq!(
        custom[0].event.body_value()["user"],
        json!({"user_id": anon["braze_id"], "device_id": "dev1"})
    );

    let a = s.post("/users/track", &key, json!({"attributes": [{"external_id": "u1", "device_id": "dev1", "first_name": "Ann"}]})).await;
    assert_eq!(a.body["attributes_processed"], 1);
    let identified = s.export_external(&key, "u1").await.expect("u1");
    assert_eq!(
        identified["braze_id"], anon["braze_id"],
        "identified in place"
    );
    assert_eq!(identified["custom_events"][0]["name"], "browsed");
    let by_device = s
        .post("/users/export/ids", &key, json!({"device_id": "dev1"}))
        .await;
    assert_eq!(by_device.body["users"][0]["external_id"], "u1");
    assert_eq!(by_device.body["users"][0]["braze_id"], anon["braze_id"]);

    // A device of an anonymous user seen with an external id that exists already: merged in.
    s.post(
        "/users/track",
        &key,
        json!({"events": [{"external_id": "u2", "name": "browsed", "time": T}]}),
    )
    .await;
    s.post("/users/track", &key, json!({"events": [{"device_id": "dev2", "name": "browsed", "time": T}], "attributes": [{"device_id": "dev2", "only_anon": true}]})).await;
    let anon2 = s
        .post("/users/export/ids", &key, json!({"device_id": "dev2"}))
        .await
        .body["users"][0]["braze_id"]
        .clone();
    s.post(
        "/users/track",
        &key,
        json!({"attributes": [{"external_id": "u2", "device_id": "dev2", "plan": "pro"}]}),
    )
    .await;
    let u2 = s.export_external(&key, "u2").await.expect("u2");
    assert_eq!(u2["custom_events"][0]["count"], 2);
    assert_eq!(
        u2["custom_attributes"],
        json!({"only_anon": true, "plan": "pro"})
    );
    let orphans = s.events_of_type(&ws, EventType::UserOrphan).await;
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].event.body_value()["user"]["user_id"], anon2);
    assert_eq!(
        orphans[0].event.body_value()["properties"]["orphaned_by_id"],
        u2["braze_id"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_accepted_change_logs_exactly_one_currents_event() {
    let (s, ws, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({
                "attributes": [{"external_id": "u1", "first_name": "Ann", "time_zone": "Europe/Paris", "plan": "pro"}],
                "events": [{"external_id": "u1", "name": "opened", "time": T, "app_id": "app-1", "properties": {"k": "v"}}],
                "purchases": [{"external_id": "u1", "product_id": "p1", "currency": "EUR", "price": 2.5, "quantity": 2, "time": T}],
            }),
        )
        .await;
    assert_eq!(a.status, 201);
    let u1 = s.export_external(&key, "u1").await.expect("u1");
    let braze = u1["braze_id"].clone();

    let events = s.events(&ws).await;
    let types: Vec<EventType> = events.iter().map(|e| e.event.event_type).collect();
    assert_eq!(
        types,
        [
            EventType::ProfileUpdate,
            EventType::CustomEvent,
            EventType::Purchase,
            EventType::Purchase
        ]
    );
    let update = &events[0].event.body_value();
    assert_eq!(update["event_type"], "users.profile.Update");
    assert_eq!(
        update["user"],
        json!({"user_id": braze, "external_user_id": "u1", "timezone": "Europe/Paris"})
    );
    assert_eq!(update["properties"]["first_name"], "Ann");
    assert_eq!(
        update["properties"]["app_group_id"],
        ws.app_group_id.as_str()
    );
    let custom = &events[1].event.body_value();
    assert_eq!(custom["event_type"], "users.behaviors.CustomEvent");
    assert_eq!(
        custom["user"],
        json!({"user_id": braze, "external_user_id": "u1", "timezone": "Europe/Paris"})
    );
    assert_eq!(custom["properties"]["name"], "opened");
    assert_eq!(custom["properties"]["app_id"], "app-1");
    assert_eq!(custom["properties"]["custom_properties"], json!({"k": "v"}));
    assert_eq!(custom["time"], 1_735_689_600);
    for purchase in &events[2..] {
        let body = &purchase.event.body_value();
        assert_eq!(body["event_type"], "users.behaviors.Purchase");
        assert_eq!(
            body["user"],
            json!({"user_id": braze, "external_user_id": "u1"})
        );
        assert_eq!(
            (
                body["properties"]["product_id"].clone(),
                body["properties"]["currency"].clone()
            ),
            (json!("p1"), json!("EUR"))
        );
    }

    // Orphan (identify merges an alias-only user in) and delete: one event each.
    let alias = json!({"alias_name": "anon", "alias_label": "crm"});
    s.post(
        "/users/track",
        &key,
        json!({"attributes": [{"user_alias": alias, "_update_existing_only": false, "x": 1}]}),
    )
    .await;
    let alias_user = s
        .post("/users/export/ids", &key, json!({"user_aliases": [alias]}))
        .await
        .body["users"][0]["braze_id"]
        .clone();
    let a = s
        .post(
            "/users/identify",
            &key,
            json!({"aliases_to_identify": [{"external_id": "u1", "user_alias": alias}]}),
        )
        .await;
    assert_eq!(
        a.body,
        json!({"aliases_processed": 1, "message": "success"})
    );
    let a = s
        .post("/users/delete", &key, json!({"external_ids": ["u1"]}))
        .await;
    assert_eq!(a.body, json!({"deleted": 1, "message": "success"}));

    let events = s.events(&ws).await;
    let types: Vec<EventType> = events.iter().map(|e| e.event.event_type).collect();
    assert_eq!(
        types,
        [
            EventType::ProfileUpdate,
            EventType::CustomEvent,
            EventType::Purchase,
            EventType::Purchase,
            EventType::ProfileUpdate,
            EventType::UserOrphan,
            EventType::UserDeleteRequest,
        ]
    );
    let orphan = &events[5].event.body_value();
    assert_eq!(orphan["user"]["user_id"], alias_user);
    assert_eq!(orphan["properties"]["orphaned_by_id"], braze);
    let delete = &events[6].event.body_value();
    assert_eq!(delete["user"], json!({"user_id": braze}));
    let ids: HashSet<String> = events.iter().map(|e| e.event.id.0.clone()).collect();
    assert_eq!(ids.len(), events.len(), "event ids are unique");
    assert!(
        events
            .iter()
            .all(|e| e.event.body_value()["id"] == e.event.id.0.as_str())
    );
    // A user deleted is gone from export.
    let gone = s
        .post(
            "/users/export/ids",
            &key,
            json!({"external_ids": ["u1"], "user_aliases": [alias]}),
        )
        .await;
    assert_eq!(
        gone.body,
        json!({"message": "success", "users": [], "invalid_user_ids": ["u1"]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_or_phone_target_sees_addresses_set_earlier_in_the_same_request() {
    let (s, _, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({
                "attributes": [
                    {"external_id": "r2", "email": "r2@example.com", "phone": "+15550001"},
                    {"email": "r2@example.com", "plan": "pro"},
                    {"phone": "+15550001", "tier": 2}
                ],
                "events": [{"email": "r2@example.com", "_update_existing_only": true, "name": "ev", "time": "2024-01-01T00:00:00Z"}]
            }),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.body["events_processed"], 1, "{a:?}");
    let user = s.export_external(&key, "r2").await.expect("r2");
    assert_eq!(user["custom_attributes"], json!({"plan": "pro", "tier": 2}));
    assert_eq!(user["custom_events"][0]["name"], "ev", "{user}");
    // Nobody else was made: the email and the phone each name r2 alone.
    let a = s
        .post(
            "/users/export/ids",
            &key,
            json!({"email_address": "r2@example.com", "fields_to_export": ["external_id"]}),
        )
        .await;
    assert_eq!(a.body["users"].as_array().map(Vec::len), Some(1), "{a:?}");
}

/// A NUL character (`\u0000`) where a client sends an identifier, a name or a lookup key is a
/// clear 4xx on every backend (PostgreSQL's text cannot hold one): in `/users/track` the
/// object alone is refused, by index, and the rest applies; elsewhere the request is refused
/// and writes nothing. In values kept as JSON (attributes, event properties) it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_in_identifiers_and_names_are_4xx_never_500() {
    let (s, ws, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [
                {"external_id": "ok1", "note": "a\u{0}b"},
                {"external_id": "a\u{0}b", "x": 1},
                {"user_alias": {"alias_label": "l", "alias_name": "a\u{0}b"}, "x": 1},
                {"external_id": "ok2", "email": "a\u{0}b@example.com"},
            ]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.body["attributes_processed"], 1, "{a:?}");
    let errors: Vec<u64> = a.body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(errors, [1, 2, 3], "{a:?}");
    let ok1 = s.export_external(&key, "ok1").await.expect("ok1 written");
    assert_eq!(ok1["custom_attributes"]["note"], "a\u{0}b", "{ok1}");
    assert!(s.export_external(&key, "ok2").await.is_none());

    let nul = "a\u{0}b";
    let posts = [
        ("/users/export/ids", json!({"external_ids": [nul]})),
        (
            "/users/alias/new",
            json!({"user_aliases": [{"external_id": "ok1", "alias_label": "l", "alias_name": nul}]}),
        ),
        (
            "/users/identify",
            json!({"aliases_to_identify": [{"external_id": nul, "user_alias": {"alias_label": "l", "alias_name": "n"}}]}),
        ),
        ("/users/delete", json!({"external_ids": [nul]})),
        (
            "/users/merge",
            json!({"merge_updates": [{"identifier_to_merge": {"external_id": nul}, "identifier_to_keep": {"external_id": "ok1"}}]}),
        ),
        (
            "/users/external_ids/rename",
            json!({"external_id_renames": [{"current_external_id": "ok1", "new_external_id": nul}]}),
        ),
        (
            "/api/v1/segments",
            json!({"name": nul, "filter": {"custom_attribute": {"name": "x", "op": "exists"}}}),
        ),
    ];
    for (path, body) in posts {
        let a = s.post(path, &key, body.clone()).await;
        assert!(
            (400..500).contains(&a.status) || a.body.to_string().contains("must not contain"),
            "{path} {body}: {a:?}"
        );
        assert!(a.status < 500, "{path} {body}: {a:?}");
    }
    for path in [
        "/api/v1/segments/a%00b",
        "/api/v1/segments/a%00b/size",
        "/api/v1/cohorts/heap/a%00b/members",
        "/segments/details?segment_id=a%00b",
    ] {
        let a = s
            .send(
                reqwest::Method::GET,
                path,
                crate::harness::Auth::Bearer(&key),
                None,
                false,
            )
            .await;
        assert!((400..500).contains(&a.status), "{path}: {a:?}");
    }
    // Nothing of the refused requests was written.
    let ok1 = s.export_external(&key, "ok1").await.expect("ok1 kept");
    assert_eq!(ok1["user_aliases"], json!([]), "{ok1}");
    let _ = ws;
}
