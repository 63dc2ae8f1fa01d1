//! `ApiError`: every way a REST request can fail, rendered as Braze's JSON error bodies.
//!
//! One type at the edge so every failure gets the same shape: `{"message": ...}` plus the
//! documented extra field where Braze has one (`errors`, `rename_errors`, …). A 5xx never
//! carries internal detail; the detail is logged here instead.

use std::borrow::Cow;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::store::StoreError;

/// How much of an unknown key a 401 echoes. Braze echoes the whole key; a client that sends
/// a 64 KiB "key" must not get a 64 KiB answer (an amplification), and a short prefix is enough
/// for a person to see which key they sent. Longer keys end in `…`.
pub const KEY_ECHO_CHARS: usize = 12;

/// Most characters of any one string an error body carries. Messages name what the client
/// sent (an unknown id, a bad value); one that sends 100 KiB of it gets the start back, `…`
/// marking the cut, rather than its whole input again (and logs of answers stay readable).
pub const ECHO_MAX_CHARS: usize = 1024;

/// Seconds a 503 asks the client to wait before retrying (`Retry-After`).
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 1;

/// A failed REST request.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 401: no key, or a key that is unknown or revoked. Carries the key as sent (empty if
    /// none); the body echoes at most `KEY_ECHO_CHARS` characters of it.
    InvalidKey(String),
    /// 403: the key lacks the endpoint's permission.
    AccessDenied,
    /// 403: the key has an IP allowlist and the client is outside it.
    IpNotAllowlisted,
    /// 429: over the key's limit for this endpoint group; retry after this many seconds.
    RateLimited { retry_after_secs: u64 },
    /// 413: body over the configured limit.
    PayloadTooLarge,
    /// 408: the body did not arrive within the body-read timeout.
    RequestTimeout,
    /// 400 with a message and, optionally, one documented detail field (`errors`, …).
    BadRequest {
        message: String,
        detail: Option<(&'static str, Value)>,
    },
    /// 404: no such route.
    NotFound,
    /// 404: the route exists but the thing it names does not (`{"message": <what>}`).
    Missing(String),
    /// 409: the request conflicts with what exists (`{"message": <why>}`).
    Conflict(String),
    /// 405: the route exists with another method.
    MethodNotAllowed,
    /// 503: storage is unavailable; retrying later may work.
    Unavailable,
    /// 500: anything else (logged server-side, never described to the client).
    Internal,
}

impl ApiError {
    /// 400 `{"message": <message>}`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            detail: None,
        }
    }

    /// 400 `{"message": <message>, <field>: <detail>}`.
    pub fn bad_request_with(
        message: impl Into<String>,
        field: &'static str,
        detail: Value,
    ) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            detail: Some((field, detail)),
        }
    }

    /// 400 for a body that is not JSON or not a JSON object: `{"message":"Bad Request","errors":[<why>]}`.
    pub fn malformed(why: impl Into<String>) -> Self {
        Self::bad_request_with("Bad Request", "errors", json!([why.into()]))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidKey(_) => StatusCode::UNAUTHORIZED,
            ApiError::AccessDenied | ApiError::IpNotAllowlisted => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound | ApiError::Missing(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let message = match self {
            ApiError::InvalidKey(key) => {
                format!("Invalid API key: {}", clipped(key, KEY_ECHO_CHARS))
            }
            ApiError::AccessDenied => "Access Denied".to_owned(),
            ApiError::IpNotAllowlisted => {
                "Access Denied: IP address not allowlisted for this API key".to_owned()
            }
            ApiError::RateLimited { .. } => "Rate Limited".to_owned(),
            ApiError::PayloadTooLarge => "Payload Too Large".to_owned(),
            ApiError::RequestTimeout => "Request Timeout".to_owned(),
            ApiError::BadRequest { message, .. } => message.clone(),
            ApiError::NotFound => "Invalid URL".to_owned(),
            ApiError::Missing(what) | ApiError::Conflict(what) => what.clone(),
            ApiError::MethodNotAllowed => "Method Not Allowed".to_owned(),
            ApiError::Unavailable => "Service Unavailable".to_owned(),
            ApiError::Internal => "Internal Server Error".to_owned(),
        };
        let mut body = Map::new();
        body.insert(
            "message".into(),
            Value::String(clipped(&message, ECHO_MAX_CHARS).into_owned()),
        );
        if let ApiError::BadRequest {
            detail: Some((field, detail)),
            ..
        } = self
        {
            let mut detail = detail.clone();
            clip_strings(&mut detail);
            body.insert((*field).to_owned(), detail);
        }
        Value::Object(body)
    }
}

/// The first `max` characters of `text`, with `…` when it was longer.
pub(crate) fn clipped(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => Cow::Borrowed(text),
        Some((cut, _)) => Cow::Owned(format!("{}…", &text[..cut])),
    }
}

/// Clips every string in `value` (keys too) to [`ECHO_MAX_CHARS`].
fn clip_strings(value: &mut Value) {
    match value {
        Value::String(s) => {
            if let Cow::Owned(c) = clipped(s, ECHO_MAX_CHARS) {
                *s = c;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(clip_strings),
        Value::Object(map) => {
            let long_key = map.keys().any(|k| k.chars().nth(ECHO_MAX_CHARS).is_some());
            if long_key {
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(k, v)| (clipped(&k, ECHO_MAX_CHARS).into_owned(), v))
                    .collect();
            }
            map.values_mut().for_each(clip_strings);
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Every store failure has one honest status. Handlers that expect `NotFound` or `Conflict`
/// for a named thing map them with their own message first; what reaches this conversion is
/// answered generically, with the detail logged and never sent.
impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "storage unavailable; answering 503");
                ApiError::Unavailable
            }
            // "<thing> not found" / "<thing> already exists" name what the caller sent, never
            // an internal detail.
            e @ StoreError::NotFound(_) => ApiError::Missing(e.to_string()),
            e @ StoreError::Conflict(_) => ApiError::Conflict(e.to_string()),
            StoreError::Corrupt(detail) => {
                tracing::error!(error = %detail, "corrupt data in storage; answering 500");
                ApiError::Internal
            }
            StoreError::Invalid(why) => ApiError::bad_request(why),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        let retry_after = match self {
            ApiError::RateLimited { retry_after_secs } => Some(retry_after_secs),
            ApiError::Unavailable => Some(UNAVAILABLE_RETRY_AFTER_SECS),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_braze() {
        assert_eq!(
            ApiError::InvalidKey("nope".into()).body(),
            json!({"message": "Invalid API key: nope"})
        );
        assert_eq!(
            ApiError::InvalidKey(String::new()).body(),
            json!({"message": "Invalid API key: "})
        );
        assert_eq!(
            ApiError::malformed("x").body(),
            json!({"message": "Bad Request", "errors": ["x"]})
        );
        assert_eq!(
            ApiError::Internal.body(),
            json!({"message": "Internal Server Error"})
        );
        assert_eq!(
            ApiError::from(StoreError::Unavailable("disk".into())),
            ApiError::Unavailable
        );
        assert_eq!(
            ApiError::from(StoreError::Corrupt("row".into())),
            ApiError::Internal
        );
    }

    #[test]
    fn every_store_error_has_an_honest_status() {
        let cases = [
            (StoreError::Unavailable("disk".into()), 503),
            (StoreError::NotFound("current 7".into()), 404),
            (StoreError::Conflict("workspace 'w'".into()), 409),
            (StoreError::Corrupt("row".into()), 500),
        ];
        for (err, status) in cases {
            assert_eq!(
                ApiError::from(err.clone()).status().as_u16(),
                status,
                "{err}"
            );
        }
        assert_eq!(
            ApiError::from(StoreError::NotFound("current 7".into())).body(),
            json!({"message": "current 7 not found"})
        );
        assert_eq!(
            ApiError::from(StoreError::Conflict("workspace 'w'".into())).body(),
            json!({"message": "workspace 'w' already exists"})
        );
        // A 500 never describes what went wrong.
        assert_eq!(
            ApiError::from(StoreError::Corrupt("users row 12: bad json".into())).body(),
            json!({"message": "Internal Server Error"})
        );
    }

    #[test]
    fn unavailable_asks_to_retry_after_a_second() {
        let response = ApiError::Unavailable.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert!(
            ApiError::Internal
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .is_none()
        );
    }

    #[test]
    fn invalid_key_echo_is_short() {
        let echo = |key: &str| clipped(key, KEY_ECHO_CHARS).into_owned();
        assert_eq!(echo(""), "");
        assert_eq!(echo("non-existent"), "non-existent");
        assert_eq!(echo("non-existent!"), "non-existent…");
        assert_eq!(echo(&"ü".repeat(13)), format!("{}…", "ü".repeat(12)));
    }

    #[test]
    fn no_string_in_an_error_body_is_longer_than_the_echo_limit() {
        let long = "x".repeat(100_000);
        let clip = format!("{}…", "x".repeat(ECHO_MAX_CHARS));
        assert_eq!(
            ApiError::Missing(long.clone()).body(),
            json!({"message": clip})
        );
        let body = ApiError::bad_request_with(
            long.clone(),
            "errors",
            json!([{"id": long.clone(), "n": 1, long.clone(): [long.clone()]}, "short"]),
        )
        .body();
        assert_eq!(
            body,
            json!({"message": clip, "errors": [{"id": clip, "n": 1, clip.clone(): [clip]}, "short"]})
        );
    }

    #[test]
    fn rate_limited_carries_retry_after() {
        let response = ApiError::RateLimited {
            retry_after_secs: 7,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
