//! Canvas over HTTP: Tideway's management API (`/api/v1/canvases…`: create, read, update —
//! each definition edit a new version —, delete, `launch` / `pause` / `stop`; permissions
//! `canvas.manage` / `canvas.read`) and Braze's endpoints (`POST /canvas/trigger/send`,
//! `GET /canvas/list`, `GET /canvas/details`).
//!
//! A definition is checked whole before anything is written (`CanvasDefinition::parse`:
//! shape, graph, limits; Liquid of every Message step), so a refused request writes nothing
//! and names the place (`steps[2].next: …`) in a 400.

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::campaigns::{CampaignAction, CampaignStatus, Delivery};
use tideway_core::canvas::{CanvasDefinition, StepKind};
use tideway_core::keys::{Permission, Secret};
use tideway_core::store::{CanvasRecord, SendCounts, StepCounts, Workspace};
use tideway_messaging::canvas::{Entrant, step_dispatch_id};
use tideway_messaging::sends::{ApiRecipient, RecipientId, resolve};

use crate::AppState;
use crate::campaigns_api::{
    definition_error, description_field, name_field, place_error, presented_key, tags_field,
};
use crate::error::ApiError;
use crate::messaging_api::{MAX_RECIPIENTS, TOO_MANY_RECIPIENTS, messaging, not_enabled};
use crate::pipeline::{management, now, read_json};

/// Braze's answer for an unknown Canvas (`/canvas/details`, `/canvas/trigger/send`).
pub const INVALID_CANVAS: &str = "canvas_id must be a string of the Canvas api identifier";

fn missing(id: &str) -> ApiError {
    ApiError::Missing(format!("no Canvas '{id}' in this workspace"))
}

fn iso(m: Option<tideway_core::clock::Millis>) -> Value {
    m.map_or(Value::Null, |m| json!(m.to_iso()))
}

fn canvas_json(c: &CanvasRecord) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("id".into(), json!(c.id));
    m.insert("name".into(), json!(c.name));
    m.insert("description".into(), json!(c.description));
    m.insert("tags".into(), json!(c.tags));
    m.insert("status".into(), json!(c.status.as_str()));
    m.insert("version".into(), json!(c.version));
    m.insert("created_at".into(), json!(c.created_at.to_iso()));
    m.insert("updated_at".into(), json!(c.updated_at.to_iso()));
    m.insert("launched_at".into(), iso(c.launched_at));
    m.insert("first_entry".into(), iso(c.first_entry));
    m.insert("last_entry".into(), iso(c.last_entry));
    m.insert("entries".into(), json!(c.entries));
    if let Value::Object(def) = &c.definition {
        for (k, v) in def {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    m
}

pub(crate) fn loaded(c: &CanvasRecord) -> Result<CanvasDefinition, ApiError> {
    CanvasDefinition::load(&c.definition).map_err(|e| {
        tracing::error!(canvas = %c.id, error = %e, "stored Canvas does not load");
        ApiError::Internal
    })
}

/// Parses and checks a definition, templates included.
pub(crate) fn checked(raw: &Value) -> Result<(CanvasDefinition, Value), ApiError> {
    let (def, canonical) = CanvasDefinition::parse(raw, || uuid::Uuid::new_v4().to_string())
        .map_err(definition_error)?;
    tideway_messaging::liquid::check_all(def.templates()).map_err(|e| {
        ApiError::bad_request_with(
            format!("{}: {}", e.path, e.message),
            "errors",
            json!([{"field": e.path, "message": e.message}]),
        )
    })?;
    Ok((def, canonical))
}

/// `canvas.read`, or `canvas.manage` for a key that has only that (managing includes reading).
async fn read_permission(state: &AppState, key: Option<String>) -> Permission {
    if let Some(key) = key
        && let Ok(Some((found, _))) = state.store().find_api_key(Secret::new(key).hash()).await
        && !found.permissions.contains(Permission::CanvasRead)
        && found.permissions.contains(Permission::CanvasManage)
    {
        return Permission::CanvasManage;
    }
    Permission::CanvasRead
}

async fn load(state: &AppState, ws: &Workspace, id: &str) -> Result<CanvasRecord, ApiError> {
    state
        .store()
        .canvas(ws.id, id)
        .await?
        .ok_or_else(|| missing(id))
}

/// Creates a draft Canvas (version 1) from the API's body: `name` (required), `description`,
/// `tags` and the definition, all checked before anything is written.
pub(crate) async fn create_canvas(
    state: &AppState,
    ws: &Workspace,
    body: Map<String, Value>,
) -> Result<CanvasRecord, ApiError> {
    let name = name_field(&body)?.ok_or_else(|| place_error("name", "is required"))?;
    let description = description_field(&body)?.unwrap_or_default();
    let tags = tags_field(&body)?.unwrap_or_default();
    let (_, canonical) = checked(&Value::Object(body))?;
    let at = now();
    let record = CanvasRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name,
        description,
        tags,
        status: CampaignStatus::Draft,
        version: 1,
        definition: canonical,
        created_at: at,
        updated_at: at,
        launched_at: None,
        next_run: None,
        first_entry: None,
        last_entry: None,
        entries: 0,
    };
    Ok(state.store().create_canvas(ws.id, record).await?)
}

/// Changes a Canvas as `PUT` does: the name, description and tags present in `body`, and the
/// definition when any other key is present (a new version when it differs). 409 on a stopped
/// Canvas.
pub(crate) async fn update_canvas(
    state: &AppState,
    ws: &Workspace,
    id: &str,
    body: Map<String, Value>,
) -> Result<CanvasRecord, ApiError> {
    let mut c = load(state, ws, id).await?;
    if c.status == CampaignStatus::Stopped {
        return Err(ApiError::Conflict(
            "the Canvas is stopped (stopping is final)".into(),
        ));
    }
    if let Some(name) = name_field(&body)? {
        c.name = name;
    }
    if let Some(d) = description_field(&body)? {
        c.description = d;
    }
    if let Some(t) = tags_field(&body)? {
        c.tags = t;
    }
    let mut def_part = body;
    for k in ["name", "description", "tags"] {
        def_part.remove(k);
    }
    if !def_part.is_empty() {
        let (_, canonical) = checked(&Value::Object(def_part))?;
        if canonical != c.definition {
            c.definition = canonical;
            c.version += 1;
        }
    }
    c.updated_at = now();
    state
        .store()
        .save_canvas(ws.id, c)
        .await?
        .ok_or_else(|| missing(id))
}

/// One step's figures: its counts over every version, and a Message step's sends.
pub(crate) struct StepFigures {
    pub counts: StepCounts,
    /// A Message step's sends (every version's dispatch of the step); `None` for other steps.
    pub messages: Option<SendCounts>,
}

/// The figures of every step of `def` (the Canvas's current definition), in step order.
pub(crate) async fn step_figures(
    state: &AppState,
    ws: &Workspace,
    c: &CanvasRecord,
    def: &CanvasDefinition,
) -> Result<Vec<StepFigures>, ApiError> {
    let counts = state.store().canvas_step_counts(ws.id, &c.id).await?;
    let mut out = Vec::with_capacity(def.steps.len());
    for s in &def.steps {
        let n = counts
            .iter()
            .find(|n| n.step_id == s.id)
            .cloned()
            .unwrap_or_else(|| StepCounts {
                step_id: s.id.clone(),
                ..StepCounts::default()
            });
        let messages = if matches!(s.kind, StepKind::Message { .. }) {
            let ids = (1..=c.version)
                .map(|v| step_dispatch_id(&c.id, v, &s.id))
                .collect();
            let sends = state.store().dispatch_send_counts(ws.id, ids).await?;
            Some(sends.iter().fold(SendCounts::default(), |t, c| SendCounts {
                pending: t.pending + c.pending,
                sent: t.sent + c.sent,
                failed: t.failed + c.failed,
            }))
        } else {
            None
        };
        out.push(StepFigures {
            counts: n,
            messages,
        });
    }
    Ok(out)
}

/// Launches, pauses or stops a Canvas (the campaign lifecycle; 409 when its status does not
/// allow it), and wakes the Canvas engine.
pub(crate) async fn change_status(
    state: &AppState,
    ws: &Workspace,
    id: &str,
    action: CampaignAction,
) -> Result<CanvasRecord, ApiError> {
    let mut c = load(state, ws, id).await?;
    let Some(to) = action.apply(c.status) else {
        return Err(ApiError::Conflict(format!(
            "the Canvas is {}: {}",
            c.status.as_str(),
            match action {
                CampaignAction::Launch => "only a draft or paused Canvas can be launched",
                CampaignAction::Pause => "only an active Canvas can be paused",
                CampaignAction::Stop => "it is stopped already (stopping is final)",
            }
        )));
    };
    let at = now();
    if action == CampaignAction::Launch {
        if c.launched_at.is_none() {
            c.launched_at = Some(at);
        }
        // A scheduled entry's first occurrence from now on (the engine moves it on).
        if let Delivery::Scheduled(schedule) = &loaded(&c)?.entry
            && c.next_run.is_none()
        {
            c.next_run = schedule.next_after(tideway_core::clock::Millis(at.0 - 1));
        }
    }
    c.status = to;
    c.updated_at = at;
    let saved = state
        .store()
        .save_canvas(ws.id, c)
        .await?
        .ok_or_else(|| missing(id))?;
    if let Some(api) = messaging(state) {
        api.engine.canvas().wake();
    }
    Ok(saved)
}

/// `POST /api/v1/canvases`: creates a draft (version 1).
pub async fn create(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CanvasManage,
        req,
        |state, caller, req| async move {
            let body = read_json(req).await?;
            let saved = create_canvas(&state, &caller.workspace, body).await?;
            Ok((
                StatusCode::CREATED,
                axum::Json(json!({"message": "success", "canvas": canvas_json(&saved)})),
            )
                .into_response())
        },
    )
    .await
}

/// `GET /api/v1/canvases`.
pub async fn list(State(state): State<AppState>, req: Request) -> Response {
    let permission = read_permission(&state, presented_key(&req)).await;
    management(state, permission, req, |state, caller, _| async move {
        let items: Vec<Value> = state
            .store()
            .list_canvases(caller.workspace.id)
            .await?
            .iter()
            .map(|c| Value::Object(canvas_json(c)))
            .collect();
        Ok(axum::Json(json!({"message": "success", "canvases": items})).into_response())
    })
    .await
}

/// `GET /api/v1/canvases/{id}`: the Canvas with, per step, users in it, entered,
/// progressed, exited, conversions, and a Message step's send counts (all versions).
pub async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let permission = read_permission(&state, presented_key(&req)).await;
    management(state, permission, req, |state, caller, _| async move {
        let ws = &caller.workspace;
        let c = load(&state, ws, &id).await?;
        let def = loaded(&c)?;
        let figures = step_figures(&state, ws, &c, &def).await?;
        let mut steps = Vec::new();
        for (s, f) in def.steps.iter().zip(figures) {
            let n = f.counts;
            let mut m = json!({
                "id": s.id,
                "name": s.name,
                "type": s.kind.type_name(),
                "in_step": n.in_step,
                "entered": n.entered,
                "progressed": n.progressed,
                "exited": n.exited,
                "conversions": n.conversions,
            });
            if let Some(sends) = f.messages {
                m["messages"] =
                    json!({"pending": sends.pending, "sent": sends.sent, "failed": sends.failed});
            }
            steps.push(m);
        }
        let mut out = canvas_json(&c);
        out.insert("step_stats".into(), Value::Array(steps));
        Ok(axum::Json(json!({"message": "success", "canvas": out})).into_response())
    })
    .await
}

/// `PUT /api/v1/canvases/{id}`: renames, re-tags, or replaces the definition (a new version;
/// journeys under way keep the version they entered with).
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::CanvasManage,
        req,
        |state, caller, req| async move {
            let body = read_json(req).await?;
            let saved = update_canvas(&state, &caller.workspace, &id, body).await?;
            Ok(
                axum::Json(json!({"message": "success", "canvas": canvas_json(&saved)}))
                    .into_response(),
            )
        },
    )
    .await
}

/// `DELETE /api/v1/canvases/{id}`.
pub async fn delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::CanvasManage,
        req,
        |state, caller, _| async move {
            if !state
                .store()
                .delete_canvas(caller.workspace.id, &id)
                .await?
            {
                return Err(missing(&id));
            }
            Ok(axum::Json(json!({"message": "success"})).into_response())
        },
    )
    .await
}

/// `POST /api/v1/canvases/{id}/{action}`: `launch`, `pause` or `stop`.
pub async fn action(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::CanvasManage,
        req,
        |state, caller, _| async move {
            let action = match action.as_str() {
                "launch" => CampaignAction::Launch,
                "pause" => CampaignAction::Pause,
                "stop" => CampaignAction::Stop,
                other => {
                    return Err(ApiError::Missing(format!(
                        "no Canvas action '{other}' (launch, pause or stop)"
                    )));
                }
            };
            let saved = change_status(&state, &caller.workspace, &id, action).await?;
            Ok(
                axum::Json(json!({"message": "success", "canvas": canvas_json(&saved)}))
                    .into_response(),
            )
        },
    )
    .await
}

fn bad(why: impl Into<String>) -> ApiError {
    let why = why.into();
    ApiError::bad_request_with("Bad Request", "errors", json!([why]))
}

/// A properties object (`context` / `canvas_entry_properties`), merged: `context` wins.
fn entry_properties(
    o: &Map<String, Value>,
    path: &str,
) -> Result<Option<Map<String, Value>>, ApiError> {
    let mut out: Option<Map<String, Value>> = None;
    for key in ["canvas_entry_properties", "context"] {
        match o.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                out.get_or_insert_with(Map::new).extend(m.clone());
            }
            Some(_) => return Err(bad(format!("{path}{key} must be an object"))),
        }
    }
    if let Some(m) = &out
        && Value::Object(m.clone()).to_string().len() > 50 * 1024
    {
        return Err(bad(format!(
            "{path}canvas_entry_properties/context exceed 50 KB"
        )));
    }
    Ok(out)
}

/// `POST /canvas/trigger/send`: enters named recipients into an API-triggered Canvas.
pub async fn trigger_send(State(state): State<AppState>, req: Request) -> Response {
    management(state, Permission::CanvasTriggerSend, req, |state, caller, req| async move {
        let Some(api) = messaging(&state) else {
            return Ok(not_enabled());
        };
        let body = read_json(req).await?;
        let canvas_id = match body.get("canvas_id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(bad("canvas_id is required")),
        };
        let shared = entry_properties(&body, "")?;
        if body.get("broadcast").and_then(Value::as_bool) == Some(true) {
            return Err(bad("broadcast is not supported for Canvas: name recipients"));
        }
        let list = match body.get("recipients") {
            Some(Value::Array(l)) if !l.is_empty() => l,
            Some(Value::Array(_)) | None | Some(Value::Null) => {
                return Err(ApiError::bad_request("No Recipients"));
            }
            Some(_) => return Err(bad("recipients must be an array")),
        };
        if list.len() > MAX_RECIPIENTS {
            return Err(ApiError::bad_request(TOO_MANY_RECIPIENTS));
        }
        let mut recipients = Vec::with_capacity(list.len());
        for (i, r) in list.iter().enumerate() {
            let path = format!("recipients[{i}].");
            let Value::Object(o) = r else {
                return Err(bad(format!("recipients[{i}] must be an object")));
            };
            let id = match (o.get("external_user_id"), o.get("braze_id")) {
                (Some(v), None) => {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => return Err(bad(format!("{path}external_user_id must be a string"))),
                    };
                    RecipientId::External(
                        tideway_core::ids::ExternalId::parse(&text)
                            .map_err(|e| bad(format!("{path}external_user_id: {e}")))?,
                    )
                }
                (None, Some(Value::String(b))) => RecipientId::Braze(
                    tideway_core::ids::BrazeId::parse(b)
                        .map_err(|e| bad(format!("{path}braze_id: {e}")))?,
                ),
                _ => {
                    return Err(bad(format!(
                        "{path} needs exactly one of external_user_id or braze_id"
                    )));
                }
            };
            let mut props = shared.clone();
            if let Some(own) = entry_properties(o, &path)? {
                props.get_or_insert_with(Map::new).extend(own);
            }
            recipients.push(ApiRecipient { id, properties: props });
        }
        let ws = &caller.workspace;
        let canvas = state
            .store()
            .canvas(ws.id, &canvas_id)
            .await?
            .ok_or_else(|| ApiError::bad_request(INVALID_CANVAS))?;
        let def = loaded(&canvas)?;
        if !matches!(def.entry, Delivery::ApiTriggered) {
            return Err(ApiError::bad_request_with(
                INVALID_CANVAS,
                "errors",
                json!(["the Canvas's entry is not api_triggered"]),
            ));
        }
        let dispatch_id = uuid::Uuid::new_v4().simple().to_string();
        if canvas.status != CampaignStatus::Active {
            let notice = match canvas.status {
                CampaignStatus::Stopped => "The Canvas is archived. Unarchive the Canvas to ensure trigger requests will take effect.",
                _ => "The Canvas is paused. Resume the Canvas to ensure trigger requests will take effect.",
            };
            return Ok((
                StatusCode::CREATED,
                axum::Json(json!({"dispatch_id": dispatch_id, "message": "success", "notice": notice})),
            )
                .into_response());
        }
        let (users, _missing) = resolve(state.store(), ws, recipients).await?;
        let entrants = users
            .into_iter()
            .map(|(user, props)| Entrant {
                user,
                properties: props.map(|m| Value::Object(m).to_string()),
            })
            .collect();
        api.engine.canvas().enter(ws.id, &canvas, entrants).await?;
        Ok((
            StatusCode::CREATED,
            axum::Json(json!({"dispatch_id": dispatch_id, "message": "success"})),
        )
            .into_response())
    })
    .await
}

/// `GET /canvas/list`: `{"canvases": [{id, last_edited, name, tags}], "message"}`, 100 per
/// page, oldest first.
pub async fn braze_list(
    State(state): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    req: Request,
) -> Response {
    management(state, Permission::CanvasList, req, |state, caller, _| async move {
        let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(0);
        let mut all = state.store().list_canvases(caller.workspace.id).await?;
        if q.get("sort_direction").map(String::as_str) == Some("desc") {
            all.reverse();
        }
        let items: Vec<Value> = all
            .iter()
            .skip(page * 100)
            .take(100)
            .map(|c| json!({"id": c.id, "last_edited": c.updated_at.to_iso(), "name": c.name, "tags": c.tags}))
            .collect();
        Ok(axum::Json(json!({"canvases": items, "message": "success"})).into_response())
    })
    .await
}

/// `GET /canvas/details?canvas_id=`.
pub async fn braze_details(
    State(state): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    req: Request,
) -> Response {
    management(state, Permission::CanvasDetails, req, |state, caller, _| async move {
        let id = q.get("canvas_id").cloned().unwrap_or_default();
        let c = state
            .store()
            .canvas(caller.workspace.id, &id)
            .await?
            .ok_or_else(|| ApiError::bad_request(INVALID_CANVAS))?;
        let def = loaded(&c)?;
        let steps: Vec<Value> = def
            .steps
            .iter()
            .map(|s| {
                let paths = s.kind.next_paths();
                let channels: Vec<&str> = match &s.kind {
                    StepKind::Message { message, .. } => vec![message.message.channel().as_str()],
                    _ => Vec::new(),
                };
                json!({
                    "name": s.name,
                    "type": s.kind.type_name(),
                    "id": s.id,
                    "next_step_ids": paths.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
                    "next_paths": paths.iter().map(|(name, n)| json!({"name": name, "next_step_id": n})).collect::<Vec<_>>(),
                    "channels": channels,
                })
            })
            .collect();
        let variants: Vec<Value> = def
            .variants
            .iter()
            .map(|v| json!({"name": v.name, "id": v.id, "first_step_ids": [v.first_step]}))
            .collect();
        Ok(axum::Json(json!({
            "created_at": c.created_at.to_iso(),
            "updated_at": c.updated_at.to_iso(),
            "name": c.name,
            "description": c.description,
            "archived": c.status == CampaignStatus::Stopped,
            "draft": c.status == CampaignStatus::Draft,
            "enabled": c.status == CampaignStatus::Active,
            "schedule_type": def.entry.schedule_type(),
            "first_entry": iso(c.first_entry),
            "last_entry": iso(c.last_entry),
            "channels": def.channels().iter().map(|ch| ch.as_str()).collect::<Vec<_>>(),
            "variants": variants,
            "tags": c.tags,
            "teams": [],
            "steps": steps,
            "message": "success",
        }))
        .into_response())
    })
    .await
}
