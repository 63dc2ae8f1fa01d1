//! Parsing the wire form into a [`Filter`] and validating it against the workspace.
//!
//! Two steps, because they need different things: [`Filter::from_json`] checks shape, operators
//! and values and needs nothing else; [`Filter::validate`] checks what only the workspace knows
//! (cohorts exist, referenced segments exist and do not form a cycle). [`Filter::parse`] does
//! both. Every error names the JSON path of the node at fault.

use std::collections::HashSet;

use serde_json::{Map, Number, Value};

use crate::error::{FilterError, FilterErrorKind as K};
use crate::filter::{
    ArrayElement, AttributeOp, CohortCatalog, CohortFilter, CohortOp, CountOp, EventOp, Filter,
    NumberOp, Pattern, PurchaseOp, SegmentLookup, TimeOp, Timestamp,
};

/// Deepest nesting of `and` / `or` / `not` accepted.
pub const MAX_DEPTH: usize = 64;

const FILTER_KEYS: [&str; 11] = [
    "and",
    "or",
    "not",
    "cohort",
    "attribute",
    "event",
    "purchase",
    "in_segment",
    "random_bucket",
    "created",
    "identified",
];

/// Standard string attributes (Braze names).
const STANDARD_STRINGS: [&str; 11] = [
    "first_name",
    "last_name",
    "email",
    "phone",
    "country",
    "home_city",
    "language",
    "gender",
    "time_zone",
    "email_subscribe",
    "push_subscribe",
];

const STRING_OPS: [&str; 6] = [
    "equals",
    "not_equals",
    "matches",
    "starts_with",
    "is_blank",
    "exists",
];
const NUMBER_OPS: [&str; 6] = [
    "equals",
    "not_equals",
    "greater_than",
    "greater_or_equal",
    "less_than",
    "less_or_equal",
];
const TIME_OPS: [&str; 5] = [
    "before",
    "after",
    "more_than_days_ago",
    "less_than_days_ago",
    "within_days_future",
];
const ARRAY_OPS: [&str; 5] = [
    "includes_value",
    "not_includes_value",
    "size_equals",
    "size_greater_than",
    "size_less_than",
];

/// What the validator may consult.
#[derive(Clone, Copy)]
pub struct ValidationContext<'a> {
    /// Which partner cohorts exist.
    pub cohorts: &'a dyn CohortCatalog,
    /// The workspace's stored segments, for `in_segment`.
    pub segments: &'a dyn SegmentLookup,
    /// The id of the segment this filter defines, when saving one: a reference back to it is a
    /// cycle (its stored, old filter is not consulted).
    pub segment_id: Option<&'a str>,
}

impl Filter {
    /// Parses the wire form, checking shape, operators and values (not the workspace: see
    /// [`Filter::validate`]).
    pub fn from_json(value: &Value) -> Result<Filter, FilterError> {
        filter(value, "$", 0)
    }

    /// Checks the filter against the workspace: every cohort exists, every `in_segment` resolves
    /// (transitively) and no chain of `in_segment` references loops.
    pub fn validate(&self, ctx: &ValidationContext<'_>) -> Result<(), FilterError> {
        let mut resolved = HashSet::new();
        validate(self, "$", ctx, &mut resolved)
    }

    /// [`Filter::from_json`] then [`Filter::validate`].
    pub fn parse(value: &Value, ctx: &ValidationContext<'_>) -> Result<Filter, FilterError> {
        let f = Self::from_json(value)?;
        f.validate(ctx)?;
        Ok(f)
    }
}

fn child(path: &str, key: &str) -> String {
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        format!("{path}.{key}")
    } else {
        format!("{path}[{}]", Value::String(key.to_owned()))
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn err(kind: K, path: &str, message: impl Into<String>) -> FilterError {
    FilterError::new(kind, path, message)
}

fn filter(v: &Value, path: &str, depth: usize) -> Result<Filter, FilterError> {
    if depth > MAX_DEPTH {
        return Err(err(
            K::TooDeep,
            path,
            format!("filters nest deeper than {MAX_DEPTH} levels"),
        ));
    }
    let Value::Object(obj) = v else {
        return Err(err(
            K::InvalidValue,
            path,
            format!("expected a filter object, got {}", describe(v)),
        ));
    };
    if let Some(k) = obj.keys().find(|k| !FILTER_KEYS.contains(&k.as_str())) {
        return Err(err(
            K::UnknownKey,
            &child(path, k),
            format!("unknown filter '{k}'"),
        ));
    }
    let mut entries = obj.iter();
    let (key, inner) = match (entries.next(), obj.len()) {
        (Some(entry), 1) => entry,
        (None, _) => {
            return Err(err(
                K::MissingField,
                path,
                format!(
                    "empty filter object: expected one of {}",
                    quoted(&FILTER_KEYS)
                ),
            ));
        }
        (Some(_), n) => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(err(
                K::UnknownKey,
                path,
                format!(
                    "a filter object has exactly one key, got {n}: {}",
                    quoted(&keys)
                ),
            ));
        }
    };
    let path = &child(path, key);
    match key.as_str() {
        "and" | "or" => {
            let Value::Array(items) = inner else {
                return Err(err(
                    K::InvalidValue,
                    path,
                    format!("expected an array of filters, got {}", describe(inner)),
                ));
            };
            if items.is_empty() {
                return Err(err(
                    K::EmptyGroup,
                    path,
                    format!("an '{key}' group needs at least one filter"),
                ));
            }
            let children = items
                .iter()
                .enumerate()
                .map(|(i, item)| filter(item, &format!("{path}[{i}]"), depth + 1))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if key == "and" {
                Filter::And(children)
            } else {
                Filter::Or(children)
            })
        }
        "not" => Ok(Filter::Not(Box::new(filter(inner, path, depth + 1)?))),
        "cohort" => cohort(inner, path),
        "attribute" => attribute(inner, path),
        "event" => event(inner, path),
        "purchase" => purchase(inner, path),
        "in_segment" => match inner {
            Value::String(id) if !id.is_empty() => Ok(Filter::InSegment(id.clone())),
            _ => Err(err(
                K::InvalidValue,
                path,
                format!(
                    "expected a segment id (a non-empty string), got {}",
                    describe(inner)
                ),
            )),
        },
        "random_bucket" => random_bucket(inner, path),
        "created" => created(inner, path),
        _ => match inner {
            Value::Bool(b) => Ok(Filter::Identified(*b)),
            _ => Err(err(
                K::InvalidValue,
                path,
                format!("expected a boolean, got {}", describe(inner)),
            )),
        },
    }
}

fn quoted(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An object whose keys are all in `allowed`.
fn object<'v>(
    v: &'v Value,
    path: &str,
    allowed: &[&str],
) -> Result<&'v Map<String, Value>, FilterError> {
    let Value::Object(m) = v else {
        return Err(err(
            K::InvalidValue,
            path,
            format!("expected an object, got {}", describe(v)),
        ));
    };
    if let Some(k) = m.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(err(
            K::UnknownKey,
            &child(path, k),
            format!("unknown key '{k}' (expected {})", quoted(allowed)),
        ));
    }
    Ok(m)
}

fn required<'v>(
    m: &'v Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<&'v Value, FilterError> {
    m.get(key)
        .ok_or_else(|| err(K::MissingField, path, format!("missing field '{key}'")))
}

fn required_str<'v>(
    m: &'v Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<&'v str, FilterError> {
    match required(m, path, key)? {
        Value::String(s) if !s.is_empty() => Ok(s),
        Value::String(_) => Err(err(
            K::InvalidValue,
            &child(path, key),
            format!("'{key}' must not be empty"),
        )),
        other => Err(err(
            K::InvalidValue,
            &child(path, key),
            format!("expected a string, got {}", describe(other)),
        )),
    }
}

/// The `op` field: any string (an empty or unknown one is reported by the caller as unknown).
fn op_field<'v>(m: &'v Map<String, Value>, path: &str) -> Result<&'v str, FilterError> {
    match required(m, path, "op")? {
        Value::String(s) => Ok(s),
        other => Err(err(
            K::InvalidValue,
            &child(path, "op"),
            format!("expected an operator name, got {}", describe(other)),
        )),
    }
}

/// Reads `value` for operator `op`.
struct ValueField<'v> {
    value: Option<&'v Value>,
    path: &'v str,
    value_path: String,
    op: &'v str,
}

impl<'v> ValueField<'v> {
    fn new(m: &'v Map<String, Value>, path: &'v str, op: &'v str) -> Self {
        Self {
            value: m.get("value"),
            path,
            value_path: child(path, "value"),
            op,
        }
    }

    fn get(&self) -> Result<&'v Value, FilterError> {
        self.value
            .ok_or_else(|| err(K::MissingField, self.path, "missing field 'value'"))
    }

    fn wrong(&self, expected: &str, got: &Value) -> FilterError {
        err(
            K::InvalidValue,
            &self.value_path,
            format!(
                "operator '{}' expects {expected}, got {}",
                self.op,
                describe(got)
            ),
        )
    }

    fn string(&self) -> Result<String, FilterError> {
        match self.get()? {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.wrong("a string", other)),
        }
    }

    fn boolean(&self) -> Result<bool, FilterError> {
        match self.get()? {
            Value::Bool(b) => Ok(*b),
            other => Err(self.wrong("a boolean", other)),
        }
    }

    fn number(&self) -> Result<Number, FilterError> {
        match self.get()? {
            Value::Number(n) => Ok(n.clone()),
            other => Err(self.wrong("a number", other)),
        }
    }

    fn count(&self) -> Result<u32, FilterError> {
        let v = self.get()?;
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.wrong("a non-negative integer", v))
    }

    fn time(&self) -> Result<Timestamp, FilterError> {
        match self.get()? {
            Value::String(s) => Timestamp::parse(s).ok_or_else(|| {
                err(
                    K::InvalidValue,
                    &self.value_path,
                    format!("invalid ISO-8601 time '{s}'"),
                )
            }),
            other => Err(self.wrong("an ISO-8601 time string", other)),
        }
    }

    fn pattern(&self) -> Result<Pattern, FilterError> {
        let source = self.string()?;
        Pattern::new(&source).map_err(|e| {
            err(
                K::InvalidRegex,
                &self.value_path,
                format!("invalid regular expression: {e}"),
            )
        })
    }

    fn element(&self) -> Result<ArrayElement, FilterError> {
        match self.get()? {
            Value::String(s) => Ok(ArrayElement::String(s.clone())),
            Value::Number(n) => Ok(ArrayElement::Number(n.clone())),
            other => Err(self.wrong("a string or a number", other)),
        }
    }

    fn none(&self) -> Result<(), FilterError> {
        match self.value {
            None => Ok(()),
            Some(_) => Err(err(
                K::UnknownKey,
                &self.value_path,
                format!("operator '{}' takes no value", self.op),
            )),
        }
    }
}

fn cohort(v: &Value, path: &str) -> Result<Filter, FilterError> {
    let m = object(v, path, &["partner", "cohort_id", "op"])?;
    let partner = required_str(m, path, "partner")?.to_owned();
    let cohort_id = required_str(m, path, "cohort_id")?.to_owned();
    let op = match op_field(m, path)? {
        "includes" => CohortOp::Includes,
        "excludes" => CohortOp::Excludes,
        other => {
            return Err(err(
                K::UnknownOperator,
                &child(path, "op"),
                format!(
                    "unknown operator '{other}' for a cohort filter (expected 'includes' or 'excludes')"
                ),
            ));
        }
    };
    Ok(Filter::Cohort(CohortFilter {
        partner,
        cohort_id,
        op,
    }))
}

/// The kind of a standard attribute, or of a custom one as guessed from its `value`, for messages.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    String,
    Date,
    Number,
    Boolean,
    Array,
    Unknown,
}

impl Kind {
    fn phrase(self) -> &'static str {
        match self {
            Self::String => "a string attribute",
            Self::Date => "a date attribute",
            Self::Number => "a number attribute",
            Self::Boolean => "a boolean attribute",
            Self::Array => "an array attribute",
            Self::Unknown => "an attribute",
        }
    }

    fn of_value(v: Option<&Value>) -> Self {
        match v {
            Some(Value::String(_)) => Self::String,
            Some(Value::Number(_)) => Self::Number,
            Some(Value::Bool(_)) => Self::Boolean,
            Some(Value::Array(_)) => Self::Array,
            _ => Self::Unknown,
        }
    }
}

fn attribute(v: &Value, path: &str) -> Result<Filter, FilterError> {
    let m = object(v, path, &["name", "op", "value"])?;
    let name = required_str(m, path, "name")?;
    let op = op_field(m, path)?;
    let op_path = child(path, "op");
    let value = ValueField::new(m, path, op);
    let unknown = |kind: Kind| {
        err(
            K::UnknownOperator,
            &op_path,
            format!("unknown operator '{op}' for {}", kind.phrase()),
        )
    };
    match name {
        "age" => {
            let op = NumberOp::from_wire(op).ok_or_else(|| unknown(Kind::Number))?;
            Ok(Filter::Age {
                op,
                value: value.number()?,
            })
        }
        "email_available" | "phone_available" => {
            if op != "equals" {
                return Err(unknown(Kind::Boolean));
            }
            let b = value.boolean()?;
            Ok(if name == "email_available" {
                Filter::EmailAvailable(b)
            } else {
                Filter::PhoneAvailable(b)
            })
        }
        _ => {
            let standard = if STANDARD_STRINGS.contains(&name) {
                Some(Kind::String)
            } else if name == "dob" {
                Some(Kind::Date)
            } else {
                None
            };
            let known = STRING_OPS.contains(&op)
                || NUMBER_OPS.contains(&op)
                || TIME_OPS.contains(&op)
                || ARRAY_OPS.contains(&op);
            let kind = standard.unwrap_or_else(|| Kind::of_value(value.value));
            if !known {
                return Err(unknown(kind));
            }
            if let Some(kind) = standard {
                let allowed =
                    STRING_OPS.contains(&op) || (kind == Kind::Date && TIME_OPS.contains(&op));
                if !allowed {
                    return Err(err(
                        K::UnknownOperator,
                        &op_path,
                        format!("operator '{op}' is not valid for {}", kind.phrase()),
                    ));
                }
            }
            let op = attribute_op(op, &value, standard.is_some())?;
            Ok(Filter::Attribute {
                name: name.to_owned(),
                op,
            })
        }
    }
}

/// The operator and value of a (standard or custom) value attribute. Standard attributes are
/// strings, so their `equals` / `not_equals` take only strings.
fn attribute_op(
    op: &str,
    value: &ValueField<'_>,
    standard: bool,
) -> Result<AttributeOp, FilterError> {
    Ok(match op {
        "equals" => match value.get()? {
            Value::String(s) => AttributeOp::StringEquals(s.clone()),
            _ if standard => return Err(value.wrong("a string", value.get()?)),
            Value::Number(n) => AttributeOp::Number(NumberOp::Equals, n.clone()),
            Value::Bool(b) => AttributeOp::BoolEquals(*b),
            other => return Err(value.wrong("a string, a number or a boolean", other)),
        },
        "not_equals" => match value.get()? {
            Value::String(s) => AttributeOp::StringNotEquals(s.clone()),
            _ if standard => return Err(value.wrong("a string", value.get()?)),
            Value::Number(n) => AttributeOp::Number(NumberOp::NotEquals, n.clone()),
            other => return Err(value.wrong("a string or a number", other)),
        },
        "matches" => AttributeOp::Matches(value.pattern()?),
        "starts_with" => AttributeOp::StartsWith(value.string()?),
        "is_blank" => {
            value.none()?;
            AttributeOp::IsBlank
        }
        "exists" => AttributeOp::Exists(value.boolean()?),
        "before" => AttributeOp::Before(value.time()?),
        "after" => AttributeOp::After(value.time()?),
        "more_than_days_ago" => AttributeOp::MoreThanDaysAgo(value.count()?),
        "less_than_days_ago" => AttributeOp::LessThanDaysAgo(value.count()?),
        "within_days_future" => AttributeOp::WithinDaysFuture(value.count()?),
        "includes_value" => AttributeOp::IncludesValue(value.element()?),
        "not_includes_value" => AttributeOp::NotIncludesValue(value.element()?),
        "size_equals" => AttributeOp::SizeEquals(value.count()?),
        "size_greater_than" => AttributeOp::SizeGreaterThan(value.count()?),
        "size_less_than" => AttributeOp::SizeLessThan(value.count()?),
        // the remaining known operators are the number comparisons
        _ => match NumberOp::from_wire(op) {
            Some(n) => AttributeOp::Number(n, value.number()?),
            None => {
                return Err(err(
                    K::UnknownOperator,
                    &child(value.path, "op"),
                    format!("unknown operator '{op}'"),
                ));
            }
        },
    })
}

fn within_days(
    m: &Map<String, Value>,
    path: &str,
    counting: bool,
) -> Result<Option<u32>, FilterError> {
    let Some(v) = m.get("within_days") else {
        return Ok(None);
    };
    let p = child(path, "within_days");
    if !counting {
        return Err(err(
            K::UnknownKey,
            &p,
            "'within_days' is only valid with the count operators",
        ));
    }
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            err(
                K::InvalidValue,
                &p,
                format!(
                    "'within_days' expects a non-negative integer, got {}",
                    describe(v)
                ),
            )
        })
}

fn event(v: &Value, path: &str) -> Result<Filter, FilterError> {
    let m = object(v, path, &["name", "op", "value", "within_days"])?;
    let name = required_str(m, path, "name")?.to_owned();
    let op = op_field(m, path)?;
    let value = ValueField::new(m, path, op);
    if let Some(count) = CountOp::from_wire(op) {
        let value = value.count()?;
        let within_days = within_days(m, path, true)?;
        return Ok(Filter::Event {
            name,
            op: EventOp::Count {
                op: count,
                value,
                within_days,
            },
        });
    }
    let op = match op {
        "first_performed_before" => EventOp::FirstPerformed(TimeOp::Before, value.time()?),
        "first_performed_after" => EventOp::FirstPerformed(TimeOp::After, value.time()?),
        "last_performed_before" => EventOp::LastPerformed(TimeOp::Before, value.time()?),
        "last_performed_after" => EventOp::LastPerformed(TimeOp::After, value.time()?),
        "last_performed_within_days" => EventOp::LastPerformedWithinDays(value.count()?),
        other => {
            return Err(err(
                K::UnknownOperator,
                &child(path, "op"),
                format!("unknown operator '{other}' for an event filter"),
            ));
        }
    };
    within_days(m, path, false)?;
    Ok(Filter::Event { name, op })
}

fn purchase(v: &Value, path: &str) -> Result<Filter, FilterError> {
    let m = object(v, path, &["product_id", "op", "value", "within_days"])?;
    let op = op_field(m, path)?;
    let value = ValueField::new(m, path, op);
    let product_id = match m.get("product_id") {
        None => None,
        Some(_) => Some(required_str(m, path, "product_id")?.to_owned()),
    };
    if let Some(count) = CountOp::from_wire(op) {
        let value = value.count()?;
        let within_days = within_days(m, path, true)?;
        return Ok(Filter::Purchase(PurchaseOp::Count {
            product_id,
            op: count,
            value,
            within_days,
        }));
    }
    let op = match op {
        "total_spend_at_least" => PurchaseOp::TotalSpendAtLeast(value.number()?),
        "total_spend_at_most" => PurchaseOp::TotalSpendAtMost(value.number()?),
        "made_any" => PurchaseOp::MadeAny(value.boolean()?),
        other => {
            return Err(err(
                K::UnknownOperator,
                &child(path, "op"),
                format!("unknown operator '{other}' for a purchase filter"),
            ));
        }
    };
    if product_id.is_some() {
        return Err(err(
            K::UnknownKey,
            &child(path, "product_id"),
            "'product_id' is only valid with the count operators",
        ));
    }
    within_days(m, path, false)?;
    Ok(Filter::Purchase(op))
}

fn random_bucket(v: &Value, path: &str) -> Result<Filter, FilterError> {
    let m = object(v, path, &["min", "max"])?;
    let bound = |key: &str| -> Result<u16, FilterError> {
        let v = required(m, path, key)?;
        v.as_u64()
            .filter(|&n| n <= 9999)
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| {
                err(
                    K::InvalidValue,
                    &child(path, key),
                    format!(
                        "expected an integer between 0 and 9999, got {}",
                        describe(v)
                    ),
                )
            })
    };
    let (min, max) = (bound("min")?, bound("max")?);
    if min > max {
        return Err(err(
            K::InvalidValue,
            path,
            format!("'min' ({min}) is greater than 'max' ({max})"),
        ));
    }
    Ok(Filter::RandomBucket { min, max })
}

fn created(v: &Value, path: &str) -> Result<Filter, FilterError> {
    let m = object(v, path, &["op", "value"])?;
    let op = op_field(m, path)?;
    let value = ValueField::new(m, path, op);
    let op = match op {
        "before" => TimeOp::Before,
        "after" => TimeOp::After,
        other => {
            return Err(err(
                K::UnknownOperator,
                &child(path, "op"),
                format!(
                    "unknown operator '{other}' for a created filter (expected 'before' or 'after')"
                ),
            ));
        }
    };
    Ok(Filter::Created {
        op,
        at: value.time()?,
    })
}

fn validate(
    f: &Filter,
    path: &str,
    ctx: &ValidationContext<'_>,
    resolved: &mut HashSet<String>,
) -> Result<(), FilterError> {
    match f {
        Filter::And(fs) | Filter::Or(fs) => {
            let key = if matches!(f, Filter::And(_)) {
                "and"
            } else {
                "or"
            };
            for (i, c) in fs.iter().enumerate() {
                validate(c, &format!("{path}.{key}[{i}]"), ctx, resolved)?;
            }
            Ok(())
        }
        Filter::Not(c) => validate(c, &format!("{path}.not"), ctx, resolved),
        Filter::Cohort(c) => {
            if ctx.cohorts.cohort_exists(&c.partner, &c.cohort_id) {
                Ok(())
            } else {
                Err(err(
                    K::UnknownCohort,
                    &format!("{path}.cohort.cohort_id"),
                    format!(
                        "unknown cohort '{}' of partner '{}'",
                        c.cohort_id, c.partner
                    ),
                ))
            }
        }
        Filter::InSegment(id) => {
            let mut chain: Vec<String> = ctx.segment_id.map(str::to_owned).into_iter().collect();
            segment(id, &format!("{path}.in_segment"), ctx, &mut chain, resolved)
        }
        _ => Ok(()),
    }
}

/// Depth-first walk of `in_segment` references from `id`; `chain` is the current path of
/// segment ids, `resolved` the ids already known to be acyclic and resolvable.
fn segment(
    id: &str,
    path: &str,
    ctx: &ValidationContext<'_>,
    chain: &mut Vec<String>,
    resolved: &mut HashSet<String>,
) -> Result<(), FilterError> {
    if let Some(start) = chain.iter().position(|c| c == id) {
        let mut ids: Vec<&str> = chain[start..].iter().map(String::as_str).collect();
        ids.push(id);
        return Err(err(
            K::SegmentCycle,
            path,
            format!("segment membership cycle: {}", ids.join(" → ")),
        ));
    }
    if resolved.contains(id) {
        return Ok(());
    }
    let Some(f) = ctx.segments.filter(id) else {
        let referrer = chain
            .last()
            .filter(|_| chain.len() > usize::from(ctx.segment_id.is_some()));
        return Err(err(
            K::UnknownSegment,
            path,
            match referrer {
                Some(r) => format!("unknown segment '{id}' (referenced by segment '{r}')"),
                None => format!("unknown segment '{id}'"),
            },
        ));
    };
    chain.push(id.to_owned());
    let mut refs = Vec::new();
    references(&f, &mut refs);
    for r in refs {
        segment(&r, path, ctx, chain, resolved)?;
    }
    chain.pop();
    resolved.insert(id.to_owned());
    Ok(())
}

fn references(f: &Filter, out: &mut Vec<String>) {
    match f {
        Filter::And(fs) | Filter::Or(fs) => fs.iter().for_each(|c| references(c, out)),
        Filter::Not(c) => references(c, out),
        Filter::InSegment(id) => out.push(id.clone()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::{Value, json};

    use super::*;
    use crate::filter::NoSegments;

    fn catalog() -> BTreeSet<(String, String)> {
        [("heap".to_owned(), "c1".to_owned())].into_iter().collect()
    }

    /// Asserts that `filter` is rejected with exactly this kind and `"path: message"`.
    fn rejects(filter: Value, kind: K, expected: &str) {
        let cohorts = catalog();
        let ctx = ValidationContext {
            cohorts: &cohorts,
            segments: &NoSegments,
            segment_id: None,
        };
        let e = Filter::parse(&filter, &ctx).expect_err(&filter.to_string());
        assert_eq!(e.to_string(), expected, "{filter}");
        assert_eq!(e.kind, kind, "{filter}");
    }

    #[test]
    fn the_example_from_the_brief() {
        rejects(
            json!({"and": [
                {"identified": true},
                {"attribute": {"name": "plan", "op": "equalz", "value": "pro"}}
            ]}),
            K::UnknownOperator,
            "$.and[1].attribute.op: unknown operator 'equalz' for a string attribute",
        );
    }

    #[test]
    fn shape_errors() {
        rejects(
            json!([]),
            K::InvalidValue,
            "$: expected a filter object, got an array",
        );
        rejects(
            json!({}),
            K::MissingField,
            "$: empty filter object: expected one of 'and', 'or', 'not', 'cohort', 'attribute', 'event', 'purchase', 'in_segment', 'random_bucket', 'created', 'identified'",
        );
        rejects(
            json!({"segment": 1}),
            K::UnknownKey,
            "$.segment: unknown filter 'segment'",
        );
        rejects(
            json!({"weird key": 1}),
            K::UnknownKey,
            "$[\"weird key\"]: unknown filter 'weird key'",
        );
        rejects(
            json!({"identified": true, "not": {"identified": true}}),
            K::UnknownKey,
            "$: a filter object has exactly one key, got 2: 'identified', 'not'",
        );
        rejects(
            json!({"and": []}),
            K::EmptyGroup,
            "$.and: an 'and' group needs at least one filter",
        );
        rejects(
            json!({"not": {"or": []}}),
            K::EmptyGroup,
            "$.not.or: an 'or' group needs at least one filter",
        );
        rejects(
            json!({"or": {"identified": true}}),
            K::InvalidValue,
            "$.or: expected an array of filters, got an object",
        );
        rejects(
            json!({"or": [{"identified": true}, 3]}),
            K::InvalidValue,
            "$.or[1]: expected a filter object, got the number 3",
        );
        rejects(
            json!({"identified": "yes"}),
            K::InvalidValue,
            "$.identified: expected a boolean, got a string",
        );
        rejects(
            json!({"in_segment": ""}),
            K::InvalidValue,
            "$.in_segment: expected a segment id (a non-empty string), got a string",
        );
        let mut deep = json!({"identified": true});
        for _ in 0..=MAX_DEPTH {
            deep = json!({ "not": deep });
        }
        let path = format!("${}", ".not".repeat(MAX_DEPTH + 1));
        rejects(
            deep,
            K::TooDeep,
            &format!("{path}: filters nest deeper than 64 levels"),
        );
    }

    #[test]
    fn cohort_errors() {
        rejects(
            json!({"cohort": {"partner": "heap", "cohort_id": "c1"}}),
            K::MissingField,
            "$.cohort: missing field 'op'",
        );
        rejects(
            json!({"cohort": {"partner": "heap", "cohort_id": "c1", "op": "contains"}}),
            K::UnknownOperator,
            "$.cohort.op: unknown operator 'contains' for a cohort filter (expected 'includes' or 'excludes')",
        );
        rejects(
            json!({"cohort": {"partner": "heap", "cohort": "c1", "op": "includes"}}),
            K::UnknownKey,
            "$.cohort.cohort: unknown key 'cohort' (expected 'partner', 'cohort_id', 'op')",
        );
        rejects(
            json!({"cohort": {"partner": "", "cohort_id": "c1", "op": "includes"}}),
            K::InvalidValue,
            "$.cohort.partner: 'partner' must not be empty",
        );
        rejects(
            json!({"or": [{"cohort": {"partner": "heap", "cohort_id": "c9", "op": "includes"}}]}),
            K::UnknownCohort,
            "$.or[0].cohort.cohort_id: unknown cohort 'c9' of partner 'heap'",
        );
        rejects(
            json!({"cohort": {"partner": "mix", "cohort_id": "c1", "op": "excludes"}}),
            K::UnknownCohort,
            "$.cohort.cohort_id: unknown cohort 'c1' of partner 'mix'",
        );
    }

    #[test]
    fn attribute_errors() {
        let a = |v: Value| json!({ "attribute": v });
        rejects(
            a(json!({"op": "exists", "value": true})),
            K::MissingField,
            "$.attribute: missing field 'name'",
        );
        rejects(
            a(json!({"name": "plan", "value": "x"})),
            K::MissingField,
            "$.attribute: missing field 'op'",
        );
        rejects(
            a(json!({"name": "plan", "op": "equals"})),
            K::MissingField,
            "$.attribute: missing field 'value'",
        );
        rejects(
            a(json!({"name": "plan", "op": 3, "value": "x"})),
            K::InvalidValue,
            "$.attribute.op: expected an operator name, got the number 3",
        );
        rejects(
            a(json!({"name": "plan", "op": "equals", "value": "x", "case": "insensitive"})),
            K::UnknownKey,
            "$.attribute.case: unknown key 'case' (expected 'name', 'op', 'value')",
        );
        rejects(
            a(json!({"name": "score", "op": "bigger", "value": 3})),
            K::UnknownOperator,
            "$.attribute.op: unknown operator 'bigger' for a number attribute",
        );
        rejects(
            a(json!({"name": "tags", "op": "has", "value": ["a"]})),
            K::UnknownOperator,
            "$.attribute.op: unknown operator 'has' for an array attribute",
        );
        rejects(
            a(json!({"name": "x", "op": "nope", "value": null})),
            K::UnknownOperator,
            "$.attribute.op: unknown operator 'nope' for an attribute",
        );
        rejects(
            a(json!({"name": "email", "op": "greater_than", "value": 3})),
            K::UnknownOperator,
            "$.attribute.op: operator 'greater_than' is not valid for a string attribute",
        );
        rejects(
            a(json!({"name": "dob", "op": "size_equals", "value": 3})),
            K::UnknownOperator,
            "$.attribute.op: operator 'size_equals' is not valid for a date attribute",
        );
        rejects(
            a(json!({"name": "email", "op": "equals", "value": 3})),
            K::InvalidValue,
            "$.attribute.value: operator 'equals' expects a string, got the number 3",
        );
        rejects(
            a(json!({"name": "plan", "op": "equals", "value": ["pro"]})),
            K::InvalidValue,
            "$.attribute.value: operator 'equals' expects a string, a number or a boolean, got an array",
        );
        rejects(
            a(json!({"name": "vip", "op": "not_equals", "value": true})),
            K::InvalidValue,
            "$.attribute.value: operator 'not_equals' expects a string or a number, got a boolean",
        );
        rejects(
            a(json!({"name": "score", "op": "greater_than", "value": "3"})),
            K::InvalidValue,
            "$.attribute.value: operator 'greater_than' expects a number, got a string",
        );
        rejects(
            a(json!({"name": "plan", "op": "matches", "value": "(unclosed"})),
            K::InvalidRegex,
            &format!(
                "$.attribute.value: invalid regular expression: {}",
                regex::Regex::new(&format!("({}", "unclosed")).unwrap_err()
            ),
        );
        rejects(
            a(json!({"name": "plan", "op": "is_blank", "value": true})),
            K::UnknownKey,
            "$.attribute.value: operator 'is_blank' takes no value",
        );
        rejects(
            a(json!({"name": "plan", "op": "exists", "value": "yes"})),
            K::InvalidValue,
            "$.attribute.value: operator 'exists' expects a boolean, got a string",
        );
        rejects(
            a(json!({"name": "renewal", "op": "before", "value": "2024-13-01"})),
            K::InvalidValue,
            "$.attribute.value: invalid ISO-8601 time '2024-13-01'",
        );
        rejects(
            a(json!({"name": "renewal", "op": "after", "value": 1_700_000_000})),
            K::InvalidValue,
            "$.attribute.value: operator 'after' expects an ISO-8601 time string, got the number 1700000000",
        );
        rejects(
            a(json!({"name": "renewal", "op": "more_than_days_ago", "value": -3})),
            K::InvalidValue,
            "$.attribute.value: operator 'more_than_days_ago' expects a non-negative integer, got the number -3",
        );
        rejects(
            a(json!({"name": "tags", "op": "size_equals", "value": 1.5})),
            K::InvalidValue,
            "$.attribute.value: operator 'size_equals' expects a non-negative integer, got the number 1.5",
        );
        rejects(
            a(json!({"name": "tags", "op": "includes_value", "value": true})),
            K::InvalidValue,
            "$.attribute.value: operator 'includes_value' expects a string or a number, got a boolean",
        );
        rejects(
            a(json!({"name": "age", "op": "before", "value": "2000-01-01"})),
            K::UnknownOperator,
            "$.attribute.op: unknown operator 'before' for a number attribute",
        );
        rejects(
            a(json!({"name": "age", "op": "greater_than", "value": "30"})),
            K::InvalidValue,
            "$.attribute.value: operator 'greater_than' expects a number, got a string",
        );
        rejects(
            a(json!({"name": "email_available", "op": "not_equals", "value": true})),
            K::UnknownOperator,
            "$.attribute.op: unknown operator 'not_equals' for a boolean attribute",
        );
        rejects(
            a(json!({"name": "phone_available", "op": "equals", "value": 1})),
            K::InvalidValue,
            "$.attribute.value: operator 'equals' expects a boolean, got the number 1",
        );
    }

    #[test]
    fn event_errors() {
        rejects(
            json!({"event": {"name": "x", "op": "count_at_least", "value": 2, "within_days": "30"}}),
            K::InvalidValue,
            "$.event.within_days: 'within_days' expects a non-negative integer, got a string",
        );
        rejects(
            json!({"event": {"name": "x", "op": "first_performed_before", "value": "2024-01-01", "within_days": 3}}),
            K::UnknownKey,
            "$.event.within_days: 'within_days' is only valid with the count operators",
        );
        rejects(
            json!({"event": {"name": "x", "op": "performed", "value": 1}}),
            K::UnknownOperator,
            "$.event.op: unknown operator 'performed' for an event filter",
        );
        rejects(
            json!({"event": {"name": "x", "op": "count_exactly"}}),
            K::MissingField,
            "$.event: missing field 'value'",
        );
        rejects(
            json!({"event": {"op": "count_exactly", "value": 1}}),
            K::MissingField,
            "$.event: missing field 'name'",
        );
        rejects(
            json!({"event": {"name": "x", "op": "count_at_most", "value": 5_000_000_000u64}}),
            K::InvalidValue,
            "$.event.value: operator 'count_at_most' expects a non-negative integer, got the number 5000000000",
        );
        rejects(
            json!({"event": {"name": "x", "op": "last_performed_after", "value": "soon"}}),
            K::InvalidValue,
            "$.event.value: invalid ISO-8601 time 'soon'",
        );
    }

    #[test]
    fn purchase_errors() {
        rejects(
            json!({"purchase": {"product_id": "sku", "op": "total_spend_at_least", "value": 3}}),
            K::UnknownKey,
            "$.purchase.product_id: 'product_id' is only valid with the count operators",
        );
        rejects(
            json!({"purchase": {"op": "made_any", "value": 1}}),
            K::InvalidValue,
            "$.purchase.value: operator 'made_any' expects a boolean, got the number 1",
        );
        rejects(
            json!({"purchase": {"op": "spent", "value": 1}}),
            K::UnknownOperator,
            "$.purchase.op: unknown operator 'spent' for a purchase filter",
        );
        rejects(
            json!({"purchase": {"product_id": 7, "op": "count_at_least", "value": 1}}),
            K::InvalidValue,
            "$.purchase.product_id: expected a string, got the number 7",
        );
        rejects(
            json!({"purchase": {"op": "total_spend_at_most", "value": 1, "within_days": 7}}),
            K::UnknownKey,
            "$.purchase.within_days: 'within_days' is only valid with the count operators",
        );
    }

    #[test]
    fn bucket_and_created_errors() {
        rejects(
            json!({"random_bucket": {"min": 0, "max": 10000}}),
            K::InvalidValue,
            "$.random_bucket.max: expected an integer between 0 and 9999, got the number 10000",
        );
        rejects(
            json!({"random_bucket": {"min": 5000, "max": 10}}),
            K::InvalidValue,
            "$.random_bucket: 'min' (5000) is greater than 'max' (10)",
        );
        rejects(
            json!({"random_bucket": {"max": 10}}),
            K::MissingField,
            "$.random_bucket: missing field 'min'",
        );
        rejects(
            json!({"created": {"op": "on", "value": "2024-01-01"}}),
            K::UnknownOperator,
            "$.created.op: unknown operator 'on' for a created filter (expected 'before' or 'after')",
        );
        rejects(
            json!({"created": {"op": "before"}}),
            K::MissingField,
            "$.created: missing field 'value'",
        );
    }

    fn segment_ctx_rejects(
        segments: &BTreeMap<String, Filter>,
        segment_id: Option<&str>,
        filter: Value,
        kind: K,
        expected: &str,
    ) {
        let cohorts = catalog();
        let ctx = ValidationContext {
            cohorts: &cohorts,
            segments,
            segment_id,
        };
        let e = Filter::parse(&filter, &ctx).expect_err(&filter.to_string());
        assert_eq!((e.kind, e.to_string().as_str()), (kind, expected));
    }

    #[test]
    fn segment_references() {
        let mut segments = BTreeMap::new();
        let f = |v: Value| Filter::from_json(&v).unwrap();
        segments.insert("a".to_owned(), f(json!({"in_segment": "b"})));
        segments.insert(
            "b".to_owned(),
            f(json!({"and": [{"identified": true}, {"in_segment": "c"}]})),
        );
        segments.insert("c".to_owned(), f(json!({"identified": true})));
        segments.insert("x".to_owned(), f(json!({"not": {"in_segment": "y"}})));
        segments.insert("y".to_owned(), f(json!({"in_segment": "x"})));
        segments.insert("dangling".to_owned(), f(json!({"in_segment": "gone"})));
        let cohorts = catalog();
        let ok = ValidationContext {
            cohorts: &cohorts,
            segments: &segments,
            segment_id: Some("new"),
        };
        assert!(
            Filter::parse(
                &json!({"or": [{"in_segment": "a"}, {"in_segment": "b"}]}),
                &ok
            )
            .is_ok()
        );
        segment_ctx_rejects(
            &segments,
            None,
            json!({"and": [{"identified": true}, {"in_segment": "nope"}]}),
            K::UnknownSegment,
            "$.and[1].in_segment: unknown segment 'nope'",
        );
        segment_ctx_rejects(
            &segments,
            Some("new"),
            json!({"in_segment": "dangling"}),
            K::UnknownSegment,
            "$.in_segment: unknown segment 'gone' (referenced by segment 'dangling')",
        );
        segment_ctx_rejects(
            &segments,
            None,
            json!({"not": {"in_segment": "x"}}),
            K::SegmentCycle,
            "$.not.in_segment: segment membership cycle: x → y → x",
        );
        // saving segment c so that it refers to a, which reaches c
        segment_ctx_rejects(
            &segments,
            Some("c"),
            json!({"or": [{"identified": false}, {"in_segment": "a"}]}),
            K::SegmentCycle,
            "$.or[1].in_segment: segment membership cycle: c → a → b → c",
        );
        segment_ctx_rejects(
            &segments,
            Some("self"),
            json!({"in_segment": "self"}),
            K::SegmentCycle,
            "$.in_segment: segment membership cycle: self → self",
        );
    }

    #[test]
    fn accepted_forms_print_back_exactly() {
        let forms = [
            json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}}),
            json!({"attribute": {"name": "age", "op": "greater_than", "value": 30}}),
            json!({"attribute": {"name": "ltv", "op": "less_or_equal", "value": 99.5}}),
            json!({"attribute": {"name": "email_available", "op": "equals", "value": true}}),
            json!({"attribute": {"name": "tags", "op": "includes_value", "value": 3}}),
            json!({"attribute": {"name": "plan", "op": "is_blank"}}),
            json!({"event": {"name": "checkout_started", "op": "count_at_least", "value": 2, "within_days": 30}}),
            json!({"event": {"name": "x", "op": "first_performed_before", "value": "2024-01-01T00:00:00+02:00"}}),
            json!({"purchase": {"product_id": "sku-1", "op": "count_at_least", "value": 1, "within_days": 30}}),
            json!({"purchase": {"op": "total_spend_at_least", "value": 100.0}}),
            json!({"purchase": {"op": "made_any", "value": true}}),
            json!({"random_bucket": {"min": 0, "max": 4999}}),
            json!({"created": {"op": "before", "value": "2024-01-01"}}),
            json!({"not": {"or": [{"identified": true}, {"in_segment": "s"}]}}),
            json!({"cohort": {"partner": "heap", "cohort_id": "c1", "op": "includes"}}),
        ];
        for form in forms {
            let f = Filter::from_json(&form).unwrap();
            assert_eq!(f.to_json(), form);
            assert_eq!(f.to_json().to_string(), form.to_string());
        }
    }
}
