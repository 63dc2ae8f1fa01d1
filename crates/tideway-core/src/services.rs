//! The domain services as the HTTP edge and the CLI call them: one async method per operation,
//! each one unit of work ([`UserStore::run_unit`]) running the rules of [`crate::users`] and
//! [`crate::cohorts`]. They sit *above* the store, so every backend runs the very same rules,
//! and a backend implements primitives, never an operation.
//!
//! [`Services`] is implemented for every [`UserStore`] (including `dyn Store`): bring it into
//! scope and call `store.track(…)`.

use crate::clock::Millis;
use crate::cohorts::{self, CohortChange, CohortId, CohortUpsert, MembershipOutcome};
use crate::ids::ExternalId;
use crate::store::{
    SegmentSyncOutcome, SegmentSyncPage, StoreFuture, UserStore, Workspace, read_unit,
    run_keyed_unit, run_unit,
};
use crate::track::TrackRequest;
use crate::users::{
    self, AliasNewItem, AliasUpdateItem, DeleteOutcome, DeleteRequest, ExportOutcome,
    ExportRequest, IdentifyItem, ItemOutcome, MergeItem, RemoveOutcome, RenameItem, RenameOutcome,
    TrackOutcome,
};

/// Every write and read of users and cohort membership, as units of work.
pub trait Services: UserStore {
    /// `/users/track`.
    fn track(
        &self,
        workspace: &Workspace,
        request: TrackRequest,
        now: Millis,
    ) -> StoreFuture<'_, TrackOutcome> {
        // Named up front when it can be: PostgreSQL then locks them all at once and runs
        // track requests of one workspace side by side.
        let keys = if self.uses_keys() {
            users::track_keys(&request)
        } else {
            None
        };
        match keys {
            Some(keys) => run_keyed_unit(self, workspace, now, keys, move |tx, ctx| {
                users::track(tx, ctx, &request)
            }),
            None => run_unit(self, workspace, now, move |tx, ctx| {
                users::track(tx, ctx, &request)
            }),
        }
    }

    /// `/users/identify`.
    fn identify(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, IdentifyItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome> {
        run_unit(self, workspace, now, move |tx, ctx| {
            users::identify(tx, ctx, &items)
        })
    }

    /// `/users/alias/new`.
    fn alias_new(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, AliasNewItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome> {
        run_unit(self, workspace, now, move |tx, ctx| {
            users::alias_new(tx, ctx, &items)
        })
    }

    /// `/users/alias/update`.
    fn alias_update(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, AliasUpdateItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome> {
        run_unit(self, workspace, now, move |tx, ctx| {
            users::alias_update(tx, ctx, &items)
        })
    }

    /// `/users/merge`.
    fn merge_users(
        &self,
        workspace: &Workspace,
        items: Vec<(usize, MergeItem)>,
        now: Millis,
    ) -> StoreFuture<'_, ItemOutcome> {
        run_unit(self, workspace, now, move |tx, ctx| {
            users::merge_users(tx, ctx, &items)
        })
    }

    /// `/users/delete`.
    fn delete_users(
        &self,
        workspace: &Workspace,
        request: DeleteRequest,
        now: Millis,
    ) -> StoreFuture<'_, DeleteOutcome> {
        run_unit(self, workspace, now, move |tx, ctx| {
            users::delete_users(tx, ctx, &request)
        })
    }

    /// `/users/external_ids/rename`.
    fn rename_external_ids(
        &self,
        workspace: &Workspace,
        items: Vec<RenameItem>,
        now: Millis,
    ) -> StoreFuture<'_, RenameOutcome> {
        run_unit(self, workspace, now, move |tx, ctx| {
            users::rename_external_ids(tx, ctx, &items)
        })
    }

    /// `/users/external_ids/remove` (writes no event and reads no clock).
    fn remove_external_ids(
        &self,
        workspace: &Workspace,
        ids: Vec<ExternalId>,
    ) -> StoreFuture<'_, RemoveOutcome> {
        run_unit(self, workspace, workspace.created_at, move |tx, _| {
            users::remove_external_ids(tx, &ids)
        })
    }

    /// `/users/export/ids`: reads every write acknowledged before it.
    fn export_ids(
        &self,
        workspace: &Workspace,
        request: ExportRequest,
    ) -> StoreFuture<'_, ExportOutcome> {
        read_unit(self, workspace.id, move |tx| {
            users::export_ids(tx, &request)
        })
    }

    /// `/partners/{partner}/cohorts`: creates or renames a cohort.
    fn upsert_cohort(
        &self,
        workspace: &Workspace,
        partner: &str,
        upsert: CohortUpsert,
        now: Millis,
    ) -> StoreFuture<'_, ()> {
        let partner = partner.to_owned();
        run_unit(self, workspace, now, move |tx, _| {
            tx.upsert_cohort(
                &partner,
                &upsert.cohort_id,
                Some(&upsert.name),
                upsert.created_at,
                now,
            )
            .map(|_| ())
        })
    }

    /// `/partners/{partner}/cohorts/users`: membership deltas ([`cohorts::apply_partner_changes`]).
    fn apply_cohort_changes(
        &self,
        workspace: &Workspace,
        partner: &str,
        cohort_id: CohortId,
        changes: Vec<CohortChange>,
        now: Millis,
    ) -> StoreFuture<'_, MembershipOutcome> {
        let partner = partner.to_owned();
        run_unit(self, workspace, now, move |tx, _| {
            cohorts::apply_partner_changes(tx, &partner, &cohort_id, &changes, now)
        })
    }

    /// One page of Heap's segment sync ([`cohorts::apply_segment_sync`]).
    fn apply_segment_sync(
        &self,
        workspace: &Workspace,
        partner: &str,
        page: SegmentSyncPage,
        now: Millis,
    ) -> StoreFuture<'_, SegmentSyncOutcome> {
        let partner = partner.to_owned();
        run_unit(self, workspace, now, move |tx, _| {
            cohorts::apply_segment_sync(tx, &partner, &page, now)
        })
    }
}

impl<S: UserStore + ?Sized> Services for S {}
