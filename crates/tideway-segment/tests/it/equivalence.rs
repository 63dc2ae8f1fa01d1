//! The bitmap index must return exactly the profiles the naive evaluator accepts, for random
//! filters over random profiles, also after random incremental updates, removals and cohort
//! deltas.

use std::collections::BTreeMap;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use tideway_segment::{Filter, SegmentIndex, SegmentProfile, matches};

use crate::strategies::{filter, now, profile, profiles, segments};

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
            }
            if i % 6 == 5 {
                assert_agree(&index, &model, &filters, now)?;
            }
        }
        assert_agree(&index, &model, &filters, now)?;
    }
}
