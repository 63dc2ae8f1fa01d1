//! Every event type Tideway emits has exactly the fields and types of its type in
//! `reference/currents-events.md`: the compiled-in catalogue is checked against the shared
//! reference (when the checkout has it), and events built by every constructor in
//! `tideway_core::currents` and `tideway_core::message_events` (all optional inputs present,
//! and all absent; messaging events for a campaign, a Canvas and an ad-hoc send) are checked
//! field by field against the catalogue. The messaging types' reference fields that are never
//! written must be exactly the ones `message_events` documents, so a field is left out on
//! purpose, not forgotten.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventType, EventUser};
use tideway_core::ids::{BrazeId, DeviceId, EventId, ExternalId};
use tideway_core::message_events::{
    EmailDeliveryInfo, MessageSource, Origin, Progression, UserAgentInfo, WebhookFailure,
};
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
    let mut events = vec![
        CurrentsEvent::custom_event(id(), at, &user, "ag", app, "opened", &props),
        CurrentsEvent::purchase(id(), at, &user, "ag", app, "sku", "USD", 9.99, &props),
        CurrentsEvent::profile_update(id(), at, &user, "ag", "rest_api", standard, &props),
        CurrentsEvent::delete_request(id(), at, &braze, "ag"),
        CurrentsEvent::orphan(id(), at, &user, "ag", &BrazeId::from_bytes([8; 12])),
    ];
    for origin in origins(full) {
        events.extend(messaging_events(&user, &source(origin, full), full));
    }
    let covered: Vec<EventType> = events.iter().map(|e| e.event_type).collect();
    for t in EventType::ALL {
        assert!(
            covered.contains(&t),
            "{t:?} is emitted but has no case in this test"
        );
    }
    events
}

/// A campaign, a Canvas and an ad-hoc origin, with or without their optional members.
fn origins(full: bool) -> [Origin<'static>; 3] {
    let opt = |s: &'static str| full.then_some(s);
    [
        Origin::Campaign {
            campaign_id: "cmp",
            campaign_name: opt("Spring"),
            message_variation_id: opt("var"),
            message_variation_name: opt("Variant 1"),
        },
        Origin::Canvas {
            canvas_id: "cnv",
            canvas_name: opt("Onboarding"),
            canvas_variation_id: opt("cvar"),
            canvas_variation_name: opt("Path A"),
            canvas_step_id: opt("step"),
            canvas_step_name: opt("Welcome"),
            canvas_step_message_variation_id: opt("smv"),
        },
        Origin::AdHoc,
    ]
}

fn source(origin: Origin<'static>, full: bool) -> MessageSource<'static> {
    MessageSource {
        app_group_id: "ag",
        app_id: full.then_some("app-1"),
        origin,
        dispatch_id: full.then_some("dsp"),
        send_id: full.then_some("snd"),
    }
}

/// Every messaging constructor once (the campaign- and Canvas-only ones for their origin).
fn messaging_events(
    user: &EventUser<'_>,
    source: &MessageSource<'_>,
    full: bool,
) -> Vec<CurrentsEvent> {
    let at = Millis(1_700_000_000_123);
    let id = || EventId(uuid::Uuid::new_v4().to_string());
    let opt = |s: &'static str| full.then_some(s);
    let agent = UserAgentInfo {
        device_class: full.then(|| "mobile".into()),
        device_os: full.then(|| "iOS".into()),
        device_model: full.then(|| "iPhone".into()),
        browser: full.then(|| "Safari".into()),
        mailbox_provider: full.then(|| "Apple".into()),
        machine: full,
    };
    let delivery = EmailDeliveryInfo {
        esp: opt("tideway"),
        from_domain: opt("example.com"),
        sending_ip: opt("192.0.2.1"),
    };
    let failure = WebhookFailure {
        http_status_code: full.then_some(500),
        endpoint_url: full.then(|| "https://h.example/p".into()),
        host: opt("h.example"),
        url_path: opt("/p"),
        raw_response: opt("oops"),
        content_length: full.then_some(4),
        webhook_duration_ms: full.then_some(12),
        retry_count: 1,
        is_terminal: full,
        failure_source: "External Endpoint",
    };
    let (u, s, a) = (user, source, "a@example.com");
    let mut out = vec![
        CurrentsEvent::email_send(id(), at, u, s, a, opt("{}")),
        CurrentsEvent::email_delivery(id(), at, u, s, a, &delivery),
        CurrentsEvent::email_bounce(id(), at, u, s, a, "550 unknown user", full),
        CurrentsEvent::email_soft_bounce(id(), at, u, s, a, "421 later"),
        CurrentsEvent::email_deferral(id(), at, u, s, a, 2, "421 later", opt("example.com")),
        CurrentsEvent::email_abort(id(), at, u, s, a, "missing_email", opt("none")),
        CurrentsEvent::email_open(id(), at, u, s, a, opt("Mozilla/5.0"), &agent),
        CurrentsEvent::email_click(
            id(),
            at,
            u,
            s,
            a,
            "https://x.example/",
            "0",
            opt("Mozilla/5.0"),
            &agent,
        ),
        CurrentsEvent::email_unsubscribe(id(), at, u, s, a),
        CurrentsEvent::subscription_global_state_change(id(), at, u, s, a, "unsubscribed"),
        CurrentsEvent::subscription_group_state_change(id(), at, u, s, "sg-1", "subscribed"),
        CurrentsEvent::webhook_send(id(), at, u, s, opt("{}")),
        CurrentsEvent::webhook_failure(id(), at, u, s, &failure),
        CurrentsEvent::webhook_retry(id(), at, u, s, "http_status", "500"),
        CurrentsEvent::webhook_abort(id(), at, u, s, "blocked_webhook_url", opt("private")),
    ];
    match source.origin {
        Origin::Campaign { .. } => {
            out.push(CurrentsEvent::campaign_enroll_in_control(id(), at, u, s));
            out.push(CurrentsEvent::campaign_conversion(id(), at, u, s, 0, "{}"));
        }
        Origin::Canvas { .. } => {
            out.push(CurrentsEvent::canvas_conversion(id(), at, u, s, 1, "{}"));
            out.push(CurrentsEvent::canvas_entry(id(), at, u, s, full));
            for (progression_type, next, reason) in [
                ("advance", opt("step-2"), None),
                ("exit", None, opt("end_of_path")),
            ] {
                let p = Progression {
                    canvas_entry_id: "entry",
                    progression_type,
                    next_step_id: next,
                    exit_reason: reason,
                    is_canvas_entry: full,
                };
                out.push(CurrentsEvent::canvas_progression(id(), at, u, s, &p));
            }
            out.push(CurrentsEvent::canvas_exit(id(), at, u, s, true));
            out.push(CurrentsEvent::canvas_exit(id(), at, u, s, false));
            out.push(CurrentsEvent::canvas_split_entry(
                id(),
                at,
                u,
                s,
                "split",
                "Path A",
                full,
            ));
        }
        Origin::AdHoc => {}
    }
    out
}

/// The reference fields of each messaging type that `tideway_core::message_events` never
/// writes (its module doc says why).
const NEVER_WRITTEN: &[(&str, &[&str])] = &[
    ("users.messages.email.Send", &["ip_pool"]),
    ("users.messages.email.Delivery", &["ip_pool"]),
    (
        "users.messages.email.Bounce",
        &["esp", "from_domain", "ip_pool", "sending_ip"],
    ),
    (
        "users.messages.email.SoftBounce",
        &["esp", "from_domain", "ip_pool", "sending_ip"],
    ),
    (
        "users.messages.email.Deferral",
        &["esp", "from_domain", "ip_pool", "sending_ip"],
    ),
    ("users.messages.email.Abort", &["ip_pool"]),
    (
        "users.messages.email.Open",
        &["esp", "from_domain", "ip_pool"],
    ),
    (
        "users.messages.email.Click",
        &["esp", "from_domain", "ip_pool", "link_alias"],
    ),
    ("users.messages.email.Unsubscribe", &["ip_pool"]),
    (
        "users.behaviors.subscription.GlobalStateChange",
        &["state_change_source"],
    ),
    (
        "users.behaviors.subscriptiongroup.StateChange",
        &[
            "channel",
            "channel_identifier",
            "dispatch_id",
            "email_address",
            "phone_number",
            "state_change_source",
        ],
    ),
    ("users.messages.webhook.Send", &[]),
    ("users.messages.webhook.Failure", &[]),
    ("users.messages.webhook.Retry", &[]),
    ("users.messages.webhook.Abort", &[]),
    ("users.campaigns.EnrollInControl", &[]),
    ("users.campaigns.Conversion", &[]),
    ("users.canvas.Conversion", &[]),
    ("users.canvas.Entry", &[]),
    ("users.canvas.exit.MatchedAudience", &[]),
    ("users.canvas.exit.PerformedEvent", &[]),
    ("users.canvas.experimentstep.SplitEntry", &[]),
    ("users.canvasstep.Progression", &[]),
];

#[test]
fn messaging_types_leave_out_only_the_documented_reference_fields() {
    let braze = BrazeId::from_bytes([7; 12]);
    let ext = ExternalId::parse("u-1").unwrap();
    let dev = DeviceId::parse("d-1").unwrap();
    let user = EventUser {
        braze_id: &braze,
        external_id: Some(&ext),
        device_id: Some(&dev),
        time_zone: Some("Europe/Paris"),
    };
    // Every key each type wrote, over all origins, all inputs present.
    let mut written: BTreeMap<&str, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for origin in origins(true) {
        for e in messaging_events(&user, &source(origin, true), true) {
            let body = e.body_value();
            let entry = written.entry(e.event_type.as_str()).or_default();
            entry
                .0
                .extend(body["user"].as_object().unwrap().keys().cloned());
            entry
                .1
                .extend(body["properties"].as_object().unwrap().keys().cloned());
        }
    }
    assert_eq!(
        written.keys().copied().collect::<BTreeSet<_>>(),
        NEVER_WRITTEN
            .iter()
            .map(|(t, _)| *t)
            .collect::<BTreeSet<_>>(),
        "a messaging type without a row here, or a row without its constructor"
    );
    for (name, never) in NEVER_WRITTEN {
        let info = catalogue::find(name).unwrap_or_else(|| panic!("{name} not in the reference"));
        let (user_keys, prop_keys) = &written[name];
        let names = |fields: &[Field]| -> BTreeSet<String> {
            fields.iter().map(|f| f.name.clone()).collect()
        };
        assert_eq!(user_keys, &names(&info.user), "{name}: user");
        let missing: BTreeSet<String> = names(&info.properties)
            .difference(prop_keys)
            .cloned()
            .collect();
        let documented: BTreeSet<String> = never.iter().map(|s| s.to_string()).collect();
        assert_eq!(missing, documented, "{name}: properties never written");
    }
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
