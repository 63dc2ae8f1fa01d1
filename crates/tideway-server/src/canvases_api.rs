//! Canvas over HTTP: Tideway's management API (`/api/v1/canvases…`: create, read, update —
//! each definition edit a new version —, delete, `launch` / `pause` / `stop`; permissions
//! `canvas.manage` / `canvas.read`) and Braze's endpoints (`POST /canvas/trigger/send`,
//! `/canvas/trigger/schedule/{create,update,delete}`, `GET /canvas/list`,
//! `GET /canvas/details`). A trigger's recipients, `broadcast` and `audience` are read by the
//! campaigns' parser; a broadcast or a schedule is a Canvas entry dispatch (the campaigns'
//! scheduled dispatch, whose users the Canvas engine enters), moved and cancelled by the
//! campaigns' schedule code.
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
use tideway_core::clock::Millis;
use tideway_core::ids::UserSeq;
use tideway_core::keys::Permission;
use tideway_core::store::{
    CanvasRecipient, CanvasRecord, DispatchRecord, DispatchSource, Enqueue, SendCounts, StepCounts,
    Workspace,
};
use tideway_messaging::canvas::{Entrant, step_dispatch_id};
use tideway_messaging::sends::{Target, resolve};

use crate::AppState;
use crate::campaigns_api::{
    check_segment_refs, definition_error, description_field, name_field, parse_action, place_error,
    presented_key, reading, tags_field, transition,
};
use crate::error::ApiError;
use crate::messaging_api::{ListQuery, apply_updates, messaging, not_enabled, parse_targets};
use crate::pipeline::{counted_as_broadcast, management, now, read_json};
use crate::schedule_api::{ScheduleOf, delete_schedule, parse_schedule, update_schedule};

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

/// Checks that the segments a definition names (entry audience, segment-entry triggers)
/// exist in the workspace.
async fn check_segments(
    state: &AppState,
    ws: &Workspace,
    def: &CanvasDefinition,
) -> Result<(), ApiError> {
    let segments = state.store().list_segments(ws.id).await?;
    check_segment_refs(&segments, &def.audience.segment_ids, &def.entry, "entry")
}

/// `canvas.read`, or `canvas.manage` for a key that has only that (managing includes reading).
async fn read_permission(state: &AppState, key: Option<String>) -> Permission {
    reading(state, key, Permission::CanvasRead, Permission::CanvasManage).await
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
    let (def, canonical) = checked(&Value::Object(body))?;
    // Held to the save: a segment cannot be deleted between its check and the save.
    let _definitions = state.segment_definitions(ws.id).await?;
    check_segments(state, ws, &def).await?;
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
    // Held to the save: a segment cannot be deleted between its check and the save.
    let mut _definitions = None;
    if !def_part.is_empty() {
        let (def, canonical) = checked(&Value::Object(def_part))?;
        _definitions = Some(state.segment_definitions(ws.id).await?);
        check_segments(state, ws, &def).await?;
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
    let to = transition(action, c.status, "Canvas")?;
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
#[utoipa::path(
    post,
    path = "/api/v1/canvases",
    tag = "canvas",
    summary = "Create a Canvas (a draft)",
    request_body(content = Object, description = "`{\"name\": string, \"description\"?, \"tags\"?, \"entry\": {type: \"api_triggered\" | \"scheduled\" | \"action_based\", …}, \"audience\"?, \"reentry\"?, \"entry_limit\"?, \"exception_events\"?, \"conversion_events\"?, \"variants\"?, \"steps\": [{id, name?, type: \"message\" | \"delay\" | \"audience_paths\" | \"decision_split\" | \"action_paths\" | \"experiment_paths\" | \"user_update\", …, next?}]}` (see README, Canvas)"),
    responses(
        (status = 201, description = "`{\"message\": \"success\", \"canvas\": {id, name, description, tags, status, created_at, updated_at, …canonical definition}}`", body = Object),
        (status = 400, description = "A field that does not parse, a step graph with a cycle or an unreachable step, an unknown segment: `{\"message\": \"<place>: <problem>\"}`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
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
#[utoipa::path(
    get,
    path = "/api/v1/canvases",
    tag = "canvas",
    summary = "List the workspace's Canvases (oldest first)",
    responses((status = 200, description = "`{\"message\": \"success\", \"canvases\": [<canvas>]}`", body = Object)),
    security(("bearer_auth" = []))
)]
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
#[utoipa::path(
    get,
    path = "/api/v1/canvases/{id}",
    tag = "canvas",
    summary = "Read one Canvas with its step figures",
    params(("id" = String, Path, description = "Canvas id")),
    responses(
        (status = 200, description = "`{\"message\": \"success\", \"canvas\": {…, \"step_stats\": {<step id>: {in_step, entered, progressed, exited, conversions, messages?: {pending, sent, failed}}}}}`", body = Object),
        (status = 404, description = "No such Canvas", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
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
#[utoipa::path(
    put,
    path = "/api/v1/canvases/{id}",
    tag = "canvas",
    summary = "Change a Canvas (a definition change is a new version; journeys under way keep theirs)",
    params(("id" = String, Path, description = "Canvas id")),
    request_body(content = Object, description = "Any of `name`, `description`, `tags` and the definition keys"),
    responses(
        (status = 200, description = "The updated Canvas", body = Object),
        (status = 400, description = "As for create", body = crate::wire::ErrorBody),
        (status = 404, description = "No such Canvas", body = crate::wire::ErrorBody),
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
#[utoipa::path(
    delete,
    path = "/api/v1/canvases/{id}",
    tag = "canvas",
    summary = "Delete a Canvas with its journeys",
    params(("id" = String, Path, description = "Canvas id")),
    responses(
        (status = 200, description = "`{\"message\": \"success\"}`", body = Object),
        (status = 404, description = "No such Canvas", body = crate::wire::ErrorBody),
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
#[utoipa::path(
    post,
    path = "/api/v1/canvases/{id}/{action}",
    tag = "canvas",
    summary = "Launch, pause or stop a Canvas",
    params(
        ("id" = String, Path, description = "Canvas id"),
        ("action" = String, Path, description = "`launch` (draft or paused → active), `pause` (active → paused: journeys wait) or `stop` (→ stopped, final)"),
    ),
    responses(
        (status = 200, description = "The Canvas in its new status", body = Object),
        (status = 404, description = "No such Canvas or action", body = crate::wire::ErrorBody),
        (status = 409, description = "The transition is not allowed from the Canvas's status", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
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
            let action = parse_action(&action, "Canvas")?;
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

/// A properties object (`canvas_entry_properties` / `context`, at `prefix`), merged:
/// `context` wins.
fn entry_properties(
    o: &Map<String, Value>,
    prefix: &str,
) -> Result<Option<Map<String, Value>>, ApiError> {
    let mut out: Option<Map<String, Value>> = None;
    for key in ["canvas_entry_properties", "context"] {
        match o.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                out.get_or_insert_with(Map::new).extend(m.clone());
            }
            Some(_) => return Err(bad(format!("{prefix}{key} must be an object"))),
        }
    }
    if let Some(m) = &out
        && Value::Object(m.clone()).to_string().len() > 50 * 1024
    {
        return Err(bad(format!(
            "{prefix}canvas_entry_properties/context exceed 50 KB"
        )));
    }
    Ok(out)
}

const PAUSED: &str =
    "The Canvas is paused. Resume the Canvas to ensure trigger requests will take effect.";
const ARCHIVED: &str =
    "The Canvas is archived. Unarchive the Canvas to ensure trigger requests will take effect.";

fn of_canvas(body: &Map<String, Value>) -> Result<ScheduleOf, ApiError> {
    canvas_field(body).map(ScheduleOf::Canvas)
}

fn canvas_field(body: &Map<String, Value>) -> Result<String, ApiError> {
    match body.get("canvas_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(bad("canvas_id is required")),
        Some(_) => Err(bad("canvas_id must be a string")),
    }
}

/// What a Canvas trigger did: the dispatch id, the non-fatal errors and Braze's notice for
/// a Canvas that is not active (nothing entered).
struct Triggered {
    dispatch_id: String,
    errors: Vec<String>,
    notice: Option<&'static str>,
}

/// An API entry into a Canvas, now or at `schedule` (`/canvas/trigger/send`,
/// `/canvas/trigger/schedule/create`). Named recipients entering now enter in the request;
/// a broadcast (the Canvas's entry audience, narrowed by `audience`) and any scheduled entry
/// become a Canvas entry dispatch, which the Canvas engine enters when due, in chunks.
async fn canvas_trigger(
    state: &AppState,
    caller: &crate::pipeline::Caller,
    body: &Map<String, Value>,
    schedule: Option<Millis>,
) -> Result<Triggered, ApiError> {
    let canvas_id = canvas_field(body)?;
    let shared = entry_properties(body, "")?;
    let targets = parse_targets(body, now(), entry_properties)?;
    let ws = &caller.workspace;
    // Fatal checks first: nothing (not even attributes) is written for a refused request.
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
    crate::messaging_api::check_segment_id(state, ws.id, body).await?;
    let dispatch_id = tideway_messaging::plan::new_dispatch_id();
    if canvas.status != CampaignStatus::Active {
        let notice = match canvas.status {
            CampaignStatus::Stopped => ARCHIVED,
            _ => PAUSED,
        };
        return Ok(Triggered {
            dispatch_id,
            errors: Vec::new(),
            notice: Some(notice),
        });
    }
    let errors = apply_updates(state, ws, targets.updates).await?;
    let recipients = match targets.target {
        Target::Recipients(list) => {
            let (users, _missing) = resolve(state.store(), ws, list).await?;
            let merged = |own: Option<Map<String, Value>>| match (&shared, own) {
                (None, None) => None,
                (a, b) => {
                    let mut m = a.clone().unwrap_or_default();
                    m.extend(b.unwrap_or_default());
                    Some(Value::Object(m).to_string())
                }
            };
            let list: Vec<CanvasRecipient> = users
                .into_iter()
                .map(|(user, own)| CanvasRecipient {
                    user,
                    properties: merged(own),
                })
                .collect();
            if schedule.is_none() {
                let entrants = list
                    .into_iter()
                    .map(|r| Entrant {
                        user: r.user,
                        properties: r.properties,
                        due_at: None,
                    })
                    .collect();
                if let Some(api) = messaging(state) {
                    api.engine
                        .canvas()
                        .enter(ws.id, &canvas, entrants, targets.audience.as_ref())
                        .await?;
                }
                return Ok(Triggered {
                    dispatch_id,
                    errors,
                    notice: None,
                });
            }
            Some(list)
        }
        Target::Broadcast => None,
    };
    let shared_text = match &recipients {
        // Named recipients carry their merged properties.
        Some(_) => None,
        None => shared.map(|m| Value::Object(m).to_string()),
    };
    let dispatch = DispatchRecord {
        id: dispatch_id.clone(),
        workspace: ws.id,
        source: DispatchSource::Canvas {
            canvas_id: canvas.id.clone(),
            recipients,
        },
        send_id: None,
        per_user_ids: false,
        properties: shared_text,
        audience: targets.audience,
        created_at: now(),
        expanding_after: Some(UserSeq(0)),
        not_before: schedule,
    };
    state
        .store()
        .enqueue(
            ws.id,
            Enqueue {
                dispatches: vec![dispatch],
                ..Enqueue::default()
            },
        )
        .await?;
    Ok(Triggered {
        dispatch_id,
        errors,
        notice: None,
    })
}

/// `POST /canvas/trigger/send`: enters named recipients, or (`broadcast: true`, or an
/// `audience` alone) the Canvas's entry audience narrowed by `audience`, into an
/// API-triggered Canvas.
#[utoipa::path(
    post,
    path = "/canvas/trigger/send",
    tag = "canvas",
    summary = "Braze: enter users into an API-triggered Canvas (canvas.trigger.send)",
    request_body(content = Object, description = "`{canvas_id, canvas_entry_properties?, context?, broadcast?, audience?, segment_id?, recipients?: [{external_user_id | user_alias | braze_id | email, canvas_entry_properties?, context?, attributes?, send_to_existing_only?}]}` (≤ 50 recipients, properties ≤ 50 KB)"),
    responses(
        (status = 201, description = "`{\"dispatch_id\", \"message\": \"success\"}` (+ Braze's `notice` when the Canvas is not active)", body = Object),
        (status = 400, description = "Braze's labels: `Bad Request`, `No Recipients`, an unknown Canvas", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn trigger_send(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CanvasTriggerSend,
        req,
        |state, caller, req| async move {
            let body = read_json(req).await?;
            counted_as_broadcast(&state, &caller, &body, async {
                if messaging(&state).is_none() {
                    return Ok(not_enabled());
                }
                let triggered = canvas_trigger(&state, &caller, &body, None).await?;
                Ok(triggered.answer(false))
            })
            .await
        },
    )
    .await
}

impl Triggered {
    /// Braze's 201: `dispatch_id` (and `schedule_id`, the same, for a schedule), `errors`
    /// for refused attributes, `notice` for a Canvas that is not active.
    fn answer(self, scheduled: bool) -> Response {
        let mut body = json!({"dispatch_id": self.dispatch_id, "message": "success"});
        if scheduled {
            body["schedule_id"] = json!(self.dispatch_id);
        }
        if !self.errors.is_empty() {
            body["errors"] = json!(self.errors);
        }
        if let Some(notice) = self.notice {
            body["notice"] = json!(notice);
        }
        (StatusCode::CREATED, axum::Json(body)).into_response()
    }
}

/// `POST /canvas/trigger/schedule/create`: the `/canvas/trigger/send` body plus
/// `schedule: {time}`; the entry happens at that time (a Canvas entry dispatch whose
/// `schedule_id` is its `dispatch_id`).
#[utoipa::path(
    post,
    path = "/canvas/trigger/schedule/create",
    tag = "canvas",
    summary = "Braze: schedule a Canvas entry (canvas.trigger.schedule.create)",
    request_body(content = Object, description = "The `/canvas/trigger/send` body plus `schedule: {time}` (UTC)"),
    responses(
        (status = 201, description = "`{\"dispatch_id\", \"schedule_id\", \"message\": \"success\"}`", body = Object),
        (status = 400, description = "As for send, or a bad or past `schedule.time`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn trigger_schedule_create(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CanvasTriggerScheduleCreate,
        req,
        |state, caller, req| async move {
            if messaging(&state).is_none() {
                return Ok(not_enabled());
            }
            let body = read_json(req).await?;
            let at = parse_schedule(&body, now())?;
            Ok(canvas_trigger(&state, &caller, &body, Some(at))
                .await?
                .answer(true))
        },
    )
    .await
}

/// `POST /canvas/trigger/schedule/update`: `{canvas_id, schedule_id, schedule}` moves a
/// scheduled entry that has not started.
#[utoipa::path(
    post,
    path = "/canvas/trigger/schedule/update",
    tag = "canvas",
    summary = "Braze: move a scheduled Canvas entry (canvas.trigger.schedule.update)",
    request_body(content = Object, description = "`{canvas_id, schedule_id, schedule: {time}}`"),
    responses(
        (status = 201, description = "`{\"message\": \"success\"}`", body = Object),
        (status = 400, description = "`Invalid schedule_id` (unknown, or of another Canvas), or a bad time", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn trigger_schedule_update(State(state): State<AppState>, req: Request) -> Response {
    update_schedule(
        state,
        req,
        Permission::CanvasTriggerScheduleUpdate,
        of_canvas,
    )
    .await
}

/// `POST /canvas/trigger/schedule/delete`: `{canvas_id, schedule_id}` cancels a scheduled
/// entry (what has entered stays).
#[utoipa::path(
    post,
    path = "/canvas/trigger/schedule/delete",
    tag = "canvas",
    summary = "Braze: cancel a scheduled Canvas entry (canvas.trigger.schedule.delete)",
    request_body(content = Object, description = "`{canvas_id, schedule_id}`"),
    responses(
        (status = 201, description = "`{\"message\": \"success\"}`", body = Object),
        (status = 400, description = "`Invalid schedule_id` (unknown, or of another Canvas)", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn trigger_schedule_delete(State(state): State<AppState>, req: Request) -> Response {
    delete_schedule(
        state,
        req,
        Permission::CanvasTriggerScheduleDelete,
        of_canvas,
    )
    .await
}

/// `GET /canvas/list`: `{"canvases": [{id, last_edited, name, tags}], "message"}`, 100 per
/// page, oldest first.
#[utoipa::path(
    get,
    path = "/canvas/list",
    tag = "canvas",
    summary = "Braze: list Canvases (canvas.list)",
    params(
        ("page" = Option<usize>, Query, description = "Page number from 0 (100 Canvases per page)"),
        ("include_archived" = Option<bool>, Query, description = "Accepted; Tideway has no archived Canvases"),
        ("sort_direction" = Option<String>, Query, description = "`asc` (oldest first, the default) or `desc`"),
        ("last_edit.time[gt]" = Option<String>, Query, description = "Only Canvases edited after this ISO 8601 time"),
    ),
    responses(
        (status = 200, description = "`{\"canvases\": [{id, last_edited, name, tags}], \"message\": \"success\"}`", body = Object),
        (status = 400, description = "A parameter that does not parse", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn braze_list(
    State(state): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    req: Request,
) -> Response {
    management(state, Permission::CanvasList, req, |state, caller, _| async move {
        let list = ListQuery::parse(&q)?;
        let all = state.store().list_canvases(caller.workspace.id).await?;
        let items: Vec<Value> = list
            .page(all, |c| c.updated_at)
            .iter()
            .map(|c| json!({"id": c.id, "last_edited": c.updated_at.to_iso(), "name": c.name, "tags": c.tags}))
            .collect();
        Ok(axum::Json(json!({"canvases": items, "message": "success"})).into_response())
    })
    .await
}

/// `GET /canvas/details?canvas_id=`.
#[utoipa::path(
    get,
    path = "/canvas/details",
    tag = "canvas",
    summary = "Braze: Canvas details (canvas.details)",
    params(("canvas_id" = String, Query, description = "The Canvas's id")),
    responses(
        (status = 200, description = "`{message, created_at, updated_at, name, description, archived, draft, enabled, schedule_type, first_entry, last_entry, channels, variants: [{name, id, first_step_ids}], tags, teams, steps: [{name, type, id, next_step_ids, next_paths, channels, messages}]}`", body = Object),
        (status = 400, description = "`canvas_id must be a string of the Canvas api identifier` (missing or unknown)", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
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
