//! The messaging engine's [`Audiences`] answered by the server's live segment indexes
//! ([`SegmentService`]): the same bitmap evaluation, the same freshness guarantee (everything
//! acknowledged before the question is in the answer, waiting at most `FRESH_WAIT`), evaluated
//! on the blocking pool. `in_segment` resolves through the workspace's stored segments, as the
//! segments API does.

use std::sync::Arc;

use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::segments::segment_lookup;
use tideway_core::store::Store;
use tideway_messaging::audience::{AudienceFuture, Audiences};
use tideway_segment::Filter;

use crate::pipeline::now;
use crate::segment_service::SegmentService;

/// [`Audiences`] over the segment service.
pub struct SegmentAudiences {
    store: Arc<dyn Store>,
    segments: Arc<SegmentService>,
}

impl SegmentAudiences {
    pub fn new(store: Arc<dyn Store>, segments: Arc<SegmentService>) -> Self {
        SegmentAudiences { store, segments }
    }
}

impl Audiences for SegmentAudiences {
    fn members(
        &self,
        workspace: WorkspaceId,
        filter: Filter,
        after: Option<UserSeq>,
    ) -> AudienceFuture<'_, Vec<UserSeq>> {
        Box::pin(async move {
            let lookup = segment_lookup(&self.store.list_segments(workspace).await?);
            let at = now().secs();
            self.segments
                .with_fresh(workspace, move |live| {
                    let mut members = live.index().evaluate(&filter, at, &lookup);
                    if let Some(after) = after {
                        members.remove_range(..=after.0);
                    }
                    members.iter().map(UserSeq).collect()
                })
                .await
        })
    }

    fn matching(
        &self,
        workspace: WorkspaceId,
        filter: Filter,
        users: Vec<UserSeq>,
    ) -> AudienceFuture<'_, Vec<UserSeq>> {
        Box::pin(async move {
            if users.is_empty() {
                return Ok(users);
            }
            let lookup = segment_lookup(&self.store.list_segments(workspace).await?);
            let at = now().secs();
            self.segments
                .with_fresh(workspace, move |live| {
                    let members = live.index().evaluate(&filter, at, &lookup);
                    users
                        .into_iter()
                        .filter(|u| members.contains(u.0))
                        .collect()
                })
                .await
        })
    }
}
