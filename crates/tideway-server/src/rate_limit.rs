//! Per-key rate limits: fixed one-minute windows aligned to the minute, one counter per key and
//! endpoint group, as Braze documents them (braze-api.md §3.4, §3.7, §4.5).
//!
//! Fixed windows make `X-RateLimit-Reset` a simple, honest number (the end of the current
//! minute) and cost one map entry per active key and group. The state is process-local: with
//! several nodes behind a load balancer each enforces its own share, which errs on the side of
//! letting traffic through rather than adding a database round trip to every request.

use std::collections::HashMap;
use std::sync::Mutex;

/// Requests per minute per key, per endpoint group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits {
    /// `/users/track` (Braze: 50,000/min).
    pub users_track_per_minute: u32,
    /// `/users/delete`, `/users/alias/new`, `/users/alias/update`, `/users/identify`,
    /// `/users/merge`, `/users/external_ids/*` (Braze: 20,000/min shared).
    pub users_batch_per_minute: u32,
    /// `/users/export/ids` (Braze: 250/min for new customers).
    pub users_export_per_minute: u32,
    /// Tideway's own management API (`/api/v1/*`). Braze gives endpoints without their own
    /// limit 250,000/hour; per minute that is about 4,166.
    pub management_per_minute: u32,
    /// Partner cohort import, per partner key and hour (braze-api.md §2.5: 250,000/hour). Not
    /// counted against REST keys.
    pub partner_per_hour: u32,
    /// `/messages/send`, `/campaigns/trigger/send` and `/canvas/trigger/send` aimed at a segment
    /// or an audience, or broadcast (braze-messaging.md §2: 250/min), counted on top of the
    /// management budget those endpoints draw from otherwise.
    pub broadcast_sends_per_minute: u32,
}

impl RateLimits {
    /// Limits no client will reach (a billion requests a minute): benchmarks measure the
    /// server, not its rate limiter.
    pub fn unlimited() -> Self {
        let unlimited = 1_000_000_000;
        RateLimits {
            users_track_per_minute: unlimited,
            users_batch_per_minute: unlimited,
            users_export_per_minute: unlimited,
            management_per_minute: unlimited,
            partner_per_hour: unlimited,
            broadcast_sends_per_minute: unlimited,
        }
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            users_track_per_minute: 50_000,
            users_batch_per_minute: 20_000,
            users_export_per_minute: 250,
            management_per_minute: 4_166,
            partner_per_hour: 250_000,
            broadcast_sends_per_minute: 250,
        }
    }
}

/// Which shared counter an endpoint draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Track,
    Batch,
    Export,
    Management,
    BroadcastSends,
}

impl Group {
    pub fn as_str(self) -> &'static str {
        match self {
            Group::Track => "track",
            Group::Batch => "batch",
            Group::Export => "export",
            Group::Management => "management",
            Group::BroadcastSends => "broadcast_sends",
        }
    }
}

/// The state of one counter after counting a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// End of the current window, UTC epoch seconds.
    pub reset: i64,
    /// Seconds until `reset` (at least 1).
    pub retry_after: u64,
}

/// Above this many tracked counters, stale windows are dropped.
const PRUNE_ABOVE: usize = 10_000;

pub struct RateLimiter {
    limits: RateLimits,
    windows: Mutex<HashMap<(i64, Group), Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    minute: i64,
    count: u32,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        RateLimiter {
            limits,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn limit(&self, group: Group) -> u32 {
        match group {
            Group::Track => self.limits.users_track_per_minute,
            Group::Batch => self.limits.users_batch_per_minute,
            Group::Export => self.limits.users_export_per_minute,
            Group::Management => self.limits.management_per_minute,
            Group::BroadcastSends => self.limits.broadcast_sends_per_minute,
        }
    }

    /// Counts one request of `key_id` in `group` at `now_secs` and says whether it may proceed.
    pub fn check(&self, key_id: i64, group: Group, now_secs: i64) -> Decision {
        let limit = self.limit(group);
        let minute = now_secs.div_euclid(60);
        // A poisoned lock only means another request panicked mid-update of a counter; the map
        // is still usable, so keep serving rather than failing every request from now on.
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if windows.len() > PRUNE_ABOVE {
            windows.retain(|_, w| w.minute >= minute);
        }
        let window = windows
            .entry((key_id, group))
            .or_insert(Window { minute, count: 0 });
        if window.minute != minute {
            *window = Window { minute, count: 0 };
        }
        window.count = window.count.saturating_add(1);
        let count = window.count;
        drop(windows);
        let reset = (minute + 1) * 60;
        Decision {
            allowed: count <= limit,
            limit,
            remaining: limit.saturating_sub(count),
            reset,
            retry_after: u64::try_from(reset - now_secs).unwrap_or(1).max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(n: u32) -> RateLimiter {
        RateLimiter::new(RateLimits {
            users_track_per_minute: n,
            users_batch_per_minute: n,
            users_export_per_minute: n,
            management_per_minute: n,
            partner_per_hour: n,
            broadcast_sends_per_minute: n,
        })
    }

    #[test]
    fn counts_per_key_and_group_within_a_minute() {
        let l = limiter(2);
        let t = 1_700_000_010; // 30 s into a minute
        let first = l.check(1, Group::Track, t);
        assert_eq!(
            (
                first.allowed,
                first.remaining,
                first.reset,
                first.retry_after
            ),
            (true, 1, 1_700_000_040, 30)
        );
        assert!(l.check(1, Group::Track, t + 1).allowed);
        let third = l.check(1, Group::Track, t + 2);
        assert_eq!((third.allowed, third.remaining), (false, 0));
        assert!(
            l.check(2, Group::Track, t).allowed,
            "other keys have their own counter"
        );
        assert!(
            l.check(1, Group::Export, t).allowed,
            "other groups have their own counter"
        );
    }

    #[test]
    fn a_new_minute_starts_a_new_window() {
        let l = limiter(1);
        assert!(l.check(1, Group::Batch, 119).allowed);
        assert!(!l.check(1, Group::Batch, 119).allowed);
        let next = l.check(1, Group::Batch, 120);
        assert!(next.allowed);
        assert_eq!(next.reset, 180);
    }
}
