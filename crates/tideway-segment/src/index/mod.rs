//! The bitmap evaluator: an in-memory index of every profile of a workspace, kept fresh one
//! change at a time, that evaluates a [`Filter`] as set operations over roaring bitmaps.
//!
//! Layout (uids are dense, so a bitmap of uids is a set of users):
//! - `live`, `identified`, email/phone availability, and one bitmap per partner cohort;
//! - per attribute name an [`attr::AttrIndex`] (value dictionary with a bitmap per value,
//!   bit-sliced indexes for numbers and ISO-8601 times);
//! - per event name a bitmap of users who ever did it plus every user's sorted times in an
//!   [`arena::Arena`]; purchases likewise, plus buyers per product and a bit-sliced total spend;
//! - dense columns for `created_at` and `random_bucket`.
//!
//! Evaluation (`eval.rs`) passes a candidate set down the tree: `and` runs its children from
//! the cheapest / most selective to the most expensive, each over the survivors of the previous
//! ones, so scans (event counts, buckets) only look at candidates; `or` is a union, `not` a
//! difference from the candidates. The result must equal [`crate::matches()`] over the same
//! profiles, exactly; the property tests check it after random updates and removals too.

mod arena;
mod attr;
mod bsi;
pub(crate) mod codec;
mod eval;
mod uidmap;

use std::collections::{BTreeMap, HashMap};

use roaring::RoaringBitmap;
use serde_json::Value;

use crate::filter::{Filter, SegmentLookup};
use crate::predicate::{email_available, phone_available, total_spend};
use crate::profile::{PurchaseRecord, SegmentProfile};
use arena::Arena;
use attr::AttrIndex;
use bsi::{Bsi, f64_key, f64_of_key};
use codec::{DecodeError, Reader, Writer, bad};

/// One in [`SAMPLE_MODULUS`] users (chosen by a hash of the uid) forms the fixed estimation sample.
const SAMPLE_MODULUS: u32 = 100;
/// Below this many live users [`SegmentIndex::estimate_size`] just counts.
const EXACT_BELOW: u64 = 100_000;

/// The bitmap index of one workspace's profiles. See the module documentation. `Clone` is a
/// deep copy (a server copies it to write a snapshot without holding up changes).
#[derive(Default, Clone)]
pub struct SegmentIndex {
    live: RoaringBitmap,
    sample: RoaringBitmap,
    identified: RoaringBitmap,
    email_available: RoaringBitmap,
    phone_available: RoaringBitmap,
    created: Vec<i64>,
    buckets: Vec<u16>,
    cohorts: HashMap<String, HashMap<String, RoaringBitmap>>,
    attributes: HashMap<String, AttrIndex>,
    events: HashMap<String, EventIndex>,
    purchases: PurchaseIndex,
}

#[derive(Default, Clone)]
struct EventIndex {
    ever: RoaringBitmap,
    times: Arena<i64>,
}

#[derive(Default, Clone)]
struct PurchaseIndex {
    any: RoaringBitmap,
    /// Per user `(time, product number)`, sorted by time.
    records: Arena<(i64, u32)>,
    product_numbers: HashMap<String, u32>,
    buyers: Vec<RoaringBitmap>,
    /// [`total_spend`] of users with purchases (a NaN total is left out: it compares false).
    spend: Bsi,
}

impl PurchaseIndex {
    /// The number of `product_id`, allocated on first sight.
    fn product_number(&mut self, product_id: &str) -> u32 {
        if let Some(&n) = self.product_numbers.get(product_id) {
            return n;
        }
        let n = u32::try_from(self.buyers.len()).expect("fewer than 4 G distinct product ids");
        self.buyers.push(RoaringBitmap::new());
        self.product_numbers.insert(product_id.to_owned(), n);
        n
    }
}

impl std::fmt::Debug for SegmentIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentIndex")
            .field("users", &self.live.len())
            .field(
                "cohorts",
                &self.cohorts.values().map(HashMap::len).sum::<usize>(),
            )
            .field("attributes", &self.attributes.len())
            .field("events", &self.events.len())
            .field("products", &self.purchases.buyers.len())
            .finish()
    }
}

fn in_sample(uid: u32) -> bool {
    // murmur3 finaliser: spreads consecutive uids
    let mut h = uid;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h.is_multiple_of(SAMPLE_MODULUS)
}

/// Approximate heap bytes of a bitmap: container payloads plus per-container bookkeeping.
/// (roaring's statistics count array capacity in 4-byte units and bitset capacity in bits, so
/// they are converted here: arrays hold `u16`s, a bitset is 8 KiB.)
pub(crate) fn bitmap_bytes(b: &RoaringBitmap) -> usize {
    let s = b.statistics();
    s.n_bytes_array_containers as usize / 2
        + s.n_bitset_containers as usize * 8192
        + s.n_bytes_run_containers as usize
        + s.n_containers as usize * 32
}

impl SegmentIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of live users.
    pub fn len(&self) -> u64 {
        self.live.len()
    }

    /// Whether there is no live user.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// All live uids.
    pub fn live(&self) -> &RoaringBitmap {
        &self.live
    }

    /// Inserts the profile, or replaces what the index holds for its uid. Uids are meant to be
    /// dense: the per-user columns are sized by the largest uid seen.
    pub fn upsert(&mut self, profile: &SegmentProfile) {
        let uid = profile.uid;
        self.remove(uid);
        self.live.insert(uid);
        if in_sample(uid) {
            self.sample.insert(uid);
        }
        if profile.external_id.is_some() {
            self.identified.insert(uid);
        }
        let i = uid as usize;
        if self.created.len() <= i {
            self.created.resize(i + 1, 0);
            self.buckets.resize(i + 1, 0);
        }
        self.created[i] = profile.created_at;
        self.buckets[i] = profile.random_bucket;
        for (partner, cohort_id) in &profile.cohorts {
            self.cohort_insert(uid, partner, cohort_id);
        }
        self.insert_attributes(uid, &profile.attributes);
        for (name, history) in &profile.events {
            if history.times().is_empty() {
                continue;
            }
            let e = match self.events.get_mut(name) {
                Some(e) => e,
                None => self.events.entry(name.clone()).or_default(),
            };
            e.ever.insert(uid);
            e.times.set(uid, history.times());
        }
        if !profile.purchases.is_empty() {
            let p = &mut self.purchases;
            p.any.insert(uid);
            let mut records = Vec::with_capacity(profile.purchases.len());
            for r in &profile.purchases {
                let n = p.product_number(&r.product_id);
                p.buyers[n as usize].insert(uid);
                records.push((r.time, n));
            }
            records.sort_unstable();
            p.records.set(uid, &records);
            let total = total_spend(&profile.purchases);
            if !total.is_nan() {
                p.spend.insert(uid, f64_key(total));
            }
        }
    }

    /// Removes a user; whether it was there.
    pub fn remove(&mut self, uid: u32) -> bool {
        if !self.live.remove(uid) {
            return false;
        }
        self.sample.remove(uid);
        self.identified.remove(uid);
        self.email_available.remove(uid);
        self.phone_available.remove(uid);
        for cohorts in self.cohorts.values_mut() {
            cohorts.retain(|_, members| {
                members.remove(uid);
                !members.is_empty()
            });
        }
        self.cohorts.retain(|_, cohorts| !cohorts.is_empty());
        for a in self.attributes.values_mut() {
            a.remove(uid);
        }
        for e in self.events.values_mut() {
            if e.ever.remove(uid) {
                e.times.remove(uid);
            }
        }
        let p = &mut self.purchases;
        if p.any.remove(uid) {
            for &(_, n) in p.records.get(uid) {
                p.buyers[n as usize].remove(uid);
            }
            p.records.remove(uid);
            p.spend.remove(uid);
        }
        true
    }

    /// Indexes `uid`'s attributes (the caller removed any it had) and the availabilities
    /// derived from them.
    fn insert_attributes(&mut self, uid: u32, attributes: &BTreeMap<String, Value>) {
        for (name, value) in attributes {
            if value.is_null() {
                continue;
            }
            match self.attributes.get_mut(name) {
                Some(a) => a.insert(uid, value),
                None => {
                    let mut a = AttrIndex::default();
                    a.insert(uid, value);
                    self.attributes.insert(name.clone(), a);
                }
            }
        }
        if email_available(attributes) {
            self.email_available.insert(uid);
        }
        if phone_available(attributes) {
            self.phone_available.insert(uid);
        }
    }

    /// Replaces what the index holds of a user outside their history: external id, creation
    /// time, random bucket and attributes; their events, purchases and cohort memberships stay.
    /// For a uid that is not live, inserts `profile` whole (a new user). Either way the index
    /// then answers as if [`SegmentIndex::upsert`] had been given `profile` with the history and
    /// cohorts the index held — what a change feed needs when only attributes changed, without
    /// reloading a long event history.
    pub fn update_attributes(&mut self, profile: &SegmentProfile) {
        let uid = profile.uid;
        if !self.live.contains(uid) {
            self.upsert(profile);
            return;
        }
        if profile.external_id.is_some() {
            self.identified.insert(uid);
        } else {
            self.identified.remove(uid);
        }
        let i = uid as usize;
        self.created[i] = profile.created_at;
        self.buckets[i] = profile.random_bucket;
        for a in self.attributes.values_mut() {
            a.remove(uid);
        }
        self.email_available.remove(uid);
        self.phone_available.remove(uid);
        self.insert_attributes(uid, &profile.attributes);
    }

    /// Appends occurrences (times in any order) of custom event `name` to a live user's
    /// history, as if they had been recorded in the profile upserted. Ignored for a uid that is
    /// not live; whether it was applied. Costs a copy of that user's history of this event, not
    /// a reload of their profile.
    pub fn append_events(&mut self, uid: u32, name: &str, times: &[i64]) -> bool {
        if !self.live.contains(uid) {
            return false;
        }
        if times.is_empty() {
            return true;
        }
        let e = match self.events.get_mut(name) {
            Some(e) => e,
            None => self.events.entry(name.to_owned()).or_default(),
        };
        let mut merged = Vec::with_capacity(e.times.get(uid).len() + times.len());
        merged.extend_from_slice(e.times.get(uid));
        merged.extend_from_slice(times);
        merged.sort_unstable();
        e.ever.insert(uid);
        e.times.set(uid, &merged);
        true
    }

    /// Appends purchases to a live user's, *after* the ones held: total spend continues the
    /// sum in profile order (floating-point addition is not associative, so the order is part
    /// of the answer), exactly as an upsert of the profile with these at the end of
    /// `purchases`. Ignored for a uid that is not live; whether it was applied.
    pub fn append_purchases(&mut self, uid: u32, purchases: &[PurchaseRecord]) -> bool {
        if !self.live.contains(uid) {
            return false;
        }
        if purchases.is_empty() {
            return true;
        }
        let p = &mut self.purchases;
        let before = if p.any.contains(uid) {
            // a user with purchases but no key has a NaN total, and keeps it
            p.spend.get(uid).map_or(f64::NAN, f64_of_key)
        } else {
            0.0
        };
        let mut records = p.records.get(uid).to_vec();
        for r in purchases {
            let n = p.product_number(&r.product_id);
            p.buyers[n as usize].insert(uid);
            records.push((r.time, n));
        }
        records.sort_unstable();
        p.records.set(uid, &records);
        p.any.insert(uid);
        let total = purchases.iter().fold(before, |sum, r| sum + r.price);
        if total.is_nan() {
            p.spend.remove(uid);
        } else {
            p.spend.insert(uid, f64_key(total));
        }
        true
    }

    fn cohort_insert(&mut self, uid: u32, partner: &str, cohort_id: &str) {
        if let Some(members) = self
            .cohorts
            .get_mut(partner)
            .and_then(|c| c.get_mut(cohort_id))
        {
            members.insert(uid);
            return;
        }
        self.cohorts
            .entry(partner.to_owned())
            .or_default()
            .entry(cohort_id.to_owned())
            .or_default()
            .insert(uid);
    }

    fn cohort(&self, partner: &str, cohort_id: &str) -> Option<&RoaringBitmap> {
        self.cohorts.get(partner)?.get(cohort_id)
    }

    /// Applies a cohort membership delta (cohort import) without a whole profile; ignored for a
    /// uid that is not live (cohort import never creates users). Whether it was applied.
    pub fn add_to_cohort(&mut self, uid: u32, partner: &str, cohort_id: &str) -> bool {
        if !self.live.contains(uid) {
            return false;
        }
        self.cohort_insert(uid, partner, cohort_id);
        true
    }

    /// Removes one cohort membership; whether the user was a member.
    pub fn remove_from_cohort(&mut self, uid: u32, partner: &str, cohort_id: &str) -> bool {
        let Some(cohorts) = self.cohorts.get_mut(partner) else {
            return false;
        };
        let Some(members) = cohorts.get_mut(cohort_id) else {
            return false;
        };
        let was = members.remove(uid);
        if members.is_empty() {
            cohorts.remove(cohort_id);
        }
        was
    }

    /// The uids of live users in the segment at `now` (unix seconds); `in_segment` resolves
    /// through `lookup`. Equal to the profiles for which [`crate::matches()`] is true.
    pub fn evaluate(&self, filter: &Filter, now: i64, lookup: &dyn SegmentLookup) -> RoaringBitmap {
        eval::Eval::new(self, now, lookup).eval(filter, &self.live)
    }

    /// The segment's size: exact (`false`) below 100 000 users, else estimated (`true`) by
    /// evaluating the fixed 1 % sample of uids and scaling to the live users.
    pub fn estimate_size(
        &self,
        filter: &Filter,
        now: i64,
        lookup: &dyn SegmentLookup,
    ) -> (u64, bool) {
        let live = self.live.len();
        let sample = self.sample.len();
        if live < EXACT_BELOW || sample == 0 {
            return (self.evaluate(filter, now, lookup).len(), false);
        }
        let hits = eval::Eval::new(self, now, lookup)
            .eval(filter, &self.sample)
            .len();
        let scaled = (hits as f64 * live as f64 / sample as f64).round() as u64;
        (scaled.min(live), true)
    }

    /// Converts bitmaps to their most compact containers (run-length where it pays); worth
    /// calling after a bulk load.
    pub fn optimize(&mut self) {
        for b in [
            &mut self.live,
            &mut self.sample,
            &mut self.identified,
            &mut self.email_available,
            &mut self.phone_available,
            &mut self.purchases.any,
        ] {
            b.optimize();
        }
        for b in self.cohorts.values_mut().flat_map(HashMap::values_mut) {
            b.optimize();
        }
        for a in self.attributes.values_mut() {
            a.optimize();
        }
        for e in self.events.values_mut() {
            e.ever.optimize();
        }
        for b in &mut self.purchases.buyers {
            b.optimize();
        }
        self.purchases.spend.optimize();
    }

    /// Appends the index's byte form (layout [`codec::INDEX_FORMAT`]) to `out`; read it back
    /// with [`SegmentIndex::decode`]. The result answers every filter exactly as `self` does.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let w = &mut Writer::new(out);
        for b in [
            &self.live,
            &self.sample,
            &self.identified,
            &self.email_available,
            &self.phone_available,
        ] {
            w.bitmap(b);
        }
        w.i64s(&self.created);
        w.u16s(&self.buckets);
        w.len(self.cohorts.len());
        for (partner, cohorts) in &self.cohorts {
            w.str(partner);
            w.len(cohorts.len());
            for (id, members) in cohorts {
                w.str(id);
                w.bitmap(members);
            }
        }
        w.len(self.attributes.len());
        for (name, a) in &self.attributes {
            w.str(name);
            a.encode(w);
        }
        w.len(self.events.len());
        for (name, e) in &self.events {
            w.str(name);
            w.bitmap(&e.ever);
            e.times.encode(w);
        }
        let p = &self.purchases;
        w.bitmap(&p.any);
        p.records.encode(w);
        // product names in number order, so the numbers in `records` stay valid
        let mut products: Vec<(&String, &u32)> = p.product_numbers.iter().collect();
        products.sort_unstable_by_key(|(_, n)| **n);
        w.len(products.len());
        for ((name, _), buyers) in products.iter().zip(&p.buyers) {
            w.str(name);
            w.bitmap(buyers);
        }
        p.spend.encode(w);
    }

    /// Reads back what [`SegmentIndex::encode`] wrote (the whole of `bytes`).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let r = &mut Reader::new(bytes);
        let mut index = SegmentIndex {
            live: r.bitmap()?,
            sample: r.bitmap()?,
            identified: r.bitmap()?,
            email_available: r.bitmap()?,
            phone_available: r.bitmap()?,
            created: r.i64s()?,
            buckets: r.u16s()?,
            ..SegmentIndex::default()
        };
        let columns = index.created.len().min(index.buckets.len());
        if index.live.max().is_some_and(|m| m as usize >= columns) {
            return Err(bad("per-user columns"));
        }
        for _ in 0..r.len(1)? {
            let partner = r.string()?;
            let mut cohorts = HashMap::new();
            for _ in 0..r.len(1)? {
                let id = r.string()?;
                cohorts.insert(id, r.bitmap()?);
            }
            index.cohorts.insert(partner, cohorts);
        }
        for _ in 0..r.len(1)? {
            let name = r.string()?;
            index.attributes.insert(name, AttrIndex::decode(r)?);
        }
        for _ in 0..r.len(1)? {
            let name = r.string()?;
            let ever = r.bitmap()?;
            let times = Arena::decode(r)?;
            index.events.insert(name, EventIndex { ever, times });
        }
        let p = &mut index.purchases;
        p.any = r.bitmap()?;
        p.records = Arena::decode(r)?;
        let n = r.len(1)?;
        for number in 0..n {
            let name = r.string()?;
            let number = u32::try_from(number).map_err(|_| bad("product count"))?;
            if p.product_numbers.insert(name, number).is_some() {
                return Err(bad("product names"));
            }
            p.buyers.push(r.bitmap()?);
        }
        let mut ok = true;
        p.records
            .for_each_item(|&(_, n)| ok &= (n as usize) < p.buyers.len());
        if !ok {
            return Err(bad("purchase records"));
        }
        p.spend = Bsi::decode(r)?;
        if !r.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(index)
    }

    /// Approximate heap bytes held by the index.
    pub fn memory_bytes(&self) -> usize {
        let bitmaps = [
            &self.live,
            &self.sample,
            &self.identified,
            &self.email_available,
            &self.phone_available,
        ]
        .into_iter()
        .map(bitmap_bytes)
        .sum::<usize>();
        let columns = self.created.capacity() * 8 + self.buckets.capacity() * 2;
        let cohorts: usize = self
            .cohorts
            .iter()
            .map(|(p, cs)| {
                p.capacity()
                    + cs.iter()
                        .map(|(c, b)| c.capacity() + 48 + bitmap_bytes(b))
                        .sum::<usize>()
            })
            .sum();
        let attributes: usize = self
            .attributes
            .iter()
            .map(|(n, a)| n.capacity() + a.heap_bytes())
            .sum();
        let events: usize = self
            .events
            .iter()
            .map(|(n, e)| n.capacity() + bitmap_bytes(&e.ever) + e.times.heap_bytes())
            .sum();
        let p = &self.purchases;
        let purchases = bitmap_bytes(&p.any)
            + p.records.heap_bytes()
            + p.product_numbers
                .keys()
                .map(|k| k.capacity() + 40)
                .sum::<usize>()
            + p.buyers.iter().map(bitmap_bytes).sum::<usize>()
            + p.spend.heap_bytes();
        bitmaps + columns + cohorts + attributes + events + purchases
    }
}
