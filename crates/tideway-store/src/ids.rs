//! Fresh identifiers (the [`IdSource`] core asks for): event ids from the operating system's
//! randomness, braze ids in Braze's own ObjectId shape.
//!
//! Every tracked object gets a fresh event id, so the randomness is read from the OS a buffer
//! at a time rather than with one system call per id (that call was a visible share of the
//! ingest writer's time).

use tideway_core::ids::{BrazeId, EventId, IdSource};

/// `braze_id`s shaped like Braze's own (MongoDB ObjectIds) and UUID v4 event ids.
pub struct RandomIds {
    buf: Box<[u8; 4096]>,
    /// Bytes of `buf` already handed out.
    used: usize,
    /// ObjectId parts: 5 random bytes fixed for this process, and a 3-byte counter.
    process: [u8; 5],
    counter: u32,
}

impl Default for RandomIds {
    fn default() -> Self {
        let mut ids = RandomIds {
            buf: Box::new([0; 4096]),
            used: 4096,
            process: [0; 5],
            counter: 0,
        };
        ids.process = ids.bytes::<5>();
        let start = ids.bytes::<3>();
        ids.counter = u32::from_be_bytes([0, start[0], start[1], start[2]]);
        ids
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
    /// An ObjectId: 4 bytes of Unix seconds, 5 bytes fixed per process, a 3-byte counter —
    /// the shape of Braze's ids, unique without coordination, and increasing, so a new user's
    /// entry lands at the end of the `braze_id` index instead of on a random page.
    fn braze_id(&mut self) -> BrazeId {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()) as u32;
        self.counter = (self.counter + 1) & 0x00ff_ffff;
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&secs.to_be_bytes());
        bytes[4..9].copy_from_slice(&self.process);
        bytes[9..].copy_from_slice(&self.counter.to_be_bytes()[1..]);
        BrazeId::from_bytes(bytes)
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
        let braze: Vec<BrazeId> = (0..1000).map(|_| ids.braze_id()).collect();
        let unique: std::collections::HashSet<&str> = braze.iter().map(BrazeId::as_str).collect();
        assert_eq!(unique.len(), braze.len());
        assert!(braze.iter().all(|b| b.as_str().len() == 24));
    }
}
