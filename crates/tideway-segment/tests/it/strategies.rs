//! proptest strategies: profiles and filters drawn from small shared pools of names and values,
//! so that random filters hit random profiles often, including the edge cases (type mismatches,
//! nulls, blank strings, window boundaries, birthdays on `now`, cohorts at container borders).

use std::collections::{BTreeMap, BTreeSet};

use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Number, Value, json};
use tideway_segment::{
    ArrayElement, AttributeOp, CohortFilter, CohortOp, CountOp, EventHistory, EventOp, Filter,
    NumberOp, Pattern, PurchaseOp, PurchaseRecord, SegmentProfile, TimeOp, Timestamp,
};

pub const DAY: i64 = 86_400;

/// 2024-06-15T12:00:00Z
pub const NOW: i64 = 1_718_452_800;

pub fn iso(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Instants around `NOW`, on whole days and half days so window bounds are hit exactly.
pub fn instant() -> impl Strategy<Value = i64> {
    prop_oneof![
        (-120i64..120).prop_map(|k| NOW + k * DAY / 2),
        (-40i64..40).prop_map(|k| NOW + k * DAY + 1),
        Just(NOW),
    ]
}

pub fn now() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(NOW),
        Just(NOW + 3600),
        Just(NOW - 10 * DAY),
        Just(NOW + DAY / 2)
    ]
}

fn number(x: f64) -> Number {
    if x.fract() == 0.0 && x.abs() < 1e15 && !(x == 0.0 && x.is_sign_negative()) {
        Number::from(x as i64)
    } else {
        Number::from_f64(x).unwrap()
    }
}

const NUMBERS: [f64; 12] = [
    0.0, -0.0, 1.0, 10.0, 10.5, -3.0, 1e3, 99.5, 100.0, 14.0, 34.0, 2.0,
];
const STRINGS: [&str; 12] = [
    "pro",
    "free",
    "professional",
    "",
    "  ",
    "a",
    "b",
    "unsubscribed",
    "a@example.com",
    "2024-06-01",
    "1990-06-15",
    "not a date",
];
const ATTRIBUTES: [&str; 9] = [
    "plan",
    "score",
    "tags",
    "flag",
    "seen_at",
    "dob",
    "email",
    "email_subscribe",
    "phone",
];

fn dob() -> impl Strategy<Value = String> {
    (
        1950i32..2020,
        select(vec![
            (6u8, 14u8),
            (6, 15),
            (6, 16),
            (2, 29),
            (2, 28),
            (3, 1),
            (12, 31),
            (1, 1),
        ]),
    )
        .prop_map(|(y, (m, d))| {
            let d = if m == 2 && d == 29 && !(y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)) {
                28
            } else {
                d
            };
            format!("{y:04}-{m:02}-{d:02}")
        })
}

fn attribute_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => select(STRINGS.to_vec()).prop_map(|s| json!(s)),
        3 => select(NUMBERS.to_vec()).prop_map(|x| Value::Number(number(x))),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
        2 => vec(prop_oneof![select(vec!["a", "b", "c"]).prop_map(|s| json!(s)), (1i64..4).prop_map(|n| json!(n))], 0..4)
            .prop_map(Value::Array),
        2 => instant().prop_map(|t| json!(iso(t))),
        2 => dob().prop_map(Value::String),
    ]
}

const COHORTS: [(&str, &str); 4] = [
    ("heap", "c1"),
    ("heap", "c2"),
    ("mix", "c1"),
    ("heap", "c9"),
];

pub fn profile(uid: u32) -> impl Strategy<Value = SegmentProfile> {
    let events = btree_map(
        select(vec!["a", "b"]).prop_map(str::to_owned),
        vec(instant(), 0..5).prop_map(EventHistory::from_times),
        0..3,
    );
    let purchase = (
        select(vec!["p1", "p2", "p3"]),
        instant(),
        select(vec![0.0, 0.5, 10.0, 99.5, 100.0, 250.0, -5.0]),
    )
        .prop_map(|(p, time, price)| PurchaseRecord {
            product_id: p.to_owned(),
            time,
            price,
        });
    (
        any::<bool>(),
        instant(),
        prop_oneof![0u16..10_000, select(vec![0u16, 4999, 5000, 9999])],
        btree_map(
            select(ATTRIBUTES.to_vec()).prop_map(str::to_owned),
            attribute_value(),
            0..6,
        ),
        events,
        vec(purchase, 0..4),
        btree_set(
            select(COHORTS[..3].to_vec()).prop_map(|(p, c)| (p.to_owned(), c.to_owned())),
            0..3,
        ),
    )
        .prop_map(
            move |(
                identified,
                created_at,
                random_bucket,
                attributes,
                events,
                purchases,
                cohorts,
            )| {
                SegmentProfile {
                    uid,
                    external_id: identified.then(|| format!("user-{uid}")),
                    created_at,
                    random_bucket,
                    attributes,
                    events,
                    purchases,
                    cohorts,
                }
            },
        )
}

/// Distinct uids with a stride, so bitmaps span several roaring containers.
pub fn uids(max_len: usize) -> impl Strategy<Value = Vec<u32>> {
    (select(vec![1u32, 3, 1000, 40_000, 65_536]), 0..max_len)
        .prop_map(|(stride, n)| (0..n as u32).map(|i| i * stride + i % 3).collect())
}

pub fn profiles(max_len: usize) -> impl Strategy<Value = Vec<SegmentProfile>> {
    uids(max_len).prop_flat_map(|uids| uids.into_iter().map(profile).collect::<Vec<_>>())
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        instant().prop_map(iso),
        select(vec![
            "2024-06-01",
            "2024-06-15T14:00:00+02:00",
            "2000-01-01",
            "2024-06-15 12:00:00"
        ])
        .prop_map(str::to_owned),
    ]
    .prop_map(|s| Timestamp::parse(&s).unwrap())
}

fn number_op() -> impl Strategy<Value = NumberOp> {
    select(vec![
        NumberOp::Equals,
        NumberOp::NotEquals,
        NumberOp::GreaterThan,
        NumberOp::GreaterOrEqual,
        NumberOp::LessThan,
        NumberOp::LessOrEqual,
    ])
}

fn count_op() -> impl Strategy<Value = CountOp> {
    select(vec![CountOp::AtLeast, CountOp::AtMost, CountOp::Exactly])
}

fn time_op() -> impl Strategy<Value = TimeOp> {
    select(vec![TimeOp::Before, TimeOp::After])
}

fn days() -> impl Strategy<Value = u32> {
    select(vec![0u32, 1, 7, 10, 30, 90, 400])
}

fn element() -> impl Strategy<Value = ArrayElement> {
    prop_oneof![
        select(vec!["a", "b", "z"]).prop_map(|s| ArrayElement::String(s.to_owned())),
        (0i64..4).prop_map(|n| ArrayElement::Number(Number::from(n))),
        Just(ArrayElement::Number(Number::from_f64(2.0).unwrap())),
    ]
}

fn attribute_op() -> impl Strategy<Value = AttributeOp> {
    let string = || select(STRINGS.to_vec()).prop_map(str::to_owned);
    prop_oneof![
        string().prop_map(AttributeOp::StringEquals),
        string().prop_map(AttributeOp::StringNotEquals),
        select(vec![
            "^pro",
            "ess",
            "^$",
            "@",
            "^\\s*$",
            "(?i)PRO",
            "[0-9]{4}-06"
        ])
        .prop_map(|p| AttributeOp::Matches(Pattern::new(p).unwrap())),
        select(vec!["pro", "", "a", "2024"]).prop_map(|s| AttributeOp::StartsWith(s.to_owned())),
        Just(AttributeOp::IsBlank),
        any::<bool>().prop_map(AttributeOp::Exists),
        (number_op(), select(NUMBERS.to_vec()))
            .prop_map(|(op, x)| AttributeOp::Number(op, number(x))),
        any::<bool>().prop_map(AttributeOp::BoolEquals),
        timestamp().prop_map(AttributeOp::Before),
        timestamp().prop_map(AttributeOp::After),
        days().prop_map(AttributeOp::MoreThanDaysAgo),
        days().prop_map(AttributeOp::LessThanDaysAgo),
        days().prop_map(AttributeOp::WithinDaysFuture),
        element().prop_map(AttributeOp::IncludesValue),
        element().prop_map(AttributeOp::NotIncludesValue),
        (0u32..4).prop_map(AttributeOp::SizeEquals),
        (0u32..4).prop_map(AttributeOp::SizeGreaterThan),
        (0u32..4).prop_map(AttributeOp::SizeLessThan),
    ]
}

fn event_op() -> impl Strategy<Value = EventOp> {
    prop_oneof![
        (count_op(), 0u32..5, proptest::option::of(days())).prop_map(|(op, value, within_days)| {
            EventOp::Count {
                op,
                value,
                within_days,
            }
        }),
        (time_op(), timestamp()).prop_map(|(op, t)| EventOp::FirstPerformed(op, t)),
        (time_op(), timestamp()).prop_map(|(op, t)| EventOp::LastPerformed(op, t)),
        days().prop_map(EventOp::LastPerformedWithinDays),
    ]
}

fn purchase_op() -> impl Strategy<Value = PurchaseOp> {
    let spend = || select(vec![0.0, 10.0, 100.0, 100.5, -1.0, 105.0, 349.5]).prop_map(number);
    prop_oneof![
        (
            proptest::option::of(select(vec!["p1", "p2", "p9"]).prop_map(str::to_owned)),
            count_op(),
            0u32..4,
            proptest::option::of(days())
        )
            .prop_map(|(product_id, op, value, within_days)| PurchaseOp::Count {
                product_id,
                op,
                value,
                within_days
            }),
        spend().prop_map(PurchaseOp::TotalSpendAtLeast),
        spend().prop_map(PurchaseOp::TotalSpendAtMost),
        any::<bool>().prop_map(PurchaseOp::MadeAny),
    ]
}

fn leaf() -> impl Strategy<Value = Filter> {
    prop_oneof![
        3 => (select(COHORTS.to_vec()), prop_oneof![Just(CohortOp::Includes), Just(CohortOp::Excludes)]).prop_map(
            |((p, c), op)| Filter::Cohort(CohortFilter {
                partner: p.to_owned(),
                cohort_id: c.to_owned(),
                op
            })
        ),
        8 => (select(ATTRIBUTES.to_vec()), attribute_op())
            .prop_map(|(name, op)| Filter::Attribute { name: name.to_owned(), op }),
        2 => (number_op(), select(vec![0.0, 14.0, 18.0, 30.0, 33.0, 34.0, 33.5, 64.0, -1.0]))
            .prop_map(|(op, x)| Filter::Age { op, value: number(x) }),
        1 => any::<bool>().prop_map(Filter::EmailAvailable),
        1 => any::<bool>().prop_map(Filter::PhoneAvailable),
        4 => (select(vec!["a", "b", "zzz"]), event_op())
            .prop_map(|(name, op)| Filter::Event { name: name.to_owned(), op }),
        3 => purchase_op().prop_map(Filter::Purchase),
        2 => select(vec!["s_pro", "s_nested", "s_loop", "s_missing"]).prop_map(|s| Filter::InSegment(s.to_owned())),
        1 => (0u16..10_000, 0u16..10_000).prop_map(|(a, b)| Filter::RandomBucket { min: a.min(b), max: a.max(b) }),
        1 => (time_op(), timestamp()).prop_map(|(op, at)| Filter::Created { op, at }),
        1 => any::<bool>().prop_map(Filter::Identified),
    ]
}

/// Random filters of depth ≤ 4 with `and` / `or` / `not`.
pub fn filter() -> impl Strategy<Value = Filter> {
    leaf().prop_recursive(4, 48, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 1..4).prop_map(Filter::And),
            vec(inner.clone(), 1..4).prop_map(Filter::Or),
            inner.prop_map(|f| Filter::Not(Box::new(f))),
        ]
    })
}

/// The same filter with every attribute test the parser would refuse on a standard attribute
/// (say a number comparison on `email`) moved to a custom attribute, so it has a wire form.
pub fn wire_valid(f: Filter) -> Filter {
    match f {
        Filter::And(fs) => Filter::And(fs.into_iter().map(wire_valid).collect()),
        Filter::Or(fs) => Filter::Or(fs.into_iter().map(wire_valid).collect()),
        Filter::Not(c) => Filter::Not(Box::new(wire_valid(*c))),
        Filter::Attribute { name, op } => {
            let string_op = matches!(
                op,
                AttributeOp::StringEquals(_)
                    | AttributeOp::StringNotEquals(_)
                    | AttributeOp::Matches(_)
                    | AttributeOp::StartsWith(_)
                    | AttributeOp::IsBlank
                    | AttributeOp::Exists(_)
            );
            let time_op = matches!(
                op,
                AttributeOp::Before(_)
                    | AttributeOp::After(_)
                    | AttributeOp::MoreThanDaysAgo(_)
                    | AttributeOp::LessThanDaysAgo(_)
                    | AttributeOp::WithinDaysFuture(_)
            );
            let allowed = match name.as_str() {
                "email" | "email_subscribe" | "phone" => string_op,
                "dob" => string_op || time_op,
                _ => true,
            };
            let name = if allowed {
                name
            } else {
                format!("custom_{name}")
            };
            Filter::Attribute { name, op }
        }
        other => other,
    }
}

/// The segments `in_segment` leaves refer to, including a cycle (s_loop ⇄ s_loop2) that only
/// evaluation meets (validation would refuse it) and a missing id.
pub fn segments() -> BTreeMap<String, Filter> {
    let f = |v: Value| Filter::from_json(&v).unwrap();
    let mut s = BTreeMap::new();
    s.insert(
        "s_pro".into(),
        f(json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}})),
    );
    s.insert(
        "s_nested".into(),
        f(json!({"and": [{"in_segment": "s_pro"}, {"not": {"identified": false}}]})),
    );
    s.insert(
        "s_loop".into(),
        f(json!({"or": [{"in_segment": "s_loop2"}, {"event": {"name": "a", "op": "count_at_least", "value": 2}}]})),
    );
    s.insert(
        "s_loop2".into(),
        f(json!({"and": [{"in_segment": "s_loop"}, {"identified": true}]})),
    );
    s
}

pub fn cohort_names() -> BTreeSet<(String, String)> {
    COHORTS
        .iter()
        .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
        .collect()
}
