//! Braze's scheduled API sends (`braze-messaging.md` §3.4) and send ids (§3.5):
//! `/campaigns/trigger/schedule/{create,update,delete}`, `/messages/schedule/{create,update,
//! delete}`, `POST /sends/id/create` and `GET /sends/data_series`.
//!
//! A scheduled send is a dispatch whose jobs (or, for a broadcast, whose expansion) wait until
//! the schedule's time; Tideway's `schedule_id` is the dispatch's id (Our choice: one name for
//! one thing). Updating moves the dispatch's pending jobs and expansion to the new time;
//! deleting cancels what has not gone out. Both are best-effort near the send time, as Braze
//! says: what is already claimed goes.
//!
//! `schedule.in_local_time` and `schedule.at_optimal_time` are refused with a 400 naming them:
//! Tideway sends a scheduled API dispatch at one instant for everyone (a recurring campaign's
//! `scheduled` delivery is where per-user time lives).
//!
//! A send id's daily series counts the Currents events of the messages sent with it
//! (`tideway_messaging::stats`), per UTC day. **Our choice:** days are UTC days (`ending_at`
//! picks the UTC day it falls in); figures are kept as long as the campaign (Braze keeps them 14
//! days); purchase revenue is not attributed, so no `revenue` field; a conversion names no
//! channel, so conversions are the day's only (not per variation).

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::campaigns::{CampaignDefinition, CampaignStatus, Delivery};
use tideway_core::canvas::CanvasDefinition;
use tideway_core::clock::{Millis, parse_datetime};
use tideway_core::keys::Permission;
use tideway_core::store::{SendSeriesFigure, SendStat, StoreError};

use crate::AppState;
use crate::error::ApiError;
use crate::messaging_api::{
    INVALID_CAMPAIGN, is_send_id, messaging, not_enabled, send_adhoc, send_id_rule, trigger,
};
use crate::pipeline::{management, now, read_json};

/// Most new `(send_id, campaign_id)` pairs per workspace per UTC day (Braze: 100).
pub const MAX_SEND_IDS_PER_DAY: u32 = 100;
/// Most days one `/sends/data_series` answer covers (Braze: `length` 1 to 100).
const MAX_SERIES_DAYS: i64 = 100;
const DAY_MS: i64 = 86_400_000;

pub(crate) const INVALID_SCHEDULE_ID: &str = "Invalid schedule_id";

/// Reads `schedule` (required): `{"time": ISO 8601, "in_local_time"?: false,
/// "at_optimal_time"?: false}` → the instant. A time in the past is refused.
pub fn parse_schedule(body: &Map<String, Value>, now: Millis) -> Result<Millis, ApiError> {
    let Some(schedule) = body.get("schedule").filter(|v| !v.is_null()) else {
        return Err(ApiError::malformed("schedule is required"));
    };
    let Value::Object(schedule) = schedule else {
        return Err(ApiError::malformed(
            "schedule must be an object like {\"time\": \"2026-05-24T20:30:36Z\"}",
        ));
    };
    for flag in ["in_local_time", "at_optimal_time"] {
        match schedule.get(flag) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => {
                return Err(ApiError::malformed(format!(
                    "schedule.{flag} is not supported: Tideway sends a scheduled API send at one time for everyone; give schedule.time in UTC"
                )));
            }
            Some(_) => {
                return Err(ApiError::malformed(format!(
                    "schedule.{flag} must be true or false"
                )));
            }
        }
    }
    let time = match schedule.get("time") {
        Some(Value::String(t)) => parse_datetime(t).ok_or_else(|| {
            ApiError::malformed(format!(
                "schedule.time {t:?} is not an ISO 8601 time in the years 0 to 3000 (e.g. 2026-05-24T20:30:36Z)"
            ))
        })?,
        None | Some(Value::Null) => return Err(ApiError::malformed("schedule.time is required")),
        Some(_) => return Err(ApiError::malformed("schedule.time must be a string")),
    };
    if time.0 < now.0 {
        return Err(ApiError::malformed(
            "schedule.time is in the past; to send now use the send endpoint",
        ));
    }
    Ok(time)
}

fn schedule_id(body: &Map<String, Value>) -> Result<String, ApiError> {
    match body.get("schedule_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(ApiError::malformed("schedule_id is required")),
        Some(_) => Err(ApiError::malformed("schedule_id must be a string")),
    }
}

/// A new schedule's 201, with its `send_id` when it has one.
fn created(dispatch_id: &str, send_id: Option<&str>, errors: Vec<String>) -> Response {
    let mut body =
        json!({"dispatch_id": dispatch_id, "schedule_id": dispatch_id, "message": "success"});
    if let Some(send_id) = send_id {
        body["send_id"] = json!(send_id);
    }
    if !errors.is_empty() {
        body["errors"] = json!(errors);
    }
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

fn success() -> Response {
    (
        StatusCode::CREATED,
        axum::Json(json!({"message": "success"})),
    )
        .into_response()
}

/// Whose scheduled dispatch a request names.
#[derive(Debug, Clone)]
pub(crate) enum ScheduleOf {
    Campaign(String),
    AdHoc,
    Canvas(String),
}

/// Reads from a schedule `update` / `delete` body whose schedule it names (`campaign_id`,
/// `canvas_id`, or nobody's for `/messages/schedule/*`), refusing what the endpoint refuses.
pub(crate) type OwnerOf = fn(&Map<String, Value>) -> Result<ScheduleOf, ApiError>;

fn of_campaign(body: &Map<String, Value>) -> Result<ScheduleOf, ApiError> {
    campaign_field(body).map(ScheduleOf::Campaign)
}

fn of_messages(_body: &Map<String, Value>) -> Result<ScheduleOf, ApiError> {
    Ok(ScheduleOf::AdHoc)
}

/// A schedule `update` (`/campaigns/trigger/schedule/update`, `/messages/schedule/update`,
/// `/canvas/trigger/schedule/update`): `{…, schedule_id, schedule}` moves a scheduled
/// dispatch of the owner the body names; `/messages/schedule/update` may instead, or as well,
/// replace its `messages` (Braze: at least one of the two).
pub(crate) async fn update_schedule(
    state: AppState,
    req: Request,
    permission: Permission,
    owner_of: OwnerOf,
) -> Response {
    management(
        state,
        permission,
        req,
        move |state, caller, req| async move {
            let body = read_json(req).await?;
            let of = owner_of(&body)?;
            let id = schedule_id(&body)?;
            let messages = match of {
                ScheduleOf::AdHoc => body.get("messages").filter(|m| !m.is_null()),
                ScheduleOf::Campaign(_) | ScheduleOf::Canvas(_) => None,
            };
            let no_schedule = body.get("schedule").is_none_or(Value::is_null);
            let at = if messages.is_some() && no_schedule {
                None
            } else if no_schedule && matches!(of, ScheduleOf::AdHoc) {
                // Either changes an ad-hoc send: say so, not only that `schedule` is missing.
                return Err(ApiError::malformed("schedule or messages is required"));
            } else {
                Some(parse_schedule(&body, now())?)
            };
            owned_dispatch(&state, caller.workspace.id, &id, &of).await?;
            if let Some(messages) = messages {
                replace_messages(&state, caller.workspace.id, &id, messages).await?;
            }
            match at {
                Some(at) => reschedule(&state, caller.workspace.id, &id, at).await,
                None => Ok(success()),
            }
        },
    )
    .await
}

/// A schedule `delete`: `{…, schedule_id}` cancels a scheduled dispatch of the owner the
/// body names (what has gone out stays).
pub(crate) async fn delete_schedule(
    state: AppState,
    req: Request,
    permission: Permission,
    owner_of: OwnerOf,
) -> Response {
    management(
        state,
        permission,
        req,
        move |state, caller, req| async move {
            let body = read_json(req).await?;
            let of = owner_of(&body)?;
            let id = schedule_id(&body)?;
            owned_dispatch(&state, caller.workspace.id, &id, &of).await?;
            cancel(&state, caller.workspace.id, &id).await
        },
    )
    .await
}

/// Checks the schedule names a scheduled dispatch of `of`.
async fn owned_dispatch(
    state: &AppState,
    workspace: tideway_core::ids::WorkspaceId,
    id: &str,
    of: &ScheduleOf,
) -> Result<(), ApiError> {
    use tideway_core::store::DispatchSource;
    let dispatch = state
        .store()
        .dispatch(workspace, id)
        .await?
        .ok_or_else(|| ApiError::bad_request(INVALID_SCHEDULE_ID))?;
    let matches = match (&dispatch.source, of) {
        (DispatchSource::Campaign { campaign_id }, ScheduleOf::Campaign(c)) => campaign_id == c,
        (DispatchSource::AdHoc { .. }, ScheduleOf::AdHoc) => true,
        (DispatchSource::Canvas { canvas_id, .. }, ScheduleOf::Canvas(c)) => canvas_id == c,
        _ => false,
    };
    if !matches || dispatch.not_before.is_none() {
        return Err(ApiError::bad_request(INVALID_SCHEDULE_ID));
    }
    Ok(())
}

fn campaign_field(body: &Map<String, Value>) -> Result<String, ApiError> {
    match body.get("campaign_id") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        None | Some(Value::Null) => Err(ApiError::malformed("campaign_id is required")),
        Some(_) => Err(ApiError::malformed("campaign_id must be a string")),
    }
}

/// `POST /campaigns/trigger/schedule/create`.
#[utoipa::path(
    post,
    path = "/campaigns/trigger/schedule/create",
    tag = "messaging",
    summary = "Braze: schedule an API-triggered campaign (campaigns.trigger.schedule.create)",
    request_body(content = Object, description = "The `/campaigns/trigger/send` body plus `schedule: {time}`"),
    responses(
        (status = 201, description = "`{\"dispatch_id\", \"schedule_id\", \"message\": \"success\"}`", body = Object),
        (status = 400, description = "As `/campaigns/trigger/send`, or a missing, malformed or past `schedule`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn trigger_schedule_create(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CampaignsTriggerScheduleCreate,
        req,
        |state, caller, req| async move {
            let Some(api) = messaging(&state) else {
                return Ok(not_enabled());
            };
            let body = read_json(req).await?;
            let at = parse_schedule(&body, now())?;
            let (id, send_id, errors) = trigger(&state, &api, &caller, &body, Some(at)).await?;
            Ok(created(&id, send_id.as_deref(), errors))
        },
    )
    .await
}

/// `POST /campaigns/trigger/schedule/update`.
#[utoipa::path(
    post,
    path = "/campaigns/trigger/schedule/update",
    tag = "messaging",
    summary = "Braze: move a scheduled API-triggered campaign (campaigns.trigger.schedule.update)",
    request_body(content = Object, description = "`{campaign_id, schedule_id, schedule: {time}}`"),
    responses(
        (status = 201, description = "`{\"message\": \"success\"}`", body = Object),
        (status = 400, description = "`Invalid schedule_id`, or a missing, malformed or past `schedule`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn trigger_schedule_update(State(state): State<AppState>, req: Request) -> Response {
    update_schedule(
        state,
        req,
        Permission::CampaignsTriggerScheduleUpdate,
        of_campaign,
    )
    .await
}

/// `POST /campaigns/trigger/schedule/delete`.
#[utoipa::path(
    post,
    path = "/campaigns/trigger/schedule/delete",
    tag = "messaging",
    summary = "Braze: cancel a scheduled API-triggered campaign (campaigns.trigger.schedule.delete)",
    request_body(content = Object, description = "`{campaign_id, schedule_id}`"),
    responses(
        (status = 201, description = "`{\"message\": \"success\"}`", body = Object),
        (status = 400, description = "`Invalid schedule_id`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn trigger_schedule_delete(State(state): State<AppState>, req: Request) -> Response {
    delete_schedule(
        state,
        req,
        Permission::CampaignsTriggerScheduleDelete,
        of_campaign,
    )
    .await
}

/// `POST /messages/schedule/create`.
#[utoipa::path(
    post,
    path = "/messages/schedule/create",
    tag = "messaging",
    summary = "Braze: schedule ad-hoc messages (messages.schedule.create)",
    request_body(content = Object, description = "The `/messages/send` body plus `schedule: {time}`"),
    responses(
        (status = 201, description = "`{\"dispatch_id\", \"schedule_id\", \"message\": \"success\"}`", body = Object),
        (status = 400, description = "As `/messages/send`, or a missing, malformed or past `schedule`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn messages_schedule_create(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::MessagesScheduleCreate,
        req,
        |state, caller, req| async move {
            let Some(api) = messaging(&state) else {
                return Ok(not_enabled());
            };
            let body = read_json(req).await?;
            let at = parse_schedule(&body, now())?;
            let (id, errors) = send_adhoc(&state, &api, &caller, &body, Some(at)).await?;
            Ok(created(&id, None, errors))
        },
    )
    .await
}

/// `POST /messages/schedule/update`.
#[utoipa::path(
    post,
    path = "/messages/schedule/update",
    tag = "messaging",
    summary = "Braze: move scheduled ad-hoc messages (messages.schedule.update)",
    request_body(content = Object, description = "`{schedule_id, schedule: {time}}`; replacing `messages` of a scheduled send is refused (delete and create it again)"),
    responses(
        (status = 201, description = "`{\"message\": \"success\"}`", body = Object),
        (status = 400, description = "`Invalid schedule_id`, a malformed or past `schedule` (required unless `messages` is given), or `messages` that do not check or change the channels", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn messages_schedule_update(State(state): State<AppState>, req: Request) -> Response {
    update_schedule(state, req, Permission::MessagesScheduleUpdate, of_messages).await
}

/// `POST /messages/schedule/delete`.
#[utoipa::path(
    post,
    path = "/messages/schedule/delete",
    tag = "messaging",
    summary = "Braze: cancel scheduled ad-hoc messages (messages.schedule.delete)",
    request_body(content = Object, description = "`{schedule_id}`"),
    responses(
        (status = 201, description = "`{\"message\": \"success\"}`", body = Object),
        (status = 400, description = "`Invalid schedule_id`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn messages_schedule_delete(State(state): State<AppState>, req: Request) -> Response {
    delete_schedule(state, req, Permission::MessagesScheduleDelete, of_messages).await
}

async fn reschedule(
    state: &AppState,
    workspace: tideway_core::ids::WorkspaceId,
    id: &str,
    at: Millis,
) -> Result<Response, ApiError> {
    if !state.store().reschedule_dispatch(workspace, id, at).await? {
        return Err(ApiError::bad_request(INVALID_SCHEDULE_ID));
    }
    if let Some(api) = messaging(state) {
        api.engine.wake();
    }
    Ok(success())
}

/// Replaces a scheduled ad-hoc send's `messages`, checked as `/messages/send` checks them. Its
/// pending messages name their variant by id, so each channel keeps the id it had, and the
/// channels must be the ones it was scheduled with.
async fn replace_messages(
    state: &AppState,
    workspace: tideway_core::ids::WorkspaceId,
    id: &str,
    messages: &Value,
) -> Result<(), ApiError> {
    use tideway_core::campaigns::Message;
    use tideway_core::store::DispatchSource;
    let Value::Object(messages) = messages else {
        return Err(ApiError::malformed("messages must be an object"));
    };
    let dispatch = state
        .store()
        .dispatch(workspace, id)
        .await?
        .ok_or_else(|| ApiError::bad_request(INVALID_SCHEDULE_ID))?;
    let DispatchSource::AdHoc { definition } = &dispatch.source else {
        return Err(ApiError::bad_request(INVALID_SCHEDULE_ID));
    };
    let old = CampaignDefinition::load(definition).map_err(|e| {
        tracing::error!(error = %e, dispatch = id, "a stored ad-hoc definition does not load");
        ApiError::Internal
    })?;
    let kept: std::collections::BTreeMap<&str, &str> = old
        .variants
        .iter()
        .map(|v| {
            let channel = match v.message {
                Message::Email(_) => "email",
                Message::Webhook(_) => "webhook",
            };
            (channel, v.id.as_str())
        })
        .collect();
    let asked: Vec<&str> = messages.keys().map(String::as_str).collect();
    if asked.iter().any(|c| !kept.contains_key(c)) || kept.len() != asked.len() {
        return Err(ApiError::malformed(format!(
            "messages must have the channels the send was scheduled with ({}); to change channels delete the schedule and create it again",
            kept.keys().copied().collect::<Vec<_>>().join(", ")
        )));
    }
    let mut with_ids = messages.clone();
    for (channel, body) in with_ids.iter_mut() {
        if let (Value::Object(body), Some(variant)) = (body, kept.get(channel.as_str())) {
            // Each channel keeps its variation; naming another is a mistake, not a change.
            let named = match body.get("message_variation_id") {
                Some(Value::String(id)) => Some(id.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Null) | None => None,
                Some(other) => Some(other.to_string()),
            };
            if named.is_some_and(|id| id != *variant) {
                return Err(ApiError::bad_request(crate::messaging_api::INVALID_VARIANT));
            }
            body.insert("message_variation_id".into(), json!(variant));
        }
    }
    let (mut new_definition, _) = crate::messaging_api::checked_adhoc_definition(
        &with_ids,
        old.recipient_subscription_state,
    )?;
    // A send credited to a campaign stays credited, its variations keeping their names.
    if let Some((campaign_id, campaign_name)) =
        tideway_messaging::sends::credited_campaign(definition)
    {
        tideway_messaging::sends::credit_to_campaign(
            &mut new_definition,
            campaign_id,
            campaign_name,
            |variation| Some(old.variant(variation)?.name.clone()),
        );
    }
    let definition = new_definition;
    if !state
        .store()
        .replace_adhoc_definition(workspace, id, definition)
        .await?
    {
        return Err(ApiError::bad_request(INVALID_SCHEDULE_ID));
    }
    Ok(())
}

async fn cancel(
    state: &AppState,
    workspace: tideway_core::ids::WorkspaceId,
    id: &str,
) -> Result<Response, ApiError> {
    if !state.store().cancel_dispatch(workspace, id).await? {
        return Err(ApiError::bad_request(INVALID_SCHEDULE_ID));
    }
    Ok(success())
}

/// `POST /sends/id/create`.
#[utoipa::path(
    post,
    path = "/sends/id/create",
    tag = "messaging",
    summary = "Braze: create a send id for a campaign (sends.id.create)",
    request_body(content = Object, description = "`{campaign_id, send_id?}` (ASCII, ≤ 64 characters; generated when absent)"),
    responses(
        (status = 201, description = "`{\"message\": \"success\", \"send_id\"}`", body = Object),
        (status = 400, description = "`Invalid Campaign ID`, a malformed `send_id`, or more than 100 new send ids today", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn send_id_create(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::SendsIdCreate,
        req,
        |state, caller, req| async move {
            let body = read_json(req).await?;
            let campaign = campaign_field(&body)?;
            let send_id = match body.get("send_id") {
                None | Some(Value::Null) => uuid::Uuid::new_v4().simple().to_string(),
                Some(Value::String(s)) if is_send_id(s) => s.clone(),
                Some(_) => return Err(ApiError::malformed(send_id_rule())),
            };
            let ws = caller.workspace.id;
            if state.store().campaign(ws, &campaign).await?.is_none() {
                return Err(ApiError::bad_request(INVALID_CAMPAIGN));
            }
            let at = now();
            let day_start = Millis(at.0 - at.0.rem_euclid(86_400_000));
            match state
                .store()
                .create_send_id(ws, &campaign, &send_id, at, day_start, MAX_SEND_IDS_PER_DAY)
                .await
            {
                Ok(_) => {}
                Err(StoreError::Conflict(_)) => {
                    return Err(ApiError::bad_request(format!(
                        "at most {MAX_SEND_IDS_PER_DAY} send ids can be created per day"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
            Ok((
                StatusCode::CREATED,
                axum::Json(json!({"message": "success", "send_id": send_id})),
            )
                .into_response())
        },
    )
    .await
}

/// What `/sends/data_series` asks for: one campaign's send id, over the UTC days from
/// `first_day` to `last_day`.
#[derive(Debug, PartialEq)]
struct SeriesQuery {
    campaign_id: String,
    send_id: String,
    first_day: Millis,
    last_day: Millis,
}

impl SeriesQuery {
    fn parse(params: &HashMap<String, String>, now: Millis) -> Result<SeriesQuery, ApiError> {
        let campaign_id = params
            .get("campaign_id")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::bad_request(INVALID_CAMPAIGN))?
            .clone();
        let send_id = match params.get("send_id") {
            None => return Err(ApiError::malformed("send_id is required")),
            Some(s) if is_send_id(s) => s.clone(),
            Some(_) => return Err(ApiError::malformed(send_id_rule())),
        };
        let length = params
            .get("length")
            .and_then(|l| l.parse::<i64>().ok())
            .filter(|l| (1..=MAX_SERIES_DAYS).contains(l))
            .ok_or_else(|| {
                ApiError::malformed(format!(
                    "length is required: the number of days, from 1 to {MAX_SERIES_DAYS}"
                ))
            })?;
        // No message was sent before 1970, and days before year 1 have no ISO name.
        let ending_at = match params.get("ending_at") {
            None => now,
            Some(t) => parse_datetime(t).filter(|at| at.0 >= 0).ok_or_else(|| {
                ApiError::malformed(
                    "ending_at must be an ISO 8601 time from 1970 on, like 2026-12-10T23:59:59-05:00",
                )
            })?,
        };
        let last_day = Millis(ending_at.0.div_euclid(DAY_MS) * DAY_MS);
        let first_day = Millis(last_day.0 - (length - 1) * DAY_MS);
        if first_day.0 < 0 {
            return Err(ApiError::malformed(
                "length reaches before 1970 from ending_at; ask for fewer days",
            ));
        }
        Ok(SeriesQuery {
            campaign_id,
            send_id,
            first_day,
            last_day,
        })
    }
}

/// The figures each channel's entries list (zero when nothing was counted).
fn channel_figures(channel: &str) -> &'static [SendStat] {
    match channel {
        "webhook" => &[SendStat::Sent, SendStat::Errors, SendStat::UniqueRecipients],
        _ => &[
            SendStat::Sent,
            SendStat::Delivered,
            SendStat::Bounces,
            SendStat::Opens,
            SendStat::UniqueOpens,
            SendStat::Clicks,
            SendStat::UniqueClicks,
            SendStat::Unsubscribes,
            SendStat::UniqueRecipients,
        ],
    }
}

/// `data` of a `/sends/data_series` answer: one entry per day from `first_day` to `last_day`,
/// oldest first, each with its channels' entries per variation (counted by id, named by
/// `names`: a variation the campaign no longer has is named by its id) and the day's totals.
fn series_json(
    first_day: Millis,
    last_day: Millis,
    figures: &[SendSeriesFigure],
    names: &HashMap<String, String>,
) -> Vec<Value> {
    let mut days: BTreeMap<i64, Vec<&SendSeriesFigure>> = BTreeMap::new();
    for f in figures {
        days.entry(f.day.0).or_default().push(f);
    }
    let mut data = Vec::new();
    let mut day = first_day.0;
    while day <= last_day.0 {
        let of_day = days.remove(&day).unwrap_or_default();
        let total = |stat: SendStat| -> u64 {
            of_day
                .iter()
                .filter(|f| f.channel.is_empty() && f.stat == stat)
                .map(|f| f.count)
                .sum()
        };
        let mut variations: BTreeMap<(&str, &str), Map<String, Value>> = BTreeMap::new();
        for f in of_day.iter().filter(|f| !f.channel.is_empty()) {
            let entry = variations
                .entry((f.channel.as_str(), f.variation.as_str()))
                .or_insert_with(|| {
                    let mut entry = Map::new();
                    let name = names.get(&f.variation).unwrap_or(&f.variation);
                    entry.insert("variation_name".into(), json!(name));
                    entry.insert("variation_api_id".into(), json!(f.variation));
                    for stat in channel_figures(&f.channel) {
                        entry.insert(stat.as_str().into(), json!(0));
                    }
                    entry
                });
            entry.insert(f.stat.as_str().into(), json!(f.count));
        }
        let mut messages: Map<String, Value> = Map::new();
        for ((channel, _), entry) in variations {
            if let Value::Array(list) = messages
                .entry(channel.to_owned())
                .or_insert_with(|| Value::Array(Vec::new()))
            {
                list.push(Value::Object(entry));
            }
        }
        data.push(json!({
            "time": Millis(day).to_iso()[..10],
            "messages": messages,
            "conversions": total(SendStat::Conversions),
            "unique_recipients": total(SendStat::UniqueRecipients),
        }));
        day += DAY_MS;
    }
    data
}

/// `GET /sends/data_series?campaign_id=…&send_id=…&length=…&ending_at=…`.
#[utoipa::path(
    get,
    path = "/sends/data_series",
    tag = "messaging",
    summary = "Braze: a send id's daily stats (sends.data_series)",
    params(
        ("campaign_id" = String, Query, description = "The campaign's id"),
        ("send_id" = String, Query, description = "The send id its API sends named"),
        ("length" = i64, Query, description = "Days to report, 1 to 100, ending with ending_at's UTC day"),
        ("ending_at" = Option<String>, Query, description = "ISO 8601 time whose UTC day is the last reported (default: now)"),
    ),
    responses(
        (status = 200, description = "`{\"message\": \"success\", \"data\": [{time: \"YYYY-MM-DD\", messages: {email: [{variation_name, variation_api_id, sent, delivered, bounces, opens, unique_opens, clicks, unique_clicks, unsubscribes, unique_recipients}], webhook: [{variation_name, variation_api_id, sent, errors, unique_recipients}]}, conversions, unique_recipients}]}`, oldest day first", body = Object),
        (status = 400, description = "`Invalid Campaign ID` (missing or unknown), or a missing or malformed `send_id`, `length` or `ending_at`", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn sends_data_series(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::SendsDataSeries,
        req,
        |state, caller, _| async move {
            let q = SeriesQuery::parse(&params, now())?;
            let ws = caller.workspace.id;
            let campaign = state
                .store()
                .campaign(ws, &q.campaign_id)
                .await?
                .ok_or_else(|| ApiError::bad_request(INVALID_CAMPAIGN))?;
            let mut names: HashMap<String, String> = HashMap::new();
            if let Ok(def) = CampaignDefinition::load(&campaign.definition) {
                names.extend(def.variants.iter().map(|v| (v.id.clone(), v.name.clone())));
                if let Some((control, _)) = def.control {
                    names.insert(control, "Control Group".to_owned());
                }
            }
            let figures = state
                .store()
                .send_series(ws, &q.campaign_id, &q.send_id, q.first_day, q.last_day)
                .await?;
            let data = series_json(q.first_day, q.last_day, &figures, &names);
            Ok(axum::Json(json!({"message": "success", "data": data})).into_response())
        },
    )
    .await
}

/// A launched campaign's or Canvas's next scheduled occurrence (`/messages/scheduled_broadcasts`).
#[derive(Debug, PartialEq)]
struct Broadcast {
    next: Millis,
    in_local_time: bool,
    kind: &'static str,
    id: String,
    name: String,
    tags: Vec<String>,
}

/// The next occurrence after `now`, if any before `end`, of a launched (active) campaign or
/// Canvas delivered by `delivery`, when that is a time-based schedule.
fn next_broadcast(
    delivery: &Delivery,
    status: CampaignStatus,
    now: Millis,
    end: Millis,
) -> Option<(Millis, bool)> {
    let Delivery::Scheduled(schedule) = delivery else {
        return None;
    };
    if status != CampaignStatus::Active {
        return None;
    }
    let next = schedule.next_after(now)?;
    let ended = schedule.end.is_some_and(|last| next.0 > last.0);
    (next.0 <= end.0 && !ended).then_some((next, schedule.in_local_time))
}

/// Braze's entry for one broadcast: `next_send_time` an ISO 8601 UTC time, or the wall-clock
/// time without a zone when each user gets it in their own (`schedule_type`
/// `local_time_zones`; otherwise the company's zone, which is UTC in Tideway).
fn broadcast_json(b: &Broadcast) -> Value {
    let iso = b.next.to_iso();
    let (next_send_time, schedule_type) = if b.in_local_time {
        (iso[..19].replacen('T', " ", 1), "local_time_zones")
    } else {
        (iso, "UTC")
    };
    json!({
        "name": b.name,
        "id": b.id,
        "type": b.kind,
        "tags": b.tags,
        "next_send_time": next_send_time,
        "schedule_type": schedule_type,
    })
}

/// `GET /messages/scheduled_broadcasts?end_time=…`: the launched campaigns and Canvases
/// scheduled by time whose next occurrence is between now and `end_time`, each once (a
/// recurring one at its next occurrence), soonest first. As in Braze, sends scheduled through
/// the API (`/…/schedule/create`) are not listed.
#[utoipa::path(
    get,
    path = "/messages/scheduled_broadcasts",
    tag = "messaging",
    summary = "Braze: upcoming scheduled campaigns and Canvases (messages.schedule_broadcasts)",
    params(("end_time" = String, Query, description = "ISO 8601 time: list what is scheduled from now until then")),
    responses(
        (status = 200, description = "`{\"message\": \"success\", \"scheduled_broadcasts\": [{name, id, type: \"Campaign\"|\"Canvas\", tags, next_send_time, schedule_type}]}`", body = Object),
        (status = 400, description = "`end_time` missing or not an ISO 8601 time", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn scheduled_broadcasts(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::MessagesScheduleBroadcasts,
        req,
        |state, caller, _| async move {
            let end = match params.get("end_time") {
                None => return Err(ApiError::malformed("end_time is required")),
                // Any year: a far bound (9999-12-31) is "everything", as clients use it.
                Some(t) => tideway_core::clock::parse_datetime_any_year(t)
                    .ok_or_else(|| ApiError::malformed("end_time must be an ISO 8601 time"))?,
            };
            let now = now();
            let ws = caller.workspace.id;
            let mut found = Vec::new();
            for c in state.store().list_campaigns(ws).await? {
                let Ok(def) = CampaignDefinition::load(&c.definition) else {
                    continue;
                };
                if let Some((next, in_local_time)) =
                    next_broadcast(&def.delivery, c.status, now, end)
                {
                    found.push(Broadcast {
                        next,
                        in_local_time,
                        kind: "Campaign",
                        id: c.id,
                        name: c.name,
                        tags: c.tags,
                    });
                }
            }
            for c in state.store().list_canvases(ws).await? {
                let Ok(def) = CanvasDefinition::load(&c.definition) else {
                    continue;
                };
                if let Some((next, in_local_time)) = next_broadcast(&def.entry, c.status, now, end)
                {
                    found.push(Broadcast {
                        next,
                        in_local_time,
                        kind: "Canvas",
                        id: c.id,
                        name: c.name,
                        tags: c.tags,
                    });
                }
            }
            found.sort_by(|a, b| (a.next, &a.id).cmp(&(b.next, &b.id)));
            let listed: Vec<Value> = found.iter().map(broadcast_json).collect();
            Ok(
                axum::Json(json!({"message": "success", "scheduled_broadcasts": listed}))
                    .into_response(),
            )
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_is_its_next_occurrence_in_the_window_of_a_launched_schedule() {
        use tideway_core::campaigns::{Frequency, Schedule};
        let day = 86_400_000;
        let now = Millis(1_700_000_000_000);
        let daily = |in_local_time| {
            Delivery::Scheduled(Schedule {
                frequency: Frequency::Daily { minute_of_day: 570 },
                start: None,
                end: None,
                in_local_time,
            })
        };
        let (next, local) = next_broadcast(
            &daily(false),
            CampaignStatus::Active,
            now,
            Millis(now.0 + day),
        )
        .expect("a daily schedule sends within a day");
        assert!(next.0 > now.0 && next.0 <= now.0 + day && !local);
        assert_eq!(next.0.rem_euclid(day), 570 * 60_000);
        // Not yet within the window, not launched, or not scheduled by time: not listed.
        assert!(
            next_broadcast(
                &daily(false),
                CampaignStatus::Active,
                now,
                Millis(next.0 - 1)
            )
            .is_none()
        );
        for status in [
            CampaignStatus::Draft,
            CampaignStatus::Paused,
            CampaignStatus::Stopped,
        ] {
            assert!(next_broadcast(&daily(false), status, now, Millis(now.0 + day)).is_none());
        }
        assert!(
            next_broadcast(
                &Delivery::ApiTriggered,
                CampaignStatus::Active,
                now,
                Millis(now.0 + day)
            )
            .is_none()
        );
        let once_past = Delivery::Scheduled(Schedule {
            frequency: Frequency::Once {
                at: Millis(now.0 - 1),
            },
            start: None,
            end: None,
            in_local_time: false,
        });
        assert!(
            next_broadcast(&once_past, CampaignStatus::Active, now, Millis(now.0 + day)).is_none()
        );

        let at = Millis(1_535_794_200_000); // 2018-09-01T09:30:00Z
        let b = |in_local_time| Broadcast {
            next: at,
            in_local_time,
            kind: "Campaign",
            id: "c".into(),
            name: "Weekly".into(),
            tags: vec!["news".into()],
        };
        assert_eq!(
            broadcast_json(&b(true)),
            json!({"name": "Weekly", "id": "c", "type": "Campaign", "tags": ["news"], "next_send_time": "2018-09-01 09:30:00", "schedule_type": "local_time_zones"})
        );
        assert_eq!(
            broadcast_json(&b(false))["next_send_time"],
            "2018-09-01T09:30:00.000Z"
        );
    }

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn schedules_parse_and_refuse_what_tideway_does_not_do() {
        let now = Millis(1_700_000_000_000);
        let at = parse_schedule(
            &body(json!({"schedule": {"time": "2030-01-01T00:00:00Z"}})),
            now,
        )
        .expect("a future time parses");
        assert_eq!(at, Millis(1_893_456_000_000));
        for bad in [
            json!({}),
            json!({"schedule": "soon"}),
            json!({"schedule": {}}),
            json!({"schedule": {"time": "tomorrow"}}),
            json!({"schedule": {"time": "2001-01-01T00:00:00Z"}}),
            json!({"schedule": {"time": "2030-01-01T00:00:00Z", "in_local_time": true}}),
            json!({"schedule": {"time": "2030-01-01T00:00:00Z", "at_optimal_time": "yes"}}),
        ] {
            let err = parse_schedule(&body(bad.clone()), now).expect_err("refused");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// `length` days end with `ending_at`'s UTC day (now's by default); a missing or malformed
    /// parameter is a 400 that names it.
    #[test]
    fn series_queries_cover_length_days_ending_on_the_utc_day_of_ending_at() {
        let now = Millis(1_796_601_599_000); // 2026-12-06T23:59:59Z
        let day = |d: i64| Millis(1_796_515_200_000 + d * DAY_MS);
        let q = SeriesQuery::parse(
            &params(&[("campaign_id", "c"), ("send_id", "s"), ("length", "3")]),
            now,
        )
        .unwrap();
        assert_eq!(
            q,
            SeriesQuery {
                campaign_id: "c".into(),
                send_id: "s".into(),
                first_day: day(-2),
                last_day: day(0),
            }
        );
        // 23:59:59 at UTC-5 is the next UTC day.
        let q = SeriesQuery::parse(
            &params(&[
                ("campaign_id", "c"),
                ("send_id", "s"),
                ("length", "1"),
                ("ending_at", "2026-12-06T23:59:59-05:00"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!((q.first_day, q.last_day), (day(1), day(1)));
        let cases: [(&[(&str, &str)], &str); 11] = [
            (&[("send_id", "s"), ("length", "1")], "Invalid Campaign ID"),
            (
                &[("campaign_id", ""), ("send_id", "s"), ("length", "1")],
                "Invalid Campaign ID",
            ),
            (
                &[("campaign_id", "c"), ("length", "1")],
                "send_id is required",
            ),
            (
                &[("campaign_id", "c"), ("send_id", "é"), ("length", "1")],
                "send_id must be",
            ),
            (
                &[
                    ("campaign_id", "c"),
                    ("send_id", "a\u{0}b"),
                    ("length", "1"),
                ],
                "send_id must be",
            ),
            (
                &[("campaign_id", "c"), ("send_id", "s")],
                "length is required",
            ),
            (
                &[("campaign_id", "c"), ("send_id", "s"), ("length", "0")],
                "length is required",
            ),
            (
                &[("campaign_id", "c"), ("send_id", "s"), ("length", "101")],
                "length is required",
            ),
            (
                &[
                    ("campaign_id", "c"),
                    ("send_id", "s"),
                    ("length", "1"),
                    ("ending_at", "yesterday"),
                ],
                "ending_at must be",
            ),
            (
                &[
                    ("campaign_id", "c"),
                    ("send_id", "s"),
                    ("length", "100"),
                    ("ending_at", "0000-01-02T00:00:00Z"),
                ],
                "from 1970 on",
            ),
            (
                &[
                    ("campaign_id", "c"),
                    ("send_id", "s"),
                    ("length", "2"),
                    ("ending_at", "1970-01-01T00:00:00Z"),
                ],
                "before 1970",
            ),
        ];
        for (pairs, why) in cases {
            let err = SeriesQuery::parse(&params(pairs), now).expect_err("refused");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{pairs:?}");
            let body = format!("{err:?}");
            assert!(body.contains(why), "{pairs:?}: {body}");
        }
    }

    /// Every day of the range is listed, oldest first; a channel's entry per variation lists
    /// all its figures (zero where nothing was counted), named by the campaign (by its id when
    /// the campaign no longer has it); the day's totals stand beside.
    #[test]
    fn a_series_lists_every_day_with_its_variations_and_totals() {
        let day = |d: i64| Millis(1_796_515_200_000 + d * DAY_MS);
        let figure = |d, channel: &str, variation: &str, stat, count| SendSeriesFigure {
            day: day(d),
            channel: channel.into(),
            variation: variation.into(),
            stat,
            count,
        };
        let figures = [
            figure(0, "", "", SendStat::Conversions, 2),
            figure(0, "", "", SendStat::UniqueRecipients, 5),
            figure(0, "email", "A", SendStat::Sent, 3),
            figure(0, "email", "B", SendStat::Sent, 2),
            figure(0, "email", "B", SendStat::Opens, 4),
            figure(2, "webhook", "W", SendStat::Errors, 1),
        ];
        let names = HashMap::from([("B".to_owned(), "Blue".to_owned())]);
        let data = series_json(day(0), day(2), &figures, &names);
        let email_b = json!({"variation_name": "Blue", "variation_api_id": "B", "sent": 2, "delivered": 0, "bounces": 0,
            "opens": 4, "unique_opens": 0, "clicks": 0, "unique_clicks": 0, "unsubscribes": 0,
            "unique_recipients": 0});
        assert_eq!(data[0]["time"], "2026-12-06");
        assert_eq!(data[0]["messages"]["email"][0]["sent"], 3);
        assert_eq!(data[0]["messages"]["email"][1], email_b);
        assert_eq!(data[0]["conversions"], 2);
        assert_eq!(data[0]["unique_recipients"], 5);
        assert_eq!(
            data[1],
            json!({"time": "2026-12-07", "messages": {}, "conversions": 0, "unique_recipients": 0})
        );
        assert_eq!(
            data[2]["messages"],
            json!({"webhook": [{"variation_name": "W", "variation_api_id": "W", "sent": 0, "errors": 1, "unique_recipients": 0}]})
        );
        assert_eq!(data.len(), 3);
    }
}
