//! The stored form of a [`Profile`]: one compact JSON document per user.
//!
//! Core's domain types deliberately have no `Serialize`; this module is the one place that
//! knows the storage layout, so changing it means changing only here (plus a migration).
//! Layout: `{"s": {standard by name}, "c": {custom}, "e": {name: [first_ms, last_ms, count]},
//! "p": {product: [first_ms, last_ms, count]}, "r": total_revenue}`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{Value, json};
use tideway_core::clock::Millis;
use tideway_core::profile::{Occurrences, Profile, StandardField};
use tideway_core::store::StoreError;

/// Writes the document directly (no intermediate `Value` tree: this runs once per saved user
/// on the ingest path).
pub fn encode(profile: &Profile) -> String {
    let mut out = String::with_capacity(256);
    out.push('{');
    let mut first_section = true;
    let mut section = |out: &mut String, key: &str| {
        if !first_section {
            out.push(',');
        }
        first_section = false;
        out.push('"');
        out.push_str(key);
        out.push_str("\":");
    };
    if !profile.standard.is_empty() {
        section(&mut out, "s");
        out.push('{');
        for (i, (field, value)) in profile.standard.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(field.as_str());
            out.push_str("\":");
            out.push_str(&value.to_string());
        }
        out.push('}');
    }
    if !profile.custom.is_empty() {
        section(&mut out, "c");
        out.push_str(&serde_json::to_string(&profile.custom).unwrap_or_else(|_| "{}".to_owned()));
    }
    for (key, occurrences) in [("e", &profile.events), ("p", &profile.purchases)] {
        if occurrences.is_empty() {
            continue;
        }
        section(&mut out, key);
        out.push('{');
        for (i, (name, o)) in occurrences.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(name).unwrap_or_else(|_| "\"\"".to_owned()));
            let _ = write!(out, ":[{},{},{}]", o.first.0, o.last.0, o.count);
        }
        out.push('}');
    }
    if profile.total_revenue != 0.0 {
        section(&mut out, "r");
        out.push_str(&json!(profile.total_revenue).to_string());
    }
    out.push('}');
    out
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
    use super::*;

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
