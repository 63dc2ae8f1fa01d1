//! The OpenAPI 3 document of the REST API, generated from the handlers' `#[utoipa::path]`
//! attributes and the [`crate::wire`] schemas, so it cannot drift from the routes.
//!
//! Served at `GET /openapi.json`; built once per process.

use std::sync::OnceLock;

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::wire;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tideway REST API",
        description = "Braze-compatible user data API. Authenticate with `Authorization: Bearer <REST API key>` \
                       (legacy: `api_key` in the query string or the JSON body). Every REST response carries \
                       `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`."
    ),
    paths(
        crate::users::users_track,
        crate::users::users_identify,
        crate::users::users_alias_new,
        crate::users::users_alias_update,
        crate::users::users_merge,
        crate::users::users_delete,
        crate::users::users_external_ids_rename,
        crate::users::users_external_ids_remove,
        crate::users::users_export_ids,
        crate::partners::cohort_name,
        crate::partners::cohort_users,
        crate::partners::heap_segment_sync,
        crate::cohorts_api::list,
        crate::cohorts_api::members,
        crate::cohorts_api::user_cohorts,
        crate::segments_api::create,
        crate::segments_api::list,
        crate::segments_api::get_one,
        crate::segments_api::update,
        crate::segments_api::delete,
        crate::segments_api::size,
        crate::segments_api::preview,
        crate::segments_api::members,
        crate::segments_api::user_segments,
        crate::segments_api::braze_list,
        crate::segments_api::braze_details,
        crate::currents_api::list,
        crate::currents_api::create,
        crate::currents_api::get_one,
        crate::currents_api::update,
        crate::currents_api::delete,
        crate::currents_api::action,
        crate::currents_api::dead_letters,
        crate::campaigns_api::create,
        crate::campaigns_api::list,
        crate::campaigns_api::get_one,
        crate::campaigns_api::update,
        crate::campaigns_api::delete,
        crate::campaigns_api::action,
        crate::campaigns_api::settings,
        crate::campaigns_api::save_settings,
        crate::messaging_api::trigger_send,
        crate::messaging_api::messages_send,
        crate::messaging_api::campaigns_list,
        crate::messaging_api::campaigns_details,
        crate::schedule_api::trigger_schedule_create,
        crate::schedule_api::trigger_schedule_update,
        crate::schedule_api::trigger_schedule_delete,
        crate::schedule_api::messages_schedule_create,
        crate::schedule_api::messages_schedule_update,
        crate::schedule_api::messages_schedule_delete,
        crate::schedule_api::send_id_create,
        crate::schedule_api::sends_data_series,
        crate::schedule_api::scheduled_broadcasts,
        crate::canvases_api::create,
        crate::canvases_api::list,
        crate::canvases_api::get_one,
        crate::canvases_api::update,
        crate::canvases_api::delete,
        crate::canvases_api::action,
        crate::canvases_api::trigger_send,
        crate::canvases_api::trigger_schedule_create,
        crate::canvases_api::trigger_schedule_update,
        crate::canvases_api::trigger_schedule_delete,
        crate::canvases_api::braze_list,
        crate::canvases_api::braze_details,
        crate::tracking_api::open,
        crate::tracking_api::click,
        crate::tracking_api::unsubscribe_page,
        crate::tracking_api::unsubscribe,
        crate::ops::health,
        crate::ops::metrics,
        crate::ops::openapi_json,
    ),
    components(schemas(
        wire::ErrorBody,
        wire::TrackObjectError,
        wire::TrackResponse,
        wire::ItemError,
        wire::AliasesProcessedResponse,
        wire::SuccessResponse,
        wire::DeleteResponse,
        wire::RenameResponse,
        wire::RemoveResponse,
        wire::ExportResponse,
        wire::HealthResponse,
        wire::UserAliasWire,
        wire::TrackBody,
        wire::AliasToIdentify,
        wire::EmailToIdentify,
        wire::PhoneToIdentify,
        wire::IdentifyBody,
        wire::NewAlias,
        wire::AliasNewBody,
        wire::AliasUpdate,
        wire::AliasUpdateBody,
        wire::UserIdentifier,
        wire::MergeUpdate,
        wire::MergeBody,
        wire::EmailAddress,
        wire::DeleteBody,
        wire::ExternalIdRename,
        wire::RenameBody,
        wire::RemoveBody,
        wire::ExportBody,
        wire::CohortNameBody,
        wire::CohortChangeWire,
        wire::CohortUsersBody,
        wire::CohortUsersResponse,
    )),
    modifiers(&SecuritySchemes),
    tags(
        (name = "users", description = "Braze `/users/*` endpoints"),
        (name = "partners", description = "Partner cohort import (keys in the JSON body) and Heap's signed segment-sync webhook"),
        (name = "cohorts", description = "Tideway's cohort management API (permission cohorts.read)"),
        (name = "segments", description = "Segments: Tideway's management API (permissions segments.manage / segments.read) and Braze's /segments/list (segments.list) and /segments/details (segments.details)"),
        (name = "currents", description = "Currents: export of engagement events to Heap or any HTTP receiver (permission currents.manage)"),
        (name = "campaigns", description = "Campaigns: Tideway's management API (permissions campaigns.manage / campaigns.read)"),
        (name = "messaging", description = "Braze's messaging endpoints: /campaigns/trigger/send (campaigns.trigger.send), /messages/send (messages.send), their /schedule/{create,update,delete} (campaigns.trigger.schedule.*, messages.schedule.*), /sends/id/create (sends.id.create), /sends/data_series (sends.data_series), /campaigns/list (campaigns.list), /campaigns/details (campaigns.details)"),
        (name = "canvas", description = "Canvas: Tideway's management API (canvas.manage / canvas.read) and Braze's /canvas/trigger/send, /canvas/trigger/schedule/{create,update,delete}, /canvas/list and /canvas/details"),
        (name = "tracking", description = "Email open, click and subscription links (no key: the signed token is the credential)"),
        (name = "ops", description = "Health, metrics and this document (no authentication)"),
    )
)]
pub struct ApiDoc;

/// Adds the bearer scheme (and the legacy query key) the handlers refer to.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer_auth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A REST API key of the workspace, with the endpoint's permission",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key_query",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::new("api_key"))),
        );
    }
}

/// The document as JSON text (built on first use).
pub fn document_json() -> String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|_| "{}".to_owned())
    })
    .clone()
}
