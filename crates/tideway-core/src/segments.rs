//! Segments: stored definitions, the store's feed of profiles for segment evaluation, and
//! [`LiveIndex`], a workspace's bitmap index kept current from that feed.
//!
//! The filter language itself is `tideway-segment`; this module is the glue between it and the
//! rest of the domain. The store hands out a [`ProfileSnapshot`] (every live user, as a
//! [`SegmentProfile`], with the log positions it reflects) and then [`ProfileChanges`] ("users
//! whose data changed after these positions", reloaded). [`LiveIndex`] applies both, so the
//! HTTP service and the export CLI evaluate segments the same way. No IO here: the caller reads
//! the store and passes `now`.

use std::collections::HashMap;

use serde_json::Value;
use tideway_segment::{Filter, SegmentIndex, SegmentLookup, SegmentProfile};

use crate::clock::Millis;
use crate::ids::{BrazeId, UserSeq};
use crate::profile::UserRecord;

/// A stored segment: a name and a filter in its wire form (validated when it was saved).
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// A UUID, unique across workspaces.
    pub id: String,
    pub name: String,
    /// The filter's wire JSON, as `tideway_segment::Filter::to_json` printed it.
    pub filter: Value,
    pub created_at: Millis,
    pub updated_at: Millis,
}

impl Segment {
    /// The parsed filter; `None` if the stored JSON no longer parses (a damaged row).
    pub fn parsed_filter(&self) -> Option<Filter> {
        Filter::from_json(&self.filter).ok()
    }
}

/// The stored segments of a workspace by id, for `in_segment` resolution.
pub fn segment_lookup(segments: &[Segment]) -> HashMap<String, Filter> {
    segments
        .iter()
        .filter_map(|s| Some((s.id.clone(), s.parsed_filter()?)))
        .collect()
}

/// One live user as segment evaluation sees them, with the id the API reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentUser {
    pub braze_id: BrazeId,
    pub profile: SegmentProfile,
}

/// How far into the store's change sequences a snapshot or a change set reaches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FeedPosition {
    /// Last `event_log` position included.
    pub event_seq: i64,
    /// Last cohort membership change included.
    pub cohort_change_seq: i64,
    /// Last user creation / identifier change included.
    pub user_change_seq: i64,
}

/// Every live user of a workspace at one consistent point of the store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileSnapshot {
    pub users: Vec<SegmentUser>,
    pub position: FeedPosition,
}

/// What changed between two positions: the current profiles of users whose attributes,
/// identifiers or events changed, the users that no longer exist (deleted or merged away), and
/// cohort membership deltas in change order (cheap to apply: a million-change cohort import
/// does not reload a million profiles).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileChanges {
    pub users: Vec<SegmentUser>,
    pub removed: Vec<UserSeq>,
    pub cohort_deltas: Vec<CohortDelta>,
    pub position: FeedPosition,
}

/// One user entering or leaving one partner cohort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortDelta {
    pub user: UserSeq,
    pub partner: String,
    pub cohort_id: String,
    pub entered: bool,
}

/// The part of a [`SegmentProfile`] that comes from the user record: identifiers, creation time,
/// random bucket, and attributes (standard by their Braze names, `email` / `phone` from the
/// record, then custom ones; a standard name wins over a custom one). Events, purchases and
/// cohorts are left empty for the store to fill from its logs.
pub fn base_profile(record: &UserRecord) -> SegmentProfile {
    let mut p = SegmentProfile::new(record.seq.0, record.created_at.secs());
    p.external_id = record.external_id.as_ref().map(|e| e.as_str().to_owned());
    p.random_bucket = record.random_bucket();
    for (name, value) in &record.profile.custom {
        if !value.is_null() {
            p.attributes.insert(name.clone(), value.clone());
        }
    }
    for (field, value) in &record.profile.standard {
        if !value.is_null() {
            p.attributes
                .insert(field.as_str().to_owned(), value.clone());
        }
    }
    if let Some(email) = &record.email {
        p.attributes
            .insert("email".into(), Value::String(email.as_str().to_owned()));
    }
    if let Some(phone) = &record.phone {
        p.attributes
            .insert("phone".into(), Value::String(phone.as_str().to_owned()));
    }
    p
}

/// A member as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub seq: UserSeq,
    pub braze_id: BrazeId,
    pub external_id: Option<String>,
}

/// A workspace's [`SegmentIndex`] plus what it needs to answer with ids, and the feed
/// position it reflects.
#[derive(Default)]
pub struct LiveIndex {
    index: SegmentIndex,
    ids: HashMap<u32, (BrazeId, Option<String>)>,
    position: FeedPosition,
}

impl LiveIndex {
    /// Builds the index from a snapshot.
    pub fn from_snapshot(snapshot: ProfileSnapshot) -> Self {
        let mut live = LiveIndex {
            position: snapshot.position,
            ..LiveIndex::default()
        };
        for user in &snapshot.users {
            live.upsert(user);
        }
        live.index.optimize();
        live
    }

    fn upsert(&mut self, user: &SegmentUser) {
        self.index.upsert(&user.profile);
        self.ids.insert(
            user.profile.uid,
            (user.braze_id.clone(), user.profile.external_id.clone()),
        );
    }

    /// Applies cohort deltas, reloaded users and removals, then moves to `changes.position`.
    /// A reloaded profile already reflects every delta up to the position, so it replaces
    /// whatever the deltas did to that user.
    pub fn apply(&mut self, changes: &ProfileChanges) {
        for d in &changes.cohort_deltas {
            if d.entered {
                self.index.add_to_cohort(d.user.0, &d.partner, &d.cohort_id);
            } else {
                self.index
                    .remove_from_cohort(d.user.0, &d.partner, &d.cohort_id);
            }
        }
        for seq in &changes.removed {
            self.index.remove(seq.0);
            self.ids.remove(&seq.0);
        }
        for user in &changes.users {
            self.upsert(user);
        }
        self.position = self.position.max(changes.position);
    }

    /// The store positions this index reflects; ask the store for changes after them.
    pub fn position(&self) -> FeedPosition {
        self.position
    }

    /// Number of live users indexed.
    pub fn len(&self) -> u64 {
        self.index.len()
    }

    /// True when no user is indexed.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The index itself (for evaluation and estimates).
    pub fn index(&self) -> &SegmentIndex {
        &self.index
    }

    /// Exact size of the segment at `now` (unix seconds).
    pub fn size(&self, filter: &Filter, now: i64, lookup: &dyn SegmentLookup) -> u64 {
        self.index.evaluate(filter, now, lookup).len()
    }

    /// Members with `seq > after`, in `seq` order, at most `limit`.
    pub fn members(
        &self,
        filter: &Filter,
        now: i64,
        lookup: &dyn SegmentLookup,
        after: u32,
        limit: usize,
    ) -> Vec<Member> {
        let mut bitmap = self.index.evaluate(filter, now, lookup);
        bitmap.remove_range(..=after);
        bitmap
            .iter()
            .take(limit)
            .filter_map(|uid| self.member(uid))
            .collect()
    }

    /// Every member, in `seq` order.
    pub fn all_members<'a>(
        &'a self,
        filter: &Filter,
        now: i64,
        lookup: &dyn SegmentLookup,
    ) -> impl Iterator<Item = Member> + 'a {
        let bitmap = self.index.evaluate(filter, now, lookup);
        bitmap.into_iter().filter_map(move |uid| self.member(uid))
    }

    /// The indexed user with this braze_id, if any.
    pub fn seq_of(&self, braze_id: &BrazeId) -> Option<UserSeq> {
        self.ids
            .iter()
            .find(|(_, (b, _))| b == braze_id)
            .map(|(uid, _)| UserSeq(*uid))
    }

    fn member(&self, uid: u32) -> Option<Member> {
        let (braze_id, external_id) = self.ids.get(&uid)?;
        Some(Member {
            seq: UserSeq(uid),
            braze_id: braze_id.clone(),
            external_id: external_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use tideway_segment::NoSegments;

    use super::*;

    fn user(seq: u32, cohorts: &[&str]) -> SegmentUser {
        let mut profile = SegmentProfile::new(seq, 0);
        for c in cohorts {
            profile.cohorts.insert(("heap".into(), (*c).into()));
        }
        SegmentUser {
            braze_id: BrazeId::from_bytes([seq as u8; 12]),
            profile,
        }
    }

    fn delta(seq: u32, cohort: &str, entered: bool) -> CohortDelta {
        CohortDelta {
            user: UserSeq(seq),
            partner: "heap".into(),
            cohort_id: cohort.into(),
            entered,
        }
    }

    #[test]
    fn deltas_apply_and_reloads_win() {
        let mut live = LiveIndex::from_snapshot(ProfileSnapshot {
            users: vec![user(1, &[]), user(2, &["c"]), user(3, &[])],
            position: FeedPosition::default(),
        });
        let in_c = Filter::from_json(
            &serde_json::json!({"cohort": {"partner": "heap", "cohort_id": "c", "op": "includes"}}),
        )
        .unwrap();
        let next = FeedPosition {
            cohort_change_seq: 3,
            ..FeedPosition::default()
        };
        live.apply(&ProfileChanges {
            // 3 enters then is reloaded without the cohort (a later leave folded into the reload).
            users: vec![user(3, &[])],
            removed: vec![UserSeq(2)],
            cohort_deltas: vec![
                delta(1, "c", true),
                delta(2, "c", false),
                delta(3, "c", true),
            ],
            position: next,
        });
        let members: Vec<u32> = live
            .members(&in_c, 0, &NoSegments, 0, 10)
            .iter()
            .map(|m| m.seq.0)
            .collect();
        assert_eq!(members, [1]);
        assert_eq!(live.len(), 2);
        assert_eq!(live.position(), next);
        assert_eq!(live.seq_of(&BrazeId::from_bytes([3; 12])), Some(UserSeq(3)));
        assert_eq!(live.seq_of(&BrazeId::from_bytes([2; 12])), None);
    }
}
