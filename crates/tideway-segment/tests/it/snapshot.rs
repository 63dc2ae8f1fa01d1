//! The snapshot codec: an index written with `SegmentIndex::encode` and read back with
//! `SegmentIndex::decode` answers every filter exactly as the original does (and as the naive
//! evaluator does), keeps doing so after further changes applied to both, and damaged bytes are
//! an error, never a panic.

use std::collections::BTreeMap;

use proptest::collection::vec;
use proptest::prelude::*;
use tideway_segment::{Filter, SegmentIndex, SegmentProfile, matches};

use crate::strategies::{filter, now, profile, profiles, segments};

fn answers(index: &SegmentIndex, filters: &[Filter], now: i64) -> Vec<Vec<u32>> {
    let lookup = segments();
    filters
        .iter()
        .map(|f| index.evaluate(f, now, &lookup).iter().collect())
        .collect()
}

fn naive(model: &BTreeMap<u32, SegmentProfile>, filters: &[Filter], now: i64) -> Vec<Vec<u32>> {
    let lookup = segments();
    filters
        .iter()
        .map(|f| {
            model
                .values()
                .filter(|p| matches(f, p, now, &lookup))
                .map(|p| p.uid)
                .collect()
        })
        .collect()
}

fn round_trip(index: &SegmentIndex) -> SegmentIndex {
    let mut bytes = Vec::new();
    index.encode(&mut bytes);
    SegmentIndex::decode(&bytes).expect("an encoded index decodes")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_decoded_index_answers_like_the_original(
        initial in profiles(40),
        removed in vec(0u32..48, 0..12),
        later in vec((0u32..48).prop_flat_map(profile), 0..8),
        filters in vec(filter(), 1..10),
        now in now(),
    ) {
        let mut index = SegmentIndex::new();
        let mut model = BTreeMap::new();
        for p in initial {
            index.upsert(&p);
            model.insert(p.uid, p);
        }
        // removals leave freed dictionary entries and arena garbage behind: the codec keeps them
        for uid in removed {
            index.remove(uid);
            model.remove(&uid);
        }
        let mut decoded = round_trip(&index);
        prop_assert_eq!(decoded.len(), index.len());
        let expected = naive(&model, &filters, now);
        prop_assert_eq!(&answers(&index, &filters, now), &expected);
        prop_assert_eq!(&answers(&decoded, &filters, now), &expected);
        // the decoded index stays maintainable: the same changes keep both in agreement
        for p in later {
            index.upsert(&p);
            decoded.upsert(&p);
            model.insert(p.uid, p);
        }
        let expected = naive(&model, &filters, now);
        prop_assert_eq!(&answers(&decoded, &filters, now), &expected);
        prop_assert_eq!(&answers(&round_trip(&decoded), &filters, now), &expected);
    }

    #[test]
    fn truncated_bytes_are_an_error(initial in profiles(20), cut in 0.0f64..1.0) {
        let mut index = SegmentIndex::new();
        for p in &initial {
            index.upsert(p);
        }
        let mut bytes = Vec::new();
        index.encode(&mut bytes);
        let at = ((bytes.len() as f64) * cut) as usize;
        prop_assert!(SegmentIndex::decode(&bytes[..at.min(bytes.len() - 1)]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert!(SegmentIndex::decode(&longer).is_err());
    }
}

#[test]
fn dense_columns_round_trip() {
    // thousands of users turn the per-attribute and per-event columns dense
    let mut index = SegmentIndex::new();
    let mut model = BTreeMap::new();
    for uid in 0..5000u32 {
        let mut p = SegmentProfile::new(uid, i64::from(uid));
        p.random_bucket = (uid % 10_000) as u16;
        p.attributes.insert(
            "plan".into(),
            serde_json::json!(["free", "pro"][uid as usize % 2]),
        );
        p.attributes.insert("n".into(), serde_json::json!(uid % 7));
        p.events.insert(
            "opened".into(),
            tideway_segment::EventHistory::from_times(vec![i64::from(uid), 50_000]),
        );
        if uid % 3 == 0 {
            p.cohorts.insert(("heap".into(), "c1".into()));
        }
        index.upsert(&p);
        model.insert(uid, p);
    }
    for uid in (0..5000).step_by(11) {
        index.remove(uid);
        model.remove(&uid);
    }
    let filters: Vec<Filter> = [
        serde_json::json!({"and": [
            {"cohort": {"partner": "heap", "cohort_id": "c1", "op": "includes"}},
            {"attribute": {"name": "plan", "op": "equals", "value": "pro"}},
            {"attribute": {"name": "n", "op": "greater_than", "value": 3}},
            {"event": {"name": "opened", "op": "count_at_least", "value": 2}}
        ]}),
        serde_json::json!({"attribute": {"name": "plan", "op": "not_equals", "value": "pro"}}),
    ]
    .iter()
    .map(|j| Filter::from_json(j).unwrap())
    .collect();
    let decoded = round_trip(&index);
    let expected = naive(&model, &filters, 100_000);
    assert!(expected[0].len() > 100, "the filter selects a real set");
    assert_eq!(answers(&decoded, &filters, 100_000), expected);
    assert_eq!(answers(&index, &filters, 100_000), expected);
}
