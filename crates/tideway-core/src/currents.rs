//! The Currents event model: what every state change emits into the event log.
//!
//! Shapes follow `reference/currents-events.md` exactly: each event type has its own set of
//! `user` keys, so events are built through one constructor per type rather than by filling a
//! generic struct. Optional fields are omitted when unknown (receivers accept absent or null).
//! The JSON produced here is what the exporter sends, byte for byte, so it is built once, at the
//! moment of the change, and stored in the log.

use serde_json::{Map, Value, json};

use crate::clock::Millis;
use crate::ids::{BrazeId, DeviceId, EventId, ExternalId};

/// The Currents event types Tideway emits today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    CustomEvent,
    Purchase,
    ProfileUpdate,
    UserDeleteRequest,
    UserOrphan,
}

/// The three categories a Current can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventCategory {
    MessageEngagement,
    CustomerBehavior,
    User,
}

impl EventType {
    pub const ALL: [EventType; 5] = [
        EventType::CustomEvent,
        EventType::Purchase,
        EventType::ProfileUpdate,
        EventType::UserDeleteRequest,
        EventType::UserOrphan,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CustomEvent => "users.behaviors.CustomEvent",
            EventType::Purchase => "users.behaviors.Purchase",
            EventType::ProfileUpdate => "users.profile.Update",
            EventType::UserDeleteRequest => "users.UserDeleteRequest",
            EventType::UserOrphan => "users.UserOrphan",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == raw)
    }

    pub fn category(self) -> EventCategory {
        match self {
            EventType::CustomEvent | EventType::Purchase => EventCategory::CustomerBehavior,
            EventType::ProfileUpdate | EventType::UserDeleteRequest | EventType::UserOrphan => {
                EventCategory::User
            }
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
    /// The full wire object: `{"event_type", "id", "time", "user", "properties"}`.
    pub body: Value,
}

impl CurrentsEvent {
    fn build(
        id: EventId,
        event_type: EventType,
        time: Millis,
        user: Map<String, Value>,
        properties: Map<String, Value>,
    ) -> Self {
        let body = json!({
            "event_type": event_type.as_str(),
            "id": id.0,
            "time": time.secs(),
            "user": user,
            "properties": properties,
        });
        CurrentsEvent {
            id,
            event_type,
            time: time.secs(),
            body,
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
        Self::build(
            id,
            EventType::CustomEvent,
            at,
            user_keys(user, true, true, true),
            props,
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
        Self::build(
            id,
            EventType::Purchase,
            at,
            user_keys(user, true, true, false),
            props,
        )
    }

    /// `users.profile.Update`. `standard` holds the changed standard fields under their
    /// Currents names (`first_name`, `email_address`, …); `custom` the changed custom
    /// attributes (null = removed), sent JSON-encoded as `custom_attributes`.
    pub fn profile_update(
        id: EventId,
        at: Millis,
        user: &EventUser<'_>,
        app_group_id: &str,
        update_source: &str,
        standard: Map<String, Value>,
        custom: &Map<String, Value>,
    ) -> Self {
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
        Self::build(
            id,
            EventType::ProfileUpdate,
            at,
            user_keys(user, true, false, true),
            props,
        )
    }

    /// `users.UserDeleteRequest`
    pub fn delete_request(id: EventId, at: Millis, braze_id: &BrazeId, app_group_id: &str) -> Self {
        let mut user = Map::new();
        user.insert("user_id".into(), braze_id.as_str().into());
        let mut props = Map::new();
        props.insert("app_group_id".into(), app_group_id.into());
        Self::build(id, EventType::UserDeleteRequest, at, user, props)
    }

    /// `users.UserOrphan`: `orphan` was merged into the user `orphaned_by`.
    pub fn orphan(
        id: EventId,
        at: Millis,
        orphan: &EventUser<'_>,
        app_group_id: &str,
        orphaned_by: &BrazeId,
    ) -> Self {
        let mut props = Map::new();
        props.insert("app_group_id".into(), app_group_id.into());
        props.insert("orphaned_by_id".into(), orphaned_by.as_str().into());
        Self::build(
            id,
            EventType::UserOrphan,
            at,
            user_keys(orphan, true, true, false),
            props,
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
            keys(&custom.body, "user"),
            ["user_id", "external_user_id", "device_id", "timezone"]
        );
        assert_eq!(custom.body["time"], 1_700_000_000);
        let purchase =
            CurrentsEvent::purchase(id(), at, &user, "ag", None, "p", "USD", 1.5, &Map::new());
        assert_eq!(
            keys(&purchase.body, "user"),
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
            keys(&update.body, "user"),
            ["user_id", "external_user_id", "timezone"]
        );
        assert_eq!(update.body["properties"]["time_ms"], 1_700_000_000_123_i64);
        let delete = CurrentsEvent::delete_request(id(), at, &braze, "ag");
        assert_eq!(keys(&delete.body, "user"), ["user_id"]);
        let orphan = CurrentsEvent::orphan(id(), at, &user, "ag", &braze);
        assert_eq!(
            keys(&orphan.body, "user"),
            ["user_id", "external_user_id", "device_id"]
        );
    }
}
