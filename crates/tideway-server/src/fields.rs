//! Reading fields out of a JSON request body, with messages that name the field.
//!
//! Request bodies are parsed by hand rather than through `serde` derives: Braze ignores unknown
//! keys, reports bad elements of a batch one by one (by index) while applying the good ones,
//! and a client needs to know *which* field was wrong. Two kinds of helpers follow from that:
//! top-level readers that fail the whole request (`Result<_, ApiError>`, a 400 naming the
//! field) and element readers that fail one item (`Result<_, String>`, reported by index).

use serde_json::{Map, Value};
use tideway_core::ids::{AliasLabel, AliasName, ExternalId, IdError, UserAlias};
use tideway_core::users::Prioritization;

use crate::error::ApiError;

/// The documented per-request limit of the batch endpoints (identify, alias, merge, delete,
/// external id rename/remove, export).
pub const MAX_BATCH: usize = 50;

/// `field` as an optional array: absent or `null` → `None`; anything but an array → 400.
pub fn opt_array<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a [Value]>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => Err(ApiError::bad_request(format!("'{field}' must be an array"))),
    }
}

/// `field` as an optional string: absent or `null` → `None`; anything but a string → 400.
pub fn opt_string<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a str>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_request(format!("'{field}' must be a string"))),
    }
}

/// An optional identifier field of the request body, parsed; invalid → 400 naming it.
pub fn opt_id<T>(
    body: &Map<String, Value>,
    field: &str,
    parse: impl Fn(&str) -> Result<T, IdError>,
) -> Result<Option<T>, ApiError> {
    opt_string(body, field)?
        .map(|raw| parse(raw).map_err(|e| ApiError::bad_request(format!("'{field}' {e}"))))
        .transpose()
}

/// An identifier from a JSON value, for the element `what` (e.g. `external_ids[3]`).
pub fn id_value<T>(
    value: &Value,
    what: &str,
    parse: impl Fn(&str) -> Result<T, IdError>,
) -> Result<T, String> {
    match value {
        Value::String(raw) => parse(raw).map_err(|e| format!("'{what}' {e}")),
        _ => Err(format!("'{what}' must be a string")),
    }
}

/// An external id from a JSON value ([`id_value`]): a string, or an integer read as its decimal
/// text, as `/users/track` and the messaging endpoints read it (clients that key users by a
/// database id send `"external_id": 5555`).
pub fn external_id_value(value: &Value, what: &str) -> Result<ExternalId, String> {
    match value {
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            ExternalId::parse(&n.to_string()).map_err(|e| format!("'{what}' {e}"))
        }
        Value::String(_) => id_value(value, what, ExternalId::parse),
        _ => Err(format!("'{what}' must be a string or a whole number")),
    }
}

/// A required external id key of an element object ([`external_id_value`]).
pub fn required_external_id(obj: &Map<String, Value>, key: &str) -> Result<ExternalId, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(format!("'{key}' is required")),
        Some(v) => external_id_value(v, key),
    }
}

/// An optional external id key of an element object ([`external_id_value`]).
pub fn optional_external_id(
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<ExternalId>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => external_id_value(v, key).map(Some),
    }
}

/// A required identifier key of an element object.
pub fn required_id<T>(
    obj: &Map<String, Value>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, IdError>,
) -> Result<T, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(format!("'{key}' is required")),
        Some(v) => id_value(v, key, parse),
    }
}

/// An optional identifier key of an element object.
pub fn optional_id<T>(
    obj: &Map<String, Value>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, IdError>,
) -> Result<Option<T>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => id_value(v, key, parse).map(Some),
    }
}

/// A user alias object `{"alias_name", "alias_label"}` named `what` in messages.
pub fn alias_value(value: &Value, what: &str) -> Result<UserAlias, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("'{what}' must be an object with 'alias_name' and 'alias_label'"))?;
    let name =
        required_id(obj, "alias_name", AliasName::parse).map_err(|e| format!("'{what}': {e}"))?;
    let label =
        required_id(obj, "alias_label", AliasLabel::parse).map_err(|e| format!("'{what}': {e}"))?;
    Ok(UserAlias { label, name })
}

/// The optional `prioritization` list of an email / phone element. At most one of
/// `identified` / `unidentified` makes sense (braze-api.md §4.1).
pub fn prioritization(obj: &Map<String, Value>) -> Result<Vec<Prioritization>, String> {
    let items = match obj.get("prioritization") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err("'prioritization' must be an array of strings".to_owned()),
    };
    let rules = items
        .iter()
        .map(|v| {
            v.as_str().and_then(Prioritization::parse).ok_or_else(|| {
                format!(
                    "'prioritization' has an invalid value {v} (allowed: identified, unidentified, most_recently_updated, least_recently_updated)"
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if rules.contains(&Prioritization::Identified) && rules.contains(&Prioritization::Unidentified)
    {
        return Err(
            "'prioritization' may hold only one of 'identified' and 'unidentified'".to_owned(),
        );
    }
    Ok(rules)
}

/// A batch array that must be present and hold at most [`MAX_BATCH`] elements.
pub fn required_batch<'a>(
    body: &'a Map<String, Value>,
    field: &str,
) -> Result<&'a [Value], ApiError> {
    let items = opt_array(body, field)?
        .ok_or_else(|| ApiError::bad_request(format!("'{field}' is required")))?;
    if items.len() > MAX_BATCH {
        return Err(ApiError::bad_request("Max Input Length Exceeded"));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tideway_core::ids::ExternalId;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn top_level_type_errors_name_the_field() {
        let b = body(json!({"external_ids": "x", "device_id": 3, "braze_id": "nope"}));
        assert_eq!(
            opt_array(&b, "external_ids"),
            Err(ApiError::bad_request("'external_ids' must be an array"))
        );
        assert_eq!(
            opt_string(&b, "device_id").err(),
            Some(ApiError::bad_request("'device_id' must be a string"))
        );
        assert!(opt_array(&b, "missing").unwrap().is_none());
        let err = opt_id(&b, "braze_id", tideway_core::ids::BrazeId::parse).err();
        assert_eq!(
            err,
            Some(ApiError::bad_request(
                "'braze_id' must be 24 lowercase hexadecimal characters"
            ))
        );
    }

    #[test]
    fn element_errors_name_the_key() {
        let obj = body(json!({"external_id": "", "alias": {"alias_name": "n"}}));
        assert_eq!(
            required_id(&obj, "external_id", ExternalId::parse),
            Err("'external_id' must be a non-empty string".into())
        );
        assert_eq!(
            required_id(&obj, "other", ExternalId::parse),
            Err("'other' is required".into())
        );
        assert_eq!(
            alias_value(&obj["alias"], "user_alias"),
            Err("'user_alias': 'alias_label' is required".into())
        );
    }

    #[test]
    fn prioritization_rules() {
        assert_eq!(
            prioritization(&body(
                json!({"prioritization": ["identified", "most_recently_updated"]})
            ))
            .map(|r| r.len()),
            Ok(2)
        );
        assert!(
            prioritization(&body(
                json!({"prioritization": ["identified", "unidentified"]})
            ))
            .is_err()
        );
        assert!(prioritization(&body(json!({"prioritization": ["sometimes"]}))).is_err());
        assert_eq!(prioritization(&body(json!({}))), Ok(vec![]));
    }

    #[test]
    fn batches_are_required_and_capped() {
        let many: Vec<Value> = (0..51).map(|i| json!(i)).collect();
        assert_eq!(
            required_batch(&body(json!({"a": many})), "a"),
            Err(ApiError::bad_request("Max Input Length Exceeded"))
        );
        assert_eq!(
            required_batch(&body(json!({})), "a"),
            Err(ApiError::bad_request("'a' is required"))
        );
    }
}
