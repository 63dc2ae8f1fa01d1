//! The bitmap index must return exactly the profiles the naive evaluator accepts, for random
//! filters over random profiles, also after random incremental updates, removals and cohort
//! deltas, and after the change feed's cheap updates (attributes only, appended events and
//! purchases), whose model is the profile they stand for.

use std::collections::BTreeMap;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use tideway_segment::{Filter, PurchaseRecord, SegmentIndex, SegmentProfile, matches};

use crate::strategies::{filter, instant, now, profile, profiles, segments};

fn naive(filter: &Filter, profiles: &BTreeMap<u32, SegmentProfile>, now: i64) -> Vec<u32> {
    let lookup = segments();
    profiles
        .values()
        .filter(|p| matches(filter, p, now, &lookup))
        .map(|p| p.uid)
        .collect()
}

fn assert_agree(
    index: &SegmentIndex,
    model: &BTreeMap<u32, SegmentProfile>,
    filters: &[Filter],
    now: i64,
) -> Result<(), TestCaseError> {
    let lookup = segments();
    prop_assert_eq!(
        index.live().iter().collect::<Vec<_>>(),
        model.keys().copied().collect::<Vec<_>>()
    );
    for f in filters {
        let expected = naive(f, model, now);
        let got: Vec<u32> = index.evaluate(f, now, &lookup).iter().collect();
        prop_assert_eq!(&got, &expected, "filter {}", f.to_json());
        let (size, estimated) = index.estimate_size(f, now, &lookup);
        prop_assert!(!estimated);
        prop_assert_eq!(size, expected.len() as u64);
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Change {
    Upsert(SegmentProfile),
    Remove(u32),
    AddToCohort(u32, &'static str, &'static str),
    RemoveFromCohort(u32, &'static str, &'static str),
    /// Everything but the history and cohorts of the profile replaces the user's.
    UpdateAttributes(SegmentProfile),
    AppendEvents(u32, &'static str, Vec<i64>),
    AppendPurchases(u32, Vec<PurchaseRecord>),
}

/// Purchases whose prices make the order of summation matter (0.1, 1e17) and can make a
/// total infinite or NaN.
fn purchases() -> impl Strategy<Value = Vec<PurchaseRecord>> {
    vec(
        (
            select(vec!["p1", "p2", "p4"]),
            instant(),
            select(vec![
                0.1,
                0.5,
                3.0,
                1e17,
                -1e17,
                9_007_199_254_740_992.0,
                -9_007_199_254_740_992.0,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ]),
        )
            .prop_map(|(p, time, price)| PurchaseRecord {
                product_id: p.to_owned(),
                time,
                price,
            }),
        0..4,
    )
}

fn changes() -> impl Strategy<Value = Vec<Change>> {
    let uid = || {
        prop_oneof![
            0u32..12,
            select(vec![65_535u32, 65_536, 131_072, 1_000_000])
        ]
    };
    let cohort = || select(vec![("heap", "c1"), ("heap", "c2"), ("mix", "c1")]);
    vec(
        prop_oneof![
            4 => uid().prop_flat_map(profile).prop_map(Change::Upsert),
            2 => uid().prop_map(Change::Remove),
            1 => (uid(), cohort()).prop_map(|(u, (p, c))| Change::AddToCohort(u, p, c)),
            1 => (uid(), cohort()).prop_map(|(u, (p, c))| Change::RemoveFromCohort(u, p, c)),
            3 => uid().prop_flat_map(profile).prop_map(Change::UpdateAttributes),
            3 => (uid(), select(vec!["a", "b", "c"]), vec(instant(), 0..4))
                .prop_map(|(u, e, t)| Change::AppendEvents(u, e, t)),
            3 => (uid(), purchases()).prop_map(|(u, p)| Change::AppendPurchases(u, p)),
        ],
        0..24,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn bitmap_index_agrees_with_the_naive_evaluator(
        profiles in profiles(40),
        filters in vec(filter(), 1..10),
        now in now(),
    ) {
        let mut index = SegmentIndex::new();
        for p in &profiles {
            index.upsert(p);
        }
        let model: BTreeMap<u32, SegmentProfile> = profiles.into_iter().map(|p| (p.uid, p)).collect();
        assert_agree(&index, &model, &filters, now)?;
    }

    #[test]
    fn agreement_survives_incremental_changes(
        initial in profiles(20),
        changes in changes(),
        filters in vec(filter(), 1..8),
        now in now(),
    ) {
        let mut index = SegmentIndex::new();
        let mut model = BTreeMap::new();
        for p in initial {
            index.upsert(&p);
            model.insert(p.uid, p);
        }
        for (i, change) in changes.into_iter().enumerate() {
            match change {
                Change::Upsert(p) => {
                    index.upsert(&p);
                    model.insert(p.uid, p);
                }
                Change::Remove(uid) => {
                    prop_assert_eq!(index.remove(uid), model.remove(&uid).is_some());
                }
                Change::AddToCohort(uid, partner, cohort) => {
                    let applied = index.add_to_cohort(uid, partner, cohort);
                    let p = model.get_mut(&uid);
                    prop_assert_eq!(applied, p.is_some());
                    if let Some(p) = p {
                        p.cohorts.insert((partner.to_owned(), cohort.to_owned()));
                    }
                }
                Change::RemoveFromCohort(uid, partner, cohort) => {
                    let was = index.remove_from_cohort(uid, partner, cohort);
                    let model_was = model
                        .get_mut(&uid)
                        .is_some_and(|p| p.cohorts.remove(&(partner.to_owned(), cohort.to_owned())));
                    prop_assert_eq!(was, model_was);
                }
                Change::UpdateAttributes(mut p) => {
                    index.update_attributes(&p);
                    if let Some(old) = model.remove(&p.uid) {
                        p.events = old.events;
                        p.purchases = old.purchases;
                        p.cohorts = old.cohorts;
                    }
                    model.insert(p.uid, p);
                }
                Change::AppendEvents(uid, name, times) => {
                    let applied = index.append_events(uid, name, &times);
                    let p = model.get_mut(&uid);
                    prop_assert_eq!(applied, p.is_some());
                    if let Some(p) = p
                        && !times.is_empty()
                    {
                        let history = p.events.entry(name.to_owned()).or_default();
                        for t in times {
                            history.record(t);
                        }
                    }
                }
                Change::AppendPurchases(uid, purchases) => {
                    let applied = index.append_purchases(uid, &purchases);
                    let p = model.get_mut(&uid);
                    prop_assert_eq!(applied, p.is_some());
                    if let Some(p) = p {
                        p.purchases.extend(purchases);
                    }
                }
            }
            if i % 6 == 5 {
                assert_agree(&index, &model, &filters, now)?;
            }
        }
        assert_agree(&index, &model, &filters, now)?;
    }
}

/// Appended purchases continue the total in profile order: with 2^53 (where the spacing of
/// doubles is 2) a cent-level amount is absorbed or not depending on the order of the sum.
#[test]
fn appended_purchases_keep_the_order_of_the_total() {
    let big = 9_007_199_254_740_992.0;
    let buy = |price: f64| PurchaseRecord {
        product_id: "p1".into(),
        time: 10,
        price,
    };
    let mut profile = SegmentProfile::new(7, 0);
    profile.purchases = vec![buy(0.5)];
    let mut index = SegmentIndex::new();
    index.upsert(&profile);
    index.append_purchases(7, &[buy(big), buy(-big)]);
    profile.purchases.extend([buy(big), buy(-big)]);
    let lookup = segments();
    for threshold in [0.0, 0.5] {
        for at_least in [false, true] {
            let number = serde_json::Number::from_f64(threshold).expect("finite");
            let f = if at_least {
                Filter::Purchase(tideway_segment::PurchaseOp::TotalSpendAtLeast(number))
            } else {
                Filter::Purchase(tideway_segment::PurchaseOp::TotalSpendAtMost(number))
            };
            let expected = matches(&f, &profile, 0, &lookup);
            assert_eq!(
                index.evaluate(&f, 0, &lookup).contains(7),
                expected,
                "{threshold} {at_least}"
            );
        }
    }
}

/// Segments `L0 … L9`, each (but `L0`) an `and` of ten `in_segment`s of the one before, and a
/// lookup that counts how often a filter is looked up (once per nested evaluation).
struct Chain {
    lookups: std::cell::Cell<u64>,
}

impl tideway_segment::SegmentLookup for Chain {
    fn filter(&self, id: &str) -> Option<Filter> {
        self.lookups.set(self.lookups.get() + 1);
        let level: usize = id.strip_prefix('L')?.parse().ok()?;
        let json = match level {
            0 => serde_json::json!({"attribute": {"name": "plan", "op": "equals", "value": "pro"}}),
            1..=9 => {
                let below = format!("L{}", level - 1);
                serde_json::json!({"and": vec![serde_json::json!({"in_segment": below}); 10]})
            }
            _ => return None,
        };
        Filter::from_json(&json).ok()
    }
}

#[test]
fn a_segment_named_many_times_over_is_evaluated_once_per_user() {
    let mut index = SegmentIndex::new();
    for uid in 1..=100u32 {
        let plan = if uid % 3 == 0 { "pro" } else { "free" };
        index.upsert(&SegmentProfile {
            uid,
            attributes: [("plan".to_owned(), serde_json::json!(plan))].into(),
            ..SegmentProfile::default()
        });
    }
    let chain = Chain {
        lookups: std::cell::Cell::new(0),
    };
    let top = Filter::from_json(&serde_json::json!({"in_segment": "L9"})).unwrap();
    let members: Vec<u32> = index.evaluate(&top, 0, &chain).iter().collect();
    assert_eq!(
        members,
        (1..=100).filter(|u| u % 3 == 0).collect::<Vec<_>>()
    );
    // Ten levels, each looked up once: without memoising, 10⁹ nested evaluations.
    assert_eq!(chain.lookups.get(), 10);
}
