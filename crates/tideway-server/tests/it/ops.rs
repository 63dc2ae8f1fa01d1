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
