//! The index of one attribute name: a dictionary of its distinct non-number values, each with
//! the bitmap of users holding it, plus bit-sliced indexes for number values and for string
//! values that are ISO-8601 times.
//!
//! Equality is one bitmap lookup; regex, prefix and array operators test each distinct value
//! once (or each candidate's value, when there are fewer candidates than values); number and
//! time comparisons go to the bit-sliced indexes. The uid → value column exists so an update
//! can undo a user's old value without the old profile.

use std::collections::HashMap;

use roaring::RoaringBitmap;
use serde_json::Value;

use super::bitmap_bytes;
use super::bsi::{Bsi, f64_key, i64_key};
use super::codec::{DecodeError, Reader, Writer, bad};
use super::uidmap::UidMap;
use crate::predicate::{is_blank_string, num, value_time};

/// Column marker: the user's value is a number, held in [`AttrIndex::numbers`].
pub(crate) const NUMBER_SLOT: u32 = u32::MAX - 1;

#[derive(Clone)]
pub(crate) struct DictEntry {
    pub value: Value,
    pub time: Option<i64>,
    pub blank: bool,
    pub users: RoaringBitmap,
}

#[derive(Default, Clone)]
pub(crate) struct AttrIndex {
    /// uid → dictionary id or [`NUMBER_SLOT`].
    pub slots: UidMap<u32>,
    /// Users with a non-null value.
    pub present: RoaringBitmap,
    /// Users whose value is a blank string.
    pub blank: RoaringBitmap,
    dict: Vec<Option<DictEntry>>,
    free: Vec<u32>,
    live_entries: usize,
    by_string: HashMap<String, u32>,
    by_json: HashMap<String, u32>,
    /// Number values.
    pub numbers: Bsi,
    /// String values that parse as ISO-8601 times.
    pub times: Bsi,
}

impl AttrIndex {
    /// Records `value` for `uid`, replacing any previous value.
    pub(crate) fn insert(&mut self, uid: u32, value: &Value) {
        self.remove(uid);
        match value {
            Value::Null => return,
            Value::Number(n) => {
                self.numbers.insert(uid, f64_key(num(n)));
                self.slots.insert(uid, NUMBER_SLOT);
            }
            _ => {
                let id = self.intern(value);
                if let Some(e) = self.dict[id as usize].as_mut() {
                    e.users.insert(uid);
                    if e.blank {
                        self.blank.insert(uid);
                    }
                    if let Some(t) = e.time {
                        self.times.insert(uid, i64_key(t));
                    }
                }
                self.slots.insert(uid, id);
            }
        }
        self.present.insert(uid);
    }

    /// Forgets `uid`'s value; whether it had one.
    pub(crate) fn remove(&mut self, uid: u32) -> bool {
        let Some(id) = self.slots.remove(uid) else {
            return false;
        };
        self.present.remove(uid);
        if id == NUMBER_SLOT {
            self.numbers.remove(uid);
            return true;
        }
        let Some(e) = self.dict[id as usize].as_mut() else {
            return true;
        };
        e.users.remove(uid);
        if e.blank {
            self.blank.remove(uid);
        }
        if e.time.is_some() {
            self.times.remove(uid);
        }
        if e.users.is_empty() {
            match &e.value {
                Value::String(s) => self.by_string.remove(s),
                other => self.by_json.remove(&other.to_string()),
            };
            self.dict[id as usize] = None;
            self.free.push(id);
            self.live_entries -= 1;
        }
        true
    }

    fn intern(&mut self, value: &Value) -> u32 {
        let found = match value {
            Value::String(s) => self.by_string.get(s.as_str()),
            other => self.by_json.get(&other.to_string()),
        };
        if let Some(&id) = found {
            return id;
        }
        let entry = DictEntry {
            value: value.clone(),
            time: value_time(value),
            blank: is_blank_string(value),
            users: RoaringBitmap::new(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.dict[id as usize] = Some(entry);
                id
            }
            None => {
                self.dict.push(Some(entry));
                u32::try_from(self.dict.len() - 1)
                    .ok()
                    .filter(|&id| id < NUMBER_SLOT)
                    .expect("an attribute holds fewer than 4 G distinct values")
            }
        };
        match value {
            Value::String(s) => self.by_string.insert(s.clone(), id),
            other => self.by_json.insert(other.to_string(), id),
        };
        self.live_entries += 1;
        id
    }

    /// The users whose value is exactly this string.
    pub(crate) fn string_users(&self, value: &str) -> Option<&RoaringBitmap> {
        let id = self.by_string.get(value)?;
        self.dict[*id as usize].as_ref().map(|e| &e.users)
    }

    /// The users whose value is exactly this non-string, non-number value (booleans, arrays…).
    pub(crate) fn json_users(&self, value: &Value) -> Option<&RoaringBitmap> {
        let id = self.by_json.get(&value.to_string())?;
        self.dict[*id as usize].as_ref().map(|e| &e.users)
    }

    /// The candidates whose (non-number) value passes `test`.
    pub(crate) fn select(
        &self,
        candidates: &RoaringBitmap,
        test: impl Fn(&Value) -> bool,
    ) -> RoaringBitmap {
        if (candidates.len() as usize) < self.live_entries {
            // fewer candidates than distinct values: look at each candidate's value once
            let mut memo = vec![0u8; self.dict.len()];
            let mut out = candidates & &self.present;
            out.retain(|uid| {
                let Some(id) = self.slots.get(uid).filter(|&id| id != NUMBER_SLOT) else {
                    return false;
                };
                let i = id as usize;
                if memo[i] == 0 {
                    let pass = self.dict[i].as_ref().is_some_and(|e| test(&e.value));
                    memo[i] = if pass { 1 } else { 2 };
                }
                memo[i] == 1
            });
            out
        } else {
            let mut acc = RoaringBitmap::new();
            for e in self.dict.iter().flatten() {
                if test(&e.value) {
                    acc |= &e.users;
                }
            }
            acc & candidates
        }
    }

    pub(crate) fn optimize(&mut self) {
        self.present.optimize();
        self.blank.optimize();
        for e in self.dict.iter_mut().flatten() {
            e.users.optimize();
        }
        self.numbers.optimize();
        self.times.optimize();
    }

    /// The byte form (see `codec.rs`): column, bitmaps, dictionary values with their users;
    /// lookups, free list and flags are rebuilt on decode.
    pub(crate) fn encode(&self, w: &mut Writer<'_>) {
        self.slots.encode(w);
        w.bitmap(&self.present);
        w.bitmap(&self.blank);
        w.len(self.dict.len());
        for e in &self.dict {
            match e {
                None => w.u8(0),
                Some(e) => {
                    w.u8(1);
                    w.str(&e.value.to_string());
                    w.bitmap(&e.users);
                }
            }
        }
        self.numbers.encode(w);
        self.times.encode(w);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let slots: UidMap<u32> = UidMap::decode(r)?;
        let present = r.bitmap()?;
        let blank = r.bitmap()?;
        let n = r.len(1)?;
        let mut a = AttrIndex {
            slots,
            present,
            blank,
            ..AttrIndex::default()
        };
        a.dict.reserve(n);
        for id in 0..n {
            let id = u32::try_from(id)
                .ok()
                .filter(|&id| id < NUMBER_SLOT)
                .ok_or(bad("attribute dictionary size"))?;
            match r.u8()? {
                0 => {
                    a.dict.push(None);
                    a.free.push(id);
                }
                1 => {
                    let value: Value =
                        serde_json::from_slice(r.bytes()?).map_err(|_| bad("attribute value"))?;
                    let users = r.bitmap()?;
                    let fresh = match &value {
                        Value::String(s) => a.by_string.insert(s.clone(), id).is_none(),
                        Value::Number(_) | Value::Null => false,
                        other => a.by_json.insert(other.to_string(), id).is_none(),
                    };
                    if !fresh {
                        return Err(bad("attribute dictionary"));
                    }
                    a.dict.push(Some(DictEntry {
                        time: value_time(&value),
                        blank: is_blank_string(&value),
                        value,
                        users,
                    }));
                    a.live_entries += 1;
                }
                _ => return Err(bad("attribute dictionary entry")),
            }
        }
        a.numbers = Bsi::decode(r)?;
        a.times = Bsi::decode(r)?;
        let mut ok = true;
        let dict = &a.dict;
        a.slots.for_each(|_, id| {
            ok &= id == NUMBER_SLOT || dict.get(id as usize).is_some_and(Option::is_some);
        });
        if !ok {
            return Err(bad("attribute column"));
        }
        Ok(a)
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        let entry = std::mem::size_of::<Option<DictEntry>>();
        let dict: usize = self
            .dict
            .iter()
            .flatten()
            .map(|e| bitmap_bytes(&e.users) + json_bytes(&e.value))
            .sum();
        let keys: usize = self
            .by_string
            .keys()
            .chain(self.by_json.keys())
            .map(|k| k.capacity() + 32)
            .sum();
        self.slots.heap_bytes()
            + bitmap_bytes(&self.present)
            + bitmap_bytes(&self.blank)
            + self.dict.capacity() * entry
            + dict
            + keys
            + self.numbers.heap_bytes()
            + self.times.heap_bytes()
    }
}

/// Rough heap size of a JSON value.
fn json_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.capacity(),
        Value::Array(a) => a.iter().map(|x| 32 + json_bytes(x)).sum(),
        Value::Object(o) => o
            .iter()
            .map(|(k, x)| k.capacity() + 48 + json_bytes(x))
            .sum(),
        _ => 0,
    }
}
