//! Operational routes without authentication: health, Prometheus metrics, the OpenAPI
//! document; and the JSON answers for unknown routes, wrong methods and requests axum's own
//! extractors refuse.
//!
//! `/health` is readiness: it asks the store whether it takes writes (a cheap query on
//! PostgreSQL, an empty job through SQLite's writer), so a load balancer takes a node whose
//! database is gone out of rotation, and a monitor sees a database that answers reads but
//! refuses every write (read-only, a standby after a failover), which a read would not show.
//!
//! [`with_draining`] is the node's last seconds: once [`Draining::start`] is called (on
//! SIGTERM), `/health` answers 503 `draining`, so a load balancer takes the node out of
//! rotation, while every other request is still served, each answer with `Connection: close`
//! so that keep-alive clients open their next connection elsewhere rather than find this one
//! closed under them when the node stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};

use crate::AppState;
use crate::error::ApiError;
use crate::wire::HealthResponse;

/// Readiness: the server runs and its database takes writes.
#[utoipa::path(
    get,
    path = "/health",
    tag = "ops",
    responses(
        (status = 200, description = "The server runs and its database takes writes", body = HealthResponse),
        (status = 503, description = "The database does not answer or refuses the connection (`unavailable`), or refuses writes (`read_only`), or the node is shutting down (`draining`)", body = HealthResponse),
    )
)]
pub async fn health(State(state): State<AppState>) -> Response {
    let (status, reason) = match state.store().accepts_writes().await {
        Ok(true) => {
            return (
                StatusCode::OK,
                Json(HealthResponse {
                    status: "ok".to_owned(),
                    reason: None,
                }),
            )
                .into_response();
        }
        Ok(false) => {
            tracing::warn!("health check: the database refuses writes");
            ("read_only", "the database answers but refuses writes")
        }
        Err(error) => {
            tracing::warn!(%error, "health check: the database cannot be used");
            (
                "unavailable",
                "the database does not answer or refuses the connection",
            )
        }
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(HealthResponse {
            status: status.to_owned(),
            reason: Some(reason.to_owned()),
        }),
    )
        .into_response()
}

/// Whether the node is draining before it stops; clones share the one flag.
#[derive(Debug, Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    /// From now on `/health` answers 503 `draining` and every answer closes its connection.
    pub fn start(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// `router` with the draining behaviour of the module documentation, outermost so that every
/// answer (a 404, an authentication failure) closes its connection while draining.
pub fn with_draining(router: Router, draining: Draining) -> Router {
    router.layer(axum::middleware::from_fn(
        move |request: Request, next: Next| {
            let draining = draining.clone();
            async move {
                let mut response = if draining.is_on() && request.uri().path() == "/health" {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(HealthResponse {
                            status: "draining".to_owned(),
                            reason: Some("the node is shutting down".to_owned()),
                        }),
                    )
                        .into_response()
                } else {
                    next.run(request).await
                };
                // Judged when the answer is ready: a request that was in progress when the
                // drain began closes its connection too.
                if draining.is_on() {
                    response
                        .headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                response
            }
        },
    ))
}

/// Prometheus text exposition of every metric of the process.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain; version=0.0.4", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics().render();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// This API's OpenAPI 3 document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "OpenAPI 3 document", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document_json(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Largest plain-text rejection body [`json_rejections`] reads (axum's are one line).
const REJECTION_READ_LIMIT: usize = 64 * 1024;

/// Refuses a URL whose path or query holds an encoded NUL (`%00`) with a 400, before any
/// handler reads it: no id or parameter means one, and PostgreSQL's text cannot hold one, so
/// every backend answers alike (SQLite would look the id up and find nothing).
pub async fn refuse_nul_in_url(req: Request, next: Next) -> Response {
    let uri = req.uri();
    let nul = |s: &str| s.contains("%00");
    if nul(uri.path()) || uri.query().is_some_and(nul) {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"message": "the URL must not contain a NUL character (%00)"})),
        )
            .into_response();
    }
    next.run(req).await
}

/// Renders the plain-text 4xx answers of axum's extractors (a path segment that is not UTF-8,
/// a query string that does not parse) as `{"message": …}`, so every API error is JSON. The
/// dashboard keeps its own answers; everything else already answers JSON and passes untouched.
pub async fn json_rejections(req: Request, next: Next) -> Response {
    let dashboard = req.uri().path().starts_with("/dashboard");
    let response = next.run(req).await;
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"));
    if dashboard || !response.status().is_client_error() || !plain {
        return response;
    }
    let status = response.status();
    let text = axum::body::to_bytes(response.into_body(), REJECTION_READ_LIMIT)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = crate::error::clipped(text.trim(), crate::error::ECHO_MAX_CHARS);
    (status, Json(serde_json::json!({"message": message}))).into_response()
}
