//! Storage for Tideway: implementations of `tideway_core::store::Store`.
//!
//! Invariant: this is the only crate that contains SQL. Everything above it speaks the domain
//! operations of the `Store` trait; the rules those operations follow live in `tideway-core`
//! and run here inside a transaction, so a second backend (PostgreSQL) reuses them unchanged.

mod codec;
pub mod ids;
pub mod postgres;
mod profile_codec;
pub mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;
