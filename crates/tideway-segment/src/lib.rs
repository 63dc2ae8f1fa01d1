//! `tideway-segment`: Tideway's segment filter language and its two evaluators.
//!
//! A segment is a [`Filter`]: AND/OR/NOT over leaf tests on a profile (partner cohort
//! membership, attributes, events, purchases, other segments, random bucket, creation time,
//! identified or not). The crate has three parts:
//!
//! - the language: [`Filter`] and its wire form ([`Filter::from_json`], [`Filter::validate`],
//!   [`Filter::parse`], [`Filter::to_json`]), with [`FilterError`] naming the JSON path at fault;
//! - [`matches()`], the naive evaluator: one [`SegmentProfile`] at a time, the specification;
//! - [`SegmentIndex`], the bitmap evaluator over every profile of a workspace, updated one
//!   change at a time, which must return exactly what [`matches()`] would.
//!
//! Pure and synchronous: no IO, no clock (`now` is a parameter, unix seconds), no async.
//!
//! # Semantics (the choices the naive evaluator pins down)
//!
//! - Types never convert: `"5"` is not the number 5; numbers compare as `f64` (`10 == 10.0`).
//!   `null` is the same as absent.
//! - Negative operators are exact complements of their positive twin: `not_equals`,
//!   `not_includes_value`, `exists: false`, `is_blank` and cohort `excludes` match users who
//!   lack the attribute or cohort.
//! - Time values are ISO-8601 strings (RFC 3339, or without zone = UTC, or a bare date =
//!   midnight UTC), compared as unix seconds; `before` / `after` are strict.
//!   `more_than_days_ago d`: `t < now − d·86400`; `less_than_days_ago d`:
//!   `now − d·86400 < t ≤ now`; `within_days_future d`: `now < t ≤ now + d·86400`.
//! - Event and purchase counts `within_days d` count occurrences in `[now − d·86400, now]`;
//!   without it, every occurrence. Users who never did it count 0 (so `count_at_most` matches
//!   them); `first_` / `last_performed_*` never match them. `last_performed_within_days d` =
//!   at least one occurrence in that window.
//! - `age` is whole years between the UTC dates of `dob` and `now`; `email_available` = a
//!   non-blank `email` and `email_subscribe` not `unsubscribed`; `phone_available` = a
//!   non-blank `phone`. Total spend sums prices in profile order; no purchases = 0.
//! - `in_segment` on an unknown id, or on an id already being evaluated (a cycle created after
//!   validation), matches nobody.

mod datetime;
mod error;
mod filter;
mod index;
mod naive;
mod parse;
mod predicate;
mod profile;

#[cfg(test)]
mod op_tests;

pub use error::{FilterError, FilterErrorKind};
pub use filter::{
    ArrayElement, AttributeOp, CohortCatalog, CohortFilter, CohortOp, CountOp, EventOp, Filter,
    NoSegments, NumberOp, Pattern, PurchaseOp, SegmentLookup, TimeOp, Timestamp,
};
pub use index::SegmentIndex;
pub use index::codec::{DecodeError, INDEX_FORMAT, Reader, Writer};
pub use naive::matches;
pub use parse::{MAX_DEPTH, ValidationContext};
pub use profile::{EventHistory, PurchaseRecord, SegmentProfile};
