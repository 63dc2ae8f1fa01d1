//! Observability of the HTTP edge: one `tracing` span per request, request metrics, the
//! Prometheus recorder, and a guard that turns a handler panic into a JSON 500.
//!
//! The span carries method, route, status, latency and workspace, never a key: keys are
//! secrets and stay out of every log line. Metrics use the matched route template (not the
//! raw path) as label so cardinality stays bounded whatever clients send.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;
use tracing::field::Empty;

use crate::error::ApiError;

pub const HTTP_REQUESTS_TOTAL: &str = "tideway_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "tideway_http_request_duration_seconds";
pub const TRACK_OBJECTS_TOTAL: &str = "tideway_track_objects_total";
pub const RATE_LIMITED_TOTAL: &str = "tideway_rate_limited_total";
pub const AUTH_FAILURES_TOTAL: &str = "tideway_auth_failures_total";

/// Latency buckets, in seconds: sub-millisecond to a few seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes `/metrics`
/// (otherwise they would pile up in memory).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process-wide Prometheus recorder could not be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot install the Prometheus metrics recorder: {0}")]
pub struct MetricsError(String);

/// Installs the process-wide Prometheus recorder and returns its handle. Safe to call any
/// number of times: the first call installs, later calls return the same handle (so tests
/// that start several servers in one process share one recorder). Fails only if some other
/// metrics recorder was installed first.
pub fn install_metrics_recorder() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: OnceLock<Result<PrometheusHandle, MetricsError>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(HTTP_REQUEST_DURATION.to_owned()),
                    &DURATION_BUCKETS,
                )
                .and_then(PrometheusBuilder::install_recorder)
                .map_err(|e| MetricsError(e.to_string()))?;
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("tideway-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    }
                })
                .map_err(|e| MetricsError(format!("cannot start the upkeep thread: {e}")))?;
            Ok(handle)
        })
        .clone()
}

/// The middleware around every route: opens the request span, runs the handler on its own
/// task (so a panic becomes a 500 instead of a dropped connection), records the metrics.
pub async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "http",
        method = %req.method(),
        route = %route,
        status = Empty,
        latency_ms = Empty,
        workspace = Empty,
    );
    let response = match tokio::spawn(next.run(req).instrument(span.clone())).await {
        Ok(response) => response,
        Err(join_error) => {
            span.in_scope(|| {
                tracing::error!(panicked = join_error.is_panic(), "request handler failed")
            });
            ApiError::Internal.into_response()
        }
    };
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    span.record("status", status);
    span.record("latency_ms", elapsed.as_secs_f64() * 1000.0);
    span.in_scope(|| tracing::info!("request"));
    metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route.clone(), "status" => status.to_string()).increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION, "route" => route).record(elapsed.as_secs_f64());
    response
}

/// Names the workspace in the current request span.
pub fn record_workspace(workspace: i64) {
    tracing::Span::current().record("workspace", workspace);
}
