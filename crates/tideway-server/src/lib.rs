//! Tideway's HTTP edge: the Braze-compatible REST API (`/users/*`), its authentication, rate
//! limits and error bodies, plus the operational routes (`/health`, `/metrics`,
//! `/openapi.json`).
//!
//! Invariant: this is the only crate that knows HTTP. Handlers parse wire JSON into the domain
//! types of `tideway-core` (parse, don't validate), call one `Store` operation, and render the
//! outcome in Braze's response shapes. Wire types are not domain types: the structs in
//! [`wire`] exist for the OpenAPI document and for rendering responses, never below this crate.
//!
//! Request path: `observe` (span, metrics, panic guard) → router → `pipeline` (key
//! extraction, body limit, auth, rate limit, permission, JSON parsing) → `users` (one
//! function per endpoint) → `Store`. [`serve`] (`listener`) is the accept loop around it: the
//! connection cap and the idle, header and body timeouts. [`dashboard`] is the signed-in HTML
//! dashboard under `/dashboard`.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tideway_core::store::Store;

mod audiences;
mod campaigns_api;
mod canvases_api;
mod cohorts_api;
mod connected_audience;
mod currents_api;
pub mod dashboard;
mod error;
mod fields;
mod listener;
mod messaging_api;
mod observe;
pub mod openapi;
mod ops;
mod partners;
mod pipeline;
mod rate_limit;
mod schedule_api;
mod segment_service;
mod segments_api;
mod tracking_api;
mod users;
pub mod wire;

pub use currents_api::CurrentsApi;
pub use error::{ApiError, ECHO_MAX_CHARS};
pub use listener::{
    ConnectionLimits, FD_HEADROOM, HTTP_CONNECTIONS_OPEN, HTTP_CONNECTIONS_REFUSED_TOTAL,
    HTTP_CONNECTIONS_TIMED_OUT_TOTAL, default_max_connections, max_connections_for,
    open_file_limit, serve,
};
pub use messaging_api::MessagingApi;
pub use observe::{MetricsError, install_metrics_recorder};
pub use ops::{Draining, with_draining};
pub use rate_limit::RateLimits;

/// Settings of the HTTP edge. `Default` gives Braze's documented limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest request body accepted; larger ones get `413 Payload Too Large`. Default 4 MiB.
    pub max_body_bytes: usize,
    /// Per-key request limits per endpoint group.
    pub rate_limits: RateLimits,
    /// Longest array custom attribute (Braze's default is 25). Enforced by the store, which
    /// applies the profile rules; kept here so one config struct describes the edge's limits.
    pub max_array_len: usize,
    /// The dashboard's settings.
    pub dashboard: dashboard::DashboardConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 4 * 1024 * 1024,
            rate_limits: RateLimits::default(),
            max_array_len: 25,
            dashboard: dashboard::DashboardConfig::default(),
        }
    }
}

/// Everything a handler needs; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    config: ServerConfig,
    metrics: PrometheusHandle,
    limiter: rate_limit::RateLimiter,
    partner_limiter: partners::PartnerLimiter,
    segments: Arc<segment_service::SegmentService>,
    currents: Option<CurrentsApi>,
    messaging: Option<MessagingApi>,
    /// The dashboard's clock (sessions, sign-in windows, key times).
    clock: tideway_currents::Clock,
}

/// What the messaging engine runs with: its channels, the tracking key and public URLs, its
/// clock and settings. [`app_with_messaging`] starts the engine over the app's own segment
/// indexes; it stops when the app is dropped.
pub struct MessagingOptions {
    pub channels: tideway_messaging::dispatcher::Channels,
    pub tracking: tideway_messaging::dispatcher::Tracking,
    pub clock: tideway_currents::Clock,
    pub engine: tideway_messaging::engine::EngineConfig,
}

impl AppState {
    pub fn new(store: Arc<dyn Store>, config: ServerConfig, metrics: PrometheusHandle) -> Self {
        Self::with_segment_snapshots(store, config, metrics, None)
    }

    /// [`AppState::new`], keeping each workspace's segment index as a snapshot file in
    /// `segment_snapshots` (loaded at start, written periodically and at shutdown).
    pub fn with_segment_snapshots(
        store: Arc<dyn Store>,
        config: ServerConfig,
        metrics: PrometheusHandle,
        segment_snapshots: Option<std::path::PathBuf>,
    ) -> Self {
        let limiter = rate_limit::RateLimiter::new(config.rate_limits.clone());
        let partner_limiter = partners::PartnerLimiter::new(config.rate_limits.partner_per_hour);
        let segments =
            segment_service::SegmentService::with_snapshots(Arc::clone(&store), segment_snapshots);
        segment_service::SegmentService::spawn_preload(&segments);
        AppState {
            inner: Arc::new(Inner {
                store,
                config,
                metrics,
                limiter,
                partner_limiter,
                segments,
                currents: None,
                messaging: None,
                clock: tideway_currents::Clock::system(),
            }),
        }
    }

    /// Held by every segment create, update and delete from its `in_segment` checks to its
    /// write, so two concurrent changes cannot each pass the checks and together save a cycle
    /// or a reference to a deleted segment: the store's lock, shared by every node on its
    /// database ([`tideway_core::store::SegmentStore::lock_segment_definitions`]).
    pub(crate) async fn segment_definitions(
        &self,
        workspace: tideway_core::ids::WorkspaceId,
    ) -> Result<tideway_core::store::DefinitionsLock, tideway_core::store::StoreError> {
        self.inner.store.lock_segment_definitions(workspace).await
    }

    pub fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    pub(crate) fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }

    pub(crate) fn limiter(&self) -> &rate_limit::RateLimiter {
        &self.inner.limiter
    }

    pub(crate) fn segments(&self) -> &segment_service::SegmentService {
        &self.inner.segments
    }

    /// The Currents API's storage and exporter (absent: `/api/v1/currents` answers 503).
    pub(crate) fn currents(&self) -> Option<&CurrentsApi> {
        self.inner.currents.as_ref()
    }

    /// The messaging engine's handles (absent: the messaging routes answer 503).
    pub(crate) fn messaging(&self) -> Option<&MessagingApi> {
        self.inner.messaging.as_ref()
    }

    /// Now, for the dashboard.
    pub(crate) fn dashboard_now(&self) -> tideway_core::clock::Millis {
        self.inner.clock.now()
    }

    pub(crate) fn partner_limiter(&self) -> &partners::PartnerLimiter {
        &self.inner.partner_limiter
    }
}

/// Audiences answered by a fresh segment service of its own over `store` (no snapshots): for
/// a messaging engine started beside a server's, e.g. a second node in a test.
pub fn standalone_audiences(
    store: Arc<dyn Store>,
) -> Arc<dyn tideway_messaging::audience::Audiences> {
    let segments = segment_service::SegmentService::with_snapshots(Arc::clone(&store), None);
    Arc::new(audiences::SegmentAudiences::new(store, segments))
}

/// The whole HTTP application, state applied. Serve it with [`serve`] (which adds the
/// connection limits), or else with `into_make_service_with_connect_info::<SocketAddr>()`: the
/// client address is needed for key IP allowlists (a key with an allowlist is refused when the
/// address is unknown).
pub fn app(store: Arc<dyn Store>, config: ServerConfig, metrics: PrometheusHandle) -> Router {
    app_with_currents(store, config, metrics, None)
}

/// [`app`] with the Currents management API backed by a running exporter.
pub fn app_with_currents(
    store: Arc<dyn Store>,
    config: ServerConfig,
    metrics: PrometheusHandle,
    currents: Option<CurrentsApi>,
) -> Router {
    app_with_options(store, config, metrics, currents, None)
}

/// [`app_with_currents`], keeping segment indexes as snapshots in `segment_snapshots`
/// (`tideway serve` passes `<data-dir>/segment-index`).
pub fn app_with_options(
    store: Arc<dyn Store>,
    config: ServerConfig,
    metrics: PrometheusHandle,
    currents: Option<CurrentsApi>,
    segment_snapshots: Option<std::path::PathBuf>,
) -> Router {
    app_with_messaging(store, config, metrics, currents, segment_snapshots, None)
}

/// [`app_with_options`] with the messaging engine running (campaigns, API sends, tracking).
pub fn app_with_messaging(
    store: Arc<dyn Store>,
    config: ServerConfig,
    metrics: PrometheusHandle,
    currents: Option<CurrentsApi>,
    segment_snapshots: Option<std::path::PathBuf>,
    messaging: Option<MessagingOptions>,
) -> Router {
    let max_body = config.max_body_bytes;
    let mut state =
        AppState::with_segment_snapshots(Arc::clone(&store), config, metrics, segment_snapshots);
    let messaging = messaging.map(|options| {
        let audiences: Arc<dyn tideway_messaging::audience::Audiences> = Arc::new(
            audiences::SegmentAudiences::new(Arc::clone(&store), Arc::clone(&state.inner.segments)),
        );
        let engine = tideway_messaging::engine::Engine::start(
            store,
            Arc::clone(&audiences),
            options.channels,
            Some(options.tracking.clone()),
            options.clock,
            options.engine,
        );
        MessagingApi {
            audiences,
            engine: Arc::new(engine),
            tracking: options.tracking,
        }
    });
    if let Some(inner) = Arc::get_mut(&mut state.inner) {
        inner.currents = currents;
        inner.messaging = messaging;
    }
    Router::new()
        .route("/users/track", post(users::users_track))
        .route("/users/identify", post(users::users_identify))
        .route("/users/alias/new", post(users::users_alias_new))
        .route("/users/alias/update", post(users::users_alias_update))
        .route("/users/merge", post(users::users_merge))
        .route("/users/delete", post(users::users_delete))
        .route(
            "/users/external_ids/rename",
            post(users::users_external_ids_rename),
        )
        .route(
            "/users/external_ids/remove",
            post(users::users_external_ids_remove),
        )
        .route("/users/export/ids", post(users::users_export_ids))
        .route("/partners/{partner}/cohorts", post(partners::cohort_name))
        .route(
            "/partners/{partner}/cohorts/users",
            post(partners::cohort_users),
        )
        .route(
            "/partners/heap/segment-sync",
            post(partners::heap_segment_sync),
        )
        .route(
            "/partners/heap/segment-sync/{workspace}",
            post(partners::heap_segment_sync_workspace),
        )
        .route(
            "/partners/heap/segment-sync/{workspace}/users_sync",
            post(partners::heap_users_sync),
        )
        .route(
            "/partners/heap/segment-sync/{workspace}/users_drain",
            post(partners::heap_users_drain),
        )
        .route(
            "/api/v1/currents",
            get(currents_api::list).post(currents_api::create),
        )
        .route(
            "/api/v1/currents/{id}",
            get(currents_api::get_one)
                .put(currents_api::update)
                .delete(currents_api::delete),
        )
        .route(
            "/api/v1/currents/{id}/dead_letters",
            get(currents_api::dead_letters),
        )
        .route("/api/v1/currents/{id}/{action}", post(currents_api::action))
        .route("/api/v1/cohorts", get(cohorts_api::list))
        .route(
            "/api/v1/cohorts/{partner}/{cohort_id}/members",
            get(cohorts_api::members),
        )
        .route(
            "/api/v1/users/{braze_id}/cohorts",
            get(cohorts_api::user_cohorts),
        )
        .route(
            "/api/v1/segments",
            get(segments_api::list).post(segments_api::create),
        )
        .route("/api/v1/segments/preview", post(segments_api::preview))
        .route(
            "/api/v1/segments/{id}",
            get(segments_api::get_one)
                .put(segments_api::update)
                .delete(segments_api::delete),
        )
        .route("/api/v1/segments/{id}/size", get(segments_api::size))
        .route("/api/v1/segments/{id}/members", get(segments_api::members))
        .route(
            "/api/v1/users/{braze_id}/segments",
            get(segments_api::user_segments),
        )
        .route(
            "/api/v1/campaigns",
            get(campaigns_api::list).post(campaigns_api::create),
        )
        .route(
            "/api/v1/campaigns/{id}",
            get(campaigns_api::get_one)
                .put(campaigns_api::update)
                .delete(campaigns_api::delete),
        )
        .route(
            "/api/v1/campaigns/{id}/{action}",
            post(campaigns_api::action),
        )
        .route(
            "/api/v1/messaging/settings",
            get(campaigns_api::settings).put(campaigns_api::save_settings),
        )
        .route(
            "/api/v1/canvases",
            get(canvases_api::list).post(canvases_api::create),
        )
        .route(
            "/api/v1/canvases/{id}",
            get(canvases_api::get_one)
                .put(canvases_api::update)
                .delete(canvases_api::delete),
        )
        .route("/api/v1/canvases/{id}/{action}", post(canvases_api::action))
        .route("/canvas/trigger/send", post(canvases_api::trigger_send))
        .route(
            "/canvas/trigger/schedule/create",
            post(canvases_api::trigger_schedule_create),
        )
        .route(
            "/canvas/trigger/schedule/update",
            post(canvases_api::trigger_schedule_update),
        )
        .route(
            "/canvas/trigger/schedule/delete",
            post(canvases_api::trigger_schedule_delete),
        )
        .route("/canvas/list", get(canvases_api::braze_list))
        .route("/canvas/details", get(canvases_api::braze_details))
        .route("/campaigns/trigger/send", post(messaging_api::trigger_send))
        .route("/messages/send", post(messaging_api::messages_send))
        .route(
            "/campaigns/trigger/schedule/create",
            post(schedule_api::trigger_schedule_create),
        )
        .route(
            "/campaigns/trigger/schedule/update",
            post(schedule_api::trigger_schedule_update),
        )
        .route(
            "/campaigns/trigger/schedule/delete",
            post(schedule_api::trigger_schedule_delete),
        )
        .route(
            "/messages/schedule/create",
            post(schedule_api::messages_schedule_create),
        )
        .route(
            "/messages/schedule/update",
            post(schedule_api::messages_schedule_update),
        )
        .route(
            "/messages/schedule/delete",
            post(schedule_api::messages_schedule_delete),
        )
        .route("/sends/id/create", post(schedule_api::send_id_create))
        .route("/sends/data_series", get(schedule_api::sends_data_series))
        .route(
            "/messages/scheduled_broadcasts",
            get(schedule_api::scheduled_broadcasts),
        )
        .route("/campaigns/list", get(messaging_api::campaigns_list))
        .route("/campaigns/details", get(messaging_api::campaigns_details))
        .route("/t/o/{token}", get(tracking_api::open))
        .route("/t/c/{token}", get(tracking_api::click))
        .route(
            "/t/u/{token}",
            get(tracking_api::unsubscribe_page).post(tracking_api::unsubscribe),
        )
        .route("/segments/list", get(segments_api::braze_list))
        .route("/segments/details", get(segments_api::braze_details))
        .merge(dashboard::router(state.clone()))
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi_json))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn(ops::json_rejections))
        .layer(axum::middleware::from_fn(ops::refuse_nul_in_url))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(listener::enforce_body_deadline))
        .layer(axum::middleware::from_fn_with_state(
            max_body,
            listener::refuse_declared_oversize,
        ))
        .layer(axum::middleware::from_fn(observe::observe))
        .with_state(state)
}
