//! The storage contract: what the services need from a database, split by bounded context.
//!
//! A backend implements seven small async traits and one transaction type:
//!
//! - [`AdminStore`] (`admin.rs`): workspaces, REST API keys, partner keys, data import keys,
//!   Heap webhook settings;
//! - [`UserStore`] (`users.rs`): **one primitive** — run a unit of domain work in a write
//!   transaction of one workspace ([`UserStore::run_unit`]) — plus its read-only twin. The
//!   work is a closure over [`DomainTx`], the primitive reads and writes ([`UserLookup`],
//!   [`UserTx`], [`crate::cohorts::CohortTx`]); the rules themselves live in
//!   [`crate::users`], [`crate::cohorts`] and [`crate::services`], above the store;
//! - [`CohortStore`] (`cohorts.rs`): cohort reads for the management API;
//! - [`SegmentStore`] (`segments.rs`): stored segments and the segment change feed;
//! - [`crate::currents_store::CurrentsStore`]: the Currents event log and each Current's
//!   position, lease, dead letters and replays;
//! - [`MessagingStore`] (`messaging.rs`): campaigns, dispatches, the send queue, receipts and
//!   the trigger cursor;
//! - [`DashboardStore`] (`dashboard.rs`): dashboard users, their sessions and failed sign-ins.
//! - [`CanvasStore`] (`canvas.rs`): Canvases and their versions, journeys (each user's place
//!   in a Canvas, which is its timer), their inboxes, entry receipts and per-step counts.
//!
//! [`Store`] is all eight, implemented for any type that implements them; the HTTP edge and the
//! CLI hold an `Arc<dyn Store>` and call the services through
//! [`crate::services::Services`].
//!
//! **Log order** (every backend): the positions of a workspace's event log, cohort membership
//! changes and segment user changes increase in *commit* order — once a reader has seen
//! position `p`, no entry at or below `p` commits later. A consumer that reads `seq > p`
//! therefore never skips an entry that commits late. SQLite gets it from its single writer;
//! PostgreSQL from a per-workspace counter row taken at the end of the transaction (see
//! `tideway-store` `postgres/sequence.rs` and ARCHITECTURE.md).

use std::future::Future;
use std::pin::Pin;

use crate::clock::Millis;
use crate::ids::WorkspaceId;

mod admin;
mod canvas;
mod cohorts;
mod dashboard;
mod messaging;
mod segments;
mod users;

pub use admin::{AdminStore, HeapWebhook, ImportKeyInfo, ImportKeyOwner, NewApiKey};
pub use canvas::{
    CanvasRecipient, CanvasRecord, CanvasScan, CanvasSend, CanvasStat, CanvasStore, ClaimedJourney,
    ConversionWatch, InboxItem, JourneySettlement, LateConversion, NewEntry, ScanOutcome,
    StepCounts, StepStat, UserUpdate,
};
pub use cohorts::{
    CohortMember, CohortStore, CohortSummary, RecentCohortChanges, SegmentSyncOutcome,
    SegmentSyncPage, UserCohort,
};
pub use dashboard::{DashboardSession, DashboardStore, DashboardUser, NewSession};
pub use messaging::{
    CampaignRecord, CampaignStat, ClaimedSend, CohortEntry, DispatchRecord, DispatchSource,
    Enqueue, EnqueueOutcome, MessagingStore, NewConversion, NewSend, QueueState, Receipt,
    ReceiptRecord, SegmentTracker, SendCounts, SendJob, SendSeriesFigure, SendSeriesKey, SendStat,
    SendStatIncrement, SendState, SentMessage, Settlement, StatIncrement, TriggerCursor, UserSend,
};
pub use segments::{DefinitionsLock, SegmentStore};
pub use users::{
    DomainTx, LockKey, Lookup, ReadWork, UnitOfWork, UserLookup, UserStore, UserTx, WorkOutput,
    read_unit, run_keyed_unit, run_unit,
};

pub use crate::currents_store::{CurrentsStore, LoggedEvent};

/// What went wrong in storage, as far as a caller can act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or the write could not be committed; retrying later
    /// may work. Nothing of the operation was applied.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule would be broken (e.g. a workspace name that exists).
    #[error("{0} already exists")]
    Conflict(String),
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// Stored data could not be read back (a bug or a damaged file).
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
    /// The caller's data is something the database cannot store (a NUL character in text on
    /// PostgreSQL, a key too long for an index); nothing was written. The text says what, for
    /// the caller.
    #[error("{0}")]
    Invalid(String),
}

/// A workspace (Braze's "app group").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub name: String,
    /// Stable public id, carried by Currents events as `app_group_id`.
    pub app_group_id: String,
    pub created_at: Millis,
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A whole backend: every bounded context's contract. Implemented for every type that
/// implements the eight, so a backend never names it.
pub trait Store:
    AdminStore
    + UserStore
    + CohortStore
    + SegmentStore
    + CurrentsStore
    + MessagingStore
    + DashboardStore
    + CanvasStore
{
}

impl<T> Store for T where
    T: AdminStore
        + UserStore
        + CohortStore
        + SegmentStore
        + CurrentsStore
        + MessagingStore
        + DashboardStore
        + CanvasStore
{
}

/// Every contract trait and the services, for callers that hold a concrete store (the CLI,
/// tests, benchmarks): `use tideway_core::store::prelude::*;`.
pub mod prelude {
    pub use super::{
        AdminStore, CanvasStore, CohortStore, DashboardStore, MessagingStore, SegmentStore, Store,
        UserStore,
    };
    pub use crate::currents_store::CurrentsStore;
    pub use crate::services::Services;
}
