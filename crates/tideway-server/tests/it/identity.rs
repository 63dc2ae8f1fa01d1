//! `/users/identify`: merge rules, identification in place, alias label conflicts, the device
//! and email variants, and validation.

use serde_json::{Value, json};
use tideway_core::currents::EventType;

use crate::harness::Server;

const T1: &str = "2025-01-01T00:00:00Z";
const T2: &str = "2025-02-01T00:00:00Z";

fn alias(name: &str) -> Value {
    json!({"alias_name": name, "alias_label": "crm"})
}

async fn alias_user(s: &Server, key: &str, name: &str) -> Value {
    let a = s
        .post(
            "/users/export/ids",
            key,
            json!({"user_aliases": [alias(name)]}),
        )
        .await;
    a.body["users"].get(0).cloned().unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_only_user_merges_into_the_identified_one() {
    let (s, ws, key) = Server::with_admin().await;
    s.post(
        "/users/track",
        &key,
        json!({
            "attributes": [{"external_id": "u1", "first_name": "Known", "plan": "gold"}],
            "events": [{"external_id": "u1", "name": "opened", "time": T2}],
        }),
    )
    .await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({
                "attributes": [{"user_alias": alias("anon-1"), "_update_existing_only": false, "first_name": "Alias", "last_name": "Only", "plan": "free", "only_alias": "yes"}],
                "events": [
                    {"user_alias": alias("anon-1"), "name": "opened", "time": T1},
                    {"user_alias": alias("anon-1"), "name": "opened", "time": T1},
                ],
            }),
        )
        .await;
    assert_eq!(
        a.body,
        json!({"message": "success", "attributes_processed": 1, "events_processed": 2})
    );
    let anon = alias_user(&s, &key, "anon-1").await;
    let known = s.export_external(&key, "u1").await.expect("u1");

    let a = s.post("/users/identify", &key, json!({"aliases_to_identify": [{"external_id": "u1", "user_alias": alias("anon-1")}], "merge_behavior": "merge"})).await;
    assert_eq!(
        (a.status, &a.body),
        (201, &json!({"aliases_processed": 1, "message": "success"}))
    );

    let merged = s.export_external(&key, "u1").await.expect("u1");
    assert_eq!(merged["braze_id"], known["braze_id"]);
    assert_eq!(
        merged["first_name"], "Known",
        "conflicts keep the identified value"
    );
    assert_eq!(
        merged["last_name"], "Only",
        "fields only the alias user had are copied"
    );
    assert_eq!(
        merged["custom_attributes"],
        json!({"plan": "gold", "only_alias": "yes"})
    );
    assert_eq!(
        merged["custom_events"],
        json!([{"name": "opened", "first": "2025-01-01T00:00:00.000Z", "last": "2025-02-01T00:00:00.000Z", "count": 3}]),
        "counts summed, first earlier, last later"
    );
    assert_eq!(merged["user_aliases"], json!([alias("anon-1")]));
    assert_eq!(
        alias_user(&s, &key, "anon-1").await["braze_id"],
        known["braze_id"],
        "the alias now names the identified user"
    );
    let orphans = s.events_of_type(&ws, EventType::UserOrphan).await;
    assert_eq!(orphans.len(), 1);
    assert_eq!(
        orphans[0].event.body_value()["user"]["user_id"],
        anon["braze_id"]
    );
    assert_eq!(
        orphans[0].event.body_value()["properties"]["orphaned_by_id"],
        known["braze_id"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_external_id_identifies_the_alias_user_in_place() {
    let (s, ws, key) = Server::with_admin().await;
    s.post("/users/track", &key, json!({"attributes": [{"user_alias": alias("anon-2"), "_update_existing_only": false, "x": 1}]})).await;
    let before = alias_user(&s, &key, "anon-2").await;
    let a = s.post("/users/identify", &key, json!({"aliases_to_identify": [{"external_id": "fresh", "user_alias": alias("anon-2")}]})).await;
    assert_eq!(
        a.body,
        json!({"aliases_processed": 1, "message": "success"})
    );
    let after = s.export_external(&key, "fresh").await.expect("identified");
    assert_eq!(after["braze_id"], before["braze_id"]);
    assert_eq!(after["user_aliases"], json!([alias("anon-2")]));
    assert_eq!(after["custom_attributes"], json!({"x": 1}));
    assert!(
        s.events_of_type(&ws, EventType::UserOrphan)
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_with_the_same_alias_label_is_not_merged() {
    let (s, _, key) = Server::with_admin().await;
    s.post(
        "/users/track",
        &key,
        json!({"attributes": [{"external_id": "u3", "x": 1}]}),
    )
    .await;
    let a = s.post("/users/alias/new", &key, json!({"user_aliases": [{"external_id": "u3", "alias_name": "mine", "alias_label": "crm"}]})).await;
    assert_eq!(
        a.body,
        json!({"aliases_processed": 1, "message": "success"})
    );
    s.post("/users/track", &key, json!({"attributes": [{"user_alias": alias("other"), "_update_existing_only": false, "y": 1}]})).await;

    let a = s
        .post(
            "/users/identify",
            &key,
            json!({"aliases_to_identify": [{"external_id": "u3", "user_alias": alias("other")}, {"external_id": "u3"}]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            201,
            &json!({
                "aliases_processed": 0,
                "message": "success",
                "errors": [
                    {"type": "the user with this external_id already has an alias labelled 'crm'", "input_array": "aliases_to_identify", "index": 0},
                    {"type": "'user_alias' is required", "input_array": "aliases_to_identify", "index": 1},
                ]
            })
        )
    );
    let u3 = s.export_external(&key, "u3").await.expect("u3");
    let other = alias_user(&s, &key, "other").await;
    assert_ne!(u3["braze_id"], other["braze_id"], "still two users");
    assert_eq!(u3["custom_attributes"], json!({"x": 1}));
    assert!(other.get("external_id").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_emails_and_phones_can_be_identified() {
    let (s, _, key) = Server::with_admin().await;
    s.post(
        "/users/track",
        &key,
        json!({"attributes": [
            {"device_id": "dev3", "d": 1},
            {"email": "e@example.com", "e": 1},
            {"phone": "+15550001111", "p": 1},
        ]}),
    )
    .await;
    let a = s
        .post(
            "/users/identify",
            &key,
            json!({
                "aliases_to_identify": [{"external_id": "u-dev", "device_id": "dev3"}],
                "emails_to_identify": [{"external_id": "u-mail", "email": "e@example.com", "prioritization": ["unidentified", "most_recently_updated"]}],
                "phone_numbers_to_identify": [{"external_id": "u-phone", "phone": "+15550001111"}, {"external_id": "u-x", "phone": "+15550009999"}, {"phone": "1"}],
            }),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            201,
            &json!({
                "aliases_processed": 3,
                "message": "success",
                "errors": [
                    {"type": "no single user matches the identifier to identify", "input_array": "phone_numbers_to_identify", "index": 1},
                    {"type": "'external_id' is required", "input_array": "phone_numbers_to_identify", "index": 2},
                ]
            })
        )
    );
    assert_eq!(
        s.export_external(&key, "u-dev").await.expect("dev")["custom_attributes"],
        json!({"d": 1})
    );
    assert_eq!(
        s.export_external(&key, "u-mail").await.expect("mail")["email"],
        "e@example.com"
    );
    assert_eq!(
        s.export_external(&key, "u-phone").await.expect("phone")["phone"],
        "+15550001111"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_validation() {
    let (s, ws, key) = Server::with_admin().await;
    let a = s.post("/users/identify", &key, json!({})).await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "'aliases_to_identify' is required"})
        )
    );
    let a = s
        .post(
            "/users/identify",
            &key,
            json!({"aliases_to_identify": [{"external_id": "u1"}, "x"]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({
                "message": "Valid data must be provided in the 'aliases_to_identify', 'emails_to_identify', or 'phone_numbers_to_identify' fields.",
                "errors": [
                    {"type": "'user_alias' is required", "input_array": "aliases_to_identify", "index": 0},
                    {"type": "'aliases_to_identify' elements must be objects", "input_array": "aliases_to_identify", "index": 1},
                ]
            })
        )
    );
    let many: Vec<Value> = (0..26)
        .map(|i| json!({"external_id": format!("u{i}"), "user_alias": alias(&format!("a{i}"))}))
        .collect();
    let emails: Vec<Value> = (0..25)
        .map(|i| json!({"external_id": format!("u{i}"), "email": format!("{i}@x.io")}))
        .collect();
    let a = s
        .post(
            "/users/identify",
            &key,
            json!({"aliases_to_identify": many, "emails_to_identify": emails}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (400, &json!({"message": "Max Input Length Exceeded"}))
    );
    let a = s
        .post(
            "/users/identify",
            &key,
            json!({"aliases_to_identify": [], "merge_behavior": "sometimes"}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "'merge_behavior' must be 'none' or 'merge'"})
        )
    );
    assert!(s.events(&ws).await.is_empty());
}

/// An integer `external_id` (clients keyed by a database id send `5555`) is its decimal text on
/// every `/users/*` endpoint, as on the messaging ones; a fraction or a boolean is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_external_ids_are_their_decimal_text() {
    let (s, _ws, key) = Server::with_admin().await;
    let a = s
        .post(
            "/users/track",
            &key,
            json!({"attributes": [{"external_id": 5555, "first_name": "Ada"}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let user = s
        .export_external(&key, "5555")
        .await
        .expect("stored as \"5555\"");
    assert_eq!(user["first_name"], "Ada");
    let a = s
        .post(
            "/users/alias/new",
            &key,
            json!({"user_aliases": [{"external_id": 5555, "alias_name": "a@x.com", "alias_label": "email"}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    let a = s
        .post(
            "/users/export/ids",
            &key,
            json!({"external_ids": [5555], "fields_to_export": ["external_id", "user_aliases"]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(
        a.body["users"],
        json!([{"external_id": "5555", "user_aliases": [{"alias_name": "a@x.com", "alias_label": "email"}]}])
    );
    // Braze's fields Tideway keeps no data for are left out, not refused; unknown ones are.
    let a = s
        .post(
            "/users/export/ids",
            &key,
            json!({"external_ids": ["5555"], "fields_to_export": ["external_id", "campaigns_received", "devices", "apps"]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.body["users"], json!([{"external_id": "5555"}]));
    let a = s
        .post(
            "/users/export/ids",
            &key,
            json!({"external_ids": ["5555"], "fields_to_export": ["shoe_size"]}),
        )
        .await;
    assert_eq!(a.status, 400, "{a:?}");
    for bad in [json!(55.5), json!(true)] {
        let a = s
            .post(
                "/users/track",
                &key,
                json!({"attributes": [{"external_id": bad, "first_name": "Bo"}]}),
            )
            .await;
        assert_eq!(a.status, 400, "{bad}: {a:?}");
    }
    let a = s
        .post("/users/delete", &key, json!({"external_ids": [5555]}))
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    assert_eq!(a.body["deleted"], 1, "{a:?}");
}
