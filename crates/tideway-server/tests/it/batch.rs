//! The other batch endpoints: aliases, merge, delete, external id rename/remove, export.

use serde_json::{Value, json};
use tideway_core::currents::EventType;

use crate::harness::Server;

const T: &str = "2025-01-01T00:00:00Z";

fn alias(name: &str) -> Value {
    json!({"alias_name": name, "alias_label": "crm"})
}

async fn export(s: &Server, key: &str, body: Value) -> Value {
    let a = s.post("/users/export/ids", key, body).await;
    assert_eq!(a.status, 201, "{a:?}");
    a.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_are_created_bare_or_wrapped_and_renamed() {
    let (s, _, key) = Server::with_admin().await;
    s.post(
        "/users/track",
        &key,
        json!({"attributes": [{"external_id": "u1", "x": 1}]}),
    )
    .await;
    let a = s
        .post(
            "/users/alias/new",
            &key,
            json!({"user_aliases": [
                {"alias_name": "solo", "alias_label": "crm"},
                {"user_alias": {"alias_name": "u1-crm", "alias_label": "crm"}, "external_id": "u1"},
                {"alias_name": "nobody", "alias_label": "crm", "external_id": "missing"},
                {"alias_name": "", "alias_label": "crm"},
            ]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            201,
            &json!({"aliases_processed": 3, "message": "success", "errors": [{"type": "'alias_name' must be a non-empty string", "index": 3}]})
        )
    );
    let solo = export(&s, &key, json!({"user_aliases": [alias("solo")]})).await;
    assert!(
        solo["users"][0].get("external_id").is_none(),
        "a new alias-only user: {solo}"
    );
    assert_eq!(
        export(&s, &key, json!({"user_aliases": [alias("u1-crm")]})).await["users"][0]["external_id"],
        "u1"
    );
    assert_eq!(
        export(&s, &key, json!({"user_aliases": [alias("nobody")]})).await["users"],
        json!([])
    );

    let a = s
        .post(
            "/users/alias/update",
            &key,
            json!({"alias_updates": [
                {"alias_label": "crm", "old_alias_name": "u1-crm", "new_alias_name": "u1-renamed"},
                {"alias_label": "crm", "old_alias_name": "ghost", "new_alias_name": "x"},
                {"alias_label": "crm", "old_alias_name": "solo"},
            ]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            201,
            &json!({"message": "success", "errors": [
                {"type": "no user has this alias", "index": 1},
                {"type": "'new_alias_name' is required", "index": 2},
            ]})
        )
    );
    assert_eq!(
        export(&s, &key, json!({"user_aliases": [alias("u1-renamed")]})).await["users"][0]["external_id"],
        "u1"
    );
    assert_eq!(
        export(&s, &key, json!({"user_aliases": [alias("u1-crm")]})).await["users"],
        json!([])
    );

    let a = s.post("/users/alias/new", &key, json!({})).await;
    assert_eq!(
        (a.status, &a.body),
        (400, &json!({"message": "'user_aliases' is required"}))
    );
    let many: Vec<Value> = (0..51).map(|i| alias(&format!("a{i}"))).collect();
    let a = s
        .post("/users/alias/new", &key, json!({"user_aliases": many}))
        .await;
    assert_eq!(
        (a.status, &a.body),
        (400, &json!({"message": "Max Input Length Exceeded"}))
    );
    let a = s
        .post(
            "/users/alias/update",
            &key,
            json!({"alias_updates": [{"alias_label": "crm"}]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "Valid data must be provided in the 'alias_updates' field.", "errors": [{"type": "'old_alias_name' is required", "index": 0}]})
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_folds_one_user_into_another() {
    let (s, ws, key) = Server::with_admin().await;
    s.post(
        "/users/track",
        &key,
        json!({
            "attributes": [{"external_id": "keep", "a": "keep"}, {"external_id": "gone", "a": "gone", "b": "gone"}],
            "events": [{"external_id": "keep", "name": "e", "time": T}, {"external_id": "gone", "name": "e", "time": T}],
        }),
    )
    .await;
    let gone = s.export_external(&key, "gone").await.expect("gone");
    let a = s
        .post(
            "/users/merge",
            &key,
            json!({"merge_updates": [
                {"identifier_to_merge": {"external_id": "gone"}, "identifier_to_keep": {"external_id": "keep"}},
                {"identifier_to_merge": {"external_id": "nobody"}, "identifier_to_keep": {"external_id": "keep"}},
                {"identifier_to_merge": {"external_id": "keep", "braze_id": gone["braze_id"]}, "identifier_to_keep": {"external_id": "keep"}},
                {"identifier_to_keep": {"external_id": "keep"}},
            ]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            201,
            &json!({"message": "success", "errors": [
                {"type": "both 'identifier_to_merge' and 'identifier_to_keep' must match a user", "index": 1},
                {"type": "'identifier_to_merge' must have exactly one identifier", "index": 2},
                {"type": "'identifier_to_merge' is required", "index": 3},
            ]})
        )
    );
    let keep = s.export_external(&key, "keep").await.expect("keep");
    assert_eq!(keep["custom_attributes"], json!({"a": "keep", "b": "gone"}));
    assert_eq!(keep["custom_events"][0]["count"], 2);
    let a = export(&s, &key, json!({"external_ids": ["gone"]})).await;
    assert_eq!(
        a,
        json!({"message": "success", "users": [], "invalid_user_ids": ["gone"]})
    );
    assert_eq!(s.events_of_type(&ws, EventType::UserOrphan).await.len(), 1);

    let a = s.post("/users/merge", &key, json!({"merge_updates": [{"identifier_to_merge": {"email": 3}, "identifier_to_keep": {"external_id": "keep"}}]})).await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "Valid data must be provided in the 'merge_updates' field.", "errors": [{"type": "'identifier_to_merge.email' must be a string", "index": 0}]})
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_accepts_mixed_identifiers_and_export_then_finds_nothing() {
    let (s, ws, key) = Server::with_admin().await;
    s.post(
        "/users/track",
        &key,
        json!({"attributes": [
            {"external_id": "u1", "x": 1},
            {"external_id": "u2", "x": 1},
            {"user_alias": alias("al"), "_update_existing_only": false, "x": 1},
            {"email": "d@example.com", "x": 1},
            {"phone": "+15550002222", "x": 1},
            {"external_id": "by-braze", "x": 1},
        ]}),
    )
    .await;
    let by_braze = s.export_external(&key, "by-braze").await.expect("user")["braze_id"].clone();
    let before = s.events(&ws).await.len();

    let a = s.post("/users/delete", &key, json!({})).await;
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body["message"],
        "At least one identifier must be provided in 'external_ids', 'user_aliases', 'braze_ids', 'email_addresses' or 'phone_numbers'"
    );
    let many: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
    let braze_ids: Vec<Value> = (0..11).map(|_| by_braze.clone()).collect();
    let a = s
        .post(
            "/users/delete",
            &key,
            json!({"external_ids": many, "braze_ids": braze_ids}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "The max number of ids per request was exceeded"})
        )
    );
    let a = s
        .post(
            "/users/delete",
            &key,
            json!({"external_ids": ["u1"], "braze_ids": ["not-hex"]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "'braze_ids[0]' must be 24 lowercase hexadecimal characters"})
        )
    );
    assert_eq!(
        s.events(&ws).await.len(),
        before,
        "rejected deletes wrote nothing"
    );
    assert!(s.export_external(&key, "u1").await.is_some());

    let a = s
        .post(
            "/users/delete",
            &key,
            json!({
                "external_ids": ["u1", "u2", "never-existed"],
                "user_aliases": [alias("al")],
                "braze_ids": [by_braze],
                "email_addresses": [{"email": "d@example.com", "prioritization": ["most_recently_updated"]}],
                "phone_numbers": ["+15550002222"],
            }),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (201, &json!({"deleted": 6, "message": "success"}))
    );
    let after = export(
        &s,
        &key,
        json!({"external_ids": ["u1", "u2", "by-braze"], "user_aliases": [alias("al")], "email_address": "d@example.com", "phone": "+15550002222"}),
    )
    .await;
    assert_eq!(
        after,
        json!({"message": "success", "users": [], "invalid_user_ids": ["u1", "u2", "by-braze"]})
    );
    assert_eq!(
        s.events_of_type(&ws, EventType::UserDeleteRequest)
            .await
            .len(),
        6
    );
    // Plain-string email addresses are accepted too.
    s.post(
        "/users/track",
        &key,
        json!({"attributes": [{"email": "e@example.com", "x": 1}]}),
    )
    .await;
    let a = s
        .post(
            "/users/delete",
            &key,
            json!({"email_addresses": ["e@example.com"]}),
        )
        .await;
    assert_eq!(a.body, json!({"deleted": 1, "message": "success"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_ids_are_renamed_and_deprecated_ones_removed() {
    let (s, _, key) = Server::with_admin().await;
    s.post(
        "/users/track",
        &key,
        json!({"attributes": [{"external_id": "old", "x": 1}, {"external_id": "taken", "x": 2}]}),
    )
    .await;
    let a = s
        .post(
            "/users/external_ids/rename",
            &key,
            json!({"external_id_renames": [
                {"current_external_id": "old", "new_external_id": "new"},
                {"current_external_id": "taken", "new_external_id": "new"},
                {"current_external_id": "ghost", "new_external_id": "g2"},
                {"current_external_id": "taken", "new_external_id": ""},
            ]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            201,
            &json!({
                "message": "success",
                "external_ids": ["new"],
                "rename_errors": [
                    ["taken", "'new_external_id' must be a non-empty string"],
                    ["taken", "'new_external_id' is already in use"],
                    ["ghost", "'current_external_id' does not match a user's current external_id"],
                ]
            })
        )
    );
    let renamed = s.export_external(&key, "new").await.expect("new");
    assert_eq!(renamed["custom_attributes"]["x"], 1);
    let via_old = s
        .export_external(&key, "old")
        .await
        .expect("the deprecated id still resolves");
    assert_eq!(via_old["braze_id"], renamed["braze_id"]);

    let a = s
        .post(
            "/users/external_ids/remove",
            &key,
            json!({"external_ids": ["old", "taken", 7.5]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            201,
            &json!({
                "message": "success",
                "removed_ids": ["old"],
                "removal_errors": [["7.5", "'external_ids[2]' must be a string or a whole number"], ["taken", "not a deprecated external_id"]]
            })
        )
    );
    assert!(s.export_external(&key, "old").await.is_none());
    assert!(s.export_external(&key, "new").await.is_some());

    let a = s
        .post(
            "/users/external_ids/rename",
            &key,
            json!({"external_id_renames": [{"new_external_id": "x"}]}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "Valid data must be provided in the 'external_id_renames' field.", "rename_errors": [["null", "'current_external_id' is required"]]})
        )
    );
    let a = s
        .post(
            "/users/external_ids/remove",
            &key,
            json!({"external_ids": "old"}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (400, &json!({"message": "'external_ids' must be an array"}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_validates_its_request_and_limits_fields() {
    let (s, _, key) = Server::with_admin().await;
    s.post("/users/track", &key, json!({"attributes": [{"external_id": "u1", "first_name": "Ann", "email": "a@example.com", "x": 1}]})).await;

    let a = export(
        &s,
        &key,
        json!({"external_ids": ["u1", "u404"], "fields_to_export": ["external_id", "first_name"]}),
    )
    .await;
    assert_eq!(
        a,
        json!({"message": "success", "users": [{"external_id": "u1", "first_name": "Ann"}], "invalid_user_ids": ["u404"]})
    );
    let a = export(
        &s,
        &key,
        json!({"email_address": "a@example.com", "fields_to_export": ["braze_id", "user_aliases"]}),
    )
    .await;
    let keys: Vec<&String> = a["users"][0].as_object().expect("user").keys().collect();
    assert_eq!(keys, ["user_aliases", "braze_id"]);
    let a = export(
        &s,
        &key,
        json!({"email_address": "nobody@example.com", "fields_to_export": ["braze_id"]}),
    )
    .await;
    assert_eq!(a, json!({"message": "success", "users": []}));

    let ids: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let aliases: Vec<Value> = (0..21).map(|i| alias(&format!("a{i}"))).collect();
    let bad = s
        .post(
            "/users/export/ids",
            &key,
            json!({"external_ids": ids, "user_aliases": aliases}),
        )
        .await;
    assert_eq!(
        (bad.status, &bad.body),
        (
            400,
            &json!({"message": "The max number of external_ids and aliases per request was exceeded"})
        )
    );
    let bad = s
        .post(
            "/users/export/ids",
            &key,
            json!({"external_ids": ["u1"], "fields_to_export": ["external_id", "shoe_size"]}),
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("'fields_to_export' has an unknown field 'shoe_size'")),
        "{bad:?}"
    );
    let bad = s
        .post(
            "/users/export/ids",
            &key,
            json!({"fields_to_export": ["external_id"]}),
        )
        .await;
    assert_eq!(
        (bad.status, &bad.body),
        (
            400,
            &json!({"message": "Provide at least one of 'external_ids', 'user_aliases', 'device_id', 'braze_id', 'email_address' or 'phone'"})
        )
    );
    let bad = s
        .post(
            "/users/export/ids",
            &key,
            json!({"user_aliases": [{"alias_name": "x"}]}),
        )
        .await;
    assert_eq!(
        (bad.status, &bad.body),
        (
            400,
            &json!({"message": "'user_aliases[0]': 'alias_label' is required"})
        )
    );
    let bad = s
        .post("/users/export/ids", &key, json!({"device_id": ["d"]}))
        .await;
    assert_eq!(
        (bad.status, &bad.body),
        (400, &json!({"message": "'device_id' must be a string"}))
    );
}
