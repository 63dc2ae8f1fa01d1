//! Every event type Tideway emits has exactly the fields and types of its type in
//! `reference/currents-events.md`: the compiled-in catalogue is checked against the shared
//! reference (when the checkout has it), and events built by every constructor in
//! `tideway_core::currents` (all optional inputs present, and all absent) are checked field
//! by field against the catalogue.

use serde_json::{Map, Value, json};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventType, EventUser};
use tideway_core::ids::{BrazeId, DeviceId, EventId, ExternalId};
use tideway_currents::catalogue::{self, Field};

fn check(part: &str, obj: &Map<String, Value>, fields: &[Field], event_type: &str) {
    for (k, v) in obj {
        let f = fields
            .iter()
            .find(|f| f.name == *k)
            .unwrap_or_else(|| panic!("{event_type}: {part}.{k} is not in the reference"));
        assert!(
            v.is_null() && f.optional || f.ty.accepts(v),
            "{event_type}: {part}.{k} = {v} is not {:?}",
            f.ty
        );
    }
    for f in fields.iter().filter(|f| !f.optional) {
        assert!(
            obj.contains_key(&f.name),
            "{event_type}: required {part}.{} missing",
            f.name
        );
    }
}

fn every_emitted_event(full: bool) -> Vec<CurrentsEvent> {
    let braze = BrazeId::from_bytes([7; 12]);
    let ext = ExternalId::parse("u-1").unwrap();
    let dev = DeviceId::parse("d-1").unwrap();
    let user = if full {
        EventUser {
            braze_id: &braze,
            external_id: Some(&ext),
            device_id: Some(&dev),
            time_zone: Some("Europe/Paris"),
        }
    } else {
        EventUser {
            braze_id: &braze,
            external_id: None,
            device_id: None,
            time_zone: None,
        }
    };
    let at = Millis(1_700_000_000_123);
    let id = || EventId(uuid::Uuid::new_v4().to_string());
    let props: Map<String, Value> = if full {
        json!({"plan": "pro", "seats": 3, "tags": ["a"], "ok": true})
            .as_object()
            .unwrap()
            .clone()
    } else {
        Map::new()
    };
    let app = full.then_some("app-1");
    let mut standard = Map::new();
    if full {
        for (k, v) in [
            ("first_name", "Ada"),
            ("last_name", "L"),
            ("email_address", "a@b.c"),
            ("phone_number", "+1"),
            ("home_city", "P"),
            ("country", "FR"),
            ("language", "fr"),
            ("gender", "F"),
            ("dob", "1990-01-01"),
        ] {
            standard.insert(k.into(), json!(v));
        }
    }
    let events = vec![
        CurrentsEvent::custom_event(id(), at, &user, "ag", app, "opened", &props),
        CurrentsEvent::purchase(id(), at, &user, "ag", app, "sku", "USD", 9.99, &props),
        CurrentsEvent::profile_update(id(), at, &user, "ag", "rest_api", standard, &props),
        CurrentsEvent::delete_request(id(), at, &braze, "ag"),
        CurrentsEvent::orphan(id(), at, &user, "ag", &BrazeId::from_bytes([8; 12])),
    ];
    let covered: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    for t in EventType::ALL {
        assert!(
            covered.contains(&t),
            "{t:?} is emitted but has no case in this test"
        );
    }
    events
}

#[test]
fn every_emitted_event_type_matches_the_reference_field_lists() {
    for full in [true, false] {
        for e in every_emitted_event(full) {
            let name = e.event_type.as_str();
            let info =
                catalogue::find(name).unwrap_or_else(|| panic!("{name} is not in the reference"));
            let value = e.body_value();
            let body = value.as_object().unwrap();
            let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                ["event_type", "id", "properties", "time", "user"],
                "{name}: envelope"
            );
            assert_eq!(body["event_type"], name);
            assert!(body["time"].is_i64() && body["id"].is_string());
            check("user", body["user"].as_object().unwrap(), &info.user, name);
            check(
                "properties",
                body["properties"].as_object().unwrap(),
                &info.properties,
                name,
            );
        }
    }
}

#[test]
fn the_compiled_in_catalogue_is_the_shared_reference() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/currents-events.md");
    let Ok(text) = std::fs::read_to_string(&path) else {
        // A checkout without shared/: the embedded copy is all there is (and is checked by
        // the catalogue's unit tests).
        return;
    };
    let shared = catalogue::parse(&text).unwrap();
    assert_eq!(
        shared,
        catalogue::all(),
        "reference/currents-events.md changed: copy it to crates/tideway-currents/data/currents-events.md"
    );
}
