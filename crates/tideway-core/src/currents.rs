//! The Currents event model: what every state change emits into the event log.
//!
//! Shapes follow `reference/currents-events.md` exactly: each event type has its own set of
//! `user` keys, so events are built through one constructor per type rather than by filling a
//! generic struct. Optional fields are omitted when unknown (receivers accept absent or null).
//! The JSON produced here is what the exporter sends, byte for byte, so it is built once, at the
//! moment of the change, and stored in the log.
//!
//! Building an event is on the hot path of `/users/track` (one per tracked object, on the single
//! writer thread), so the constructors write the JSON text straight into one buffer: no
//! intermediate `Value` tree, no copy of the caller's property maps. Keys come out in the order
//! listed in each constructor, strings are escaped and numbers formatted by `serde_json` itself,
//! so the text is exactly what `serde_json` would print for the equivalent `Value` (the tests
//! check that against the `json!`-built object).

use serde_json::{Map, Value};

use crate::clock::Millis;
use crate::ids::{BrazeId, DeviceId, EventId, ExternalId};

/// The Currents event types Tideway emits today. The messaging ones are built in
/// [`crate::message_events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    CustomEvent,
    Purchase,
    ProfileUpdate,
    UserDeleteRequest,
    UserOrphan,
    CampaignConversion,
    CampaignEnrollInControl,
    CanvasConversion,
    CanvasEntry,
    CanvasExitMatchedAudience,
    CanvasExitPerformedEvent,
    CanvasExperimentSplitEntry,
    CanvasStepProgression,
    EmailAbort,
    EmailBounce,
    EmailClick,
    EmailDeferral,
    EmailDelivery,
    EmailOpen,
    EmailSend,
    EmailSoftBounce,
    EmailUnsubscribe,
    WebhookAbort,
    WebhookFailure,
    WebhookRetry,
    WebhookSend,
    SubscriptionGlobalStateChange,
    SubscriptionGroupStateChange,
}

/// The three categories a Current can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventCategory {
    MessageEngagement,
    CustomerBehavior,
    User,
}

impl EventType {
    pub const ALL: [EventType; 28] = [
        EventType::CustomEvent,
        EventType::Purchase,
        EventType::ProfileUpdate,
        EventType::UserDeleteRequest,
        EventType::UserOrphan,
        EventType::CampaignConversion,
        EventType::CampaignEnrollInControl,
        EventType::CanvasConversion,
        EventType::CanvasEntry,
        EventType::CanvasExitMatchedAudience,
        EventType::CanvasExitPerformedEvent,
        EventType::CanvasExperimentSplitEntry,
        EventType::CanvasStepProgression,
        EventType::EmailAbort,
        EventType::EmailBounce,
        EventType::EmailClick,
        EventType::EmailDeferral,
        EventType::EmailDelivery,
        EventType::EmailOpen,
        EventType::EmailSend,
        EventType::EmailSoftBounce,
        EventType::EmailUnsubscribe,
        EventType::WebhookAbort,
        EventType::WebhookFailure,
        EventType::WebhookRetry,
        EventType::WebhookSend,
        EventType::SubscriptionGlobalStateChange,
        EventType::SubscriptionGroupStateChange,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CustomEvent => "users.behaviors.CustomEvent",
            EventType::Purchase => "users.behaviors.Purchase",
            EventType::ProfileUpdate => "users.profile.Update",
            EventType::UserDeleteRequest => "users.UserDeleteRequest",
            EventType::UserOrphan => "users.UserOrphan",
            EventType::CampaignConversion => "users.campaigns.Conversion",
            EventType::CampaignEnrollInControl => "users.campaigns.EnrollInControl",
            EventType::CanvasConversion => "users.canvas.Conversion",
            EventType::CanvasEntry => "users.canvas.Entry",
            EventType::CanvasExitMatchedAudience => "users.canvas.exit.MatchedAudience",
            EventType::CanvasExitPerformedEvent => "users.canvas.exit.PerformedEvent",
            EventType::CanvasExperimentSplitEntry => "users.canvas.experimentstep.SplitEntry",
            EventType::CanvasStepProgression => "users.canvasstep.Progression",
            EventType::EmailAbort => "users.messages.email.Abort",
            EventType::EmailBounce => "users.messages.email.Bounce",
            EventType::EmailClick => "users.messages.email.Click",
            EventType::EmailDeferral => "users.messages.email.Deferral",
            EventType::EmailDelivery => "users.messages.email.Delivery",
            EventType::EmailOpen => "users.messages.email.Open",
            EventType::EmailSend => "users.messages.email.Send",
            EventType::EmailSoftBounce => "users.messages.email.SoftBounce",
            EventType::EmailUnsubscribe => "users.messages.email.Unsubscribe",
            EventType::WebhookAbort => "users.messages.webhook.Abort",
            EventType::WebhookFailure => "users.messages.webhook.Failure",
            EventType::WebhookRetry => "users.messages.webhook.Retry",
            EventType::WebhookSend => "users.messages.webhook.Send",
            EventType::SubscriptionGlobalStateChange => {
                "users.behaviors.subscription.GlobalStateChange"
            }
            EventType::SubscriptionGroupStateChange => {
                "users.behaviors.subscriptiongroup.StateChange"
            }
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == raw)
    }

    /// The section of `reference/currents-events.md` the type is listed under.
    /// `GlobalStateChange` is listed under customer behaviour though Braze's glossary still
    /// files it under message engagement; a Current selecting either gets it (that rule lives
    /// in `tideway_currents::catalogue`).
    pub fn category(self) -> EventCategory {
        match self {
            EventType::CustomEvent
            | EventType::Purchase
            | EventType::SubscriptionGlobalStateChange
            | EventType::SubscriptionGroupStateChange => EventCategory::CustomerBehavior,
            EventType::ProfileUpdate | EventType::UserDeleteRequest | EventType::UserOrphan => {
                EventCategory::User
            }
            EventType::CampaignConversion
            | EventType::CampaignEnrollInControl
            | EventType::CanvasConversion
            | EventType::CanvasEntry
            | EventType::CanvasExitMatchedAudience
            | EventType::CanvasExitPerformedEvent
            | EventType::CanvasExperimentSplitEntry
            | EventType::CanvasStepProgression
            | EventType::EmailAbort
            | EventType::EmailBounce
            | EventType::EmailClick
            | EventType::EmailDeferral
            | EventType::EmailDelivery
            | EventType::EmailOpen
            | EventType::EmailSend
            | EventType::EmailSoftBounce
            | EventType::EmailUnsubscribe
            | EventType::WebhookAbort
            | EventType::WebhookFailure
            | EventType::WebhookRetry
            | EventType::WebhookSend => EventCategory::MessageEngagement,
        }
    }
}

/// Who an event is about, as the user's identifiers stood when it happened.
#[derive(Debug, Clone)]
pub struct EventUser<'a> {
    pub braze_id: &'a BrazeId,
    pub external_id: Option<&'a ExternalId>,
    pub device_id: Option<&'a DeviceId>,
    pub time_zone: Option<&'a str>,
}

/// One Currents event, ready to log and to send.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentsEvent {
    pub id: EventId,
    pub event_type: EventType,
    /// When it happened, Unix seconds (the wire field `time`).
    pub time: i64,
    /// The wire object as JSON text, built once; what the exporter sends byte for byte:
    /// `{"event_type", "id", "time", "user", "properties"}`, in that order.
    pub body: String,
}

impl CurrentsEvent {
    /// The wire object parsed back into a `Value`, for tests and the few readers that need its
    /// fields (the hot paths store and send [`CurrentsEvent::body`] as it is).
    ///
    /// # Panics
    ///
    /// If `body` is not JSON, which the constructors never produce.
    pub fn body_value(&self) -> Value {
        serde_json::from_str(&self.body).expect("a Currents event body is JSON text")
    }

    /// Writes `{"event_type","id","time","user":{…},"properties":{…}}`: `user` and
    /// `properties` write the members of their objects. Crate-visible so the messaging
    /// constructors in [`crate::message_events`] write the very same envelope.
    pub(crate) fn build(
        id: EventId,
        event_type: EventType,
        time: Millis,
        capacity: usize,
        user: impl FnOnce(&mut JsonObject),
        properties: impl FnOnce(&mut JsonObject),
    ) -> Self {
        let mut out = JsonObject::with_capacity(capacity);
        out.open();
        out.str("event_type", event_type.as_str());
        out.str("id", &id.0);
        out.i64("time", time.secs());
        out.key("user");
        out.open();
        user(&mut out);
        out.close();
        out.key("properties");
        out.open();
        properties(&mut out);
        out.close();
        out.close();
        CurrentsEvent {
            id,
            event_type,
            time: time.secs(),
            body: out.finish(),
        }
    }

    /// `users.behaviors.CustomEvent`
    pub fn custom_event(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        app_group_id: &str,
        app_id: Option<&str>,
        name: &str,
        custom_properties: &Map<String, Value>,
    ) -> Self {
        let capacity = BASE_CAPACITY + map_capacity(custom_properties);
        Self::build(
            id,
            EventType::CustomEvent,
            at,
            capacity,
            |o| user_keys(o, user, true, true, true),
            |o| {
                o.str("app_group_id", app_group_id);
                o.opt_str("app_id", app_id);
                o.str("name", name);
                if !custom_properties.is_empty() {
                    o.map("custom_properties", custom_properties);
                }
            },
        )
    }

    /// `users.behaviors.Purchase` (one per unit: Braze treats quantity N as N purchases).
    #[allow(clippy::too_many_arguments)]
    pub fn purchase(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        app_group_id: &str,
        app_id: Option<&str>,
        product_id: &str,
        currency: &str,
        price: f64,
        purchase_properties: &Map<String, Value>,
    ) -> Self {
        let capacity = BASE_CAPACITY + map_capacity(purchase_properties);
        Self::build(
            id,
            EventType::Purchase,
            at,
            capacity,
            |o| user_keys(o, user, true, true, false),
            |o| {
                o.str("app_group_id", app_group_id);
                o.opt_str("app_id", app_id);
                o.str("currency", currency);
                o.f64("price", price);
                o.str("product_id", product_id);
                if !purchase_properties.is_empty() {
                    o.map("purchase_properties", purchase_properties);
                }
            },
        )
    }

    /// `users.profile.Update`. `standard` holds the changed standard fields under their
    /// Currents names (`first_name`, `email_address`, …); `custom` the changed custom
    /// attributes (null = removed), sent JSON-encoded as `custom_attributes`.
    ///
    /// Properties come out as `app_group_id, time_ms, update_source`, then `standard` in its
    /// order, then `custom_attributes`. A `standard` key equal to one of those names replaces
    /// that property's value where it stands (as inserting it into the object would).
    pub fn profile_update(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        app_group_id: &str,
        update_source: &str,
        standard: Map<String, Value>,
        custom: &Map<String, Value>,
    ) -> Self {
        // `custom_attributes` is a string holding the JSON object, so it is encoded twice.
        let custom_attributes = (!custom.is_empty()).then(|| to_text(custom));
        let capacity = BASE_CAPACITY
            + map_capacity(&standard)
            + custom_attributes
                .as_ref()
                .map_or(0, |c| c.len() + c.len() / 4);
        // Names `standard` may override in place; almost always none of them is there.
        let (over_group, over_time, over_source, over_custom) = if standard.is_empty() {
            (None, None, None, None)
        } else {
            (
                standard.get("app_group_id"),
                standard.get("time_ms"),
                standard.get("update_source"),
                standard.get("custom_attributes"),
            )
        };
        Self::build(
            id,
            EventType::ProfileUpdate,
            at,
            capacity,
            |o| user_keys(o, user, true, false, true),
            |o| {
                match over_group {
                    Some(v) => o.value("app_group_id", v),
                    None => o.str("app_group_id", app_group_id),
                }
                match over_time {
                    Some(v) => o.value("time_ms", v),
                    None => o.i64("time_ms", at.0),
                }
                match over_source {
                    Some(v) => o.value("update_source", v),
                    None => o.str("update_source", update_source),
                }
                for (key, value) in &standard {
                    match key.as_str() {
                        "app_group_id" | "time_ms" | "update_source" => {}
                        "custom_attributes" => match &custom_attributes {
                            Some(text) => o.str(key, text),
                            None => o.value(key, value),
                        },
                        _ => o.value(key, value),
                    }
                }
                if let (Some(text), None) = (&custom_attributes, over_custom) {
                    o.str("custom_attributes", text);
                }
            },
        )
    }

    /// `users.UserDeleteRequest`
    pub fn delete_request(id: EventId, at: Millis, braze_id: &BrazeId, app_group_id: &str) -> Self {
        Self::build(
            id,
            EventType::UserDeleteRequest,
            at,
            BASE_CAPACITY,
            |o| o.str("user_id", braze_id.as_str()),
            |o| o.str("app_group_id", app_group_id),
        )
    }

    /// `users.UserOrphan`: `orphan` was merged into the user `orphaned_by`.
    pub fn orphan(
        id: EventId,
        at: Millis,
        orphan: &EventUser<'_>,
        app_group_id: &str,
        orphaned_by: &BrazeId,
    ) -> Self {
        Self::build(
            id,
            EventType::UserOrphan,
            at,
            BASE_CAPACITY,
            |o| user_keys(o, orphan, true, true, false),
            |o| {
                o.str("app_group_id", app_group_id);
                o.str("orphaned_by_id", orphaned_by.as_str());
            },
        )
    }
}

/// The `user` members: `user_id` always, the others when the type lists them and they are
/// known.
pub(crate) fn user_keys(
    o: &mut JsonObject,
    user: &EventUser<'_>,
    external: bool,
    device: bool,
    timezone: bool,
) {
    o.str("user_id", user.braze_id.as_str());
    if external {
        o.opt_str("external_user_id", user.external_id.map(ExternalId::as_str));
    }
    if device {
        o.opt_str("device_id", user.device_id.map(DeviceId::as_str));
    }
    if timezone {
        o.opt_str("timezone", user.time_zone);
    }
}

/// Room for an event's fixed part (type, id, time, user ids, app group): enough for most
/// events without growing.
pub(crate) const BASE_CAPACITY: usize = 384;

/// A guess at the JSON length of a property map, to size the buffer once.
fn map_capacity(map: &Map<String, Value>) -> usize {
    if map.is_empty() {
        0
    } else {
        32 + map.len() * 32
    }
}

/// `map` as compact JSON text, as `Value::Object(map.clone()).to_string()` prints it.
fn to_text(map: &Map<String, Value>) -> String {
    let mut buf = Vec::with_capacity(16 + map.len() * 24);
    written(serde_json::to_writer(&mut buf, map));
    utf8(buf)
}

/// Writing JSON into memory cannot fail: `Vec<u8>` never refuses bytes, and strings, numbers
/// and `Value`s (whose keys are strings) always serialise.
fn written(result: serde_json::Result<()>) {
    result.expect("serialising JSON into memory cannot fail");
}

fn utf8(buf: Vec<u8>) -> String {
    String::from_utf8(buf).expect("serde_json writes UTF-8")
}

/// A JSON object (or objects nested in it) written member by member into one buffer. Every
/// scalar goes through `serde_json`'s own serialiser, so escaping and number formatting are
/// exactly `serde_json`'s.
pub(crate) struct JsonObject {
    buf: Vec<u8>,
    /// No member written yet in the innermost open object (no comma before the next key).
    first: bool,
}

impl JsonObject {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        JsonObject {
            buf: Vec::with_capacity(capacity),
            first: true,
        }
    }

    pub(crate) fn open(&mut self) {
        self.buf.push(b'{');
        self.first = true;
    }

    pub(crate) fn close(&mut self) {
        self.buf.push(b'}');
        self.first = false;
    }

    /// `"key":`, after a comma unless it is the first member.
    pub(crate) fn key(&mut self, key: &str) {
        if !self.first {
            self.buf.push(b',');
        }
        self.first = false;
        written(serde_json::to_writer(&mut self.buf, key));
        self.buf.push(b':');
    }

    pub(crate) fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        written(serde_json::to_writer(&mut self.buf, value));
    }

    /// Omitted when `None`.
    pub(crate) fn opt_str(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    pub(crate) fn i64(&mut self, key: &str, value: i64) {
        self.key(key);
        written(serde_json::to_writer(&mut self.buf, &value));
    }

    /// Non-finite values print as `null`, as `json!(value)` has them.
    pub(crate) fn f64(&mut self, key: &str, value: f64) {
        self.key(key);
        written(serde_json::to_writer(&mut self.buf, &value));
    }

    pub(crate) fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.buf
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// A JSON array of strings.
    pub(crate) fn strs(&mut self, key: &str, values: &[&str]) {
        self.key(key);
        written(serde_json::to_writer(&mut self.buf, values));
    }

    pub(crate) fn value(&mut self, key: &str, value: &Value) {
        self.key(key);
        written(serde_json::to_writer(&mut self.buf, value));
    }

    pub(crate) fn map(&mut self, key: &str, value: &Map<String, Value>) {
        self.key(key);
        written(serde_json::to_writer(&mut self.buf, value));
    }

    pub(crate) fn finish(self) -> String {
        utf8(self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(v: &Value, field: &str) -> Vec<String> {
        v[field].as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn each_type_carries_only_its_user_keys() {
        let braze = BrazeId::from_bytes([1; 12]);
        let ext = ExternalId::parse("u1").unwrap();
        let dev = DeviceId::parse("d1").unwrap();
        let user = EventUser {
            braze_id: &braze,
            external_id: Some(&ext),
            device_id: Some(&dev),
            time_zone: Some("Europe/Paris"),
        };
        let at = Millis(1_700_000_000_123);
        let id = || EventId("e".into());
        let custom = CurrentsEvent::custom_event(id(), at, &user, "ag", None, "n", &Map::new());
        assert_eq!(
            keys(&custom.body_value(), "user"),
            ["user_id", "external_user_id", "device_id", "timezone"]
        );
        assert_eq!(custom.body_value()["time"], 1_700_000_000);
        let purchase =
            CurrentsEvent::purchase(id(), at, &user, "ag", None, "p", "USD", 1.5, &Map::new());
        assert_eq!(
            keys(&purchase.body_value(), "user"),
            ["user_id", "external_user_id", "device_id"]
        );
        let update = CurrentsEvent::profile_update(
            id(),
            at,
            &user,
            "ag",
            "rest_api",
            Map::new(),
            &Map::new(),
        );
        assert_eq!(
            keys(&update.body_value(), "user"),
            ["user_id", "external_user_id", "timezone"]
        );
        assert_eq!(
            update.body_value()["properties"]["time_ms"],
            1_700_000_000_123_i64
        );
        let delete = CurrentsEvent::delete_request(id(), at, &braze, "ag");
        assert_eq!(keys(&delete.body_value(), "user"), ["user_id"]);
        let orphan = CurrentsEvent::orphan(id(), at, &user, "ag", &braze);
        assert_eq!(
            keys(&orphan.body_value(), "user"),
            ["user_id", "external_user_id", "device_id"]
        );
    }

    /// The construction the text writer replaced, kept verbatim as the oracle: `Map`s filled in
    /// order and wrapped with `json!`.
    mod oracle {
        use super::super::*;
        use serde_json::json;

        fn build(
            id: &EventId,
            event_type: EventType,
            time: Millis,
            user: Map<String, Value>,
            properties: Map<String, Value>,
        ) -> Value {
            json!({
                "event_type": event_type.as_str(),
                "id": id.0,
                "time": time.secs(),
                "user": user,
                "properties": properties,
            })
        }

        pub fn custom_event(
            id: &EventId,
            at: Millis,
            user: &EventUser<'_>,
            app_group_id: &str,
            app_id: Option<&str>,
            name: &str,
            custom_properties: &Map<String, Value>,
        ) -> Value {
            let mut props = Map::new();
            props.insert("app_group_id".into(), app_group_id.into());
            put_opt(&mut props, "app_id", app_id);
            props.insert("name".into(), name.into());
            if !custom_properties.is_empty() {
                props.insert(
                    "custom_properties".into(),
                    Value::Object(custom_properties.clone()),
                );
            }
            build(
                id,
                EventType::CustomEvent,
                at,
                user_keys(user, true, true, true),
                props,
            )
        }

        #[allow(clippy::too_many_arguments)]
        pub fn purchase(
            id: &EventId,
            at: Millis,
            user: &EventUser<'_>,
            app_group_id: &str,
            app_id: Option<&str>,
            product_id: &str,
            currency: &str,
            price: f64,
            purchase_properties: &Map<String, Value>,
        ) -> Value {
            let mut props = Map::new();
            props.insert("app_group_id".into(), app_group_id.into());
            put_opt(&mut props, "app_id", app_id);
            props.insert("currency".into(), currency.into());
            props.insert("price".into(), json!(price));
            props.insert("product_id".into(), product_id.into());
            if !purchase_properties.is_empty() {
                props.insert(
                    "purchase_properties".into(),
                    Value::Object(purchase_properties.clone()),
                );
            }
            build(
                id,
                EventType::Purchase,
                at,
                user_keys(user, true, true, false),
                props,
            )
        }

        pub fn profile_update(
            id: &EventId,
            at: Millis,
            user: &EventUser<'_>,
            app_group_id: &str,
            update_source: &str,
            standard: Map<String, Value>,
            custom: &Map<String, Value>,
        ) -> Value {
            let mut props = Map::new();
            props.insert("app_group_id".into(), app_group_id.into());
            props.insert("time_ms".into(), at.0.into());
            props.insert("update_source".into(), update_source.into());
            props.extend(standard);
            if !custom.is_empty() {
                props.insert(
                    "custom_attributes".into(),
                    Value::String(Value::Object(custom.clone()).to_string()),
                );
            }
            build(
                id,
                EventType::ProfileUpdate,
                at,
                user_keys(user, true, false, true),
                props,
            )
        }

        pub fn delete_request(
            id: &EventId,
            at: Millis,
            braze_id: &BrazeId,
            app_group_id: &str,
        ) -> Value {
            let mut user = Map::new();
            user.insert("user_id".into(), braze_id.as_str().into());
            let mut props = Map::new();
            props.insert("app_group_id".into(), app_group_id.into());
            build(id, EventType::UserDeleteRequest, at, user, props)
        }

        pub fn orphan(
            id: &EventId,
            at: Millis,
            orphan: &EventUser<'_>,
            app_group_id: &str,
            orphaned_by: &BrazeId,
        ) -> Value {
            let mut props = Map::new();
            props.insert("app_group_id".into(), app_group_id.into());
            props.insert("orphaned_by_id".into(), orphaned_by.as_str().into());
            build(
                id,
                EventType::UserOrphan,
                at,
                user_keys(orphan, true, true, false),
                props,
            )
        }

        fn put_opt(map: &mut Map<String, Value>, key: &str, value: Option<&str>) {
            if let Some(v) = value {
                map.insert(key.into(), v.into());
            }
        }

        fn user_keys(
            user: &EventUser<'_>,
            external: bool,
            device: bool,
            timezone: bool,
        ) -> Map<String, Value> {
            let mut map = Map::new();
            map.insert("user_id".into(), user.braze_id.as_str().into());
            if external {
                put_opt(
                    &mut map,
                    "external_user_id",
                    user.external_id.map(ExternalId::as_str),
                );
            }
            if device {
                put_opt(&mut map, "device_id", user.device_id.map(DeviceId::as_str));
            }
            if timezone {
                put_opt(&mut map, "timezone", user.time_zone);
            }
            map
        }
    }

    /// The text parses to exactly the oracle's `Value` (same keys in the same order) and is
    /// byte for byte what serde_json prints for it.
    #[track_caller]
    fn same(event: &CurrentsEvent, oracle: &Value, expected_type: EventType, at: Millis) {
        let parsed = event.body_value();
        assert_eq!(&parsed, oracle, "{}", event.body);
        assert_eq!(event.body, oracle.to_string());
        assert_eq!(event.body, serde_json::to_string(oracle).unwrap());
        // Key order too: `Value`'s equality ignores it, the text comparison above does not,
        // but say it outright for the nested objects.
        for field in ["user", "properties"] {
            assert_eq!(keys(&parsed, field), keys(oracle, field), "{field}");
        }
        assert_eq!(event.event_type, expected_type);
        assert_eq!(event.time, at.secs());
        assert_eq!(parsed["id"], event.id.0.as_str());
    }

    /// Strings that need escaping, or that look like they might.
    const AWKWARD: [&str; 10] = [
        "plain",
        "quote \" and backslash \\ and slash /",
        "\\\"",
        "control \u{0}\u{1}\u{8}\u{9}\u{a}\u{b}\u{c}\u{d}\u{1b}\u{1f}\u{7f} end",
        "unicode é ß 漢字 🌊 \u{2028}\u{2029} \u{feff}",
        "",
        " ",
        "{\"not\":\"json\"}",
        "\\u0000",
        "</script>",
    ];

    fn awkward_properties() -> Vec<Map<String, Value>> {
        let one = |v: Value| v.as_object().unwrap().clone();
        vec![
            Map::new(),
            one(json!({"k": 1})),
            one(json!({
                "z_first": "order is insertion order, not sorted",
                "a": null,
                "nested": {"arr": [1, -2, 2.5, 1e21, 1e-7, 0.1, -0.0, null, true, false, "s\"\\\n"],
                           "obj": {"deep": [{"x": [[]]}, {}], "empty": {}},
                           "big": u64::MAX, "small": i64::MIN, "f": 10.0, "g": 1.5},
                "quote\"key\\": "value\u{0}\u{1f}",
                "unicode🌊": "漢字\u{2028}",
                "empty_string": "",
                "list": [],
                "float": 1234.5678,
                "tiny": 5e-324,
                "huge": f64::MAX,
            })),
        ]
    }

    fn users<'a>(
        braze: &'a BrazeId,
        ext: &'a ExternalId,
        dev: &'a DeviceId,
        tz: &'a str,
    ) -> Vec<EventUser<'a>> {
        let mut out = Vec::new();
        for external_id in [None, Some(ext)] {
            for device_id in [None, Some(dev)] {
                for time_zone in [None, Some(tz)] {
                    out.push(EventUser {
                        braze_id: braze,
                        external_id,
                        device_id,
                        time_zone,
                    });
                }
            }
        }
        out
    }

    #[test]
    fn text_is_byte_for_byte_the_json_built_object() {
        let braze = BrazeId::from_bytes([0xab; 12]);
        let other = BrazeId::from_bytes([7; 12]);
        let ext = ExternalId::parse("ext \"quoted\" \\ 🌊 \u{1}\n").unwrap();
        let dev = DeviceId::parse("dev\t\u{7f}\u{2028}é").unwrap();
        let tz = "America/Sao_Paulo \"\\";
        let users = users(&braze, &ext, &dev, tz);
        let props = awkward_properties();
        let times = [
            Millis(1_700_000_000_123),
            Millis(0),
            Millis(-1),
            Millis(-1_500),
            Millis(i64::MAX),
            Millis(i64::MIN),
        ];
        let prices = [
            1.5,
            10.0,
            1e21,
            0.0,
            -0.0,
            0.1,
            9.99,
            -3.25,
            1e-7,
            123_456_789.0,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        let mut n = 0_u64;
        let mut next_id = |s: &str| {
            n += 1;
            EventId(format!("{s}-{n}"))
        };
        let mut checked = 0;
        for user in &users {
            for &at in &times {
                for s in AWKWARD {
                    for app_id in [None, Some(s)] {
                        for p in &props {
                            let id = next_id(s);
                            let oracle = oracle::custom_event(&id, at, user, s, app_id, s, p);
                            let event = CurrentsEvent::custom_event(id, at, user, s, app_id, s, p);
                            same(&event, &oracle, EventType::CustomEvent, at);
                            checked += 1;
                        }
                    }
                    for &price in &prices {
                        let p = &props[(checked as usize) % props.len()];
                        let id = next_id(s);
                        let app_id = (price > 1.0).then_some(s);
                        let oracle =
                            oracle::purchase(&id, at, user, s, app_id, s, "USD\"", price, p);
                        let event =
                            CurrentsEvent::purchase(id, at, user, s, app_id, s, "USD\"", price, p);
                        same(&event, &oracle, EventType::Purchase, at);
                        checked += 1;
                    }
                    for standard in &props {
                        for custom in &props {
                            let id = next_id(s);
                            let oracle = oracle::profile_update(
                                &id,
                                at,
                                user,
                                s,
                                s,
                                standard.clone(),
                                custom,
                            );
                            let event = CurrentsEvent::profile_update(
                                id,
                                at,
                                user,
                                s,
                                s,
                                standard.clone(),
                                custom,
                            );
                            same(&event, &oracle, EventType::ProfileUpdate, at);
                            checked += 1;
                        }
                    }
                    let id = next_id(s);
                    let oracle = oracle::delete_request(&id, at, user.braze_id, s);
                    let event = CurrentsEvent::delete_request(id, at, user.braze_id, s);
                    same(&event, &oracle, EventType::UserDeleteRequest, at);
                    let id = next_id(s);
                    let oracle = oracle::orphan(&id, at, user, s, &other);
                    let event = CurrentsEvent::orphan(id, at, user, s, &other);
                    same(&event, &oracle, EventType::UserOrphan, at);
                    checked += 2;
                }
            }
        }
        assert!(checked > 10_000, "{checked}");
    }

    #[test]
    fn prices_print_as_serde_json_prints_them() {
        let braze = BrazeId::from_bytes([1; 12]);
        let user = EventUser {
            braze_id: &braze,
            external_id: None,
            device_id: None,
            time_zone: None,
        };
        let at = Millis(1_000);
        let price = |p: f64| {
            let e = CurrentsEvent::purchase(
                EventId("e".into()),
                at,
                &user,
                "ag",
                None,
                "sku",
                "USD",
                p,
                &Map::new(),
            );
            let start = e.body.find("\"price\":").unwrap() + "\"price\":".len();
            let end = start + e.body[start..].find(',').unwrap();
            e.body[start..end].to_owned()
        };
        assert_eq!(price(1.5), "1.5");
        assert_eq!(price(10.0), "10.0");
        assert_eq!(price(1e21), "1e+21");
        assert_eq!(price(0.1), "0.1");
        assert_eq!(price(f64::NAN), "null");
        assert_eq!(price(f64::INFINITY), "null");
        // Seventeen significant digits: serde_json's default (best-effort) float parser does
        // not read this back exactly, so it stays out of the parse-and-compare tests above; the
        // text is still exactly what serde_json prints for the value.
        let hard = 123_456_789.123_456_79;
        assert_eq!(price(hard), "123456789.12345679");
        let props = json!({"f": hard, "g": [hard]}).as_object().unwrap().clone();
        let id = EventId("e".into());
        let oracle = oracle::custom_event(&id, at, &user, "ag", None, "n", &props);
        let event = CurrentsEvent::custom_event(id, at, &user, "ag", None, "n", &props);
        assert_eq!(event.body, oracle.to_string());
    }

    #[test]
    fn standard_fields_named_like_fixed_properties_replace_them_in_place() {
        let braze = BrazeId::from_bytes([2; 12]);
        let user = EventUser {
            braze_id: &braze,
            external_id: None,
            device_id: None,
            time_zone: Some("UTC"),
        };
        let at = Millis(1_700_000_000_999);
        let one = |v: Value| v.as_object().unwrap().clone();
        let standards = [
            one(json!({"first_name": "A", "time_ms": "x", "app_group_id": null})),
            one(json!({"custom_attributes": [1], "update_source": {"a": 1}, "country": "FR"})),
            one(json!({"custom_attributes": "s", "first_name": null})),
        ];
        let customs = [Map::new(), one(json!({"c": 1, "d": null, "e": "\"q\""}))];
        for standard in &standards {
            for custom in &customs {
                let id = EventId("e\u{1}".into());
                let oracle = oracle::profile_update(
                    &id,
                    at,
                    &user,
                    "ag",
                    "rest_api",
                    standard.clone(),
                    custom,
                );
                let event = CurrentsEvent::profile_update(
                    id,
                    at,
                    &user,
                    "ag",
                    "rest_api",
                    standard.clone(),
                    custom,
                );
                same(&event, &oracle, EventType::ProfileUpdate, at);
            }
        }
    }

    #[test]
    fn custom_attributes_is_the_object_as_a_json_string() {
        let braze = BrazeId::from_bytes([3; 12]);
        let user = EventUser {
            braze_id: &braze,
            external_id: None,
            device_id: None,
            time_zone: None,
        };
        let custom = json!({"b": [1, 2.5], "a": "x\"y"})
            .as_object()
            .unwrap()
            .clone();
        let event = CurrentsEvent::profile_update(
            EventId("e".into()),
            Millis(5),
            &user,
            "ag",
            "rest_api",
            Map::new(),
            &custom,
        );
        let encoded = event.body_value()["properties"]["custom_attributes"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(encoded, r#"{"b":[1,2.5],"a":"x\"y"}"#);
        assert_eq!(
            serde_json::from_str::<Value>(&encoded).unwrap(),
            Value::Object(custom)
        );
    }
}
