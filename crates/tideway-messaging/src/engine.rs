//! The messaging engine of one process: the dispatcher, the trigger engine, the scheduler and
//! the Canvas engine,
//! started together over one store and stopped together when the [`Engine`] is dropped.

use std::sync::Arc;
use std::time::Duration;

use tideway_currents::Clock;

use crate::audience::Audiences;
use crate::canvas::{CanvasConfig, CanvasEngine, CanvasEngineStore};
use crate::dispatcher::{Channels, DispatchConfig, Dispatcher, Tracking};
use crate::scheduler::Scheduler;
use crate::triggers::{TriggerConfig, TriggerEngine};

/// How the engine runs.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    pub dispatch: DispatchConfig,
    pub triggers: TriggerConfig,
    /// How often the scheduler looks for due occurrences and pending expansions.
    pub schedule_poll: Option<Duration>,
    /// The Canvas engine (its lease owner is the dispatcher's).
    pub canvas: CanvasConfig,
}

/// The running engine; its tasks stop when it is dropped.
pub struct Engine<S: ?Sized> {
    dispatcher: Arc<Dispatcher<S>>,
    canvas: Arc<CanvasEngine<S>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl<S: CanvasEngineStore + ?Sized + 'static> Engine<S> {
    pub fn start(
        store: Arc<S>,
        audiences: Arc<dyn Audiences>,
        channels: Channels,
        tracking: Option<Tracking>,
        clock: Clock,
        config: EngineConfig,
    ) -> Engine<S> {
        let mut canvas_config = config.canvas;
        canvas_config.owner = config.dispatch.owner.clone();
        let dispatcher = Dispatcher::new(
            Arc::clone(&store),
            Arc::clone(&audiences),
            channels,
            tracking,
            clock,
            config.dispatch,
        );
        let canvas = CanvasEngine::new(
            Arc::clone(&store),
            Arc::clone(&audiences),
            Arc::clone(&dispatcher),
            clock,
            canvas_config,
        );
        let triggers = TriggerEngine::new(
            Arc::clone(&store),
            Arc::clone(&audiences),
            Arc::clone(&dispatcher),
            clock,
            config.triggers,
        );
        let scheduler = Scheduler::new(
            store,
            audiences,
            Arc::clone(&dispatcher),
            clock,
            config.schedule_poll.unwrap_or(Duration::from_millis(250)),
        );
        let tasks = vec![
            tokio::spawn(Arc::clone(&dispatcher).run()),
            tokio::spawn(triggers.run()),
            tokio::spawn(scheduler.run()),
            tokio::spawn(Arc::clone(&canvas).run_scan()),
            tokio::spawn(Arc::clone(&canvas).run_timers()),
        ];
        Engine {
            dispatcher,
            canvas,
            tasks,
        }
    }

    /// The Canvas engine (API-triggered entries).
    pub fn canvas(&self) -> &Arc<CanvasEngine<S>> {
        &self.canvas
    }

    /// Wakes the dispatcher (something was queued for now).
    pub fn wake(&self) {
        self.dispatcher.wake();
    }
}

impl<S: ?Sized> Drop for Engine<S> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Longest wait between passes of a loop whose store calls keep failing.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);

/// How long a loop that polls every `poll` waits after `failures` passes in a row that failed
/// (the database away): `poll` after none, then doubling up to `MAX_RETRY_WAIT` (5 s), so an
/// outage costs a warning every few seconds a loop rather than ten a second.
pub fn retry_wait(poll: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return poll;
    }
    poll.saturating_mul(1 << failures.min(10))
        .min(MAX_RETRY_WAIT)
        .max(poll)
}

#[cfg(test)]
mod retry_tests {
    use super::*;

    #[test]
    fn a_failing_loop_waits_longer_up_to_a_bound_and_polls_again_after_a_success() {
        let poll = Duration::from_millis(100);
        let waits: Vec<u128> = (0..8).map(|f| retry_wait(poll, f).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1_600, 3_200, 5_000, 5_000]);
        assert_eq!(
            retry_wait(Duration::from_secs(10), 3),
            Duration::from_secs(10)
        );
        assert_eq!(retry_wait(poll, u32::MAX), MAX_RETRY_WAIT);
    }
}
