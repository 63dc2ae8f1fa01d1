//! Currents over HTTP: Tideway's management API `/api/v1/currents…` (REST key permission
//! `currents.manage`).
//!
//! - `GET /api/v1/currents`, `POST /api/v1/currents` (a draft, or `"launch": true`),
//!   `GET | PUT | DELETE /api/v1/currents/{id}`;
//! - `POST /api/v1/currents/{id}/{action}`: `launch`, `pause`, `resume`, `enable`, `test`
//!   (send test events), `replay` (`{"dead_letters": "all" | [ids]}` or
//!   `{"from": …, "to": …}`, ISO 8601 or Unix milliseconds);
//! - `GET /api/v1/currents/{id}/dead_letters?after=&limit=`.
//!
//! Definitions are parsed by `tideway_currents::spec::parse_spec` and their URLs judged by
//! the exporter's egress policy (`spec::check_egress`); a 400 names the field
//! (`{"message": "endpoint: …", "errors": [{"field": "endpoint", "message": …}]}`, plus
//! `"rule"` when the egress policy refused it). Every change is written to the store and then
//! handed to the running exporter, which starts, stops or re-reads the Current's consumer.
//! Bearer tokens are never returned, and `test` reports the receiver's status and a short
//! reason, never its body.
//!
//! Path ids are canonical decimal (`/api/v1/currents/1`): `+1`, `01` or ` 1` name no
//! Current (404), so one Current has one URL.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::clock::{Millis, parse_datetime};
use tideway_core::currents_store::{
    Current, CurrentId, CurrentSpec, CurrentStatus, CurrentsStore, DeadLetterPick, NamePrefix,
    Ordering, Selection, StatusChange,
};
use tideway_core::keys::Permission;
use tideway_core::store::{StoreError, Workspace};
use tideway_currents::spec::{check_egress, parse_spec, selected_types, wants_launch};
use tideway_currents::{CurrentsError, Exporter};

use crate::AppState;
use crate::error::ApiError;
use crate::pipeline::{management, now, read_json, read_optional_json};

/// What the Currents API needs: their storage and the running exporter.
#[derive(Clone)]
pub struct CurrentsApi {
    pub store: Arc<dyn CurrentsStore>,
    pub exporter: Arc<Exporter>,
}

fn api(state: &AppState) -> Result<CurrentsApi, ApiError> {
    state.currents().cloned().ok_or(ApiError::Unavailable)
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Conflict(what) => ApiError::Conflict(what),
        StoreError::NotFound(what) => ApiError::Missing(what),
        other => other.into(),
    }
}

fn currents_error(e: CurrentsError) -> ApiError {
    match e {
        CurrentsError::InvalidSpec { field, message } => ApiError::bad_request_with(
            format!("{field}: {message}"),
            "errors",
            json!([{"field": field, "message": message}]),
        ),
        CurrentsError::Refused { field, refusal } => ApiError::bad_request_with(
            format!("{field}: {refusal}"),
            "errors",
            json!([{"field": field, "rule": refusal.rule.code(), "message": refusal.to_string()}]),
        ),
        CurrentsError::Store(e) => store_error(e),
        CurrentsError::Transport(why) => ApiError::bad_request(why),
    }
}

/// A path id in canonical decimal: ASCII digits, no sign, no leading zero, in range.
fn parse_id(raw: &str) -> Result<CurrentId, ApiError> {
    let canonical = !raw.is_empty()
        && raw.bytes().all(|b| b.is_ascii_digit())
        && (raw == "0" || !raw.starts_with('0'));
    canonical
        .then(|| raw.parse().ok())
        .flatten()
        .map(CurrentId)
        .ok_or_else(|| ApiError::Missing(format!("no Current '{raw}' in this workspace")))
}

/// Parses a definition and judges its URLs by the egress policy.
fn parse_checked(api: &CurrentsApi, body: &Value) -> Result<CurrentSpec, ApiError> {
    let spec = parse_spec(body).map_err(currents_error)?;
    check_egress(&spec, &api.exporter.egress()).map_err(currents_error)?;
    Ok(spec)
}

async fn load(api: &CurrentsApi, ws: &Workspace, raw: &str) -> Result<Current, ApiError> {
    let id = parse_id(raw)?;
    api.store
        .get_current(ws.id, id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::Missing(format!("no Current '{raw}' in this workspace")))
}

fn spec_json(spec: &CurrentSpec) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("name".into(), json!(spec.name));
    m.insert("kind".into(), json!(spec.kind.as_str()));
    m.insert("endpoint".into(), json!(spec.endpoint.as_str()));
    m.insert(
        "bearer_token_set".into(),
        json!(spec.bearer_token.is_some()),
    );
    match &spec.selection {
        Selection::EventTypes(t) => m.insert("event_types".into(), json!(t)),
        Selection::Categories(c) => m.insert(
            "categories".into(),
            json!(c.iter().map(|c| c.as_str()).collect::<Vec<_>>()),
        ),
    };
    m.insert("batch_size".into(), json!(spec.batch_size));
    m.insert("flush_interval_ms".into(), json!(spec.flush_interval_ms));
    m.insert(
        "transformations".into(),
        json!(
            spec.transformations
                .iter()
                .map(|t| json!({"field": t.field, "action": t.action.as_str()}))
                .collect::<Vec<_>>()
        ),
    );
    m.insert(
        "per_user_ordering".into(),
        json!(spec.ordering == Ordering::PerUser),
    );
    m.insert("max_in_flight".into(), json!(spec.max_in_flight));
    m.insert(
        "retry".into(),
        json!({"base_ms": spec.retry.base_ms, "multiplier": spec.retry.multiplier, "cap_ms": spec.retry.cap_ms,
               "request_timeout_ms": spec.retry.request_timeout_ms, "max_retry_after_ms": spec.retry.max_retry_after_ms}),
    );
    m.insert(
        "failure_window_ms".into(),
        json!(spec.windows.failure_window_ms),
    );
    m.insert("retention_ms".into(), json!(spec.windows.retention_ms));
    m.insert("alert_after_ms".into(), json!(spec.windows.alert_after_ms));
    m.insert(
        "alert_webhook".into(),
        json!(spec.alert_webhook.as_ref().map(|u| u.as_str())),
    );
    if let Some(h) = &spec.heap {
        m.insert(
            "heap".into(),
            json!({"app_id": h.app_id, "identity": h.identity.as_str(), "prefix": h.prefix == NamePrefix::Braze,
                   "app_events_per_minute": h.app_events_per_minute, "identity_events_per_minute": h.identity_events_per_minute}),
        );
    }
    m
}

/// A Current with its status, counts, lag and last error.
async fn current_json(api: &CurrentsApi, c: &Current) -> Result<Value, ApiError> {
    let lag = api
        .store
        .lag(c.id, selected_types(&c.spec.selection))
        .await
        .map_err(store_error)?;
    let now = now();
    let mut m = Map::new();
    m.insert("id".into(), json!(c.id.0));
    m.extend(spec_json(&c.spec));
    m.insert("status".into(), json!(c.status.as_str()));
    m.insert(
        "counts".into(),
        json!({"delivered": c.counters.delivered, "retried": c.counters.retried, "dead_lettered": c.counters.dead_lettered,
               "dropped": c.counters.dropped, "skipped": c.counters.skipped}),
    );
    m.insert(
        "lag".into(),
        json!({"events": lag.events, "events_exact": lag.exact, "seconds": lag.oldest_logged_at.map_or(0, |t| (now.0 - t.0).max(0) / 1000)}),
    );
    m.insert(
        "last_error".into(),
        c.last_error.as_ref().map_or(
            Value::Null,
            |e| json!({"at": e.at.to_iso(), "status": e.status, "message": e.message}),
        ),
    );
    m.insert(
        "last_success_at".into(),
        json!(c.last_success_at.map(Millis::to_iso)),
    );
    m.insert(
        "failing_since".into(),
        json!(c.failing_since.map(Millis::to_iso)),
    );
    m.insert("position".into(), json!(c.position));
    m.insert("created_at".into(), json!(c.created_at.to_iso()));
    m.insert("updated_at".into(), json!(c.updated_at.to_iso()));
    Ok(Value::Object(m))
}

#[utoipa::path(get, path = "/api/v1/currents", tag = "currents", summary = "List the workspace's Currents with status, counts and lag",
    responses((status = 200, description = "`{\"currents\": [...]}`", body = Object)), security(("bearer_auth" = [])))]
/// `GET /api/v1/currents`
pub async fn list(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CurrentsManage,
        req,
        |state, caller, _| async move {
            let api = api(&state)?;
            let mut items = Vec::new();
            for c in api
                .store
                .list_currents(caller.workspace.id)
                .await
                .map_err(store_error)?
            {
                items.push(current_json(&api, &c).await?);
            }
            Ok(axum::Json(json!({ "currents": items })).into_response())
        },
    )
    .await
}

#[utoipa::path(post, path = "/api/v1/currents", tag = "currents", summary = "Create a Current (a draft unless `launch: true`)",
    request_body(content = Object, description = "`{name, kind: heap_export|custom_http|heap_track, endpoint, bearer_token?, event_types | categories, batch_size?, flush_interval_ms?, transformations?, launch?}`"),
    responses((status = 201, description = "The Current", body = Object), (status = 400, description = "Invalid definition", body = crate::wire::ErrorBody)), security(("bearer_auth" = [])))]
/// `POST /api/v1/currents`
pub async fn create(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CurrentsManage,
        req,
        |state, caller, req| async move {
            let api = api(&state)?;
            let body = Value::Object(read_json(req).await?);
            let spec = parse_checked(&api, &body)?;
            let initial = if wants_launch(&body) {
                CurrentStatus::Active
            } else {
                CurrentStatus::Draft
            };
            let c = api
                .store
                .create_current(caller.workspace.id, spec, initial, now())
                .await
                .map_err(store_error)?;
            api.exporter.sync().await;
            Ok((
                StatusCode::CREATED,
                axum::Json(current_json(&api, &c).await?),
            )
                .into_response())
        },
    )
    .await
}

#[utoipa::path(get, path = "/api/v1/currents/{id}", tag = "currents", summary = "One Current: status, delivered / retried / dead-lettered counts, lag, last error and success, recent drops",
    params(("id" = String, Path, description = "Current id")),
    responses((status = 200, description = "The Current", body = Object), (status = 404, description = "No such Current", body = crate::wire::ErrorBody)), security(("bearer_auth" = [])))]
/// `GET /api/v1/currents/{id}`
pub async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    management(state, Permission::CurrentsManage, req, |state, caller, _| async move {
        let api = api(&state)?;
        let c = load(&api, &caller.workspace, &id).await?;
        let mut body = current_json(&api, &c).await?;
        let drops = api.store.list_drops(c.id, 20).await.map_err(store_error)?;
        body["recent_drops"] = json!(drops
            .iter()
            .map(|d| json!({"from_seq": d.from_seq, "to_seq": d.to_seq, "count": d.count, "at": d.at.to_iso()}))
            .collect::<Vec<_>>());
        Ok(axum::Json(body).into_response())
    })
    .await
}

#[utoipa::path(put, path = "/api/v1/currents/{id}", tag = "currents", summary = "Replace a Current's definition (position and counts are kept)",
    params(("id" = String, Path, description = "Current id")), request_body(content = Object, description = "As for create"),
    responses((status = 200, description = "The Current", body = Object), (status = 400, description = "Invalid definition", body = crate::wire::ErrorBody), (status = 404, description = "No such Current", body = crate::wire::ErrorBody)), security(("bearer_auth" = [])))]
/// `PUT /api/v1/currents/{id}`: replaces the definition (position and counts are kept).
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::CurrentsManage,
        req,
        |state, caller, req| async move {
            let api = api(&state)?;
            let existing = load(&api, &caller.workspace, &id).await?;
            let body = Value::Object(read_json(req).await?);
            let spec = parse_checked(&api, &body)?;
            let c = api
                .store
                .update_current(caller.workspace.id, existing.id, spec, now())
                .await
                .map_err(store_error)?;
            api.exporter.sync().await;
            Ok(axum::Json(current_json(&api, &c).await?).into_response())
        },
    )
    .await
}

#[utoipa::path(delete, path = "/api/v1/currents/{id}", tag = "currents", summary = "Remove a Current",
    params(("id" = String, Path, description = "Current id")),
    responses((status = 200, description = "`{\"message\":\"success\"}`", body = Object), (status = 404, description = "No such Current", body = crate::wire::ErrorBody)), security(("bearer_auth" = [])))]
/// `DELETE /api/v1/currents/{id}`
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::CurrentsManage,
        req,
        |state, caller, _| async move {
            let api = api(&state)?;
            let c = load(&api, &caller.workspace, &id).await?;
            api.store
                .delete_current(caller.workspace.id, c.id)
                .await
                .map_err(store_error)?;
            api.exporter.sync().await;
            Ok(axum::Json(json!({"message": "success"})).into_response())
        },
    )
    .await
}

fn time_field(body: &Map<String, Value>, key: &'static str) -> Result<Millis, ApiError> {
    match body.get(key) {
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Millis)
            .ok_or_else(|| ApiError::bad_request(format!("'{key}' must be Unix milliseconds"))),
        Some(Value::String(s)) => parse_datetime(s)
            .ok_or_else(|| ApiError::bad_request(format!("'{key}' must be an ISO 8601 time"))),
        _ => Err(ApiError::bad_request(format!(
            "'{key}' is required (ISO 8601 or Unix milliseconds)"
        ))),
    }
}

#[utoipa::path(post, path = "/api/v1/currents/{id}/{action}", tag = "currents", summary = "launch, pause, resume, enable, test (send test events) or replay (dead letters, or a time window with `from`/`to`)",
    params(("id" = String, Path, description = "Current id"), ("action" = String, Path, description = "launch | pause | resume | enable | test | replay")),
    responses((status = 200, description = "Done", body = Object), (status = 202, description = "Replay scheduled", body = Object), (status = 400, description = "A body that is not a JSON object, or a bad window", body = crate::wire::ErrorBody), (status = 404, description = "No such Current, or no such action", body = crate::wire::ErrorBody)), security(("bearer_auth" = [])))]
/// `POST /api/v1/currents/{id}/{action}`
pub async fn action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    req: Request,
) -> Response {
    management(state, Permission::CurrentsManage, req, |state, caller, req| async move {
        let api = api(&state)?;
        let c = load(&api, &caller.workspace, &id).await?;
        let change = match action.as_str() {
            "launch" => Some(StatusChange::Launch),
            "pause" => Some(StatusChange::Pause),
            "resume" => Some(StatusChange::Resume),
            "enable" => Some(StatusChange::Enable),
            "test" | "replay" => None,
            _ => return Err(ApiError::Missing(format!("no action '{action}' (launch, pause, resume, enable, test, replay)"))),
        };
        if let Some(change) = change {
            let c = api.store.change_status(c.id, change, None, now()).await.map_err(store_error)?;
            api.exporter.sync().await;
            return Ok(axum::Json(current_json(&api, &c).await?).into_response());
        }
        if action == "test" {
            // Status and a short reason only: the receiver's body is not echoed.
            let report = api.exporter.send_test(&c).await.map_err(currents_error)?;
            return Ok(axum::Json(json!({
                "events": report.events, "accepted": report.accepted, "status": report.status, "message": report.message,
            }))
            .into_response());
        }
        let body = read_optional_json(req).await?;
        let replayed = match body.get("dead_letters") {
            Some(Value::String(all)) if all == "all" => {
                let n = api.store.replay_dead_letters(c.id, DeadLetterPick::All).await.map_err(store_error)?;
                json!({"dead_letters": n})
            }
            Some(Value::Array(ids)) => {
                let ids: Vec<i64> = ids.iter().map(|v| v.as_i64().ok_or_else(|| ApiError::bad_request("'dead_letters' ids must be integers"))).collect::<Result<_, _>>()?;
                let n = api.store.replay_dead_letters(c.id, DeadLetterPick::Ids(ids)).await.map_err(store_error)?;
                json!({"dead_letters": n})
            }
            Some(_) => return Err(ApiError::bad_request("'dead_letters' must be \"all\" or an array of dead-letter ids")),
            None => {
                let (from, to) = (time_field(&body, "from")?, time_field(&body, "to")?);
                if from > to {
                    return Err(ApiError::bad_request("'from' must not be after 'to'"));
                }
                match api.store.replay_window(c.id, from, to).await.map_err(store_error)? {
                    Some(w) => json!({"window": {"id": w.id, "from_seq": w.from_seq, "to_seq": w.to_seq}}),
                    None => json!({"window": null, "message": "nothing delivered in that window"}),
                }
            }
        };
        api.exporter.poke(c.id).await;
        Ok((StatusCode::ACCEPTED, axum::Json(json!({"replay": replayed}))).into_response())
    })
    .await
}

#[utoipa::path(get, path = "/api/v1/currents/{id}/dead_letters", tag = "currents", summary = "Dead-lettered events with their reason and the receiver's response",
    params(("id" = String, Path, description = "Current id"), ("after" = Option<i64>, Query, description = "Last id of the previous page"), ("limit" = Option<usize>, Query, description = "Page size")),
    responses((status = 200, description = "A page of dead letters", body = Object), (status = 404, description = "No such Current", body = crate::wire::ErrorBody)), security(("bearer_auth" = [])))]
/// `GET /api/v1/currents/{id}/dead_letters?after=ID&limit=N`
pub async fn dead_letters(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(state, Permission::CurrentsManage, req, |state, caller, _| async move {
        let api = api(&state)?;
        let c = load(&api, &caller.workspace, &id).await?;
        let after = params.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
        let limit = params.get("limit").and_then(|a| a.parse().ok()).unwrap_or(100usize).clamp(1, 1_000);
        let dead = api.store.list_dead_letters(c.id, after, limit).await.map_err(store_error)?;
        let items: Vec<Value> = dead
            .iter()
            .map(|d| {
                json!({
                    "id": d.id, "event_id": d.event.event_id, "event_type": d.event.event_type, "log_position": d.event.seq,
                    "reason": d.reason.as_str(), "detail": d.detail, "response_status": d.response_status,
                    "response_body": d.response_body, "created_at": d.created_at.to_iso(), "attempts": d.attempts,
                    "replay_pending": d.replay_pending,
                    "event": serde_json::from_str::<Value>(&d.event.body).unwrap_or(Value::Null),
                })
            })
            .collect();
        let next = dead.last().map(|d| d.id);
        Ok(axum::Json(json!({"dead_letters": items, "next_after": next})).into_response())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_ids_are_canonical_decimal() {
        assert_eq!(parse_id("1").unwrap(), CurrentId(1));
        assert_eq!(parse_id("0").unwrap(), CurrentId(0));
        assert_eq!(
            parse_id("9223372036854775807").unwrap(),
            CurrentId(i64::MAX)
        );
        for raw in [
            "",
            "+1",
            "-1",
            "01",
            "00",
            " 1",
            "1 ",
            "1.0",
            "1e0",
            "０",
            "9223372036854775808",
        ] {
            assert!(
                matches!(parse_id(raw), Err(ApiError::Missing(_))),
                "{raw:?}"
            );
        }
    }
}
