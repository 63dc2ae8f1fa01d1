//! Segments over HTTP: Tideway's management API (`/api/v1/segments…`, REST key permissions
//! `segments.manage` to change, `segments.read` to read and evaluate) and Braze's read
//! endpoints `GET /segments/list` (`segments.list`) and `GET /segments/details`
//! (`segments.details`).
//!
//! Filters arrive in their wire form and are parsed and validated against the workspace (its
//! cohorts and its other segments) with `tideway_segment::Filter::parse`; a rejected filter is a
//! 400 whose message is `"<JSON path>: <what is wrong>"`. Sizes and members come from the
//! [`crate::segment_service`], which waits (≤ 1 s) for its index to cover everything the store
//! acknowledged before the request, then evaluates off the async threads.

use std::collections::{BTreeSet, HashMap};

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::MAX_DISPLAY_NAME_CHARS;
use tideway_core::ids::BrazeId;
use tideway_core::keys::Permission;
use tideway_core::segments::{Segment, segment_lookup};
use tideway_core::store::Workspace;
use tideway_segment::{Filter, ValidationContext};

use crate::AppState;
use crate::error::ApiError;
use crate::pipeline::{management, now, read_json};

const MAX_PAGE: usize = 10_000;
const DEFAULT_PAGE: usize = 1_000;

fn segment_json(s: &Segment) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "filter": s.filter,
        "created_at": s.created_at.to_iso(),
        "updated_at": s.updated_at.to_iso(),
    })
}

fn missing(id: &str) -> ApiError {
    ApiError::Missing(format!("no segment '{id}' in this workspace"))
}

/// Parses and validates `value` as a filter of `workspace` (for the segment `segment_id` when
/// saving one).
pub(crate) async fn parse_filter(
    state: &AppState,
    workspace: &Workspace,
    value: &Value,
    segment_id: Option<&str>,
) -> Result<Filter, ApiError> {
    let filter = Filter::from_json(value).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let cohorts: BTreeSet<(String, String)> = state
        .store()
        .list_cohorts(workspace.id)
        .await?
        .into_iter()
        .map(|c| (c.partner, c.cohort_id.as_str().to_owned()))
        .collect();
    let segments = segment_lookup(&state.store().list_segments(workspace.id).await?);
    let ctx = ValidationContext {
        cohorts: &cohorts,
        segments: &segments,
        segment_id,
    };
    filter
        .validate(&ctx)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(filter)
}

fn name_field(body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match body.get("name") {
        None => Ok(None),
        Some(Value::String(s)) if s.chars().count() > MAX_DISPLAY_NAME_CHARS => {
            Err(ApiError::bad_request(format!(
                "'name' must be at most {MAX_DISPLAY_NAME_CHARS} characters"
            )))
        }
        Some(Value::String(s)) if s.contains('\0') => Err(ApiError::bad_request(
            "'name' must not contain a NUL character (\\u0000)",
        )),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::bad_request("'name' must be a non-empty string")),
    }
}

/// `POST /api/v1/segments`: creates a segment.
#[utoipa::path(
    post,
    path = "/api/v1/segments",
    tag = "segments",
    summary = "Create a segment",
    request_body(content = Object, description = "`{\"name\": string, \"filter\": <filter>}` (filters: see README, Segments)"),
    responses(
        (status = 201, description = "`{id, name, filter, created_at, updated_at}`", body = Object),
        (status = 400, description = "Missing name or an invalid filter: `{\"message\": \"<path>: <problem>\"}`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn create(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::SegmentsManage,
        req,
        |state, caller, req| async move {
            let body = read_json(req).await?;
            let name =
                name_field(&body)?.ok_or_else(|| ApiError::bad_request("'name' is required"))?;
            let raw = body
                .get("filter")
                .ok_or_else(|| ApiError::bad_request("'filter' is required"))?;
            let _definitions = state.segment_definitions(caller.workspace.id).await?;
            let filter = parse_filter(&state, &caller.workspace, raw, None).await?;
            let at = now();
            let segment = Segment {
                id: uuid::Uuid::new_v4().to_string(),
                name,
                filter: filter.to_json(),
                created_at: at,
                updated_at: at,
            };
            let saved = state
                .store()
                .create_segment(caller.workspace.id, segment)
                .await?;
            Ok((StatusCode::CREATED, axum::Json(segment_json(&saved))).into_response())
        },
    )
    .await
}

/// `GET /api/v1/segments`: every segment of the workspace.
#[utoipa::path(
    get,
    path = "/api/v1/segments",
    tag = "segments",
    summary = "List the workspace's segments",
    responses((status = 200, description = "`{\"segments\": [{id, name, filter, created_at, updated_at}]}`", body = Object)),
    security(("bearer_auth" = []))
)]
pub async fn list(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::SegmentsRead,
        req,
        |state, caller, _| async move {
            let segments = state.store().list_segments(caller.workspace.id).await?;
            let items: Vec<Value> = segments.iter().map(segment_json).collect();
            Ok(axum::Json(json!({ "segments": items })).into_response())
        },
    )
    .await
}

/// `GET /api/v1/segments/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/segments/{id}",
    tag = "segments",
    summary = "Read one segment",
    params(("id" = String, Path, description = "Segment id")),
    responses(
        (status = 200, description = "`{id, name, filter, created_at, updated_at}`", body = Object),
        (status = 404, description = "No such segment", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::SegmentsRead,
        req,
        |state, caller, _| async move {
            let segment = state
                .store()
                .segment(caller.workspace.id, &id)
                .await?
                .ok_or_else(|| missing(&id))?;
            Ok(axum::Json(segment_json(&segment)).into_response())
        },
    )
    .await
}

/// `PUT /api/v1/segments/{id}`: replaces the name and/or the filter.
#[utoipa::path(
    put,
    path = "/api/v1/segments/{id}",
    tag = "segments",
    summary = "Change a segment's name and/or filter",
    params(("id" = String, Path, description = "Segment id")),
    request_body(content = Object, description = "`{\"name\"?: string, \"filter\"?: <filter>}`"),
    responses(
        (status = 200, description = "The updated segment", body = Object),
        (status = 400, description = "Invalid name or filter (including an `in_segment` cycle)", body = crate::wire::ErrorBody),
        (status = 404, description = "No such segment", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::SegmentsManage,
        req,
        |state, caller, req| async move {
            let ws = caller.workspace.id;
            let body = read_json(req).await?;
            let _definitions = state.segment_definitions(ws).await?;
            let old = state
                .store()
                .segment(ws, &id)
                .await?
                .ok_or_else(|| missing(&id))?;
            let name = name_field(&body)?.unwrap_or(old.name);
            let filter = match body.get("filter") {
                Some(raw) => parse_filter(&state, &caller.workspace, raw, Some(&id))
                    .await?
                    .to_json(),
                None => old.filter,
            };
            let saved = state
                .store()
                .update_segment(ws, &id, name, filter, now())
                .await?
                .ok_or_else(|| missing(&id))?;
            Ok(axum::Json(segment_json(&saved)).into_response())
        },
    )
    .await
}

/// True if `filter` (wire JSON) has `{"in_segment": id}` anywhere.
pub(crate) fn references(filter: &Value, id: &str) -> bool {
    match filter {
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| (k == "in_segment" && v.as_str() == Some(id)) || references(v, id)),
        Value::Array(items) => items.iter().any(|v| references(v, id)),
        _ => false,
    }
}

/// What keeps segment `id` from being deleted, in words for the 409, or `None`: another segment
/// that uses it through `in_segment`, or a campaign or Canvas that is not stopped and names it
/// (its audience, a segment-entry trigger, an `in_segment` in a filter or an Audience Path).
/// Deleting it under them would turn "this segment" into "nobody", or after an unchanged edit
/// into "everyone". The caller holds [`AppState::segment_definitions`] from this check to its
/// delete.
pub(crate) async fn segment_in_use(
    state: &AppState,
    workspace: tideway_core::ids::WorkspaceId,
    id: &str,
) -> Result<Option<String>, tideway_core::store::StoreError> {
    use tideway_core::campaigns::CampaignStatus;
    let segments = state.store().list_segments(workspace).await?;
    if let Some(user) = segments
        .iter()
        .find(|s| s.id != id && references(&s.filter, id))
    {
        return Ok(Some(format!(
            "segment '{}' ({}) uses this segment through in_segment",
            user.name, user.id
        )));
    }
    // (kind, name, id, status, definition) of every campaign, then every Canvas.
    let campaigns = state.store().list_campaigns(workspace).await?;
    let canvases = state.store().list_canvases(workspace).await?;
    let users = campaigns
        .iter()
        .map(|c| ("campaign", &c.name, &c.id, c.status, &c.definition))
        .chain(
            canvases
                .iter()
                .map(|c| ("Canvas", &c.name, &c.id, c.status, &c.definition)),
        );
    for (kind, name, user_id, status, definition) in users {
        if status != CampaignStatus::Stopped && names_segment(definition, id) {
            return Ok(Some(format!(
                "{kind} '{name}' ({user_id}) targets this segment; take it out of the {kind} or stop the {kind} first"
            )));
        }
    }
    Ok(None)
}

/// True if a campaign or Canvas definition names segment `id` anywhere: a `segment_id`, an
/// element of `segment_ids`, or an `in_segment`.
fn names_segment(definition: &Value, id: &str) -> bool {
    match definition {
        Value::Object(fields) => fields
            .iter()
            .any(|(key, value)| match (key.as_str(), value) {
                ("segment_id" | "in_segment", Value::String(named)) => named == id,
                ("segment_ids", Value::Array(ids)) => {
                    ids.iter().any(|named| named.as_str() == Some(id))
                }
                _ => names_segment(value, id),
            }),
        Value::Array(items) => items.iter().any(|item| names_segment(item, id)),
        _ => false,
    }
}

/// `DELETE /api/v1/segments/{id}`: refused (409) while another segment, or a campaign or
/// Canvas that is not stopped, uses it.
#[utoipa::path(
    delete,
    path = "/api/v1/segments/{id}",
    tag = "segments",
    summary = "Delete a segment",
    params(("id" = String, Path, description = "Segment id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such segment", body = crate::wire::ErrorBody),
        (status = 409, description = "Another segment uses it through `in_segment`, or a campaign or Canvas that is not stopped names it", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::SegmentsManage,
        req,
        |state, caller, _| async move {
            let ws = caller.workspace.id;
            let _definitions = state.segment_definitions(ws).await?;
            if let Some(why) = segment_in_use(&state, ws, &id).await? {
                return Err(ApiError::Conflict(why));
            }
            if !state.store().delete_segment(ws, &id).await? {
                return Err(missing(&id));
            }
            Ok(StatusCode::NO_CONTENT.into_response())
        },
    )
    .await
}

/// `GET /api/v1/segments/{id}/size[?estimate=true]`.
#[utoipa::path(
    get,
    path = "/api/v1/segments/{id}/size",
    tag = "segments",
    summary = "How many users are in a segment now",
    params(
        ("id" = String, Path, description = "Segment id"),
        ("estimate" = Option<bool>, Query, description = "`true`: may answer from a 1 % sample on large workspaces (the answer says whether it did)"),
    ),
    responses(
        (status = 200, description = "`{\"size\": N}`; with `estimate=true`, `{\"size\": N, \"estimate\": bool}`", body = Object),
        (status = 404, description = "No such segment", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn size(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::SegmentsRead,
        req,
        |state, caller, _| async move {
            let ws = caller.workspace.id;
            let estimate = match params.get("estimate").map(String::as_str) {
                None | Some("false") => false,
                Some("true") => true,
                Some(_) => return Err(ApiError::bad_request("'estimate' must be true or false")),
            };
            let segments = state.store().list_segments(ws).await?;
            let segment = segments
                .iter()
                .find(|s| s.id == id)
                .ok_or_else(|| missing(&id))?;
            let filter = segment.parsed_filter().ok_or(ApiError::Internal)?;
            let lookup = segment_lookup(&segments);
            let at = now().secs();
            let body = state
                .segments()
                .with_fresh(ws, move |live| {
                    if estimate {
                        let (size, estimated) = live.index().estimate_size(&filter, at, &lookup);
                        json!({"size": size, "estimate": estimated})
                    } else {
                        json!({"size": live.size(&filter, at, &lookup)})
                    }
                })
                .await?;
            Ok(axum::Json(body).into_response())
        },
    )
    .await
}

/// `POST /api/v1/segments/preview`: the size of an unsaved filter.
#[utoipa::path(
    post,
    path = "/api/v1/segments/preview",
    tag = "segments",
    summary = "Count the users an unsaved filter matches",
    request_body(content = Object, description = "`{\"filter\": <filter>}`"),
    responses(
        (status = 200, description = "`{\"size\": N}`", body = Object),
        (status = 400, description = "Invalid filter: `{\"message\": \"<path>: <problem>\"}`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn preview(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::SegmentsRead,
        req,
        |state, caller, req| async move {
            let ws = caller.workspace.id;
            let body = read_json(req).await?;
            let raw = body
                .get("filter")
                .ok_or_else(|| ApiError::bad_request("'filter' is required"))?;
            let filter = parse_filter(&state, &caller.workspace, raw, None).await?;
            let lookup = segment_lookup(&state.store().list_segments(ws).await?);
            let at = now().secs();
            let size = state
                .segments()
                .with_fresh(ws, move |live| live.size(&filter, at, &lookup))
                .await?;
            Ok(axum::Json(json!({ "size": size })).into_response())
        },
    )
    .await
}

/// `GET /api/v1/segments/{id}/members?cursor=…&limit=…`: members in `seq` order, a page at a
/// time; `next_cursor` is null on the last page.
#[utoipa::path(
    get,
    path = "/api/v1/segments/{id}/members",
    tag = "segments",
    summary = "Page through a segment's members",
    params(
        ("id" = String, Path, description = "Segment id"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"),
        ("limit" = Option<usize>, Query, description = "Page size, 1..=10000 (default 1000)"),
    ),
    responses(
        (status = 200, description = "`{\"members\": [{braze_id, external_id}], \"next_cursor\"}`", body = Object),
        (status = 404, description = "No such segment", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn members(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::SegmentsRead,
        req,
        |state, caller, _| async move {
            let ws = caller.workspace.id;
            let after: u32 = match params.get("cursor") {
                None => 0,
                Some(c) => c.parse().map_err(|_| {
                    ApiError::bad_request(
                        "'cursor' must be a next_cursor value from a previous page",
                    )
                })?,
            };
            let limit = match params.get("limit") {
                None => DEFAULT_PAGE,
                Some(l) => l
                    .parse()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE).contains(l))
                    .ok_or_else(|| ApiError::bad_request("'limit' must be 1..=10000"))?,
            };
            let segments = state.store().list_segments(ws).await?;
            let segment = segments
                .iter()
                .find(|s| s.id == id)
                .ok_or_else(|| missing(&id))?;
            let filter = segment.parsed_filter().ok_or(ApiError::Internal)?;
            let lookup = segment_lookup(&segments);
            let at = now().secs();
            let page = state
                .segments()
                .with_fresh(ws, move |live| {
                    live.members(&filter, at, &lookup, after, limit)
                })
                .await?;
            let next = (page.len() == limit)
                .then(|| page.last().map(|m| m.seq.0.to_string()))
                .flatten();
            let members: Vec<Value> = page
                .iter()
                .map(|m| json!({"braze_id": m.braze_id.as_str(), "external_id": m.external_id}))
                .collect();
            Ok(axum::Json(json!({"members": members, "next_cursor": next})).into_response())
        },
    )
    .await
}

/// `GET /api/v1/users/{braze_id}/segments`: the segments a user is in now.
#[utoipa::path(
    get,
    path = "/api/v1/users/{braze_id}/segments",
    tag = "segments",
    summary = "The segments a user is in",
    params(("braze_id" = String, Path, description = "24 lowercase hex characters")),
    responses(
        (status = 200, description = "`{\"segments\": [{id, name}]}`", body = Object),
        (status = 400, description = "Not a braze_id", body = crate::wire::ErrorBody),
        (status = 404, description = "No such user", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn user_segments(
    State(state): State<AppState>,
    Path(braze_id): Path<String>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::SegmentsRead,
        req,
        |state, caller, _| async move {
            let ws = caller.workspace.id;
            let id = BrazeId::parse(&braze_id)
                .map_err(|e| ApiError::bad_request(format!("'braze_id' {e}")))?;
            let segments = state.store().list_segments(ws).await?;
            let lookup = segment_lookup(&segments);
            let at = now().secs();
            let found = state
                .segments()
                .with_fresh(ws, move |live| {
                    let seq = live.seq_of(&id)?;
                    let within: Vec<Value> = segments
                        .iter()
                        .filter(|s| {
                            s.parsed_filter().is_some_and(|f| {
                                live.index().evaluate(&f, at, &lookup).contains(seq.0)
                            })
                        })
                        .map(|s| json!({"id": s.id, "name": s.name}))
                        .collect();
                    Some(within)
                })
                .await?
                .ok_or_else(|| {
                    ApiError::Missing(format!("no user '{braze_id}' in this workspace"))
                })?;
            Ok(axum::Json(json!({ "segments": found })).into_response())
        },
    )
    .await
}

/// `GET /segments/list?page=N&sort_direction=asc|desc`: Braze's segment list, 100 per page,
/// oldest first unless `desc`.
#[utoipa::path(
    get,
    path = "/segments/list",
    tag = "segments",
    summary = "Braze: list segments",
    params(
        ("page" = Option<usize>, Query, description = "Page number, from 0 (100 segments per page)"),
        ("sort_direction" = Option<String>, Query, description = "`asc` (oldest first, the default) or `desc`"),
    ),
    responses(
        (status = 200, description = "`{\"segments\": [{id, name, analytics_tracking_enabled, tags}], \"message\": \"success\"}`", body = Object),
        (status = 400, description = "A parameter that does not parse", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn braze_list(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(state, Permission::SegmentsList, req, |state, caller, _| async move {
        // The same parameters and answers as `/campaigns/list` and `/canvas/list`.
        let list = crate::messaging_api::ListQuery::parse(&params)?;
        let segments = state.store().list_segments(caller.workspace.id).await?;
        let items: Vec<Value> = list
            .page(segments, |s| s.updated_at)
            .iter()
            .map(|s| json!({"id": s.id, "name": s.name, "analytics_tracking_enabled": false, "tags": []}))
            .collect();
        Ok(axum::Json(json!({"segments": items, "message": "success"})).into_response())
    })
    .await
}

/// `GET /segments/details?segment_id=…`: Braze's segment details.
#[utoipa::path(
    get,
    path = "/segments/details",
    tag = "segments",
    summary = "Braze: segment details",
    params(("segment_id" = String, Query, description = "Segment id")),
    responses(
        (status = 200, description = "`{\"message\": \"success\", name, description, text_description, tags, created_at, updated_at}`", body = Object),
        (status = 400, description = "No segment_id", body = crate::wire::ErrorBody),
        (status = 404, description = "No such segment", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn braze_details(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::SegmentsDetails,
        req,
        |state, caller, _| async move {
            let id = params
                .get("segment_id")
                .ok_or_else(|| ApiError::bad_request("segment_id is required"))?;
            let s = state
                .store()
                .segment(caller.workspace.id, id)
                .await?
                .ok_or_else(|| missing(id))?;
            Ok(axum::Json(json!({
                "message": "success",
                "name": s.name,
                "description": Value::Null,
                "text_description": s.filter.to_string(),
                "tags": [],
                "created_at": s.created_at.to_iso(),
                "updated_at": s.updated_at.to_iso(),
            }))
            .into_response())
        },
    )
    .await
}
