//! Tideway's management API for cohorts (`/api/v1/cohorts…`, `/api/v1/users/{braze_id}/cohorts`),
//! for the dashboard and scripts. REST key permission `cohorts.read`.

use std::collections::HashMap;

use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tideway_core::cohorts::{CohortId, partner};
use tideway_core::ids::BrazeId;
use tideway_core::keys::Permission;

use crate::AppState;
use crate::error::ApiError;
use crate::pipeline::management;

/// Largest page of members.
const MAX_PAGE: usize = 10_000;
const DEFAULT_PAGE: usize = 1_000;

/// `GET /api/v1/cohorts`: every cohort known to the workspace.
#[utoipa::path(
    get,
    path = "/api/v1/cohorts",
    tag = "cohorts",
    summary = "List the workspace's partner cohorts",
    responses((status = 200, description = "`{\"cohorts\": [{partner, cohort_id, name, filter_name, member_count, created_at, updated_at}]}`", body = Object)),
    security(("bearer_auth" = []))
)]
pub async fn list(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CohortsRead,
        req,
        |state, caller, _| async move {
            let cohorts = state.store().list_cohorts(caller.workspace.id).await?;
            let items: Vec<_> = cohorts
                .iter()
                .map(|c| {
                    json!({
                        "partner": c.partner,
                        "cohort_id": c.cohort_id.as_str(),
                        "name": c.name,
                        "filter_name": partner(&c.partner).map(|p| p.filter_name),
                        "member_count": c.member_count,
                        "created_at": c.created_at.to_iso(),
                        "updated_at": c.updated_at.to_iso(),
                    })
                })
                .collect();
            Ok(axum::Json(json!({ "cohorts": items })).into_response())
        },
    )
    .await
}

/// `GET /api/v1/cohorts/{partner}/{cohort_id}/members?cursor=…&limit=…`: members in a stable
/// order, one page at a time; `next_cursor` is null on the last page.
#[utoipa::path(
    get,
    path = "/api/v1/cohorts/{partner}/{cohort_id}/members",
    tag = "cohorts",
    summary = "Page through a cohort's members",
    params(
        ("partner" = String, Path, description = "Partner slug"),
        ("cohort_id" = String, Path, description = "The partner's cohort id"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
        ("limit" = Option<usize>, Query, description = "Page size, 1..=10000 (default 1000)"),
    ),
    responses(
        (status = 200, description = "`{\"members\": [{braze_id, external_id, entered_at}], \"next_cursor\"}`", body = Object),
        (status = 404, description = "No such cohort", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn members(
    State(state): State<AppState>,
    Path((slug, cohort_id)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(state, Permission::CohortsRead, req, |state, caller, _| async move {
        let after: u32 = match params.get("cursor") {
            None => 0,
            Some(c) => c.parse().map_err(|_| ApiError::bad_request("'cursor' must be a next_cursor value from a previous page"))?,
        };
        let limit = match params.get("limit") {
            None => DEFAULT_PAGE,
            Some(l) => l.parse().ok().filter(|l| (1..=MAX_PAGE).contains(l)).ok_or_else(|| ApiError::bad_request("'limit' must be 1..=10000"))?,
        };
        let missing = || ApiError::Missing(format!("no {slug} cohort '{cohort_id}' in this workspace"));
        let id = CohortId::parse(&cohort_id).ok_or_else(missing)?;
        let page = state.store().cohort_members(caller.workspace.id, &slug, id, after, limit).await?.ok_or_else(missing)?;
        let next = (page.len() == limit).then(|| page.last().map(|m| m.user.0.to_string())).flatten();
        let members: Vec<_> = page
            .iter()
            .map(|m| json!({"braze_id": m.braze_id.as_str(), "external_id": m.external_id.as_ref().map(|e| e.as_str()), "entered_at": m.entered_at.to_iso()}))
            .collect();
        Ok(axum::Json(json!({"members": members, "next_cursor": next})).into_response())
    })
    .await
}

/// `GET /api/v1/users/{braze_id}/cohorts`: the cohorts a user is in.
#[utoipa::path(
    get,
    path = "/api/v1/users/{braze_id}/cohorts",
    tag = "cohorts",
    summary = "The cohorts a user belongs to",
    params(("braze_id" = String, Path, description = "24 lowercase hex characters")),
    responses(
        (status = 200, description = "`{\"cohorts\": [{partner, cohort_id, name, entered_at}]}`", body = Object),
        (status = 400, description = "Not a braze_id", body = crate::wire::ErrorBody),
        (status = 404, description = "No such user", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn user_cohorts(
    State(state): State<AppState>,
    Path(braze_id): Path<String>,
    req: Request,
) -> Response {
    management(state, Permission::CohortsRead, req, |state, caller, _| async move {
        let id = BrazeId::parse(&braze_id).map_err(|e| ApiError::bad_request(format!("'braze_id' {e}")))?;
        let cohorts = state
            .store()
            .user_cohorts(caller.workspace.id, id)
            .await?
            .ok_or_else(|| ApiError::Missing(format!("no user '{braze_id}' in this workspace")))?;
        let items: Vec<_> = cohorts
            .iter()
            .map(|c| json!({"partner": c.partner, "cohort_id": c.cohort_id.as_str(), "name": c.name, "entered_at": c.entered_at.to_iso()}))
            .collect();
        Ok(axum::Json(json!({ "cohorts": items })).into_response())
    })
    .await
}
