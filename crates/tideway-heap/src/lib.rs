//! The Heap side of the Braze ⇄ Heap integration (`reference/heap.md`).
//!
//! - [`webhook`]: Heap's signed segment-sync webhook: `Heap-Hash` verification and parsing of
//!   `segment.users.sync` / `segment.users.drain` bodies into typed values. Pure: no IO, time
//!   is a parameter. The cohort-import side uses it to turn Heap segments into cohorts.
//! - [`forward`]: the Currents → Heap bulk-track mapping (`heap_track` Currents): identity,
//!   event names, flattened properties, idempotency keys, and the pacing Heap's limits need.
//!   Pure; the exporter in `tideway-currents` sends what it builds.
//! - [`sink`]: `tideway sink`, a local receiver that behaves like Heap's Currents intake
//!   (token check first, empty batches are no-ops, dedupe on `id`, SQLite storage, an HTML
//!   and a JSON view) with fault injection for tests and demos.
//!
//! Invariant: nothing here knows Tideway's domain or database; the webhook and forwarder
//! work on bytes and JSON values so they can be tested against the reference examples alone.

mod error;
pub mod forward;
pub mod sink;
pub mod webhook;

pub use error::HeapError;
