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

/// Counts a database error by what a caller can do about it, in
/// `tideway_store_errors_total{kind}` (`unavailable`, `conflict`, `not_found`, `invalid`, `corrupt`): both
/// backends map every error they meet through here, so an operator sees a database failing
/// before users report it.
fn counted(e: tideway_core::store::StoreError) -> tideway_core::store::StoreError {
    use tideway_core::store::StoreError as E;
    let kind = match &e {
        E::Unavailable(_) => "unavailable",
        E::Conflict(_) => "conflict",
        E::Invalid(_) => "invalid",
        E::Corrupt(_) => "corrupt",
        E::NotFound(_) => "not_found",
    };
    metrics::counter!("tideway_store_errors_total", "kind" => kind).increment(1);
    e
}
