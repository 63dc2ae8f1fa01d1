//! Braze's *connected audience* (`audience` in `/campaigns/trigger/send` and `/messages/send`,
//! `braze-messaging.md` §4) translated into Tideway's segment language, so one evaluator
//! (`tideway-segment`) answers both.
//!
//! A connected audience is one filter or a nested `{"AND": […]}` / `{"OR": […]}` of filters:
//! `custom_attribute` (`custom_attribute_name`, `comparison`, `value`, with comparisons by
//! type), `email_subscription_status` / `push_subscription_status` (`is` | `is_not` a state;
//! the profile attributes `email_subscribe` / `push_subscribe`). Each comparison maps onto a
//! segment attribute operator; the negative ones Braze has and the segment language does not
//! (`does_not_match_regex`, `does_not_equal` for booleans) become `not`, and
//! `greater_than_x_days_in_the_future` becomes `after` the instant `now + x days` (the
//! audience of an API send is evaluated when the request arrives). `last_used_app` compares
//! the profile's `date_of_last_session` (Tideway records no app sessions of its own). What
//! has no translation is refused, naming the place.
//!
//! Pure: JSON in, JSON out, `now` a parameter. The result is checked with
//! [`Filter::from_json`], so a bad regular expression or date is refused here too.

use serde_json::{Map, Value, json};
use tideway_core::clock::Millis;
use tideway_segment::Filter;

/// Deepest `AND` / `OR` nesting accepted (the segment language's own limit).
const MAX_DEPTH: usize = tideway_segment::MAX_DEPTH;

const DAY_MS: i64 = 86_400_000;

/// An audience that cannot be translated: where, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct AudienceError {
    pub path: String,
    pub message: String,
}

fn bad(path: &str, message: impl Into<String>) -> AudienceError {
    AudienceError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Translates a connected audience into segment-language JSON (checked to parse).
pub fn to_segment_filter(audience: &Value, now: Millis) -> Result<Value, AudienceError> {
    let out = node(audience, "audience", 0, now)?;
    Filter::from_json(&out).map_err(|e| bad("audience", e.to_string()))?;
    Ok(out)
}

/// `{"in_segment": id}`: the segment language's reference to a stored segment
/// (`segment_id` of `/messages/send`).
pub fn segment_reference(segment_id: &str) -> Value {
    json!({ "in_segment": segment_id })
}

fn node(v: &Value, path: &str, depth: usize, now: Millis) -> Result<Value, AudienceError> {
    if depth > MAX_DEPTH {
        return Err(bad(
            path,
            format!("filters nest deeper than {MAX_DEPTH} levels"),
        ));
    }
    let Value::Object(obj) = v else {
        return Err(bad(path, "must be a filter object"));
    };
    let mut entries = obj.iter();
    let (key, inner) = match (entries.next(), obj.len()) {
        (Some(entry), 1) => entry,
        _ => {
            return Err(bad(
                path,
                "must have exactly one key: AND, OR, custom_attribute, email_subscription_status \
                 or push_subscription_status",
            ));
        }
    };
    let here = format!("{path}.{key}");
    match key.as_str() {
        "AND" | "OR" => {
            let Value::Array(items) = inner else {
                return Err(bad(&here, "must be an array of filters"));
            };
            if items.is_empty() {
                return Err(bad(&here, "must hold at least one filter"));
            }
            let children = items
                .iter()
                .enumerate()
                .map(|(i, item)| node(item, &format!("{here}[{i}]"), depth + 1, now))
                .collect::<Result<Vec<_>, _>>()?;
            let op = if key == "AND" { "and" } else { "or" };
            Ok(json!({ op: children }))
        }
        "custom_attribute" => custom_attribute(inner, &here, now),
        "email_subscription_status" => subscription(inner, &here, "email_subscribe"),
        "push_subscription_status" => subscription(inner, &here, "push_subscribe"),
        "last_used_app" => last_used_app(inner, &here),
        other => Err(bad(&here, format!("unsupported filter '{other}'"))),
    }
}

/// `last_used_app` (`after` | `before` an ISO-8601 time): Tideway records no app sessions of
/// its own, so this compares the profile's `date_of_last_session`, which clients set through
/// `/users/track`; a user without one matches neither.
fn last_used_app(v: &Value, path: &str) -> Result<Value, AudienceError> {
    let Value::Object(m) = v else {
        return Err(bad(path, "must be an object {\"comparison\", \"value\"}"));
    };
    let op = match m.get("comparison").and_then(Value::as_str) {
        Some(op @ ("after" | "before")) => op,
        Some(other) => {
            return Err(bad(
                &format!("{path}.comparison"),
                format!("unsupported comparison '{other}' (expected \"after\" or \"before\")"),
            ));
        }
        None => {
            return Err(bad(
                &format!("{path}.comparison"),
                "is required (\"after\" or \"before\")",
            ));
        }
    };
    match m.get("value") {
        Some(Value::String(at)) if tideway_core::clock::parse_datetime(at).is_some() => {
            Ok(attribute("date_of_last_session", op, Some(json!(at))))
        }
        _ => Err(bad(&format!("{path}.value"), "must be an ISO-8601 time")),
    }
}

fn attribute(name: &str, op: &str, value: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    m.insert("op".into(), json!(op));
    if let Some(v) = value {
        m.insert("value".into(), v);
    }
    json!({ "attribute": m })
}

fn not(inner: Value) -> Value {
    json!({ "not": inner })
}

fn subscription(v: &Value, path: &str, attribute_name: &str) -> Result<Value, AudienceError> {
    let Value::Object(m) = v else {
        return Err(bad(path, "must be an object {\"comparison\", \"value\"}"));
    };
    let state = match m.get("value") {
        Some(Value::String(s))
            if matches!(s.as_str(), "opted_in" | "subscribed" | "unsubscribed") =>
        {
            s.clone()
        }
        _ => {
            return Err(bad(
                &format!("{path}.value"),
                "must be \"opted_in\", \"subscribed\" or \"unsubscribed\"",
            ));
        }
    };
    match m.get("comparison").and_then(Value::as_str) {
        Some("is") => Ok(attribute(attribute_name, "equals", Some(json!(state)))),
        Some("is_not") => Ok(attribute(attribute_name, "not_equals", Some(json!(state)))),
        Some(other) => Err(bad(
            &format!("{path}.comparison"),
            format!("unsupported comparison '{other}' (expected \"is\" or \"is_not\")"),
        )),
        None => Err(bad(
            &format!("{path}.comparison"),
            "is required (\"is\" or \"is_not\")",
        )),
    }
}

fn custom_attribute(v: &Value, path: &str, now: Millis) -> Result<Value, AudienceError> {
    let Value::Object(m) = v else {
        return Err(bad(
            path,
            "must be an object {\"custom_attribute_name\", \"comparison\", \"value\"}",
        ));
    };
    let name = match m.get("custom_attribute_name") {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        _ => {
            return Err(bad(
                &format!("{path}.custom_attribute_name"),
                "is required (a non-empty string)",
            ));
        }
    };
    let comparison = match m.get("comparison") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(bad(&format!("{path}.comparison"), "is required (a string)")),
    };
    let value = m.get("value");
    let value_path = format!("{path}.value");
    let wrong = |expected: &str| {
        bad(
            &value_path,
            format!("comparison '{comparison}' needs {expected}"),
        )
    };
    let string = || match value {
        Some(Value::String(s)) => Ok(json!(s)),
        _ => Err(wrong("a string value")),
    };
    let number = || match value {
        Some(n @ Value::Number(_)) => Ok(n.clone()),
        _ => Err(wrong("a number value")),
    };
    let days = || match value.and_then(Value::as_u64) {
        Some(d) if d <= u64::from(u32::MAX) => Ok(d),
        _ => Err(wrong("a non-negative whole number of days")),
    };
    let element = || match value {
        Some(v @ (Value::String(_) | Value::Number(_))) => Ok(v.clone()),
        _ => Err(wrong("a string or number value")),
    };
    Ok(match comparison {
        "equals" => match value {
            Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => {
                attribute(name, "equals", Some(v.clone()))
            }
            _ => return Err(wrong("a string, number or boolean value")),
        },
        "not_equal" | "does_not_equal" => match value {
            Some(v @ (Value::String(_) | Value::Number(_))) => {
                attribute(name, "not_equals", Some(v.clone()))
            }
            Some(b @ Value::Bool(_)) => not(attribute(name, "equals", Some(b.clone()))),
            _ => return Err(wrong("a string, number or boolean value")),
        },
        "matches_regex" => attribute(name, "matches", Some(string()?)),
        "does_not_match_regex" => not(attribute(name, "matches", Some(string()?))),
        "exists" => attribute(name, "exists", Some(json!(true))),
        "does_not_exist" => attribute(name, "exists", Some(json!(false))),
        "includes_value" => attribute(name, "includes_value", Some(element()?)),
        "does_not_include_value" => attribute(name, "not_includes_value", Some(element()?)),
        "greater_than" => attribute(name, "greater_than", Some(number()?)),
        "greater_than_or_equal_to" => attribute(name, "greater_or_equal", Some(number()?)),
        "less_than" => attribute(name, "less_than", Some(number()?)),
        "less_than_or_equal_to" => attribute(name, "less_or_equal", Some(number()?)),
        "less_than_x_days_ago" => attribute(name, "less_than_days_ago", Some(json!(days()?))),
        "greater_than_x_days_ago" => attribute(name, "more_than_days_ago", Some(json!(days()?))),
        "less_than_x_days_in_the_future" => {
            attribute(name, "within_days_future", Some(json!(days()?)))
        }
        "greater_than_x_days_in_the_future" => {
            let d = i64::try_from(days()?).unwrap_or(i64::MAX);
            let at = Millis(now.0.saturating_add(d.saturating_mul(DAY_MS)));
            attribute(name, "after", Some(json!(at.to_iso())))
        }
        "after" => attribute(name, "after", Some(string()?)),
        "before" => attribute(name, "before", Some(string()?)),
        other => {
            return Err(bad(
                &format!("{path}.comparison"),
                format!("unsupported comparison '{other}'"),
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = Millis(1_750_000_000_000);

    fn ca(name: &str, comparison: &str, value: Value) -> Value {
        json!({"custom_attribute": {"custom_attribute_name": name, "comparison": comparison, "value": value}})
    }

    fn convert(v: Value) -> Value {
        to_segment_filter(&v, NOW).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    fn attr(name: &str, op: &str, value: Value) -> Value {
        json!({"attribute": {"name": name, "op": op, "value": value}})
    }

    #[test]
    fn string_comparisons() {
        assert_eq!(
            convert(ca("plan", "equals", json!("pro"))),
            attr("plan", "equals", json!("pro"))
        );
        assert_eq!(
            convert(ca("plan", "not_equal", json!("pro"))),
            attr("plan", "not_equals", json!("pro"))
        );
        assert_eq!(
            convert(ca("plan", "matches_regex", json!("^p"))),
            attr("plan", "matches", json!("^p"))
        );
        assert_eq!(
            convert(ca("plan", "does_not_match_regex", json!("^p"))),
            json!({"not": attr("plan", "matches", json!("^p"))})
        );
        assert_eq!(
            convert(ca("plan", "exists", Value::Null)),
            attr("plan", "exists", json!(true))
        );
        assert_eq!(
            convert(ca("plan", "does_not_exist", Value::Null)),
            attr("plan", "exists", json!(false))
        );
    }

    #[test]
    fn array_number_boolean_and_time_comparisons() {
        assert_eq!(
            convert(ca("tags", "includes_value", json!("a"))),
            attr("tags", "includes_value", json!("a"))
        );
        assert_eq!(
            convert(ca("tags", "does_not_include_value", json!(3))),
            attr("tags", "not_includes_value", json!(3))
        );
        for (braze, ours) in [
            ("equals", "equals"),
            ("not_equal", "not_equals"),
            ("greater_than", "greater_than"),
            ("greater_than_or_equal_to", "greater_or_equal"),
            ("less_than", "less_than"),
            ("less_than_or_equal_to", "less_or_equal"),
        ] {
            assert_eq!(
                convert(ca("ltv", braze, json!(10.5))),
                attr("ltv", ours, json!(10.5))
            );
        }
        assert_eq!(
            convert(ca("beta", "equals", json!(true))),
            attr("beta", "equals", json!(true))
        );
        assert_eq!(
            convert(ca("beta", "does_not_equal", json!(true))),
            json!({"not": attr("beta", "equals", json!(true))})
        );
        assert_eq!(
            convert(ca("seen", "less_than_x_days_ago", json!(3))),
            attr("seen", "less_than_days_ago", json!(3))
        );
        assert_eq!(
            convert(ca("seen", "greater_than_x_days_ago", json!(3))),
            attr("seen", "more_than_days_ago", json!(3))
        );
        assert_eq!(
            convert(ca("renews", "less_than_x_days_in_the_future", json!(2))),
            attr("renews", "within_days_future", json!(2))
        );
        assert_eq!(
            convert(ca("renews", "greater_than_x_days_in_the_future", json!(1))),
            attr("renews", "after", json!(Millis(NOW.0 + DAY_MS).to_iso()))
        );
        assert_eq!(
            convert(ca("renews", "after", json!("2025-01-01T00:00:00Z"))),
            attr("renews", "after", json!("2025-01-01T00:00:00Z"))
        );
        assert_eq!(
            convert(ca("renews", "before", json!("2025-01-01T00:00:00Z"))),
            attr("renews", "before", json!("2025-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn subscription_status_and_nesting() {
        let v = json!({"AND": [
            {"email_subscription_status": {"comparison": "is", "value": "opted_in"}},
            {"OR": [
                ca("plan", "equals", json!("pro")),
                {"push_subscription_status": {"comparison": "is_not", "value": "unsubscribed"}},
            ]},
        ]});
        assert_eq!(
            convert(v),
            json!({"and": [
                attr("email_subscribe", "equals", json!("opted_in")),
                {"or": [
                    attr("plan", "equals", json!("pro")),
                    attr("push_subscribe", "not_equals", json!("unsubscribed")),
                ]},
            ]})
        );
    }

    #[test]
    fn last_used_app_compares_the_last_session_date() {
        assert_eq!(
            convert(
                json!({"last_used_app": {"comparison": "after", "value": "2025-01-01T00:00:00Z"}})
            ),
            attr(
                "date_of_last_session",
                "after",
                json!("2025-01-01T00:00:00Z")
            )
        );
        assert_eq!(
            convert(json!({"last_used_app": {"comparison": "before", "value": "2025-01-01"}})),
            attr("date_of_last_session", "before", json!("2025-01-01"))
        );
    }

    #[test]
    fn what_cannot_be_translated_is_named() {
        let cases = [
            (
                ca("plan", "sounds_like", json!("x")),
                "audience.custom_attribute.comparison",
                "sounds_like",
            ),
            (
                json!({"AND": [ca("plan", "equals", json!("x")), {"last_used_app": {"comparison": "on", "value": "2025-01-01T00:00:00Z"}}]}),
                "audience.AND[1].last_used_app.comparison",
                "after",
            ),
            (
                json!({"last_used_app": {"comparison": "after", "value": "yesterday"}}),
                "audience.last_used_app.value",
                "ISO-8601",
            ),
            (
                json!({"email_subscription_status": {"comparison": "is", "value": "maybe"}}),
                "audience.email_subscription_status.value",
                "opted_in",
            ),
            (
                ca("ltv", "greater_than", json!("ten")),
                "audience.custom_attribute.value",
                "number",
            ),
            (json!({"AND": []}), "audience.AND", "at least one"),
            (json!({"XOR": []}), "audience.XOR", "unsupported filter"),
            (json!([1]), "audience", "filter object"),
            (
                ca("plan", "matches_regex", json!("(")),
                "audience",
                "regular expression",
            ),
            (
                ca("renews", "after", json!("yesterday")),
                "audience",
                "ISO-8601",
            ),
        ];
        for (input, path, words) in cases {
            let e = to_segment_filter(&input, NOW).expect_err(&input.to_string());
            assert_eq!(e.path, path, "{input}: {e}");
            assert!(e.message.contains(words), "{input}: {e}");
        }
    }

    #[test]
    fn segment_ids_become_in_segment() {
        assert_eq!(segment_reference("s1"), json!({"in_segment": "s1"}));
    }
}
