//! Tideway's Currents exporter: delivers the workspace event log to receivers in Braze's
//! Custom HTTP format (or to Heap's track API), at least once, never dropping silently.
//!
//! Shape: one [`Exporter`] per process supervises one *consumer* task per Current
//! ([`consumer`]). Each consumer holds a lease on its Current in the store, reads the log
//! after its own committed position, and runs the plain loop the house style asks for:
//! claim a batch → send ([`send`]) → classify the answer ([`classify`], a pure table) →
//! ack / split / halve / dead-letter / retry with backoff ([`backoff`]) / halt. Currents share
//! nothing but the store, so a dead or slow receiver never holds back another Current.
//!
//! Invariant: an event leaves a Current's queue only by being acknowledged by the receiver
//! (2xx), moved to the dead-letter store with its reason, skipped with a counted reason
//! (`heap_track` without an identity), or dropped at the end of retention with a counted,
//! recorded drop; the position never passes an event otherwise. A crash re-sends at most the
//! batches in flight (≤ `max_in_flight`), with their original ids.

pub mod backoff;
pub mod catalogue;
pub mod classify;
pub mod clock;
pub mod consumer;
pub mod egress;
mod error;
pub mod exporter;
pub mod send;
pub mod spec;
pub mod transform;

pub use clock::Clock;
pub use error::CurrentsError;
pub use exporter::{Exporter, ExporterConfig, TestReport};
