//! Storage for Tideway: the two backends of `tideway_core::store::Store`, embedded SQLite
//! (`sqlite`) and PostgreSQL (`postgres`), and what they decode alike (`codec`).
//!
//! Invariant: this is the only crate that contains SQL. Everything above it speaks the store
//! contract; the domain rules live in `tideway-core` and run here as units of work inside one
//! transaction, so both backends run them unchanged.

mod codec;
pub mod ids;
pub mod postgres;
mod profile_codec;
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;
