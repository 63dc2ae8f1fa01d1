//! Behaviour at a size where the index samples for estimates, columns turn dense and arenas
//! compact: 150 000 deterministic users, updated and partly removed, still agree exactly with
//! the naive evaluator, and `estimate_size` lands close to the exact count.

use std::collections::BTreeMap;

use serde_json::json;
use tideway_segment::{
    EventHistory, Filter, NoSegments, PurchaseRecord, SegmentIndex, SegmentProfile, matches,
};

use crate::strategies::{DAY, NOW};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn user(uid: u32, generation: u64) -> SegmentProfile {
    let mut r = Rng((u64::from(uid).wrapping_mul(0x9e37_79b9_7f4a_7c15) + generation * 7) | 1);
    let mut p = SegmentProfile::new(uid, NOW - r.below(400) as i64 * DAY);
    p.random_bucket = r.below(10_000) as u16;
    if r.below(10) < 8 {
        p.external_id = Some(format!("u{uid}"));
    }
    let plan = ["free", "free", "pro", "enterprise"][r.below(4) as usize];
    p.attributes.insert("plan".into(), json!(plan));
    p.attributes
        .insert("ltv".into(), json!(r.below(100_000) as f64 / 100.0));
    p.attributes.insert(
        "dob".into(),
        json!(format!(
            "{}-{:02}-{:02}",
            1950 + r.below(60),
            1 + r.below(12),
            1 + r.below(28)
        )),
    );
    for c in 0..4u64 {
        if r.below(100) < 5 + c * 10 {
            p.cohorts.insert(("heap".into(), format!("c{c}")));
        }
    }
    if r.below(10) < 6 {
        let n = 1 + r.below(6) as usize;
        let times = (0..n)
            .map(|_| NOW - r.below(90 * DAY as u64) as i64)
            .collect();
        p.events
            .insert("checkout".into(), EventHistory::from_times(times));
    }
    if r.below(10) == 0 {
        p.purchases.push(PurchaseRecord {
            product_id: format!("sku-{}", r.below(5)),
            time: NOW - r.below(60 * DAY as u64) as i64,
            price: r.below(20_000) as f64 / 100.0,
        });
    }
    p
}

fn filters() -> Vec<Filter> {
    [
        json!({"and": [
            {"cohort": {"partner": "heap", "cohort_id": "c2", "op": "includes"}},
            {"attribute": {"name": "plan", "op": "equals", "value": "pro"}},
            {"event": {"name": "checkout", "op": "count_at_least", "value": 2, "within_days": 30}}
        ]}),
        json!({"or": [
            {"attribute": {"name": "ltv", "op": "greater_than", "value": 900}},
            {"attribute": {"name": "age", "op": "less_than", "value": 25}}
        ]}),
        json!({"and": [
            {"not": {"cohort": {"partner": "heap", "cohort_id": "c3", "op": "includes"}}},
            {"purchase": {"op": "total_spend_at_most", "value": 50}},
            {"random_bucket": {"min": 0, "max": 2999}}
        ]}),
        json!({"event": {"name": "checkout", "op": "last_performed_within_days", "value": 7}}),
    ]
    .iter()
    .map(|v| Filter::from_json(v).unwrap())
    .collect()
}

#[test]
fn large_index_agrees_and_estimates() {
    const USERS: u32 = 150_000;
    let mut index = SegmentIndex::new();
    let mut model = BTreeMap::new();
    for uid in 0..USERS {
        let p = user(uid, 0);
        index.upsert(&p);
        model.insert(uid, p);
    }
    // churn: rewrite a third, remove a seventh
    for uid in (0..USERS).step_by(3) {
        let p = user(uid, 1);
        index.upsert(&p);
        model.insert(uid, p);
    }
    for uid in (0..USERS).step_by(7) {
        assert!(index.remove(uid));
        model.remove(&uid);
    }
    index.optimize();
    for f in filters() {
        let expected = model
            .values()
            .filter(|p| matches(&f, p, NOW, &NoSegments))
            .count() as u64;
        let got = index.evaluate(&f, NOW, &NoSegments).len();
        assert_eq!(got, expected, "{}", f.to_json());
        let (estimate, sampled) = index.estimate_size(&f, NOW, &NoSegments);
        assert!(sampled);
        let tolerance = (expected as f64 * 0.15).max(300.0);
        assert!(
            (estimate as f64 - expected as f64).abs() <= tolerance,
            "{}: estimate {estimate} vs {expected}",
            f.to_json()
        );
    }
    assert!(index.memory_bytes() > 0);
}
