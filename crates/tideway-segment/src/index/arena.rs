//! Per-user lists of small `Copy` items (event times, purchase records) packed into one vector
//! per event name, with a uid → span column.
//!
//! One allocation per event name instead of one per user and event keeps 10 M users' histories
//! compact. Replacing or removing a user's list leaves garbage behind; once garbage is more than
//! half the arena it is compacted in one pass, so updates stay amortised O(list length).

use super::codec::{DecodeError, Reader, Writer, bad};
use super::uidmap::{Slot, Span, UidMap};

/// Compact only past this much garbage, so small indexes do not churn.
const COMPACT_MIN: usize = 1 << 16;

/// Items with a time; lists are sorted by it, so the last item is the latest.
pub(crate) trait Timed: Copy {
    /// Bytes [`Timed::put`] writes.
    const BYTES: usize;
    fn time(&self) -> i64;
    fn put(&self, w: &mut Writer<'_>);
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

impl Timed for i64 {
    const BYTES: usize = 8;
    fn time(&self) -> i64 {
        *self
    }
    fn put(&self, w: &mut Writer<'_>) {
        w.i64(*self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.i64()
    }
}

impl Timed for (i64, u32) {
    const BYTES: usize = 12;
    fn time(&self) -> i64 {
        self.0
    }
    fn put(&self, w: &mut Writer<'_>) {
        w.i64(self.0);
        w.u32(self.1);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok((r.i64()?, r.u32()?))
    }
}

#[derive(Clone)]
pub(crate) struct Arena<T: Timed> {
    spans: UidMap<Span>,
    data: Vec<T>,
    garbage: usize,
}

impl<T: Timed> Default for Arena<T> {
    fn default() -> Self {
        Self {
            spans: UidMap::default(),
            data: Vec::new(),
            garbage: 0,
        }
    }
}

/// Arena offsets are `u32`: 4 G items per arena, far beyond what fits in memory per event name.
fn to_u32(n: usize) -> u32 {
    u32::try_from(n).expect("an index arena holds at most 4 G items")
}

impl<T: Timed> Arena<T> {
    /// Sets `uid`'s list, sorted by time (an empty list removes it).
    pub(crate) fn set(&mut self, uid: u32, items: &[T]) {
        self.remove(uid);
        let Some(last) = items.last() else {
            return;
        };
        let last = last.time();
        let off = to_u32(self.data.len());
        self.data.extend_from_slice(items);
        to_u32(self.data.len());
        self.spans.insert(
            uid,
            Span {
                off,
                len: to_u32(items.len()),
                last,
            },
        );
    }

    pub(crate) fn remove(&mut self, uid: u32) {
        if let Some(span) = self.spans.remove(uid) {
            self.garbage += span.len as usize;
            if self.garbage > COMPACT_MIN && self.garbage * 2 > self.data.len() {
                self.compact();
            }
        }
    }

    pub(crate) fn get(&self, uid: u32) -> &[T] {
        self.slice(self.span(uid))
    }

    /// Where `uid`'s list is, and its latest time (a scan fetches spans for a batch of users
    /// before reading any list).
    pub(crate) fn span(&self, uid: u32) -> Span {
        self.spans.get(uid).unwrap_or(Span::EMPTY)
    }

    /// The list at `span` (empty for `Span::EMPTY`).
    pub(crate) fn slice(&self, span: Span) -> &[T] {
        if span.len == 0 {
            return &[];
        }
        &self.data[span.off as usize..][..span.len as usize]
    }

    fn compact(&mut self) {
        let mut data = Vec::with_capacity(self.data.len() - self.garbage);
        let old = &self.data;
        self.spans.for_each_mut(|s| {
            let off = data.len();
            data.extend_from_slice(&old[s.off as usize..][..s.len as usize]);
            s.off = to_u32(off);
        });
        self.data = data;
        self.garbage = 0;
    }

    /// Every item of every list, in no particular order.
    pub(crate) fn for_each_item(&self, mut f: impl FnMut(&T)) {
        self.spans
            .for_each(|_, span| self.slice(span).iter().for_each(&mut f));
    }

    /// The byte form (see `codec.rs`): spans, items and garbage as held.
    pub(crate) fn encode(&self, w: &mut Writer<'_>) {
        self.spans.encode(w);
        w.len(self.data.len());
        for item in &self.data {
            item.put(w);
        }
        w.len(self.garbage);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let spans: UidMap<Span> = UidMap::decode(r)?;
        let n = r.len(T::BYTES)?;
        let mut data = Vec::with_capacity(n);
        for _ in 0..n {
            data.push(T::get(r)?);
        }
        // A count of items already counted in `data`, not of bytes still to read: it is
        // bounded by `data`'s length below, not by what follows it.
        let garbage = usize::try_from(r.u64()?).map_err(|_| bad("arena garbage"))?;
        let mut ok = garbage <= data.len();
        spans.for_each(|_, s| {
            ok &= s.len > 0
                && (s.off as usize)
                    .checked_add(s.len as usize)
                    .is_some_and(|end| end <= data.len());
        });
        if !ok {
            return Err(bad("arena spans"));
        }
        Ok(Arena {
            spans,
            data,
            garbage,
        })
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.spans.heap_bytes() + self.data.capacity() * std::mem::size_of::<T>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_compacts() {
        let mut a: Arena<i64> = Arena::default();
        for round in 0..40i64 {
            for uid in 0..5000u32 {
                let items: Vec<i64> = (0..(uid as i64 % 3)).map(|k| k + round).collect();
                a.set(uid, &items);
            }
        }
        // 200 000 items were written; garbage is bounded by the compaction rule
        assert!(
            a.data.len() <= 2 * COMPACT_MIN + 5000 * 2,
            "compacted: {}",
            a.data.len()
        );
        assert_eq!(a.get(4), &[39]);
        assert_eq!(a.get(5), &[39, 40]);
        assert_eq!(a.get(3), &[] as &[i64]);
        a.remove(5);
        assert_eq!(a.get(5), &[] as &[i64]);
    }

    /// An arena decodes back whatever its garbage, even when the garbage outnumbers the bytes
    /// that follow it (incremental updates leave such arenas; a snapshot ending with one was
    /// refused as damaged, and the index rebuilt on every start).
    #[test]
    fn an_arena_with_garbage_round_trips_as_the_last_thing_written() {
        let mut a: Arena<i64> = Arena::default();
        for uid in 0..50u32 {
            a.set(uid, &[1, 2, 3, 4]);
            a.set(uid, &[5, 6, 7, 8, 9]);
        }
        assert!(a.garbage >= 200, "{}", a.garbage);
        let mut out = Vec::new();
        a.encode(&mut Writer::new(&mut out));
        let back = Arena::<i64>::decode(&mut Reader::new(&out)).expect("decodes");
        assert_eq!(back.garbage, a.garbage);
        for uid in 0..50u32 {
            assert_eq!(back.get(uid), &[5, 6, 7, 8, 9]);
        }
        // Garbage beyond the data it is part of is still refused.
        let mut forged = out.clone();
        let at = forged.len() - 8;
        forged[at..].copy_from_slice(&(a.data.len() as u64 + 1).to_le_bytes());
        assert!(Arena::<i64>::decode(&mut Reader::new(&forged)).is_err());
    }
}
