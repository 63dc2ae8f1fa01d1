//! The stored form of a [`Profile`]: one compact JSON document per user.
//!
//! Core's domain types deliberately have no `Serialize`; this module is the one place that
//! knows the storage layout, so changing it means changing only here (plus a migration).
//! Layout: `{"s": {standard by name}, "c": {custom}, "e": {name: [first_ms, last_ms, count]},
//! "p": {product: [first_ms, last_ms, count]}, "r": total_revenue}`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use tideway_core::clock::Millis;
use tideway_core::profile::{Occurrences, Profile, StandardField};
use tideway_core::store::StoreError;

pub fn encode(profile: &Profile) -> String {
    let standard: Map<String, Value> = profile
        .standard
        .iter()
        .map(|(f, v)| (f.as_str().to_owned(), v.clone()))
        .collect();
    let occ = |m: &BTreeMap<String, Occurrences>| -> Map<String, Value> {
        m.iter()
            .map(|(k, o)| (k.clone(), json!([o.first.0, o.last.0, o.count])))
            .collect()
    };
    let mut doc = Map::new();
    if !standard.is_empty() {
        doc.insert("s".into(), Value::Object(standard));
    }
    if !profile.custom.is_empty() {
        doc.insert("c".into(), Value::Object(profile.custom.clone()));
    }
    if !profile.events.is_empty() {
        doc.insert("e".into(), Value::Object(occ(&profile.events)));
    }
    if !profile.purchases.is_empty() {
        doc.insert("p".into(), Value::Object(occ(&profile.purchases)));
    }
    if profile.total_revenue != 0.0 {
        doc.insert("r".into(), json!(profile.total_revenue));
    }
    Value::Object(doc).to_string()
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
