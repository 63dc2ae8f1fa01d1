//! The webhook channel: one HTTP request of one webhook message, classified.
//!
//! [`WebhookSender::send`] makes one attempt and answers a [`WebhookAttempt`]; the dispatcher
//! decides what happens next (settle, retry after [`retry_delay`], give up after
//! [`MAX_ATTEMPTS`]). The classification is Braze's (`reference/braze-messaging.md` §4):
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | [`WebhookOutcome::Delivered`] |
//! | 408, 429, 5xx, timeout, connection error | [`WebhookOutcome::Retry`] |
//! | any other status (3xx included: redirects are not followed) | [`WebhookOutcome::Failed`] |
//! | a URL that cannot be used or that the egress policy refuses, a header that cannot be sent | [`WebhookOutcome::Blocked`] (no request made) |
//!
//! The URL is a Liquid template filled per user, so it is a URL someone typed in: the client
//! is built by `tideway_currents::egress::client_builder`, and every URL is judged by the same
//! egress policy as a Current's endpoint, both as written and at connect time (a name that
//! resolves to a refused address is blocked too).
//!
//! Every request carries `Idempotency-Key: <key>`, the same key on every attempt of a send
//! (and after a crash), so a receiver can drop the duplicates that at-least-once delivery
//! implies.

use std::time::{Duration, Instant};

use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use tideway_core::egress::EgressPolicy;
use tideway_currents::egress::{self, UrlError};

/// Most attempts of one webhook message (the first and its retries).
pub const MAX_ATTEMPTS: u32 = 5;

/// How much of a receiver's answer is kept for the `raw_response` of a failure event.
pub const RESPONSE_EXCERPT_BYTES: usize = 1024;

/// The header that carries a send's idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// The first retry's base delay; each later retry doubles it (see [`retry_delay`]).
const RETRY_BASE: Duration = Duration::from_secs(30);

/// The longest base delay, for retry numbers past the documented schedule.
const RETRY_CAP: Duration = Duration::from_secs(8 * 60);

/// Headers the HTTP client owns: they frame the request or the connection, so a value from a
/// template could only break it. They are dropped from the user's headers.
const CLIENT_OWNED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
];

/// The request method of a webhook message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    fn as_reqwest(self) -> reqwest::Method {
        match self {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Delete => reqwest::Method::DELETE,
        }
    }
}

/// One rendered webhook message, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRequest {
    pub url: String,
    pub method: Method,
    /// The message's request headers, in order (a name given twice is sent twice).
    pub headers: Vec<(String, String)>,
    /// Sent as the request body unless empty or the method is `GET` (a body on `GET` has no
    /// defined meaning and some servers refuse it).
    pub body: String,
    /// Sent as `Idempotency-Key`; it replaces a header of that name from `headers`.
    pub idempotency_key: String,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Worth another attempt: 408, 429, 5xx, a timeout or a connection error.
    Retry { reason: String },
    /// The receiver answered and another attempt would get the same answer.
    Failed { reason: String },
    /// Not sent, and never will be: the request itself is unusable. `abort_type` is the
    /// `users.messages.webhook.Abort` code (`blocked_webhook_url`, `missing_hostname`,
    /// `invalid_webhook_url`, `invalid_webhook_header`).
    Blocked {
        abort_type: &'static str,
        reason: String,
    },
}

/// One attempt, with what a `users.messages.webhook.Failure` event reports about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttempt {
    pub outcome: WebhookOutcome,
    /// The HTTP status, when the receiver answered.
    pub status: Option<u16>,
    /// From the start of the request to the end of the read answer excerpt.
    pub duration_ms: u64,
    /// The start of the answer's body (at most [`RESPONSE_EXCERPT_BYTES`], lossy UTF-8).
    pub raw_response: Option<String>,
    /// The answer's `Content-Length`, or its length when it was read whole.
    pub content_length: Option<u64>,
    /// The receiver's `Retry-After` (delta-seconds only; an HTTP date is ignored) on a 429
    /// or 503. Informative: [`retry_delay`] does not read it, so one receiver cannot stretch
    /// the schedule past its 30 minutes; a caller may wait `max(retry_delay, retry_after)`
    /// when that still fits.
    pub retry_after: Option<Duration>,
}

impl WebhookAttempt {
    fn blocked(abort_type: &'static str, reason: String) -> WebhookAttempt {
        WebhookAttempt {
            outcome: WebhookOutcome::Blocked { abort_type, reason },
            status: None,
            duration_ms: 0,
            raw_response: None,
            content_length: None,
            retry_after: None,
        }
    }
}

/// Why a [`WebhookSender`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The HTTP client (its TLS setup) could not be built.
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
}

/// Sends webhook messages under an egress policy. Cheap to clone (one shared connection pool).
#[derive(Debug, Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    policy: EgressPolicy,
}

impl WebhookSender {
    /// A sender whose requests each take at most `timeout` (Braze: 90 s), connection
    /// included. Redirects are not followed: a 3xx is a failed attempt, as in Braze.
    pub fn new(policy: EgressPolicy, timeout: Duration) -> Result<WebhookSender, WebhookError> {
        let client = egress::client_builder(policy)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tideway-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        Ok(WebhookSender { client, policy })
    }

    /// Makes one attempt. Never fails: whatever happens is in the answer.
    pub async fn send(&self, request: &WebhookRequest) -> WebhookAttempt {
        let url = match self.judge_url(&request.url) {
            Ok(url) => url,
            Err((abort_type, reason)) => return WebhookAttempt::blocked(abort_type, reason),
        };
        let headers = match request_headers(request) {
            Ok(h) => h,
            Err(reason) => return WebhookAttempt::blocked("invalid_webhook_header", reason),
        };
        let mut builder = self
            .client
            .request(request.method.as_reqwest(), url)
            .headers(headers);
        if sends_body(request) {
            builder = builder.body(request.body.clone());
        }
        let started = Instant::now();
        let response = builder.send().await;
        let mut attempt = match response {
            Ok(response) => read_answer(response).await,
            Err(e) => from_error(&e),
        };
        attempt.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        attempt
    }

    /// Fetches an email attachment with this sender's client and outgoing-request policy (the
    /// same reach as webhooks): its bytes and `Content-Type`, at most `limit` bytes (a longer
    /// file is refused without reading the rest).
    pub async fn fetch_attachment(
        &self,
        raw_url: &str,
        limit: usize,
    ) -> Result<(Vec<u8>, Option<String>), AttachmentError> {
        let url = self
            .judge_url(raw_url)
            .map_err(|(_, why)| AttachmentError::Refused(why))?;
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| AttachmentError::Unreachable(egress::reason(&e)))?;
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            return Err(AttachmentError::Unreachable(format!(
                "the server answered {status}"
            )));
        }
        if !status.is_success() {
            return Err(AttachmentError::Refused(format!(
                "the server answered {status}"
            )));
        }
        let too_big = || AttachmentError::Refused(format!("the file is over {limit} bytes"));
        if response
            .content_length()
            .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
        {
            return Err(too_big());
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| AttachmentError::Unreachable(egress::reason(&e)))?
        {
            if bytes.len() + chunk.len() > limit {
                return Err(too_big());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((bytes, content_type))
    }

    /// The URL to request, or the abort code and reason why it cannot be.
    fn judge_url(&self, raw: &str) -> Result<Url, (&'static str, String)> {
        let url = Url::parse(raw).map_err(|e| {
            // `url::ParseError::EmptyHost` ("http://", "http:///path"): Braze's own code.
            if e.to_string() == "empty host" {
                ("missing_hostname", "the URL has no host name".to_owned())
            } else {
                (
                    "invalid_webhook_url",
                    format!("the URL cannot be read ({e})"),
                )
            }
        })?;
        match egress::check_url(&self.policy, &url) {
            Ok(()) => Ok(url),
            Err(UrlError::Refused(r)) => Err(("blocked_webhook_url", r.to_string())),
            Err(UrlError::NotHttp) if matches!(url.scheme(), "http" | "https") => {
                Err(("missing_hostname", "the URL has no host name".to_owned()))
            }
            Err(e) => Err(("invalid_webhook_url", format!("the URL {e}"))),
        }
    }
}

/// Why an email attachment could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachmentError {
    /// Not now (a timeout, no connection, a 5xx, 408 or 429): the email is retried later.
    #[error("{0}")]
    Unreachable(String),
    /// Never (a refused address, a 4xx, a file over the limit): the email is aborted.
    #[error("{0}")]
    Refused(String),
}

fn sends_body(request: &WebhookRequest) -> bool {
    request.method != Method::Get && !request.body.is_empty()
}

/// The request's headers: the user's (checked; client-owned ones dropped), a default
/// `Content-Type` when there is a body and none was given, and the idempotency key.
fn request_headers(request: &WebhookRequest) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("{name:?} is not a valid HTTP header name"))?;
        if CLIENT_OWNED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        // Control characters (CR and LF among them) are refused here: no header injection.
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("the value of header {name} is not a valid HTTP header value"))?;
        headers.append(name, value);
    }
    if sends_body(request) && !headers.contains_key(CONTENT_TYPE) {
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(content_type(&request.body)),
        );
    }
    let key = HeaderValue::from_str(&request.idempotency_key)
        .map_err(|_| "the idempotency key is not a valid HTTP header value".to_owned())?;
    headers.insert(HeaderName::from_static("idempotency-key"), key);
    Ok(headers)
}

/// The `Content-Type` of a body whose message did not name one: JSON when it reads as JSON
/// (the common case of a templated JSON body), plain text otherwise.
fn content_type(body: &str) -> &'static str {
    if serde_json::from_str::<serde_json::Value>(body).is_ok() {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    }
}

/// Classifies an HTTP status (the table in the module documentation).
pub fn classify_status(status: u16) -> WebhookOutcome {
    let reason = || {
        let text = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        format!("HTTP {status} {text}").trim_end().to_owned()
    };
    match status {
        200..=299 => WebhookOutcome::Delivered,
        408 | 429 | 500..=599 => WebhookOutcome::Retry { reason: reason() },
        300..=399 => WebhookOutcome::Failed {
            reason: format!("{} (redirects are not followed)", reason()),
        },
        _ => WebhookOutcome::Failed { reason: reason() },
    }
}

async fn read_answer(mut response: reqwest::Response) -> WebhookAttempt {
    let status = response.status().as_u16();
    let declared = response.content_length();
    let retry_after = match status {
        429 | 503 => response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs),
        _ => None,
    };
    // Read the start of the answer only: enough for the failure event, and a receiver that
    // streams forever cannot hold the attempt (the client's timeout bounds the rest).
    let mut excerpt = Vec::new();
    let mut whole = false;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                excerpt.extend_from_slice(&chunk);
                if excerpt.len() > RESPONSE_EXCERPT_BYTES {
                    break;
                }
            }
            Ok(None) => {
                whole = true;
                break;
            }
            Err(_) => break,
        }
    }
    let content_length = declared.or(whole.then_some(excerpt.len() as u64));
    excerpt.truncate(RESPONSE_EXCERPT_BYTES);
    let raw_response =
        (!excerpt.is_empty()).then(|| String::from_utf8_lossy(&excerpt).into_owned());
    WebhookAttempt {
        outcome: classify_status(status),
        status: Some(status),
        duration_ms: 0,
        raw_response,
        content_length,
        retry_after,
    }
}

fn from_error(e: &reqwest::Error) -> WebhookAttempt {
    let outcome = if let Some(refusal) = egress::refusal(e) {
        // A name that resolved to a refused address (or a redirect to one).
        WebhookOutcome::Blocked {
            abort_type: "blocked_webhook_url",
            reason: refusal.to_string(),
        }
    } else if e.is_builder() {
        WebhookOutcome::Blocked {
            abort_type: "invalid_webhook_url",
            reason: format!("the request cannot be built: {}", egress::reason(e)),
        }
    } else {
        WebhookOutcome::Retry {
            reason: egress::reason(e),
        }
    };
    WebhookAttempt {
        outcome,
        status: None,
        duration_ms: 0,
        raw_response: None,
        content_length: None,
        retry_after: None,
    }
}

/// How long to wait before retry number `retry` (1 = the first retry) of a webhook message,
/// given a jitter in [0, 1).
///
/// Exponential backoff from 30 s, doubling, with up to 50 % added by the jitter (so retries
/// of many sends that failed together spread out):
///
/// | retry | delay |
/// |---|---|
/// | 1 | 30 – 45 s |
/// | 2 | 60 – 90 s |
/// | 3 | 2 – 3 min |
/// | 4 | 4 – 6 min |
///
/// With [`MAX_ATTEMPTS`] = 5 (four retries) the waits add up to at most 11 min 15 s, and the
/// five attempts themselves to at most 7 min 30 s at Braze's 90 s timeout: the last attempt
/// starts well within the 30 minutes Braze promises. Past retry 4 the base stops growing at
/// 8 minutes.
pub fn retry_delay(retry: u32, jitter01: f64) -> Duration {
    let doublings = retry.max(1) - 1;
    let base = RETRY_BASE
        .checked_mul(1u32 << doublings.min(16))
        .unwrap_or(RETRY_CAP)
        .min(RETRY_CAP);
    base.mul_f64(1.0 + 0.5 * jitter01.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_braze_does() {
        for s in [200, 201, 204, 299] {
            assert_eq!(classify_status(s), WebhookOutcome::Delivered, "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert!(
                matches!(classify_status(s), WebhookOutcome::Retry { .. }),
                "{s}"
            );
        }
        for s in [301, 302, 307, 400, 401, 403, 404, 409, 410, 422] {
            assert!(
                matches!(classify_status(s), WebhookOutcome::Failed { .. }),
                "{s}"
            );
        }
        assert_eq!(
            classify_status(503),
            WebhookOutcome::Retry {
                reason: "HTTP 503 Service Unavailable".into()
            }
        );
    }

    #[test]
    fn retry_delays_double_within_their_jitter_band() {
        assert_eq!(retry_delay(1, 0.0), Duration::from_secs(30));
        assert_eq!(retry_delay(0, 0.0), Duration::from_secs(30));
        assert_eq!(retry_delay(2, 0.0), Duration::from_secs(60));
        assert_eq!(retry_delay(4, 0.0), Duration::from_secs(240));
        assert_eq!(retry_delay(1, 0.5), Duration::from_secs_f64(37.5));
        assert_eq!(retry_delay(30, 0.0), RETRY_CAP);
        assert_eq!(retry_delay(u32::MAX, 0.99), RETRY_CAP.mul_f64(1.495));
    }

    #[test]
    fn headers_default_the_content_type_and_carry_the_key() {
        let mut request = WebhookRequest {
            url: "http://h/".into(),
            method: Method::Post,
            headers: vec![
                ("X-A".into(), "1".into()),
                ("X-A".into(), "2".into()),
                ("Content-Length".into(), "999".into()),
                ("Idempotency-Key".into(), "theirs".into()),
            ],
            body: r#"{"a":1}"#.into(),
            idempotency_key: "tw-1-2".into(),
        };
        let h = request_headers(&request).unwrap();
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert!(h.get("content-length").is_none());
        assert_eq!(h["idempotency-key"], "tw-1-2");
        assert_eq!(h["content-type"], "application/json");
        request.body = "hello".into();
        assert_eq!(
            request_headers(&request).unwrap()["content-type"],
            "text/plain; charset=utf-8"
        );
        request
            .headers
            .push(("Content-Type".into(), "application/xml".into()));
        assert_eq!(
            request_headers(&request).unwrap()["content-type"],
            "application/xml"
        );
        request.method = Method::Get;
        request.headers.clear();
        assert!(
            request_headers(&request)
                .unwrap()
                .get("content-type")
                .is_none()
        );
        request
            .headers
            .push(("X-Bad".into(), "a\r\nInjected: yes".into()));
        assert!(request_headers(&request).is_err());
        request.headers = vec![("Bad Name".into(), "v".into())];
        assert!(request_headers(&request).is_err());
    }
}
