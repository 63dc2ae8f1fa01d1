//! The Currents → Heap bulk-track forwarder mapping (`reference/heap.md` §3), and the pacing
//! that keeps it under Heap's documented limits.
//!
//! One Currents event becomes one Heap track event:
//! `identity` ← `user.external_user_id` (or `user.user_id`), `event` ← `event_type` (optionally
//! `braze-`-prefixed), `timestamp` ← `time` as `YYYY-MM-DDTHH:MM:SS+00:00`, `idempotency_key`
//! ← `id` (so at-least-once duplicates collapse at Heap), `properties` ← `properties`
//! flattened with dotted keys, arrays `||`-joined, booleans as `"true"`/`"false"`, nulls and
//! empty objects dropped, strings cut to 1023 characters, over-long keys dropped and counted,
//! an unprefixed `id` key renamed `braze-id`, plus `user.device_id`, `user.timezone` and the
//! Braze id that is not the identity as dotted `user.*` properties.
//! Events without a usable identity, id, type or time are skipped with a [`SkipReason`],
//! never silently: the exporter counts them.
//!
//! [`Pacer`] is a pair of token buckets (per app id and per identity, events per minute);
//! time is a parameter.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

/// Heap's US host.
pub const US_HOST: &str = "https://heapanalytics.com";
/// Heap's EU host.
pub const EU_HOST: &str = "https://c.eu.heap-api.com";
/// Most events in one bulk-track request.
pub const MAX_EVENTS_PER_REQUEST: usize = 1_000;
/// Heap's limits: events per minute per app id, and per identity per app id.
pub const APP_EVENTS_PER_MINUTE: u32 = 15_000;
pub const IDENTITY_EVENTS_PER_MINUTE: u32 = 1_000;
/// Longest identity Heap accepts (never truncated: a cut id could merge users).
pub const MAX_IDENTITY_CHARS: usize = 255;
/// Property keys and event names must be shorter than this; string values are cut below it.
pub const MAX_TEXT_CHARS: usize = 1024;

/// The bulk-track URL under a host or custom base URL (a trailing `/` is ignored).
pub fn track_url(base: &str) -> String {
    format!("{}/api/track", base.trim_end_matches('/'))
}

/// Which Braze attribute is Heap's `identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    ExternalUserId,
    UserId,
}

/// How events are mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub identity: Identity,
    /// Prefix event and property names with `braze-`.
    pub prefix: bool,
}

/// Why an event was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// No (or an empty) value of the chosen identity attribute.
    NoIdentity,
    /// The identity is longer than 255 characters.
    IdentityTooLong,
    /// No string `id` (no idempotency possible).
    NoId,
    /// No string `event_type`, or a name of 1024+ characters.
    BadName,
    /// `time` is not an integer.
    BadTime,
    /// Not a JSON object.
    NotAnEvent,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NoIdentity => "no_identity",
            SkipReason::IdentityTooLong => "identity_too_long",
            SkipReason::NoId => "no_id",
            SkipReason::BadName => "bad_name",
            SkipReason::BadTime => "bad_time",
            SkipReason::NotAnEvent => "not_an_event",
        }
    }
}

/// One mapped event with its identity (for pacing) and how many property keys were dropped
/// for being too long.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub identity: String,
    pub event: Value,
    pub dropped_keys: usize,
}

/// `2016-10-26T17:26:23+00:00`
pub fn iso_timestamp(secs: i64) -> Option<String> {
    let dt = time::OffsetDateTime::from_unix_timestamp(secs).ok()?;
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+00:00",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    ))
}

fn cut(s: &str) -> String {
    s.chars().take(MAX_TEXT_CHARS - 1).collect()
}

fn scalar(v: &Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(Value::String(b.to_string())),
        Value::Number(n) => Some(Value::Number(n.clone())),
        Value::String(s) => Some(Value::String(cut(s))),
        Value::Array(items) => {
            let joined = items
                .iter()
                .filter(|i| !i.is_null())
                .map(|i| match i {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join("||");
            Some(Value::String(cut(&joined)))
        }
        Value::Object(_) => None,
    }
}

struct Flattener<'a> {
    prefix: &'a str,
    out: Map<String, Value>,
    dropped: usize,
}

impl Flattener<'_> {
    fn put(&mut self, path: &str, value: &Value) {
        if let Value::Object(inner) = value {
            for (k, v) in inner {
                self.put(&format!("{path}.{k}"), v);
            }
            return;
        }
        let Some(v) = scalar(value) else { return };
        let key = if self.prefix.is_empty() && path.eq_ignore_ascii_case("id") {
            "braze-id".to_owned()
        } else {
            format!("{}{path}", self.prefix)
        };
        if key.chars().count() >= MAX_TEXT_CHARS {
            self.dropped += 1;
            return;
        }
        self.out.insert(key, v);
    }
}

fn non_empty_str(v: Option<&Value>) -> Option<&str> {
    v.and_then(Value::as_str).filter(|s| !s.trim().is_empty())
}

/// Maps one Currents event (the wire object) to a Heap bulk-track event.
pub fn map_event(event: &Value, mapping: &Mapping) -> Result<Mapped, SkipReason> {
    let e = event.as_object().ok_or(SkipReason::NotAnEvent)?;
    let empty = Map::new();
    let user = e.get("user").and_then(Value::as_object).unwrap_or(&empty);
    let (identity_key, other_key) = match mapping.identity {
        Identity::ExternalUserId => ("external_user_id", "user_id"),
        Identity::UserId => ("user_id", "external_user_id"),
    };
    let identity = non_empty_str(user.get(identity_key)).ok_or(SkipReason::NoIdentity)?;
    if identity.chars().count() > MAX_IDENTITY_CHARS {
        return Err(SkipReason::IdentityTooLong);
    }
    let id = non_empty_str(e.get("id")).ok_or(SkipReason::NoId)?;
    let event_type = non_empty_str(e.get("event_type")).ok_or(SkipReason::BadName)?;
    let prefix = if mapping.prefix { "braze-" } else { "" };
    let name = format!("{prefix}{event_type}");
    if name.chars().count() >= MAX_TEXT_CHARS {
        return Err(SkipReason::BadName);
    }
    let time = e
        .get("time")
        .and_then(Value::as_i64)
        .ok_or(SkipReason::BadTime)?;
    let timestamp = iso_timestamp(time).ok_or(SkipReason::BadTime)?;
    let mut flat = Flattener {
        prefix,
        out: Map::new(),
        dropped: 0,
    };
    if let Some(Value::Object(props)) = e.get("properties") {
        for (k, v) in props {
            flat.put(k, v);
        }
    }
    for key in ["device_id", "timezone", other_key] {
        if let Some(v) = user.get(key) {
            flat.put(&format!("user.{key}"), v);
        }
    }
    Ok(Mapped {
        identity: identity.to_owned(),
        event: json!({
            "identity": identity,
            "event": name,
            "timestamp": timestamp,
            "idempotency_key": id,
            "properties": Value::Object(flat.out),
        }),
        dropped_keys: flat.dropped,
    })
}

/// The bulk-track request body.
pub fn track_body(app_id: &str, events: Vec<Value>) -> Value {
    json!({"app_id": app_id, "events": events})
}

/// A token bucket holding up to `per_minute` events, refilled continuously.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    last_ms: i64,
}

impl TokenBucket {
    pub fn new(per_minute: u32, now_ms: i64) -> Self {
        let capacity = f64::from(per_minute.max(1));
        TokenBucket {
            capacity,
            tokens: capacity,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        let elapsed = (now_ms - self.last_ms).max(0) as f64;
        self.tokens = (self.tokens + elapsed * self.capacity / 60_000.0).min(self.capacity);
        self.last_ms = now_ms.max(self.last_ms);
    }

    /// Milliseconds until `n` tokens are there (0 if now). `n` above the capacity waits for a
    /// full bucket.
    pub fn wait_for(&mut self, n: u32, now_ms: i64) -> u64 {
        self.refill(now_ms);
        let need = f64::from(n).min(self.capacity);
        if self.tokens >= need {
            0
        } else {
            ((need - self.tokens) * 60_000.0 / self.capacity).ceil() as u64
        }
    }

    fn take(&mut self, n: u32) {
        self.tokens = (self.tokens - f64::from(n).min(self.capacity)).max(0.0);
    }

    fn is_full(&self) -> bool {
        self.tokens >= self.capacity
    }
}

/// Heap's rate limits as token buckets: one for the app id, one per identity.
#[derive(Debug, Clone)]
pub struct Pacer {
    app: TokenBucket,
    identity_per_minute: u32,
    identities: HashMap<String, TokenBucket>,
}

impl Pacer {
    pub fn new(app_per_minute: u32, identity_per_minute: u32, now_ms: i64) -> Self {
        Pacer {
            app: TokenBucket::new(app_per_minute, now_ms),
            identity_per_minute,
            identities: HashMap::new(),
        }
    }

    /// How long to wait before a request with these events per identity may go; when 0, the
    /// tokens are taken.
    pub fn reserve(&mut self, per_identity: &HashMap<String, u32>, now_ms: i64) -> u64 {
        let total: u32 = per_identity.values().sum();
        let mut wait = self.app.wait_for(total, now_ms);
        for (identity, n) in per_identity {
            let bucket = self
                .identities
                .entry(identity.clone())
                .or_insert_with(|| TokenBucket::new(self.identity_per_minute, now_ms));
            wait = wait.max(bucket.wait_for(*n, now_ms));
        }
        if wait == 0 {
            self.app.take(total);
            for (identity, n) in per_identity {
                if let Some(b) = self.identities.get_mut(identity) {
                    b.take(*n);
                }
            }
            if self.identities.len() > 100_000 {
                self.identities.retain(|_, b| {
                    b.refill(now_ms);
                    !b.is_full()
                });
            }
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(prefix: bool) -> Mapping {
        Mapping {
            identity: Identity::ExternalUserId,
            prefix,
        }
    }

    fn custom_event() -> Value {
        json!({"event_type":"users.behaviors.CustomEvent","id":"3d0c2f8e-6a51-4b7e-9d0a-1c2b3a4d5e6f","time":1477502783,
          "user":{"user_id":"65a0c0ffee0000000000abcd","external_user_id":"u-42","device_id":"dev-1","timezone":"Europe/Paris"},
          "properties":{"app_id":"a1","platform":"ios","name":"plan_upgraded","id":"inner","empty":{},"gone":null,"ok":true,
            "custom_properties":{"plan":"pro","seats":3,"features":["sso","audit"],"nested":{"deep":1.5}}}})
    }

    #[test]
    fn the_reference_mapping_without_prefix() {
        let m = map_event(&custom_event(), &mapping(false)).unwrap();
        assert_eq!(m.identity, "u-42");
        assert_eq!(
            m.event,
            json!({
                "identity": "u-42",
                "event": "users.behaviors.CustomEvent",
                "timestamp": "2016-10-26T17:26:23+00:00",
                "idempotency_key": "3d0c2f8e-6a51-4b7e-9d0a-1c2b3a4d5e6f",
                "properties": {
                    "app_id": "a1", "platform": "ios", "name": "plan_upgraded", "braze-id": "inner", "ok": "true",
                    "custom_properties.plan": "pro", "custom_properties.seats": 3,
                    "custom_properties.features": "sso||audit", "custom_properties.nested.deep": 1.5,
                    "user.device_id": "dev-1", "user.timezone": "Europe/Paris", "user.user_id": "65a0c0ffee0000000000abcd"
                }
            })
        );
    }

    #[test]
    fn the_prefix_covers_event_and_property_names() {
        let m = map_event(
            &custom_event(),
            &Mapping {
                identity: Identity::UserId,
                prefix: true,
            },
        )
        .unwrap();
        assert_eq!(m.identity, "65a0c0ffee0000000000abcd");
        assert_eq!(m.event["event"], "braze-users.behaviors.CustomEvent");
        let props = m.event["properties"].as_object().unwrap();
        assert_eq!(props["braze-custom_properties.plan"], "pro");
        assert_eq!(props["braze-id"], "inner");
        assert_eq!(props["braze-user.external_user_id"], "u-42");
        assert!(props.keys().all(|k| k.starts_with("braze-")));
    }

    #[test]
    fn events_without_what_heap_needs_are_skipped_with_a_reason() {
        let mut e = custom_event();
        e["user"] = json!({});
        assert_eq!(map_event(&e, &mapping(false)), Err(SkipReason::NoIdentity));
        e["user"] = json!({"external_user_id": "x".repeat(256)});
        assert_eq!(
            map_event(&e, &mapping(false)),
            Err(SkipReason::IdentityTooLong)
        );
        e["user"] = json!({"external_user_id": "ok"});
        e["time"] = json!("soon");
        assert_eq!(map_event(&e, &mapping(false)), Err(SkipReason::BadTime));
        e["time"] = json!(1);
        e.as_object_mut().unwrap().remove("id");
        assert_eq!(map_event(&e, &mapping(false)), Err(SkipReason::NoId));
        assert_eq!(
            map_event(&json!(3), &mapping(false)),
            Err(SkipReason::NotAnEvent)
        );
    }

    #[test]
    fn long_values_are_cut_and_long_keys_dropped() {
        let mut e = custom_event();
        e["properties"] = json!({"long": "é".repeat(2000), "k".repeat(1024): 1});
        let m = map_event(&e, &mapping(false)).unwrap();
        assert_eq!(
            m.event["properties"]["long"]
                .as_str()
                .unwrap()
                .chars()
                .count(),
            1023
        );
        assert_eq!(m.dropped_keys, 1);
        assert_eq!(
            track_url("https://heapanalytics.com/"),
            "https://heapanalytics.com/api/track"
        );
        assert_eq!(track_body("11", vec![])["app_id"], "11");
    }

    #[test]
    fn the_pacer_holds_app_and_identity_limits() {
        let mut p = Pacer::new(60, 10, 0);
        let batch = |id: &str, n| HashMap::from([(id.to_owned(), n)]);
        assert_eq!(p.reserve(&batch("a", 10), 0), 0);
        // identity a is empty: one token back per 6 s.
        assert_eq!(p.reserve(&batch("a", 1), 0), 6_000);
        assert_eq!(p.reserve(&batch("a", 1), 6_000), 0);
        // app bucket: 60 - 11 = 49 left; another identity may take 10.
        assert_eq!(p.reserve(&batch("b", 10), 6_000), 0);
        let mut big = Pacer::new(15_000, 1_000, 0);
        assert_eq!(big.reserve(&batch("x", 1_000), 0), 0);
        assert_eq!(big.reserve(&batch("x", 1_000), 0), 60_000);
    }
}
