//! What both backends decode the same way: a logged Currents event read back from its row, and
//! the small integer conversions of stored counters.

use tideway_core::currents::{CurrentsEvent, EventType};
use tideway_core::ids::{EventId, UserSeq, WorkspaceId};
use tideway_core::store::{LoggedEvent, StoreError};

pub(crate) fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

/// A stored count (never negative) as `u64`.
pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A count as the `bigint` it is stored as.
pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One `event_log` row's columns as a [`LoggedEvent`]: the event type must be known and the
/// body JSON. The body is kept as logged text (it is what the exporter sends).
pub(crate) fn logged_event(
    seq: i64,
    workspace: WorkspaceId,
    user: Option<UserSeq>,
    id: String,
    event_type: &str,
    time: i64,
    body: String,
) -> Result<LoggedEvent, StoreError> {
    let event_type =
        EventType::parse(event_type).ok_or_else(|| corrupt(format!("event type {event_type}")))?;
    serde_json::from_str::<serde_json::Value>(&body)
        .map_err(|e| corrupt(format!("event body: {e}")))?;
    Ok(LoggedEvent {
        seq,
        workspace,
        user,
        event: CurrentsEvent {
            id: EventId(id),
            event_type,
            time,
            body,
        },
    })
}
