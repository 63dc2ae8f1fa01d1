//! The filter language: the AST of a segment definition and its wire form.
//!
//! A [`Filter`] is what the management API stores for a segment. It is built only by parsing the
//! wire form ([`Filter::from_json`], in `parse.rs`), which checks every shape, operator and value,
//! and it prints back to exactly that wire form ([`Filter::to_json`]). Values that need work to be
//! usable (times, regular expressions) are parsed once here and keep their original text, so the
//! round trip is exact.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use regex::Regex;
use serde_json::{Map, Number, Value, json};

use crate::datetime::parse_time;

/// A segment filter. The parser only produces well-formed trees: `And`/`Or` are never empty,
/// `Attribute` never names one of the reserved names (`age`, `email_available`,
/// `phone_available`), which have their own variants.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    /// `{"and": [f, …]}`: every child matches.
    And(Vec<Filter>),
    /// `{"or": [f, …]}`: at least one child matches.
    Or(Vec<Filter>),
    /// `{"not": f}`: the child does not match.
    Not(Box<Filter>),
    /// `{"cohort": {"partner", "cohort_id", "op"}}`: membership of a partner cohort (Heap Cohorts).
    Cohort(CohortFilter),
    /// `{"attribute": {"name", "op", "value"}}` on a standard or custom attribute.
    Attribute {
        /// The attribute's name (standard attributes by their Braze name).
        name: String,
        /// What to test.
        op: AttributeOp,
    },
    /// `{"attribute": {"name": "age", …}}`: whole years since `dob` at evaluation time.
    Age {
        /// The comparison.
        op: NumberOp,
        /// The number compared with.
        value: Number,
    },
    /// `{"attribute": {"name": "email_available", "op": "equals", "value": b}}`.
    EmailAvailable(bool),
    /// `{"attribute": {"name": "phone_available", "op": "equals", "value": b}}`.
    PhoneAvailable(bool),
    /// `{"event": {"name", "op", "value", "within_days"?}}` on a custom event.
    Event {
        /// The custom event's name.
        name: String,
        /// What to test.
        op: EventOp,
    },
    /// `{"purchase": {…}}`.
    Purchase(PurchaseOp),
    /// `{"in_segment": "id"}`: membership of another segment, resolved through a [`SegmentLookup`].
    InSegment(String),
    /// `{"random_bucket": {"min", "max"}}`: the profile's stable bucket (0–9999) is in `min..=max`.
    RandomBucket {
        /// Lowest bucket, inclusive.
        min: u16,
        /// Highest bucket, inclusive.
        max: u16,
    },
    /// `{"created": {"op": "before" | "after", "value": "<ISO-8601>"}}`, strict comparisons.
    Created {
        /// Before or after.
        op: TimeOp,
        /// The instant compared with.
        at: Timestamp,
    },
    /// `{"identified": b}`: the profile has an `external_id` (`true`) or not (`false`).
    Identified(bool),
}

/// A partner cohort filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CohortFilter {
    /// Partner name, e.g. `heap`.
    pub partner: String,
    /// The partner's cohort id.
    pub cohort_id: String,
    /// Includes or excludes.
    pub op: CohortOp,
}

/// Cohort operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CohortOp {
    /// Member of the cohort.
    Includes,
    /// Not a member of the cohort.
    Excludes,
}

/// Attribute operators. Negative operators are exact complements of their positive twin: a
/// profile without the attribute matches `not_equals`, `not_includes_value` and `exists: false`.
/// No operator converts between types: `"5"` is not the number 5.
#[derive(Clone, Debug, PartialEq)]
pub enum AttributeOp {
    /// The value is this string (case-sensitive).
    StringEquals(String),
    /// Not [`AttributeOp::StringEquals`].
    StringNotEquals(String),
    /// The value is a string the regular expression matches (anywhere, as `Regex::is_match`).
    Matches(Pattern),
    /// The value is a string starting with this prefix.
    StartsWith(String),
    /// The attribute is absent, null, or a string of only whitespace.
    IsBlank,
    /// `true`: present and not null; `false`: absent or null.
    Exists(bool),
    /// The value is a number and compares so (as `f64`).
    Number(NumberOp, Number),
    /// The value is this boolean.
    BoolEquals(bool),
    /// The value is an ISO-8601 string strictly before this instant.
    Before(Timestamp),
    /// The value is an ISO-8601 string strictly after this instant.
    After(Timestamp),
    /// The value is an ISO-8601 string strictly before `now − days`.
    MoreThanDaysAgo(u32),
    /// The value is an ISO-8601 string in `(now − days, now]`.
    LessThanDaysAgo(u32),
    /// The value is an ISO-8601 string in `(now, now + days]`.
    WithinDaysFuture(u32),
    /// The value is an array with an element equal to this one.
    IncludesValue(ArrayElement),
    /// Not [`AttributeOp::IncludesValue`].
    NotIncludesValue(ArrayElement),
    /// The value is an array of exactly this many elements.
    SizeEquals(u32),
    /// The value is an array of more elements.
    SizeGreaterThan(u32),
    /// The value is an array of fewer elements.
    SizeLessThan(u32),
}

/// Number comparisons (`value` on the right: `attribute > value`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumberOp {
    /// `==`
    Equals,
    /// Not `==` (also true when the value is missing or not a number).
    NotEquals,
    /// `>`
    GreaterThan,
    /// `>=`
    GreaterOrEqual,
    /// `<`
    LessThan,
    /// `<=`
    LessOrEqual,
}

/// An element looked for in an array attribute.
#[derive(Clone, Debug, PartialEq)]
pub enum ArrayElement {
    /// A string element (exact match).
    String(String),
    /// A number element (compared as `f64`).
    Number(Number),
}

/// Count comparisons for events and purchases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountOp {
    /// `count >= value`
    AtLeast,
    /// `count <= value` (users who never did it count 0)
    AtMost,
    /// `count == value`
    Exactly,
}

/// Strict before/after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeOp {
    /// `t < at`
    Before,
    /// `t > at`
    After,
}

/// Event operators. Counting windows are `[now − days·86400, now]`; without `within_days` every
/// occurrence counts.
#[derive(Clone, Debug, PartialEq)]
pub enum EventOp {
    /// Compare the number of occurrences.
    Count {
        /// The comparison.
        op: CountOp,
        /// The count compared with.
        value: u32,
        /// Only occurrences in the last `within_days` days; `None` = ever.
        within_days: Option<u32>,
    },
    /// The first occurrence is strictly before/after the instant (never performed: no match).
    FirstPerformed(TimeOp, Timestamp),
    /// The last occurrence is strictly before/after the instant (never performed: no match).
    LastPerformed(TimeOp, Timestamp),
    /// At least one occurrence in `[now − days·86400, now]`.
    LastPerformedWithinDays(u32),
}

/// Purchase operators.
#[derive(Clone, Debug, PartialEq)]
pub enum PurchaseOp {
    /// Compare the number of purchases (of one product, or of any).
    Count {
        /// Only purchases of this product; `None` = any product.
        product_id: Option<String>,
        /// The comparison.
        op: CountOp,
        /// The count compared with.
        value: u32,
        /// Only purchases in the last `within_days` days; `None` = ever.
        within_days: Option<u32>,
    },
    /// The sum of all prices (in profile order, as `f64`) is `>= value`; no purchases sum to 0.
    TotalSpendAtLeast(Number),
    /// The sum of all prices is `<= value`.
    TotalSpendAtMost(Number),
    /// `true`: at least one purchase; `false`: none.
    MadeAny(bool),
}

/// An instant given as ISO-8601 text: the text (kept for the exact wire form) and its unix second.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timestamp {
    text: String,
    unix: i64,
}

impl Timestamp {
    /// Parses ISO-8601 text (RFC 3339, or a date/time without zone taken as UTC).
    pub fn parse(text: &str) -> Option<Self> {
        parse_time(text).map(|unix| Self {
            text: text.to_owned(),
            unix,
        })
    }

    /// Unix seconds.
    pub fn unix(&self) -> i64 {
        self.unix
    }

    /// The text it was parsed from.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A compiled regular expression that remembers its source (equality is by source).
#[derive(Clone, Debug)]
pub struct Pattern {
    regex: Regex,
}

impl Pattern {
    /// Compiles `source` with a 1 MiB compiled-size limit.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let regex = regex::RegexBuilder::new(source)
            .size_limit(1 << 20)
            .build()?;
        Ok(Self { regex })
    }

    /// The source text.
    pub fn as_str(&self) -> &str {
        self.regex.as_str()
    }

    /// Whether the expression matches somewhere in `text`.
    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// Resolves `in_segment` references: the filter of a stored segment by id.
pub trait SegmentLookup {
    /// The filter of segment `id`, or `None` if there is no such segment.
    fn filter(&self, id: &str) -> Option<Filter>;
}

/// A lookup that knows no segment.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSegments;

impl SegmentLookup for NoSegments {
    fn filter(&self, _id: &str) -> Option<Filter> {
        None
    }
}

impl SegmentLookup for BTreeMap<String, Filter> {
    fn filter(&self, id: &str) -> Option<Filter> {
        self.get(id).cloned()
    }
}

impl SegmentLookup for HashMap<String, Filter> {
    fn filter(&self, id: &str) -> Option<Filter> {
        self.get(id).cloned()
    }
}

/// Tells the validator which partner cohorts exist in the workspace.
pub trait CohortCatalog {
    /// Whether `cohort_id` of `partner` is known.
    fn cohort_exists(&self, partner: &str, cohort_id: &str) -> bool;
}

impl CohortCatalog for BTreeSet<(String, String)> {
    fn cohort_exists(&self, partner: &str, cohort_id: &str) -> bool {
        self.iter().any(|(p, c)| p == partner && c == cohort_id)
    }
}

impl NumberOp {
    pub(crate) fn wire(self) -> &'static str {
        match self {
            Self::Equals => "equals",
            Self::NotEquals => "not_equals",
            Self::GreaterThan => "greater_than",
            Self::GreaterOrEqual => "greater_or_equal",
            Self::LessThan => "less_than",
            Self::LessOrEqual => "less_or_equal",
        }
    }

    pub(crate) fn from_wire(op: &str) -> Option<Self> {
        Some(match op {
            "equals" => Self::Equals,
            "not_equals" => Self::NotEquals,
            "greater_than" => Self::GreaterThan,
            "greater_or_equal" => Self::GreaterOrEqual,
            "less_than" => Self::LessThan,
            "less_or_equal" => Self::LessOrEqual,
            _ => return None,
        })
    }
}

impl CountOp {
    pub(crate) fn wire(self) -> &'static str {
        match self {
            Self::AtLeast => "count_at_least",
            Self::AtMost => "count_at_most",
            Self::Exactly => "count_exactly",
        }
    }

    pub(crate) fn from_wire(op: &str) -> Option<Self> {
        Some(match op {
            "count_at_least" => Self::AtLeast,
            "count_at_most" => Self::AtMost,
            "count_exactly" => Self::Exactly,
            _ => return None,
        })
    }
}

impl TimeOp {
    pub(crate) fn wire(self) -> &'static str {
        match self {
            Self::Before => "before",
            Self::After => "after",
        }
    }
}

impl ArrayElement {
    fn to_json(&self) -> Value {
        match self {
            Self::String(s) => Value::String(s.clone()),
            Self::Number(n) => Value::Number(n.clone()),
        }
    }
}

impl AttributeOp {
    /// The wire operator name and value (`None` for `is_blank`).
    fn wire(&self) -> (&'static str, Option<Value>) {
        let days = |d: &u32| Some(json!(d));
        match self {
            Self::StringEquals(s) => ("equals", Some(json!(s))),
            Self::StringNotEquals(s) => ("not_equals", Some(json!(s))),
            Self::Matches(p) => ("matches", Some(json!(p.as_str()))),
            Self::StartsWith(s) => ("starts_with", Some(json!(s))),
            Self::IsBlank => ("is_blank", None),
            Self::Exists(b) => ("exists", Some(json!(b))),
            Self::Number(op, n) => (op.wire(), Some(Value::Number(n.clone()))),
            Self::BoolEquals(b) => ("equals", Some(json!(b))),
            Self::Before(t) => ("before", Some(json!(t.as_str()))),
            Self::After(t) => ("after", Some(json!(t.as_str()))),
            Self::MoreThanDaysAgo(d) => ("more_than_days_ago", days(d)),
            Self::LessThanDaysAgo(d) => ("less_than_days_ago", days(d)),
            Self::WithinDaysFuture(d) => ("within_days_future", days(d)),
            Self::IncludesValue(e) => ("includes_value", Some(e.to_json())),
            Self::NotIncludesValue(e) => ("not_includes_value", Some(e.to_json())),
            Self::SizeEquals(n) => ("size_equals", days(n)),
            Self::SizeGreaterThan(n) => ("size_greater_than", days(n)),
            Self::SizeLessThan(n) => ("size_less_than", days(n)),
        }
    }
}

fn attribute_json(name: &str, op: &str, value: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    m.insert("op".into(), json!(op));
    if let Some(v) = value {
        m.insert("value".into(), v);
    }
    json!({ "attribute": m })
}

fn count_json(m: &mut Map<String, Value>, op: CountOp, value: u32, within_days: Option<u32>) {
    m.insert("op".into(), json!(op.wire()));
    m.insert("value".into(), json!(value));
    if let Some(d) = within_days {
        m.insert("within_days".into(), json!(d));
    }
}

impl Filter {
    /// The wire form, exactly as the parser accepts it (`from_json(&f.to_json()) == Ok(f)`).
    pub fn to_json(&self) -> Value {
        match self {
            Self::And(fs) => json!({ "and": fs.iter().map(Self::to_json).collect::<Vec<_>>() }),
            Self::Or(fs) => json!({ "or": fs.iter().map(Self::to_json).collect::<Vec<_>>() }),
            Self::Not(f) => json!({ "not": f.to_json() }),
            Self::Cohort(c) => json!({ "cohort": {
                "partner": c.partner,
                "cohort_id": c.cohort_id,
                "op": match c.op { CohortOp::Includes => "includes", CohortOp::Excludes => "excludes" },
            }}),
            Self::Attribute { name, op } => {
                let (op, value) = op.wire();
                attribute_json(name, op, value)
            }
            Self::Age { op, value } => {
                attribute_json("age", op.wire(), Some(Value::Number(value.clone())))
            }
            Self::EmailAvailable(b) => attribute_json("email_available", "equals", Some(json!(b))),
            Self::PhoneAvailable(b) => attribute_json("phone_available", "equals", Some(json!(b))),
            Self::Event { name, op } => {
                let mut m = Map::new();
                m.insert("name".into(), json!(name));
                match op {
                    EventOp::Count {
                        op,
                        value,
                        within_days,
                    } => count_json(&mut m, *op, *value, *within_days),
                    EventOp::FirstPerformed(t, at) | EventOp::LastPerformed(t, at) => {
                        let first = matches!(op, EventOp::FirstPerformed(..));
                        let name = match (first, t) {
                            (true, TimeOp::Before) => "first_performed_before",
                            (true, TimeOp::After) => "first_performed_after",
                            (false, TimeOp::Before) => "last_performed_before",
                            (false, TimeOp::After) => "last_performed_after",
                        };
                        m.insert("op".into(), json!(name));
                        m.insert("value".into(), json!(at.as_str()));
                    }
                    EventOp::LastPerformedWithinDays(d) => {
                        m.insert("op".into(), json!("last_performed_within_days"));
                        m.insert("value".into(), json!(d));
                    }
                }
                json!({ "event": m })
            }
            Self::Purchase(op) => {
                let mut m = Map::new();
                match op {
                    PurchaseOp::Count {
                        product_id,
                        op,
                        value,
                        within_days,
                    } => {
                        if let Some(p) = product_id {
                            m.insert("product_id".into(), json!(p));
                        }
                        count_json(&mut m, *op, *value, *within_days);
                    }
                    PurchaseOp::TotalSpendAtLeast(n) => {
                        m.insert("op".into(), json!("total_spend_at_least"));
                        m.insert("value".into(), Value::Number(n.clone()));
                    }
                    PurchaseOp::TotalSpendAtMost(n) => {
                        m.insert("op".into(), json!("total_spend_at_most"));
                        m.insert("value".into(), Value::Number(n.clone()));
                    }
                    PurchaseOp::MadeAny(b) => {
                        m.insert("op".into(), json!("made_any"));
                        m.insert("value".into(), json!(b));
                    }
                }
                json!({ "purchase": m })
            }
            Self::InSegment(id) => json!({ "in_segment": id }),
            Self::RandomBucket { min, max } => {
                json!({ "random_bucket": { "min": min, "max": max } })
            }
            Self::Created { op, at } => {
                json!({ "created": { "op": op.wire(), "value": at.as_str() } })
            }
            Self::Identified(b) => json!({ "identified": b }),
        }
    }
}
