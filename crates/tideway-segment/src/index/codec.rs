//! The byte form of a [`super::SegmentIndex`], so a server can keep its index across restarts
//! instead of rebuilding it from every profile.
//!
//! Pure: bytes in, bytes out; the caller frames them (version, checksum) and does the IO. The
//! layout is the index's own structure, written as it is held — bitmaps in roaring's portable
//! format, columns as little-endian arrays — so loading is mostly bulk copies, with no profile
//! replayed. What can be derived (dictionary lookups, free lists, blank / time flags) is
//! rebuilt on load rather than stored. Every length and reference read is checked, so damaged
//! bytes give a [`DecodeError`], never an index that panics later; detecting damage that still
//! decodes is the framing checksum's job.
//!
//! Bump [`INDEX_FORMAT`] whenever the layout changes: an older snapshot is then refused and
//! rebuilt, never misread.

use roaring::RoaringBitmap;

/// Version of the layout written by [`super::SegmentIndex::encode`].
pub const INDEX_FORMAT: u32 = 1;

/// Why bytes could not be read back as an index.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("segment index snapshot is damaged: {what}")]
pub struct DecodeError {
    /// The part that did not decode.
    pub what: &'static str,
}

pub(crate) fn bad(what: &'static str) -> DecodeError {
    DecodeError { what }
}

/// Appends values to a byte buffer.
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    /// Writes to the end of `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }

    pub fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i64(&mut self, v: i64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.out.extend_from_slice(b);
    }

    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub fn bitmap(&mut self, b: &RoaringBitmap) {
        self.len(b.serialized_size());
        b.serialize_into(&mut *self.out)
            .expect("writing to a Vec cannot fail");
    }

    pub fn i64s(&mut self, v: &[i64]) {
        self.len(v.len());
        self.out.reserve(v.len() * 8);
        for x in v {
            self.out.extend_from_slice(&x.to_le_bytes());
        }
    }

    pub fn u32s(&mut self, v: &[u32]) {
        self.len(v.len());
        self.out.reserve(v.len() * 4);
        for x in v {
            self.out.extend_from_slice(&x.to_le_bytes());
        }
    }

    pub fn u16s(&mut self, v: &[u16]) {
        self.len(v.len());
        self.out.reserve(v.len() * 2);
        for x in v {
            self.out.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// Reads values back, in the order a [`Writer`] wrote them.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    /// Everything not read yet (consumed).
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        self.array().map(i64::from_le_bytes)
    }

    /// A count of items of at least `item_bytes` each: refused when the rest cannot hold them,
    /// so a damaged count never triggers a huge allocation.
    pub fn len(&mut self, item_bytes: usize) -> Result<usize, DecodeError> {
        let n = usize::try_from(self.u64()?).map_err(|_| bad("length"))?;
        if n.saturating_mul(item_bytes.max(1)) > self.rest.len() {
            return Err(bad("length beyond the end"));
        }
        Ok(n)
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len(1)?;
        self.take(n)
    }

    pub fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| bad("string"))
    }

    pub fn bitmap(&mut self) -> Result<RoaringBitmap, DecodeError> {
        let b = self.bytes()?;
        RoaringBitmap::deserialize_from(b).map_err(|_| bad("bitmap"))
    }

    pub fn i64s(&mut self) -> Result<Vec<i64>, DecodeError> {
        let n = self.len(8)?;
        Ok(self
            .take(n * 8)?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    pub fn u32s(&mut self) -> Result<Vec<u32>, DecodeError> {
        let n = self.len(4)?;
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    pub fn u16s(&mut self) -> Result<Vec<u16>, DecodeError> {
        let n = self.len(2)?;
        Ok(self
            .take(n * 2)?
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes(c.try_into().expect("2 bytes")))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives_round_trip_and_truncation_is_an_error() {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.u8(7);
        w.u32(0xdead_beef);
        w.i64(-5);
        w.str("héllo");
        w.i64s(&[1, -2, i64::MAX]);
        w.bitmap(&(0..1000).chain(70_000..70_010).collect());
        let mut r = Reader::new(&out);
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.u32(), Ok(0xdead_beef));
        assert_eq!(r.i64(), Ok(-5));
        assert_eq!(r.string().as_deref(), Ok("héllo"));
        assert_eq!(r.i64s(), Ok(vec![1, -2, i64::MAX]));
        assert_eq!(r.bitmap().map(|b| b.len()), Ok(1010));
        assert!(r.is_empty());
        let mut short = Reader::new(&out[..out.len() - 3]);
        short.u8().unwrap();
        short.u32().unwrap();
        short.i64().unwrap();
        short.string().unwrap();
        short.i64s().unwrap();
        assert!(short.bitmap().is_err());
        let mut huge = Reader::new(&[0xff; 16]);
        assert!(
            huge.i64s().is_err(),
            "a damaged count is refused, not allocated"
        );
    }
}
