//! A bit-sliced index: for each user with a value, the 64 bits of an order-preserving `u64` key,
//! one roaring bitmap per bit.
//!
//! It answers `<`, `<=`, `==`, `>=`, `>` over a candidate set with about two bitmap operations
//! per bit (O'Neil & Quass), touching only candidates, and costs one bitmap insert per set bit
//! to update, so number and time attributes stay fast and incrementally maintainable with no
//! sorted array to shift.

use roaring::RoaringBitmap;

use super::bitmap_bytes;
use super::codec::{DecodeError, Reader, Writer, bad};

/// Comparison of a user's key with the query key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cmp {
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
}

#[derive(Clone)]
pub(crate) struct Bsi {
    exists: RoaringBitmap,
    bits: Vec<RoaringBitmap>,
}

impl Default for Bsi {
    fn default() -> Self {
        Self {
            exists: RoaringBitmap::new(),
            bits: (0..64).map(|_| RoaringBitmap::new()).collect(),
        }
    }
}

/// Order-preserving key of a finite `f64` (`-0.0` and `0.0` share a key). NaN must not be keyed.
pub(crate) fn f64_key(x: f64) -> u64 {
    let x = if x == 0.0 { 0.0 } else { x };
    let b = x.to_bits();
    if b >> 63 == 0 { b | 1 << 63 } else { !b }
}

/// The `f64` whose key is `key` (the inverse of [`f64_key`], `-0.0` coming back as `0.0`).
pub(crate) fn f64_of_key(key: u64) -> f64 {
    let b = if key >> 63 == 1 {
        key & !(1 << 63)
    } else {
        !key
    };
    f64::from_bits(b)
}

/// Order-preserving key of an `i64`.
pub(crate) fn i64_key(t: i64) -> u64 {
    (t as u64) ^ (1 << 63)
}

impl Bsi {
    pub(crate) fn insert(&mut self, uid: u32, key: u64) {
        self.remove(uid);
        self.exists.insert(uid);
        let mut k = key;
        while k != 0 {
            let i = k.trailing_zeros() as usize;
            self.bits[i].insert(uid);
            k &= k - 1;
        }
    }

    pub(crate) fn remove(&mut self, uid: u32) {
        if self.exists.remove(uid) {
            for b in &mut self.bits {
                b.remove(uid);
            }
        }
    }

    /// `uid`'s key, if it has one (one membership test per bit).
    pub(crate) fn get(&self, uid: u32) -> Option<u64> {
        if !self.exists.contains(uid) {
            return None;
        }
        Some(
            self.bits
                .iter()
                .enumerate()
                .filter(|(_, b)| b.contains(uid))
                .fold(0u64, |k, (i, _)| k | 1 << i),
        )
    }

    pub(crate) fn exists(&self) -> &RoaringBitmap {
        &self.exists
    }

    /// The candidates with a key that compares `cmp` to `key`.
    ///
    /// From the top bit down, `eq` holds the candidates whose key agrees with `key` on the bits
    /// seen so far; where they disagree they fall into `lt` or `gt`. A bit on which every
    /// member of `eq` agrees (common in the high bits) costs one read-only counting pass.
    pub(crate) fn select(&self, cmp: Cmp, key: u64, candidates: &RoaringBitmap) -> RoaringBitmap {
        let mut eq = candidates & &self.exists;
        let mut eq_len = eq.len();
        let mut lt = RoaringBitmap::new();
        let mut gt = RoaringBitmap::new();
        let want_lt = matches!(cmp, Cmp::Lt | Cmp::Le);
        let want_gt = matches!(cmp, Cmp::Gt | Cmp::Ge);
        for i in (0..64).rev() {
            if eq_len == 0 {
                break;
            }
            let slice = &self.bits[i];
            let ones = if slice.is_empty() {
                0
            } else {
                eq.intersection_len(slice)
            };
            let key_bit = key >> i & 1 == 1;
            if ones == eq_len {
                // every candidate left has a 1 here
                if !key_bit {
                    if want_gt {
                        gt |= eq;
                    }
                    eq = RoaringBitmap::new();
                    eq_len = 0;
                }
            } else if ones == 0 {
                // every candidate left has a 0 here
                if key_bit {
                    if want_lt {
                        lt |= eq;
                    }
                    eq = RoaringBitmap::new();
                    eq_len = 0;
                }
            } else {
                if key_bit {
                    if want_lt {
                        lt |= &eq - slice;
                    }
                    eq &= slice;
                } else {
                    if want_gt {
                        gt |= &eq & slice;
                    }
                    eq -= slice;
                }
                eq_len = eq.len();
            }
        }
        match cmp {
            Cmp::Lt => lt,
            Cmp::Le => lt | eq,
            Cmp::Eq => eq,
            Cmp::Ge => gt | eq,
            Cmp::Gt => gt,
        }
    }

    pub(crate) fn optimize(&mut self) {
        self.exists.optimize();
        for b in &mut self.bits {
            b.optimize();
        }
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) {
        w.bitmap(&self.exists);
        for b in &self.bits {
            w.bitmap(b);
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let exists = r.bitmap()?;
        let bits = (0..64).map(|_| r.bitmap()).collect::<Result<Vec<_>, _>>()?;
        if bits.iter().any(|b| !b.is_subset(&exists)) {
            return Err(bad("bit-sliced index"));
        }
        Ok(Bsi { exists, bits })
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        bitmap_bytes(&self.exists) + self.bits.iter().map(bitmap_bytes).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_back() {
        let mut b = Bsi::default();
        for (uid, x) in [
            (1u32, 0.0),
            (2, -3.25),
            (3, 1e300),
            (4, f64::INFINITY),
            (5, 7.5),
        ] {
            b.insert(uid, f64_key(x));
            assert_eq!(b.get(uid).map(f64_of_key), Some(x), "{x}");
        }
        assert_eq!(f64_of_key(f64_key(-0.0)).to_bits(), 0.0f64.to_bits());
        assert_eq!(b.get(9), None);
    }

    #[test]
    fn keys_preserve_order() {
        let xs = [
            f64::NEG_INFINITY,
            -1e300,
            -2.5,
            -1.0,
            -0.0,
            0.0,
            1e-300,
            1.0,
            2.5,
            1e300,
            f64::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(f64_key(w[0]) <= f64_key(w[1]), "{} {}", w[0], w[1]);
        }
        assert_eq!(f64_key(-0.0), f64_key(0.0));
        let ts = [i64::MIN, -5, -1, 0, 1, 5, i64::MAX];
        for w in ts.windows(2) {
            assert!(i64_key(w[0]) < i64_key(w[1]));
        }
    }

    #[test]
    fn selects_like_comparisons() {
        let values: Vec<i64> = vec![-7, -1, 0, 0, 3, 9, 9, 12, 400, -400];
        let mut bsi = Bsi::default();
        for (uid, v) in values.iter().enumerate() {
            bsi.insert(uid as u32, i64_key(*v));
        }
        bsi.insert(3, i64_key(5)); // overwrite
        let mut values = values;
        values[3] = 5;
        let all: RoaringBitmap = (0..12).collect();
        for q in [-500, -400, -7, -2, 0, 3, 5, 9, 10, 400, 401] {
            for (cmp, f) in [
                (Cmp::Lt, (|a, b| a < b) as fn(i64, i64) -> bool),
                (Cmp::Le, |a, b| a <= b),
                (Cmp::Eq, |a, b| a == b),
                (Cmp::Ge, |a, b| a >= b),
                (Cmp::Gt, |a, b| a > b),
            ] {
                let got: Vec<u32> = bsi.select(cmp, i64_key(q), &all).iter().collect();
                let want: Vec<u32> = (0..values.len() as u32)
                    .filter(|&u| f(values[u as usize], q))
                    .collect();
                assert_eq!(got, want, "{cmp:?} {q}");
            }
        }
        bsi.remove(4);
        assert!(!bsi.select(Cmp::Eq, i64_key(3), &all).contains(4));
    }
}
