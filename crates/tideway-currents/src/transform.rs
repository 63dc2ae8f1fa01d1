//! Per-Current field transformations, applied to each event just before it is sent:
//! **remove** replaces a field's value with `"[REDACTED]"`, **hash** with the lowercase hex
//! SHA-256 of its text (a string's own bytes, any other value's JSON text).
//!
//! A plain field name (`email_address`) applies to that key of `user` and of `properties` in
//! every event type that has it; a dotted path (`properties.custom_properties.email`) names
//! one nested field. Absent fields are left alone; `null` stays `null`. The envelope fields
//! (`event_type`, `id`, `time`) cannot be transformed (receivers need them).

use serde_json::Value;
use sha2::{Digest, Sha256};
use tideway_core::currents_store::{FieldAction, Transformation};

pub const REDACTED: &str = "[REDACTED]";

/// Fields no transformation may touch.
pub const ENVELOPE: [&str; 3] = ["event_type", "id", "time"];

fn apply_value(value: &mut Value, action: FieldAction) {
    if value.is_null() {
        return;
    }
    *value = match action {
        FieldAction::Remove => Value::String(REDACTED.to_owned()),
        FieldAction::Hash => {
            let text = match value {
                Value::String(s) => std::mem::take(s),
                ref other => other.to_string(),
            };
            Value::String(hex::encode(Sha256::digest(text.as_bytes())))
        }
    };
}

fn at_path<'a>(root: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    let mut cur = root;
    for part in path.split('.') {
        cur = cur.as_object_mut()?.get_mut(part)?;
    }
    Some(cur)
}

/// Applies every transformation to one event (the wire object).
pub fn apply(event: &mut Value, transformations: &[Transformation]) {
    for t in transformations {
        if t.field.contains('.') {
            if let Some(v) = at_path(event, &t.field) {
                apply_value(v, t.action);
            }
        } else {
            for part in ["user", "properties"] {
                if let Some(v) = event.get_mut(part).and_then(|p| p.get_mut(&t.field)) {
                    apply_value(v, t.action);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(field: &str, action: FieldAction) -> Transformation {
        Transformation {
            field: field.into(),
            action,
        }
    }

    #[test]
    fn remove_and_hash_in_user_properties_and_nested_paths() {
        let mut e = json!({"event_type":"x","id":"1","time":1,
            "user":{"external_user_id":"u-42","timezone":null},
            "properties":{"email_address":"a@b.c","price":9.5,"custom_properties":{"email":"x@y.z"}}});
        apply(
            &mut e,
            &[
                t("email_address", FieldAction::Remove),
                t("external_user_id", FieldAction::Hash),
                t("timezone", FieldAction::Remove),
                t("price", FieldAction::Hash),
                t("properties.custom_properties.email", FieldAction::Hash),
                t("missing", FieldAction::Remove),
            ],
        );
        assert_eq!(e["properties"]["email_address"], REDACTED);
        assert_eq!(
            e["user"]["external_user_id"],
            hex::encode(Sha256::digest(b"u-42"))
        );
        assert_eq!(e["user"]["timezone"], Value::Null);
        assert_eq!(
            e["properties"]["price"],
            hex::encode(Sha256::digest(b"9.5"))
        );
        assert_eq!(
            e["properties"]["custom_properties"]["email"],
            hex::encode(Sha256::digest(b"x@y.z"))
        );
        assert_eq!(e["id"], "1");
        assert_eq!(
            hex::encode(Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
