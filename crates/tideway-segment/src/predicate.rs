//! The meaning of each leaf filter on plain values, shared by both evaluators.
//!
//! The naive evaluator is built from these functions alone; the bitmap index uses the same ones
//! wherever it falls back to looking at values (dictionary entries, event times), so a
//! definition lives in exactly one place. Where the index answers from its own structures
//! (bitmaps, bit-sliced numbers) the property tests hold it to these definitions.

use std::collections::BTreeMap;

use serde_json::{Number, Value};

use crate::datetime::{count_between, days_after, days_before, parse_time};
use crate::filter::{ArrayElement, AttributeOp, CountOp, EventOp, NumberOp, PurchaseOp, TimeOp};
use crate::profile::PurchaseRecord;

/// A JSON number as `f64` (serde_json numbers always have one).
pub(crate) fn num(n: &Number) -> f64 {
    n.as_f64().unwrap_or(f64::NAN)
}

/// `a op x` for a present number `a`, or `None` for a missing one: missing matches only
/// `not_equals`.
pub(crate) fn number_op(op: NumberOp, a: Option<f64>, x: f64) -> bool {
    match op {
        NumberOp::NotEquals => !a.is_some_and(|a| a == x),
        _ => a.is_some_and(|a| compare(op, a, x)),
    }
}

fn compare(op: NumberOp, a: f64, x: f64) -> bool {
    match op {
        NumberOp::Equals => a == x,
        NumberOp::NotEquals => a != x,
        NumberOp::GreaterThan => a > x,
        NumberOp::GreaterOrEqual => a >= x,
        NumberOp::LessThan => a < x,
        NumberOp::LessOrEqual => a <= x,
    }
}

/// `count op value`.
pub(crate) fn count_op(op: CountOp, count: usize, value: u32) -> bool {
    let value = value as usize;
    match op {
        CountOp::AtLeast => count >= value,
        CountOp::AtMost => count <= value,
        CountOp::Exactly => count == value,
    }
}

/// A string of only whitespace (or empty).
pub(crate) fn is_blank_string(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.trim().is_empty())
}

/// A string value that parses as an ISO-8601 time.
pub(crate) fn value_time(v: &Value) -> Option<i64> {
    v.as_str().and_then(parse_time)
}

/// Whether an array attribute has an element equal to `e` (strings exactly, numbers as `f64`).
pub(crate) fn array_includes(v: &Value, e: &ArrayElement) -> bool {
    let Some(items) = v.as_array() else {
        return false;
    };
    match e {
        ArrayElement::String(s) => items.iter().any(|x| x.as_str() == Some(s)),
        ArrayElement::Number(n) => {
            let n = num(n);
            items.iter().any(|x| x.as_f64() == Some(n))
        }
    }
}

/// The array's length, for array values.
pub(crate) fn array_len(v: &Value) -> Option<usize> {
    v.as_array().map(Vec::len)
}

/// The positive, value-only attribute operators (those the index answers by looking at
/// distinct values): `Some(result)` for them, `None` for the others.
pub(crate) fn value_test(op: &AttributeOp, v: &Value) -> Option<bool> {
    Some(match op {
        AttributeOp::Matches(p) => v.as_str().is_some_and(|s| p.is_match(s)),
        AttributeOp::StartsWith(prefix) => {
            v.as_str().is_some_and(|s| s.starts_with(prefix.as_str()))
        }
        AttributeOp::IncludesValue(e) => array_includes(v, e),
        AttributeOp::SizeEquals(n) => array_len(v) == Some(*n as usize),
        AttributeOp::SizeGreaterThan(n) => array_len(v).is_some_and(|l| l > *n as usize),
        AttributeOp::SizeLessThan(n) => array_len(v).is_some_and(|l| l < *n as usize),
        _ => return None,
    })
}

/// The attribute operator on an attribute value (`None` = absent; `null` counts as absent).
pub(crate) fn attribute_matches(op: &AttributeOp, v: Option<&Value>, now: i64) -> bool {
    let v = v.filter(|v| !v.is_null());
    if let Some(result) = v.and_then(|v| value_test(op, v)) {
        return result;
    }
    let time = || v.and_then(value_time);
    match op {
        AttributeOp::StringEquals(s) => v.and_then(Value::as_str) == Some(s.as_str()),
        AttributeOp::StringNotEquals(s) => v.and_then(Value::as_str) != Some(s.as_str()),
        AttributeOp::IsBlank => v.is_none_or(is_blank_string),
        AttributeOp::Exists(b) => v.is_some() == *b,
        AttributeOp::Number(op, x) => number_op(*op, v.and_then(Value::as_f64), num(x)),
        AttributeOp::BoolEquals(b) => v.and_then(Value::as_bool) == Some(*b),
        AttributeOp::Before(t) => time().is_some_and(|a| a < t.unix()),
        AttributeOp::After(t) => time().is_some_and(|a| a > t.unix()),
        AttributeOp::MoreThanDaysAgo(d) => time().is_some_and(|a| a < days_before(now, *d)),
        AttributeOp::LessThanDaysAgo(d) => {
            time().is_some_and(|a| a > days_before(now, *d) && a <= now)
        }
        AttributeOp::WithinDaysFuture(d) => {
            time().is_some_and(|a| a > now && a <= days_after(now, *d))
        }
        AttributeOp::NotIncludesValue(e) => !v.is_some_and(|v| array_includes(v, e)),
        // value-only operators on an absent attribute
        AttributeOp::Matches(_)
        | AttributeOp::StartsWith(_)
        | AttributeOp::IncludesValue(_)
        | AttributeOp::SizeEquals(_)
        | AttributeOp::SizeGreaterThan(_)
        | AttributeOp::SizeLessThan(_) => false,
    }
}

/// The event operator on one user's sorted occurrence times (empty = never performed).
pub(crate) fn event_matches(op: &EventOp, times: &[i64], now: i64) -> bool {
    match op {
        EventOp::Count {
            op,
            value,
            within_days,
        } => {
            let count = match within_days {
                None => times.len(),
                Some(d) => count_between(times, days_before(now, *d), now),
            };
            count_op(*op, count, *value)
        }
        EventOp::FirstPerformed(t, at) => times.first().is_some_and(|&f| time_op(*t, f, at.unix())),
        EventOp::LastPerformed(t, at) => times.last().is_some_and(|&l| time_op(*t, l, at.unix())),
        EventOp::LastPerformedWithinDays(d) => count_between(times, days_before(now, *d), now) > 0,
    }
}

/// [`event_matches`] decided from the number of occurrences and the latest one alone, when
/// they suffice (`None` when the times themselves are needed). For every sorted `times` with
/// that length and last element, a `Some` answer equals `event_matches(op, times, now)`.
pub(crate) fn event_matches_by_summary(
    op: &EventOp,
    count: usize,
    last: i64,
    now: i64,
) -> Option<bool> {
    match op {
        EventOp::Count {
            op,
            value,
            within_days: None,
        } => Some(count_op(*op, count, *value)),
        EventOp::Count {
            op,
            value,
            within_days: Some(d),
        } => {
            if count == 0 || last < days_before(now, *d) {
                // nothing in the window
                Some(count_op(*op, 0, *value))
            } else if count < *value as usize && *op != CountOp::AtMost {
                // the window holds at most `count` < value occurrences
                Some(false)
            } else {
                None
            }
        }
        EventOp::LastPerformed(t, at) => Some(count > 0 && time_op(*t, last, at.unix())),
        EventOp::LastPerformedWithinDays(d) => {
            if count == 0 || last < days_before(now, *d) {
                Some(false)
            } else if last <= now {
                Some(true)
            } else {
                None
            }
        }
        EventOp::FirstPerformed(..) => (count == 0).then_some(false),
    }
}

/// `t` strictly before / after `at`.
pub(crate) fn time_op(op: TimeOp, t: i64, at: i64) -> bool {
    match op {
        TimeOp::Before => t < at,
        TimeOp::After => t > at,
    }
}

/// Sum of prices in record order (the order matters for `f64`; the index sums the same way).
pub(crate) fn total_spend(purchases: &[PurchaseRecord]) -> f64 {
    purchases.iter().fold(0.0, |sum, p| sum + p.price)
}

/// The purchase operator on one user's purchases.
pub(crate) fn purchase_matches(op: &PurchaseOp, purchases: &[PurchaseRecord], now: i64) -> bool {
    match op {
        PurchaseOp::Count {
            product_id,
            op,
            value,
            within_days,
        } => {
            let count = purchases
                .iter()
                .filter(|p| product_id.as_ref().is_none_or(|id| p.product_id == *id))
                .filter(|p| {
                    within_days.is_none_or(|d| p.time >= days_before(now, d) && p.time <= now)
                })
                .count();
            count_op(*op, count, *value)
        }
        PurchaseOp::TotalSpendAtLeast(x) => total_spend(purchases) >= num(x),
        PurchaseOp::TotalSpendAtMost(x) => total_spend(purchases) <= num(x),
        PurchaseOp::MadeAny(b) => purchases.is_empty() != *b,
    }
}

/// "Email available": a non-blank `email` and `email_subscribe` not `unsubscribed`.
pub(crate) fn email_available(attributes: &BTreeMap<String, Value>) -> bool {
    let email = attributes.get("email").and_then(Value::as_str);
    let unsubscribed =
        attributes.get("email_subscribe").and_then(Value::as_str) == Some("unsubscribed");
    email.is_some_and(|e| !e.trim().is_empty()) && !unsubscribed
}

/// "Phone available": a non-blank `phone`.
pub(crate) fn phone_available(attributes: &BTreeMap<String, Value>) -> bool {
    attributes
        .get("phone")
        .and_then(Value::as_str)
        .is_some_and(|p| !p.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;
    use crate::filter::Timestamp;

    fn op() -> impl Strategy<Value = EventOp> {
        let at = (-20i64..20).prop_map(|t| {
            Timestamp::parse(&format!("1970-01-{:02}T00:00:00Z", 10 + t / 4)).unwrap()
        });
        let count = prop_oneof![
            Just(CountOp::AtLeast),
            Just(CountOp::AtMost),
            Just(CountOp::Exactly)
        ];
        prop_oneof![
            (count, 0u32..6, proptest::option::of(0u32..12)).prop_map(
                |(op, value, within_days)| EventOp::Count {
                    op,
                    value,
                    within_days
                }
            ),
            (any::<bool>(), at.clone()).prop_map(|(b, at)| EventOp::LastPerformed(
                if b { TimeOp::Before } else { TimeOp::After },
                at
            )),
            (any::<bool>(), at).prop_map(|(b, at)| EventOp::FirstPerformed(
                if b { TimeOp::Before } else { TimeOp::After },
                at
            )),
            (0u32..12).prop_map(EventOp::LastPerformedWithinDays),
        ]
    }

    proptest! {
        #[test]
        fn summaries_never_contradict_the_times(
            op in op(),
            mut times in vec((0i64..20).prop_map(|d| d * 43_200), 0..8),
            now in (0i64..20).prop_map(|d| d * 43_200 + 600_000),
        ) {
            times.sort_unstable();
            let last = times.last().copied().unwrap_or(i64::MIN);
            if let Some(answer) = event_matches_by_summary(&op, times.len(), last, now) {
                prop_assert_eq!(answer, event_matches(&op, &times, now));
            }
        }
    }
}
