//! The partner cohort-import API (`/partners/{partner}/cohorts`, `…/cohorts/users`): how
//! Heap, Segment, Amplitude and others deliver cohorts (reference/braze-api.md §2).
//!
//! Authentication is in the JSON body, not a header: `partner_api_key` names the partner,
//! `client_secret` (a workspace's data import key) names the workspace. Errors use Braze's
//! documented texts in `{"message": …}` bodies. These endpoints do not count against REST key
//! rate limits; each partner key has its own hourly budget (default 250,000 requests/hour).

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::MAX_DISPLAY_NAME_CHARS;
use tideway_core::cohorts::{
    self, CohortApiError, CohortChange, CohortId, CohortIdentifier, MembershipOutcome, partner,
};
use tideway_core::ids::{AliasName, ExternalId, UserAlias};
use tideway_core::keys::Secret;
use tideway_core::services::Services;
use tideway_core::store::{HeapWebhook, SegmentSyncPage, Workspace};
use tideway_heap::HeapError;
use tideway_heap::webhook::{self, SyncAction};

use crate::AppState;
use crate::error::ApiError;
use crate::pipeline::{now, parse_object};

/// Hourly request budget per partner, in fixed one-hour windows.
#[derive(Debug)]
pub struct PartnerLimiter {
    per_hour: u32,
    windows: Mutex<HashMap<String, (i64, u32)>>,
}

impl PartnerLimiter {
    pub fn new(per_hour: u32) -> Self {
        PartnerLimiter {
            per_hour,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a request; `Err(seconds until the window ends)` when over budget.
    fn check(&self, partner: &str, now_secs: i64) -> Result<(), u64> {
        let window = now_secs - now_secs.rem_euclid(3600);
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = windows.entry(partner.to_owned()).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        if entry.1 >= self.per_hour {
            return Err(u64::try_from(window + 3600 - now_secs).unwrap_or(1).max(1));
        }
        entry.1 += 1;
        Ok(())
    }
}

/// A failed partner request.
pub enum PartnerError {
    Api(CohortApiError),
    Edge(ApiError),
}

impl From<CohortApiError> for PartnerError {
    fn from(e: CohortApiError) -> Self {
        PartnerError::Api(e)
    }
}

impl From<ApiError> for PartnerError {
    fn from(e: ApiError) -> Self {
        PartnerError::Edge(e)
    }
}

impl From<tideway_core::store::StoreError> for PartnerError {
    fn from(e: tideway_core::store::StoreError) -> Self {
        PartnerError::Edge(e.into())
    }
}

impl IntoResponse for PartnerError {
    fn into_response(self) -> Response {
        match self {
            PartnerError::Api(e) => {
                let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
                let message = e.to_string();
                let message = crate::error::clipped(&message, crate::error::ECHO_MAX_CHARS);
                (status, axum::Json(json!({"message": message}))).into_response()
            }
            PartnerError::Edge(e) => e.into_response(),
        }
    }
}

/// Reads the body, checks the partner, both keys and the hourly budget; returns the body and
/// the workspace the import key belongs to.
async fn authorize(
    state: &AppState,
    slug: &str,
    req: Request,
) -> Result<(Map<String, Value>, Workspace), PartnerError> {
    let Some(partner) = partner(slug) else {
        return Err(ApiError::NotFound.into());
    };
    let bytes = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::PayloadTooLarge.into());
        }
        Err(rejection) => return Err(ApiError::malformed(rejection.body_text()).into()),
    };
    let body = parse_object(&bytes)?;
    let creds = cohorts::parse_credentials(&body)?;
    if !state
        .store()
        .check_partner_api_key(partner.slug, Secret::new(creds.partner_api_key))
        .await?
    {
        metrics::counter!("tideway_partner_auth_failures_total", "partner" => partner.slug, "reason" => "partner_api_key").increment(1);
        return Err(CohortApiError::InvalidPartnerKey.into());
    }
    if let Err(retry_after) = state.partner_limiter().check(partner.slug, now().secs()) {
        metrics::counter!("tideway_rate_limited_total", "group" => "partner").increment(1);
        return Err(ApiError::RateLimited {
            retry_after_secs: retry_after,
        }
        .into());
    }
    let hash = Secret::new(creds.client_secret.clone()).hash();
    let owner = state.store().find_import_key(partner.slug, hash).await?;
    let Some(owner) = owner else {
        metrics::counter!("tideway_partner_auth_failures_total", "partner" => partner.slug, "reason" => "client_secret").increment(1);
        return Err(CohortApiError::InvalidClientSecret.into());
    };
    // "Last used" on the dashboard's Heap page; at most one write a minute per key, and a
    // failure to record it does not fail the import.
    if let Err(e) = state
        .store()
        .touch_import_key(partner.slug, hash, now())
        .await
    {
        tracing::warn!(error = %e, "cannot record a data import key's use");
    }
    if !owner.partner_enabled {
        return Err(CohortApiError::PartnerNotEnabled(creds.client_secret).into());
    }
    Ok((body, owner.workspace))
}

fn success(extra: Value) -> Response {
    let mut body = json!({"message": "success"});
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

fn membership_body(out: &MembershipOutcome) -> Value {
    json!({"matched": out.matched, "ignored": out.ignored, "added": out.added, "removed": out.removed})
}

/// `POST /partners/{partner}/cohorts`: create or rename a cohort (idempotent).
#[utoipa::path(
    post,
    path = "/partners/{partner}/cohorts",
    tag = "partners",
    summary = "Create or rename a partner cohort",
    params(("partner" = String, Path, description = "Partner slug: heap, amplitude, mixpanel, segment, census, hightouch")),
    request_body(content = crate::wire::CohortNameBody, description = "Keys in the body; `created_at` ISO-8601"),
    responses(
        (status = 201, description = "`{\"message\":\"success\"}`", body = crate::wire::SuccessResponse),
        (status = 400, description = "`cohort_id must be a valid string` · `name must be a non-empty string` · `created_at must be a valid time as an ISO-8601 string`", body = crate::wire::ErrorBody),
        (status = 401, description = "`Invalid Partner API key` · `Invalid client secret` · `Partner not enabled for client with client secret: <secret>`", body = crate::wire::ErrorBody),
    )
)]
pub async fn cohort_name(
    State(state): State<AppState>,
    Path(slug): Path<String>,
    req: Request,
) -> Result<Response, PartnerError> {
    let (body, workspace) = authorize(&state, &slug, req).await?;
    let upsert = cohorts::parse_upsert(&body)?;
    state
        .store()
        .upsert_cohort(&workspace, &slug, upsert, now())
        .await?;
    Ok(success(json!({})))
}

/// `POST /partners/{partner}/cohorts/users`: membership deltas.
#[utoipa::path(
    post,
    path = "/partners/{partner}/cohorts/users",
    tag = "partners",
    summary = "Add users to or remove users from a partner cohort",
    params(("partner" = String, Path, description = "Partner slug")),
    request_body(content = crate::wire::CohortUsersBody, description = "At most 1,000 identifiers in all"),
    responses(
        (status = 201, description = "`{\"message\":\"success\",\"matched\",\"ignored\",\"added\",\"removed\"}`", body = crate::wire::CohortUsersResponse),
        (status = 400, description = "`cohort_id must be a valid string` · `cohort_changes must be an array of objects …` · `Only 1,000 user_ids, device_ids, and aliases are allowed per request`", body = crate::wire::ErrorBody),
        (status = 401, description = "As for /cohorts", body = crate::wire::ErrorBody),
    )
)]
pub async fn cohort_users(
    State(state): State<AppState>,
    Path(slug): Path<String>,
    req: Request,
) -> Result<Response, PartnerError> {
    let (body, workspace) = authorize(&state, &slug, req).await?;
    let cohort_id = cohorts::parse_cohort_id(&body)?;
    let changes = cohorts::parse_changes(&body)?;
    let out = state
        .store()
        .apply_cohort_changes(&workspace, &slug, cohort_id, changes, now())
        .await?;
    // `authorize` has checked the slug names a known partner.
    let label = partner(&slug).map_or("unknown", |p| p.slug);
    for (outcome, count) in [("matched", out.matched), ("ignored", out.ignored)] {
        metrics::counter!("tideway_cohort_identifiers_total", "partner" => label, "outcome" => outcome)
            .increment(count as u64);
    }
    Ok(success(membership_body(&out)))
}

/// A webhook error in Heap's reference receiver's shape: `{"error": …}`.
fn webhook_error(status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let message = crate::error::clipped(message, crate::error::ECHO_MAX_CHARS);
    (status, axum::Json(json!({"error": message}))).into_response()
}

/// The cohort name a Heap segment's name gives: none if it is blank (the cohort keeps its name,
/// or a new one is named by its id, as when Heap sends no name), cut to
/// [`MAX_DISPLAY_NAME_CHARS`] if longer. Heap's page is applied either way: refusing it over a
/// display name would lose its members.
fn heap_cohort_name(name: Option<&str>) -> Option<String> {
    // A NUL character means nothing in a name and PostgreSQL's text cannot hold one: it is
    // dropped rather than the page refused (Heap would send it again for ever).
    let name: String = name?.chars().filter(|c| *c != '\0').collect();
    if name.trim().is_empty() {
        return None;
    }
    Some(crate::error::clipped(&name, MAX_DISPLAY_NAME_CHARS - 1).into_owned())
}

/// Verifies, parses and applies one Heap segment-sync call for the webhooks in `candidates`
/// (the workspace whose secret signed it wins). `expected` is the action an alias route
/// (`…/users_sync`, `…/users_drain`) admits.
async fn segment_sync(
    state: &AppState,
    candidates: Vec<HeapWebhook>,
    named_workspace: bool,
    expected: Option<SyncAction>,
    req: Request,
) -> Response {
    let header = req
        .headers()
        .get(webhook::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = match Bytes::from_request(req, &()).await {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return ApiError::PayloadTooLarge.into_response();
        }
        Err(rejection) => return webhook_error(400, &rejection.body_text()),
    };
    if candidates.is_empty() && !named_workspace {
        tracing::error!(
            "a Heap segment-sync call arrived but no workspace has a webhook secret (tideway partners heap-webhook-secret)"
        );
        return webhook_error(500, "webhook secret not configured");
    }
    let now_ms = now().0;
    let mut failure = HeapError::BadSignature;
    if candidates.is_empty() {
        // A URL naming an unknown workspace (or one without a secret) must answer exactly as a
        // known workspace with a wrong signature does, or workspace names could be enumerated
        // without a key: run the same header checks, and never accept the HMAC.
        if let Err(e) = webhook::verify_signature(header.as_deref(), &bytes, &[], now_ms)
            && e != HeapError::BadSignature
        {
            failure = e;
        }
    }
    let mut signer = None;
    for hook in candidates {
        match webhook::verify_signature(
            header.as_deref(),
            &bytes,
            hook.secret.expose().as_bytes(),
            now_ms,
        ) {
            Ok(_) => {
                signer = Some(hook);
                break;
            }
            // Only a bad HMAC depends on the secret; any other failure is the same for all.
            Err(HeapError::BadSignature) => continue,
            Err(e) => {
                failure = e;
                break;
            }
        }
    }
    let Some(hook) = signer else {
        metrics::counter!("tideway_partner_auth_failures_total", "partner" => "heap", "reason" => "heap_hash").increment(1);
        return webhook_error(failure.http_status(), &failure.to_string());
    };
    let request = match webhook::parse_sync(&bytes) {
        Ok(r) => r,
        Err(e) => return webhook_error(e.http_status(), &e.to_string()),
    };
    // Checked after the signature, so a disabled workspace answers a stranger exactly as an
    // enabled one does. A 403 makes Heap retry the page: enabled again soon, nothing is lost.
    match state
        .store()
        .partner_enabled(hook.workspace.id, "heap")
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return webhook_error(403, "Heap is disabled for this workspace");
        }
        Err(e) => return ApiError::from(e).into_response(),
    }
    if expected.is_some_and(|a| a != request.action) {
        return webhook_error(
            405,
            &format!(
                "this URL accepts only {}",
                expected.map_or("", SyncAction::as_str)
            ),
        );
    }
    let to_identifier = |id: &str| -> CohortIdentifier {
        match &hook.alias_label {
            None => {
                ExternalId::parse(id).map_or(CohortIdentifier::Unusable, CohortIdentifier::External)
            }
            Some(label) => AliasName::parse(id).map_or(CohortIdentifier::Unusable, |name| {
                CohortIdentifier::Alias(UserAlias {
                    label: label.clone(),
                    name,
                })
            }),
        }
    };
    let Some(cohort_id) = CohortId::parse(&request.segment.cohort_id()) else {
        return webhook_error(400, "Invalid data format: data.segment.id");
    };
    let page = SegmentSyncPage {
        cohort_id,
        name: heap_cohort_name(request.segment.name.as_deref()),
        page_key: request
            .page
            .as_ref()
            .map(|p| (p.sync_task_id.clone(), i64::from(p.page_number))),
        drain: request.action == SyncAction::Drain,
        changes: vec![
            CohortChange {
                identifiers: request.add.iter().map(|id| to_identifier(id)).collect(),
                remove: false,
            },
            CohortChange {
                identifiers: request.remove.iter().map(|id| to_identifier(id)).collect(),
                remove: true,
            },
        ],
    };
    tracing::info!(
        workspace = hook.workspace.id.0,
        id_token = request.id_token.as_deref().unwrap_or(""),
        segment = request.segment.id,
        action = request.action.as_str(),
        "Heap segment sync"
    );
    match state
        .store()
        .apply_segment_sync(&hook.workspace, "heap", page, now())
        .await
    {
        Ok(out) => {
            let mut body = membership_body(&out.membership);
            body["message"] = json!("success");
            body["replayed"] = json!(out.replayed);
            body["skipped"] = json!(request.skipped);
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        // Never acknowledge what was not recorded: Heap retries on 5xx.
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn webhooks_for(
    state: &AppState,
    workspace: Option<&str>,
) -> Result<Vec<HeapWebhook>, Response> {
    let all = state
        .store()
        .heap_webhooks()
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    Ok(match workspace {
        None => all,
        // An unknown workspace gives no candidates; the caller then answers as for a bad
        // signature, so the answer never tells which workspace names exist.
        Some(w) => all
            .into_iter()
            .filter(|h| h.workspace.app_group_id == w || h.workspace.name == w)
            .collect(),
    })
}

/// `POST /partners/heap/segment-sync`: Heap's `segment.users.sync` / `segment.users.drain`
/// webhook; the workspace is the one whose secret signed the call.
#[utoipa::path(
    post,
    path = "/partners/heap/segment-sync",
    tag = "partners",
    summary = "Heap segment-sync webhook (signed with Heap-Hash)",
    params(("Heap-Hash" = String, Header, description = "ts:<ms>,hmac:<Base64(HMAC-SHA256(secret, ts + body))>")),
    request_body(content = Object, description = "Heap's WebhookSyncRequest"),
    responses(
        (status = 200, description = "Recorded (or a replayed page, acknowledged without applying it again)", body = Object),
        (status = 400, description = "Missing, malformed or stale Heap-Hash; unreadable body", body = Object),
        (status = 403, description = "`{\"error\":\"Invalid signature\"}`", body = Object),
        (status = 500, description = "No webhook secret configured", body = Object),
    )
)]
pub async fn heap_segment_sync(State(state): State<AppState>, req: Request) -> Response {
    sync_for(&state, None, None, req).await
}

/// `POST /partners/heap/segment-sync/{workspace}` (app_group_id or name), plus the
/// reference receiver's `…/users_sync` and `…/users_drain` aliases.
pub async fn heap_segment_sync_workspace(
    State(state): State<AppState>,
    Path(workspace): Path<String>,
    req: Request,
) -> Response {
    sync_for(&state, Some(&workspace), None, req).await
}

pub async fn heap_users_sync(
    State(state): State<AppState>,
    Path(workspace): Path<String>,
    req: Request,
) -> Response {
    sync_for(&state, Some(&workspace), Some(SyncAction::Sync), req).await
}

pub async fn heap_users_drain(
    State(state): State<AppState>,
    Path(workspace): Path<String>,
    req: Request,
) -> Response {
    sync_for(&state, Some(&workspace), Some(SyncAction::Drain), req).await
}

/// Finds the candidate webhooks (one workspace, or all) and runs the call against them.
async fn sync_for(
    state: &AppState,
    workspace: Option<&str>,
    expected: Option<SyncAction>,
    req: Request,
) -> Response {
    match webhooks_for(state, workspace).await {
        Ok(hooks) => segment_sync(state, hooks, workspace.is_some(), expected, req).await,
        Err(response) => response,
    }
}
