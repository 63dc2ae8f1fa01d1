//! Fresh identifiers from the operating system's randomness (the [`IdSource`] core asks for).
//!
//! Every tracked object gets a fresh event id, so the randomness is read from the OS a buffer
//! at a time rather than with one system call per id (that call was a visible share of the
//! ingest writer's time).

use tideway_core::ids::{BrazeId, EventId, IdSource};

/// Random `braze_id`s and UUID v4 event ids.
pub struct RandomIds {
    buf: Box<[u8; 4096]>,
    /// Bytes of `buf` already handed out.
    used: usize,
}

impl Default for RandomIds {
    fn default() -> Self {
        RandomIds {
            buf: Box::new([0; 4096]),
            used: 4096,
        }
    }
}

impl std::fmt::Debug for RandomIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RandomIds")
    }
}

impl RandomIds {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        if self.used + N > self.buf.len() {
            // The OS's randomness source does not fail once the system is up; if it ever did,
            // ids would no longer be unique, so refuse to go on.
            getrandom::fill(&mut self.buf[..]).expect("the OS randomness source failed");
            self.used = 0;
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.used..self.used + N]);
        // Never hand out the same bytes twice.
        self.buf[self.used..self.used + N].fill(0);
        self.used += N;
        out
    }
}

impl IdSource for RandomIds {
    fn braze_id(&mut self) -> BrazeId {
        BrazeId::from_bytes(self.bytes::<12>())
    }

    fn event_id(&mut self) -> EventId {
        let uuid = uuid::Builder::from_random_bytes(self.bytes::<16>()).into_uuid();
        EventId(uuid.hyphenated().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_v4_uuids_and_do_not_repeat() {
        let mut ids = RandomIds::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.event_id();
            let parsed = uuid::Uuid::parse_str(&id.0).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
            assert!(seen.insert(id.0));
        }
        let a = ids.braze_id();
        assert_ne!(a, ids.braze_id());
    }
}
