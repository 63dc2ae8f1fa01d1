//! The stored form of a [`Profile`]: one compact JSON document per user.
//!
//! Core's domain types deliberately have no `Serialize`; this module is the one place that
//! knows the storage layout, so changing it means changing only here (plus a migration).
//! Layout: `{"s": {standard by name}, "c": {custom}, "e": {name: [first_ms, last_ms, count]},
//! "p": {product: [first_ms, last_ms, count]}, "r": total_revenue}`.

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::Value;
use tideway_core::clock::Millis;
use tideway_core::profile::{Occurrences, Profile, StandardField};
use tideway_core::store::StoreError;

/// Writes the document directly into one buffer (no intermediate `Value` tree, no string per
/// value: this runs once per saved user on the ingest path).
pub fn encode(profile: &Profile) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(512);
    out.push(b'{');
    let mut first_section = true;
    let mut section = |out: &mut Vec<u8>, key: &[u8]| {
        if !first_section {
            out.push(b',');
        }
        first_section = false;
        out.push(b'"');
        out.extend_from_slice(key);
        out.extend_from_slice(b"\":");
    };
    if !profile.standard.is_empty() {
        section(&mut out, b"s");
        out.push(b'{');
        for (i, (field, value)) in profile.standard.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(field.as_str().as_bytes());
            out.extend_from_slice(b"\":");
            json(&mut out, value);
        }
        out.push(b'}');
    }
    if !profile.custom.is_empty() {
        section(&mut out, b"c");
        json(&mut out, &profile.custom);
    }
    for (key, occurrences) in [(b"e", &profile.events), (b"p", &profile.purchases)] {
        if occurrences.is_empty() {
            continue;
        }
        section(&mut out, key);
        out.push(b'{');
        for (i, (name, o)) in occurrences.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json(&mut out, name);
            let _ = write!(out, ":[{},{},{}]", o.first.0, o.last.0, o.count);
        }
        out.push(b'}');
    }
    if profile.total_revenue != 0.0 {
        section(&mut out, b"r");
        json(&mut out, &profile.total_revenue);
    }
    out.push(b'}');
    // Only JSON text (valid UTF-8) was written.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `value` as JSON. Writing into a Vec cannot fail, and serde_json errors otherwise
/// only for non-string map keys, which the document's types do not have.
fn json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

pub fn decode(text: &str) -> Result<Profile, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("profile document: {what}"));
    let doc: Value = serde_json::from_str(text).map_err(|e| corrupt(&e.to_string()))?;
    let mut profile = Profile::default();
    if let Some(s) = doc.get("s").and_then(Value::as_object) {
        for (name, v) in s {
            let field =
                StandardField::parse(name).ok_or_else(|| corrupt("unknown standard field"))?;
            profile.standard.insert(field, v.clone());
        }
    }
    if let Some(c) = doc.get("c").and_then(Value::as_object) {
        profile.custom = c.clone();
    }
    let occ = |v: Option<&Value>| -> Result<BTreeMap<String, Occurrences>, StoreError> {
        let mut out = BTreeMap::new();
        for (k, triple) in v.and_then(Value::as_object).into_iter().flatten() {
            let t = triple
                .as_array()
                .filter(|a| a.len() == 3)
                .ok_or_else(|| corrupt("occurrence triple"))?;
            let n = |i: usize| t[i].as_i64().ok_or_else(|| corrupt("occurrence number"));
            out.insert(
                k.clone(),
                Occurrences {
                    first: Millis(n(0)?),
                    last: Millis(n(1)?),
                    count: n(2)?.try_into().unwrap_or(0),
                },
            );
        }
        Ok(out)
    };
    profile.events = occ(doc.get("e"))?;
    profile.purchases = occ(doc.get("p"))?;
    profile.total_revenue = doc.get("r").and_then(Value::as_f64).unwrap_or(0.0);
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn writes_the_documented_layout_and_escapes() {
        let mut p = Profile::default();
        p.standard
            .insert(StandardField::FirstName, json!("J\"o\\ é\n"));
        p.custom
            .insert("a \"b\"".into(), json!({"x": [1, 2.5, null, "s"]}));
        p.events
            .insert("ev\"1".into(), Occurrences::once(Millis(7)));
        p.total_revenue = 0.1 + 0.2;
        let text = encode(&p);
        assert_eq!(
            text,
            r#"{"s":{"first_name":"J\"o\\ é\n"},"c":{"a \"b\"":{"x":[1,2.5,null,"s"]}},"e":{"ev\"1":[7,7,1]},"r":0.30000000000000004}"#
        );
        assert_eq!(decode(&text).unwrap(), p);
    }

    #[test]
    fn round_trips() {
        let mut p = Profile::default();
        p.standard.insert(StandardField::FirstName, json!("Jo"));
        p.custom.insert("plan".into(), json!("pro"));
        p.events.insert(
            "e".into(),
            Occurrences {
                first: Millis(1),
                last: Millis(5),
                count: 3,
            },
        );
        p.purchases
            .insert("sku".into(), Occurrences::once(Millis(9)));
        p.total_revenue = 12.5;
        assert_eq!(decode(&encode(&p)).unwrap(), p);
        assert_eq!(
            decode(&encode(&Profile::default())).unwrap(),
            Profile::default()
        );
    }
}
