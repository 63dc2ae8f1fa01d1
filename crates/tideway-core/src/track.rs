//! Parsing `/users/track` objects into domain commands, with Braze's per-object errors.
//!
//! Braze validates each attribute, event and purchase object on its own: invalid ones are
//! reported by array and index while valid ones are applied. Parsing therefore never fails as a
//! whole except for a body that is not the documented shape at all (handled by the caller).
//! Custom attributes are JSON by nature (any value, arrays, nested objects), so this module
//! works on `serde_json` values: JSON is the domain here, not just the wire.

use serde_json::{Map, Value};

use crate::clock::{Millis, attribute_date, parse_datetime, parse_dob};
use crate::ids::{AliasLabel, AliasName, BrazeId, DeviceId, Email, ExternalId, Phone, UserAlias};
use crate::profile::{CustomChange, ObjectUpdate, StandardField};

/// Braze's per-array limit on `/users/track`.
pub const MAX_OBJECTS_PER_ARRAY: usize = 75;
/// Longest attribute / property / event name and string value.
pub const MAX_NAME_CHARS: usize = 255;
/// Largest nested attribute or event-properties payload (Braze: 100 KB; purchases 50 KB).
pub const MAX_NESTED_BYTES: usize = 100 * 1024;
pub const MAX_PURCHASE_PROPERTIES_BYTES: usize = 50 * 1024;

/// The documented text for an object without a usable identifier.
pub const MISSING_IDENTIFIER: &str =
    "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required";

/// How a request names a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRef {
    External(ExternalId),
    Alias(UserAlias),
    Braze(BrazeId),
    Email(Email),
    Phone(Phone),
    /// Tideway's extension: an anonymous user keyed by device id.
    Device(DeviceId),
}

/// Who a track object is about and whether it may create that user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub primary: UserRef,
    /// With an `external_id`: the anonymous user on this device becomes (or merges into) the
    /// identified one.
    pub device: Option<DeviceId>,
    /// With an `external_id`: an alias to attach to the user.
    pub alias: Option<UserAlias>,
    pub update_existing_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputArray {
    Attributes,
    Events,
    Purchases,
}

impl InputArray {
    pub fn as_str(self) -> &'static str {
        match self {
            InputArray::Attributes => "attributes",
            InputArray::Events => "events",
            InputArray::Purchases => "purchases",
        }
    }
}

/// A rejected object: Braze's `{"type", "input_array", "index"}` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    pub input_array: InputArray,
    pub index: usize,
    pub message: String,
}

/// A changed identifier-like standard field (`email`, `phone`): `None` clears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContactChange<T> {
    Unchanged,
    Set(T),
    Clear,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttributeObject {
    pub target: Target,
    pub email: ContactChange<Email>,
    pub phone: ContactChange<Phone>,
    /// `None` value = `null` = remove.
    pub standard: Vec<(StandardField, Option<Value>)>,
    pub custom: Vec<(String, CustomChange)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventObject {
    pub target: Target,
    pub app_id: Option<String>,
    pub name: String,
    pub time: Millis,
    pub properties: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PurchaseObject {
    pub target: Target,
    pub app_id: Option<String>,
    pub product_id: String,
    pub currency: String,
    pub price: f64,
    pub quantity: u32,
    pub time: Millis,
    pub properties: Map<String, Value>,
}

/// A parsed `/users/track` body: the valid objects (with their index) and the errors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackRequest {
    pub attributes: Vec<(usize, AttributeObject)>,
    pub events: Vec<(usize, EventObject)>,
    pub purchases: Vec<(usize, PurchaseObject)>,
    pub errors: Vec<ObjectError>,
}

impl TrackRequest {
    pub fn valid_objects(&self) -> usize {
        self.attributes.len() + self.events.len() + self.purchases.len()
    }
}

/// Why a whole body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackRejected {
    #[error("'{0}' must be an array of objects")]
    NotAnArray(&'static str),
    #[error("Max Input Length Exceeded")]
    TooManyObjects,
}

/// Parses a `/users/track` body (already known to be a JSON object).
pub fn parse_track(body: &Map<String, Value>) -> Result<TrackRequest, TrackRejected> {
    let arrays = [
        ("attributes", InputArray::Attributes),
        ("events", InputArray::Events),
        ("purchases", InputArray::Purchases),
    ];
    let mut lists: [&[Value]; 3] = [&[], &[], &[]];
    for (slot, (key, _)) in lists.iter_mut().zip(arrays) {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) if items.len() > MAX_OBJECTS_PER_ARRAY => {
                return Err(TrackRejected::TooManyObjects);
            }
            Some(Value::Array(items)) => *slot = items,
            Some(_) => return Err(TrackRejected::NotAnArray(key)),
        }
    }
    let mut req = TrackRequest::default();
    for (index, item) in lists[0].iter().enumerate() {
        match parse_attribute_object(item) {
            Ok(obj) => req.attributes.push((index, obj)),
            Err(message) => req.errors.push(ObjectError {
                input_array: InputArray::Attributes,
                index,
                message,
            }),
        }
    }
    for (index, item) in lists[1].iter().enumerate() {
        match parse_event_object(item) {
            Ok(obj) => req.events.push((index, obj)),
            Err(message) => req.errors.push(ObjectError {
                input_array: InputArray::Events,
                index,
                message,
            }),
        }
    }
    for (index, item) in lists[2].iter().enumerate() {
        match parse_purchase_object(item) {
            Ok(obj) => req.purchases.push((index, obj)),
            Err(message) => req.errors.push(ObjectError {
                input_array: InputArray::Purchases,
                index,
                message,
            }),
        }
    }
    Ok(req)
}

pub(crate) fn not_valid(field: &str) -> String {
    format!("'{field}' is not valid")
}

/// Parses a user alias object `{"alias_name", "alias_label"}`.
pub fn parse_alias(value: &Value) -> Result<UserAlias, String> {
    let obj = value.as_object().ok_or_else(|| not_valid("user_alias"))?;
    let name = obj
        .get("alias_name")
        .and_then(Value::as_str)
        .and_then(|s| AliasName::parse(s).ok());
    let label = obj
        .get("alias_label")
        .and_then(Value::as_str)
        .and_then(|s| AliasLabel::parse(s).ok());
    match (name, label) {
        (Some(name), Some(label)) => Ok(UserAlias { label, name }),
        _ => Err("'user_alias' must have a non-empty 'alias_name' and 'alias_label'".to_owned()),
    }
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(not_valid(key)),
    }
}

/// An identifier key: a string, or an integer read as its decimal text (clients that key users
/// by a database id send `"external_id": 5555`; the messaging endpoints read numbers so too).
fn parse_id<T, E>(
    obj: &Map<String, Value>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Option<T>, String> {
    let text = match obj.get(key) {
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => match opt_str(obj, key)? {
            Some(s) => s.to_owned(),
            None => return Ok(None),
        },
    };
    parse(&text).map(Some).map_err(|_| not_valid(key))
}

/// Resolves the identifier keys of a track object: which one names the user (precedence
/// `external_id` > `user_alias` > `braze_id` > `email` > `phone` > `device_id`), and whether it
/// may create that user.
fn parse_target(obj: &Map<String, Value>) -> Result<Target, String> {
    let external = parse_id(obj, "external_id", ExternalId::parse)?;
    let alias = match obj.get("user_alias") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_alias(v)?),
    };
    let braze = parse_id(obj, "braze_id", BrazeId::parse)?;
    let email = parse_id(obj, "email", Email::parse)?;
    let phone = parse_id(obj, "phone", Phone::parse)?;
    let device = parse_id(obj, "device_id", DeviceId::parse)?;
    let explicit_update_only = match obj.get("_update_existing_only") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return Err(not_valid("_update_existing_only")),
    };
    let (primary, device, alias) = if let Some(ext) = external {
        (UserRef::External(ext), device, alias)
    } else if let Some(alias) = alias {
        (UserRef::Alias(alias), None, None)
    } else if let Some(b) = braze {
        (UserRef::Braze(b), None, None)
    } else if let Some(e) = email {
        (UserRef::Email(e), None, None)
    } else if let Some(p) = phone {
        (UserRef::Phone(p), None, None)
    } else if let Some(d) = device {
        (UserRef::Device(d), None, None)
    } else {
        return Err(MISSING_IDENTIFIER.to_owned());
    };
    // Alias-only identification is update-only unless `false` is given explicitly (Our choice
    // in braze-api.md §3.2); everything else creates unless `true` is given.
    let update_existing_only = explicit_update_only.unwrap_or(matches!(primary, UserRef::Alias(_)));
    Ok(Target {
        primary,
        device,
        alias,
        update_existing_only,
    })
}

/// Keys of an attribute object that are not attributes.
const NON_ATTRIBUTE_KEYS: [&str; 10] = [
    "external_id",
    "user_alias",
    "braze_id",
    "device_id",
    "_update_existing_only",
    "_merge_objects",
    "push_token_import",
    "app_id",
    "alias_name",
    "alias_label",
];

pub(crate) fn parse_attribute_object(value: &Value) -> Result<AttributeObject, String> {
    let obj = value
        .as_object()
        .ok_or("'attributes' elements must be objects")?;
    let target = parse_target(obj)?;
    let merge_objects = match obj.get("_merge_objects") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(not_valid("_merge_objects")),
    };
    let mut out = AttributeObject {
        target,
        email: ContactChange::Unchanged,
        phone: ContactChange::Unchanged,
        standard: Vec::new(),
        custom: Vec::new(),
    };
    for (key, v) in obj {
        if NON_ATTRIBUTE_KEYS.contains(&key.as_str()) {
            continue;
        }
        match key.as_str() {
            "email" => out.email = contact(v, key, Email::parse)?,
            "phone" => out.phone = contact(v, key, Phone::parse)?,
            _ => match StandardField::parse(key) {
                Some(field) => {
                    if let Some(change) = standard_value(field, v)? {
                        out.standard.push((field, change));
                    }
                }
                None => out.custom.push((
                    check_name(key)?.to_owned(),
                    custom_change(key, v, merge_objects)?,
                )),
            },
        }
    }
    Ok(out)
}

fn contact<T, E>(
    v: &Value,
    key: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<ContactChange<T>, String> {
    match v {
        Value::Null => Ok(ContactChange::Clear),
        Value::String(s) => parse(s).map(ContactChange::Set).map_err(|_| not_valid(key)),
        _ => Err(not_valid(key)),
    }
}

fn check_name(name: &str) -> Result<&str, String> {
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.starts_with('$') {
        Err(format!("'{name}' is not a valid attribute name"))
    } else {
        Ok(name)
    }
}

/// Normalises a standard attribute value: `Ok(Some(Some(v)))` sets it, `Ok(Some(None))` removes
/// it, `Ok(None)` leaves the field as it was.
fn standard_value(field: StandardField, v: &Value) -> Result<Option<Option<Value>>, String> {
    use StandardField as F;
    // Groups are set one by one (the profile merges them): `null` names none, so changes none.
    if v.is_null() && field == F::SubscriptionGroups {
        return Ok(None);
    }
    if v.is_null() {
        return Ok(Some(None));
    }
    let bad = || not_valid(field.as_str());
    let s = v.as_str();
    let normalised = match field {
        F::TimeZone => return time_zone(v),
        F::FirstName | F::LastName | F::HomeCity => {
            let s = s.ok_or_else(bad)?;
            if s.chars().count() > MAX_NAME_CHARS {
                return Err(bad());
            }
            Value::from(s)
        }
        // Braze: a value that is not an ISO-3166-1 alpha-2 code is stored as NULL rather than
        // rejected.
        F::Country => match s {
            Some(c) if is_country_code(&c.to_ascii_uppercase()) => {
                Value::from(c.to_ascii_uppercase())
            }
            Some(_) => return Ok(Some(None)),
            None => return Err(bad()),
        },
        // Braze: ISO 639-1; anything else is stored as NULL, as for `country`.
        F::Language => match s {
            Some(l) if is_language_code(&l.to_ascii_lowercase()) => {
                Value::from(l.to_ascii_lowercase())
            }
            Some(_) => return Ok(Some(None)),
            None => return Err(bad()),
        },
        F::Gender => {
            let g = match s.ok_or_else(bad)?.to_ascii_lowercase().as_str() {
                "m" | "male" => "M",
                "f" | "female" => "F",
                "o" | "other" => "O",
                "n" | "not_applicable" => "N",
                "p" | "prefer_not_to_say" => "P",
                _ => return Err(bad()),
            };
            Value::from(g)
        }
        F::Dob => {
            let s = s.ok_or_else(bad)?;
            parse_dob(s).ok_or_else(bad)?;
            Value::from(s)
        }
        F::EmailSubscribe | F::PushSubscribe => match s {
            Some(state @ ("opted_in" | "unsubscribed" | "subscribed")) => Value::from(state),
            _ => return Err(bad()),
        },
        F::CurrentLocation => {
            let o = v.as_object().ok_or_else(bad)?;
            let lon = o
                .get("longitude")
                .and_then(Value::as_f64)
                .filter(|x| (-180.0..=180.0).contains(x));
            let lat = o
                .get("latitude")
                .and_then(Value::as_f64)
                .filter(|x| (-90.0..=90.0).contains(x));
            match (lon, lat) {
                (Some(lon), Some(lat)) => serde_json::json!({"longitude": lon, "latitude": lat}),
                _ => return Err(bad()),
            }
        }
        F::DateOfFirstSession | F::DateOfLastSession | F::MarkedEmailAsSpamAt => {
            s.and_then(attribute_date).ok_or_else(bad)?
        }
        F::EmailOpenTrackingDisabled | F::EmailClickTrackingDisabled => {
            Value::Bool(v.as_bool().ok_or_else(bad)?)
        }
        // Each entry names a group and one of Braze's two states; the same group twice keeps
        // the later entry. What is stored is the two fields, so the profile merges by group.
        // Bounded like nested custom attributes (below).
        F::SubscriptionGroups => {
            let items = v.as_array().ok_or_else(bad)?;
            if json_len(v) > MAX_NESTED_BYTES {
                return Err(bad());
            }
            let mut groups: Vec<(String, &str)> = Vec::with_capacity(items.len());
            for item in items {
                let id = item
                    .get("subscription_group_id")
                    .and_then(Value::as_str)
                    .filter(|id| !id.is_empty() && id.chars().count() <= MAX_NAME_CHARS)
                    .ok_or_else(bad)?;
                let state = match item.get("subscription_state").and_then(Value::as_str) {
                    Some(state @ ("subscribed" | "unsubscribed")) => state,
                    _ => return Err(bad()),
                };
                groups.retain(|(g, _)| g != id);
                groups.push((id.to_owned(), state));
            }
            Value::Array(
                groups
                    .into_iter()
                    .map(|(id, state)| {
                        serde_json::json!({"subscription_group_id": id, "subscription_state": state})
                    })
                    .collect(),
            )
        }
        // Bounded like nested custom attributes: the profile is rewritten whole on every change,
        // so one unbounded field would make every later write to the user cost megabytes.
        // A token names its app and its token (strings); `device_id` is optional (the
        // profile gives one, see `users::with_device_ids`).
        F::PushTokens => {
            let items = v.as_array().ok_or_else(bad)?;
            let text = |item: &Value, key: &str| {
                item.get(key)
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
            };
            // A device id is an identifier (1 to 987 bytes, no NUL) like any other.
            let device = |item: &Value| match item.get("device_id") {
                None | Some(Value::Null) => true,
                Some(Value::String(d)) => DeviceId::parse(d).is_ok(),
                Some(_) => false,
            };
            let valid = |item: &Value| {
                item.is_object() && text(item, "app_id") && text(item, "token") && device(item)
            };
            if !items.iter().all(valid) || json_len(v) > MAX_NESTED_BYTES {
                return Err(bad());
            }
            // One entry per app and token: the later one wins, as for subscription groups.
            let key = |t: &Value| (t.get("app_id").cloned(), t.get("token").cloned());
            let mut tokens: Vec<Value> = Vec::with_capacity(items.len());
            for item in items {
                tokens.retain(|t| key(t) != key(item));
                tokens.push(item.clone());
            }
            Value::Array(tokens)
        }
        F::Facebook | F::Twitter => {
            if !v.is_object() || json_len(v) > MAX_NESTED_BYTES {
                return Err(bad());
            }
            v.clone()
        }
    };
    Ok(Some(Some(normalised)))
}

/// A `time_zone` value (not `null`), as [`standard_value`] answers: the zone's IANA name as the
/// database spells it (`america/new_york` → `America/New_York`; a link such as `US/Eastern`
/// stays a link), or nothing (the field is left as it was) for
/// a string that names no zone of the IANA database (Braze: "only valid time zone values will be
/// set"); a value that is not a string is an error like any other standard field's.
fn time_zone(v: &Value) -> Result<Option<Option<Value>>, String> {
    match v {
        Value::String(name) if name.len() <= MAX_NAME_CHARS => Ok(jiff::tz::TimeZone::get(name)
            .ok()
            // jiff's stand-in for "no zone known" answers to this name; it is no IANA zone.
            .filter(|zone| zone.iana_name().is_some_and(|n| n != "Etc/Unknown"))
            .map(|zone| {
                Some(Value::from(
                    zone.iana_name().unwrap_or(name.as_str()).to_owned(),
                ))
            })),
        Value::String(_) => Ok(None),
        _ => Err(not_valid("time_zone")),
    }
}

/// The officially assigned ISO-3166-1 alpha-2 codes (249), sorted for a binary search.
const COUNTRY_CODES: [&str; 249] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "YE", "YT", "ZA", "ZM", "ZW",
];

/// Whether `code` (upper case) is an assigned ISO-3166-1 alpha-2 country code.
fn is_country_code(code: &str) -> bool {
    COUNTRY_CODES.binary_search(&code).is_ok()
}

/// The ISO 639-1 language codes (184), sorted for a binary search.
const LANGUAGE_CODES: [&str; 184] = [
    "aa", "ab", "ae", "af", "ak", "am", "an", "ar", "as", "av", "ay", "az", "ba", "be", "bg", "bi",
    "bm", "bn", "bo", "br", "bs", "ca", "ce", "ch", "co", "cr", "cs", "cu", "cv", "cy", "da", "de",
    "dv", "dz", "ee", "el", "en", "eo", "es", "et", "eu", "fa", "ff", "fi", "fj", "fo", "fr", "fy",
    "ga", "gd", "gl", "gn", "gu", "gv", "ha", "he", "hi", "ho", "hr", "ht", "hu", "hy", "hz", "ia",
    "id", "ie", "ig", "ii", "ik", "io", "is", "it", "iu", "ja", "jv", "ka", "kg", "ki", "kj", "kk",
    "kl", "km", "kn", "ko", "kr", "ks", "ku", "kv", "kw", "ky", "la", "lb", "lg", "li", "ln", "lo",
    "lt", "lu", "lv", "mg", "mh", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "na", "nb", "nd",
    "ne", "ng", "nl", "nn", "no", "nr", "nv", "ny", "oc", "oj", "om", "or", "os", "pa", "pi", "pl",
    "ps", "pt", "qu", "rm", "rn", "ro", "ru", "rw", "sa", "sc", "sd", "se", "sg", "sh", "si", "sk",
    "sl", "sm", "sn", "so", "sq", "sr", "ss", "st", "su", "sv", "sw", "ta", "te", "tg", "th", "ti",
    "tk", "tl", "tn", "to", "tr", "ts", "tt", "tw", "ty", "ug", "uk", "ur", "uz", "ve", "vi", "vo",
    "wa", "wo", "xh", "yi", "yo", "za", "zh", "zu",
];

/// Whether `code` (lower case) is an ISO 639-1 language code.
fn is_language_code(code: &str) -> bool {
    LANGUAGE_CODES.binary_search(&code).is_ok()
}

fn is_scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

fn custom_change(name: &str, v: &Value, merge_objects: bool) -> Result<CustomChange, String> {
    let bad = || not_valid(name);
    match v {
        Value::Null => Ok(CustomChange::Remove),
        Value::String(s) if s.chars().count() > MAX_NAME_CHARS => Err(bad()),
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(CustomChange::Set(v.clone())),
        Value::Array(items) => {
            let scalars = items.iter().all(is_scalar);
            let objects = items.iter().all(Value::is_object);
            if !(scalars || objects) || json_len(v) > MAX_NESTED_BYTES {
                return Err(bad());
            }
            Ok(CustomChange::Set(nested_times(v).ok_or_else(bad)?))
        }
        Value::Object(o) => {
            if json_len(v) > MAX_NESTED_BYTES {
                return Err(bad());
            }
            let keys: Vec<&str> = o.keys().map(String::as_str).collect();
            if keys == ["inc"] {
                return match &o["inc"] {
                    Value::Number(n) => Ok(CustomChange::Increment(n.clone())),
                    _ => Err(bad()),
                };
            }
            if keys == ["$time"] {
                let at = o["$time"]
                    .as_str()
                    .and_then(attribute_date)
                    .ok_or_else(bad)?;
                return Ok(CustomChange::Set(at));
            }
            if !keys.is_empty() && keys.iter().all(|k| matches!(*k, "add" | "remove")) {
                let add = scalar_list(o.get("add")).ok_or_else(bad)?;
                let remove = scalar_list(o.get("remove")).ok_or_else(bad)?;
                return Ok(CustomChange::ArrayEdit { add, remove });
            }
            if !keys.is_empty()
                && keys
                    .iter()
                    .all(|k| matches!(*k, "$add" | "$remove" | "$update"))
            {
                return object_array_edit(o).ok_or_else(bad);
            }
            if keys.iter().any(|k| k.starts_with('$')) {
                return Err(bad());
            }
            let v = nested_times(v).ok_or_else(bad)?;
            Ok(match v {
                Value::Object(o) if merge_objects => CustomChange::MergeObject(o),
                v => CustomChange::Set(v),
            })
        }
    }
}

fn scalar_list(v: Option<&Value>) -> Option<Vec<Value>> {
    match v {
        None => Some(Vec::new()),
        Some(Value::Array(items)) if items.iter().all(is_scalar) => Some(items.clone()),
        Some(_) => None,
    }
}

fn object_list(v: Option<&Value>) -> Option<Vec<Value>> {
    match v {
        None => Some(Vec::new()),
        Some(Value::Array(items)) if items.iter().all(Value::is_object) => Some(items.clone()),
        Some(_) => None,
    }
}

/// Rewrites the inner timestamps of a nested value (`{"$time": "2020-05-28"}` anywhere below
/// the top) as ISO strings, as the top level's are; `None` for a bad time or any other `$` key,
/// which the top level refuses too.
fn nested_times(v: &Value) -> Option<Value> {
    match v {
        Value::Object(o) => {
            if o.len() == 1
                && let Some(t) = o.get("$time")
            {
                return attribute_date(t.as_str()?);
            }
            let mut out = Map::with_capacity(o.len());
            for (k, inner) in o {
                if k.starts_with('$') {
                    return None;
                }
                out.insert(k.clone(), nested_times(inner)?);
            }
            Some(Value::Object(out))
        }
        Value::Array(items) => items
            .iter()
            .map(nested_times)
            .collect::<Option<_>>()
            .map(Value::Array),
        other => Some(other.clone()),
    }
}

fn object_array_edit(o: &Map<String, Value>) -> Option<CustomChange> {
    let add = object_list(o.get("$add"))?
        .iter()
        .map(nested_times)
        .collect::<Option<Vec<_>>>()?;
    let remove = object_list(o.get("$remove"))?;
    let mut update = Vec::new();
    for u in object_list(o.get("$update"))? {
        let u = u.as_object()?;
        let Value::Object(new_object) = nested_times(u.get("$new_object")?)? else {
            return None;
        };
        update.push(ObjectUpdate {
            key: u.get("$identifier_key")?.as_str()?.to_owned(),
            value: u.get("$identifier_value")?.clone(),
            new_object,
        });
    }
    Some(CustomChange::ObjectArrayEdit {
        add,
        remove,
        update,
    })
}

/// Checks event or purchase properties: names non-empty, ≤ 255 chars, no leading `$`, not the
/// reserved `time` / `event_name`; string values ≤ 255 chars; total size within `max_bytes`.
fn parse_properties(
    obj: &Map<String, Value>,
    max_bytes: usize,
) -> Result<Map<String, Value>, String> {
    let props = match obj.get("properties") {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(not_valid("properties")),
    };
    for (k, v) in props {
        if k.is_empty() || k.chars().count() > MAX_NAME_CHARS || k.starts_with('$') {
            return Err(format!("'properties' has an invalid key '{k}'"));
        }
        if k == "time" || k == "event_name" {
            return Err(format!("'properties' must not use the reserved key '{k}'"));
        }
        if matches!(v, Value::String(s) if s.chars().count() > MAX_NAME_CHARS) {
            return Err(format!(
                "'properties.{k}' is longer than {MAX_NAME_CHARS} characters"
            ));
        }
    }
    if json_len(props) > max_bytes {
        return Err(format!(
            "'properties' is larger than {} KB",
            max_bytes / 1024
        ));
    }
    Ok(props.clone())
}

/// The length of `value` written as JSON, counted without building the text.
pub(crate) fn json_len(value: &(impl serde::Serialize + ?Sized)) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Counting cannot fail, and a map with string keys always serialises.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

fn required_time(obj: &Map<String, Value>) -> Result<Millis, String> {
    match obj.get("time") {
        None | Some(Value::Null) => Err("'time' is required".to_owned()),
        Some(Value::String(s)) => parse_datetime(s).ok_or_else(|| not_valid("time")),
        Some(_) => Err(not_valid("time")),
    }
}

fn required_name<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Err(format!("'{key}' is required")),
        Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= MAX_NAME_CHARS => {
            Ok(s)
        }
        Some(_) => Err(not_valid(key)),
    }
}

fn parse_event_object(value: &Value) -> Result<EventObject, String> {
    let obj = value
        .as_object()
        .ok_or("'events' elements must be objects")?;
    let target = parse_target(obj)?;
    Ok(EventObject {
        app_id: opt_str(obj, "app_id")?.map(str::to_owned),
        name: required_name(obj, "name")?.to_owned(),
        time: required_time(obj)?,
        properties: parse_properties(obj, MAX_NESTED_BYTES)?,
        target,
    })
}

fn parse_purchase_object(value: &Value) -> Result<PurchaseObject, String> {
    let obj = value
        .as_object()
        .ok_or("'purchases' elements must be objects")?;
    let target = parse_target(obj)?;
    let currency = match obj.get("currency") {
        None | Some(Value::Null) => return Err("'currency' is required".to_owned()),
        Some(Value::String(c)) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
            c.to_ascii_uppercase()
        }
        Some(_) => return Err(not_valid("currency")),
    };
    let price = match obj.get("price") {
        None | Some(Value::Null) => return Err("'price' is required".to_owned()),
        Some(v) => v
            .as_f64()
            .filter(|p| p.is_finite())
            .ok_or_else(|| not_valid("price"))?,
    };
    let quantity = match obj.get("quantity") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|q| (1..=100).contains(q))
            .and_then(|q| u32::try_from(q).ok())
            .ok_or_else(|| not_valid("quantity"))?,
    };
    // price × quantity is added to the user's total revenue: it must stay a number.
    if !(price * f64::from(quantity)).is_finite() {
        return Err(not_valid("price"));
    }
    Ok(PurchaseObject {
        app_id: opt_str(obj, "app_id")?.map(str::to_owned),
        product_id: required_name(obj, "product_id")?.to_owned(),
        currency,
        price,
        quantity,
        time: required_time(obj)?,
        properties: parse_properties(obj, MAX_PURCHASE_PROPERTIES_BYTES)?,
        target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(body: Value) -> Result<TrackRequest, TrackRejected> {
        parse_track(body.as_object().unwrap())
    }

    #[test]
    fn properties_are_measured_as_the_json_they_are() {
        let props: Map<String, Value> = (0..500)
            .map(|i| (format!("k{i}"), json!("v".repeat(200))))
            .collect();
        let text_len = Value::Object(props.clone()).to_string().len();
        assert_eq!(json_len(&props), text_len);
        let event = |props: &Map<String, Value>| json!({"events": [{"external_id": "u", "name": "e", "time": "2025-01-01T00:00:00Z", "properties": props}]});
        let req = parse(event(&props)).unwrap();
        assert!(req.events.is_empty(), "{text_len} bytes is over the limit");
        assert!(req.errors[0].message.contains("larger than"));
        let small: Map<String, Value> = props.into_iter().take(10).collect();
        assert_eq!(parse(event(&small)).unwrap().events.len(), 1);
    }

    #[test]
    fn reports_invalid_objects_by_array_and_index_and_keeps_valid_ones() {
        let req = parse(json!({
            "attributes": [{"external_id": "u1", "first_name": "Jo"}, {"first_name": "nobody"}],
            "events": [{"external_id": "u1", "name": "e", "time": "2024-01-01T00:00:00Z"}, {"external_id": "u1", "name": "e"}],
            "purchases": [{"external_id": "u1", "product_id": "p", "currency": "usd", "price": 1, "quantity": 101, "time": "2024-01-01"}],
        }))
        .unwrap();
        assert_eq!(req.valid_objects(), 2);
        let errors: Vec<(&str, usize, &str)> = req
            .errors
            .iter()
            .map(|e| (e.input_array.as_str(), e.index, e.message.as_str()))
            .collect();
        assert_eq!(
            errors,
            [
                ("attributes", 1, MISSING_IDENTIFIER),
                ("events", 1, "'time' is required"),
                ("purchases", 0, "'quantity' is not valid")
            ]
        );
    }

    #[test]
    fn rejects_more_than_75_objects_and_non_arrays() {
        let many: Vec<Value> = (0..76)
            .map(|i| json!({"external_id": i.to_string()}))
            .collect();
        assert_eq!(
            parse(json!({"attributes": many})),
            Err(TrackRejected::TooManyObjects)
        );
        assert_eq!(
            parse(json!({"events": {}})),
            Err(TrackRejected::NotAnArray("events"))
        );
        assert_eq!(
            parse(json!({"attributes": [], "events": [], "purchases": []}))
                .unwrap()
                .valid_objects(),
            0
        );
    }

    #[test]
    fn alias_targets_default_to_update_only() {
        let req = parse(json!({"attributes": [
            {"user_alias": {"alias_name": "a", "alias_label": "l"}, "x": 1},
            {"user_alias": {"alias_name": "a", "alias_label": "l"}, "_update_existing_only": false, "x": 1},
            {"external_id": "e", "x": 1}
        ]}))
        .unwrap();
        let flags: Vec<bool> = req
            .attributes
            .iter()
            .map(|(_, a)| a.target.update_existing_only)
            .collect();
        assert_eq!(flags, [true, false, false]);
    }

    #[test]
    fn classifies_custom_attribute_operations() {
        let req = parse(json!({"attributes": [{"external_id": "e", "n": {"inc": 2}, "arr": {"add": ["a"], "remove": ["b"]},
            "t": {"$time": "2020-05-28"}, "pets": {"$add": [{"id": 1}]}, "gone": null, "country": "zz1"}]}))
        .unwrap();
        let (_, a) = &req.attributes[0];
        assert_eq!(a.standard, [(StandardField::Country, None)]);
        let kinds: Vec<(&str, &CustomChange)> =
            a.custom.iter().map(|(n, c)| (n.as_str(), c)).collect();
        assert!(matches!(kinds[0], ("n", CustomChange::Increment(_))));
        assert!(matches!(kinds[1], ("arr", CustomChange::ArrayEdit { .. })));
        assert_eq!(
            kinds[2],
            ("t", &CustomChange::Set(json!("2020-05-28T00:00:00.000Z")))
        );
        assert!(matches!(
            kinds[3],
            ("pets", CustomChange::ObjectArrayEdit { .. })
        ));
        assert_eq!(kinds[4], ("gone", &CustomChange::Remove));
    }

    #[test]
    fn inner_timestamps_are_times_and_inner_dollar_keys_are_refused() {
        let req = parse(json!({"attributes": [
            {"external_id": "e", "sub": {"renews": {"$time": "2020-05-28"}, "plan": "pro"},
             "visits": [{"at": {"$time": "2021-01-02T03:04:05Z"}}],
             "pets": {"$update": [{"$identifier_key": "id", "$identifier_value": 1, "$new_object": {"born": {"$time": "2019-01-01"}}}]}},
            {"external_id": "e", "x": {"y": {"$bad": 1}}},
            {"external_id": "e", "x": {"y": {"$time": "yesterday"}}}
        ]}))
        .unwrap();
        let (_, a) = &req.attributes[0];
        assert_eq!(
            a.custom[0].1,
            CustomChange::Set(json!({"renews": "2020-05-28T00:00:00.000Z", "plan": "pro"}))
        );
        assert_eq!(
            a.custom[1].1,
            CustomChange::Set(json!([{"at": "2021-01-02T03:04:05.000Z"}]))
        );
        let CustomChange::ObjectArrayEdit { update, .. } = &a.custom[2].1 else {
            panic!("{:?}", a.custom[2])
        };
        assert_eq!(
            update[0].new_object["born"],
            json!("2019-01-01T00:00:00.000Z")
        );
        let messages: Vec<&str> = req.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["'x' is not valid", "'x' is not valid"]);
    }

    #[test]
    fn country_and_time_zone_keep_only_values_braze_sets() {
        let standard = |attributes: Value| {
            let req = parse(json!({ "attributes": [attributes] })).unwrap();
            assert!(req.errors.is_empty(), "{:?}", req.errors);
            req.attributes[0].1.standard.clone()
        };
        let tz = StandardField::TimeZone;
        let country = StandardField::Country;
        assert_eq!(
            standard(json!({"external_id": "e", "time_zone": "america/new_york", "country": "fr"})),
            [
                (tz, Some(json!("America/New_York"))),
                (country, Some(json!("FR")))
            ]
        );
        // A string naming no zone is ignored (the user's zone stays); `null` removes it. A
        // two-letter string that is no country is stored as NULL, as a longer one always was.
        assert_eq!(
            standard(json!({"external_id": "e", "time_zone": "Mars/Olympus", "country": "XX"})),
            [(country, None)]
        );
        assert_eq!(
            standard(json!({"external_id": "e", "time_zone": "Etc/Unknown"})),
            []
        );
        assert_eq!(
            standard(json!({"external_id": "e", "time_zone": null, "country": "ZW"})),
            [(tz, None), (country, Some(json!("ZW")))]
        );
        let req = parse(json!({"attributes": [{"external_id": "e", "time_zone": 3}]})).unwrap();
        assert_eq!(req.errors[0].message, "'time_zone' is not valid");
    }

    #[test]
    fn languages_are_iso_639_1_codes_or_null() {
        assert!(LANGUAGE_CODES.windows(2).all(|w| w[0] < w[1]));
        for (given, stored) in [
            ("en", Some(json!("en"))),
            ("FR", Some(json!("fr"))),
            ("zz", None),
            ("eng", None),
            ("e", None),
        ] {
            let req =
                parse(json!({"attributes": [{"external_id": "e", "language": given}]})).unwrap();
            assert_eq!(
                req.attributes[0].1.standard,
                [(StandardField::Language, stored)],
                "{given}"
            );
        }
    }

    #[test]
    fn the_country_list_is_sorted_and_complete() {
        assert!(COUNTRY_CODES.windows(2).all(|w| w[0] < w[1]));
        assert!(
            COUNTRY_CODES
                .iter()
                .all(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()))
        );
        for code in ["US", "GB", "DE", "BR", "SS", "AX", "BQ", "CW", "SX"] {
            assert!(is_country_code(code), "{code}");
        }
        for code in ["UK", "EU", "XK", "ZZ", "us"] {
            assert!(!is_country_code(code), "{code}");
        }
    }

    #[test]
    fn rejects_bad_standard_values_and_reserved_property_keys() {
        let req = parse(json!({
            "attributes": [{"external_id": "e", "gender": "robot"}, {"external_id": "e", "dob": "1990-13-01"}, {"external_id": "e", "$bad": 1}],
            "events": [{"external_id": "e", "name": "x", "time": "2024-01-01", "properties": {"time": 1}}]
        }))
        .unwrap();
        let messages: Vec<&str> = req.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "'gender' is not valid",
                "'dob' is not valid",
                "'$bad' is not a valid attribute name",
                "'properties' must not use the reserved key 'time'"
            ]
        );
    }

    #[test]
    fn unbounded_standard_objects_and_infinite_revenue_are_refused() {
        let big: serde_json::Map<String, Value> = (0..600)
            .map(|i| (format!("k{i}"), json!("v".repeat(200))))
            .collect();
        let req = parse(json!({
            "attributes": [
                {"external_id": "e", "facebook": big.clone()},
                {"external_id": "e", "push_tokens": [big]},
                {"external_id": "e", "twitter": {"id": 1}}
            ],
            "purchases": [
                {"external_id": "e", "product_id": "p", "currency": "USD", "price": 1e308, "quantity": 2, "time": "2024-01-01"},
                {"external_id": "e", "product_id": "p", "currency": "USD", "price": 1e308, "time": "2024-01-01"}
            ]
        }))
        .unwrap();
        let messages: Vec<&str> = req.errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "'facebook' is not valid",
                "'push_tokens' is not valid",
                "'price' is not valid"
            ]
        );
    }

    #[test]
    fn device_id_is_an_identifier_and_pairs_with_external_id() {
        let req = parse(json!({"events": [
            {"device_id": "d1", "name": "x", "time": "2024-01-01"},
            {"external_id": "u", "device_id": "d1", "name": "x", "time": "2024-01-01"}
        ]}))
        .unwrap();
        assert!(matches!(req.events[0].1.target.primary, UserRef::Device(_)));
        assert!(req.events[1].1.target.device.is_some());
    }
}
