//! Every filter and operator, through one helper that runs both evaluators.
//!
//! [`check`] parses the wire form (and checks it prints back identically), evaluates it with the
//! naive evaluator over each profile and with a [`SegmentIndex`] built from the same profiles,
//! and asserts that both return exactly the expected uids.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use crate::{
    EventHistory, Filter, PurchaseRecord, SegmentIndex, SegmentProfile, Timestamp,
    ValidationContext, matches,
};

const DAY: i64 = 86_400;

fn now() -> i64 {
    Timestamp::parse("2024-06-15T12:00:00Z").unwrap().unix()
}

fn iso(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn cohorts() -> BTreeSet<(String, String)> {
    [
        ("heap", "c1"),
        ("heap", "c2"),
        ("mix", "c1"),
        ("heap", "empty"),
    ]
    .into_iter()
    .map(|(p, c)| (p.to_owned(), c.to_owned()))
    .collect()
}

fn segments() -> BTreeMap<String, Filter> {
    let mut s = BTreeMap::new();
    let pros = json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}});
    s.insert("pros".to_owned(), Filter::from_json(&pros).unwrap());
    let nested = json!({"and": [{"in_segment": "pros"}, {"identified": true}]});
    s.insert(
        "identified_pros".to_owned(),
        Filter::from_json(&nested).unwrap(),
    );
    s
}

/// Parses `filter`, runs both evaluators over `profiles` at [`now`], asserts both give `expected`.
fn check(filter: Value, profiles: &[SegmentProfile], expected: &[u32]) {
    let (catalog, lookup) = (cohorts(), segments());
    let ctx = ValidationContext {
        cohorts: &catalog,
        segments: &lookup,
        segment_id: None,
    };
    let f = Filter::parse(&filter, &ctx).unwrap_or_else(|e| panic!("{filter}: {e}"));
    assert_eq!(f.to_json(), filter, "wire form round trip");
    evaluate_both(&f, profiles, &lookup, expected);
}

fn evaluate_both(
    f: &Filter,
    profiles: &[SegmentProfile],
    lookup: &BTreeMap<String, Filter>,
    expected: &[u32],
) {
    let naive: Vec<u32> = profiles
        .iter()
        .filter(|p| matches(f, p, now(), lookup))
        .map(|p| p.uid)
        .collect();
    assert_eq!(naive, expected, "naive evaluator on {}", f.to_json());
    let mut index = SegmentIndex::new();
    for p in profiles {
        index.upsert(p);
    }
    let bitmap: Vec<u32> = index.evaluate(f, now(), lookup).iter().collect();
    assert_eq!(bitmap, expected, "bitmap evaluator on {}", f.to_json());
    assert_eq!(
        index.estimate_size(f, now(), lookup),
        (expected.len() as u64, false),
        "size of {}",
        f.to_json()
    );
}

/// Profiles 1..=n with nothing set.
fn users(n: u32) -> Vec<SegmentProfile> {
    (1..=n).map(|uid| SegmentProfile::new(uid, 0)).collect()
}

/// Profiles 1..=values.len() with attribute `name` set to each value (`None` = absent).
fn with_attribute(name: &str, values: &[Option<Value>]) -> Vec<SegmentProfile> {
    let mut ps = users(values.len() as u32);
    for (p, v) in ps.iter_mut().zip(values) {
        if let Some(v) = v {
            p.attributes.insert(name.to_owned(), v.clone());
        }
    }
    ps
}

fn attr(name: &str, op: &str, value: Value) -> Value {
    json!({"attribute": {"name": name, "op": op, "value": value}})
}

#[test]
fn cohort_includes_and_excludes() {
    let mut ps = users(5);
    let mut join = |i: usize, p: &str, c: &str| {
        ps[i].cohorts.insert((p.to_owned(), c.to_owned()));
    };
    join(0, "heap", "c1");
    join(1, "heap", "c2");
    join(2, "mix", "c1");
    join(3, "heap", "c1");
    join(3, "heap", "c2");
    let cohort =
        |c: &str, op: &str| json!({"cohort": {"partner": "heap", "cohort_id": c, "op": op}});
    check(cohort("c1", "includes"), &ps, &[1, 4]);
    check(cohort("c1", "excludes"), &ps, &[2, 3, 5]);
    check(cohort("empty", "includes"), &ps, &[]);
    check(cohort("empty", "excludes"), &ps, &[1, 2, 3, 4, 5]);
    check(
        json!({"cohort": {"partner": "mix", "cohort_id": "c1", "op": "includes"}}),
        &ps,
        &[3],
    );
}

fn plans() -> Vec<SegmentProfile> {
    with_attribute(
        "plan",
        &[
            Some(json!("pro")),
            Some(json!("free")),
            Some(json!(5)),
            None,
            Some(Value::Null),
            Some(json!("  ")),
            Some(json!("")),
            Some(json!("professional")),
            Some(json!(["pro"])),
        ],
    )
}

#[test]
fn string_attribute_operators() {
    let ps = plans();
    check(attr("plan", "equals", json!("pro")), &ps, &[1]);
    check(attr("plan", "equals", json!("nobody")), &ps, &[]);
    check(
        attr("plan", "not_equals", json!("pro")),
        &ps,
        &[2, 3, 4, 5, 6, 7, 8, 9],
    );
    check(attr("plan", "matches", json!("^pro")), &ps, &[1, 8]);
    check(attr("plan", "matches", json!("ESS|ee")), &ps, &[2]);
    check(attr("plan", "starts_with", json!("pro")), &ps, &[1, 8]);
    check(
        attr("plan", "starts_with", json!("")),
        &ps,
        &[1, 2, 6, 7, 8],
    );
    check(
        json!({"attribute": {"name": "plan", "op": "is_blank"}}),
        &ps,
        &[4, 5, 6, 7],
    );
    check(
        attr("plan", "exists", json!(true)),
        &ps,
        &[1, 2, 3, 6, 7, 8, 9],
    );
    check(attr("plan", "exists", json!(false)), &ps, &[4, 5]);
    check(
        attr("nowhere", "exists", json!(false)),
        &ps,
        &[1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    check(
        attr("nowhere", "not_equals", json!("x")),
        &ps,
        &[1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    check(
        json!({"attribute": {"name": "nowhere", "op": "is_blank"}}),
        &ps,
        &[1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
}

#[test]
fn standard_string_attributes() {
    let mut ps = users(3);
    ps[0].attributes.insert("first_name".into(), json!("Ada"));
    ps[1].attributes.insert("first_name".into(), json!("ada"));
    ps[2].attributes.insert("country".into(), json!("FR"));
    check(attr("first_name", "equals", json!("Ada")), &ps, &[1]);
    check(attr("country", "equals", json!("FR")), &ps, &[3]);
    check(
        attr("first_name", "matches", json!("(?i)^ADA$")),
        &ps,
        &[1, 2],
    );
}

#[test]
fn number_attribute_operators() {
    let ps = with_attribute(
        "score",
        &[
            Some(json!(10)),
            Some(json!(10.0)),
            Some(json!(-3.5)),
            Some(json!("10")),
            None,
            Some(json!(0)),
            Some(json!(-0.0)),
            Some(json!(1e3)),
            Some(json!(u64::MAX)),
        ],
    );
    check(attr("score", "equals", json!(10)), &ps, &[1, 2]);
    check(attr("score", "equals", json!(0)), &ps, &[6, 7]);
    check(
        attr("score", "not_equals", json!(10)),
        &ps,
        &[3, 4, 5, 6, 7, 8, 9],
    );
    check(attr("score", "greater_than", json!(0)), &ps, &[1, 2, 8, 9]);
    check(
        attr("score", "greater_or_equal", json!(0)),
        &ps,
        &[1, 2, 6, 7, 8, 9],
    );
    check(attr("score", "less_than", json!(0)), &ps, &[3]);
    check(attr("score", "less_or_equal", json!(-3.5)), &ps, &[3]);
    check(
        attr("score", "less_or_equal", json!(1000)),
        &ps,
        &[1, 2, 3, 6, 7, 8],
    );
    check(attr("score", "greater_than", json!(1e300)), &ps, &[]);
}

#[test]
fn boolean_attribute_equals() {
    let ps = with_attribute(
        "vip",
        &[
            Some(json!(true)),
            Some(json!(false)),
            Some(json!("true")),
            None,
        ],
    );
    check(attr("vip", "equals", json!(true)), &ps, &[1]);
    check(attr("vip", "equals", json!(false)), &ps, &[2]);
}

#[test]
fn time_attribute_operators() {
    let n = now();
    let ps = with_attribute(
        "renewal_at",
        &[
            Some(json!(iso(n - 10 * DAY))),
            Some(json!(iso(n - 40 * DAY))),
            Some(json!(iso(n + 3 * DAY))),
            Some(json!(iso(n + 20 * DAY))),
            Some(json!("not a date")),
            None,
            Some(json!(iso(n))),
            Some(json!("2024-06-01")),
            Some(json!(12345)),
        ],
    );
    check(
        attr("renewal_at", "before", json!("2024-06-01T00:00:00Z")),
        &ps,
        &[2],
    );
    check(
        attr("renewal_at", "after", json!("2024-06-10T00:00:00Z")),
        &ps,
        &[3, 4, 7],
    );
    check(
        attr("renewal_at", "after", json!("2024-05-31T23:00:00-01:00")),
        &ps,
        &[1, 3, 4, 7],
    );
    check(
        attr("renewal_at", "more_than_days_ago", json!(30)),
        &ps,
        &[2],
    );
    check(
        attr("renewal_at", "less_than_days_ago", json!(14)),
        &ps,
        &[1, 7],
    );
    check(
        attr("renewal_at", "less_than_days_ago", json!(15)),
        &ps,
        &[1, 7, 8],
    );
    check(
        attr("renewal_at", "within_days_future", json!(7)),
        &ps,
        &[3],
    );
    check(
        attr("renewal_at", "within_days_future", json!(20)),
        &ps,
        &[3, 4],
    );
}

fn birthdays() -> Vec<SegmentProfile> {
    with_attribute(
        "dob",
        &[
            Some(json!("1990-06-15")),
            Some(json!("1990-06-16")),
            Some(json!("2010-01-01")),
            None,
            Some(json!("garbage")),
            Some(json!("1960-02-29")),
        ],
    )
}

#[test]
fn age_from_dob() {
    let ps = birthdays();
    let age = |op: &str, v: Value| attr("age", op, v);
    check(age("greater_than", json!(30)), &ps, &[1, 2, 6]);
    check(age("equals", json!(34)), &ps, &[1]);
    check(age("equals", json!(33.5)), &ps, &[]);
    check(age("not_equals", json!(34)), &ps, &[2, 3, 4, 5, 6]);
    check(age("less_than", json!(18)), &ps, &[3]);
    check(age("greater_or_equal", json!(34)), &ps, &[1, 6]);
    check(age("less_or_equal", json!(33)), &ps, &[2, 3]);
    check(age("greater_than", json!(1e9)), &ps, &[]);
    check(age("less_than", json!(-1e9)), &ps, &[]);
    check(attr("dob", "before", json!("2000-01-01")), &ps, &[1, 2, 6]);
    check(attr("dob", "equals", json!("garbage")), &ps, &[5]);
}

#[test]
fn email_and_phone_available() {
    let mut ps = users(5);
    ps[0]
        .attributes
        .insert("email".into(), json!("a@example.com"));
    ps[1]
        .attributes
        .insert("email".into(), json!("b@example.com"));
    ps[1]
        .attributes
        .insert("email_subscribe".into(), json!("unsubscribed"));
    ps[2].attributes.insert("email".into(), json!("  "));
    ps[4]
        .attributes
        .insert("email".into(), json!("e@example.com"));
    ps[4]
        .attributes
        .insert("email_subscribe".into(), json!("opted_in"));
    ps[0].attributes.insert("phone".into(), json!("+33123"));
    ps[1].attributes.insert("phone".into(), json!(""));
    check(attr("email_available", "equals", json!(true)), &ps, &[1, 5]);
    check(
        attr("email_available", "equals", json!(false)),
        &ps,
        &[2, 3, 4],
    );
    check(attr("phone_available", "equals", json!(true)), &ps, &[1]);
    check(
        attr("phone_available", "equals", json!(false)),
        &ps,
        &[2, 3, 4, 5],
    );
}

#[test]
fn array_attribute_operators() {
    let ps = with_attribute(
        "tags",
        &[
            Some(json!(["a", "b"])),
            Some(json!(["b"])),
            Some(json!([])),
            Some(json!("a")),
            None,
            Some(json!([1, 2, 3])),
            Some(json!(["a", 2.0])),
        ],
    );
    check(attr("tags", "includes_value", json!("a")), &ps, &[1, 7]);
    check(attr("tags", "includes_value", json!(2)), &ps, &[6, 7]);
    check(
        attr("tags", "not_includes_value", json!("a")),
        &ps,
        &[2, 3, 4, 5, 6],
    );
    check(attr("tags", "size_equals", json!(0)), &ps, &[3]);
    check(attr("tags", "size_greater_than", json!(1)), &ps, &[1, 6, 7]);
    check(attr("tags", "size_less_than", json!(2)), &ps, &[2, 3]);
}

fn checkouts() -> Vec<SegmentProfile> {
    let n = now();
    let mut ps = users(6);
    let times: [&[i64]; 6] = [
        &[n - DAY, n - 2 * DAY, n - 40 * DAY],
        &[n - 5 * DAY],
        &[n - 100 * DAY],
        &[],
        &[n + DAY],
        &[n - 30 * DAY],
    ];
    for (p, t) in ps.iter_mut().zip(times) {
        if !t.is_empty() {
            p.events
                .insert("checkout".into(), EventHistory::from_times(t.to_vec()));
        }
    }
    // an empty history is the same as none
    ps[3]
        .events
        .insert("checkout".into(), EventHistory::default());
    ps
}

fn event(op: &str, value: Value) -> Value {
    json!({"event": {"name": "checkout", "op": op, "value": value}})
}

fn event_within(op: &str, value: u32, days: u32) -> Value {
    json!({"event": {"name": "checkout", "op": op, "value": value, "within_days": days}})
}

#[test]
fn event_counts() {
    let ps = checkouts();
    check(event("count_at_least", json!(2)), &ps, &[1]);
    check(event("count_at_least", json!(0)), &ps, &[1, 2, 3, 4, 5, 6]);
    check(event_within("count_at_least", 1, 30), &ps, &[1, 2, 6]);
    check(event("count_at_most", json!(0)), &ps, &[4]);
    check(event_within("count_at_most", 1, 30), &ps, &[2, 3, 4, 5, 6]);
    check(event("count_exactly", json!(1)), &ps, &[2, 3, 5, 6]);
    check(event_within("count_exactly", 0, 7), &ps, &[3, 4, 5, 6]);
    check(
        json!({"event": {"name": "never_seen", "op": "count_at_most", "value": 3}}),
        &ps,
        &[1, 2, 3, 4, 5, 6],
    );
}

#[test]
fn event_first_and_last() {
    let ps = checkouts();
    check(
        event("first_performed_before", json!("2024-05-01T00:00:00Z")),
        &ps,
        &[3],
    );
    check(
        event("first_performed_after", json!("2024-06-01T00:00:00Z")),
        &ps,
        &[2, 5],
    );
    check(
        event("last_performed_before", json!("2024-06-01")),
        &ps,
        &[3, 6],
    );
    check(
        event("last_performed_after", json!("2024-06-12T00:00:00Z")),
        &ps,
        &[1, 5],
    );
    check(event("last_performed_within_days", json!(3)), &ps, &[1]);
    check(
        event("last_performed_within_days", json!(30)),
        &ps,
        &[1, 2, 6],
    );
}

fn shoppers() -> Vec<SegmentProfile> {
    let n = now();
    let mut ps = users(4);
    let buy = |product: &str, days_ago: i64, price: f64| PurchaseRecord {
        product_id: product.into(),
        time: n - days_ago * DAY,
        price,
    };
    ps[0].purchases = vec![buy("sku-2", 50, 5.5), buy("sku-1", 1, 10.0)];
    ps[1].purchases = vec![buy("sku-1", 10, 100.0), buy("sku-1", 20, 0.5)];
    ps[3].purchases = vec![buy("sku-2", 1, 250.0)];
    ps
}

#[test]
fn purchase_counts() {
    let ps = shoppers();
    let count = |product: Option<&str>, op: &str, value: u32, days: Option<u32>| {
        let mut m = serde_json::Map::new();
        if let Some(p) = product {
            m.insert("product_id".into(), json!(p));
        }
        m.insert("op".into(), json!(op));
        m.insert("value".into(), json!(value));
        if let Some(d) = days {
            m.insert("within_days".into(), json!(d));
        }
        json!({ "purchase": m })
    };
    check(count(None, "count_at_least", 1, None), &ps, &[1, 2, 4]);
    check(count(Some("sku-1"), "count_at_least", 2, None), &ps, &[2]);
    check(count(Some("sku-1"), "count_exactly", 1, Some(7)), &ps, &[1]);
    check(count(None, "count_at_most", 0, None), &ps, &[3]);
    check(
        count(Some("sku-9"), "count_at_most", 0, None),
        &ps,
        &[1, 2, 3, 4],
    );
    check(count(Some("sku-9"), "count_at_least", 1, None), &ps, &[]);
    check(count(None, "count_exactly", 2, Some(30)), &ps, &[2]);
    check(count(None, "count_exactly", 1, Some(30)), &ps, &[1, 4]);
}

#[test]
fn purchase_spend_and_any() {
    let ps = shoppers();
    let p = |op: &str, v: Value| json!({"purchase": {"op": op, "value": v}});
    check(p("total_spend_at_least", json!(100)), &ps, &[2, 4]);
    check(p("total_spend_at_least", json!(100.5)), &ps, &[2, 4]);
    check(p("total_spend_at_least", json!(0)), &ps, &[1, 2, 3, 4]);
    check(p("total_spend_at_most", json!(15.5)), &ps, &[1, 3]);
    check(p("total_spend_at_most", json!(-1)), &ps, &[]);
    check(p("made_any", json!(true)), &ps, &[1, 2, 4]);
    check(p("made_any", json!(false)), &ps, &[3]);
}

#[test]
fn in_segment_resolves_through_the_lookup() {
    let mut ps = plans();
    ps[0].external_id = Some("e1".into());
    ps[1].external_id = Some("e2".into());
    check(json!({"in_segment": "pros"}), &ps, &[1]);
    check(json!({"in_segment": "identified_pros"}), &ps, &[1]);
    check(
        json!({"not": {"in_segment": "pros"}}),
        &ps,
        &[2, 3, 4, 5, 6, 7, 8, 9],
    );
}

#[test]
fn in_segment_cycles_and_unknown_ids_at_evaluation_match_nobody() {
    // validation forbids these, but stored segments can change after a filter was validated
    let ps = users(3);
    let mut lookup = BTreeMap::new();
    let looping =
        Filter::from_json(&json!({"or": [{"in_segment": "b"}, {"identified": false}]})).unwrap();
    lookup.insert("a".to_owned(), looping);
    lookup.insert(
        "b".to_owned(),
        Filter::from_json(&json!({"in_segment": "a"})).unwrap(),
    );
    let f = Filter::from_json(&json!({"in_segment": "a"})).unwrap();
    // a = b ∨ anonymous; b = a; inside the cycle a repeated id matches nobody
    evaluate_both(&f, &ps, &lookup, &[1, 2, 3]);
    let f = Filter::from_json(&json!({"in_segment": "b"})).unwrap();
    evaluate_both(&f, &ps, &lookup, &[1, 2, 3]);
    let f = Filter::from_json(&json!({"in_segment": "gone"})).unwrap();
    evaluate_both(&f, &ps, &lookup, &[]);
    let f = Filter::from_json(&json!({"not": {"in_segment": "gone"}})).unwrap();
    evaluate_both(&f, &ps, &lookup, &[1, 2, 3]);
}

#[test]
fn random_bucket_created_identified() {
    let n = now();
    let mut ps = users(4);
    for (p, b) in ps.iter_mut().zip([0, 4999, 5000, 9999]) {
        p.random_bucket = b;
    }
    ps[0].created_at = n - 10 * DAY;
    ps[1].created_at = n - DAY;
    ps[2].created_at = n - 5 * DAY;
    ps[0].external_id = Some("e1".into());
    ps[3].external_id = Some(String::new());
    check(
        json!({"random_bucket": {"min": 0, "max": 4999}}),
        &ps,
        &[1, 2],
    );
    check(
        json!({"random_bucket": {"min": 5000, "max": 9999}}),
        &ps,
        &[3, 4],
    );
    check(
        json!({"random_bucket": {"min": 4999, "max": 4999}}),
        &ps,
        &[2],
    );
    let at = iso(n - 5 * DAY);
    check(
        json!({"created": {"op": "before", "value": at}}),
        &ps,
        &[1, 4],
    );
    check(json!({"created": {"op": "after", "value": at}}), &ps, &[2]);
    check(json!({"identified": true}), &ps, &[1, 4]);
    check(json!({"identified": false}), &ps, &[2, 3]);
}

#[test]
fn and_or_not() {
    let mut ps = plans();
    ps[0].cohorts.insert(("heap".into(), "c1".into()));
    ps[1].cohorts.insert(("heap".into(), "c1".into()));
    ps[7].cohorts.insert(("heap".into(), "c1".into()));
    let c1 = json!({"cohort": {"partner": "heap", "cohort_id": "c1", "op": "includes"}});
    let pro = attr("plan", "starts_with", json!("pro"));
    check(json!({"and": [c1, pro]}), &ps, &[1, 8]);
    check(json!({"or": [c1, pro]}), &ps, &[1, 2, 8]);
    check(json!({"and": [c1, {"not": pro}]}), &ps, &[2]);
    check(json!({"not": {"or": [c1, pro]}}), &ps, &[3, 4, 5, 6, 7, 9]);
    check(json!({"and": [c1]}), &ps, &[1, 2, 8]);
    check(
        json!({"or": [{"not": c1}, {"and": [c1, {"not": c1}]}]}),
        &ps,
        &[3, 4, 5, 6, 7, 9],
    );
    check(json!({"not": {"not": c1}}), &ps, &[1, 2, 8]);
}
