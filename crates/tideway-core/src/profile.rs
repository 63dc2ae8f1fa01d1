//! A user's profile and the rules for changing it.
//!
//! The profile is Braze's data model: standard attributes, custom attributes (any JSON value,
//! including arrays and nested objects), and per-name summaries of custom events and purchases
//! (first, last, count), which `/users/export/ids` returns and merges combine. Applying an
//! update is a pure function that also reports what changed, so the caller can emit exactly one
//! `users.profile.Update` describing it.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::clock::Millis;
use crate::ids::{BrazeId, Email, ExternalId, Phone, UserSeq};

/// Braze's standard (built-in) attributes, other than the identifiers `email` and `phone`,
/// which live on [`UserRecord`] so they can be looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StandardField {
    FirstName,
    LastName,
    Country,
    HomeCity,
    Language,
    Gender,
    Dob,
    TimeZone,
    EmailSubscribe,
    PushSubscribe,
    CurrentLocation,
    DateOfFirstSession,
    DateOfLastSession,
    Facebook,
    Twitter,
    EmailOpenTrackingDisabled,
    EmailClickTrackingDisabled,
    MarkedEmailAsSpamAt,
    PushTokens,
    SubscriptionGroups,
}

impl StandardField {
    pub const ALL: [StandardField; 20] = [
        StandardField::FirstName,
        StandardField::LastName,
        StandardField::Country,
        StandardField::HomeCity,
        StandardField::Language,
        StandardField::Gender,
        StandardField::Dob,
        StandardField::TimeZone,
        StandardField::EmailSubscribe,
        StandardField::PushSubscribe,
        StandardField::CurrentLocation,
        StandardField::DateOfFirstSession,
        StandardField::DateOfLastSession,
        StandardField::Facebook,
        StandardField::Twitter,
        StandardField::EmailOpenTrackingDisabled,
        StandardField::EmailClickTrackingDisabled,
        StandardField::MarkedEmailAsSpamAt,
        StandardField::PushTokens,
        StandardField::SubscriptionGroups,
    ];

    /// The attribute name in `/users/track` and `/users/export/ids`.
    pub fn as_str(self) -> &'static str {
        match self {
            StandardField::FirstName => "first_name",
            StandardField::LastName => "last_name",
            StandardField::Country => "country",
            StandardField::HomeCity => "home_city",
            StandardField::Language => "language",
            StandardField::Gender => "gender",
            StandardField::Dob => "dob",
            StandardField::TimeZone => "time_zone",
            StandardField::EmailSubscribe => "email_subscribe",
            StandardField::PushSubscribe => "push_subscribe",
            StandardField::CurrentLocation => "current_location",
            StandardField::DateOfFirstSession => "date_of_first_session",
            StandardField::DateOfLastSession => "date_of_last_session",
            StandardField::Facebook => "facebook",
            StandardField::Twitter => "twitter",
            StandardField::EmailOpenTrackingDisabled => "email_open_tracking_disabled",
            StandardField::EmailClickTrackingDisabled => "email_click_tracking_disabled",
            StandardField::MarkedEmailAsSpamAt => "marked_email_as_spam_at",
            StandardField::PushTokens => "push_tokens",
            StandardField::SubscriptionGroups => "subscription_groups",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The property name in a `users.profile.Update` Currents event, where it has one.
    pub fn currents_name(self) -> Option<&'static str> {
        match self {
            StandardField::FirstName => Some("first_name"),
            StandardField::LastName => Some("last_name"),
            StandardField::Gender => Some("gender"),
            StandardField::Dob => Some("dob"),
            StandardField::HomeCity => Some("home_city"),
            StandardField::Country => Some("country"),
            StandardField::Language => Some("language"),
            _ => None,
        }
    }
}

/// First, last and count of a named custom event or purchased product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrences {
    pub first: Millis,
    pub last: Millis,
    pub count: u64,
}

impl Occurrences {
    pub fn once(at: Millis) -> Self {
        Occurrences {
            first: at,
            last: at,
            count: 1,
        }
    }

    pub fn record(&mut self, at: Millis, times: u64) {
        self.first = self.first.min(at);
        self.last = self.last.max(at);
        self.count += times;
    }

    /// Braze's merge rule: counts sum, first is the earlier, last the later.
    pub fn absorb(&mut self, other: &Occurrences) {
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
        self.count += other.count;
    }
}

/// Everything Tideway knows about a user besides identifiers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    pub standard: BTreeMap<StandardField, Value>,
    pub custom: Map<String, Value>,
    pub events: BTreeMap<String, Occurrences>,
    pub purchases: BTreeMap<String, Occurrences>,
    pub total_revenue: f64,
}

/// A user as stored: identifiers plus profile. Aliases and devices live beside it in the store
/// (they are looked up by, not read with, the user).
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub seq: UserSeq,
    pub braze_id: BrazeId,
    pub external_id: Option<ExternalId>,
    pub email: Option<Email>,
    pub phone: Option<Phone>,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub profile: Profile,
}

impl UserRecord {
    pub fn new(seq: UserSeq, braze_id: BrazeId, now: Millis) -> Self {
        UserRecord {
            seq,
            braze_id,
            external_id: None,
            email: None,
            phone: None,
            created_at: now,
            updated_at: now,
            profile: Profile::default(),
        }
    }

    pub fn is_identified(&self) -> bool {
        self.external_id.is_some()
    }

    pub fn time_zone(&self) -> Option<&str> {
        self.profile
            .standard
            .get(&StandardField::TimeZone)
            .and_then(Value::as_str)
    }

    /// Stable random bucket 0..=9999, derived from the immutable `braze_id`: a hash of all of
    /// it (FNV-1a), since its leading bytes are a timestamp shared by users created together.
    pub fn random_bucket(&self) -> u16 {
        let hash = self
            .braze_id
            .as_str()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        u16::try_from(hash % 10_000).unwrap_or(0)
    }

    /// Folds `other` (an anonymous or alias-only profile being merged away) into `self`,
    /// following Braze's rules: fields that only `other` has are copied; the survivor's
    /// non-null values win; event and purchase summaries combine; revenue sums.
    pub fn absorb(&mut self, other: &UserRecord) {
        if self.email.is_none() {
            self.email.clone_from(&other.email);
        }
        if self.phone.is_none() {
            self.phone.clone_from(&other.phone);
        }
        for (field, value) in &other.profile.standard {
            self.profile
                .standard
                .entry(*field)
                .or_insert_with(|| value.clone());
        }
        for (name, value) in &other.profile.custom {
            if !self.profile.custom.contains_key(name) {
                self.profile.custom.insert(name.clone(), value.clone());
            }
        }
        merge_occurrences(&mut self.profile.events, &other.profile.events);
        merge_occurrences(&mut self.profile.purchases, &other.profile.purchases);
        self.profile.total_revenue += other.profile.total_revenue;
        self.created_at = self.created_at.min(other.created_at);
    }
}

fn merge_occurrences(
    into: &mut BTreeMap<String, Occurrences>,
    from: &BTreeMap<String, Occurrences>,
) {
    for (name, occ) in from {
        into.entry(name.clone())
            .and_modify(|o| o.absorb(occ))
            .or_insert(*occ);
    }
}

/// One change to a custom attribute, as `/users/track` expresses it.
#[derive(Debug, Clone, PartialEq)]
pub enum CustomChange {
    /// Set to a value (scalar, array of scalars, object, or array of objects).
    Set(Value),
    /// `null`: remove the attribute.
    Remove,
    /// `{"inc": n}`: add `n` (a missing or non-numeric value counts as 0).
    Increment(serde_json::Number),
    /// `{"add": [...], "remove": [...]}` on an array of scalars.
    ArrayEdit { add: Vec<Value>, remove: Vec<Value> },
    /// A nested object written with `_merge_objects: true`: deep-merged into the stored one.
    MergeObject(Map<String, Value>),
    /// `{"$add": [...], "$remove": [...], "$update": [...]}` on an array of objects.
    ObjectArrayEdit {
        add: Vec<Value>,
        remove: Vec<Value>,
        update: Vec<ObjectUpdate>,
    },
}

/// One `$update` element: objects whose `key` equals `value` get `new_object` merged in.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectUpdate {
    pub key: String,
    pub value: Value,
    pub new_object: Map<String, Value>,
}

/// Applies one custom-attribute change; returns the new value (`None` = attribute absent) if it
/// differs from the old one.
pub fn apply_custom(
    custom: &mut Map<String, Value>,
    name: &str,
    change: &CustomChange,
    max_array_len: usize,
) -> Option<Option<Value>> {
    let old = custom.get(name).cloned();
    let new: Option<Value> = match change {
        CustomChange::Set(v) => Some(match v {
            Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
                Value::Array(cap(dedupe(items.clone()), max_array_len))
            }
            other => other.clone(),
        }),
        CustomChange::Remove => None,
        CustomChange::Increment(by) => Some(increment(old.as_ref(), by)),
        CustomChange::ArrayEdit { add, remove } => {
            // An array of scalars results, whatever was there: a scalar is kept as its first
            // element; an object, or an array of objects, is replaced (a mixed array is a
            // shape `/users/track` refuses on input).
            let mut items: Vec<Value> = match &old {
                Some(Value::Array(a)) if a.iter().all(|v| !v.is_object()) => a.clone(),
                Some(Value::Null | Value::Object(_) | Value::Array(_)) | None => Vec::new(),
                Some(scalar) => vec![scalar.clone()],
            };
            for v in add {
                // Re-adding a value moves it to the end (Braze keeps the most recent last).
                items.retain(|x| x != v);
                items.push(v.clone());
            }
            items.retain(|x| !remove.contains(x));
            Some(Value::Array(cap(items, max_array_len)))
        }
        CustomChange::MergeObject(patch) => {
            let mut base = match &old {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            };
            deep_merge(&mut base, patch);
            Some(Value::Object(base))
        }
        CustomChange::ObjectArrayEdit {
            add,
            remove,
            update,
        } => {
            // An array of objects results: anything else that was there is replaced.
            let mut items: Vec<Value> = match &old {
                Some(Value::Array(a)) if a.iter().all(Value::is_object) => a.clone(),
                _ => Vec::new(),
            };
            items.retain(|x| !remove.contains(x));
            for u in update {
                for item in items.iter_mut() {
                    if let Value::Object(obj) = item
                        && obj.get(&u.key) == Some(&u.value)
                    {
                        deep_merge(obj, &u.new_object);
                    }
                }
            }
            items.extend(add.iter().cloned());
            // Not capped by count: a set of an array of objects is not either (it is bounded
            // by size when parsed), and a cap here would drop objects the edit never named.
            Some(Value::Array(items))
        }
    };
    if new == old {
        return None;
    }
    match &new {
        Some(v) => custom.insert(name.to_owned(), v.clone()),
        None => custom.remove(name),
    };
    Some(new)
}

fn increment(old: Option<&Value>, by: &serde_json::Number) -> Value {
    let base = old.and_then(Value::as_number);
    match (
        base.and_then(serde_json::Number::as_i64)
            .or(if base.is_none() { Some(0) } else { None }),
        by.as_i64(),
    ) {
        (Some(a), Some(b)) => Value::from(a.saturating_add(b)),
        _ => {
            let a = base.and_then(serde_json::Number::as_f64).unwrap_or(0.0);
            let b = by.as_f64().unwrap_or(0.0);
            // Saturates like the integer sum: never an infinity, which JSON cannot hold.
            let sum = (a + b).clamp(-f64::MAX, f64::MAX);
            serde_json::Number::from_f64(sum)
                .map_or_else(|| old.cloned().unwrap_or(Value::Null), Value::Number)
        }
    }
}

fn dedupe(items: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::with_capacity(items.len());
    for v in items {
        if let Some(pos) = out.iter().position(|x| *x == v) {
            out.remove(pos);
        }
        out.push(v);
    }
    out
}

/// Keeps the newest `max` elements (the end of the array).
fn cap(mut items: Vec<Value>, max: usize) -> Vec<Value> {
    if items.len() > max {
        items.drain(..items.len() - max);
    }
    items
}

fn deep_merge(base: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match (base.get_mut(k), v) {
            (Some(Value::Object(b)), Value::Object(p)) => deep_merge(b, p),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn apply(custom: &mut Map<String, Value>, change: CustomChange) -> Option<Option<Value>> {
        apply_custom(custom, "a", &change, 25)
    }

    #[test]
    fn array_add_moves_existing_values_to_the_end_and_caps_length() {
        let mut c = Map::new();
        apply(&mut c, CustomChange::Set(json!(["x", "y", "x"])));
        assert_eq!(c["a"], json!(["y", "x"]));
        apply(
            &mut c,
            CustomChange::ArrayEdit {
                add: vec![json!("y"), json!("z")],
                remove: vec![json!("x")],
            },
        );
        assert_eq!(c["a"], json!(["y", "z"]));
        let many: Vec<Value> = (0..30).map(Value::from).collect();
        apply(
            &mut c,
            CustomChange::ArrayEdit {
                add: many,
                remove: vec![],
            },
        );
        assert_eq!(c["a"].as_array().unwrap().len(), 25);
        assert_eq!(c["a"][24], json!(29));
    }

    #[test]
    fn increment_starts_from_zero_and_keeps_integers() {
        let mut c = Map::new();
        apply(&mut c, CustomChange::Increment(5.into()));
        apply(&mut c, CustomChange::Increment((-2).into()));
        assert_eq!(c["a"], json!(3));
        assert_eq!(apply(&mut c, CustomChange::Remove), Some(None));
        assert_eq!(
            apply(&mut c, CustomChange::Remove),
            None,
            "removing an absent attribute changes nothing"
        );
    }

    #[test]
    fn object_arrays_add_remove_update() {
        let mut c = Map::new();
        apply(
            &mut c,
            CustomChange::Set(json!([{"id": 1, "breed": "cat"}, {"id": 4, "breed": "dog"}])),
        );
        apply(
            &mut c,
            CustomChange::ObjectArrayEdit {
                add: vec![json!({"id": 5})],
                remove: vec![json!({"id": 1, "breed": "cat"})],
                update: vec![ObjectUpdate {
                    key: "id".into(),
                    value: json!(4),
                    new_object: json!({"breed": "goldfish"}).as_object().unwrap().clone(),
                }],
            },
        );
        assert_eq!(c["a"], json!([{"id": 4, "breed": "goldfish"}, {"id": 5}]));

        // Editing one object of a long array keeps every other object (the cap of 25 is for
        // arrays of scalars).
        let long: Vec<Value> = (0..30).map(|i| json!({"id": i})).collect();
        apply(&mut c, CustomChange::Set(Value::Array(long)));
        apply(
            &mut c,
            CustomChange::ObjectArrayEdit {
                add: vec![json!({"id": 30})],
                remove: vec![],
                update: vec![ObjectUpdate {
                    key: "id".into(),
                    value: json!(29),
                    new_object: json!({"name": "rex"}).as_object().unwrap().clone(),
                }],
            },
        );
        let items = c["a"].as_array().unwrap();
        assert_eq!(items.len(), 31);
        assert_eq!(
            (&items[0], &items[29]),
            (&json!({"id": 0}), &json!({"id": 29, "name": "rex"}))
        );
    }

    #[test]
    fn array_edits_never_mix_objects_and_scalars() {
        let mut c = Map::new();
        apply(&mut c, CustomChange::Set(json!({"k": 1})));
        apply(
            &mut c,
            CustomChange::ArrayEdit {
                add: vec![json!("y")],
                remove: vec![],
            },
        );
        assert_eq!(c["a"], json!(["y"]));
        apply(
            &mut c,
            CustomChange::ObjectArrayEdit {
                add: vec![json!({"x": 1})],
                remove: vec![],
                update: vec![],
            },
        );
        assert_eq!(c["a"], json!([{"x": 1}]));
        apply(
            &mut c,
            CustomChange::ArrayEdit {
                add: vec![json!("z")],
                remove: vec![],
            },
        );
        assert_eq!(c["a"], json!(["z"]));
        // A scalar still becomes the array's first element.
        apply(&mut c, CustomChange::Set(json!("s")));
        apply(
            &mut c,
            CustomChange::ArrayEdit {
                add: vec![json!("t")],
                remove: vec![],
            },
        );
        assert_eq!(c["a"], json!(["s", "t"]));
    }

    #[test]
    fn float_increments_saturate_rather_than_becoming_null() {
        let mut c = Map::new();
        apply(&mut c, CustomChange::Set(json!(1.7e308)));
        let by = serde_json::Number::from_f64(1.7e308).unwrap();
        apply(&mut c, CustomChange::Increment(by.clone()));
        assert_eq!(c["a"], json!(f64::MAX));
        let down = serde_json::Number::from_f64(-1.7e308).unwrap();
        apply(&mut c, CustomChange::Set(json!(-1.7e308)));
        apply(&mut c, CustomChange::Increment(down));
        assert_eq!(c["a"], json!(-f64::MAX));
    }

    #[test]
    fn merge_object_is_deep() {
        let mut c = Map::new();
        apply(&mut c, CustomChange::Set(json!({"x": {"y": 1, "z": 2}})));
        apply(
            &mut c,
            CustomChange::MergeObject(json!({"x": {"y": 3}}).as_object().unwrap().clone()),
        );
        assert_eq!(c["a"], json!({"x": {"y": 3, "z": 2}}));
    }
}
