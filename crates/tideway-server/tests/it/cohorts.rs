//! The partner cohort-import API, Heap's signed segment-sync webhook and the cohorts
//! management API, over HTTP with the request shapes real partners send.

use serde_json::{Value, json};
use tideway_core::keys::{Permission, Secret};
use tideway_core::store::Workspace;
use tideway_heap::webhook::sign;

use crate::harness::{Auth, NOW, Server};

struct Partners {
    heap_key: String,
    amplitude_key: String,
}

async fn partner_keys(s: &Server) -> Partners {
    let heap = s
        .store
        .partner_api_key("heap", Secret::new("heap-partner-key".into()), NOW)
        .await
        .unwrap();
    let amplitude = s
        .store
        .partner_api_key("amplitude", Secret::new("amp-partner-key".into()), NOW)
        .await
        .unwrap();
    Partners {
        heap_key: heap.expose().to_owned(),
        amplitude_key: amplitude.expose().to_owned(),
    }
}

async fn import_key(s: &Server, ws: &Workspace, partner: &str, secret: &str) -> String {
    s.store
        .create_import_key(ws.id, partner, &Secret::new(secret.into()), NOW)
        .await
        .unwrap();
    secret.to_owned()
}

async fn post_raw(s: &Server, path: &str, body: Value) -> crate::harness::Answer {
    s.send(
        reqwest::Method::POST,
        path,
        Auth::None,
        Some(body.to_string().into_bytes()),
        true,
    )
    .await
}

async fn seed_users(s: &Server, key: &str) {
    let a = s
        .post(
            "/users/track",
            key,
            json!({"attributes": [
                {"external_id": "u1", "plan": "pro"},
                {"external_id": "u2", "plan": "free"},
                {"device_id": "anon-device", "plan": "free"},
                {"device_id": "old-device", "plan": "free"},
                {"user_alias": {"alias_name": "a@b.co", "alias_label": "email"}, "_update_existing_only": false, "plan": "pro"},
            ]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
    // old-device's user becomes identified: its device id no longer matches for cohort import.
    let a = s
        .post(
            "/users/track",
            key,
            json!({"attributes": [{"external_id": "u3", "device_id": "old-device"}]}),
        )
        .await;
    assert_eq!(a.status, 201, "{a:?}");
}

fn users_body(p: &Partners, secret: &str, cohort: &str, changes: Value) -> Value {
    json!({"partner_api_key": p.heap_key, "client_secret": secret, "cohort_id": cohort, "cohort_changes": changes})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_shapes_apply_with_set_semantics_and_the_device_rule() {
    let (s, ws, key) = Server::with_admin().await;
    seed_users(&s, &key).await;
    let p = partner_keys(&s).await;
    let secret = import_key(&s, &ws, "heap", "import-secret-1").await;

    // Credential check: empty changes on a made-up cohort.
    let a = post_raw(
        &s,
        "/partners/heap/cohorts/users",
        users_body(&p, &secret, "will_add_in_constant", json!([])),
    )
    .await;
    assert_eq!((a.status, &a.body["message"]), (201, &json!("success")));

    let named = json!({"partner_api_key": p.heap_key, "client_secret": secret, "cohort_id": "c1", "name": "Abandoned checkout", "created_at": "2021-01-21T19:20:30+05:00"});
    assert_eq!(
        post_raw(&s, "/partners/heap/cohorts", named.clone())
            .await
            .status,
        201
    );
    assert_eq!(
        post_raw(&s, "/partners/heap/cohorts", named).await.status,
        201,
        "naming is idempotent"
    );

    // Segment's shape: add and remove objects in one request, empty arrays, should_remove absent.
    let changes = json!([
        {"aliases": [], "device_ids": ["anon-device", "old-device"], "user_ids": ["u1", "u2", "nobody"]},
        {"aliases": [{"alias_label": "email", "alias_name": "a@b.co"}], "device_ids": [], "user_ids": []},
        {"aliases": [], "device_ids": [], "should_remove": true, "user_ids": ["u2"]},
    ]);
    let a = post_raw(
        &s,
        "/partners/heap/cohorts/users",
        users_body(&p, &secret, "c1", changes.clone()),
    )
    .await;
    assert_eq!(a.status, 201, "{a:?}");
    // u2 is added then removed in the same request: the net effect (not a member) is all that is written.
    assert_eq!(
        a.body,
        json!({"message": "success", "matched": 5, "ignored": 2, "added": 3, "removed": 0})
    );
    // Replaying the same request changes nothing.
    let again = post_raw(
        &s,
        "/partners/heap/cohorts/users",
        users_body(&p, &secret, "c1", changes),
    )
    .await;
    assert_eq!(
        (again.body["added"].clone(), again.body["removed"].clone()),
        (json!(0), json!(0)),
        "{again:?}"
    );

    let list = s
        .send(
            reqwest::Method::GET,
            "/api/v1/cohorts",
            Auth::Bearer(&key),
            None,
            false,
        )
        .await;
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(list.body["cohorts"][0]["name"], "Abandoned checkout");
    assert_eq!(list.body["cohorts"][0]["member_count"], 3);
    assert_eq!(list.body["cohorts"][0]["filter_name"], "Heap Cohorts");
    assert!(list.header("x-ratelimit-remaining").is_some());

    // Members page by page.
    let first = s
        .send(
            reqwest::Method::GET,
            "/api/v1/cohorts/heap/c1/members?limit=2",
            Auth::Bearer(&key),
            None,
            false,
        )
        .await;
    assert_eq!(first.body["members"].as_array().unwrap().len(), 2);
    let cursor = first.body["next_cursor"].as_str().unwrap().to_owned();
    let rest = s
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/cohorts/heap/c1/members?limit=2&cursor={cursor}"),
            Auth::Bearer(&key),
            None,
            false,
        )
        .await;
    assert_eq!(rest.body["members"].as_array().unwrap().len(), 1);
    assert_eq!(rest.body["next_cursor"], Value::Null);
    let braze_id = first.body["members"][0]["braze_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mine = s
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/users/{braze_id}/cohorts"),
            Auth::Bearer(&key),
            None,
            false,
        )
        .await;
    assert_eq!(mine.body["cohorts"][0]["cohort_id"], "c1");
    let missing = s
        .send(
            reqwest::Method::GET,
            "/api/v1/cohorts/heap/nope/members",
            Auth::Bearer(&key),
            None,
            false,
        )
        .await;
    assert_eq!(missing.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_400_and_401_text() {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    let p = partner_keys(&s).await;
    let secret = import_key(&s, &ws, "heap", "import-secret-2").await;
    let cases: Vec<(&str, Value, u16, String)> = vec![
        ("/partners/heap/cohorts/users", json!({"client_secret": secret, "cohort_id": "c", "cohort_changes": []}), 401, "Invalid Partner API key".into()),
        ("/partners/heap/cohorts/users", json!({"partner_api_key": "wrong", "client_secret": secret, "cohort_id": "c", "cohort_changes": []}), 401, "Invalid Partner API key".into()),
        // A partner key of heap cannot import as amplitude.
        ("/partners/amplitude/cohorts/users", json!({"partner_api_key": p.heap_key, "client_secret": secret, "cohort_id": "c", "cohort_changes": []}), 401, "Invalid Partner API key".into()),
        // Amplitude's own key, but the import key is heap's.
        ("/partners/amplitude/cohorts/users", json!({"partner_api_key": p.amplitude_key, "client_secret": secret, "cohort_id": "c", "cohort_changes": []}), 401, "Invalid client secret".into()),
        ("/partners/heap/cohorts/users", json!({"partner_api_key": p.heap_key, "client_secret": "nope", "cohort_id": "c", "cohort_changes": []}), 401, "Invalid client secret".into()),
        ("/partners/heap/cohorts/users", users_body(&p, &secret, "c", json!([])).as_object().map(|o| { let mut o = o.clone(); o.remove("cohort_id"); Value::Object(o) }).unwrap(), 400, "cohort_id must be a valid string".into()),
        ("/partners/heap/cohorts/users", users_body(&p, &secret, "c", json!({"user_ids": ["a"]})), 400, "cohort_changes must be an array of objects each with key user_ids and/or device_ids mapping to an array of strings, or an aliases object".into()),
        ("/partners/heap/cohorts/users", users_body(&p, &secret, "c", json!([{"user_ids": [1, 2]}])), 400, "cohort_changes must be an array of objects each with key user_ids and/or device_ids mapping to an array of strings, or an aliases object".into()),
        ("/partners/heap/cohorts/users", users_body(&p, &secret, "c", json!([{"user_ids": (0..600).map(|i| i.to_string()).collect::<Vec<_>>()}, {"device_ids": (0..401).map(|i| i.to_string()).collect::<Vec<_>>()}])), 400, "Only 1,000 user_ids, device_ids, and aliases are allowed per request".into()),
        ("/partners/heap/cohorts", json!({"partner_api_key": p.heap_key, "client_secret": secret, "cohort_id": "c", "name": "", "created_at": "2021-01-21"}), 400, "name must be a non-empty string".into()),
        ("/partners/heap/cohorts", json!({"partner_api_key": p.heap_key, "client_secret": secret, "cohort_id": "c", "name": "n".repeat(256), "created_at": "2021-01-21"}), 400, "name must be at most 255 characters".into()),
        ("/partners/heap/cohorts", json!({"partner_api_key": p.heap_key, "client_secret": secret, "cohort_id": "c", "name": "n", "created_at": "yesterday"}), 400, "created_at must be a valid time as an ISO-8601 string".into()),
        ("/partners/heap/cohorts", json!({"partner_api_key": p.heap_key, "client_secret": secret, "cohort_id": ["c"], "name": "n", "created_at": "2021-01-21"}), 400, "cohort_id must be a valid string".into()),
        // A NUL character, on every backend alike.
        ("/partners/heap/cohorts", json!({"partner_api_key": p.heap_key, "client_secret": secret, "cohort_id": "c\u{0}d", "name": "n", "created_at": "2021-01-21"}), 400, "cohort_id must be a valid string".into()),
        ("/partners/heap/cohorts", json!({"partner_api_key": p.heap_key, "client_secret": secret, "cohort_id": "c", "name": "n\u{0}", "created_at": "2021-01-21"}), 400, "name must be a non-empty string".into()),
        ("/partners/heap/cohorts/users", users_body(&p, &secret, "c\u{0}d", json!([])), 400, "cohort_id must be a valid string".into()),
    ];
    for (path, body, status, message) in cases {
        let a = post_raw(&s, path, body.clone()).await;
        assert_eq!(
            (a.status, a.body["message"].as_str().unwrap_or_default()),
            (status, message.as_str()),
            "{path} {body}"
        );
    }
    // Exactly 1,000 is fine.
    let a = post_raw(
        &s,
        "/partners/heap/cohorts/users",
        users_body(
            &p,
            &secret,
            "c",
            json!([{"user_ids": (0..1000).map(|i| i.to_string()).collect::<Vec<_>>()}]),
        ),
    )
    .await;
    assert_eq!((a.status, a.body["ignored"].clone()), (201, json!(1000)));
    // A disabled partner.
    s.store
        .set_partner_enabled(ws.id, "heap", false)
        .await
        .unwrap();
    let a = post_raw(
        &s,
        "/partners/heap/cohorts/users",
        users_body(&p, &secret, "c", json!([])),
    )
    .await;
    assert_eq!(
        (a.status, a.body["message"].as_str().unwrap()),
        (
            401,
            "Partner not enabled for client with client secret: import-secret-2"
        )
    );
    // Unknown partner and malformed JSON.
    assert_eq!(
        post_raw(&s, "/partners/nobody/cohorts/users", json!({}))
            .await
            .status,
        404
    );
    let a = s
        .send(
            reqwest::Method::POST,
            "/partners/heap/cohorts/users",
            Auth::None,
            Some(b"{nope".to_vec()),
            true,
        )
        .await;
    assert_eq!(a.status, 400);
    // Nothing of all that created a cohort beyond "c".
    assert_eq!(s.store.list_cohorts(ws.id).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_keys_are_confined_to_their_workspace_and_rotate() {
    let s = Server::start().await;
    let a = s.workspace("a").await;
    let b = s.workspace("b").await;
    let key_a = s.admin_key(&a).await;
    let key_b = s.admin_key(&b).await;
    for key in [&key_a, &key_b] {
        assert_eq!(
            s.post(
                "/users/track",
                key,
                json!({"attributes": [{"external_id": "same", "x": 1}]})
            )
            .await
            .status,
            201
        );
    }
    let p = partner_keys(&s).await;
    let secret_b = import_key(&s, &b, "heap", "import-b").await;
    let a_ = post_raw(
        &s,
        "/partners/heap/cohorts/users",
        users_body(&p, &secret_b, "c", json!([{"user_ids": ["same"]}])),
    )
    .await;
    assert_eq!(a_.body["added"], 1);
    assert!(
        s.store.list_cohorts(a.id).await.unwrap().is_empty(),
        "B's key never touches A"
    );
    assert_eq!(s.store.list_cohorts(b.id).await.unwrap()[0].member_count, 1);
    // Rotation: a second key works, invalidating the first takes effect at once.
    let secret_b2 = import_key(&s, &b, "heap", "second-key-b").await;
    assert!(
        s.store
            .invalidate_import_key(b.id, "heap", "import-b", NOW)
            .await
            .unwrap()
    );
    assert_eq!(
        post_raw(
            &s,
            "/partners/heap/cohorts/users",
            users_body(&p, &secret_b, "c", json!([]))
        )
        .await
        .status,
        401
    );
    assert_eq!(
        post_raw(
            &s,
            "/partners/heap/cohorts/users",
            users_body(&p, &secret_b2, "c", json!([]))
        )
        .await
        .status,
        201
    );
    // The management API is scoped by the REST key and needs cohorts.read.
    let list_a = s
        .send(
            reqwest::Method::GET,
            "/api/v1/cohorts",
            Auth::Bearer(&key_a),
            None,
            false,
        )
        .await;
    assert_eq!(list_a.body["cohorts"], json!([]));
    let no_perm = s.key_for(&b, &[Permission::UsersTrack]).await;
    assert_eq!(
        s.send(
            reqwest::Method::GET,
            "/api/v1/cohorts",
            Auth::Bearer(&no_perm),
            None,
            false
        )
        .await
        .status,
        403
    );
    assert_eq!(
        s.send(
            reqwest::Method::GET,
            "/api/v1/cohorts",
            Auth::None,
            None,
            false
        )
        .await
        .status,
        401
    );
}

async fn webhook(
    s: &Server,
    path: &str,
    secret: &str,
    ts: i64,
    body: &Value,
) -> crate::harness::Answer {
    let raw = body.to_string();
    let url = format!("{}{path}", s.base);
    let res = s
        .client
        .post(url)
        .header("heap-hash", sign(secret.as_bytes(), ts, raw.as_bytes()))
        .body(raw)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let body = res.json::<Value>().await.unwrap_or(Value::Null);
    crate::harness::Answer {
        status,
        headers: Default::default(),
        body,
    }
}

fn now_ms() -> i64 {
    tideway_core::clock::Millis(
        i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap(),
    )
    .0
}

/// A server with workspace `w`, its seeded users and a Heap webhook secret: the server, the
/// workspace, the secret and the segment-sync path naming the workspace.
async fn heap_synced_workspace() -> (Server, Workspace, String, String) {
    let s = Server::start().await;
    let ws = s.workspace("w").await;
    let key = s.admin_key(&ws).await;
    seed_users(&s, &key).await;
    let hook = s
        .store
        .heap_webhook(ws.id, Secret::new("whsec-w".into()), None)
        .await
        .unwrap();
    let secret = hook.secret.expose().to_owned();
    let path = format!("/partners/heap/segment-sync/{}", ws.app_group_id);
    (s, ws, secret, path)
}

fn sync_body(task: &str, page: u32, add: &[&str], remove: &[&str]) -> Value {
    json!({"id_token": "7a36ae58-c4b9-11eb-8529-0242ac130003", "action_type": "segment.users.sync",
        "customer_config": {"fields": [{"field_id": "workspace", "field_display_name": "Workspace", "field_type": "identity_mapping", "value": {"id": "workspace_1", "display_name": "Workspace 1"}}]},
        "data": {"segment": {"id": 1338065, "name": "Free Customers"},
            "sync_info": {"page_number": page, "total_pages": 2, "sync_task_id": task},
            "add": add.iter().map(|id| json!({"id": id})).collect::<Vec<_>>(),
            "remove": remove.iter().map(|id| json!({"id": id})).collect::<Vec<_>>()}})
}

/// Disabling Heap for a workspace refuses its segment sync too (403, so Heap retries the page
/// until it is enabled again), and a segment name that is blank or too long never becomes an
/// unusable cohort name: blank keeps the cohort's name (a new cohort is named by its id), long
/// is cut to 255 characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_segment_sync_follows_disable_and_keeps_names_usable() {
    let (s, ws, secret, path) = heap_synced_workspace().await;
    let page = |task: &str, id: u64, name: Value, add: &[&str]| {
        let mut body = sync_body(task, 1, add, &[]);
        body["data"]["segment"] = json!({"id": id, "name": name});
        body
    };
    let sync = |body: Value| {
        let (s, path, secret) = (&s, path.clone(), secret.clone());
        async move { webhook(s, &path, &secret, now_ms(), &body).await }
    };
    let named = |id: &str| {
        let store = s.store.clone();
        let (ws, id) = (ws.id, id.to_owned());
        async move {
            store
                .list_cohorts(ws)
                .await
                .unwrap()
                .into_iter()
                .find(|c| c.cohort_id.as_str() == id)
                .map(|c| (c.name, c.member_count))
        }
    };

    s.store
        .set_partner_enabled(ws.id, "heap", false)
        .await
        .unwrap();
    let refused = sync(page("t1", 7, json!("Seven"), &["u1"])).await;
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (403, Some("Heap is disabled for this workspace")),
    );
    assert_eq!(
        named("7").await,
        None,
        "nothing of a refused page is applied"
    );
    s.store
        .set_partner_enabled(ws.id, "heap", true)
        .await
        .unwrap();
    // Heap retries the page: it applies now.
    let a = sync(page("t1", 7, json!("Seven"), &["u1"])).await;
    assert_eq!((a.status, &a.body["added"]), (200, &json!(1)), "{a:?}");

    for (task, name) in [("t2", json!("")), ("t3", json!("   ")), ("t4", Value::Null)] {
        let a = sync(page(task, 7, name, &["u2"])).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(named("7").await, Some(("Seven".to_owned(), 2)), "{task}");
    }
    let a = sync(page("t5", 8, json!(" "), &["u1"])).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(named("8").await, Some(("8".to_owned(), 1)));
    let long = "é".repeat(300);
    let a = sync(page("t6", 8, json!(long), &[])).await;
    assert_eq!(a.status, 200, "{a:?}");
    let (name, _) = named("8").await.unwrap();
    assert_eq!(name.chars().count(), 255);
    assert!(name.ends_with('…') && name.starts_with("éé"), "{name}");
    // A NUL in the name is dropped, not the page (on every backend alike); a NUL id is an
    // unknown user, ignored.
    let a = sync(page("t7", 9, json!("Ni\u{0}ne"), &["u1", "u\u{0}2"])).await;
    assert_eq!(
        (a.status, &a.body["added"], &a.body["ignored"]),
        (200, &json!(1), &json!(1)),
        "{a:?}"
    );
    assert_eq!(named("9").await, Some(("Nine".to_owned(), 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_segment_sync_is_verified_paged_idempotent_and_drains() {
    let (s, ws, secret, path) = heap_synced_workspace().await;
    let other = s.workspace("other").await;
    s.store
        .heap_webhook(other.id, Secret::new("whsec-other".into()), None)
        .await
        .unwrap();

    let page1 = sync_body("task-1", 1, &["u1", "nobody"], &[]);
    let a = webhook(&s, &path, &secret, now_ms(), &page1).await;
    assert_eq!(
        (a.status, a.body["added"].clone(), a.body["ignored"].clone()),
        (200, json!(1), json!(1)),
        "{a:?}"
    );
    let replay = webhook(&s, &path, &secret, now_ms(), &page1).await;
    assert_eq!(
        (replay.status, replay.body["replayed"].clone()),
        (200, json!(true))
    );
    // Page 2 through the URL without a workspace: the signing secret picks the workspace.
    let page2 = sync_body("task-1", 2, &["u2"], &["u1"]);
    let a = webhook(&s, "/partners/heap/segment-sync", &secret, now_ms(), &page2).await;
    assert_eq!(
        (a.status, a.body["added"].clone(), a.body["removed"].clone()),
        (200, json!(1), json!(1)),
        "{a:?}"
    );
    let cohorts = s.store.list_cohorts(ws.id).await.unwrap();
    assert_eq!(
        (
            cohorts[0].cohort_id.as_str(),
            cohorts[0].name.as_str(),
            cohorts[0].member_count
        ),
        ("1338065", "Free Customers", 1)
    );
    assert!(s.store.list_cohorts(other.id).await.unwrap().is_empty());

    // Wrong secret, tampered body, stale and future timestamps, no header.
    let page3 = sync_body("task-2", 1, &["u1"], &[]);
    assert_eq!(
        webhook(&s, &path, "not-the-secret", now_ms(), &page3)
            .await
            .status,
        403
    );
    let raw = page3.to_string();
    let signed = sign(secret.as_bytes(), now_ms(), raw.as_bytes());
    let tampered = raw.replace("u1", "u2");
    let res = s
        .client
        .post(format!("{}{path}", s.base))
        .header("heap-hash", signed)
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 403);
    assert_eq!(
        webhook(&s, &path, &secret, now_ms() - 61_000, &page3)
            .await
            .status,
        400
    );
    assert_eq!(
        webhook(&s, &path, &secret, now_ms() + 5_000, &page3)
            .await
            .status,
        400
    );
    let res = s
        .client
        .post(format!("{}{path}", s.base))
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 400);
    assert_eq!(
        s.store.list_cohorts(ws.id).await.unwrap()[0].member_count,
        1,
        "no rejected call changed anything"
    );

    // Drain through the alias route; a sync body there is refused.
    let drain = json!({"action_type": "segment.users.drain", "customer_config": {"fields": []}, "data": {"segment": {"id": 1338065, "name": "Free Customers"}}});
    assert_eq!(
        webhook(&s, &format!("{path}/users_sync"), &secret, now_ms(), &drain)
            .await
            .status,
        405
    );
    let a = webhook(
        &s,
        &format!("{path}/users_drain"),
        &secret,
        now_ms(),
        &drain,
    )
    .await;
    assert_eq!((a.status, a.body["removed"].clone()), (200, json!(1)));
    assert_eq!(
        s.store.list_cohorts(ws.id).await.unwrap()[0].member_count,
        0
    );

    // Ids as alias names under a label.
    s.store
        .heap_webhook(
            ws.id,
            Secret::new("unused".into()),
            Some(Some(tideway_core::ids::AliasLabel::parse("email").unwrap())),
        )
        .await
        .unwrap();
    let a = webhook(
        &s,
        &path,
        &secret,
        now_ms(),
        &sync_body("task-3", 1, &["a@b.co", "u1"], &[]),
    )
    .await;
    assert_eq!(
        (a.body["added"].clone(), a.body["ignored"].clone()),
        (json!(1), json!(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_segment_sync_does_not_tell_which_workspaces_exist() {
    let s = Server::start().await;
    let ws = s.workspace("acme").await;
    let _ = s.workspace("no-secret").await;
    s.store
        .heap_webhook(ws.id, Secret::new("whsec-acme".into()), None)
        .await
        .unwrap();
    let body = sync_body("task-1", 1, &["u1"], &[]);
    let raw = body.to_string();
    // For each probe, a known workspace (by name and by app_group_id), a known workspace
    // without a webhook secret, and an unknown name must answer byte for byte alike.
    let targets = [
        "acme".to_owned(),
        ws.app_group_id.clone(),
        "no-secret".to_owned(),
        "surely-not-a-workspace".to_owned(),
    ];
    let probes: [(&str, Option<String>); 4] = [
        ("no header", None),
        ("malformed header", Some("nonsense".to_owned())),
        (
            "stale signature",
            Some(sign(b"whsec-acme", now_ms() - 120_000, raw.as_bytes())),
        ),
        (
            "wrong secret",
            Some(sign(b"guess", now_ms(), raw.as_bytes())),
        ),
    ];
    for (what, header) in &probes {
        let mut answers = Vec::new();
        for target in &targets {
            for suffix in ["", "/users_sync"] {
                let mut req = s
                    .client
                    .post(format!(
                        "{}/partners/heap/segment-sync/{target}{suffix}",
                        s.base
                    ))
                    .body(raw.clone());
                if let Some(h) = header {
                    req = req.header("heap-hash", h);
                }
                let res = req.send().await.unwrap();
                let status = res.status().as_u16();
                answers.push((status, res.text().await.unwrap()));
            }
        }
        assert!(
            answers.iter().all(|a| a == &answers[0]),
            "{what}: answers differ by workspace: {answers:?}"
        );
        assert!(matches!(answers[0].0, 400 | 403), "{what}: {answers:?}");
    }
    assert!(s.store.list_cohorts(ws.id).await.unwrap().is_empty());
}
