//! Scheduled campaigns in users' local time: an occurrence's wall-clock time (written in UTC
//! in the schedule) moved to the instant it is in a user's IANA `time_zone`.
//!
//! The time-zone database is compiled in (jiff's bundled tzdb), so every node answers the same
//! whatever its operating system has installed. A user without a time zone, or with one the
//! database does not know, gets the occurrence in UTC (Tideway's company time zone). A wall
//! time that a zone skips (a spring-forward gap) or repeats (fall back) resolves as most
//! calendars do: to the later offset for a gap, the earlier instant for a fold.

use std::collections::HashMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use tideway_core::clock::Millis;
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::store::{MessagingStore, StoreError};

/// When each of `users` gets the local-time occurrence `at` — its wall-clock time in their
/// zone, never before `now` (a campaign's send, a Canvas's entry) —, or nothing when the
/// occurrence is not in local time (`at` is `None`: everyone at once).
pub async fn local_dues<S: MessagingStore + ?Sized>(
    store: &S,
    ws: WorkspaceId,
    users: &[UserSeq],
    at: Option<Millis>,
    now: Millis,
) -> Result<HashMap<UserSeq, Millis>, StoreError> {
    let Some(at) = at else {
        return Ok(HashMap::new());
    };
    Ok(store
        .users_by_seq(ws, users.to_vec())
        .await?
        .into_iter()
        .map(|u| (u.seq, Millis(local_due(at, u.time_zone()).0.max(now.0))))
        .collect())
}

/// The instant the wall-clock time of `occurrence` (read in UTC) is in `time_zone`.
pub fn local_due(occurrence: Millis, time_zone: Option<&str>) -> Millis {
    let Some(tz) = time_zone.and_then(|name| TimeZone::get(name).ok()) else {
        return occurrence;
    };
    let Ok(at) = Timestamp::from_millisecond(occurrence.0) else {
        return occurrence;
    };
    let wall = TimeZone::UTC.to_datetime(at);
    match tz.to_ambiguous_zoned_datetime(wall).compatible() {
        Ok(local) => Millis(local.timestamp().as_millisecond()),
        Err(_) => occurrence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-07-01T09:00:00Z.
    const NINE_UTC: Millis = Millis(1_782_896_400_000);
    const HOUR: i64 = 3_600_000;

    #[test]
    fn wall_time_moves_by_the_zone_offset() {
        assert_eq!(local_due(NINE_UTC, None), NINE_UTC);
        assert_eq!(local_due(NINE_UTC, Some("Not/AZone")), NINE_UTC);
        assert_eq!(local_due(NINE_UTC, Some("UTC")), NINE_UTC);
        // New York is UTC-4 in July: 09:00 there is 13:00 UTC.
        assert_eq!(
            local_due(NINE_UTC, Some("America/New_York")),
            Millis(NINE_UTC.0 + 4 * HOUR)
        );
        // Tokyo is UTC+9: 09:00 there is 00:00 UTC.
        assert_eq!(
            local_due(NINE_UTC, Some("Asia/Tokyo")),
            Millis(NINE_UTC.0 - 9 * HOUR)
        );
        // Kiritimati, the first zone (UTC+14), is never before the lead.
        assert_eq!(
            local_due(NINE_UTC, Some("Pacific/Kiritimati")),
            Millis(NINE_UTC.0 - tideway_core::campaigns::LOCAL_TIME_LEAD_MS)
        );
    }
}
