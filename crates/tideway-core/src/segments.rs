//! Segments: stored definitions, the store's feed of profiles for segment evaluation, and
//! [`LiveIndex`], a workspace's bitmap index kept current from that feed.
//!
//! The filter language itself is `tideway-segment`; this module is the glue between it and the
//! rest of the domain. The store hands out a [`ProfileSnapshot`] (every live user, as a
//! [`SegmentProfile`], with the log positions it reflects) and then [`ProfileChanges`] (what
//! changed after these positions, incrementally: new attributes, appended events and purchases,
//! cohort deltas, removals, and whole profiles only where an append cannot say it).
//! [`LiveIndex`] applies both, so the HTTP service and the export CLI evaluate segments the same
//! way. No IO here: the caller reads
//! the store and passes `now`.
//!
//! A [`LiveIndex`] also has a byte form, its *snapshot* ([`LiveIndex::to_snapshot`],
//! [`LiveIndex::from_snapshot_bytes`]): the index, the ids and the feed position, behind a
//! versioned header and a checksum, so a server can load it at start and catch up from the
//! feed instead of reloading every profile. Writing it to disk is the caller's business.

use std::collections::HashMap;

use serde_json::Value;
use tideway_segment::{
    DecodeError, Filter, INDEX_FORMAT, PurchaseRecord, Reader, SegmentIndex, SegmentLookup,
    SegmentProfile, Writer,
};

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

/// What changed between two positions, in the cheapest form that brings an index at the first
/// position to the second:
///
/// - `attributes`: users whose attributes or identifiers changed, and new users: their current
///   identifiers, creation time and attributes only (the profiles' events, purchases and cohorts
///   are empty and ignored). An indexed user keeps their history; a new one is inserted, and
///   their history arrives as `occurrences` and `cohort_deltas` like everyone else's.
/// - `occurrences`: every custom event and purchase logged between the positions, in log order,
///   appended to their users' histories (a user who tracked one event does not reload years of
///   them).
/// - `cohort_deltas`: membership changes in change order (a million-change cohort import does
///   not reload a million profiles).
/// - `removed`: users that no longer exist (deleted or merged away).
/// - `users`: users reloaded whole (events, purchases and cohorts included), for the rare
///   changes an append cannot express, e.g. a merge's survivor, whose history gained the
///   loser's. A reload reflects everything up to `position` and replaces whatever the other
///   parts did to that user.
///
/// A user is in at most one of `attributes`, `removed` and `users`. [`LiveIndex::apply`] is the
/// meaning of this type: applied to the index a full load would give at the first position, the
/// result must answer every filter as a full load at `position` would.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProfileChanges {
    pub users: Vec<SegmentUser>,
    pub attributes: Vec<SegmentUser>,
    pub occurrences: Vec<Occurrence>,
    pub removed: Vec<UserSeq>,
    pub cohort_deltas: Vec<CohortDelta>,
    pub position: FeedPosition,
}

impl ProfileChanges {
    /// How many things this applies (users, occurrences, deltas), for metrics and pacing.
    pub fn len(&self) -> usize {
        self.users.len()
            + self.attributes.len()
            + self.occurrences.len()
            + self.removed.len()
            + self.cohort_deltas.len()
    }

    /// Whether it changes nothing (it may still move the position).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One custom event or purchase of one user, appended to their history.
#[derive(Debug, Clone, PartialEq)]
pub struct Occurrence {
    pub user: UserSeq,
    pub behavior: Behavior,
}

/// What an [`Occurrence`] records.
#[derive(Debug, Clone, PartialEq)]
pub enum Behavior {
    /// A custom event, at `time` (unix seconds).
    Event { name: String, time: i64 },
    /// One purchase (a purchase of quantity n is n of them).
    Purchase(PurchaseRecord),
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
    /// By uid (uids are dense): braze_id and external_id of each indexed user.
    ids: Vec<Option<(BrazeId, Option<String>)>>,
    position: FeedPosition,
}

/// A snapshot being taken: what [`LiveIndex::begin_snapshot`] copied out of the index.
pub struct PendingSnapshot {
    /// Position and ids, encoded.
    payload: Vec<u8>,
    index: SegmentIndex,
    position: FeedPosition,
}

impl PendingSnapshot {
    /// The feed position the snapshot records.
    pub fn position(&self) -> FeedPosition {
        self.position
    }

    /// The snapshot bytes (see [`LiveIndex::to_snapshot`]).
    pub fn finish(self) -> Vec<u8> {
        let mut payload = self.payload;
        self.index.encode(&mut payload);
        let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
        out.extend_from_slice(&INDEX_FORMAT.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&snapshot_checksum(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }
}

/// First bytes of a [`LiveIndex`] snapshot.
const SNAPSHOT_MAGIC: &[u8; 8] = b"TWSEGIX\0";
/// Version of the snapshot framing and of the ids / position part; the index part has its own
/// ([`INDEX_FORMAT`]). A snapshot with either version different is refused.
pub const SNAPSHOT_FORMAT: u32 = 1;
/// Magic, two versions, payload length, checksum.
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8;

/// Why snapshot bytes were refused (the caller discards them and rebuilds).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a segment index snapshot")]
    NotASnapshot,
    #[error(
        "snapshot format {found}/{found_index}, this build reads {SNAPSHOT_FORMAT}/{INDEX_FORMAT}"
    )]
    OtherVersion { found: u32, found_index: u32 },
    #[error("snapshot checksum mismatch (damaged or truncated)")]
    Checksum,
    #[error(transparent)]
    Damaged(#[from] DecodeError),
}

/// A fast 64-bit checksum (four independent multiply-rotate lanes over 8-byte words, then the
/// tail and the length). It detects damage — torn writes, flipped bits — not tampering: the
/// file lives in the data directory with mode 0600.
pub fn snapshot_checksum(bytes: &[u8]) -> u64 {
    const K: [u64; 4] = [
        0x9E37_79B9_7F4A_7C15,
        0xC2B2_AE3D_27D4_EB4F,
        0x1656_67B1_9E37_79F9,
        0x85EB_CA77_C2B2_AE63,
    ];
    let mut lanes = K;
    let mut blocks = bytes.chunks_exact(32);
    for block in &mut blocks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let word = u64::from_le_bytes(block[i * 8..][..8].try_into().expect("8 bytes"));
            *lane = (*lane ^ word).wrapping_mul(K[i]).rotate_left(29);
        }
    }
    let mut h = (bytes.len() as u64).wrapping_mul(K[0]);
    for lane in lanes {
        h = (h ^ lane).wrapping_mul(K[1]).rotate_left(31);
    }
    for &b in blocks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K[2]).rotate_left(23);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(K[3]);
    h ^ (h >> 29)
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
        self.set_ids(user);
    }

    fn set_ids(&mut self, user: &SegmentUser) {
        let i = user.profile.uid as usize;
        if self.ids.len() <= i {
            self.ids.resize(i + 1, None);
        }
        self.ids[i] = Some((user.braze_id.clone(), user.profile.external_id.clone()));
    }

    /// The snapshot: this index, its ids and its feed position, framed (magic, versions,
    /// length, checksum). [`LiveIndex::from_snapshot_bytes`] reads it back.
    pub fn to_snapshot(&self) -> Vec<u8> {
        self.begin_snapshot().finish()
    }

    /// The part of [`LiveIndex::to_snapshot`] that reads `self`, kept short so that a caller
    /// holding a lock on the index holds it briefly: the position and ids are encoded (no
    /// allocation per user) and the bitmap index is copied; [`PendingSnapshot::finish`]
    /// encodes that copy and frames the whole without needing the index.
    pub fn begin_snapshot(&self) -> PendingSnapshot {
        let mut payload = Vec::new();
        {
            let w = &mut Writer::new(&mut payload);
            w.i64(self.position.event_seq);
            w.i64(self.position.cohort_change_seq);
            w.i64(self.position.user_change_seq);
            let count = self.ids.iter().flatten().count();
            w.len(count);
            for (uid, (braze_id, external_id)) in self
                .ids
                .iter()
                .enumerate()
                .filter_map(|(u, e)| Some((u, e.as_ref()?)))
            {
                w.u32(uid as u32);
                let mut raw = [0u8; 12];
                hex::decode_to_slice(braze_id.as_str(), &mut raw)
                    .expect("a braze_id is 24 hex characters");
                for b in raw {
                    w.u8(b);
                }
                match external_id {
                    None => w.u8(0),
                    Some(e) => {
                        w.u8(1);
                        w.str(e);
                    }
                }
            }
        }
        PendingSnapshot {
            payload,
            index: self.index.clone(),
            position: self.position,
        }
    }

    /// Reads a snapshot written by [`LiveIndex::to_snapshot`]; refuses other versions, a bad
    /// checksum and anything that does not decode exactly.
    pub fn from_snapshot_bytes(bytes: &[u8]) -> Result<LiveIndex, SnapshotError> {
        if bytes.len() < HEADER_BYTES || &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let long = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let (found, found_index) = (word(8), word(12));
        if found != SNAPSHOT_FORMAT || found_index != INDEX_FORMAT {
            return Err(SnapshotError::OtherVersion { found, found_index });
        }
        let payload = &bytes[HEADER_BYTES..];
        if long(16) != payload.len() as u64 || long(24) != snapshot_checksum(payload) {
            return Err(SnapshotError::Checksum);
        }
        let r = &mut Reader::new(payload);
        let position = FeedPosition {
            event_seq: r.i64()?,
            cohort_change_seq: r.i64()?,
            user_change_seq: r.i64()?,
        };
        let count = r.len(4 + 12 + 1)?;
        let mut entries: Vec<(u32, BrazeId, Option<String>)> = Vec::with_capacity(count);
        for _ in 0..count {
            let uid = r.u32()?;
            let raw: [u8; 12] = r.take(12)?.try_into().expect("12 bytes");
            let external_id = match r.u8()? {
                0 => None,
                1 => Some(r.string()?),
                _ => {
                    return Err(DecodeError {
                        what: "external id",
                    }
                    .into());
                }
            };
            entries.push((uid, BrazeId::from_bytes(raw), external_id));
        }
        let index = SegmentIndex::decode(r.rest())?;
        // exactly one id per indexed user, in uid order (which also bounds the ids column)
        if entries.len() as u64 != index.len()
            || !entries
                .iter()
                .zip(index.live().iter())
                .all(|((uid, _, _), live)| *uid == live)
        {
            return Err(DecodeError { what: "ids" }.into());
        }
        let mut ids = Vec::new();
        ids.resize(index.live().max().map_or(0, |m| m as usize + 1), None);
        for (uid, braze_id, external_id) in entries {
            ids[uid as usize] = Some((braze_id, external_id));
        }
        let live = LiveIndex {
            index,
            ids,
            position,
        };
        Ok(live)
    }

    /// Applies a change set (see [`ProfileChanges`] for what each part means), then moves to
    /// `changes.position`. Order: attributes first (so a new user is live for the rest), then
    /// cohort deltas and appended occurrences, then removals, then whole reloads (which
    /// already reflect everything before them).
    pub fn apply(&mut self, changes: &ProfileChanges) {
        for user in &changes.attributes {
            self.index.update_attributes(&user.profile);
            self.set_ids(user);
        }
        for d in &changes.cohort_deltas {
            if d.entered {
                self.index.add_to_cohort(d.user.0, &d.partner, &d.cohort_id);
            } else {
                self.index
                    .remove_from_cohort(d.user.0, &d.partner, &d.cohort_id);
            }
        }
        self.append(&changes.occurrences);
        for seq in &changes.removed {
            self.index.remove(seq.0);
            if let Some(slot) = self.ids.get_mut(seq.0 as usize) {
                *slot = None;
            }
        }
        for user in &changes.users {
            self.upsert(user);
        }
        self.position = self.position.max(changes.position);
    }

    /// Appends occurrences, grouped so that each user's history of each event is copied once
    /// per change set however many occurrences it gained; purchases keep their log order
    /// (total spend is summed in it).
    fn append(&mut self, occurrences: &[Occurrence]) {
        let mut events: HashMap<(u32, &str), Vec<i64>> = HashMap::new();
        let mut purchases: HashMap<u32, Vec<PurchaseRecord>> = HashMap::new();
        for o in occurrences {
            match &o.behavior {
                Behavior::Event { name, time } => {
                    events.entry((o.user.0, name)).or_default().push(*time);
                }
                Behavior::Purchase(p) => purchases.entry(o.user.0).or_default().push(p.clone()),
            }
        }
        for ((uid, name), times) in events {
            self.index.append_events(uid, name, &times);
        }
        for (uid, records) in purchases {
            self.index.append_purchases(uid, &records);
        }
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
            .position(|e| e.as_ref().is_some_and(|(b, _)| b == braze_id))
            .map(|uid| UserSeq(uid as u32))
    }

    fn member(&self, uid: u32) -> Option<Member> {
        let (braze_id, external_id) = self.ids.get(uid as usize)?.as_ref()?;
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
            ..ProfileChanges::default()
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

    #[test]
    fn a_new_user_takes_deltas_and_occurrences_of_the_same_change_set() {
        let mut live = LiveIndex::from_snapshot(ProfileSnapshot {
            users: vec![user(1, &[])],
            position: FeedPosition::default(),
        });
        let parse = |v: serde_json::Value| Filter::from_json(&v).unwrap();
        let target = parse(serde_json::json!({"and": [
            {"cohort": {"partner": "heap", "cohort_id": "c", "op": "includes"}},
            {"event": {"name": "open", "op": "count_at_least", "value": 2}},
            {"purchase": {"op": "total_spend_at_least", "value": 3}},
        ]}));
        let open = |u: u32, time: i64| Occurrence {
            user: UserSeq(u),
            behavior: Behavior::Event {
                name: "open".into(),
                time,
            },
        };
        let buy = |u: u32, price: f64| Occurrence {
            user: UserSeq(u),
            behavior: Behavior::Purchase(PurchaseRecord {
                product_id: "p".into(),
                time: 5,
                price,
            }),
        };
        live.apply(&ProfileChanges {
            // 2 is new: its attributes make it live before its delta and occurrences apply
            attributes: vec![user(2, &[])],
            cohort_deltas: vec![delta(1, "c", true), delta(2, "c", true)],
            occurrences: vec![
                open(2, 9),
                open(1, 3),
                open(2, 4),
                buy(2, 1.0),
                buy(2, 2.5),
                buy(1, 9.0),
            ],
            ..ProfileChanges::default()
        });
        let members = |live: &LiveIndex| -> Vec<u32> {
            live.members(&target, 10, &NoSegments, 0, 10)
                .iter()
                .map(|m| m.seq.0)
                .collect()
        };
        assert_eq!(members(&live), [2]);
        // attributes only: the history stays
        live.apply(&ProfileChanges {
            attributes: vec![user(2, &[])],
            occurrences: vec![open(1, 8)],
            ..ProfileChanges::default()
        });
        assert_eq!(members(&live), [1, 2]);
    }

    #[test]
    fn a_begun_snapshot_is_the_index_as_it_was_begun() {
        let mut live = LiveIndex::from_snapshot(ProfileSnapshot {
            users: vec![user(1, &["c"]), user(2, &[])],
            position: FeedPosition::default(),
        });
        let pending = live.begin_snapshot();
        let before = live.to_snapshot();
        // changes applied while the snapshot is encoded are not in it
        live.apply(&ProfileChanges {
            cohort_deltas: vec![delta(2, "c", true)],
            removed: vec![UserSeq(1)],
            position: FeedPosition {
                cohort_change_seq: 1,
                ..FeedPosition::default()
            },
            ..ProfileChanges::default()
        });
        assert_eq!(pending.position(), FeedPosition::default());
        let bytes = pending.finish();
        assert_eq!(bytes, before);
        let back = LiveIndex::from_snapshot_bytes(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_ne!(live.to_snapshot(), bytes);
    }

    #[test]
    fn a_snapshot_round_trips_and_damage_is_refused() {
        let mut live = LiveIndex::from_snapshot(ProfileSnapshot {
            users: vec![user(1, &["c"]), user(2, &["c"]), user(7, &[])],
            position: FeedPosition {
                event_seq: 11,
                cohort_change_seq: 12,
                user_change_seq: 13,
            },
        });
        live.apply(&ProfileChanges {
            removed: vec![UserSeq(2)],
            ..ProfileChanges::default()
        });
        let in_c = Filter::from_json(
            &serde_json::json!({"cohort": {"partner": "heap", "cohort_id": "c", "op": "includes"}}),
        )
        .unwrap();
        let bytes = live.to_snapshot();
        let back = LiveIndex::from_snapshot_bytes(&bytes).expect("round trip");
        assert_eq!(back.position(), live.position());
        assert_eq!(back.len(), 2);
        assert_eq!(
            back.members(&in_c, 0, &NoSegments, 0, 10),
            live.members(&in_c, 0, &NoSegments, 0, 10)
        );
        assert_eq!(back.seq_of(&BrazeId::from_bytes([7; 12])), Some(UserSeq(7)));
        assert_eq!(back.seq_of(&BrazeId::from_bytes([2; 12])), None);

        for at in [HEADER_BYTES, bytes.len() / 2, bytes.len() - 1] {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x40;
            assert_eq!(
                LiveIndex::from_snapshot_bytes(&flipped).err(),
                Some(SnapshotError::Checksum),
                "flip at {at}"
            );
        }
        assert_eq!(
            LiveIndex::from_snapshot_bytes(&bytes[..bytes.len() - 5]).err(),
            Some(SnapshotError::Checksum)
        );
        let mut old = bytes.clone();
        old[8] = 0;
        assert!(matches!(
            LiveIndex::from_snapshot_bytes(&old),
            Err(SnapshotError::OtherVersion { found: 0, .. })
        ));
        assert_eq!(
            LiveIndex::from_snapshot_bytes(b"hello").err(),
            Some(SnapshotError::NotASnapshot)
        );
    }
}
