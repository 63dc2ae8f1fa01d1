//! One HTTP request of one Current: builds the body for its kind, sends it, and reports the
//! [`Answer`] for the classification table, with what it needs for the dead-letter store and
//! the last-error status (status, `Retry-After`, a truncated response body).
//!
//! `custom_http` / `heap_export`: `POST {endpoint}` with `{"events":[…]}`, the logged JSON
//! texts concatenated as they are (no re-serialisation unless transformations apply),
//! `Content-Type: application/json`, `Braze-Currents-Version: 1` and
//! `Authorization: Bearer …` when a token is set. Redirects are not followed (a 3xx is
//! retried like a 5xx); one client (connection pool) per Current, so a slow receiver never
//! holds a connection another Current needs. The client keeps the egress policy
//! ([`crate::egress`]): an endpoint whose address the policy refuses makes [`Sender::new`]
//! fail, and a name that resolves only to refused addresses fails each request as a
//! connection error naming the rule.
//!
//! `heap_track`: `POST {host}/api/track` with `{"app_id", "events"}` mapped by
//! `tideway_heap::forward`, paced by Heap's limits; events Heap cannot take are skipped and
//! reported, never silently dropped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::Value;
use tideway_core::currents_store::{
    CurrentKind, CurrentSpec, HeapIdentity, NamePrefix, QueuedEvent, Transformation,
};
use tideway_heap::forward::{self, Identity, Mapping, Pacer, SkipReason};

use tideway_core::egress::EgressPolicy;

use crate::CurrentsError;
use crate::classify::{Answer, Verdict, classify, parse_retry_after};
use crate::clock::Clock;
use crate::{egress, transform};

/// Longest response body kept (dead letters, last error).
pub const MAX_RESPONSE_BODY: usize = 4_096;

/// What one request did.
#[derive(Debug, Clone)]
pub struct Sent {
    pub answer: Answer,
    /// The response body (truncated) when the answer was not 2xx.
    pub body: Option<String>,
    /// Events in the request.
    pub sent: usize,
    /// Events the kind cannot carry (`heap_track`): their places among the events given, with
    /// why; not in the request.
    pub skipped: Vec<(usize, SkipReason)>,
    pub elapsed: Duration,
    /// Transport error text (no URL), for timeouts and connection errors.
    pub error: Option<String>,
}

impl Sent {
    /// A human-readable one-liner for the last-error status (never contains secrets).
    pub fn describe(&self) -> String {
        match (self.answer, &self.error) {
            (Answer::Status { code, .. }, _) => {
                let body = self
                    .body
                    .as_deref()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect::<String>();
                if body.is_empty() {
                    format!("HTTP {code}")
                } else {
                    format!("HTTP {code}: {body}")
                }
            }
            (Answer::Timeout, _) => format!("timed out after {} ms", self.elapsed.as_millis()),
            (Answer::Connection, Some(e)) => format!("connection error: {e}"),
            (Answer::Connection, None) => "connection error".to_owned(),
        }
    }

    /// What happened, in a short sentence that never quotes the receiver's body: the **send
    /// test events** report (`"delivered"`, `"receiver answered 500: will be retried"`,
    /// `"connection refused"`, `"refused by egress policy: …"`).
    pub fn reason(&self) -> String {
        match self.answer {
            Answer::Status { code, .. } => {
                let then = match classify(self.answer, self.sent.max(1)) {
                    Verdict::Ack if self.sent == 0 => return "nothing to send".to_owned(),
                    Verdict::Ack => return "delivered".to_owned(),
                    Verdict::Retry { .. } => "will be retried",
                    Verdict::SplitToSingles | Verdict::DeadLetter(_) => {
                        "the events would be dead-lettered"
                    }
                    Verdict::Halve => "the batch would be halved",
                    Verdict::Halt => {
                        "the Current would halt (check the endpoint and the bearer token)"
                    }
                };
                format!("receiver answered {code}: {then}")
            }
            Answer::Timeout => format!("timed out after {} ms", self.elapsed.as_millis()),
            Answer::Connection => self
                .error
                .clone()
                .unwrap_or_else(|| "connection error".to_owned()),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.answer {
            Answer::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

struct HeapTrack {
    app_id: String,
    mapping: Mapping,
    pacer: Mutex<Pacer>,
}

/// The per-Current HTTP client.
pub struct Sender {
    client: reqwest::Client,
    url: String,
    headers: HeaderMap,
    transformations: Vec<Transformation>,
    heap: Option<HeapTrack>,
    clock: Clock,
}

impl Sender {
    /// The client for `spec`, or why it cannot be sent to: an endpoint the egress policy
    /// refuses is [`CurrentsError::Refused`].
    pub fn new(
        spec: &CurrentSpec,
        clock: Clock,
        policy: &EgressPolicy,
    ) -> Result<Sender, CurrentsError> {
        egress::parse_url(policy, spec.endpoint.as_str()).map_err(|e| match e {
            egress::UrlError::Refused(refusal) => CurrentsError::Refused {
                field: "endpoint".to_owned(),
                refusal,
            },
            other => CurrentsError::spec("endpoint", other.to_string()),
        })?;
        let client = egress::client_builder(*policy)
            .timeout(Duration::from_millis(spec.retry.request_timeout_ms))
            .connect_timeout(Duration::from_millis(
                spec.retry.request_timeout_ms.min(10_000),
            ))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(spec.max_in_flight as usize * 2)
            .user_agent(concat!("tideway-currents/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CurrentsError::Transport(e.without_url().to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let (url, heap) = match (spec.kind, &spec.heap) {
            (CurrentKind::HeapTrack, Some(h)) => {
                let mapping = Mapping {
                    identity: match h.identity {
                        HeapIdentity::ExternalUserId => Identity::ExternalUserId,
                        HeapIdentity::UserId => Identity::UserId,
                    },
                    prefix: h.prefix == NamePrefix::Braze,
                };
                let pacer = Pacer::new(
                    h.app_events_per_minute,
                    h.identity_events_per_minute,
                    clock.now().0,
                );
                (
                    forward::track_url(spec.endpoint.as_str()),
                    Some(HeapTrack {
                        app_id: h.app_id.clone(),
                        mapping,
                        pacer: Mutex::new(pacer),
                    }),
                )
            }
            (CurrentKind::HeapTrack, None) => {
                return Err(CurrentsError::spec("heap", "is required for heap_track"));
            }
            _ => {
                headers.insert("Braze-Currents-Version", HeaderValue::from_static("1"));
                if let Some(token) = &spec.bearer_token {
                    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                        .map_err(|_| {
                            CurrentsError::spec("bearer_token", "is not a valid header value")
                        })?;
                    v.set_sensitive(true);
                    headers.insert(AUTHORIZATION, v);
                }
                (spec.endpoint.as_str().to_owned(), None)
            }
        };
        Ok(Sender {
            client,
            url,
            headers,
            transformations: spec.transformations.clone(),
            heap,
            clock,
        })
    }

    /// Sends logged events.
    pub async fn send(&self, events: &[QueuedEvent]) -> Sent {
        if self.heap.is_none() && self.transformations.is_empty() {
            let mut body =
                String::with_capacity(events.iter().map(|e| e.body.len() + 1).sum::<usize>() + 16);
            body.push_str("{\"events\":[");
            for (i, e) in events.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&e.body);
            }
            body.push_str("]}");
            return self.post(body, events.len(), Vec::new()).await;
        }
        let values = events
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(&e.body)
                    .unwrap_or_else(|_| Value::String(e.body.clone()))
            })
            .collect();
        self.send_values(values).await
    }

    /// Sends events given as JSON values (test events, transformed events).
    pub async fn send_values(&self, mut events: Vec<Value>) -> Sent {
        for e in &mut events {
            transform::apply(e, &self.transformations);
        }
        let Some(heap) = &self.heap else {
            let n = events.len();
            let body = serde_json::json!({ "events": events }).to_string();
            return self.post(body, n, Vec::new()).await;
        };
        let mut mapped = Vec::with_capacity(events.len());
        let mut skipped = Vec::new();
        let mut per_identity: HashMap<String, u32> = HashMap::new();
        for (at, e) in events.iter().enumerate() {
            match forward::map_event(e, &heap.mapping) {
                Ok(m) => {
                    *per_identity.entry(m.identity).or_default() += 1;
                    mapped.push(m.event);
                }
                Err(reason) => skipped.push((at, reason)),
            }
        }
        if mapped.is_empty() {
            return Sent {
                answer: Answer::Status {
                    code: 204,
                    retry_after: None,
                },
                body: None,
                sent: 0,
                skipped,
                elapsed: Duration::ZERO,
                error: None,
            };
        }
        loop {
            let wait = match heap.pacer.lock() {
                Ok(mut p) => p.reserve(&per_identity, self.clock.now().0),
                Err(_) => 0,
            };
            if wait == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        let n = mapped.len();
        let body = forward::track_body(&heap.app_id, mapped).to_string();
        self.post(body, n, skipped).await
    }

    /// `{"events":[]}`: the credential probe sent when a Current starts (not for heap_track).
    pub async fn probe(&self) -> Option<Sent> {
        if self.heap.is_some() {
            return None;
        }
        Some(self.post("{\"events\":[]}".to_owned(), 0, Vec::new()).await)
    }

    async fn post(&self, body: String, sent: usize, skipped: Vec<(usize, SkipReason)>) -> Sent {
        let started = Instant::now();
        let result = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await;
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                let answer = if e.is_timeout() {
                    Answer::Timeout
                } else {
                    Answer::Connection
                };
                return Sent {
                    answer,
                    body: None,
                    sent,
                    skipped,
                    elapsed: started.elapsed(),
                    error: Some(egress::reason(&e)),
                };
            }
        };
        let code = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, self.clock.now().secs()));
        // The status decides (currents-connector.md: "2xx → done"); the body is only kept, cut
        // short, to show with a failure. So at most `MAX_RESPONSE_BODY` bytes are read, however
        // much the receiver sends, and a body that breaks off does not undo its status.
        let text = read_at_most(response, MAX_RESPONSE_BODY).await;
        let body =
            (!(200..300).contains(&code)).then(|| String::from_utf8_lossy(&text).into_owned());
        Sent {
            answer: Answer::Status { code, retry_after },
            body,
            sent,
            skipped,
            elapsed: started.elapsed(),
            error: None,
        }
    }
}

/// The first `limit` bytes of `response`'s body (fewer if it ends or breaks off sooner); the
/// rest is never read, so a receiver cannot make Tideway hold more than `limit` of its answer.
async fn read_at_most(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    while kept.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    kept
}
