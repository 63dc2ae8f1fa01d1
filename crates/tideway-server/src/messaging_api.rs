//! Braze's messaging endpoints (`braze-messaging.md` §2–§3): `POST /campaigns/trigger/send`
//! (`campaigns.trigger.send`), `POST /messages/send` (`messages.send`), `GET /campaigns/list`
//! (`campaigns.list`) and `GET /campaigns/details` (`campaigns.details`).
//!
//! The wire rules are Braze's: success is `201 {"dispatch_id", "message": "success"}` (plus
//! `errors` for what was skipped and did not stop the send), a fatal problem is a 400 with the
//! documented label as `message` (`Bad Request`, `No Recipients`, `Invalid Campaign ID`, …) and
//! the detail in `errors`, and nothing is sent. At most 50 recipients, exactly one identifier
//! each; numbers given as ids are taken as their decimal text; unknown keys are ignored;
//! `trigger_properties` at most 50 KB. Braze reports nothing about recipients that name no user,
//! nor about users outside the campaign's audience, and neither does Tideway.
//!
//! Parsing is pure ([`parse_trigger_send`], [`parse_messages_send`]); the handlers then apply
//! recipients' `attributes` through the `/users/track` service, hand the parsed send to
//! `tideway_messaging::sends`, and wake the engine's dispatcher so the messages go out at once.
//!
//! Requests go through [`crate::pipeline::management`]: the key from `Authorization: Bearer`
//! (or the `api_key` query parameter), the shared budget of endpoints without their own limit
//! (Braze's 250,000 an hour), the permission, and the `X-RateLimit-*` headers.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::campaigns::{
    CampaignDefinition, CampaignStatus, DefinitionError, Delivery, Message, SubscriptionState,
};
use tideway_core::clock::{Millis, parse_datetime};
use tideway_core::ids::{BrazeId, Email, ExternalId};
use tideway_core::keys::Permission;
use tideway_core::services::Services;
use tideway_core::store::{CampaignRecord, Store, Workspace};
use tideway_core::track::{parse_alias, parse_track};
use tideway_messaging::audience::Audiences;
use tideway_messaging::dispatcher::Tracking;
use tideway_messaging::engine::Engine;
use tideway_messaging::sends::{
    ApiRecipient, ApiSend, RecipientId, SendError, Target, adhoc_definition, send_messages,
    trigger_campaign,
};

use crate::AppState;
use crate::connected_audience::{segment_reference, to_segment_filter};
use crate::error::ApiError;
use crate::pipeline::{Caller, counted_as_broadcast, management, now, read_json};

/// Most recipients (or `external_user_ids` plus `user_aliases`) in one request.
pub const MAX_RECIPIENTS: usize = 50;
/// Largest `trigger_properties` object, as JSON text.
pub const MAX_PROPERTIES_BYTES: usize = 50 * 1024;
/// Longest `send_id`.
pub const MAX_SEND_ID_CHARS: usize = 64;
/// `/campaigns/list` page size.
pub const LIST_PAGE: usize = 100;

pub const TOO_MANY_RECIPIENTS: &str =
    "The max number of external_ids and aliases per request was exceeded";
pub const NO_RECIPIENTS: &str = "No Recipients";
pub const INVALID_CAMPAIGN: &str = "Invalid Campaign ID";
/// A `segment_id` that names no segment of the workspace (Braze's style for an unknown id in a
/// send; our choice of text): refused, since it would silently match nobody.
pub const INVALID_SEGMENT: &str = "Invalid segment_id";
pub const NO_MESSAGE: &str = "No message to send";
pub const VARIANT_UNSPECIFIED: &str = "Message Variant Unspecified";
pub const INVALID_VARIANT: &str = "Invalid Message Variant";
pub const MISMATCHED_TYPE: &str = "Mismatched Message Type";

/// What the messaging endpoints need: the audiences the engine evaluates, the engine (woken
/// after an API send) and the tracking key and URLs (for the tracking routes).
#[derive(Clone)]
pub struct MessagingApi {
    pub audiences: Arc<dyn Audiences>,
    pub engine: Arc<Engine<dyn Store>>,
    pub tracking: Tracking,
}

/// The 503 of a server built without the messaging engine.
pub(crate) fn not_enabled() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({
            "message": "messaging is not enabled on this server (the engine runs under `tideway serve`)"
        })),
    )
        .into_response()
}

fn malformed(why: impl Into<String>) -> ApiError {
    ApiError::malformed(why)
}

fn fatal(message: &str, errors: Vec<String>) -> ApiError {
    if errors.is_empty() {
        ApiError::bad_request(message)
    } else {
        ApiError::bad_request_with(message, "errors", json!(errors))
    }
}

/// An id given as a string, or as a number (Braze accepted `12345`): its text.
fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn bool_field(body: &Map<String, Value>, key: &str, default: bool) -> Result<bool, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(malformed(format!("{key} must be true or false"))),
    }
}

/// Whether `s` may be a `send_id`: 1 to [`MAX_SEND_ID_CHARS`] printable ASCII characters.
pub(crate) fn is_send_id(s: &str) -> bool {
    (1..=MAX_SEND_ID_CHARS).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
}

/// The message a malformed `send_id` gets.
pub(crate) fn send_id_rule() -> String {
    format!("send_id must be a string of 1 to {MAX_SEND_ID_CHARS} printable ASCII characters")
}

fn send_id_field(body: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match body.get("send_id") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match id_text(v) {
            Some(s) if is_send_id(&s) => Ok(Some(s)),
            _ => Err(malformed(send_id_rule())),
        },
    }
}

/// A `trigger_properties` object (at `path`), at most 50 KB.
fn properties_field(v: Option<&Value>, path: &str) -> Result<Option<Map<String, Value>>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => {
            if Value::Object(m.clone()).to_string().len() > MAX_PROPERTIES_BYTES {
                return Err(malformed(format!("{path} must be at most 50 KB")));
            }
            Ok(Some(m.clone()))
        }
        Some(_) => Err(malformed(format!("{path} must be an object"))),
    }
}

/// `audience` (a connected audience) and/or `segment_id`, as one segment-language filter.
fn audience_field(body: &Map<String, Value>, at: Millis) -> Result<Option<Value>, ApiError> {
    let mut parts = Vec::new();
    match body.get("segment_id") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if !s.is_empty() => parts.push(segment_reference(s)),
        Some(_) => return Err(malformed("segment_id must be a segment id (a string)")),
    }
    match body.get("audience") {
        None | Some(Value::Null) => {}
        Some(a) => parts.push(to_segment_filter(a, at).map_err(|e| malformed(e.to_string()))?),
    }
    Ok(match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => Some(json!({ "and": parts })),
    })
}

/// A recipient's `attributes` to apply before the send, through `/users/track`.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipientUpdate {
    /// The recipient's position in the request (for errors).
    pub index: usize,
    /// The `/users/track` attributes object: the identifier, the attributes and
    /// `_update_existing_only`.
    pub object: Map<String, Value>,
}

/// A parsed `/campaigns/trigger/send`.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerSend {
    pub campaign_id: String,
    pub send: ApiSend,
    pub updates: Vec<RecipientUpdate>,
}

/// Identifier keys a recipient's `attributes` may not set (the recipient names the user).
const IDENTIFIER_KEYS: [&str; 5] = [
    "external_id",
    "user_alias",
    "braze_id",
    "device_id",
    "_update_existing_only",
];

/// Reads the properties of a request or of one recipient (`prefix` is the recipient's path
/// and a dot, or empty): `trigger_properties` for campaigns, `canvas_entry_properties` /
/// `context` for a Canvas.
pub(crate) type PropertiesOf =
    fn(&Map<String, Value>, &str) -> Result<Option<Map<String, Value>>, ApiError>;

/// A campaign's `trigger_properties`.
fn trigger_properties(
    o: &Map<String, Value>,
    prefix: &str,
) -> Result<Option<Map<String, Value>>, ApiError> {
    properties_field(
        o.get("trigger_properties"),
        &format!("{prefix}trigger_properties"),
    )
}

fn parse_recipient(
    v: &Value,
    index: usize,
    properties_of: PropertiesOf,
) -> Result<(ApiRecipient, Option<RecipientUpdate>), ApiError> {
    let path = format!("recipients[{index}]");
    let Value::Object(r) = v else {
        return Err(malformed(format!("{path} must be an object")));
    };
    let present: Vec<&str> = ["external_user_id", "user_alias", "braze_id", "email"]
        .into_iter()
        .filter(|k| !matches!(r.get(*k), None | Some(Value::Null)))
        .collect();
    if present.len() != 1 {
        return Err(malformed(format!(
            "{path} must have exactly one of external_user_id, user_alias, braze_id or email"
        )));
    }
    let key = present[0];
    let raw = &r[key];
    let not_valid = |why: String| malformed(format!("{path}.{key} {why}"));
    let (id, track_key, track_value) = match key {
        "external_user_id" => {
            let text = id_text(raw).ok_or_else(|| not_valid("must be a string".into()))?;
            let id = ExternalId::parse(&text).map_err(|e| not_valid(e.to_string()))?;
            (RecipientId::External(id), "external_id", json!(text))
        }
        "user_alias" => {
            let alias = parse_alias(raw).map_err(|e| malformed(format!("{path}: {e}")))?;
            (RecipientId::Alias(alias), "user_alias", raw.clone())
        }
        "braze_id" => {
            let text = id_text(raw).ok_or_else(|| not_valid("must be a string".into()))?;
            let id = BrazeId::parse(&text).map_err(|e| not_valid(e.to_string()))?;
            (RecipientId::Braze(id), "braze_id", json!(text))
        }
        _ => {
            let text = raw
                .as_str()
                .ok_or_else(|| not_valid("must be a string".into()))?;
            let email = Email::parse(text).map_err(|e| not_valid(e.to_string()))?;
            (RecipientId::Email(email), "email", json!(text))
        }
    };
    let properties = properties_of(r, &format!("{path}."))?;
    let existing_only = match r.get("send_to_existing_only") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(malformed(format!(
                "{path}.send_to_existing_only must be true or false"
            )));
        }
    };
    let attributes = match r.get("attributes") {
        None | Some(Value::Null) => None,
        Some(Value::Object(a)) => Some(a),
        Some(_) => return Err(malformed(format!("{path}.attributes must be an object"))),
    };
    if !existing_only {
        if attributes.is_none() {
            return Err(malformed(format!(
                "{path}: send_to_existing_only false needs attributes (they create the user)"
            )));
        }
        if key == "user_alias" {
            return Err(malformed(format!(
                "{path}: send_to_existing_only false cannot create a user by alias"
            )));
        }
    }
    let update = attributes.map(|a| {
        let mut object: Map<String, Value> = a
            .iter()
            .filter(|(k, _)| !IDENTIFIER_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        object.insert(track_key.into(), track_value);
        object.insert("_update_existing_only".into(), json!(existing_only));
        RecipientUpdate { index, object }
    });
    Ok((ApiRecipient { id, properties }, update))
}

/// Parses a `/campaigns/trigger/send` body (`braze-messaging.md` §3.1).
pub fn parse_trigger_send(body: &Map<String, Value>, at: Millis) -> Result<TriggerSend, ApiError> {
    let campaign_id = match body.get("campaign_id") {
        None | Some(Value::Null) => return Err(malformed("campaign_id is required")),
        Some(v) => id_text(v)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| malformed("campaign_id must be a string"))?,
    };
    let send_id = send_id_field(body)?;
    let properties = trigger_properties(body, "")?;
    let targets = parse_targets(body, at, trigger_properties)?;
    Ok(TriggerSend {
        campaign_id,
        send: ApiSend {
            send_id,
            properties,
            target: targets.target,
            audience: targets.audience,
            at: None,
        },
        updates: targets.updates,
    })
}

/// Whom a trigger send (a campaign's or a Canvas's) is for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Targets {
    pub target: Target,
    /// `audience` / `segment_id`: narrows the recipients, or is the broadcast's audience.
    pub audience: Option<Value>,
    /// The recipients' `attributes`, applied before the send.
    pub updates: Vec<RecipientUpdate>,
}

/// `recipients`, `broadcast` and `audience` of a trigger send, with Braze's errors: a
/// recipients list and `broadcast: true` together, attachments with a broadcast, more than
/// [`MAX_RECIPIENTS`], and none of the three (`No Recipients`).
pub(crate) fn parse_targets(
    body: &Map<String, Value>,
    at: Millis,
    properties_of: PropertiesOf,
) -> Result<Targets, ApiError> {
    let broadcast = bool_field(body, "broadcast", false)?;
    let recipients = match body.get("recipients") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().collect(),
        Some(_) => return Err(malformed("recipients must be an array")),
    };
    if broadcast && !recipients.is_empty() {
        return Err(malformed(
            "broadcast: true and a recipients list cannot be sent together",
        ));
    }
    if broadcast && matches!(body.get("attachments"), Some(Value::Array(a)) if !a.is_empty()) {
        return Err(malformed(
            "attachments are not allowed with broadcast: true",
        ));
    }
    // Dropping them would send the message without them, as if they were attached.
    if body
        .get("attachments")
        .is_some_and(|a| !a.is_null() && a.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(malformed(
            "attachments: per-send attachments are not supported here; list them in the \
             campaign's email message (`attachments`), or send with /messages/send",
        ));
    }
    if recipients.len() > MAX_RECIPIENTS {
        return Err(ApiError::bad_request(TOO_MANY_RECIPIENTS));
    }
    let audience = audience_field(body, at)?;
    let mut parsed = Vec::with_capacity(recipients.len());
    let mut updates = Vec::new();
    for (i, r) in recipients.iter().enumerate() {
        let (recipient, update) = parse_recipient(r, i, properties_of)?;
        parsed.push(recipient);
        updates.extend(update);
    }
    let target = if !parsed.is_empty() {
        Target::Recipients(parsed)
    } else if broadcast || audience.is_some() {
        Target::Broadcast
    } else {
        return Err(ApiError::bad_request(NO_RECIPIENTS));
    };
    Ok(Targets {
        target,
        audience,
        updates,
    })
}

/// A parsed `/messages/send`.
#[derive(Debug, Clone, PartialEq)]
pub struct MessagesSend {
    /// A campaign the messages are reported under (its variants named by
    /// `message_variation_id`).
    pub campaign_id: Option<String>,
    pub messages: Map<String, Value>,
    pub send: ApiSend,
    /// Who the emails may go to (`recipient_subscription_state`).
    pub subscription: SubscriptionState,
}

/// Parses a `/messages/send` body (`braze-messaging.md` §3.3).
pub fn parse_messages_send(
    body: &Map<String, Value>,
    at: Millis,
) -> Result<MessagesSend, ApiError> {
    let broadcast = bool_field(body, "broadcast", false)?;
    // Accepted and checked; Tideway's frequency caps are the campaign's choice.
    bool_field(body, "override_frequency_capping", false)?;
    bool_field(body, "override_messaging_limits", false)?;
    let external_ids = match body.get("external_user_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().collect(),
        Some(_) => return Err(malformed("external_user_ids must be an array")),
    };
    let aliases = match body.get("user_aliases") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().collect(),
        Some(_) => return Err(malformed("user_aliases must be an array")),
    };
    let named = external_ids.len() + aliases.len();
    if broadcast && named > 0 {
        return Err(malformed(
            "broadcast: true and external_user_ids or user_aliases cannot be sent together",
        ));
    }
    if named > MAX_RECIPIENTS {
        return Err(ApiError::bad_request(TOO_MANY_RECIPIENTS));
    }
    let campaign_id = match body.get("campaign_id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            id_text(v)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| malformed("campaign_id must be a string"))?,
        ),
    };
    let send_id = send_id_field(body)?;
    let mut audience = audience_field(body, at)?;
    let subscription = match body.get("recipient_subscription_state") {
        None | Some(Value::Null) => SubscriptionState::default(),
        Some(v) => v
            .as_str()
            .and_then(SubscriptionState::parse)
            .ok_or_else(|| {
                malformed("recipient_subscription_state must be opted_in, subscribed or all")
            })?,
    };
    // Opted-in only: the others are not even targeted (the dispatcher checks again at send
    // time, as the state may change before then).
    if subscription == SubscriptionState::OptedIn {
        let opted_in =
            json!({"attribute": {"name": "email_subscribe", "op": "equals", "value": "opted_in"}});
        audience = Some(match audience {
            None => opted_in,
            Some(a) => json!({"and": [a, opted_in]}),
        });
    }
    let mut recipients = Vec::with_capacity(named);
    for (i, v) in external_ids.iter().enumerate() {
        let text = id_text(v)
            .ok_or_else(|| malformed(format!("external_user_ids[{i}] must be a string")))?;
        let id = ExternalId::parse(&text)
            .map_err(|e| malformed(format!("external_user_ids[{i}] {e}")))?;
        recipients.push(ApiRecipient {
            id: RecipientId::External(id),
            properties: None,
        });
    }
    for (i, v) in aliases.iter().enumerate() {
        let alias = parse_alias(v).map_err(|e| malformed(format!("user_aliases[{i}]: {e}")))?;
        recipients.push(ApiRecipient {
            id: RecipientId::Alias(alias),
            properties: None,
        });
    }
    let target = if !recipients.is_empty() {
        Target::Recipients(recipients)
    } else if body.get("segment_id").is_some_and(|v| !v.is_null())
        || body.get("audience").is_some_and(|v| !v.is_null())
    {
        Target::Broadcast
    } else if broadcast {
        // Braze: a broadcast names its segment or audience; Tideway never messages a whole
        // workspace by omission.
        return Err(fatal(
            NO_RECIPIENTS,
            vec!["broadcast: true needs a segment_id or an audience".into()],
        ));
    } else {
        return Err(ApiError::bad_request(NO_RECIPIENTS));
    };
    let messages = match body.get("messages") {
        Some(Value::Object(m)) if !m.is_empty() => m.clone(),
        None | Some(Value::Null) | Some(Value::Object(_)) => {
            return Err(ApiError::bad_request(NO_MESSAGE));
        }
        Some(_) => return Err(malformed("messages must be an object")),
    };
    Ok(MessagesSend {
        campaign_id,
        messages,
        subscription,
        send: ApiSend {
            send_id,
            properties: None,
            target,
            audience,
            at: None,
        },
    })
}

/// `messages[i]…` of the ad-hoc definition renamed `messages.<channel>…` (the request's own
/// names), given the supported channels in the order the definition has them.
fn adhoc_path(path: &str, channels: &[&str]) -> String {
    if let Some(rest) = path.strip_prefix("messages[")
        && let Some((index, tail)) = rest.split_once(']')
        && let Some(channel) = index.parse::<usize>().ok().and_then(|i| channels.get(i))
    {
        return format!("messages.{channel}{tail}");
    }
    path.to_owned()
}

/// Checks `/messages/send`'s `campaign_id` against its `messages` (§2's variant errors).
/// Credits an ad-hoc definition to `campaign` (`def` its definition), naming each variation.
pub(crate) fn credit(definition: &mut Value, campaign: &CampaignRecord, def: &CampaignDefinition) {
    tideway_messaging::sends::credit_to_campaign(
        definition,
        &campaign.id,
        &campaign.name,
        |variation| Some(def.variant(variation)?.name.clone()),
    );
}

pub(crate) fn check_campaign_variants(
    def: &CampaignDefinition,
    messages: &Map<String, Value>,
) -> Result<(), ApiError> {
    for (channel, message) in messages {
        if !matches!(channel.as_str(), "email" | "webhook") {
            continue;
        }
        let Some(id) = message.get("message_variation_id").and_then(id_text_ref) else {
            return Err(ApiError::bad_request(VARIANT_UNSPECIFIED));
        };
        let Some(variant) = def.variant(&id) else {
            return Err(ApiError::bad_request(INVALID_VARIANT));
        };
        if variant.message.channel().as_str() != channel {
            return Err(ApiError::bad_request(MISMATCHED_TYPE));
        }
    }
    Ok(())
}

fn id_text_ref(v: &Value) -> Option<String> {
    id_text(v)
}

/// Every template of `def` checked as Liquid; the first that does not parse is a 400 naming
/// its place (`rename` turns the definition's paths into the request's).
pub(crate) fn check_templates(
    def: &CampaignDefinition,
    rename: impl Fn(&str) -> String,
) -> Result<(), ApiError> {
    tideway_messaging::liquid::check_all(def.templates()).map_err(|e| {
        let path = rename(&e.path);
        let why = format!("{path}: {}", e.message);
        ApiError::bad_request_with(
            why.clone(),
            "errors",
            json!([{"field": path, "message": e.message}]),
        )
    })
}

pub(crate) fn messaging(state: &AppState) -> Option<MessagingApi> {
    state.messaging().cloned()
}

fn send_error(e: SendError) -> ApiError {
    match e {
        SendError::InvalidCampaign => ApiError::bad_request(INVALID_CAMPAIGN),
        e @ SendError::NotActive(_) => fatal(INVALID_CAMPAIGN, vec![e.to_string()]),
        SendError::Store(e) => e.into(),
    }
}

/// A send's 201, with its `send_id` when it has one.
fn dispatched(dispatch_id: &str, send_id: Option<&str>, errors: Vec<String>) -> Response {
    let mut body = json!({"dispatch_id": dispatch_id, "message": "success"});
    if let Some(send_id) = send_id {
        body["send_id"] = json!(send_id);
    }
    if !errors.is_empty() {
        body["errors"] = json!(errors);
    }
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

/// Applies recipients' `attributes` through `/users/track`; attribute objects it refuses are
/// reported (non-fatal) by recipient.
pub(crate) async fn apply_updates(
    state: &AppState,
    workspace: &Workspace,
    updates: Vec<RecipientUpdate>,
) -> Result<Vec<String>, ApiError> {
    if updates.is_empty() {
        return Ok(Vec::new());
    }
    let indexes: Vec<usize> = updates.iter().map(|u| u.index).collect();
    let mut body = Map::new();
    body.insert(
        "attributes".into(),
        Value::Array(
            updates
                .into_iter()
                .map(|u| Value::Object(u.object))
                .collect(),
        ),
    );
    let request = parse_track(&body).map_err(|e| malformed(e.to_string()))?;
    let mut errors: Vec<String> = request
        .errors
        .iter()
        .map(|e| format!("recipients[{}].attributes: {}", indexes[e.index], e.message))
        .collect();
    if request.valid_objects() > 0 {
        let outcome = state.store().track(workspace, request, now()).await?;
        errors.extend(
            outcome
                .errors
                .iter()
                .map(|e| format!("recipients[{}].attributes: {}", indexes[e.index], e.message)),
        );
    }
    Ok(errors)
}

/// The paging of Braze's `/campaigns/list` and `/canvas/list`: `page` (100 a page),
/// `include_archived`, `sort_direction` (`asc`, oldest first, or `desc`) and
/// `last_edit.time[gt]`.
pub(crate) struct ListQuery {
    page: usize,
    descending: bool,
    edited_after: Option<Millis>,
}

impl ListQuery {
    pub(crate) fn parse(params: &HashMap<String, String>) -> Result<ListQuery, ApiError> {
        let page: usize = match params.get("page") {
            None => 0,
            Some(p) => p
                .parse()
                .map_err(|_| malformed("page must be a non-negative integer"))?,
        };
        match params.get("include_archived").map(String::as_str) {
            None | Some("true" | "false") => {}
            Some(_) => return Err(malformed("include_archived must be true or false")),
        }
        let descending = match params.get("sort_direction").map(String::as_str) {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(_) => return Err(malformed("sort_direction must be asc or desc")),
        };
        let edited_after = match params.get("last_edit.time[gt]") {
            None => None,
            Some(t) => Some(
                parse_datetime(t)
                    .ok_or_else(|| malformed("last_edit.time[gt] must be an ISO 8601 time"))?,
            ),
        };
        Ok(ListQuery {
            page,
            descending,
            edited_after,
        })
    }

    /// The requested page of `items` (oldest first as given), by their last edit.
    pub(crate) fn page<T>(&self, mut items: Vec<T>, edited: impl Fn(&T) -> Millis) -> Vec<T> {
        if self.descending {
            items.reverse();
        }
        items
            .into_iter()
            .filter(|c| self.edited_after.is_none_or(|t| edited(c) > t))
            .skip(self.page.saturating_mul(LIST_PAGE))
            .take(LIST_PAGE)
            .collect()
    }
}

/// `POST /campaigns/trigger/send`.
#[utoipa::path(
    post,
    path = "/campaigns/trigger/send",
    tag = "messaging",
    summary = "Braze: send an API-triggered campaign (campaigns.trigger.send)",
    request_body(content = Object, description = "`{campaign_id, send_id?, trigger_properties?, broadcast?, audience?, recipients?: [{external_user_id | user_alias | braze_id | email, trigger_properties?, send_to_existing_only?, attributes?}]}` (≤ 50 recipients, trigger_properties ≤ 50 KB)"),
    responses(
        (status = 201, description = "`{\"dispatch_id\": \"<32 hex>\", \"message\": \"success\"}` (+ `send_id` when the send has one: a broadcast without one gets one; + `errors` for recipients whose attributes were refused)", body = Object),
        (status = 400, description = "`Bad Request` (with `errors`), `No Recipients`, `Invalid Campaign ID` (unknown, not API-triggered, or not active), `The max number of external_ids and aliases per request was exceeded`; nothing is sent", body = crate::wire::ErrorBody),
        (status = 503, description = "Messaging is not enabled on this server", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn trigger_send(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::CampaignsTriggerSend,
        req,
        |state, caller, req| async move {
            let body = read_json(req).await?;
            counted_as_broadcast(&state, &caller, &body, async {
                let Some(api) = messaging(&state) else {
                    return Ok(not_enabled());
                };
                let (dispatch_id, send_id, errors) =
                    trigger(&state, &api, &caller, &body, None).await?;
                Ok(dispatched(&dispatch_id, send_id.as_deref(), errors))
            })
            .await
        },
    )
    .await
}

/// An API-triggered campaign send, now or at `schedule`: the dispatch id, its `send_id` (a
/// broadcast without one gets one, as Braze gives it, so its daily series can be read) and the
/// non-fatal errors. Shared by `/campaigns/trigger/send` and
/// `/campaigns/trigger/schedule/create`.
/// The ad-hoc definition of a `messages` object ([`adhoc_definition`]), checked as a campaign's
/// is (shape, Liquid), with errors naming `messages.<channel>…`; and the channels Tideway does
/// not send (the answer's `errors`).
pub(crate) fn checked_adhoc_definition(
    messages: &Map<String, Value>,
    subscription: SubscriptionState,
) -> Result<(Value, Vec<String>), ApiError> {
    let channels: Vec<&str> = messages
        .keys()
        .map(String::as_str)
        .filter(|c| matches!(*c, "email" | "webhook"))
        .collect();
    if let Some(email) = messages.get("email").and_then(Value::as_object) {
        // Braze lets `email_template_id` stand in for the body; Tideway keeps no templates,
        // and "subject is required" would not say why.
        if email.get("email_template_id").is_some_and(|t| !t.is_null())
            && email.get("body").is_none_or(Value::is_null)
        {
            return Err(malformed(
                "messages.email.email_template_id: Tideway keeps no email templates; send `subject` and `body` instead",
            ));
        }
        // Braze takes only a BCC address configured for the workspace; Tideway configures
        // none, so any is refused rather than dropped.
        if email.get("bcc").is_some_and(|b| !b.is_null()) {
            return Err(malformed(
                "messages.email.bcc: no BCC address is configured on this server",
            ));
        }
    }
    let (definition, unsupported) = adhoc_definition(messages).map_err(|e: DefinitionError| {
        if e.path == "messages" {
            let errors: Vec<String> = messages
                .keys()
                .filter(|c| !matches!(c.as_str(), "email" | "webhook"))
                .map(|c| format!("unsupported channel: {c}"))
                .collect();
            fatal(NO_MESSAGE, errors)
        } else {
            malformed(format!("{}: {}", adhoc_path(&e.path, &channels), e.message))
        }
    })?;
    let mut definition = definition;
    if subscription != SubscriptionState::default()
        && let Value::Object(fields) = &mut definition
    {
        fields.insert(
            "recipient_subscription_state".into(),
            json!(subscription.as_str()),
        );
    }
    let def = CampaignDefinition::load(&definition).map_err(|e| {
        tracing::error!(error = %e, "an ad-hoc definition does not load back");
        ApiError::Internal
    })?;
    check_templates(&def, |p| adhoc_path(p, &channels))?;
    Ok((definition, unsupported))
}

/// Refuses a `segment_id` that names no segment of the workspace ([`INVALID_SEGMENT`]).
pub(crate) async fn check_segment_id(
    state: &AppState,
    workspace: tideway_core::ids::WorkspaceId,
    body: &Map<String, Value>,
) -> Result<(), ApiError> {
    if let Some(Value::String(id)) = body.get("segment_id")
        && !id.is_empty()
        && state.store().segment(workspace, id).await?.is_none()
    {
        return Err(ApiError::bad_request(INVALID_SEGMENT));
    }
    Ok(())
}

pub(crate) async fn trigger(
    state: &AppState,
    api: &MessagingApi,
    caller: &Caller,
    body: &Map<String, Value>,
    schedule: Option<Millis>,
) -> Result<(String, Option<String>, Vec<String>), ApiError> {
    let at = now();
    let mut parsed = parse_trigger_send(body, at)?;
    parsed.send.at = schedule;
    if matches!(parsed.send.target, Target::Broadcast) && parsed.send.send_id.is_none() {
        parsed.send.send_id = Some(uuid::Uuid::new_v4().simple().to_string());
    }
    let send_id = parsed.send.send_id.clone();
    let ws = &caller.workspace;
    // Fatal checks first: nothing (not even attributes) is written for a refused send.
    active_api_campaign(state, ws.id, &parsed.campaign_id).await?;
    check_segment_id(state, ws.id, body).await?;
    let errors = apply_updates(state, ws, parsed.updates).await?;
    let outcome = trigger_campaign(
        state.store(),
        api.audiences.as_ref(),
        ws,
        &parsed.campaign_id,
        parsed.send,
        now(),
    )
    .await
    .map_err(send_error)?;
    api.engine.wake();
    Ok((outcome.dispatch_id, send_id, errors))
}

/// `POST /messages/send`.
#[utoipa::path(
    post,
    path = "/messages/send",
    tag = "messaging",
    summary = "Braze: send ad-hoc messages (messages.send)",
    request_body(content = Object, description = "`{broadcast?, external_user_ids?, user_aliases?, segment_id?, audience?, campaign_id?, send_id?, recipient_subscription_state?, messages: {email?, webhook?}}` (≤ 50 ids and aliases)"),
    responses(
        (status = 201, description = "`{\"dispatch_id\", \"message\": \"success\"}`, plus `errors: [\"unsupported channel: <name>\"]` for channels Tideway does not send", body = Object),
        (status = 400, description = "`Bad Request` (with `errors` naming the field), `No Recipients`, `No message to send`, `Invalid Campaign ID`, `Message Variant Unspecified`, `Invalid Message Variant`, `Mismatched Message Type`, `The max number of external_ids and aliases per request was exceeded`", body = crate::wire::ErrorBody),
        (status = 503, description = "Messaging is not enabled on this server", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn messages_send(State(state): State<AppState>, req: Request) -> Response {
    management(
        state,
        Permission::MessagesSend,
        req,
        |state, caller, req| async move {
            let body = read_json(req).await?;
            counted_as_broadcast(&state, &caller, &body, async {
                let Some(api) = messaging(&state) else {
                    return Ok(not_enabled());
                };
                let (dispatch_id, errors) = send_adhoc(&state, &api, &caller, &body, None).await?;
                Ok(dispatched(&dispatch_id, None, errors))
            })
            .await
        },
    )
    .await
}

/// The campaign `id` names, when it is an active API-triggered campaign of the workspace;
/// otherwise Braze's `Invalid Campaign ID` (with why, when the campaign exists).
pub(crate) async fn active_api_campaign(
    state: &AppState,
    workspace: tideway_core::ids::WorkspaceId,
    id: &str,
) -> Result<(CampaignRecord, CampaignDefinition), ApiError> {
    let campaign = state
        .store()
        .campaign(workspace, id)
        .await?
        .ok_or_else(|| ApiError::bad_request(INVALID_CAMPAIGN))?;
    let def = CampaignDefinition::load(&campaign.definition).map_err(|e| {
        tracing::error!(campaign = %campaign.id, error = %e, "stored campaign does not load");
        ApiError::Internal
    })?;
    if !matches!(def.delivery, Delivery::ApiTriggered) {
        return Err(fatal(
            INVALID_CAMPAIGN,
            vec!["the campaign's delivery is not api_triggered".into()],
        ));
    }
    if campaign.status != CampaignStatus::Active {
        return Err(send_error(SendError::NotActive(campaign.status.as_str())));
    }
    Ok((campaign, def))
}

/// An ad-hoc send, now or at `schedule`: the dispatch id and the non-fatal errors. Shared
/// by `/messages/send` and `/messages/schedule/create`.
pub(crate) async fn send_adhoc(
    state: &AppState,
    api: &MessagingApi,
    caller: &Caller,
    body: &Map<String, Value>,
    schedule: Option<Millis>,
) -> Result<(String, Vec<String>), ApiError> {
    // Braze's /messages/send takes attachments inside `messages.email`; a top-level list
    // would otherwise be dropped as an unknown key.
    if body.get("attachments").is_some_and(|a| !a.is_null()) {
        return Err(malformed(
            "attachments: list them in messages.email.attachments",
        ));
    }
    let mut parsed = parse_messages_send(body, now())?;
    parsed.send.at = schedule;
    let ws = &caller.workspace;
    // Credited to a campaign only when it is one `/campaigns/trigger/send` would send.
    let campaign = match &parsed.campaign_id {
        Some(id) => {
            let (campaign, def) = active_api_campaign(state, ws.id, id).await?;
            check_campaign_variants(&def, &parsed.messages)?;
            Some((campaign, def))
        }
        None => None,
    };
    check_segment_id(state, ws.id, body).await?;
    let (mut definition, unsupported) =
        checked_adhoc_definition(&parsed.messages, parsed.subscription)?;
    if let Some((campaign, def)) = &campaign {
        credit(&mut definition, campaign, def);
    }
    let outcome = send_messages(
        state.store(),
        api.audiences.as_ref(),
        ws,
        definition,
        parsed.send,
        now(),
    )
    .await
    .map_err(send_error)?;
    api.engine.wake();
    Ok((outcome.dispatch_id, unsupported))
}

/// `GET /campaigns/list`.
#[utoipa::path(
    get,
    path = "/campaigns/list",
    tag = "messaging",
    summary = "Braze: list campaigns (campaigns.list)",
    params(
        ("page" = Option<usize>, Query, description = "Page number from 0 (100 campaigns per page); past the last page the list is empty"),
        ("include_archived" = Option<bool>, Query, description = "Accepted; Tideway has no archived campaigns"),
        ("sort_direction" = Option<String>, Query, description = "`asc` (oldest first, the default) or `desc`"),
        ("last_edit.time[gt]" = Option<String>, Query, description = "Only campaigns edited after this ISO 8601 time"),
    ),
    responses(
        (status = 200, description = "`{\"message\": \"success\", \"campaigns\": [{id, last_edited, name, is_api_campaign, tags}]}`", body = Object),
        (status = 400, description = "A parameter that does not parse", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn campaigns_list(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::CampaignsList,
        req,
        |state, caller, _| async move {
            let list = ListQuery::parse(&params)?;
            let mut campaigns = state.store().list_campaigns(caller.workspace.id).await?;
            campaigns.sort_by_key(|c| (c.created_at, c.id.clone()));
            let items: Vec<Value> = list
                .page(campaigns, |c| c.updated_at)
                .iter()
                .map(|c| {
                    let api = CampaignDefinition::load(&c.definition)
                        .is_ok_and(|d| matches!(d.delivery, Delivery::ApiTriggered));
                    json!({
                        "id": c.id,
                        "last_edited": c.updated_at.to_iso(),
                        "name": c.name,
                        "is_api_campaign": api,
                        "tags": c.tags,
                    })
                })
                .collect();
            Ok(axum::Json(json!({"message": "success", "campaigns": items})).into_response())
        },
    )
    .await
}

/// One variant as `/campaigns/details` shows it.
fn variant_details(name: &str, message: &Message) -> Value {
    match message {
        Message::Email(e) => json!({
            "channel": "email",
            "name": name,
            "subject": e.subject,
            "body": e.body,
            "from": e.from,
            "reply_to": e.reply_to,
            "title": name,
            "amp_body": Value::Null,
            "preheader": e.preheader,
            "custom_plain_text": e.plaintext_body,
            "should_inline_css": false,
            "should_whitespace_header": false,
            "email_headers": e.headers.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
            "extras": e.extras.as_deref().and_then(|x| serde_json::from_str::<Value>(x).ok()),
        }),
        Message::Webhook(w) => json!({
            "channel": "webhook",
            "name": name,
            "url": w.url,
            "body": w.body,
            "type": if serde_json::from_str::<Value>(&w.body).is_ok() { "json" } else { "raw_text" },
            "headers": w.headers.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>(),
            "method": w.method.as_str(),
        }),
    }
}

/// `/campaigns/details`' body for a campaign.
pub(crate) fn details_json(c: &CampaignRecord, def: &CampaignDefinition) -> Value {
    let mut messages = Map::new();
    for v in &def.variants {
        messages.insert(v.id.clone(), variant_details(&v.name, &v.message));
    }
    if let Some((id, _)) = &def.control {
        let channel = def.channels().first().map_or("email", |c| c.as_str());
        messages.insert(
            id.clone(),
            json!({"channel": channel, "name": "Control Group", "type": "control"}),
        );
    }
    json!({
        "message": "success",
        "created_at": c.created_at.to_iso(),
        "updated_at": c.updated_at.to_iso(),
        "archived": false,
        "draft": c.status == CampaignStatus::Draft,
        "enabled": c.status == CampaignStatus::Active,
        "has_post_launch_draft": false,
        "name": c.name,
        "description": c.description,
        "schedule_type": def.delivery.schedule_type(),
        "channels": def.channels().iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        "first_sent": c.first_sent.map(Millis::to_iso),
        "last_sent": c.last_sent.map(Millis::to_iso),
        "tags": c.tags,
        "teams": [],
        "messages": messages,
        "conversion_behaviors": def.conversion_events.iter().map(|e| e.behavior_json()).collect::<Vec<_>>(),
    })
}

/// `GET /campaigns/details?campaign_id=…`.
#[utoipa::path(
    get,
    path = "/campaigns/details",
    tag = "messaging",
    summary = "Braze: campaign details (campaigns.details)",
    params(("campaign_id" = String, Query, description = "The campaign's id")),
    responses(
        (status = 200, description = "`{message, created_at, updated_at, archived, draft, enabled, has_post_launch_draft, name, description, schedule_type, channels, first_sent, last_sent, tags, teams, messages: {<variation id>: {channel, name, …}}, conversion_behaviors}`", body = Object),
        (status = 400, description = "`Invalid Campaign ID` (missing or unknown)", body = crate::wire::ErrorBody),
    ),
    security(("bearer_auth" = []))
)]
pub async fn campaigns_details(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    management(
        state,
        Permission::CampaignsDetails,
        req,
        |state, caller, _| async move {
            let id = params
                .get("campaign_id")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| ApiError::bad_request(INVALID_CAMPAIGN))?;
            let c = state
                .store()
                .campaign(caller.workspace.id, id)
                .await?
                .ok_or_else(|| ApiError::bad_request(INVALID_CAMPAIGN))?;
            let def = CampaignDefinition::load(&c.definition).map_err(|e| {
                tracing::error!(campaign = %c.id, error = %e, "stored campaign does not load");
                ApiError::Internal
            })?;
            Ok(axum::Json(details_json(&c, &def)).into_response())
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: Millis = Millis(1_750_000_000_000);

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn trigger(v: Value) -> Result<TriggerSend, ApiError> {
        parse_trigger_send(&obj(v), AT)
    }

    fn messages(v: Value) -> Result<MessagesSend, ApiError> {
        parse_messages_send(&obj(v), AT)
    }

    fn message_of(e: ApiError) -> String {
        e.body()["message"].as_str().unwrap_or_default().to_owned()
    }

    #[test]
    fn trigger_send_recipients_are_parsed_with_numbers_as_text() {
        let t = trigger(json!({
            "campaign_id": "c1",
            "send_id": "s-1",
            "trigger_properties": {"coupon": "X"},
            "recipients": [
                {"external_user_id": 12345, "trigger_properties": {"coupon": "Y"}},
                {"user_alias": {"alias_name": "n", "alias_label": "l"}},
                {"braze_id": "0123456789abcdef01234567"},
                {"email": "a@b.c", "prioritization": ["identified"]},
            ],
            "unknown": "ignored",
        }))
        .unwrap();
        assert_eq!(t.campaign_id, "c1");
        assert_eq!(t.send.send_id.as_deref(), Some("s-1"));
        assert_eq!(t.send.properties, Some(obj(json!({"coupon": "X"}))));
        let Target::Recipients(r) = &t.send.target else {
            panic!("recipients expected")
        };
        assert_eq!(r.len(), 4);
        assert_eq!(
            r[0].id,
            RecipientId::External(ExternalId::parse("12345").unwrap())
        );
        assert_eq!(r[0].properties, Some(obj(json!({"coupon": "Y"}))));
        assert!(matches!(r[1].id, RecipientId::Alias(_)));
        assert!(matches!(r[2].id, RecipientId::Braze(_)));
        assert!(matches!(r[3].id, RecipientId::Email(_)));
        assert!(t.updates.is_empty());
    }

    #[test]
    fn trigger_send_attributes_become_track_objects() {
        let t = trigger(json!({
            "campaign_id": "c1",
            "recipients": [
                {"external_user_id": "u1", "send_to_existing_only": false,
                 "attributes": {"first_name": "Ada", "external_id": "other"}},
                {"external_user_id": "u2", "attributes": {"plan": "pro"}},
            ],
        }))
        .unwrap();
        assert_eq!(
            t.updates,
            vec![
                RecipientUpdate {
                    index: 0,
                    object: obj(
                        json!({"first_name": "Ada", "external_id": "u1", "_update_existing_only": false})
                    ),
                },
                RecipientUpdate {
                    index: 1,
                    object: obj(
                        json!({"plan": "pro", "external_id": "u2", "_update_existing_only": true})
                    ),
                },
            ]
        );
    }

    #[test]
    fn trigger_send_targets() {
        assert_eq!(
            trigger(json!({"campaign_id": "c", "broadcast": true}))
                .unwrap()
                .send
                .target,
            Target::Broadcast
        );
        let t = trigger(json!({"campaign_id": "c", "audience": {"custom_attribute": {"custom_attribute_name": "plan", "comparison": "equals", "value": "pro"}}})).unwrap();
        assert_eq!(t.send.target, Target::Broadcast);
        assert_eq!(
            t.send.audience,
            Some(json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}}))
        );
    }

    #[test]
    fn trigger_send_fatal_errors_use_brazes_labels() {
        let fifty_one: Vec<Value> = (0..51)
            .map(|i| json!({"external_user_id": format!("u{i}")}))
            .collect();
        let big = "x".repeat(MAX_PROPERTIES_BYTES);
        let cases = [
            (
                json!({"recipients": [{"external_user_id": "u"}]}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": ["c"], "broadcast": true}),
                "Bad Request",
            ),
            (json!({"campaign_id": "c"}), NO_RECIPIENTS),
            (json!({"campaign_id": "c", "recipients": []}), NO_RECIPIENTS),
            (
                json!({"campaign_id": "c", "broadcast": true, "recipients": [{"external_user_id": "u"}]}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "recipients": fifty_one}),
                TOO_MANY_RECIPIENTS,
            ),
            (
                json!({"campaign_id": "c", "recipients": [{}]}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "recipients": [{"external_user_id": "u", "braze_id": "0123456789abcdef01234567"}]}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "recipients": [{"braze_id": "nope"}]}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "broadcast": true, "trigger_properties": {"big": big}}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "broadcast": "yes"}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "recipients": [{"external_user_id": "u", "send_to_existing_only": false}]}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "recipients": [{"user_alias": {"alias_name": "n", "alias_label": "l"}, "send_to_existing_only": false, "attributes": {"a": 1}}]}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "broadcast": true, "attachments": [{"file_name": "f", "url": "https://x/f.pdf"}]}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "broadcast": true, "audience": {"custom_attribute": {"custom_attribute_name": "x", "comparison": "sounds_like", "value": 1}}}),
                "Bad Request",
            ),
            (
                json!({"campaign_id": "c", "send_id": "é", "broadcast": true}),
                "Bad Request",
            ),
        ];
        for (body, expected) in cases {
            let e = trigger(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.status().as_u16(), 400, "{body}");
            assert_eq!(message_of(e), expected, "{body}");
        }
        let e = trigger(json!({"campaign_id": "c", "broadcast": true, "audience": {"custom_attribute": {"custom_attribute_name": "x", "comparison": "sounds_like", "value": 1}}})).unwrap_err();
        let errors = e.body()["errors"].to_string();
        assert!(errors.contains("sounds_like"), "{errors}");
    }

    #[test]
    fn messages_send_parses_ids_aliases_and_audiences() {
        let m = messages(json!({
            "external_user_ids": ["u1", 7],
            "user_aliases": [{"alias_name": "n", "alias_label": "l"}],
            "segment_id": "seg",
            "recipient_subscription_state": "opted_in",
            "messages": {"webhook": {"url": "https://x", "body": "hi"}},
        }))
        .unwrap();
        let Target::Recipients(r) = &m.send.target else {
            panic!("recipients expected")
        };
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[1].id,
            RecipientId::External(ExternalId::parse("7").unwrap())
        );
        assert_eq!(
            m.send.audience,
            Some(json!({"and": [
                {"in_segment": "seg"},
                {"attribute": {"name": "email_subscribe", "op": "equals", "value": "opted_in"}},
            ]}))
        );
        let b = messages(json!({"segment_id": "seg", "messages": {"webhook": {}}})).unwrap();
        assert_eq!(b.send.target, Target::Broadcast);
    }

    #[test]
    fn messages_send_fatal_errors_use_brazes_labels() {
        let ids: Vec<Value> = (0..40).map(|i| json!(format!("u{i}"))).collect();
        let aliases: Vec<Value> = (0..11)
            .map(|i| json!({"alias_name": format!("n{i}"), "alias_label": "l"}))
            .collect();
        let cases = [
            (json!({"messages": {"webhook": {}}}), NO_RECIPIENTS),
            (
                json!({"broadcast": true, "messages": {"webhook": {}}}),
                NO_RECIPIENTS,
            ),
            (json!({"external_user_ids": ["u"]}), NO_MESSAGE),
            (
                json!({"external_user_ids": ["u"], "messages": {}}),
                NO_MESSAGE,
            ),
            (
                json!({"external_user_ids": ids, "user_aliases": aliases, "messages": {"webhook": {}}}),
                TOO_MANY_RECIPIENTS,
            ),
            (
                json!({"broadcast": true, "external_user_ids": ["u"], "messages": {"webhook": {}}}),
                "Bad Request",
            ),
            (
                json!({"external_user_ids": "u", "messages": {"webhook": {}}}),
                "Bad Request",
            ),
            (
                json!({"external_user_ids": ["u"], "recipient_subscription_state": "maybe", "messages": {"webhook": {}}}),
                "Bad Request",
            ),
            (
                json!({"external_user_ids": [""], "messages": {"webhook": {}}}),
                "Bad Request",
            ),
        ];
        for (body, expected) in cases {
            let e = messages(body.clone()).expect_err(&body.to_string());
            assert_eq!(e.status().as_u16(), 400, "{body}");
            assert_eq!(message_of(e), expected, "{body}");
        }
    }

    #[test]
    fn adhoc_paths_name_the_channel() {
        let channels = ["email", "webhook"];
        assert_eq!(
            adhoc_path("messages[1].url", &channels),
            "messages.webhook.url"
        );
        assert_eq!(
            adhoc_path("messages[0].from", &channels),
            "messages.email.from"
        );
        assert_eq!(adhoc_path("messages", &channels), "messages");
        assert_eq!(adhoc_path("messages[9].x", &channels), "messages[9].x");
    }
}
