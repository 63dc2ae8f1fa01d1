//! The path every REST request takes before its endpoint runs: find the key, read the body
//! within the size limit, authenticate, count against the rate limit, check IP allowlist and
//! permission, parse the JSON, then dispatch; and the `X-RateLimit-*` headers on whatever comes
//! out, success or error.
//!
//! Order matters and is chosen so each answer is the most useful one the server can give:
//! - A key in `Authorization: Bearer` (or the legacy `api_key` query parameter) is checked
//!   before the body is read, so an unauthenticated client never gets to make us parse JSON.
//! - A key may also come in the body (legacy `api_key`), so without a header key the body is
//!   read first; a body too large to read then gets 413 (its key cannot be known).
//! - The request is counted as soon as the key is known (Braze counts every call of a key),
//!   so 403, 413 and 400 answers carry the real counter in their headers. An answer given
//!   before a key is known (401, a 413 for a body that had to be read to find the key) carries
//!   no `X-RateLimit-*` headers: Braze sends them empty, but an empty header is no number and
//!   trips strict clients and proxies, so Tideway leaves them out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, Query, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use tideway_core::clock::Millis;
use tideway_core::keys::{ApiKey, Permission, Secret};
use tideway_core::store::Workspace;

use crate::AppState;
use crate::error::ApiError;
use crate::observe::{AUTH_FAILURES_TOTAL, RATE_LIMITED_TOTAL, record_workspace};
use crate::rate_limit::{Decision, Group};

/// The REST endpoints behind the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Track,
    Identify,
    AliasNew,
    AliasUpdate,
    Merge,
    Delete,
    ExternalIdsRename,
    ExternalIdsRemove,
    ExportIds,
}

impl Endpoint {
    pub fn permission(self) -> Permission {
        match self {
            Endpoint::Track => Permission::UsersTrack,
            Endpoint::Identify => Permission::UsersIdentify,
            Endpoint::AliasNew => Permission::UsersAliasNew,
            Endpoint::AliasUpdate => Permission::UsersAliasUpdate,
            Endpoint::Merge => Permission::UsersMerge,
            Endpoint::Delete => Permission::UsersDelete,
            Endpoint::ExternalIdsRename => Permission::UsersExternalIdsRename,
            Endpoint::ExternalIdsRemove => Permission::UsersExternalIdsRemove,
            Endpoint::ExportIds => Permission::UsersExportIds,
        }
    }

    pub fn group(self) -> Group {
        match self {
            Endpoint::Track => Group::Track,
            Endpoint::ExportIds => Group::Export,
            _ => Group::Batch,
        }
    }
}

/// An authenticated caller: the key and the workspace it belongs to.
pub struct Caller {
    pub key: ApiKey,
    pub workspace: Workspace,
}

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Current time as the store wants it.
pub fn now() -> Millis {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Millis(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
}

/// Runs `endpoint` for `req` through the whole pipeline; answers carry the `X-RateLimit-*`
/// headers whenever the key is known.
pub async fn rest(state: AppState, endpoint: Endpoint, req: Request) -> Response {
    let (outcome, decision) = authorize_and_run(&state, endpoint, req).await;
    let mut response = match outcome {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    put_rate_headers(response.headers_mut(), decision.as_ref());
    response
}

/// The body as far as it could be read before authentication.
enum BodyState {
    /// Not read yet (the key came from a header).
    Unread(Request),
    /// Read and parsed (the key may have come from it).
    Parsed(Result<Map<String, Value>, ApiError>),
}

async fn authorize_and_run(
    state: &AppState,
    endpoint: Endpoint,
    req: Request,
) -> (Result<Response, ApiError>, Option<Decision>) {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let (key, body) = match header_key(req.headers(), req.uri()) {
        Some(key) => (key, BodyState::Unread(req)),
        None => {
            let parsed = read_json(req).await;
            if matches!(parsed, Err(ApiError::PayloadTooLarge)) {
                return (Err(ApiError::PayloadTooLarge), None);
            }
            let key = parsed.as_ref().map(body_api_key).unwrap_or_default();
            (key, BodyState::Parsed(parsed))
        }
    };
    let caller = match authenticate(state, key).await {
        Ok(caller) => caller,
        Err(error) => return (Err(error), None),
    };
    record_workspace(caller.workspace.id.0);
    let group = endpoint.group();
    let decision = state.limiter().check(caller.key.id, group, now().secs());
    if !decision.allowed {
        metrics::counter!(RATE_LIMITED_TOTAL, "group" => group.as_str()).increment(1);
        return (
            Err(ApiError::RateLimited {
                retry_after_secs: decision.retry_after,
            }),
            Some(decision),
        );
    }
    if let Err(error) = check_access(&caller.key, endpoint.permission(), peer) {
        return (Err(error), Some(decision));
    }
    let body = match body {
        BodyState::Unread(req) => read_json(req).await,
        BodyState::Parsed(parsed) => parsed,
    };
    let outcome = match body {
        Ok(body) => crate::users::dispatch(state, endpoint, &caller, body).await,
        Err(error) => Err(error),
    };
    (outcome, Some(decision))
}

/// `Authorization: Bearer <key>`, else the legacy `api_key` query parameter.
fn header_key(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
        });
    bearer.or_else(|| {
        let Query(params) = Query::<HashMap<String, String>>::try_from_uri(uri).ok()?;
        params.get("api_key").cloned()
    })
}

fn auth_failure(reason: &'static str) {
    metrics::counter!(AUTH_FAILURES_TOTAL, "reason" => reason).increment(1);
    tracing::info!(reason, "REST authentication failed");
}

async fn authenticate(state: &AppState, key: String) -> Result<Caller, ApiError> {
    if key.is_empty() {
        auth_failure("missing_key");
        return Err(ApiError::InvalidKey(key));
    }
    let hash = Secret::new(key.clone()).hash();
    let found = state.store().find_api_key(hash).await?;
    match found {
        Some((api_key, workspace))
            if api_key.hash.matches(&hash) && api_key.revoked_at.is_none() =>
        {
            Ok(Caller {
                key: api_key,
                workspace,
            })
        }
        _ => {
            auth_failure("unknown_key");
            Err(ApiError::InvalidKey(key))
        }
    }
}

fn check_access(
    key: &ApiKey,
    permission: Permission,
    peer: Option<IpAddr>,
) -> Result<(), ApiError> {
    if !key.allow.is_empty() && !peer.is_some_and(|ip| key.allow.allows(ip)) {
        auth_failure("ip_not_allowlisted");
        return Err(ApiError::IpNotAllowlisted);
    }
    if !key.permissions.contains(permission) {
        auth_failure("permission_denied");
        return Err(ApiError::AccessDenied);
    }
    Ok(())
}

/// Runs a handler of Tideway's own management API (`/api/v1/*`) and of Braze's messaging and
/// export endpoints: the key comes from `Authorization: Bearer`, the `api_key` query parameter
/// or the body's legacy `api_key` field, requests count against the
/// key's management budget, the permission is checked, and the answer carries the
/// `X-RateLimit-*` headers like every REST response.
pub async fn management<F, Fut>(
    state: AppState,
    permission: Permission,
    req: Request,
    handler: F,
) -> Response
where
    F: FnOnce(AppState, Caller, Request) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let (key, req) = match header_key(req.headers(), req.uri()) {
        Some(key) => (key, req),
        None => match body_key(req).await {
            Ok(found) => found,
            Err(error) => {
                let mut response = error.into_response();
                put_rate_headers(response.headers_mut(), None);
                return response;
            }
        },
    };
    let caller = match authenticate(&state, key).await {
        Ok(caller) => caller,
        Err(error) => {
            let mut response = error.into_response();
            put_rate_headers(response.headers_mut(), None);
            return response;
        }
    };
    record_workspace(caller.workspace.id.0);
    let decision = state
        .limiter()
        .check(caller.key.id, Group::Management, now().secs());
    let outcome = if !decision.allowed {
        metrics::counter!(RATE_LIMITED_TOTAL, "group" => Group::Management.as_str()).increment(1);
        Err(ApiError::RateLimited {
            retry_after_secs: decision.retry_after,
        })
    } else {
        match check_access(&caller.key, permission, peer) {
            Ok(()) => handler(state.clone(), caller, req).await,
            Err(error) => Err(error),
        }
    };
    let mut response = outcome.unwrap_or_else(IntoResponse::into_response);
    // A handler that counted the request against a narrower budget has said so already.
    if !response.headers().contains_key(LIMIT) {
        put_rate_headers(response.headers_mut(), Some(&decision));
    }
    response
}

/// Runs `send`, counted first, when it is aimed at a segment, an audience or everyone
/// (`segment_id`, `audience` or `broadcast: true` in `body`), against the key's broadcast
/// budget (braze-messaging.md §2: 250 a minute): over it, the answer is 429 and `send` does
/// not run; under it, every answer (an error too) carries that budget's `X-RateLimit-*`
/// headers. Other sends run as they are, under the management budget alone.
pub(crate) async fn counted_as_broadcast(
    state: &AppState,
    caller: &Caller,
    body: &Map<String, Value>,
    send: impl std::future::Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let aimed_wide = matches!(body.get("segment_id"), Some(Value::String(id)) if !id.is_empty())
        || body.get("audience").is_some_and(|a| !a.is_null())
        || body.get("broadcast") == Some(&Value::Bool(true));
    if !aimed_wide {
        return send.await;
    }
    let group = Group::BroadcastSends;
    let decision = state.limiter().check(caller.key.id, group, now().secs());
    let mut response = if decision.allowed {
        send.await.unwrap_or_else(IntoResponse::into_response)
    } else {
        metrics::counter!(RATE_LIMITED_TOTAL, "group" => group.as_str()).increment(1);
        ApiError::RateLimited {
            retry_after_secs: decision.retry_after,
        }
        .into_response()
    };
    put_rate_headers(response.headers_mut(), Some(&decision));
    Ok(response)
}

/// The legacy `api_key` field of a JSON body, which Braze's messaging endpoints accept as the
/// `/users/*` ones do (older clients send it there); the request is rebuilt around the body it
/// read, for the handler. No such field (or no JSON body) is an empty key.
async fn body_key(req: Request) -> Result<(String, Request), ApiError> {
    let (parts, body) = req.into_parts();
    // The body limit travels in the extensions, so the probe carries them.
    let mut probe = Request::new(body);
    *probe.headers_mut() = parts.headers.clone();
    *probe.extensions_mut() = parts.extensions.clone();
    let bytes = read_body(probe).await?;
    let key = parse_object(&bytes)
        .as_ref()
        .map(body_api_key)
        .unwrap_or_default();
    Ok((
        key,
        Request::from_parts(parts, axum::body::Body::from(bytes)),
    ))
}

/// The legacy `api_key` field of a parsed body; empty when there is none.
fn body_api_key(body: &Map<String, Value>) -> String {
    body.get("api_key")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Reads the body (within the router's `DefaultBodyLimit`) and parses it as a JSON object.
/// The `Content-Type` is not checked: Braze clients sometimes omit it.
pub(crate) async fn read_json(req: Request) -> Result<Map<String, Value>, ApiError> {
    parse_object(&read_body(req).await?)
}

/// [`read_json`] for an endpoint whose body is optional: an empty body (or only whitespace)
/// is `{}`; anything else must be a JSON object.
pub(crate) async fn read_optional_json(req: Request) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(req).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    parse_object(&bytes)
}

async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    match Bytes::from_request(req, &()).await {
        Ok(bytes) => Ok(bytes),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::PayloadTooLarge)
        }
        Err(rejection) => Err(ApiError::malformed(rejection.body_text())),
    }
}

/// Parses a JSON object body; anything else is a 400 with serde's explanation.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::malformed(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::malformed(e.to_string())),
    }
}

/// Sets the `X-RateLimit-*` headers from the key's counter; without one (no key known yet)
/// there is no honest number, so none is sent.
fn put_rate_headers(headers: &mut HeaderMap, decision: Option<&Decision>) {
    let Some(d) = decision else {
        for name in [LIMIT, REMAINING, RESET] {
            headers.remove(name);
        }
        return;
    };
    let values = [
        HeaderValue::from(d.limit),
        HeaderValue::from(d.remaining),
        HeaderValue::from(d.reset),
    ];
    for (name, value) in [LIMIT, REMAINING, RESET].into_iter().zip(values) {
        headers.insert(name, value);
    }
}

/// Turns a ready JSON value into a `201 Created` response (every user-data endpoint answers
/// 201 on success, braze-api.md §3.6).
pub fn created(body: impl serde::Serialize) -> Response {
    (StatusCode::CREATED, axum::Json(body)).into_response()
}
