//! Campaigns over HTTP: Tideway's management API `/api/v1/campaigns…` (REST key permissions
//! `campaigns.manage` to change, `campaigns.read` — or `campaigns.manage` — to read).
//!
//! - `POST /api/v1/campaigns`: `{name, description?, tags?, …definition}`, a draft;
//! - `GET /api/v1/campaigns`, `GET | PUT | DELETE /api/v1/campaigns/{id}`;
//! - `POST /api/v1/campaigns/{id}/launch | pause | stop`.
//!
//! The definition (variants, control, audience, delivery, re-eligibility, frequency capping,
//! rate limit, conversion events) is parsed by `tideway_core::campaigns::CampaignDefinition`,
//! which fills defaults and gives variants without an id a new UUID; the *canonical* JSON it
//! returns is what is stored and shown. Every template must parse as Liquid, the audience's
//! segments must exist and its filter must be valid in the workspace; a 400 names the place
//! (`{"message": "messages[0].body: …", "errors": [{"field", "message"}]}`).
//!
//! `PUT` replaces what it names: `name`, `description`, `tags`, and any definition key, laid
//! over the stored definition (so `{"rate_limit_per_minute": 100}` changes only that). An
//! active campaign may be edited; it keeps its launch time.
//!
//! Lifecycle: `launch` (draft or paused → active; the launch time is now, so earlier events
//! never trigger it, and an action-based campaign's workspace trigger cursor is placed at the
//! logs' heads before the campaign becomes active), `pause` (active → paused), `stop` (→
//! stopped, final). Any other transition is a 409 saying why.
//!
//! Answers: `{"message": "success", "campaign": {id, name, description, tags, status,
//! created_at, updated_at, launched_at, first_sent, last_sent, …definition}}`, with
//! `"stats": {pending, sent, failed, sends, deliveries, bounces, soft_bounces, opens,
//! unique_opens, clicks, unique_clicks, unsubscribes, conversions, aborts, failures,
//! control_group}` on `GET /api/v1/campaigns/{id}`.

use std::collections::BTreeSet;

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::MAX_DISPLAY_NAME_CHARS;
use tideway_core::campaigns::{
    CampaignAction, CampaignDefinition, CampaignStatus, DefinitionError, Delivery, Trigger,
};
use tideway_core::keys::{Permission, Secret};
use tideway_core::segments::segment_lookup;
use tideway_core::store::{CampaignRecord, CampaignStat, SendCounts, Workspace};
use tideway_segment::{Filter, ValidationContext};

use crate::AppState;
use crate::error::ApiError;
use crate::messaging_api::check_templates;
use crate::pipeline::{management, now, read_json};

/// Keys of a campaign body that are not part of its definition.
const RECORD_KEYS: [&str; 3] = ["name", "description", "tags"];

fn missing(id: &str) -> ApiError {
    ApiError::Missing(format!("no campaign '{id}' in this workspace"))
}

fn iso(m: Option<tideway_core::clock::Millis>) -> Value {
    m.map_or(Value::Null, |m| json!(m.to_iso()))
}

/// A campaign's figures: its queue (`pending`, `sent`, `failed`, exact now) and what its
/// Currents events count (sends, deliveries, bounces, opens, unique opens, clicks, unique
/// clicks, unsubscribes, conversions, aborts, failures, control group; counted by the trigger
/// engine as it reads the log, so they trail it by a fraction of a second).
struct Stats {
    queue: SendCounts,
    counted: Vec<(CampaignStat, u64)>,
}

fn campaign_json(c: &CampaignRecord, stats: Option<Stats>) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(c.id));
    m.insert("name".into(), json!(c.name));
    m.insert("description".into(), json!(c.description));
    m.insert("tags".into(), json!(c.tags));
    m.insert("status".into(), json!(c.status.as_str()));
    m.insert("created_at".into(), json!(c.created_at.to_iso()));
    m.insert("updated_at".into(), json!(c.updated_at.to_iso()));
    m.insert("launched_at".into(), iso(c.launched_at));
    m.insert("first_sent".into(), iso(c.first_sent));
    m.insert("last_sent".into(), iso(c.last_sent));
    if let Value::Object(def) = &c.definition {
        for (k, v) in def {
            m.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    if let Some(s) = stats {
        let mut out = Map::new();
        out.insert("pending".into(), json!(s.queue.pending));
        out.insert("sent".into(), json!(s.queue.sent));
        out.insert("failed".into(), json!(s.queue.failed));
        for (stat, n) in s.counted {
            out.insert(stat.as_str().into(), json!(n));
        }
        m.insert("stats".into(), Value::Object(out));
    }
    json!({"message": "success", "campaign": m})
}

pub(crate) fn definition_error(e: DefinitionError) -> ApiError {
    ApiError::bad_request_with(
        e.to_string(),
        "errors",
        json!([{"field": e.path, "message": e.message}]),
    )
}

pub(crate) fn place_error(path: impl Into<String>, message: impl Into<String>) -> ApiError {
    definition_error(DefinitionError {
        path: path.into(),
        message: message.into(),
    })
}

/// Names and descriptions are plain text: a NUL character is refused (PostgreSQL's text
/// cannot hold one, and no name needs it).
const NO_NUL: &str = "must not contain a NUL character (\\u0000)";

pub(crate) fn name_field(body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match body.get("name") {
        None => Ok(None),
        Some(Value::String(s)) if s.chars().count() > MAX_DISPLAY_NAME_CHARS => Err(place_error(
            "name",
            format!("must be at most {MAX_DISPLAY_NAME_CHARS} characters"),
        )),
        Some(Value::String(s)) if s.contains('\0') => Err(place_error("name", NO_NUL)),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(place_error("name", "must be a non-empty string")),
    }
}

pub(crate) fn description_field(body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match body.get("description") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(String::new())),
        Some(Value::String(s)) if s.contains('\0') => Err(place_error("description", NO_NUL)),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(place_error("description", "must be a string")),
    }
}

pub(crate) fn tags_field(body: &Map<String, Value>) -> Result<Option<Vec<String>>, ApiError> {
    match body.get("tags") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(Vec::new())),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| match t {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(place_error(
                    format!("tags[{i}]"),
                    "must be a non-empty string",
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(place_error("tags", "must be an array of strings")),
    }
}

/// Checks that the segments a campaign or Canvas names are among the workspace's `segments`: its audience's
/// `segment_ids` and its segment-entry triggers (under `delivery_key`: `delivery` for a
/// campaign, `entry` for a Canvas). 400 naming the place otherwise.
pub(crate) fn check_segment_refs(
    segments: &[tideway_core::segments::Segment],
    segment_ids: &[String],
    delivery: &Delivery,
    delivery_key: &str,
) -> Result<(), ApiError> {
    let known = |id: &str| segments.iter().any(|s| s.id == id);
    for (i, id) in segment_ids.iter().enumerate() {
        if !known(id) {
            return Err(place_error(
                format!("audience.segment_ids[{i}]"),
                format!("no segment '{id}' in this workspace"),
            ));
        }
    }
    if let Delivery::ActionBased(action) = delivery {
        for (i, t) in action.triggers.iter().enumerate() {
            if let Trigger::SegmentEntry { segment_id } = t
                && !known(segment_id)
            {
                return Err(place_error(
                    format!("{delivery_key}.triggers[{i}].segment_entry.segment_id"),
                    format!("no segment '{segment_id}' in this workspace"),
                ));
            }
        }
    }
    Ok(())
}

/// Parses and checks a definition: its shape, its templates (Liquid), and its audience
/// against the workspace (segments exist, the filter's cohorts and segments resolve).
pub(crate) async fn checked_definition(
    state: &AppState,
    workspace: &Workspace,
    raw: &Value,
) -> Result<(CampaignDefinition, Value), ApiError> {
    let (def, canonical) = CampaignDefinition::parse(raw, || uuid::Uuid::new_v4().to_string())
        .map_err(definition_error)?;
    check_templates(&def, str::to_owned)?;
    let segments = state.store().list_segments(workspace.id).await?;
    check_segment_refs(
        &segments,
        &def.audience.segment_ids,
        &def.delivery,
        "delivery",
    )?;
    if let Some(raw) = &def.audience.filter {
        let filter =
            Filter::from_json(raw).map_err(|e| place_error("audience.filter", e.to_string()))?;
        let cohorts: BTreeSet<(String, String)> = state
            .store()
            .list_cohorts(workspace.id)
            .await?
            .into_iter()
            .map(|c| (c.partner, c.cohort_id.as_str().to_owned()))
            .collect();
        let lookup = segment_lookup(&segments);
        let ctx = ValidationContext {
            cohorts: &cohorts,
            segments: &lookup,
            segment_id: None,
        };
        filter
            .validate(&ctx)
            .map_err(|e| place_error("audience.filter", e.to_string()))?;
    }
    Ok((def, canonical))
}

/// The key a request presents (Bearer header or `api_key` query parameter), read before any
/// await: a `Request` is not `Sync`, so a borrow of it cannot be held across one.
pub(crate) fn presented_key(req: &Request) -> Option<String> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
        });
    bearer.or_else(|| {
        req.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == "api_key")
                .map(|(_, v)| v.to_owned())
        })
    })
}

/// `campaigns.read`, unless the key has only `campaigns.manage` (managing includes reading):
/// the permission a read is checked against. The key is authenticated by the pipeline after
/// this; here it is only looked at.
async fn read_permission(state: &AppState, key: Option<String>) -> Permission {
    reading(
        state,
        key,
        Permission::CampaignsRead,
        Permission::CampaignsManage,
    )
    .await
}

/// The permission a read needs: `read`, or `manage` for a key that has only that (managing
/// includes reading).
pub(crate) async fn reading(
    state: &AppState,
    key: Option<String>,
    read: Permission,
    manage: Permission,
) -> Permission {
    if let Some(key) = key
        && let Ok(Some((found, _))) = state.store().find_api_key(Secret::new(key).hash()).await
        && !found.permissions.contains(read)
        && found.permissions.contains(manage)
    {
        return manage;
    }
    read
}

async fn load(state: &AppState, ws: &Workspace, id: &str) -> Result<CampaignRecord, ApiError> {
    state
        .store()
        .campaign(ws.id, id)
        .await?
        .ok_or_else(|| missing(id))
}

/// `POST /api/v1/campaigns`: creates a draft.
#[utoipa::path(
    post,
    path = "/api/v1/campaigns",
    tag = "campaigns",
    summary = "Create a campaign (a draft)",
    request_body(content = Object, description = "`{\"name\": string, \"description\"?: string, \"tags\"?: [string], \"messages\": [{id?, name?, percent?, channel: \"email\" | \"webhook\", …}], \"control_percent\"?, \"audience\"?: {segment_ids?, filter?}, \"delivery\"?: {type: \"api_triggered\" | \"scheduled\" | \"action_based\", …}, \"reeligibility\"?, \"frequency_capping\"?, \"rate_limit_per_minute\"?, \"conversion_events\"?}` (see README, Campaigns)"),
    responses(
        (status = 201, description = "`{\"message\": \"success\", \"campaign\": {id, name, description, tags, status, created_at, updated_at, launched_at, first_sent, last_sent, …canonical definition}}`", body = Object),
        (status = 400, description = "A field that does not parse, a template that is not valid Liquid, percents not adding up to 100, an unknown segment: `{\"message\": \"<place>: <problem>\", \"errors\": [{field, message}]}`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn create(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CampaignsManage,
        req,
        |state, caller, req| async move {
            let body = read_json(req).await?;
            let name = name_field(&body)?.ok_or_else(|| place_error("name", "is required"))?;
            let description = description_field(&body)?.unwrap_or_default();
            let tags = tags_field(&body)?.unwrap_or_default();
            // Held to the save: a segment cannot be deleted between its check and the save.
            let _definitions = state.segment_definitions(caller.workspace.id).await?;
            let (_, canonical) =
                checked_definition(&state, &caller.workspace, &Value::Object(body)).await?;
            let at = now();
            let record = CampaignRecord {
                id: uuid::Uuid::new_v4().to_string(),
                name,
                description,
                tags,
                status: CampaignStatus::Draft,
                definition: canonical,
                created_at: at,
                updated_at: at,
                launched_at: None,
                next_run: None,
                first_sent: None,
                last_sent: None,
            };
            let saved = state
                .store()
                .create_campaign(caller.workspace.id, record)
                .await?;
            Ok((StatusCode::CREATED, axum::Json(campaign_json(&saved, None))).into_response())
        },
    )
    .await
}

/// `GET /api/v1/campaigns`.
#[utoipa::path(
    get,
    path = "/api/v1/campaigns",
    tag = "campaigns",
    summary = "List the workspace's campaigns (oldest first)",
    responses((status = 200, description = "`{\"message\": \"success\", \"campaigns\": [<campaign>]}` (without stats)", body = Object)),
    security(("bearer_auth" = []))
)]
pub async fn list(State(state): State<AppState>, req: Request) -> Response {
    let permission = read_permission(&state, presented_key(&req)).await;
    management(state, permission, req, |state, caller, _| async move {
        let campaigns = state.store().list_campaigns(caller.workspace.id).await?;
        let items: Vec<Value> = campaigns
            .iter()
            .map(|c| campaign_json(c, None)["campaign"].take())
            .collect();
        Ok(axum::Json(json!({"message": "success", "campaigns": items})).into_response())
    })
    .await
}

/// `GET /api/v1/campaigns/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/campaigns/{id}",
    tag = "campaigns",
    summary = "Read one campaign with its send counts",
    params(("id" = String, Path, description = "Campaign id")),
    responses(
        (status = 200, description = "`{\"message\": \"success\", \"campaign\": {…, \"stats\": {pending, sent, failed, sends, deliveries, bounces, soft_bounces, opens, unique_opens, clicks, unique_clicks, unsubscribes, conversions, aborts, failures, control_group}}}`", body = Object),
        (status = 404, description = "No such campaign", body = crate::wire::ErrorBody),
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
        let c = load(&state, &caller.workspace, &id).await?;
        let queue = state
            .store()
            .campaign_send_counts(caller.workspace.id, &id)
            .await?;
        let counted = state
            .store()
            .campaign_stats(caller.workspace.id, &id)
            .await?;
        Ok(axum::Json(campaign_json(&c, Some(Stats { queue, counted }))).into_response())
    })
    .await
}

/// `PUT /api/v1/campaigns/{id}`.
#[utoipa::path(
    put,
    path = "/api/v1/campaigns/{id}",
    tag = "campaigns",
    summary = "Change a campaign (what the body names; definition keys replace the stored ones)",
    params(("id" = String, Path, description = "Campaign id")),
    request_body(content = Object, description = "Any of `name`, `description`, `tags` and the definition keys"),
    responses(
        (status = 200, description = "The updated campaign", body = Object),
        (status = 400, description = "As for create", body = crate::wire::ErrorBody),
        (status = 404, description = "No such campaign", body = crate::wire::ErrorBody),
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
        Permission::CampaignsManage,
        req,
        |state, caller, req| async move {
            let ws = &caller.workspace;
            let body = read_json(req).await?;
            let mut c = load(&state, ws, &id).await?;
            if let Some(name) = name_field(&body)? {
                c.name = name;
            }
            if let Some(d) = description_field(&body)? {
                c.description = d;
            }
            if let Some(t) = tags_field(&body)? {
                c.tags = t;
            }
            let mut definition = match c.definition.clone() {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            let mut changed = false;
            for (k, v) in body {
                if !RECORD_KEYS.contains(&k.as_str()) {
                    definition.insert(k, v);
                    changed = true;
                }
            }
            // Held to the save: a segment cannot be deleted between its check and the save.
            let _definitions = if changed {
                let lock = state.segment_definitions(ws.id).await?;
                let (_, canonical) =
                    checked_definition(&state, ws, &Value::Object(definition)).await?;
                c.definition = canonical;
                Some(lock)
            } else {
                None
            };
            c.updated_at = now();
            let saved = state
                .store()
                .save_campaign(ws.id, c)
                .await?
                .ok_or_else(|| missing(&id))?;
            Ok(axum::Json(campaign_json(&saved, None)).into_response())
        },
    )
    .await
}

/// `DELETE /api/v1/campaigns/{id}`.
#[utoipa::path(
    delete,
    path = "/api/v1/campaigns/{id}",
    tag = "campaigns",
    summary = "Delete a campaign and its pending sends (sent messages stay trackable)",
    params(("id" = String, Path, description = "Campaign id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such campaign", body = crate::wire::ErrorBody),
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
        Permission::CampaignsManage,
        req,
        |state, caller, _| async move {
            if !state
                .store()
                .delete_campaign(caller.workspace.id, &id)
                .await?
            {
                return Err(missing(&id));
            }
            Ok(StatusCode::NO_CONTENT.into_response())
        },
    )
    .await
}

/// The lifecycle action a path names (`launch`, `pause` or `stop`) of a `what` (campaign,
/// Canvas); another is a 404.
pub(crate) fn parse_action(raw: &str, what: &str) -> Result<CampaignAction, ApiError> {
    match raw {
        "launch" => Ok(CampaignAction::Launch),
        "pause" => Ok(CampaignAction::Pause),
        "stop" => Ok(CampaignAction::Stop),
        other => Err(ApiError::Missing(format!(
            "no {what} action '{other}' (launch, pause or stop)"
        ))),
    }
}

/// The status `action` takes a `what` (campaign, Canvas) in status `from` to, or the 409
/// saying why it cannot.
pub(crate) fn transition(
    action: CampaignAction,
    from: CampaignStatus,
    what: &str,
) -> Result<CampaignStatus, ApiError> {
    action.apply(from).ok_or_else(|| {
        let why = match action {
            CampaignAction::Launch => format!("only a draft or paused {what} can be launched"),
            CampaignAction::Pause => format!("only an active {what} can be paused"),
            CampaignAction::Stop => "it is stopped already (stopping is final)".to_owned(),
        };
        ApiError::Conflict(format!("the {what} is {}: {why}", from.as_str()))
    })
}

/// Applies a lifecycle action (launch, pause, stop) to a stored campaign: the one path for the
/// API and the dashboard.
pub(crate) async fn change_status(
    state: &AppState,
    ws: &Workspace,
    id: &str,
    action: CampaignAction,
) -> Result<CampaignRecord, ApiError> {
    let mut c = load(state, ws, id).await?;
    let to = transition(action, c.status, "campaign")?;
    let at = now();
    if action == CampaignAction::Launch {
        let def = CampaignDefinition::load(&c.definition).map_err(|e| {
            tracing::error!(campaign = %c.id, error = %e, "stored campaign does not load");
            ApiError::Internal
        })?;
        if let Delivery::Scheduled(schedule) = &def.delivery
            && c.status == CampaignStatus::Draft
            && schedule
                .next_after(tideway_core::clock::Millis(at.0 - 1))
                .is_none()
        {
            // Launched, it would never send (the scheduler starts after the launch): say so
            // rather than accept it silently.
            return Err(place_error(
                "delivery.schedule",
                "the schedule has no occurrence after now (its time has passed): move it into the future, or use a trigger send",
            ));
        }
        // Before the campaign is active, whatever its delivery: the trigger engine must
        // never read the logs from their start for it, and must count the stats of its first
        // messages (a cursor the engine starts itself begins at the heads, past them).
        tideway_messaging::triggers::start_cursor(state.store(), ws.id).await?;
        c.launched_at = Some(at);
        c.next_run = None;
    }
    c.status = to;
    c.updated_at = at;
    state
        .store()
        .save_campaign(ws.id, c)
        .await?
        .ok_or_else(|| missing(id))
}

/// `POST /api/v1/campaigns/{id}/{action}`: `launch`, `pause` or `stop`.
#[utoipa::path(
    post,
    path = "/api/v1/campaigns/{id}/{action}",
    tag = "campaigns",
    summary = "Launch, pause or stop a campaign",
    params(
        ("id" = String, Path, description = "Campaign id"),
        ("action" = String, Path, description = "`launch` (draft or paused → active), `pause` (active → paused) or `stop` (→ stopped, final)"),
    ),
    responses(
        (status = 200, description = "The campaign in its new status", body = Object),
        (status = 404, description = "No such campaign or action", body = crate::wire::ErrorBody),
        (status = 409, description = "The transition is not allowed from the campaign's status", body = crate::wire::ErrorBody),
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
        Permission::CampaignsManage,
        req,
        |state, caller, _| async move {
            let action = parse_action(&action, "campaign")?;
            let saved = change_status(&state, &caller.workspace, &id, action).await?;
            Ok(axum::Json(campaign_json(&saved, None)).into_response())
        },
    )
    .await
}

/// `GET /api/v1/messaging/settings`: the workspace's messaging settings.
#[utoipa::path(
    get,
    path = "/api/v1/messaging/settings",
    tag = "campaigns",
    summary = "Read the workspace's messaging settings (frequency caps)",
    responses((status = 200, description = "`{\"message\": \"success\", \"settings\": {\"frequency_caps\": [{max, window_seconds}]}}`", body = Object)),
    security(("bearer_auth" = []))
)]
pub async fn settings(State(state): State<AppState>, req: Request) -> Response {
    let permission = read_permission(&state, presented_key(&req)).await;
    management(state, permission, req, |state, caller, _| async move {
        let settings = state
            .store()
            .messaging_settings(caller.workspace.id)
            .await?
            .unwrap_or_else(|| json!({"frequency_caps": []}));
        Ok(axum::Json(json!({"message": "success", "settings": settings})).into_response())
    })
    .await
}

/// `PUT /api/v1/messaging/settings`: replaces the workspace's messaging settings.
#[utoipa::path(
    put,
    path = "/api/v1/messaging/settings",
    tag = "campaigns",
    summary = "Replace the workspace's messaging settings (frequency caps across campaigns)",
    request_body(content = Object, description = "`{\"frequency_caps\": [{\"max\": 3, \"window_seconds\": 86400}]}` (at most 10 rules, windows up to 30 days); campaigns with `frequency_capping: true` obey them"),
    responses(
        (status = 200, description = "`{\"message\": \"success\", \"settings\": …}`", body = Object),
        (status = 400, description = "A rule that does not parse, named by its place", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn save_settings(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CampaignsManage,
        req,
        |state, caller, req| async move {
            let body = Value::Object(read_json(req).await?);
            let caps = tideway_core::campaigns::FrequencyCap::parse_rules(&body)
                .map_err(definition_error)?;
            let settings = json!({
                "frequency_caps": caps
                    .iter()
                    .map(|c| json!({"max": c.max, "window_seconds": c.window_secs}))
                    .collect::<Vec<_>>(),
            });
            state
                .store()
                .save_messaging_settings(caller.workspace.id, settings.clone())
                .await?;
            Ok(axum::Json(json!({"message": "success", "settings": settings})).into_response())
        },
    )
    .await
}
