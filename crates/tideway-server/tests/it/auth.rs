//! Authentication, permissions, IP allowlists, rate limits, body limits and error bodies.

use serde_json::json;
use tideway_core::ids::ExternalId;
use tideway_core::keys::{IpAllowlist, Permission, PermissionSet};
use tideway_core::store::prelude::*;
use tideway_core::users::ExportRequest;
use tideway_server::{RateLimits, ServerConfig};

use crate::harness::{Auth, NOW, Server};

const TRACK_ONE: &str = r#"{"attributes":[{"external_id":"u1","first_name":"Ann"}]}"#;

/// An answer given before any key is known carries no `X-RateLimit-*` header at all (an
/// empty header is no number).
fn no_rate(a: &crate::harness::Answer) {
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(a.header(name).is_none(), "{name} present: {a:?}");
        assert!(!a.headers.contains_key(name), "{name} present: {a:?}");
    }
}

fn real_rate(a: &crate::harness::Answer) {
    let (limit, remaining, reset) = a.rate();
    assert!(
        limit.parse::<u32>().is_ok()
            && remaining.parse::<u32>().is_ok()
            && reset.parse::<i64>().is_ok(),
        "{a:?}"
    );
}

/// Braze's messaging endpoints take the legacy `api_key` body field as `/users/*` do: a
/// request with it is authenticated (here it reaches the endpoint or its own refusal), one with
/// a wrong key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messaging_endpoints_take_the_key_from_the_body() {
    let (s, _ws, key) = Server::with_admin().await;
    for path in [
        "/messages/send",
        "/campaigns/trigger/send",
        "/canvas/trigger/send",
        "/messages/schedule/create",
        "/campaigns/trigger/schedule/create",
        "/sends/id/create",
    ] {
        let send = |api_key: &str| {
            let body = json!({"api_key": api_key, "campaign_id": "nope"}).to_string();
            s.send(
                reqwest::Method::POST,
                path,
                Auth::None,
                Some(body.into()),
                true,
            )
        };
        let answer = send(&key).await;
        assert_ne!(answer.status, 401, "{path}: {answer:?}");
        assert!(
            !answer.body["message"]
                .as_str()
                .unwrap_or_default()
                .starts_with("Invalid API key"),
            "{path}: {answer:?}"
        );
        let refused = send("wrong").await;
        assert_eq!(refused.status, 401, "{path}: {refused:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_unknown_keys_get_401_with_the_key_echoed_and_no_rate_headers() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    let _key = s.admin_key(&ws).await;

    let none = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::None,
            Some(TRACK_ONE.into()),
            true,
        )
        .await;
    assert_eq!(
        (none.status, &none.body),
        (401, &json!({"message": "Invalid API key: "}))
    );
    no_rate(&none);

    let unknown = s
        .post("/users/track", "non-existent", json!({"attributes": []}))
        .await;
    assert_eq!(
        (unknown.status, &unknown.body),
        (401, &json!({"message": "Invalid API key: non-existent"}))
    );
    no_rate(&unknown);

    let unknown_query = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::Query("nope"),
            Some(TRACK_ONE.into()),
            true,
        )
        .await;
    assert_eq!(
        (unknown_query.status, &unknown_query.body),
        (401, &json!({"message": "Invalid API key: nope"}))
    );

    let unknown_body = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::None,
            Some(
                json!({"api_key": "in-body", "attributes": []})
                    .to_string()
                    .into(),
            ),
            true,
        )
        .await;
    assert_eq!(
        (unknown_body.status, &unknown_body.body),
        (401, &json!({"message": "Invalid API key: in-body"}))
    );

    // A malformed body without a header key cannot name a key: 401, not 400.
    let garbage = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::None,
            Some(b"{nope".to_vec()),
            true,
        )
        .await;
    assert_eq!(
        (garbage.status, &garbage.body),
        (401, &json!({"message": "Invalid API key: "}))
    );

    // Nothing was written by any of these.
    assert!(s.events(&ws).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_keys_in_query_and_body_are_accepted_and_revoked_keys_are_not() {
    let (s, ws, key) = Server::with_admin().await;

    let by_query = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::Query(&key),
            Some(TRACK_ONE.into()),
            true,
        )
        .await;
    assert_eq!(by_query.status, 201, "{by_query:?}");
    real_rate(&by_query);

    let body = json!({"api_key": key, "attributes": [{"external_id": "u2", "first_name": "Bo"}]});
    let by_body = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::None,
            Some(body.to_string().into()),
            true,
        )
        .await;
    assert_eq!(
        (by_body.status, &by_body.body),
        (
            201,
            &json!({"message": "success", "attributes_processed": 1})
        )
    );
    real_rate(&by_body);

    assert!(
        s.store
            .revoke_api_key(ws.id, &key[..8], NOW)
            .await
            .expect("revoke")
    );
    let revoked = s
        .post("/users/track", &key, json!({"attributes": []}))
        .await;
    assert_eq!(
        (revoked.status, &revoked.body),
        (
            401,
            &json!({"message": format!("Invalid API key: {}…", &key[..12])})
        )
    );
    no_rate(&revoked);
}

const ALL_ENDPOINTS: [(&str, Permission); 9] = [
    ("/users/track", Permission::UsersTrack),
    ("/users/identify", Permission::UsersIdentify),
    ("/users/alias/new", Permission::UsersAliasNew),
    ("/users/alias/update", Permission::UsersAliasUpdate),
    ("/users/merge", Permission::UsersMerge),
    ("/users/delete", Permission::UsersDelete),
    (
        "/users/external_ids/rename",
        Permission::UsersExternalIdsRename,
    ),
    (
        "/users/external_ids/remove",
        Permission::UsersExternalIdsRemove,
    ),
    ("/users/export/ids", Permission::UsersExportIds),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_the_permission_gets_403_on_every_other_endpoint() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    let track_only = s.key_for(&ws, &[Permission::UsersTrack]).await;
    for (path, permission) in ALL_ENDPOINTS {
        let a = s
            .post(path, &track_only, json!({"external_ids": ["u1"]}))
            .await;
        if permission == Permission::UsersTrack {
            assert_eq!(
                a.status, 400,
                "track is allowed (and this body has nothing valid): {a:?}"
            );
        } else {
            assert_eq!(
                (a.status, &a.body),
                (403, &json!({"message": "Access Denied"})),
                "{path}"
            );
        }
        real_rate(&a);
    }
    // And each permission opens exactly its endpoint.
    for (path, permission) in ALL_ENDPOINTS {
        let key = s.key_for(&ws, &[permission]).await;
        for (other, _) in ALL_ENDPOINTS {
            let a = s.post(other, &key, json!({})).await;
            if other == path {
                assert_eq!(
                    a.status, 400,
                    "{path} with an empty body is a 400, not a 403: {a:?}"
                );
            } else {
                assert_eq!(a.status, 403, "{other} with a key for {path}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_allowlists_are_enforced() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    let elsewhere = s
        .key_with(
            &ws,
            PermissionSet::all(),
            IpAllowlist::parse_all(["10.0.0.0/8"]).expect("cidr"),
        )
        .await;
    let a = s
        .post(
            "/users/track",
            &elsewhere,
            serde_json::from_str(TRACK_ONE).expect("json"),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            403,
            &json!({"message": "Access Denied: IP address not allowlisted for this API key"})
        )
    );
    real_rate(&a);
    assert!(s.events(&ws).await.is_empty());

    let local = s
        .key_with(
            &ws,
            PermissionSet::all(),
            IpAllowlist::parse_all(["127.0.0.1", "10.0.0.0/8"]).expect("cidr"),
        )
        .await;
    let a = s
        .post(
            "/users/track",
            &local,
            serde_json::from_str(TRACK_ONE).expect("json"),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
}

/// Sends aimed at a segment, an audience or everyone draw from their own, narrower budget
/// (braze-messaging.md §2: 250 a minute), shown in their headers; sends to named users do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_sends_have_their_own_budget() {
    let config = ServerConfig {
        rate_limits: RateLimits {
            broadcast_sends_per_minute: 2,
            ..RateLimits::default()
        },
        ..ServerConfig::default()
    };
    let s = Server::with_config(config).await;
    let ws = s.workspace("w").await;
    let key = s.admin_key(&ws).await;
    let wide = [
        (
            "/messages/send",
            json!({"segment_id": "s1", "messages": {}}),
        ),
        (
            "/campaigns/trigger/send",
            json!({"campaign_id": "c", "broadcast": true}),
        ),
        (
            "/canvas/trigger/send",
            json!({"canvas_id": "c", "audience": {"AND": []}}),
        ),
    ];
    // Windows are aligned to the minute: if one ends mid-test, start again in the fresh one.
    for attempt in 0.. {
        let mut answers = Vec::new();
        for (path, body) in &wide {
            answers.push(s.post(path, &key, body.clone()).await);
        }
        let resets: std::collections::HashSet<_> = answers
            .iter()
            .map(|a| a.header("x-ratelimit-reset").map(str::to_owned))
            .collect();
        if resets.len() > 1 && attempt < 2 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        }
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        assert_ne!(statuses[0], 429, "{answers:?}");
        assert_ne!(statuses[1], 429, "{answers:?}");
        assert_eq!(statuses[2], 429, "{answers:?}");
        for a in &answers {
            assert_eq!(a.header("x-ratelimit-limit"), Some("2"), "{a:?}");
        }
        assert!(
            answers[2].header("retry-after").is_some(),
            "{:?}",
            answers[2]
        );
        break;
    }
    // Named recipients draw from the management budget only.
    let a = s
        .post(
            "/messages/send",
            &key,
            json!({"external_user_ids": ["u1"], "messages": {}}),
        )
        .await;
    assert_ne!(a.status, 429, "{a:?}");
    assert_ne!(a.header("x-ratelimit-limit"), Some("2"), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_is_429_with_headers_and_retry_after() {
    let config = ServerConfig {
        rate_limits: RateLimits {
            users_track_per_minute: 3,
            users_batch_per_minute: 2,
            users_export_per_minute: 1,
            ..RateLimits::default()
        },
        ..ServerConfig::default()
    };
    let s = Server::with_config(config).await;
    let ws = s.workspace("w").await;
    let key = s.admin_key(&ws).await;
    let other_key = s.admin_key(&ws).await;
    let mut sent = 0;
    let mut body = || {
        sent += 1;
        json!({"attributes": [{"external_id": "u1", "n": sent}]})
    };
    let mut accepted = 0;
    // Windows are aligned to the minute: if one ends mid-test, start again in the fresh one.
    for attempt in 0..3 {
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(s.post("/users/track", &key, body()).await);
        }
        accepted += answers.iter().filter(|a| a.status == 201).count();
        let resets: Vec<String> = answers.iter().map(|a| a.rate().2).collect();
        if resets.iter().any(|r| *r != resets[0]) {
            assert!(attempt < 2, "the minute rolled over three times?");
            continue;
        }
        let seen: Vec<(u16, String, String)> = answers
            .iter()
            .map(|a| (a.status, a.rate().0, a.rate().1))
            .collect();
        let expected: Vec<(u16, String, String)> = [(201, "2"), (201, "1"), (201, "0"), (429, "0")]
            .iter()
            .map(|(st, rem)| (*st, "3".to_owned(), (*rem).to_owned()))
            .collect();
        assert_eq!(seen, expected);
        let limited = &answers[3];
        assert_eq!(limited.body, json!({"message": "Rate Limited"}));
        let retry: u64 = limited
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .expect("seconds");
        assert!((1..=60).contains(&retry));
        let reset: i64 = limited.rate().2.parse().expect("reset");
        assert_eq!(reset % 60, 0, "windows end on a minute");
        break;
    }
    // Another key and another group have their own counters.
    let other = s.post("/users/track", &other_key, body()).await;
    assert_eq!(other.status, 201);
    accepted += 1;
    let export = s
        .post("/users/export/ids", &key, json!({"external_ids": ["u1"]}))
        .await;
    assert_eq!((export.status, export.rate().0.as_str()), (201, "1"));
    // A rate-limited request is not applied: one profile update per accepted request only.
    assert_eq!(s.events(&ws).await.len(), accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_json() {
    let s = Server::with_config(ServerConfig {
        max_body_bytes: 16 * 1024,
        ..ServerConfig::default()
    })
    .await;
    let ws = s.workspace("w").await;
    let key = s.admin_key(&ws).await;
    let big = json!({"attributes": [{"external_id": "u1", "bio": "x".repeat(20 * 1024)}]})
        .to_string()
        .into_bytes();

    let a = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::Bearer(&key),
            Some(big.clone()),
            true,
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (413, &json!({"message": "Payload Too Large"}))
    );
    assert_eq!(a.header("content-type"), Some("application/json"));
    real_rate(&a);

    let anonymous = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::None,
            Some(big),
            true,
        )
        .await;
    assert_eq!(
        (anonymous.status, &anonymous.body),
        (413, &json!({"message": "Payload Too Large"}))
    );
    no_rate(&anonymous);
    assert!(s.events(&ws).await.is_empty());

    let just_under = json!({"attributes": [{"external_id": "u1", "bio": "x".repeat(200)}]});
    assert_eq!(s.post("/users/track", &key, just_under).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_get_400_and_content_type_is_optional() {
    let (s, _, key) = Server::with_admin().await;
    for raw in [&b"{not json"[..], b"[1, 2]", b"\"text\"", b""] {
        let a = s
            .send(
                reqwest::Method::POST,
                "/users/track",
                Auth::Bearer(&key),
                Some(raw.to_vec()),
                true,
            )
            .await;
        assert_eq!(a.status, 400, "{a:?}");
        assert_eq!(a.body["message"], "Bad Request");
        let errors = a.body["errors"].as_array().expect("errors");
        assert!(
            errors.len() == 1 && errors[0].as_str().is_some_and(|e| !e.is_empty()),
            "{a:?}"
        );
        real_rate(&a);
    }
    // No Content-Type, plus X-Braze-Bulk and unknown top-level keys: accepted.
    let res = s
        .client
        .post(format!("{}/users/track", s.base))
        .bearer_auth(&key)
        .header("X-Braze-Bulk", "true")
        .body(
            json!({"partner": "RudderStack", "attributes": [{"external_id": "u1", "plan": "pro"}]})
                .to_string(),
        )
        .send()
        .await
        .expect("send");
    assert_eq!(res.status().as_u16(), 201);
    // Wrong JSON types name the field.
    let a = s
        .post("/users/export/ids", &key, json!({"external_ids": "x"}))
        .await;
    assert_eq!(
        (a.status, &a.body),
        (400, &json!({"message": "'external_ids' must be an array"}))
    );
    let a = s
        .post("/users/delete", &key, json!({"external_ids": ["ok", 5.5]}))
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "'external_ids[1]' must be a string or a whole number"})
        )
    );
    let a = s
        .post(
            "/users/identify",
            &key,
            json!({"aliases_to_identify": {"external_id": "x"}}),
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "'aliases_to_identify' must be an array"})
        )
    );
    let a = s
        .post("/users/track", &key, json!({"events": {"name": "x"}}))
        .await;
    assert_eq!(
        (a.status, &a.body),
        (
            400,
            &json!({"message": "'events' must be an array of objects"})
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_answer_json() {
    let s = Server::start().await;
    let a = s
        .send(
            reqwest::Method::POST,
            "/users/nope",
            Auth::None,
            Some(b"{}".to_vec()),
            true,
        )
        .await;
    assert_eq!(
        (a.status, &a.body),
        (404, &json!({"message": "Invalid URL"}))
    );
    let a = s.get("/users/track").await;
    assert_eq!(
        (a.status, &a.body),
        (405, &json!({"message": "Method Not Allowed"}))
    );
    let a = s
        .send(reqwest::Method::POST, "/health", Auth::None, None, false)
        .await;
    assert_eq!(a.status, 405);
    // A path segment that is not UTF-8 is refused by axum's extractor, in JSON like the rest.
    let a = s
        .send(
            reqwest::Method::GET,
            "/api/v1/segments/%FF%FE/size",
            Auth::None,
            None,
            false,
        )
        .await;
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("UTF-8")),
        "{a:?}"
    );
    // An error echoes at most ECHO_MAX_CHARS of what the client sent.
    let ws = s.workspace("w").await;
    let key = s.admin_key(&ws).await;
    let long = "x".repeat(20_000);
    let a = s
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/campaigns/{long}"),
            Auth::Bearer(&key),
            None,
            false,
        )
        .await;
    assert_eq!(a.status, 404, "{a:?}");
    let message = a.body["message"].as_str().unwrap();
    assert!(
        message.chars().count() <= tideway_server::ECHO_MAX_CHARS + 1 && message.ends_with('…'),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_one_workspace_never_sees_another() {
    let s = Server::start().await;
    let a = s.workspace("a").await;
    let b = s.workspace("b").await;
    let key_a = s.admin_key(&a).await;
    let key_b = s.admin_key(&b).await;
    let track = |plan: &str| json!({"attributes": [{"external_id": "shared", "plan": plan}], "events": [{"external_id": "shared", "name": "e", "time": "2025-01-01T00:00:00Z"}]});
    assert_eq!(
        s.post("/users/track", &key_a, track("gold")).await.status,
        201
    );
    assert_eq!(
        s.post("/users/track", &key_b, track("free")).await.status,
        201
    );
    assert_eq!(s.post("/users/track", &key_b, json!({"events": [{"external_id": "shared", "name": "e", "time": "2025-01-02T00:00:00Z"}]})).await.status, 201);

    let in_a = s
        .export_external(&key_a, "shared")
        .await
        .expect("user in a");
    let in_b = s
        .export_external(&key_b, "shared")
        .await
        .expect("user in b");
    assert_eq!(in_a["custom_attributes"]["plan"], "gold");
    assert_eq!(in_b["custom_attributes"]["plan"], "free");
    assert_eq!(in_a["custom_events"][0]["count"], 1);
    assert_eq!(in_b["custom_events"][0]["count"], 2);
    assert_ne!(in_a["braze_id"], in_b["braze_id"]);

    // B's key cannot touch A's users: deleting "shared" with B's key deletes only B's.
    let del = s
        .post("/users/delete", &key_b, json!({"external_ids": ["shared"]}))
        .await;
    assert_eq!(del.body, json!({"deleted": 1, "message": "success"}));
    assert!(s.export_external(&key_b, "shared").await.is_none());
    assert!(s.export_external(&key_a, "shared").await.is_some());
    // Nor find them by braze_id.
    let by_braze = s
        .post(
            "/users/export/ids",
            &key_b,
            json!({"braze_id": in_a["braze_id"]}),
        )
        .await;
    assert_eq!(by_braze.body["users"], json!([]));
    // The store agrees: A's user is intact.
    let req = ExportRequest {
        external_ids: vec![ExternalId::parse("shared").expect("id")],
        ..ExportRequest::default()
    };
    assert_eq!(
        s.store
            .export_ids(&a, req)
            .await
            .expect("export")
            .users
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_echoes_only_a_short_prefix_of_a_huge_key() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    let _key = s.admin_key(&ws).await;
    // 64 KiB of "key", in the header and in the body.
    let huge = "k".repeat(64 * 1024);
    let by_header = s
        .post("/users/track", &huge, json!({"attributes": []}))
        .await;
    let by_body = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::None,
            Some(
                json!({"api_key": huge, "attributes": []})
                    .to_string()
                    .into(),
            ),
            true,
        )
        .await;
    for a in [&by_header, &by_body] {
        assert_eq!(
            (a.status, &a.body),
            (401, &json!({"message": "Invalid API key: kkkkkkkkkkkk…"}))
        );
        no_rate(a);
    }
    // Multi-byte characters are cut on a character boundary, not a byte.
    let wide = "é".repeat(40);
    let a = s
        .send(
            reqwest::Method::POST,
            "/users/track",
            Auth::None,
            Some(
                json!({"api_key": wide, "attributes": []})
                    .to_string()
                    .into(),
            ),
            true,
        )
        .await;
    assert_eq!(
        a.body,
        json!({"message": format!("Invalid API key: {}…", "é".repeat(12))})
    );
    // Management routes answer the same way.
    let a = s
        .send(
            reqwest::Method::GET,
            "/api/v1/cohorts",
            Auth::Bearer(&huge),
            None,
            true,
        )
        .await;
    assert_eq!(a.status, 401);
    assert!(a.body["message"].as_str().unwrap().len() < 64, "{a:?}");
    no_rate(&a);
}
