//! A Current definition from its JSON form (the management API's request body), checked
//! completely: unknown fields, unknown event types, out-of-range numbers and inconsistent
//! windows are refused with the offending field named.
//!
//! ```json
//! {"name": "Heap", "kind": "heap_export" | "custom_http" | "heap_track",
//!  "endpoint": "https://…", "bearer_token": "…",
//!  "event_types": ["users.behaviors.CustomEvent"] | "categories": ["message_engagement", …],
//!  "batch_size": 100, "flush_interval_ms": 1000, "per_user_ordering": false, "max_in_flight": 2,
//!  "transformations": [{"field": "email_address", "action": "remove" | "hash"}],
//!  "retry": {"base_ms", "multiplier", "cap_ms", "request_timeout_ms", "max_retry_after_ms"},
//!  "failure_window_ms", "retention_ms", "alert_after_ms", "alert_webhook",
//!  "heap": {"app_id", "region": "us" | "eu", "identity": "external_user_id" | "user_id",
//!           "prefix": false, "app_events_per_minute", "identity_events_per_minute"}}
//! ```
//! `launch` (create and launch at once) is accepted and left to the caller.
//!
//! [`check_egress`] then judges the definition's URLs against the server's egress policy
//! (a separate step: the policy is a setting of the server, not part of the definition).

use serde_json::{Map, Value};
use tideway_core::currents::EventCategory;
use tideway_core::currents_store::{
    BearerToken, CurrentKind, CurrentSpec, DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_INTERVAL_MS,
    DEFAULT_MAX_IN_FLIGHT, EndpointUrl, FieldAction, HeapIdentity, HeapTrackSettings,
    MAX_BATCH_SIZE, NamePrefix, Ordering, RetryPolicy, Selection, Transformation, Windows,
};
use tideway_core::egress::EgressPolicy;
use tideway_heap::forward;

use crate::CurrentsError;
use crate::catalogue;
use crate::egress::{self, UrlError};
use crate::transform::ENVELOPE;

const KNOWN: &[&str] = &[
    "name",
    "kind",
    "endpoint",
    "bearer_token",
    "event_types",
    "categories",
    "batch_size",
    "flush_interval_ms",
    "transformations",
    "per_user_ordering",
    "max_in_flight",
    "retry",
    "failure_window_ms",
    "retention_ms",
    "alert_after_ms",
    "alert_webhook",
    "heap",
    "launch",
];

fn err(field: &str, message: &str) -> CurrentsError {
    CurrentsError::spec(field, message)
}

fn opt_u64(
    m: &Map<String, Value>,
    key: &str,
    min: u64,
    max: u64,
    default: u64,
) -> Result<u64, CurrentsError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| err(key, "must be a non-negative integer"))?;
            if (min..=max).contains(&n) {
                Ok(n)
            } else {
                Err(err(key, &format!("must be between {min} and {max}")))
            }
        }
    }
}

fn opt_bool(m: &Map<String, Value>, key: &str) -> Result<bool, CurrentsError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(err(key, "must be true or false")),
    }
}

fn check_known(m: &Map<String, Value>, known: &[&str], prefix: &str) -> Result<(), CurrentsError> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(err(&format!("{prefix}{k}"), "is not a known field")),
        None => Ok(()),
    }
}

fn str_list<'a>(v: &'a Value, field: &str) -> Result<Vec<&'a str>, CurrentsError> {
    let items = v
        .as_array()
        .ok_or_else(|| err(field, "must be an array of strings"))?;
    if items.is_empty() {
        return Err(err(field, "must not be empty"));
    }
    items
        .iter()
        .map(|i| {
            i.as_str()
                .ok_or_else(|| err(field, "must be an array of strings"))
        })
        .collect()
}

/// Whether the JSON asks to launch right away (`"launch": true`).
pub fn wants_launch(body: &Value) -> bool {
    body.get("launch").and_then(Value::as_bool) == Some(true)
}

/// Parses and checks a Current definition.
pub fn parse_spec(body: &Value) -> Result<CurrentSpec, CurrentsError> {
    let m = body
        .as_object()
        .ok_or_else(|| err("body", "must be a JSON object"))?;
    check_known(m, KNOWN, "")?;
    if m.get("launch")
        .is_some_and(|l| !l.is_boolean() && !l.is_null())
    {
        return Err(err("launch", "must be true or false"));
    }
    let name = m
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    if name.is_empty() || name.chars().count() > 255 || name.contains('\0') {
        return Err(err(
            "name",
            "must be a non-empty string of at most 255 characters, without NUL",
        ));
    }
    let kind_raw = m
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| err("kind", "must be heap_export, custom_http or heap_track"))?;
    let kind = CurrentKind::parse(kind_raw)
        .ok_or_else(|| err("kind", "must be heap_export, custom_http or heap_track"))?;

    let heap = match (kind, m.get("heap")) {
        (CurrentKind::HeapTrack, Some(Value::Object(h))) => Some(parse_heap(h)?),
        (CurrentKind::HeapTrack, _) => {
            return Err(err(
                "heap",
                "is required for heap_track (at least {\"app_id\": …})",
            ));
        }
        (_, None | Some(Value::Null)) => None,
        (_, Some(_)) => return Err(err("heap", "is only for the heap_track kind")),
    };
    let endpoint_raw = match (m.get("endpoint"), &heap) {
        (Some(Value::String(s)), _) => s.clone(),
        (None | Some(Value::Null), Some((_, region))) => (*region).to_owned(),
        _ => return Err(err("endpoint", "must be an http:// or https:// URL")),
    };
    let endpoint =
        EndpointUrl::parse(&endpoint_raw).map_err(|e| err("endpoint", &e.to_string()))?;
    let bearer_token = match m.get("bearer_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => {
            Some(BearerToken::parse(s).map_err(|e| err("bearer_token", &e.to_string()))?)
        }
        Some(_) => return Err(err("bearer_token", "must be a string")),
    };

    // `null` counts as absent, as for every other optional field.
    let given = |key: &str| m.get(key).filter(|v| !v.is_null());
    let selection = match (given("event_types"), given("categories")) {
        (Some(types), None) => {
            let mut names = Vec::new();
            for t in str_list(types, "event_types")? {
                if catalogue::find(t).is_none() {
                    return Err(err("event_types", &format!("unknown event type {t:?}")));
                }
                if !names.iter().any(|n: &String| n == t) {
                    names.push(t.to_owned());
                }
            }
            Selection::EventTypes(names)
        }
        (None, Some(cats)) => {
            let mut out = Vec::new();
            for c in str_list(cats, "categories")? {
                let cat = EventCategory::parse(c).ok_or_else(|| {
                    err(
                        "categories",
                        "must hold message_engagement, customer_behavior or user",
                    )
                })?;
                if !out.contains(&cat) {
                    out.push(cat);
                }
            }
            Selection::Categories(out)
        }
        _ => {
            return Err(err(
                "event_types",
                "give exactly one of event_types or categories",
            ));
        }
    };

    let max_batch = if kind == CurrentKind::HeapTrack {
        forward::MAX_EVENTS_PER_REQUEST as u64
    } else {
        u64::from(MAX_BATCH_SIZE)
    };
    let batch_size = opt_u64(m, "batch_size", 1, max_batch, u64::from(DEFAULT_BATCH_SIZE))? as u32;
    let flush_interval_ms = opt_u64(
        m,
        "flush_interval_ms",
        1,
        300_000,
        DEFAULT_FLUSH_INTERVAL_MS,
    )?;
    let ordering = if opt_bool(m, "per_user_ordering")? {
        Ordering::PerUser
    } else {
        Ordering::Unordered
    };
    let max_in_flight =
        opt_u64(m, "max_in_flight", 1, 16, u64::from(DEFAULT_MAX_IN_FLIGHT))? as u32;

    let transformations = match m.get("transformations") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| {
                let t = t.as_object().ok_or_else(|| err("transformations", "must hold {\"field\", \"action\"} objects"))?;
                check_known(t, &["field", "action"], "transformations[].")?;
                let field = t.get("field").and_then(Value::as_str).map(str::trim).unwrap_or("");
                let root = field.split('.').next().unwrap_or("");
                if field.is_empty() || ENVELOPE.contains(&field) || (field.contains('.') && !["user", "properties"].contains(&root)) {
                    return Err(err(
                        "transformations[].field",
                        "must name a user or properties field (or a dotted path under user. or properties.)",
                    ));
                }
                let action = t
                    .get("action")
                    .and_then(Value::as_str)
                    .and_then(FieldAction::parse)
                    .ok_or_else(|| err("transformations[].action", "must be remove or hash"))?;
                Ok(Transformation { field: field.to_owned(), action })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err("transformations", "must be an array")),
    };

    let d = RetryPolicy::default();
    let retry = match m.get("retry") {
        None | Some(Value::Null) => d,
        Some(Value::Object(r)) => (|| {
            check_known(
                r,
                &[
                    "base_ms",
                    "multiplier",
                    "cap_ms",
                    "request_timeout_ms",
                    "max_retry_after_ms",
                ],
                "",
            )?;
            let base_ms = opt_u64(r, "base_ms", 1, 3_600_000, d.base_ms)?;
            Ok(RetryPolicy {
                base_ms,
                multiplier: opt_u64(r, "multiplier", 1, 10, u64::from(d.multiplier))? as u32,
                cap_ms: opt_u64(r, "cap_ms", base_ms, 86_400_000, d.cap_ms.max(base_ms))?,
                request_timeout_ms: opt_u64(
                    r,
                    "request_timeout_ms",
                    1,
                    600_000,
                    d.request_timeout_ms,
                )?,
                max_retry_after_ms: opt_u64(
                    r,
                    "max_retry_after_ms",
                    0,
                    86_400_000,
                    d.max_retry_after_ms,
                )?,
            })
        })()
        .map_err(|e| match e {
            CurrentsError::InvalidSpec { field, message } => CurrentsError::InvalidSpec {
                field: format!("retry.{field}"),
                message,
            },
            other => other,
        })?,
        Some(_) => return Err(err("retry", "must be an object")),
    };
    let w = Windows::default();
    const YEAR_MS: u64 = 365 * 86_400_000;
    let windows = Windows {
        failure_window_ms: opt_u64(m, "failure_window_ms", 1, YEAR_MS, w.failure_window_ms)?,
        retention_ms: opt_u64(m, "retention_ms", 1, YEAR_MS, w.retention_ms)?,
        alert_after_ms: opt_u64(m, "alert_after_ms", 1, YEAR_MS, w.alert_after_ms)?,
    };
    if windows.failure_window_ms > windows.retention_ms {
        return Err(err(
            "failure_window_ms",
            "must not be longer than retention_ms",
        ));
    }
    let alert_webhook = match m.get("alert_webhook") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Some(EndpointUrl::parse(s).map_err(|e| err("alert_webhook", &e.to_string()))?)
        }
        Some(_) => return Err(err("alert_webhook", "must be a URL string")),
    };
    Ok(CurrentSpec {
        name: name.to_owned(),
        kind,
        endpoint,
        bearer_token,
        selection,
        batch_size,
        flush_interval_ms,
        transformations,
        ordering,
        max_in_flight,
        retry,
        windows,
        alert_webhook,
        heap: heap.map(|(h, _)| h),
    })
}

fn parse_heap(h: &Map<String, Value>) -> Result<(HeapTrackSettings, &'static str), CurrentsError> {
    check_known(
        h,
        &[
            "app_id",
            "region",
            "identity",
            "prefix",
            "app_events_per_minute",
            "identity_events_per_minute",
        ],
        "heap.",
    )?;
    let app_id = h
        .get("app_id")
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    if app_id.is_empty() || app_id.len() > 255 {
        return Err(err("heap.app_id", "must be a non-empty string"));
    }
    let region = match h.get("region").and_then(Value::as_str) {
        None | Some("us") => forward::US_HOST,
        Some("eu") => forward::EU_HOST,
        Some(_) => return Err(err("heap.region", "must be us or eu")),
    };
    let identity = match h.get("identity") {
        None | Some(Value::Null) => HeapIdentity::ExternalUserId,
        Some(v) => v
            .as_str()
            .and_then(HeapIdentity::parse)
            .ok_or_else(|| err("heap.identity", "must be external_user_id or user_id"))?,
    };
    let prefix = if opt_bool(h, "prefix")? {
        NamePrefix::Braze
    } else {
        NamePrefix::None
    };
    Ok((
        HeapTrackSettings {
            app_id: app_id.to_owned(),
            identity,
            prefix,
            app_events_per_minute: opt_u64(
                h,
                "app_events_per_minute",
                1,
                10_000_000,
                u64::from(forward::APP_EVENTS_PER_MINUTE),
            )? as u32,
            identity_events_per_minute: opt_u64(
                h,
                "identity_events_per_minute",
                1,
                10_000_000,
                u64::from(forward::IDENTITY_EVENTS_PER_MINUTE),
            )? as u32,
        },
        region,
    ))
}

/// Judges the definition's URLs (`endpoint`, `alert_webhook`) as the HTTP client will read
/// them: [`CurrentsError::Refused`] names the field and the rule an address or host name
/// breaks. Host names are judged again, by what they resolve to, at every connection.
pub fn check_egress(spec: &CurrentSpec, policy: &EgressPolicy) -> Result<(), CurrentsError> {
    let urls = std::iter::once(("endpoint", &spec.endpoint))
        .chain(spec.alert_webhook.iter().map(|u| ("alert_webhook", u)));
    for (field, url) in urls {
        match egress::parse_url(policy, url.as_str()) {
            Ok(_) => {}
            Err(UrlError::Refused(refusal)) => {
                return Err(CurrentsError::Refused {
                    field: field.to_owned(),
                    refusal,
                });
            }
            Err(other) => return Err(err(field, &other.to_string())),
        }
    }
    Ok(())
}

/// The event type names a Current selects (`None`: every type).
pub fn selected_types(selection: &Selection) -> Option<Vec<String>> {
    match selection {
        Selection::EventTypes(t) => Some(t.clone()),
        Selection::Categories(c) if c.len() == EventCategory::ALL.len() => None,
        Selection::Categories(c) => Some(catalogue::names_in(c)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tideway_core::egress::Rule;

    fn base() -> Value {
        json!({"name": "Heap", "kind": "heap_export", "endpoint": "https://h.example/c?k=1", "categories": ["user"]})
    }

    #[test]
    fn defaults_follow_the_reference() {
        let s = parse_spec(&base()).unwrap();
        assert_eq!(
            (s.batch_size, s.flush_interval_ms, s.max_in_flight),
            (100, 1_000, 2)
        );
        assert_eq!(s.retry, RetryPolicy::default());
        assert_eq!(s.windows.failure_window_ms, 5 * 86_400_000);
        assert_eq!(s.windows.retention_ms, 7 * 86_400_000);
        assert_eq!(s.ordering, Ordering::Unordered);
        assert!(!wants_launch(&base()));
        // "launch": "true" would silently make a draft: refused instead.
        let mut quoted = base();
        quoted["launch"] = json!("true");
        let e = parse_spec(&quoted).unwrap_err();
        assert!(e.to_string().contains("launch"), "{e}");
        quoted["launch"] = json!(true);
        assert!(parse_spec(&quoted).is_ok() && wants_launch(&quoted));
        let mut both = base();
        both["event_types"] = json!(["users.behaviors.CustomEvent"]);
        both["categories"] = Value::Null;
        assert!(parse_spec(&both).is_ok());
    }

    #[test]
    fn every_field_is_checked() {
        let bad = |patch: Value, field: &str| {
            let mut b = base();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    b.as_object_mut().unwrap().remove(k);
                } else {
                    b[k] = v.clone();
                }
            }
            match parse_spec(&b) {
                Err(CurrentsError::InvalidSpec { field: f, .. }) => assert_eq!(f, field, "{patch}"),
                other => panic!("{patch}: {other:?}"),
            }
        };
        bad(json!({"name": ""}), "name");
        bad(json!({"kind": "s3"}), "kind");
        bad(json!({"endpoint": "ftp://x"}), "endpoint");
        bad(json!({"bearer_token": "a b"}), "bearer_token");
        bad(json!({"categories": ["nope"]}), "categories");
        bad(
            json!({"categories": null, "event_types": ["users.Nope"]}),
            "event_types",
        );
        bad(
            json!({"event_types": ["users.behaviors.CustomEvent"]}),
            "event_types",
        );
        bad(json!({"batch_size": 0}), "batch_size");
        bad(json!({"batch_size": 1001}), "batch_size");
        bad(
            json!({"transformations": [{"field": "id", "action": "remove"}]}),
            "transformations[].field",
        );
        bad(
            json!({"transformations": [{"field": "email_address", "action": "mask"}]}),
            "transformations[].action",
        );
        bad(json!({"retry": {"base_ms": 0}}), "retry.base_ms");
        bad(json!({"retry": {"jitter": 1}}), "retry.jitter");
        bad(
            json!({"failure_window_ms": 10, "retention_ms": 5}),
            "failure_window_ms",
        );
        bad(json!({"heap": {"app_id": "1"}}), "heap");
        bad(json!({"surprise": 1}), "surprise");
    }

    #[test]
    fn heap_track_takes_its_host_from_the_region() {
        let s = parse_spec(&json!({"name": "h", "kind": "heap_track", "event_types": ["users.behaviors.CustomEvent"],
            "heap": {"app_id": "11", "region": "eu", "identity": "user_id", "prefix": true}, "batch_size": 1000}))
        .unwrap();
        assert_eq!(s.endpoint.as_str(), forward::EU_HOST);
        let h = s.heap.unwrap();
        assert_eq!(
            (h.identity, h.prefix, h.app_events_per_minute),
            (HeapIdentity::UserId, NamePrefix::Braze, 15_000)
        );
        assert!(
            parse_spec(&json!({"name": "h", "kind": "heap_track", "categories": ["user"], "heap": {"app_id": ""}})).is_err()
        );
    }

    #[test]
    fn egress_names_the_field_and_the_rule() {
        let refused = |patch: Value, policy: EgressPolicy| {
            let mut b = base();
            for (k, v) in patch.as_object().unwrap() {
                b[k] = v.clone();
            }
            match check_egress(&parse_spec(&b).unwrap(), &policy) {
                Err(CurrentsError::Refused { field, refusal }) => Some((field, refusal.rule)),
                Ok(()) => None,
                Err(other) => panic!("{patch}: {other:?}"),
            }
        };
        let allow = EgressPolicy::default();
        let deny = EgressPolicy::DENY_PRIVATE;
        assert_eq!(refused(json!({}), deny), None);
        assert_eq!(
            refused(
                json!({"endpoint": "http://169.254.169.254/latest/meta-data"}),
                allow
            ),
            Some(("endpoint".into(), Rule::Metadata))
        );
        assert_eq!(
            refused(json!({"endpoint": "http://2852039166/"}), allow),
            Some(("endpoint".into(), Rule::Metadata))
        );
        assert_eq!(
            refused(
                json!({"endpoint": "http://metadata.google.internal./"}),
                allow
            ),
            Some(("endpoint".into(), Rule::Metadata))
        );
        assert_eq!(
            refused(json!({"endpoint": "https://[FE80::1]:8443/"}), allow),
            Some(("endpoint".into(), Rule::LinkLocal))
        );
        assert_eq!(
            refused(
                json!({"alert_webhook": "http://[::ffff:169.254.1.1]/a"}),
                allow
            ),
            Some(("alert_webhook".into(), Rule::LinkLocal))
        );
        assert_eq!(
            refused(json!({"endpoint": "http://10.0.0.5:9400/"}), allow),
            None
        );
        assert_eq!(
            refused(json!({"endpoint": "http://10.0.0.5:9400/"}), deny),
            Some(("endpoint".into(), Rule::Private))
        );
        assert_eq!(
            refused(json!({"alert_webhook": "http://127.0.0.1:1/"}), deny),
            Some(("alert_webhook".into(), Rule::Loopback))
        );
        assert_eq!(
            refused(json!({"endpoint": "http://localhost:9400/"}), deny),
            None,
            "names are judged by what they resolve to"
        );
    }

    #[test]
    fn selections_expand_to_type_names() {
        assert_eq!(
            selected_types(&Selection::Categories(EventCategory::ALL.to_vec())),
            None
        );
        let user = selected_types(&Selection::Categories(vec![EventCategory::User])).unwrap();
        assert_eq!(
            user,
            [
                "users.UserDeleteRequest",
                "users.UserOrphan",
                "users.profile.Update"
            ]
        );
    }
}
