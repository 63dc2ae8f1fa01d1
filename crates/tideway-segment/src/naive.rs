//! The naive evaluator: one profile at a time, obviously correct. This is the specification.
//!
//! Every other evaluator (the bitmap [`crate::SegmentIndex`]) must return exactly the profiles
//! for which [`matches()`] is true; the property tests check it. Keep this file free of
//! optimisation.

use serde_json::Value;

use crate::datetime::{age_years, parse_time};
use crate::filter::{CohortOp, Filter, SegmentLookup};
use crate::predicate::{
    attribute_matches, email_available, event_matches, num, number_op, phone_available,
    purchase_matches, time_op,
};
use crate::profile::SegmentProfile;

/// Whether `profile` is in the segment `filter` at `now` (unix seconds).
///
/// `in_segment` resolves through `lookup`; an unknown id, or one already being evaluated (a
/// cycle that appeared after validation), matches nobody.
pub fn matches(
    filter: &Filter,
    profile: &SegmentProfile,
    now: i64,
    lookup: &dyn SegmentLookup,
) -> bool {
    let mut stack = Vec::new();
    eval(filter, profile, now, lookup, &mut stack)
}

fn eval(
    f: &Filter,
    p: &SegmentProfile,
    now: i64,
    lookup: &dyn SegmentLookup,
    stack: &mut Vec<String>,
) -> bool {
    match f {
        Filter::And(fs) => {
            for c in fs {
                if !eval(c, p, now, lookup, stack) {
                    return false;
                }
            }
            true
        }
        Filter::Or(fs) => {
            for c in fs {
                if eval(c, p, now, lookup, stack) {
                    return true;
                }
            }
            false
        }
        Filter::Not(c) => !eval(c, p, now, lookup, stack),
        Filter::Cohort(c) => {
            let member = p
                .cohorts
                .iter()
                .any(|(partner, id)| *partner == c.partner && *id == c.cohort_id);
            match c.op {
                CohortOp::Includes => member,
                CohortOp::Excludes => !member,
            }
        }
        Filter::Attribute { name, op } => attribute_matches(op, p.attributes.get(name), now),
        Filter::Age { op, value } => {
            let age = p
                .attributes
                .get("dob")
                .and_then(Value::as_str)
                .and_then(parse_time)
                .and_then(|dob| age_years(dob, now));
            number_op(*op, age.map(|a| a as f64), num(value))
        }
        Filter::EmailAvailable(b) => email_available(&p.attributes) == *b,
        Filter::PhoneAvailable(b) => phone_available(&p.attributes) == *b,
        Filter::Event { name, op } => {
            let times = p.events.get(name).map_or(&[][..], |h| h.times());
            event_matches(op, times, now)
        }
        Filter::Purchase(op) => purchase_matches(op, &p.purchases, now),
        Filter::InSegment(id) => {
            if stack.iter().any(|s| s == id) {
                return false;
            }
            let Some(g) = lookup.filter(id) else {
                return false;
            };
            stack.push(id.clone());
            let result = eval(&g, p, now, lookup, stack);
            stack.pop();
            result
        }
        Filter::RandomBucket { min, max } => (*min..=*max).contains(&p.random_bucket),
        Filter::Created { op, at } => time_op(*op, p.created_at, at.unix()),
        Filter::Identified(b) => p.external_id.is_some() == *b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::NoSegments;
    use crate::filter::{TimeOp, Timestamp};

    #[test]
    fn created_is_strict() {
        let p = SegmentProfile::new(1, 100);
        let at = |t: &str| Timestamp::parse(t).unwrap();
        let before = Filter::Created {
            op: TimeOp::Before,
            at: at("1970-01-01T00:01:41Z"),
        };
        let not_before = Filter::Created {
            op: TimeOp::Before,
            at: at("1970-01-01T00:01:40Z"),
        };
        assert!(matches(&before, &p, 0, &NoSegments));
        assert!(!matches(&not_before, &p, 0, &NoSegments));
    }
}
