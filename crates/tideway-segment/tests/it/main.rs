//! Integration tests of `tideway-segment` through its public API: the naive evaluator is the
//! oracle for the bitmap index (random profiles, random filters, random incremental changes),
//! the wire form round-trips, the snapshot codec round-trips, and size estimation works at a
//! scale where it samples.

mod equivalence;
mod roundtrip;
mod scale;
mod snapshot;
mod strategies;
