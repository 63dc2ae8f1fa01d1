//! Planned failure points, compiled only for tests (feature `failpoints`, which this crate's
//! own integration tests turn on): a test arms one through [`SqliteOptions::failpoints`] and
//! the store fails there as if SQLite had, so recovery paths that a real disk rarely
//! exercises (a replay of the profile log that fails after a rollback) are tested against the
//! real store, not a mock.
//!
//! [`SqliteOptions::failpoints`]: super::SqliteOptions

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tideway_core::store::StoreError;

/// The failure points a test can arm; shared (`Arc`) between the test and the store.
#[derive(Debug, Default)]
pub struct Failpoints {
    replay_fails: AtomicBool,
    replays_failed: AtomicU64,
}

impl Failpoints {
    /// While armed, every replay of `user_log` after a rollback fails before writing anything.
    pub fn fail_replays(&self, armed: bool) {
        self.replay_fails.store(armed, Ordering::SeqCst);
    }

    /// How many replays the armed failure point has failed: tests check the path was taken.
    pub fn replays_failed(&self) -> u64 {
        self.replays_failed.load(Ordering::SeqCst)
    }

    /// Called by the writer just before a replay.
    pub(super) fn before_replay(&self) -> Result<(), StoreError> {
        if self.replay_fails.load(Ordering::SeqCst) {
            self.replays_failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable(
                "disk I/O error (planned failure point: replay)".into(),
            ));
        }
        Ok(())
    }
}
