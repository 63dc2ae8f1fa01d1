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
    settlement_fails: AtomicBool,
    settlements_failed: AtomicU64,
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

    /// While armed, a journey settlement fails after it applied a User Update step's
    /// attributes and before the journey moves (as a crash between the two would).
    pub fn fail_settlements_after_user_update(&self, armed: bool) {
        self.settlement_fails.store(armed, Ordering::SeqCst);
    }

    /// How many settlements the armed failure point has failed.
    pub fn settlements_failed(&self) -> u64 {
        self.settlements_failed.load(Ordering::SeqCst)
    }

    /// Called by a journey settlement between its user update and the journey's move.
    pub(super) fn after_user_update(&self) -> Result<(), StoreError> {
        if self.settlement_fails.load(Ordering::SeqCst) {
            self.settlements_failed.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable(
                "disk I/O error (planned failure point: after a User Update)".into(),
            ));
        }
        Ok(())
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
