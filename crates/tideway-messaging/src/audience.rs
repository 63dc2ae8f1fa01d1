//! Audiences: who a campaign may reach, asked of whoever holds the segment index.
//!
//! The engine does not evaluate segments itself: the server keeps one live bitmap index per
//! workspace (`tideway-server` `segment_service`), fresh within a second of every write, and
//! implements [`Audiences`] over it. A campaign's audience is the AND of its segments
//! (`in_segment`) and its inline filter ([`audience_filter`]), so one evaluation answers it.

use std::future::Future;
use std::pin::Pin;

use tideway_core::campaigns::Audience;
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::store::StoreError;
use tideway_segment::Filter;

pub type AudienceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Segment evaluation for the engine.
pub trait Audiences: Send + Sync {
    /// Every member of `filter` now, in ascending seq order, that is above `after`.
    fn members(
        &self,
        workspace: WorkspaceId,
        filter: Filter,
        after: Option<UserSeq>,
    ) -> AudienceFuture<'_, Vec<UserSeq>>;
    /// Which of `users` match `filter` now (in the order given).
    fn matching(
        &self,
        workspace: WorkspaceId,
        filter: Filter,
        users: Vec<UserSeq>,
    ) -> AudienceFuture<'_, Vec<UserSeq>>;
}

/// The audience as one filter: its segments and inline filter ANDed. Everyone when empty.
/// Errors name the part that does not parse (a stored definition is checked on save, so this
/// is a damaged row).
pub fn audience_filter(audience: &Audience) -> Result<Filter, StoreError> {
    let mut parts: Vec<Filter> = audience
        .segment_ids
        .iter()
        .map(|id| Filter::InSegment(id.clone()))
        .collect();
    if let Some(raw) = &audience.filter {
        parts.push(
            Filter::from_json(raw)
                .map_err(|e| StoreError::Corrupt(format!("campaign audience filter: {e}")))?,
        );
    }
    Ok(match parts.len() {
        0 => everyone(),
        1 => parts.remove(0),
        _ => Filter::And(parts),
    })
}

/// `filter` ANDed with a dispatch's own audience (segment-language JSON), if it has one.
pub fn narrowed(filter: Filter, extra: Option<&serde_json::Value>) -> Result<Filter, StoreError> {
    let Some(extra) = extra else {
        return Ok(filter);
    };
    let extra = Filter::from_json(extra)
        .map_err(|e| StoreError::Corrupt(format!("dispatch audience filter: {e}")))?;
    Ok(Filter::And(vec![filter, extra]))
}

/// A filter every user matches.
pub fn everyone() -> Filter {
    Filter::Or(vec![Filter::Identified(true), Filter::Identified(false)])
}
