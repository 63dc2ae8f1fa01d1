//! Health, metrics and the OpenAPI document.

use serde_json::json;

use crate::harness::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_ok_when_the_store_does() {
    let s = Server::start().await;
    let a = s.get("/health").await;
    assert_eq!((a.status, &a.body), (200, &json!({"status": "ok"})));
    assert!(
        a.header("x-ratelimit-limit").is_none(),
        "not a REST endpoint"
    );
}

/// On PostgreSQL, a database that answers reads but refuses writes (what an operator's
/// `default_transaction_read_only`, or a standby after a failover, does) is not healthy: every
/// write would be a 503, so `/health` says so and why, and says `ok` again once it takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_read_only_while_postgresql_refuses_writes() {
    let (s, _, key) = Server::with_admin().await;
    let Some(db) = s.database() else {
        return; // SQLite: its writer's refusal is not something a test can arrange from outside.
    };
    let admin = db.client().await;
    let name = db.name();
    // Settings of a database apply to sessions opened after the change: end the pool's.
    let flip = |setting: &'static str| {
        let (admin, name) = (&admin, &name);
        async move {
            admin
                .batch_execute(&format!(
                    "ALTER DATABASE {name} {setting};
                     SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ))
                .await
                .unwrap();
        }
    };
    let health_becomes = |want: &'static str| {
        let s = &s;
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let a = s.get("/health").await;
                if a.body["status"] == want {
                    return a;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "health never {want}: {a:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    flip("SET default_transaction_read_only = on").await;
    let a = health_becomes("read_only").await;
    assert_eq!(
        (a.status, &a.body),
        (
            503,
            &json!({"status": "read_only", "reason": "the database answers but refuses writes"})
        )
    );
    let track = json!({"attributes": [{"external_id": "u1", "x": 1}]});
    assert_eq!(
        s.post("/users/track", &key, track.clone()).await.status,
        503
    );
    let metrics = s.get("/metrics").await.body.as_str().unwrap().to_owned();
    for needle in [
        "tideway_store_pool_connections{state=\"idle\"}",
        "tideway_store_pool_connections{state=\"in_use\"}",
        "tideway_store_errors_total{kind=\"unavailable\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from {metrics}");
    }

    // The operator resets the setting, and nothing ends the sessions opened meanwhile (which
    // keep the read-only default they started with): the node retires them on its own.
    admin
        .batch_execute(&format!(
            "SET default_transaction_read_only = off;
             ALTER DATABASE {name} RESET default_transaction_read_only"
        ))
        .await
        .unwrap();
    let a = health_becomes("ok").await;
    assert_eq!((a.status, &a.body), (200, &json!({"status": "ok"})));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let a = s.post("/users/track", &key, track.clone()).await;
        if a.status == 201 {
            break;
        }
        assert_eq!(a.status, 503, "{a:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "writes never came back: {a:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Every pooled session takes writes again, not only the one that answered.
    for i in 0..20 {
        let track = json!({"attributes": [{"external_id": format!("u{i}"), "x": i}]});
        assert_eq!(s.post("/users/track", &key, track).await.status, 201);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exposed_in_prometheus_text() {
    let (s, _, key) = Server::with_admin().await;
    let body = json!({"attributes": [{"external_id": "u1", "x": 1}, {"x": 2}]});
    assert_eq!(s.post("/users/track", &key, body).await.status, 201);
    assert_eq!(
        s.post("/users/track", "wrong-key", json!({})).await.status,
        401
    );
    let a = s.get("/metrics").await;
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain"))
    );
    let text = a.body.as_str().expect("text").to_owned();
    for needle in [
        "tideway_http_requests_total{",
        "route=\"/users/track\"",
        "status=\"201\"",
        "tideway_http_request_duration_seconds_bucket{",
        "tideway_track_objects_total{",
        "outcome=\"processed\"",
        "outcome=\"rejected\"",
        "tideway_auth_failures_total{reason=\"unknown_key\"}",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(!text.contains(&key), "keys never appear in metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route_with_schemas_and_bearer_auth() {
    let s = Server::start().await;
    let a = s.get("/openapi.json").await;
    assert_eq!(a.status, 200);
    let doc = &a.body;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in [
        "/users/track",
        "/users/identify",
        "/users/alias/new",
        "/users/alias/update",
        "/users/merge",
        "/users/delete",
        "/users/external_ids/rename",
        "/users/external_ids/remove",
        "/users/export/ids",
    ] {
        let op = &doc["paths"][path]["post"];
        assert!(op.is_object(), "{path} is documented");
        assert!(
            op["requestBody"]["content"]["application/json"]["schema"]["$ref"].is_string(),
            "{path} has a request schema"
        );
        assert!(
            op["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].is_string(),
            "{path} has a response schema"
        );
        for status in ["400", "401", "403", "413", "429", "503"] {
            assert!(
                op["responses"][status].is_object(),
                "{path} documents {status}"
            );
        }
        assert_eq!(op["security"][0], json!({"bearer_auth": []}));
    }
    for path in ["/health", "/metrics", "/openapi.json"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path}");
    }
    // Every route of the API (the dashboard's pages aside) is in the document.
    let routes = [
        ("post", "/api/v1/campaigns"),
        ("get", "/api/v1/campaigns/{id}"),
        ("post", "/api/v1/campaigns/{id}/{action}"),
        ("post", "/api/v1/canvases"),
        ("get", "/api/v1/canvases"),
        ("put", "/api/v1/canvases/{id}"),
        ("delete", "/api/v1/canvases/{id}"),
        ("post", "/api/v1/canvases/{id}/{action}"),
        ("get", "/api/v1/cohorts"),
        ("get", "/api/v1/cohorts/{partner}/{cohort_id}/members"),
        ("post", "/api/v1/currents"),
        ("get", "/api/v1/currents/{id}/dead_letters"),
        ("post", "/api/v1/currents/{id}/{action}"),
        ("get", "/api/v1/messaging/settings"),
        ("post", "/api/v1/segments"),
        ("post", "/api/v1/segments/preview"),
        ("get", "/api/v1/segments/{id}/members"),
        ("get", "/api/v1/segments/{id}/size"),
        ("get", "/api/v1/users/{braze_id}/cohorts"),
        ("get", "/api/v1/users/{braze_id}/segments"),
        ("get", "/campaigns/details"),
        ("get", "/campaigns/list"),
        ("post", "/campaigns/trigger/schedule/create"),
        ("post", "/campaigns/trigger/schedule/delete"),
        ("post", "/campaigns/trigger/schedule/update"),
        ("post", "/campaigns/trigger/send"),
        ("get", "/canvas/details"),
        ("get", "/canvas/list"),
        ("post", "/canvas/trigger/schedule/create"),
        ("post", "/canvas/trigger/schedule/delete"),
        ("post", "/canvas/trigger/schedule/update"),
        ("post", "/canvas/trigger/send"),
        ("post", "/messages/schedule/create"),
        ("post", "/messages/schedule/delete"),
        ("post", "/messages/schedule/update"),
        ("post", "/messages/send"),
        ("post", "/partners/{partner}/cohorts"),
        ("post", "/partners/{partner}/cohorts/users"),
        ("get", "/segments/details"),
        ("get", "/segments/list"),
        ("get", "/sends/data_series"),
        ("post", "/sends/id/create"),
    ];
    let missing: Vec<String> = routes
        .iter()
        .filter(|(method, path)| !doc["paths"][path][method].is_object())
        .map(|(method, path)| format!("{method} {path}"))
        .collect();
    assert!(missing.is_empty(), "not documented: {missing:?}");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer_auth"]["scheme"],
        "bearer"
    );
    for schema in [
        "TrackBody",
        "TrackResponse",
        "ExportResponse",
        "ErrorBody",
        "IdentifyBody",
        "DeleteBody",
    ] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
}
