//! A map from uid to a small `Copy` value that is sparse (a hash map) while few users have a
//! value and turns dense (a vector indexed by uid) once many do.
//!
//! Per-attribute and per-event columns use it: a workspace has many rarely used custom
//! attributes and events, and a dense column each would cost 4–8 bytes × users × names.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::codec::{DecodeError, Reader, Writer, bad};

/// A fast hash for `u32` uids (a 64-bit finaliser): uids are not attacker-chosen, and SipHash
/// would dominate lookups.
#[derive(Default, Clone, Copy)]
pub(crate) struct UidHasher(u64);

impl Hasher for UidHasher {
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).rotate_left(5);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }
}

type UidHashMap<T> = HashMap<u32, T, BuildHasherDefault<UidHasher>>;

/// A value type with a reserved "no value" bit pattern for the dense form.
pub(crate) trait Slot: Copy + PartialEq {
    /// Never stored as a real value.
    const EMPTY: Self;
    /// Bytes [`Slot::put`] writes.
    const BYTES: usize;
    fn put(&self, w: &mut Writer<'_>);
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

impl Slot for u32 {
    const EMPTY: Self = u32::MAX;
    const BYTES: usize = 4;
    fn put(&self, w: &mut Writer<'_>) {
        w.u32(*self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.u32()
    }
}

/// A run of `len` items at `off` in an arena, with the time of the last (latest) item, which
/// answers many questions without reading the items.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub off: u32,
    pub len: u32,
    pub last: i64,
}

impl Slot for Span {
    const EMPTY: Self = Span {
        off: u32::MAX,
        len: 0,
        last: i64::MIN,
    };
    const BYTES: usize = 16;
    fn put(&self, w: &mut Writer<'_>) {
        w.u32(self.off);
        w.u32(self.len);
        w.i64(self.last);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Span {
            off: r.u32()?,
            len: r.u32()?,
            last: r.i64()?,
        })
    }
}

/// Below this many entries the map stays sparse.
const DENSE_MIN: usize = 1024;

#[derive(Clone)]
pub(crate) enum UidMap<T: Slot> {
    Sparse { map: UidHashMap<T>, max_uid: u32 },
    Dense { slots: Vec<T>, len: usize },
}

impl<T: Slot> Default for UidMap<T> {
    fn default() -> Self {
        Self::Sparse {
            map: UidHashMap::default(),
            max_uid: 0,
        }
    }
}

impl<T: Slot> UidMap<T> {
    pub(crate) fn get(&self, uid: u32) -> Option<T> {
        match self {
            Self::Sparse { map, .. } => map.get(&uid).copied(),
            Self::Dense { slots, .. } => {
                slots.get(uid as usize).copied().filter(|v| *v != T::EMPTY)
            }
        }
    }

    /// Sets the value (`value` must not be `T::EMPTY`); returns the previous one.
    pub(crate) fn insert(&mut self, uid: u32, value: T) -> Option<T> {
        debug_assert!(value != T::EMPTY);
        match self {
            Self::Sparse { map, max_uid } => {
                let old = map.insert(uid, value);
                *max_uid = (*max_uid).max(uid);
                // dense costs (max_uid + 1) slots, a hash entry about two to three slots
                // with its load factor, and dense lookups are much faster: go dense once a
                // quarter of the uid range has a value
                if map.len() >= DENSE_MIN && map.len() * 4 > *max_uid as usize {
                    let mut slots = vec![T::EMPTY; *max_uid as usize + 1];
                    for (&u, &v) in map.iter() {
                        slots[u as usize] = v;
                    }
                    *self = Self::Dense {
                        len: slots.iter().filter(|v| **v != T::EMPTY).count(),
                        slots,
                    };
                }
                old
            }
            Self::Dense { slots, len } => {
                let i = uid as usize;
                if i >= slots.len() {
                    slots.resize(i + 1, T::EMPTY);
                }
                let old = std::mem::replace(&mut slots[i], value);
                if old == T::EMPTY {
                    *len += 1;
                    None
                } else {
                    Some(old)
                }
            }
        }
    }

    pub(crate) fn remove(&mut self, uid: u32) -> Option<T> {
        match self {
            Self::Sparse { map, .. } => map.remove(&uid),
            Self::Dense { slots, len } => {
                let slot = slots.get_mut(uid as usize)?;
                let old = std::mem::replace(slot, T::EMPTY);
                if old == T::EMPTY {
                    None
                } else {
                    *len -= 1;
                    Some(old)
                }
            }
        }
    }

    /// Calls `f` on every stored value, allowing it to change the value (not to remove it).
    pub(crate) fn for_each_mut(&mut self, mut f: impl FnMut(&mut T)) {
        match self {
            Self::Sparse { map, .. } => map.values_mut().for_each(f),
            Self::Dense { slots, .. } => slots
                .iter_mut()
                .filter(|v| **v != T::EMPTY)
                .for_each(&mut f),
        }
    }

    /// Every stored `(uid, value)`, in no particular order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u32, T)) {
        match self {
            Self::Sparse { map, .. } => map.iter().for_each(|(&u, &v)| f(u, v)),
            Self::Dense { slots, .. } => {
                for (u, &v) in slots.iter().enumerate() {
                    if v != T::EMPTY {
                        f(u as u32, v);
                    }
                }
            }
        }
    }

    /// The byte form (see `codec.rs`): the sparse or dense form as it is held.
    pub(crate) fn encode(&self, w: &mut Writer<'_>) {
        match self {
            Self::Sparse { map, max_uid } => {
                w.u8(0);
                w.u32(*max_uid);
                w.len(map.len());
                for (&u, v) in map {
                    w.u32(u);
                    v.put(w);
                }
            }
            Self::Dense { slots, len } => {
                w.u8(1);
                w.len(*len);
                w.len(slots.len());
                for v in slots {
                    v.put(w);
                }
            }
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.u8()? {
            0 => {
                let max_uid = r.u32()?;
                let n = r.len(4 + T::BYTES)?;
                let mut map = UidHashMap::with_capacity_and_hasher(n, Default::default());
                for _ in 0..n {
                    let u = r.u32()?;
                    let v = T::get(r)?;
                    if u > max_uid || v == T::EMPTY || map.insert(u, v).is_some() {
                        return Err(bad("sparse uid map"));
                    }
                }
                Ok(Self::Sparse { map, max_uid })
            }
            1 => {
                let len = r.len(0)?;
                let n = r.len(T::BYTES)?;
                let mut slots = Vec::with_capacity(n);
                for _ in 0..n {
                    slots.push(T::get(r)?);
                }
                if slots.iter().filter(|v| **v != T::EMPTY).count() != len {
                    return Err(bad("dense uid map count"));
                }
                Ok(Self::Dense { slots, len })
            }
            _ => Err(bad("uid map form")),
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            // hashbrown: key + value + one control byte per bucket
            Self::Sparse { map, .. } => map.capacity() * (4 + std::mem::size_of::<T>() + 1),
            Self::Dense { slots, .. } => slots.capacity() * std::mem::size_of::<T>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_dense_and_keeps_values() {
        let mut m: UidMap<u32> = UidMap::default();
        for uid in 0..3000 {
            assert_eq!(m.insert(uid, uid * 2), None);
        }
        assert!(matches!(m, UidMap::Dense { .. }));
        assert_eq!(m.insert(7, 1), Some(14));
        assert_eq!(m.get(7), Some(1));
        assert_eq!(m.remove(7), Some(1));
        assert_eq!(m.get(7), None);
        assert_eq!(m.remove(7), None);
        assert_eq!(m.get(100_000), None);
        m.insert(100_000, 5);
        assert_eq!(m.get(100_000), Some(5));
        let mut n = 0;
        m.for_each_mut(|v| {
            *v += 1;
            n += 1;
        });
        assert_eq!(n, 3000);
        assert_eq!(m.get(100_000), Some(6));
    }

    #[test]
    fn stays_sparse_for_scattered_uids() {
        let mut m: UidMap<u32> = UidMap::default();
        for i in 0..2000 {
            m.insert(i * 1000, i);
        }
        assert!(matches!(m, UidMap::Sparse { .. }));
        assert_eq!(m.get(5000), Some(5));
    }

    #[test]
    fn a_fifth_of_users_stays_sparse_a_third_goes_dense() {
        let mut fifth: UidMap<u32> = UidMap::default();
        let mut third: UidMap<u32> = UidMap::default();
        for uid in 0..30_000 {
            if uid % 5 == 0 {
                fifth.insert(uid, uid);
            }
            if uid % 3 == 0 {
                third.insert(uid, uid);
            }
        }
        assert!(matches!(fifth, UidMap::Sparse { .. }));
        assert!(matches!(third, UidMap::Dense { .. }));
    }
}
