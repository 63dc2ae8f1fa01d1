//! The wire form is exact: a filter prints to JSON that parses back to the same filter, and the
//! printed form is stable.

use proptest::prelude::*;
use tideway_segment::{Filter, NoSegments, ValidationContext};

use crate::strategies::{cohort_names, filter, wire_valid};

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn to_json_then_from_json_is_the_identity(f in filter().prop_map(wire_valid)) {
        let wire = f.to_json();
        let back = Filter::from_json(&wire).map_err(|e| TestCaseError::fail(format!("{wire}: {e}")))?;
        prop_assert_eq!(&back, &f);
        prop_assert_eq!(back.to_json(), wire.clone());
        // and through text, as the server stores it
        let text: serde_json::Value = serde_json::from_str(&wire.to_string()).unwrap();
        prop_assert_eq!(Filter::from_json(&text).unwrap(), f);
    }

    #[test]
    fn validation_only_fails_on_segment_references(f in filter().prop_map(wire_valid)) {
        // every cohort of the strategies exists; in_segment ids are unknown to NoSegments
        let cohorts = cohort_names();
        let ctx = ValidationContext { cohorts: &cohorts, segments: &NoSegments, segment_id: None };
        if let Err(e) = f.validate(&ctx) {
            prop_assert_eq!(e.kind, tideway_segment::FilterErrorKind::UnknownSegment);
        }
    }
}
