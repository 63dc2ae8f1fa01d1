//! Wire types: the JSON shapes of the REST API, for rendering responses and for the OpenAPI
//! document.
//!
//! Responses are built from these structs. Request structs are *descriptions* only: bodies are
//! read field by field in `fields` / `users` (Braze ignores unknown keys and reports bad batch
//! elements by index while applying the good ones, which a derived deserializer cannot do), so
//! the request types here exist to document the shapes in `/openapi.json`. None of these is a
//! domain type; the domain lives in `tideway-core`.

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

// ---------------------------------------------------------------- responses

/// Any error: `{"message": ...}`, with `errors` where the endpoint documents them.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// e.g. `Invalid API key: <key>`, `Access Denied`, `Rate Limited`, `Payload Too Large`,
    /// `Bad Request`, `Max Input Length Exceeded`, `Invalid URL`, `Service Unavailable`.
    pub message: String,
    /// Per-object errors (`/users/track`: objects; others: strings or `{type, index}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub errors: Option<Vec<Value>>,
}

/// A non-fatal error of one `/users/track` object.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TrackObjectError {
    /// What was wrong, e.g. `'time' is required`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `attributes`, `events` or `purchases`.
    pub input_array: String,
    /// 0-based index in that array.
    pub index: usize,
}

/// `201` of `/users/track`; each count is present when its array was in the request.
#[derive(Debug, Serialize, ToSchema)]
pub struct TrackResponse {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes_processed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_processed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purchases_processed: Option<usize>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<TrackObjectError>,
}

/// A non-fatal error of one element of a batch endpoint.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ItemError {
    #[serde(rename = "type")]
    pub kind: String,
    /// The request array the element is in, where the endpoint takes several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_array: Option<String>,
    /// 0-based index in that array.
    pub index: usize,
}

/// `201` of `/users/identify` and `/users/alias/new`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AliasesProcessedResponse {
    pub aliases_processed: usize,
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ItemError>,
}

/// `201` of `/users/alias/update` and `/users/merge`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SuccessResponse {
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ItemError>,
}

/// `201` of `/users/delete`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeleteResponse {
    /// Users found and deleted.
    pub deleted: usize,
    pub message: String,
}

/// `201` of `/users/external_ids/rename`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RenameResponse {
    pub message: String,
    /// The new external ids that took effect.
    pub external_ids: Vec<String>,
    /// `[current_external_id, reason]` pairs.
    #[schema(value_type = Vec<Vec<String>>)]
    pub rename_errors: Vec<[String; 2]>,
}

/// `201` of `/users/external_ids/remove`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RemoveResponse {
    pub message: String,
    pub removed_ids: Vec<String>,
    /// `[external_id, reason]` pairs.
    #[schema(value_type = Vec<Vec<String>>)]
    pub removal_errors: Vec<[String; 2]>,
}

/// `201` of `/users/export/ids`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExportResponse {
    pub message: String,
    /// Profiles in Braze's export shape (`external_id`, `braze_id`, `user_aliases`,
    /// `custom_attributes`, `custom_events`, `purchases`, …), limited to `fields_to_export`.
    #[schema(value_type = Vec<Object>)]
    pub users: Vec<Map<String, Value>>,
    /// Requested external ids that match no user.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub invalid_user_ids: Vec<String>,
}

/// `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`; `unavailable` when the database does not answer or refuses the connection (a
    /// login or privilege refused); `read_only` when it answers but refuses writes;
    /// `draining` when the node is shutting down.
    pub status: String,
    /// Why the node is not healthy, in words (absent when `ok`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

// ---------------------------------------------------------------- requests (documentation)

/// A user alias.
#[derive(Debug, ToSchema)]
pub struct UserAliasWire {
    pub alias_name: String,
    pub alias_label: String,
}

/// `POST /users/track`. Each object names its user by one of `external_id`, `user_alias`,
/// `braze_id`, `email`, `phone` or (Tideway's extension) `device_id`; at most 75 per array.
#[derive(Debug, ToSchema)]
pub struct TrackBody {
    /// Legacy: the REST key in the body (prefer `Authorization: Bearer`).
    pub api_key: Option<String>,
    /// Attribute objects: identifier, `_update_existing_only`, standard and custom attributes
    /// (`{"inc": n}`, `{"add": [...], "remove": [...]}`, `null` removes).
    #[schema(value_type = Option<Vec<Object>>)]
    pub attributes: Option<Vec<Value>>,
    /// Event objects: identifier, `name`, `time`, optional `app_id`, `properties`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub events: Option<Vec<Value>>,
    /// Purchase objects: identifier, `product_id`, `currency`, `price`, `time`, optional
    /// `quantity` (1..=100), `app_id`, `properties`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub purchases: Option<Vec<Value>>,
}

/// One alias (or device) to identify.
#[derive(Debug, ToSchema)]
pub struct AliasToIdentify {
    pub external_id: String,
    pub user_alias: Option<UserAliasWire>,
    /// Tideway's extension: identify the anonymous user of this device instead of an alias.
    pub device_id: Option<String>,
}

/// One email to identify.
#[derive(Debug, ToSchema)]
pub struct EmailToIdentify {
    pub external_id: String,
    pub email: String,
    /// `identified` | `unidentified`, `most_recently_updated` | `least_recently_updated`.
    pub prioritization: Option<Vec<String>>,
}

/// One phone number to identify.
#[derive(Debug, ToSchema)]
pub struct PhoneToIdentify {
    pub external_id: String,
    pub phone: String,
    pub prioritization: Option<Vec<String>>,
}

/// `POST /users/identify` (at most 50 items in all).
#[derive(Debug, ToSchema)]
pub struct IdentifyBody {
    pub aliases_to_identify: Option<Vec<AliasToIdentify>>,
    pub emails_to_identify: Option<Vec<EmailToIdentify>>,
    pub phone_numbers_to_identify: Option<Vec<PhoneToIdentify>>,
    /// `none` or `merge`; accepted, always merges.
    pub merge_behavior: Option<String>,
}

/// One alias to create: bare `{external_id?, alias_name, alias_label}` or wrapped
/// `{"user_alias": {...}, "external_id"?}`.
#[derive(Debug, ToSchema)]
pub struct NewAlias {
    pub external_id: Option<String>,
    pub alias_name: Option<String>,
    pub alias_label: Option<String>,
    pub user_alias: Option<UserAliasWire>,
}

/// `POST /users/alias/new` (at most 50).
#[derive(Debug, ToSchema)]
pub struct AliasNewBody {
    pub user_aliases: Vec<NewAlias>,
}

/// One alias rename within its label.
#[derive(Debug, ToSchema)]
pub struct AliasUpdate {
    pub alias_label: String,
    pub old_alias_name: String,
    pub new_alias_name: String,
}

/// `POST /users/alias/update` (at most 50).
#[derive(Debug, ToSchema)]
pub struct AliasUpdateBody {
    pub alias_updates: Vec<AliasUpdate>,
}

/// Names one user by exactly one identifier.
#[derive(Debug, ToSchema)]
pub struct UserIdentifier {
    pub external_id: Option<String>,
    pub user_alias: Option<UserAliasWire>,
    pub braze_id: Option<String>,
    pub email: Option<String>,
    pub phone: Option<String>,
    /// With `email`: how to pick among several profiles.
    pub prioritization: Option<Vec<String>>,
}

/// One merge: `identifier_to_merge` is folded into `identifier_to_keep` and removed.
#[derive(Debug, ToSchema)]
pub struct MergeUpdate {
    pub identifier_to_merge: UserIdentifier,
    pub identifier_to_keep: UserIdentifier,
}

/// `POST /users/merge` (at most 50).
#[derive(Debug, ToSchema)]
pub struct MergeBody {
    pub merge_updates: Vec<MergeUpdate>,
}

/// An email to delete by, with optional prioritization (a plain string is accepted too).
#[derive(Debug, ToSchema)]
pub struct EmailAddress {
    pub email: String,
    pub prioritization: Option<Vec<String>>,
}

/// `POST /users/delete`: at most 50 identifiers in all, kinds may be mixed.
#[derive(Debug, ToSchema)]
pub struct DeleteBody {
    pub external_ids: Option<Vec<String>>,
    pub user_aliases: Option<Vec<UserAliasWire>>,
    pub braze_ids: Option<Vec<String>>,
    pub email_addresses: Option<Vec<EmailAddress>>,
    pub phone_numbers: Option<Vec<String>>,
}

/// One external id rename.
#[derive(Debug, ToSchema)]
pub struct ExternalIdRename {
    pub current_external_id: String,
    pub new_external_id: String,
}

/// `POST /users/external_ids/rename` (at most 50).
#[derive(Debug, ToSchema)]
pub struct RenameBody {
    pub external_id_renames: Vec<ExternalIdRename>,
}

/// `POST /users/external_ids/remove`: deprecated (renamed-away) ids to forget, at most 50.
#[derive(Debug, ToSchema)]
pub struct RemoveBody {
    pub external_ids: Vec<String>,
}

/// `POST /users/export/ids`: at most 50 `external_ids` and `user_aliases` together.
#[derive(Debug, ToSchema)]
pub struct ExportBody {
    pub external_ids: Option<Vec<String>>,
    pub user_aliases: Option<Vec<UserAliasWire>>,
    pub device_id: Option<String>,
    pub braze_id: Option<String>,
    pub email_address: Option<String>,
    pub phone: Option<String>,
    /// Subset of the export fields; all when absent.
    pub fields_to_export: Option<Vec<String>>,
}

/// `POST /partners/{partner}/cohorts`: create or rename a cohort.
#[derive(Debug, ToSchema)]
pub struct CohortNameBody {
    pub partner_api_key: String,
    /// The workspace's data import key.
    pub client_secret: String,
    pub cohort_id: String,
    pub name: String,
    /// ISO-8601
    pub created_at: String,
}

/// One element of `cohort_changes`.
#[derive(Debug, ToSchema)]
pub struct CohortChangeWire {
    /// External ids.
    pub user_ids: Option<Vec<String>>,
    /// Device ids of anonymous users.
    pub device_ids: Option<Vec<String>>,
    pub aliases: Option<Vec<UserAliasWire>>,
    /// `true` removes; absent or `false` adds.
    pub should_remove: Option<bool>,
}

/// `POST /partners/{partner}/cohorts/users`: at most 1,000 identifiers in all.
#[derive(Debug, ToSchema)]
pub struct CohortUsersBody {
    pub partner_api_key: String,
    pub client_secret: String,
    pub cohort_id: String,
    pub cohort_changes: Vec<CohortChangeWire>,
}

/// What a `/cohorts/users` request did (Tideway adds the counts beside Braze's `message`).
#[derive(Debug, Serialize, ToSchema)]
pub struct CohortUsersResponse {
    pub message: String,
    /// Identifiers that named an eligible existing user.
    pub matched: usize,
    /// Identifiers that named no eligible user (unknown, or a device of an identified user).
    pub ignored: usize,
    pub added: usize,
    pub removed: usize,
}
