//! Wall-clock time for the exporter, read through `tokio::time` so tests can pause and
//! advance it. [`Clock::now`] is the wall time at start plus the tokio time elapsed since:
//! under `tokio::time::pause()` it moves exactly as the test advances it, in production it is
//! the real time (monotonic, so a wall-clock step back never moves a deadline).

use tideway_core::clock::Millis;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: Millis,
    at: Instant,
}

impl Clock {
    /// Anchored at the system's wall time now.
    pub fn system() -> Clock {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| Millis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
            .unwrap_or(Millis(0));
        Clock {
            wall,
            at: Instant::now(),
        }
    }

    /// Anchored at `wall` now (tests).
    pub fn starting_at(wall: Millis) -> Clock {
        Clock {
            wall,
            at: Instant::now(),
        }
    }

    pub fn now(&self) -> Millis {
        let elapsed = i64::try_from(self.at.elapsed().as_millis()).unwrap_or(i64::MAX);
        Millis(self.wall.0.saturating_add(elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paused_time_moves_the_clock() {
        let clock = Clock::starting_at(Millis(1_000));
        assert_eq!(clock.now(), Millis(1_000));
        tokio::time::sleep(std::time::Duration::from_secs(86_400)).await;
        assert_eq!(clock.now(), Millis(1_000 + 86_400_000));
    }
}
