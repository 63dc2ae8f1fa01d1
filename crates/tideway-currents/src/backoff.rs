//! Retry delays: capped exponential backoff with full jitter, honouring `Retry-After`.
//!
//! The `attempt`-th consecutive failure (1-based) waits a uniform draw from
//! `[0, min(cap, base × multiplier^(attempt-1))]` ("full jitter": retries of many Currents
//! spread out instead of arriving together). When the receiver sent `Retry-After`, the wait
//! is at least that (capped at `max_retry_after_ms`). Pure: the random draw is a parameter.

use std::time::Duration;

use tideway_core::currents_store::RetryPolicy;

/// The upper bound of the jittered wait for this attempt.
pub fn ceiling(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(63);
    let factor = u64::from(policy.multiplier.max(1))
        .checked_pow(exp)
        .unwrap_or(u64::MAX);
    Duration::from_millis(policy.base_ms.saturating_mul(factor).min(policy.cap_ms))
}

/// The wait before retry number `attempt`; `draw` is uniform in `[0, 1)`.
pub fn delay(
    policy: &RetryPolicy,
    attempt: u32,
    retry_after: Option<Duration>,
    draw: f64,
) -> Duration {
    let jittered = ceiling(policy, attempt).mul_f64(draw.clamp(0.0, 1.0));
    match retry_after {
        Some(asked) => jittered.max(asked.min(Duration::from_millis(policy.max_retry_after_ms))),
        None => jittered,
    }
}

/// A small, fast pseudo-random source for jitter (splitmix64), seeded per Current.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn seeded(seed: u64) -> Self {
        Jitter(seed)
    }

    /// Seeded from the process's hash randomness.
    pub fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        Jitter(h.finish())
    }

    /// Uniform in `[0, 1)`.
    pub fn draw(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        base_ms: 1_000,
        multiplier: 2,
        cap_ms: 300_000,
        request_timeout_ms: 30_000,
        max_retry_after_ms: 3_600_000,
    };

    #[test]
    fn the_ceiling_doubles_from_one_second_to_the_five_minute_cap() {
        let secs: Vec<u64> = (1..=12).map(|a| ceiling(&POLICY, a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(
            ceiling(&POLICY, 1_000),
            Duration::from_secs(300),
            "no overflow"
        );
        assert_eq!(ceiling(&POLICY, 0), Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        assert_eq!(delay(&POLICY, 4, None, 0.0), Duration::ZERO);
        assert_eq!(delay(&POLICY, 4, None, 0.5), Duration::from_secs(4));
        assert!(delay(&POLICY, 4, None, 0.999_999) < Duration::from_secs(8));
        let mut j = Jitter::seeded(7);
        let draws: Vec<f64> = (0..10_000).map(|_| j.draw()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((0.45..0.55).contains(&mean), "{mean}");
    }

    #[test]
    fn retry_after_is_a_floor_with_its_own_cap() {
        let asked = Some(Duration::from_secs(30));
        assert_eq!(delay(&POLICY, 1, asked, 0.3), Duration::from_secs(30));
        assert_eq!(delay(&POLICY, 10, asked, 0.5), Duration::from_secs(150));
        assert_eq!(
            delay(&POLICY, 1, Some(Duration::from_secs(86_400)), 0.1),
            Duration::from_secs(3_600)
        );
    }
}
