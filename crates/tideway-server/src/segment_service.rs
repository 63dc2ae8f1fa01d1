//! The segment service: one in-memory [`LiveIndex`] per workspace, built from the store on
//! first use and kept fresh from the store's change feed.
//!
//! Freshness has two sources. Every evaluation first catches up the feed synchronously (under
//! the workspace's lock), so anything the store acknowledged before the request is visible to
//! it (read-your-writes; the 1 s target is met by construction). A background task also catches
//! up every built index every [`REFRESH_EVERY`], so the catch-up a request pays for stays small.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tideway_core::ids::WorkspaceId;
use tideway_core::segments::LiveIndex;
use tideway_core::store::{Store, StoreError};

/// How often the background task catches up built indexes.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);

type Slot = Arc<tokio::sync::Mutex<Option<LiveIndex>>>;

/// The per-workspace indexes.
pub struct SegmentService {
    store: Arc<dyn Store>,
    indexes: Mutex<HashMap<WorkspaceId, Slot>>,
}

impl SegmentService {
    pub fn new(store: Arc<dyn Store>) -> Self {
        SegmentService {
            store,
            indexes: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, workspace: WorkspaceId) -> Slot {
        let mut map = self
            .indexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(map.entry(workspace).or_default())
    }

    /// Runs `f` over the workspace's index after bringing it up to date with the store
    /// (building it first if this is its first use).
    pub async fn with_fresh<T>(
        &self,
        workspace: WorkspaceId,
        f: impl FnOnce(&LiveIndex) -> T,
    ) -> Result<T, StoreError> {
        let slot = self.slot(workspace);
        let mut guard = slot.lock().await;
        let live = match guard.take() {
            None => {
                let snapshot = self.store.segment_profiles(workspace).await?;
                // Building is CPU-bound and can take a while on a large workspace.
                tokio::task::spawn_blocking(move || LiveIndex::from_snapshot(snapshot))
                    .await
                    .map_err(|e| {
                        StoreError::Unavailable(format!("segment index build failed: {e}"))
                    })?
            }
            Some(mut live) => {
                match self
                    .store
                    .segment_profile_changes(workspace, live.position())
                    .await
                {
                    Ok(changes) => live.apply(&changes),
                    Err(e) => {
                        *guard = Some(live);
                        return Err(e);
                    }
                }
                live
            }
        };
        let out = f(&live);
        *guard = Some(live);
        Ok(out)
    }

    /// Catches up every index built so far (the background task's tick).
    pub async fn refresh_built(&self) {
        let slots: Vec<(WorkspaceId, Slot)> = self
            .indexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(w, s)| (*w, Arc::clone(s)))
            .collect();
        for (workspace, slot) in slots {
            let mut guard = slot.lock().await;
            let Some(live) = guard.as_mut() else { continue };
            match self
                .store
                .segment_profile_changes(workspace, live.position())
                .await
            {
                Ok(changes) => live.apply(&changes),
                Err(e) => {
                    tracing::warn!(error = %e, workspace = workspace.0, "segment index catch-up failed; will retry")
                }
            }
        }
    }

    /// Starts the background catch-up on the current tokio runtime, if there is one; it ends
    /// when the service is dropped.
    pub fn spawn_refresher(service: &Arc<SegmentService>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<SegmentService> = Arc::downgrade(service);
        handle.spawn(async move {
            let mut tick = tokio::time::interval(REFRESH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(service) = weak.upgrade() else { break };
                service.refresh_built().await;
            }
        });
    }
}
