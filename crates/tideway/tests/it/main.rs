//! The `tideway` binary end to end: one integration test binary that runs the built
//! executable (`serve` on port 0 with a temporary data directory, and the admin CLI) and talks
//! to it over real loopback HTTP.

// Tests talk to servers and receivers they started on loopback: plain clients are right here.
#![allow(clippy::disallowed_methods)]

mod campaigns;
mod canvas_crash;
mod cli;
mod cohorts_push;
mod connections;
mod currents_crash;
mod dashboard;
mod durability;
mod segments_export;
mod segments_restart;
mod support;
mod two_nodes;
