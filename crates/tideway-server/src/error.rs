//! `ApiError`: every way a REST request can fail, rendered as Braze's JSON error bodies.
//!
//! One type at the edge so every failure gets the same shape: `{"message": ...}` plus the
//! documented extra field where Braze has one (`errors`, `rename_errors`, …). A 5xx never
//! carries internal detail; the detail is logged here instead.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tideway_core::store::StoreError;

/// A failed REST request.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 401: no key, or a key that is unknown or revoked. Carries the key as sent (empty if none).
    InvalidKey(String),
    /// 403: the key lacks the endpoint's permission.
    AccessDenied,
    /// 403: the key has an IP allowlist and the client is outside it.
    IpNotAllowlisted,
    /// 429: over the key's limit for this endpoint group; retry after this many seconds.
    RateLimited { retry_after_secs: u64 },
    /// 413: body over the configured limit.
    PayloadTooLarge,
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
            ApiError::InvalidKey(key) => format!("Invalid API key: {key}"),
            ApiError::AccessDenied => "Access Denied".to_owned(),
            ApiError::IpNotAllowlisted => {
                "Access Denied: IP address not allowlisted for this API key".to_owned()
            }
            ApiError::RateLimited { .. } => "Rate Limited".to_owned(),
            ApiError::PayloadTooLarge => "Payload Too Large".to_owned(),
            ApiError::BadRequest { message, .. } => message.clone(),
            ApiError::NotFound => "Invalid URL".to_owned(),
            ApiError::Missing(what) | ApiError::Conflict(what) => what.clone(),
            ApiError::MethodNotAllowed => "Method Not Allowed".to_owned(),
            ApiError::Unavailable => "Service Unavailable".to_owned(),
            ApiError::Internal => "Internal Server Error".to_owned(),
        };
        let mut body = Map::new();
        body.insert("message".into(), Value::String(message));
        if let ApiError::BadRequest {
            detail: Some((field, detail)),
            ..
        } = self
        {
            body.insert((*field).to_owned(), detail.clone());
        }
        Value::Object(body)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "storage unavailable");
                ApiError::Unavailable
            }
            other => {
                tracing::error!(error = %other, "storage error");
                ApiError::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if let ApiError::RateLimited { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
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
    fn rate_limited_carries_retry_after() {
        let response = ApiError::RateLimited {
            retry_after_secs: 7,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
