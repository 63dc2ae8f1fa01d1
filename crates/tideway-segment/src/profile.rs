//! The profile as segment evaluation sees it.
//!
//! Defined here, not in the store, so that the filter language has one precise input: the store
//! adapts its rows to a [`SegmentProfile`] and feeds them to [`crate::SegmentIndex::upsert`]. It
//! holds only what filters can ask about, keyed by a dense per-workspace `uid` (the bitmap
//! index's row number).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::datetime::count_between;

/// One user, for segment evaluation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SegmentProfile {
    /// Dense per-workspace id (the index's row number).
    pub uid: u32,
    /// Set for identified users; `None` for anonymous ones.
    pub external_id: Option<String>,
    /// Creation time, unix seconds.
    pub created_at: i64,
    /// Stable random bucket, 0–9999.
    pub random_bucket: u16,
    /// Standard (Braze names) and custom attributes; `null` counts as absent; arrays are JSON
    /// arrays of strings / numbers; times are ISO-8601 strings.
    pub attributes: BTreeMap<String, Value>,
    /// Custom events by name.
    pub events: BTreeMap<String, EventHistory>,
    /// Purchases, in any order.
    pub purchases: Vec<PurchaseRecord>,
    /// Partner cohort memberships as `(partner, cohort_id)`.
    pub cohorts: BTreeSet<(String, String)>,
}

/// Every occurrence time (unix seconds) of one event for one user, kept sorted, so "how many in
/// the last D days" is exact for any D and any `now`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventHistory {
    times: Vec<i64>,
}

impl EventHistory {
    /// From occurrence times in any order.
    pub fn from_times(mut times: Vec<i64>) -> Self {
        times.sort_unstable();
        Self { times }
    }

    /// Records one more occurrence.
    pub fn record(&mut self, time: i64) {
        let at = self.times.partition_point(|&t| t <= time);
        self.times.insert(at, time);
    }

    /// The occurrence times, ascending.
    pub fn times(&self) -> &[i64] {
        &self.times
    }

    /// Number of occurrences.
    pub fn count(&self) -> usize {
        self.times.len()
    }

    /// Earliest occurrence.
    pub fn first(&self) -> Option<i64> {
        self.times.first().copied()
    }

    /// Latest occurrence.
    pub fn last(&self) -> Option<i64> {
        self.times.last().copied()
    }

    /// Occurrences in `[from, to]`.
    pub fn count_between(&self, from: i64, to: i64) -> usize {
        count_between(&self.times, from, to)
    }
}

/// One purchase (a purchase of quantity n is n records, as Braze does).
#[derive(Clone, Debug, PartialEq)]
pub struct PurchaseRecord {
    /// The product id.
    pub product_id: String,
    /// Purchase time, unix seconds.
    pub time: i64,
    /// Price in the purchase currency.
    pub price: f64,
}

impl SegmentProfile {
    /// An empty profile.
    pub fn new(uid: u32, created_at: i64) -> Self {
        Self {
            uid,
            created_at,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_stays_sorted() {
        let mut h = EventHistory::from_times(vec![5, 1, 3]);
        h.record(2);
        h.record(9);
        h.record(0);
        assert_eq!(h.times(), &[0, 1, 2, 3, 5, 9]);
        assert_eq!((h.first(), h.last(), h.count()), (Some(0), Some(9), 6));
        assert_eq!(h.count_between(2, 5), 3);
    }
}
