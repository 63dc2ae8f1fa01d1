//! Tideway's domain: identifiers, REST keys, profiles and the rules that change them, the
//! Currents event model, and the storage contract.
//!
//! Invariant: no IO. Nothing here opens a socket or a file, reads the clock or draws random
//! numbers; time and fresh ids are parameters. That keeps every rule unit-testable and lets
//! SQLite and PostgreSQL stores run the very same service code inside their transactions.

pub mod campaigns;
pub mod canvas;
pub mod clock;
pub mod cohorts;
pub mod currents;
pub mod currents_store;
pub mod dashboard;
pub mod egress;
pub mod ids;
pub mod keys;
pub mod message_events;
pub mod profile;
pub mod segments;
pub mod services;
pub mod store;
pub mod track;
pub mod users;

/// Most characters in the name of something a person names and reads in lists: segments,
/// campaigns, Canvases, cohorts. The API refuses longer names; the dashboard's forms say so
/// first.
pub const MAX_DISPLAY_NAME_CHARS: usize = 255;
