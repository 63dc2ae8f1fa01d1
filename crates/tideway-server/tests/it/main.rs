//! Integration tests of the HTTP edge: the real server on a loopback port over a real SQLite
//! store, driven with `reqwest` exactly as a Braze client would.

// Tests talk to servers and receivers they started on loopback: plain clients are right here.
#![allow(clippy::disallowed_methods)]

mod harness;

mod auth;
mod batch;
mod canvas;
mod cohorts;
mod currents_egress;
mod dashboard;
mod identity;
mod messaging;
mod ops;
mod segments;
mod track;
