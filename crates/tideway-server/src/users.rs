//! The `/users/*` endpoints: each parses its body into `tideway-core` commands, calls one
//! `Store` operation, and renders Braze's response (braze-api.md §3, §4).
//!
//! Validation happens here, completely, before the store is called: a request that gets a 400
//! has written nothing (no users, no Currents events). Batch endpoints follow Braze: invalid
//! elements are reported by index while the valid ones are applied; a request with no valid
//! element at all is a 400.

use axum::extract::{Request, State};
use axum::response::Response;
use serde_json::{Map, Value, json};
use tideway_core::ids::{AliasName, BrazeId, DeviceId, Email, Phone, UserAlias};
use tideway_core::services::Services;
use tideway_core::track::{InputArray, ObjectError, TrackRejected, parse_track};
use tideway_core::users::{
    AliasNewItem, AliasUpdateItem, DeleteRequest, EXPORT_FIELDS, EXPORT_FIELDS_NOT_KEPT,
    ExportRequest, IdentifyItem, IdentifySource, MergeItem, RenameItem, UserKey,
};

use crate::AppState;
use crate::error::ApiError;
use crate::fields::{
    MAX_BATCH, alias_value, external_id_value, id_value, opt_array, opt_id, opt_string,
    optional_external_id, optional_id, prioritization, required_batch, required_external_id,
    required_id,
};
use crate::observe::TRACK_OBJECTS_TOTAL;
use crate::pipeline::{Caller, Endpoint, created, now, rest};
use crate::wire::{
    AliasNewBody, AliasUpdateBody, AliasesProcessedResponse, DeleteBody, DeleteResponse, ErrorBody,
    ExportBody, ExportResponse, IdentifyBody, ItemError, MergeBody, RemoveBody, RemoveResponse,
    RenameBody, RenameResponse, SuccessResponse, TrackBody, TrackObjectError, TrackResponse,
};

/// Declares one REST handler: its OpenAPI description and the function the router calls,
/// which hands the request to the pipeline with its endpoint.
macro_rules! rest_handler {
    ($name:ident, $path:literal, $endpoint:expr, $summary:literal, $request:ty, $response:ty) => {
        #[utoipa::path(
            post,
            path = $path,
            tag = "users",
            summary = $summary,
            request_body(content = $request, description = "JSON body (Content-Type optional; unknown keys ignored)"),
            responses(
                (status = 201, description = "Success", body = $response,
                    headers(
                        ("X-RateLimit-Limit" = u32, description = "Requests allowed per minute for this key and endpoint group"),
                        ("X-RateLimit-Remaining" = u32, description = "Requests left in the current window"),
                        ("X-RateLimit-Reset" = i64, description = "End of the current window, UTC epoch seconds"),
                    )),
                (status = 400, description = "Invalid body, with the reason", body = ErrorBody),
                (status = 401, description = "Missing or unknown key: `Invalid API key: <first 12 characters of the key>` (no rate-limit headers)", body = ErrorBody),
                (status = 403, description = "`Access Denied` (permission) or `Access Denied: IP address not allowlisted for this API key`", body = ErrorBody),
                (status = 413, description = "`Payload Too Large`", body = ErrorBody),
                (status = 429, description = "`Rate Limited`, with `Retry-After`", body = ErrorBody),
                (status = 500, description = "`Internal Server Error`", body = ErrorBody),
                (status = 503, description = "`Service Unavailable`: storage unavailable, retry later", body = ErrorBody),
            ),
            security(("bearer_auth" = []), ("api_key_query" = []))
        )]
        pub async fn $name(State(state): State<AppState>, req: Request) -> Response {
            rest(state, $endpoint, req).await
        }
    };
}

rest_handler!(
    users_track,
    "/users/track",
    Endpoint::Track,
    "Record attributes, events and purchases (users.track)",
    TrackBody,
    TrackResponse
);
rest_handler!(
    users_identify,
    "/users/identify",
    Endpoint::Identify,
    "Identify alias-only, device, email or phone users (users.identify)",
    IdentifyBody,
    AliasesProcessedResponse
);
rest_handler!(
    users_alias_new,
    "/users/alias/new",
    Endpoint::AliasNew,
    "Create user aliases (users.alias.new)",
    AliasNewBody,
    AliasesProcessedResponse
);
rest_handler!(
    users_alias_update,
    "/users/alias/update",
    Endpoint::AliasUpdate,
    "Rename user aliases (users.alias.update)",
    AliasUpdateBody,
    SuccessResponse
);
rest_handler!(
    users_merge,
    "/users/merge",
    Endpoint::Merge,
    "Merge one user into another (users.merge)",
    MergeBody,
    SuccessResponse
);
rest_handler!(
    users_delete,
    "/users/delete",
    Endpoint::Delete,
    "Delete users (users.delete)",
    DeleteBody,
    DeleteResponse
);
rest_handler!(
    users_external_ids_rename,
    "/users/external_ids/rename",
    Endpoint::ExternalIdsRename,
    "Rename external ids (users.external_ids.rename)",
    RenameBody,
    RenameResponse
);
rest_handler!(
    users_external_ids_remove,
    "/users/external_ids/remove",
    Endpoint::ExternalIdsRemove,
    "Remove deprecated external ids (users.external_ids.remove)",
    RemoveBody,
    RemoveResponse
);
rest_handler!(
    users_export_ids,
    "/users/export/ids",
    Endpoint::ExportIds,
    "Export user profiles by identifier (users.export.ids)",
    ExportBody,
    ExportResponse
);

/// Runs an authorised request's endpoint.
pub async fn dispatch(
    state: &AppState,
    endpoint: Endpoint,
    caller: &Caller,
    body: Map<String, Value>,
) -> Result<Response, ApiError> {
    match endpoint {
        Endpoint::Track => track(state, caller, &body).await,
        Endpoint::Identify => identify(state, caller, &body).await,
        Endpoint::AliasNew => alias_new(state, caller, &body).await,
        Endpoint::AliasUpdate => alias_update(state, caller, &body).await,
        Endpoint::Merge => merge(state, caller, &body).await,
        Endpoint::Delete => delete(state, caller, &body).await,
        Endpoint::ExternalIdsRename => rename(state, caller, &body).await,
        Endpoint::ExternalIdsRemove => remove(state, caller, &body).await,
        Endpoint::ExportIds => export(state, caller, &body).await,
    }
}

const SUCCESS: &str = "success";

/// The raw text of an element for `[id, reason]` error pairs: the string itself, else its JSON.
fn raw_text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "null".to_owned(),
    }
}

// ---------------------------------------------------------------- /users/track

const TRACK_NOTHING_VALID: &str =
    "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.";

fn track_error(e: &ObjectError) -> TrackObjectError {
    TrackObjectError {
        kind: e.message.clone(),
        input_array: e.input_array.as_str().to_owned(),
        index: e.index,
    }
}

fn count_track_objects(array: InputArray, outcome: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(TRACK_OBJECTS_TOTAL, "array" => array.as_str(), "outcome" => outcome)
            .increment(n as u64);
    }
}

fn count_rejected(errors: &[ObjectError]) {
    for array in [
        InputArray::Attributes,
        InputArray::Events,
        InputArray::Purchases,
    ] {
        count_track_objects(
            array,
            "rejected",
            errors.iter().filter(|e| e.input_array == array).count(),
        );
    }
}

async fn track(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let request = parse_track(body).map_err(|rejected| match rejected {
        TrackRejected::TooManyObjects => ApiError::bad_request("Max Input Length Exceeded"),
        TrackRejected::NotAnArray(_) => ApiError::bad_request(rejected.to_string()),
    })?;
    if request.valid_objects() == 0 {
        count_rejected(&request.errors);
        let errors: Vec<TrackObjectError> = request.errors.iter().map(track_error).collect();
        return Err(ApiError::bad_request_with(
            TRACK_NOTHING_VALID,
            "errors",
            json!(errors),
        ));
    }
    let present = |key: &str| matches!(body.get(key), Some(Value::Array(_)));
    let outcome = state
        .store()
        .track(&caller.workspace, request, now())
        .await?;
    count_track_objects(
        InputArray::Attributes,
        "processed",
        outcome.attributes_processed,
    );
    count_track_objects(InputArray::Events, "processed", outcome.events_processed);
    count_track_objects(
        InputArray::Purchases,
        "processed",
        outcome.purchases_processed,
    );
    count_rejected(&outcome.errors);
    Ok(created(TrackResponse {
        message: SUCCESS.to_owned(),
        attributes_processed: present("attributes").then_some(outcome.attributes_processed),
        events_processed: present("events").then_some(outcome.events_processed),
        purchases_processed: present("purchases").then_some(outcome.purchases_processed),
        errors: outcome.errors.iter().map(track_error).collect(),
    }))
}

// ---------------------------------------------------------------- batch helpers

/// Element errors of a batch, by index (and array, where there are several).
struct Items<T> {
    valid: Vec<(usize, T)>,
    errors: Vec<ItemError>,
}

impl<T> Items<T> {
    fn parse(
        list: &[Value],
        input_array: Option<&str>,
        parse: impl Fn(&Value) -> Result<T, String>,
    ) -> Self {
        let mut items = Items {
            valid: Vec::new(),
            errors: Vec::new(),
        };
        for (index, value) in list.iter().enumerate() {
            match parse(value) {
                Ok(item) => items.valid.push((index, item)),
                Err(kind) => items.errors.push(ItemError {
                    kind,
                    input_array: input_array.map(str::to_owned),
                    index,
                }),
            }
        }
        items
    }

    /// 400 when nothing is valid (the errors, possibly none, say why).
    fn require_some(&self, fields: &str) -> Result<(), ApiError> {
        if self.valid.is_empty() {
            return Err(ApiError::bad_request_with(
                format!("Valid data must be provided in the {fields}."),
                "errors",
                json!(self.errors),
            ));
        }
        Ok(())
    }
}

fn store_errors(
    errors: Vec<(usize, String)>,
    input_array: Option<&str>,
) -> impl Iterator<Item = ItemError> + '_ {
    errors.into_iter().map(move |(index, kind)| ItemError {
        kind,
        input_array: input_array.map(str::to_owned),
        index,
    })
}

// ---------------------------------------------------------------- /users/identify

/// Parses one element of a batch array.
type ElementParser<T> = fn(&Value) -> Result<T, String>;

const IDENTIFY_ARRAYS: [&str; 3] = [
    "aliases_to_identify",
    "emails_to_identify",
    "phone_numbers_to_identify",
];

fn parse_identify_alias(value: &Value) -> Result<IdentifyItem, String> {
    let obj = value
        .as_object()
        .ok_or("'aliases_to_identify' elements must be objects")?;
    let external_id = required_external_id(obj, "external_id")?;
    let alias = obj.get("user_alias").filter(|v| !v.is_null());
    let device = optional_id(obj, "device_id", DeviceId::parse)?;
    let source = match (alias, device) {
        (Some(alias), None) => IdentifySource::Alias(alias_value(alias, "user_alias")?),
        (None, Some(device)) => IdentifySource::Device(device),
        (Some(_), Some(_)) => {
            return Err("give either 'user_alias' or 'device_id', not both".to_owned());
        }
        (None, None) => return Err("'user_alias' is required".to_owned()),
    };
    Ok(IdentifyItem {
        external_id,
        source,
    })
}

fn parse_identify_email(value: &Value) -> Result<IdentifyItem, String> {
    let obj = value
        .as_object()
        .ok_or("'emails_to_identify' elements must be objects")?;
    let external_id = required_external_id(obj, "external_id")?;
    let email = required_id(obj, "email", Email::parse)?;
    Ok(IdentifyItem {
        external_id,
        source: IdentifySource::Email(email, prioritization(obj)?),
    })
}

fn parse_identify_phone(value: &Value) -> Result<IdentifyItem, String> {
    let obj = value
        .as_object()
        .ok_or("'phone_numbers_to_identify' elements must be objects")?;
    let external_id = required_external_id(obj, "external_id")?;
    let phone = required_id(obj, "phone", Phone::parse)?;
    Ok(IdentifyItem {
        external_id,
        source: IdentifySource::Phone(phone, prioritization(obj)?),
    })
}

async fn identify(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let lists = [
        opt_array(body, IDENTIFY_ARRAYS[0])?,
        opt_array(body, IDENTIFY_ARRAYS[1])?,
        opt_array(body, IDENTIFY_ARRAYS[2])?,
    ];
    match opt_string(body, "merge_behavior")? {
        None | Some("none" | "merge") => {}
        Some(_) => {
            return Err(ApiError::bad_request(
                "'merge_behavior' must be 'none' or 'merge'",
            ));
        }
    }
    if lists.iter().all(Option::is_none) {
        return Err(ApiError::bad_request("'aliases_to_identify' is required"));
    }
    if lists.iter().flatten().map(|l| l.len()).sum::<usize>() > MAX_BATCH {
        return Err(ApiError::bad_request("Max Input Length Exceeded"));
    }
    // The store sees one index space; `origin` maps it back to (array, index in that array).
    let parsers: [ElementParser<IdentifyItem>; 3] = [
        parse_identify_alias,
        parse_identify_email,
        parse_identify_phone,
    ];
    let mut all = Items::<IdentifyItem> {
        valid: Vec::new(),
        errors: Vec::new(),
    };
    let mut origin: Vec<(usize, usize)> = Vec::new();
    for (array, (list, parser)) in lists.iter().zip(parsers).enumerate() {
        let parsed = Items::parse(list.unwrap_or(&[]), Some(IDENTIFY_ARRAYS[array]), parser);
        for (index, item) in parsed.valid {
            all.valid.push((origin.len(), item));
            origin.push((array, index));
        }
        all.errors.extend(parsed.errors);
    }
    all.require_some(
        "'aliases_to_identify', 'emails_to_identify', or 'phone_numbers_to_identify' fields",
    )?;
    let outcome = state
        .store()
        .identify(&caller.workspace, all.valid, now())
        .await?;
    for (global, kind) in outcome.errors {
        if let Some(&(array, index)) = origin.get(global) {
            all.errors.push(ItemError {
                kind,
                input_array: Some(IDENTIFY_ARRAYS[array].to_owned()),
                index,
            });
        }
    }
    let array_rank = |e: &ItemError| {
        IDENTIFY_ARRAYS
            .iter()
            .position(|a| Some(*a) == e.input_array.as_deref())
    };
    all.errors.sort_by_key(|e| (array_rank(e), e.index));
    Ok(created(AliasesProcessedResponse {
        aliases_processed: outcome.processed,
        message: SUCCESS.to_owned(),
        errors: all.errors,
    }))
}

// ---------------------------------------------------------------- /users/alias/new

fn parse_new_alias(value: &Value) -> Result<AliasNewItem, String> {
    let obj = value
        .as_object()
        .ok_or("'user_aliases' elements must be objects")?;
    let alias = match obj.get("user_alias").filter(|v| !v.is_null()) {
        Some(wrapped) => alias_value(wrapped, "user_alias")?,
        None => UserAlias {
            label: required_id(obj, "alias_label", tideway_core::ids::AliasLabel::parse)?,
            name: required_id(obj, "alias_name", AliasName::parse)?,
        },
    };
    let external_id = optional_external_id(obj, "external_id")?;
    Ok(AliasNewItem { external_id, alias })
}

fn sorted(mut errors: Vec<ItemError>) -> Vec<ItemError> {
    errors.sort_by_key(|e| e.index);
    errors
}

async fn alias_new(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let mut items = Items::parse(required_batch(body, "user_aliases")?, None, parse_new_alias);
    items.require_some("'user_aliases' field")?;
    let outcome = state
        .store()
        .alias_new(&caller.workspace, items.valid, now())
        .await?;
    items.errors.extend(store_errors(outcome.errors, None));
    Ok(created(AliasesProcessedResponse {
        aliases_processed: outcome.processed,
        message: SUCCESS.to_owned(),
        errors: sorted(items.errors),
    }))
}

// ---------------------------------------------------------------- /users/alias/update

fn parse_alias_update(value: &Value) -> Result<AliasUpdateItem, String> {
    let obj = value
        .as_object()
        .ok_or("'alias_updates' elements must be objects")?;
    let label = required_id(obj, "alias_label", tideway_core::ids::AliasLabel::parse)?;
    let old_name = required_id(obj, "old_alias_name", AliasName::parse)?;
    let new_name = required_id(obj, "new_alias_name", AliasName::parse)?;
    Ok(AliasUpdateItem {
        old: UserAlias {
            label,
            name: old_name,
        },
        new_name,
    })
}

async fn alias_update(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let mut items = Items::parse(
        required_batch(body, "alias_updates")?,
        None,
        parse_alias_update,
    );
    items.require_some("'alias_updates' field")?;
    let outcome = state
        .store()
        .alias_update(&caller.workspace, items.valid, now())
        .await?;
    items.errors.extend(store_errors(outcome.errors, None));
    Ok(created(SuccessResponse {
        message: SUCCESS.to_owned(),
        errors: sorted(items.errors),
    }))
}

// ---------------------------------------------------------------- /users/merge

const USER_KEYS: [&str; 5] = ["external_id", "user_alias", "braze_id", "email", "phone"];

/// An identifier object naming exactly one user, e.g. `{"external_id": "u1"}`.
fn parse_user_key(value: Option<&Value>, what: &str) -> Result<UserKey, String> {
    let obj = match value {
        None | Some(Value::Null) => return Err(format!("'{what}' is required")),
        Some(v) => v
            .as_object()
            .ok_or_else(|| format!("'{what}' must be an object"))?,
    };
    let given: Vec<(&str, &Value)> = USER_KEYS
        .into_iter()
        .filter_map(|k| obj.get(k).filter(|v| !v.is_null()).map(|v| (k, v)))
        .collect();
    let (key, raw) = match given.as_slice() {
        [one] => *one,
        [] => {
            return Err(format!(
                "'{what}' must have one of 'external_id', 'user_alias', 'braze_id', 'email' or 'phone'"
            ));
        }
        _ => return Err(format!("'{what}' must have exactly one identifier")),
    };
    let field = |name: &str| format!("{what}.{name}");
    Ok(match key {
        "external_id" => UserKey::External(external_id_value(raw, &field(key))?),
        "user_alias" => UserKey::Alias(alias_value(raw, &field(key))?),
        "braze_id" => UserKey::Braze(id_value(raw, &field(key), BrazeId::parse)?),
        "email" => UserKey::Email(
            id_value(raw, &field(key), Email::parse)?,
            prioritization(obj)?,
        ),
        _ => UserKey::Phone(id_value(raw, &field(key), Phone::parse)?),
    })
}

fn parse_merge(value: &Value) -> Result<MergeItem, String> {
    let obj = value
        .as_object()
        .ok_or("'merge_updates' elements must be objects")?;
    Ok(MergeItem {
        merge: parse_user_key(obj.get("identifier_to_merge"), "identifier_to_merge")?,
        keep: parse_user_key(obj.get("identifier_to_keep"), "identifier_to_keep")?,
    })
}

async fn merge(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let mut items = Items::parse(required_batch(body, "merge_updates")?, None, parse_merge);
    items.require_some("'merge_updates' field")?;
    let outcome = state
        .store()
        .merge_users(&caller.workspace, items.valid, now())
        .await?;
    items.errors.extend(store_errors(outcome.errors, None));
    Ok(created(SuccessResponse {
        message: SUCCESS.to_owned(),
        errors: sorted(items.errors),
    }))
}

// ---------------------------------------------------------------- /users/delete

const DELETE_FIELDS: [&str; 5] = [
    "external_ids",
    "user_aliases",
    "braze_ids",
    "email_addresses",
    "phone_numbers",
];

fn parse_delete_key(field: &str, value: &Value, what: &str) -> Result<UserKey, String> {
    Ok(match field {
        "external_ids" => UserKey::External(external_id_value(value, what)?),
        "user_aliases" => UserKey::Alias(alias_value(value, what)?),
        "braze_ids" => UserKey::Braze(id_value(value, what, BrazeId::parse)?),
        "email_addresses" => match value {
            Value::Object(obj) => {
                let email = required_id(obj, "email", Email::parse)
                    .map_err(|e| format!("'{what}': {e}"))?;
                UserKey::Email(
                    email,
                    prioritization(obj).map_err(|e| format!("'{what}': {e}"))?,
                )
            }
            other => UserKey::Email(id_value(other, what, Email::parse)?, Vec::new()),
        },
        _ => match value {
            Value::Object(obj) => UserKey::Phone(
                required_id(obj, "phone", Phone::parse).map_err(|e| format!("'{what}': {e}"))?,
            ),
            other => UserKey::Phone(id_value(other, what, Phone::parse)?),
        },
    })
}

async fn delete(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let mut lists = Vec::new();
    for field in DELETE_FIELDS {
        if let Some(list) = opt_array(body, field)? {
            lists.push((field, list));
        }
    }
    let total: usize = lists.iter().map(|(_, l)| l.len()).sum();
    if total > MAX_BATCH {
        return Err(ApiError::bad_request(
            "The max number of ids per request was exceeded",
        ));
    }
    if total == 0 {
        return Err(ApiError::bad_request(
            "At least one identifier must be provided in 'external_ids', 'user_aliases', 'braze_ids', 'email_addresses' or 'phone_numbers'",
        ));
    }
    let mut users = Vec::with_capacity(total);
    for (field, list) in lists {
        for (i, value) in list.iter().enumerate() {
            users.push(
                parse_delete_key(field, value, &format!("{field}[{i}]"))
                    .map_err(ApiError::bad_request)?,
            );
        }
    }
    let outcome = state
        .store()
        .delete_users(&caller.workspace, DeleteRequest { users }, now())
        .await?;
    Ok(created(DeleteResponse {
        deleted: outcome.deleted,
        message: SUCCESS.to_owned(),
    }))
}

// ---------------------------------------------------------------- /users/external_ids/*

fn parse_rename(value: &Value) -> Result<RenameItem, [String; 2]> {
    let Some(obj) = value.as_object() else {
        return Err([
            raw_text(Some(value)),
            "'external_id_renames' elements must be objects".to_owned(),
        ]);
    };
    let fail = |reason: String| [raw_text(obj.get("current_external_id")), reason];
    let current = required_external_id(obj, "current_external_id").map_err(fail)?;
    let new = required_external_id(obj, "new_external_id").map_err(fail)?;
    Ok(RenameItem { current, new })
}

async fn rename(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let list = required_batch(body, "external_id_renames")?;
    let mut valid: Vec<RenameItem> = Vec::with_capacity(list.len());
    let mut rename_errors: Vec<[String; 2]> = Vec::new();
    for value in list {
        match parse_rename(value) {
            Ok(item) => valid.push(item),
            Err(pair) => rename_errors.push(pair),
        }
    }
    if valid.is_empty() {
        return Err(ApiError::bad_request_with(
            "Valid data must be provided in the 'external_id_renames' field.",
            "rename_errors",
            json!(rename_errors),
        ));
    }
    let outcome = state
        .store()
        .rename_external_ids(&caller.workspace, valid, now())
        .await?;
    rename_errors.extend(
        outcome
            .errors
            .into_iter()
            .map(|(id, reason)| [id.as_str().to_owned(), reason]),
    );
    Ok(created(RenameResponse {
        message: SUCCESS.to_owned(),
        external_ids: outcome
            .renamed
            .iter()
            .map(|id| id.as_str().to_owned())
            .collect(),
        rename_errors,
    }))
}

async fn remove(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let list = required_batch(body, "external_ids")?;
    let mut ids = Vec::with_capacity(list.len());
    let mut removal_errors: Vec<[String; 2]> = Vec::new();
    for (i, value) in list.iter().enumerate() {
        match external_id_value(value, &format!("external_ids[{i}]")) {
            Ok(id) => ids.push(id),
            Err(reason) => removal_errors.push([raw_text(Some(value)), reason]),
        }
    }
    if ids.is_empty() {
        return Err(ApiError::bad_request_with(
            "Valid data must be provided in the 'external_ids' field.",
            "removal_errors",
            json!(removal_errors),
        ));
    }
    let outcome = state
        .store()
        .remove_external_ids(&caller.workspace, ids)
        .await?;
    removal_errors.extend(
        outcome
            .errors
            .into_iter()
            .map(|(id, reason)| [id.as_str().to_owned(), reason]),
    );
    Ok(created(RemoveResponse {
        message: SUCCESS.to_owned(),
        removed_ids: outcome
            .removed
            .iter()
            .map(|id| id.as_str().to_owned())
            .collect(),
        removal_errors,
    }))
}

// ---------------------------------------------------------------- /users/export/ids

async fn export(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    let external_ids = opt_array(body, "external_ids")?.unwrap_or(&[]);
    let user_aliases = opt_array(body, "user_aliases")?.unwrap_or(&[]);
    if external_ids.len() + user_aliases.len() > MAX_BATCH {
        return Err(ApiError::bad_request(
            "The max number of external_ids and aliases per request was exceeded",
        ));
    }
    let mut request = ExportRequest {
        external_ids: external_ids
            .iter()
            .enumerate()
            .map(|(i, v)| external_id_value(v, &format!("external_ids[{i}]")))
            .collect::<Result<_, _>>()
            .map_err(ApiError::bad_request)?,
        aliases: user_aliases
            .iter()
            .enumerate()
            .map(|(i, v)| alias_value(v, &format!("user_aliases[{i}]")))
            .collect::<Result<_, _>>()
            .map_err(ApiError::bad_request)?,
        device_id: opt_id(body, "device_id", DeviceId::parse)?,
        braze_id: opt_id(body, "braze_id", BrazeId::parse)?,
        email: opt_id(body, "email_address", Email::parse)?,
        phone: opt_id(body, "phone", Phone::parse)?,
        fields: Vec::new(),
    };
    for (i, field) in opt_array(body, "fields_to_export")?
        .unwrap_or(&[])
        .iter()
        .enumerate()
    {
        let name = field.as_str().ok_or_else(|| {
            ApiError::bad_request(format!("'fields_to_export[{i}]' must be a string"))
        })?;
        if !EXPORT_FIELDS.contains(&name) && !EXPORT_FIELDS_NOT_KEPT.contains(&name) {
            return Err(ApiError::bad_request(format!(
                "'fields_to_export' has an unknown field '{name}' (known: {})",
                EXPORT_FIELDS.join(", ")
            )));
        }
        request.fields.push(name.to_owned());
    }
    let nothing = request.external_ids.is_empty()
        && request.aliases.is_empty()
        && request.device_id.is_none()
        && request.braze_id.is_none()
        && request.email.is_none()
        && request.phone.is_none();
    if nothing {
        return Err(ApiError::bad_request(
            "Provide at least one of 'external_ids', 'user_aliases', 'device_id', 'braze_id', 'email_address' or 'phone'",
        ));
    }
    let outcome = state.store().export_ids(&caller.workspace, request).await?;
    Ok(created(ExportResponse {
        message: SUCCESS.to_owned(),
        users: outcome.users,
        invalid_user_ids: outcome.invalid_user_ids,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_need_exactly_one_identifier() {
        let ok = parse_user_key(Some(&json!({"external_id": "u1"})), "identifier_to_keep");
        assert_eq!(
            ok,
            Ok(UserKey::External(
                tideway_core::ids::ExternalId::parse("u1").unwrap_or_else(|_| unreachable!())
            ))
        );
        assert_eq!(
            parse_user_key(
                Some(&json!({"external_id": "u1", "braze_id": "x"})),
                "identifier_to_keep"
            ),
            Err("'identifier_to_keep' must have exactly one identifier".to_owned())
        );
        assert_eq!(
            parse_user_key(Some(&json!({"braze_id": "x"})), "identifier_to_merge"),
            Err(
                "'identifier_to_merge.braze_id' must be 24 lowercase hexadecimal characters"
                    .to_owned()
            )
        );
        assert_eq!(
            parse_user_key(None, "identifier_to_merge"),
            Err("'identifier_to_merge' is required".to_owned())
        );
    }

    #[test]
    fn new_aliases_accept_bare_and_wrapped_elements() {
        let bare = parse_new_alias(&json!({"alias_name": "n", "alias_label": "l"}))
            .map(|i| i.alias.name.as_str().to_owned());
        let wrapped = parse_new_alias(
            &json!({"user_alias": {"alias_name": "n", "alias_label": "l"}, "external_id": "u"}),
        );
        assert_eq!(bare, Ok("n".to_owned()));
        assert!(wrapped.is_ok_and(|i| i.external_id.is_some()));
        assert_eq!(
            parse_new_alias(&json!({"alias_name": "n"})).err(),
            Some("'alias_label' is required".to_owned())
        );
    }

    #[test]
    fn identify_elements_take_an_alias_or_a_device() {
        assert!(matches!(
            parse_identify_alias(&json!({"external_id": "u", "device_id": "d"})).map(|i| i.source),
            Ok(IdentifySource::Device(_))
        ));
        assert_eq!(
            parse_identify_alias(&json!({"external_id": "u"})).err(),
            Some("'user_alias' is required".to_owned())
        );
        assert_eq!(
            parse_identify_alias(&json!({"user_alias": {}})).err(),
            Some("'external_id' is required".to_owned())
        );
    }

    #[test]
    fn rename_errors_carry_the_current_id_as_sent() {
        assert_eq!(
            parse_rename(&json!({"current_external_id": "a", "new_external_id": ""})).err(),
            Some([
                "a".to_owned(),
                "'new_external_id' must be a non-empty string".to_owned()
            ])
        );
        assert_eq!(
            parse_rename(&json!({"new_external_id": "b"})).err(),
            Some([
                "null".to_owned(),
                "'current_external_id' is required".to_owned()
            ])
        );
    }
}
