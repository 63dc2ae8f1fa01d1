//! The user primitives ([`UserLookup`], [`UserTx`]) and the one write primitive a backend
//! offers for domain work: [`UserStore::run_unit`].

use std::any::Any;

use crate::clock::Millis;
use crate::cohorts::CohortTx;
use crate::currents::CurrentsEvent;
use crate::ids::{BrazeId, DeviceId, Email, ExternalId, Phone, UserAlias, UserSeq, WorkspaceId};
use crate::profile::UserRecord;
use crate::users::WriteCtx;

use super::{StoreError, StoreFuture, Workspace};

/// A user named the way a service is about to look them up ([`UserLookup::prefetch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    External(&'a ExternalId),
    Alias(&'a UserAlias),
    Braze(&'a BrazeId),
    Device(&'a DeviceId),
    Email(&'a Email),
    Phone(&'a Phone),
}

/// A user named, before a unit of work runs, by a key a store can lock
/// ([`UserStore::run_keyed_unit`]): every key but an email or a phone, which many users may
/// share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LockKey {
    External(ExternalId),
    Alias(UserAlias),
    Braze(BrazeId),
    Device(DeviceId),
}

impl LockKey {
    /// The same key as a [`Lookup`].
    pub fn as_lookup(&self) -> Lookup<'_> {
        match self {
            LockKey::External(e) => Lookup::External(e),
            LockKey::Alias(a) => Lookup::Alias(a),
            LockKey::Braze(b) => Lookup::Braze(b),
            LockKey::Device(d) => Lookup::Device(d),
        }
    }
}

/// Primitive reads inside a workspace.
pub trait UserLookup {
    /// By current `external_id`, or by a deprecated one kept after a rename.
    fn user_by_external_id(&mut self, id: &ExternalId) -> Result<Option<UserRecord>, StoreError>;
    fn user_by_alias(&mut self, alias: &UserAlias) -> Result<Option<UserRecord>, StoreError>;
    fn user_by_braze_id(&mut self, id: &BrazeId) -> Result<Option<UserRecord>, StoreError>;
    fn user_by_device(&mut self, device: &DeviceId) -> Result<Option<UserRecord>, StoreError>;
    /// Every live user with this email, most recently updated first.
    fn users_by_email(&mut self, email: &Email) -> Result<Vec<UserRecord>, StoreError>;
    /// Every live user with this phone, most recently updated first.
    fn users_by_phone(&mut self, phone: &Phone) -> Result<Vec<UserRecord>, StoreError>;
    fn aliases_of(&mut self, user: UserSeq) -> Result<Vec<UserAlias>, StoreError>;
    fn devices_of(&mut self, user: UserSeq) -> Result<Vec<DeviceId>, StoreError>;
    /// True if `id` is kept as a deprecated external id (after a rename).
    fn is_deprecated_external_id(&mut self, id: &ExternalId) -> Result<bool, StoreError>;

    /// Batched lookup: the service is about to look these users up. A store whose lookups
    /// cost a round trip loads them all at once (a 75-object track request is then one query,
    /// not 75); a store whose lookups are local ignores it. Answers are unchanged either way.
    fn prefetch(&mut self, keys: &[Lookup<'_>]) -> Result<(), StoreError> {
        let _ = keys;
        Ok(())
    }

    /// Like [`UserLookup::user_by_external_id`] but only the sequence number; a store can
    /// answer it without loading the profile (cohort import matches a million of these).
    fn seq_by_external_id(&mut self, id: &ExternalId) -> Result<Option<UserSeq>, StoreError> {
        Ok(self.user_by_external_id(id)?.map(|u| u.seq))
    }

    /// The sequence number of the alias's user.
    fn seq_by_alias(&mut self, alias: &UserAlias) -> Result<Option<UserSeq>, StoreError> {
        Ok(self.user_by_alias(alias)?.map(|u| u.seq))
    }

    /// The sequence number of the device's user if that user is still anonymous.
    fn anonymous_seq_by_device(
        &mut self,
        device: &DeviceId,
    ) -> Result<Option<UserSeq>, StoreError> {
        Ok(self
            .user_by_device(device)?
            .filter(|u| !u.is_identified())
            .map(|u| u.seq))
    }
}

/// Primitive writes inside one transaction of one workspace. Every method's effect commits or
/// rolls back with the transaction, Currents events included.
pub trait UserTx: UserLookup {
    /// Creates an empty user with a fresh dense sequence number.
    fn create_user(&mut self, braze_id: BrazeId, now: Millis) -> Result<UserRecord, StoreError>;
    /// Creates a user with this external id (a store may do it in one write).
    fn create_user_with_external_id(
        &mut self,
        braze_id: BrazeId,
        external_id: &ExternalId,
        now: Millis,
    ) -> Result<UserRecord, StoreError> {
        let mut user = self.create_user(braze_id, now)?;
        user.external_id = Some(external_id.clone());
        self.save_user(user.clone())?;
        Ok(user)
    }
    /// Writes identifiers and profile back. It takes the record: the caller is done with it,
    /// and a store that keeps users in memory keeps this one without copying it.
    fn save_user(&mut self, user: UserRecord) -> Result<(), StoreError>;
    /// Removes the user for good: identifiers, aliases, devices and profile are erased; the
    /// sequence number is never reused.
    fn delete_user(&mut self, user: UserSeq, now: Millis) -> Result<(), StoreError>;
    /// Gives `user` this alias (the caller has checked the pair is free and the label unused).
    fn put_alias(&mut self, user: UserSeq, alias: &UserAlias) -> Result<(), StoreError>;
    fn remove_alias(&mut self, alias: &UserAlias) -> Result<(), StoreError>;
    /// Points `device` at `user` (moving it from any other user).
    fn put_device(&mut self, user: UserSeq, device: &DeviceId) -> Result<(), StoreError>;
    /// Keeps `old` resolving to `user` after a rename, until removed.
    fn put_deprecated_external_id(
        &mut self,
        user: UserSeq,
        old: &ExternalId,
    ) -> Result<(), StoreError>;
    fn remove_deprecated_external_id(&mut self, old: &ExternalId) -> Result<bool, StoreError>;
    /// Appends to the event log, about `user` where there is one (a store may buffer it until
    /// the job ends; it commits with the job either way).
    fn append_event(
        &mut self,
        user: Option<UserSeq>,
        event: CurrentsEvent,
    ) -> Result<(), StoreError>;
    /// Moves `from`'s cohort memberships to `to` (merge: the survivor keeps the union).
    fn move_cohort_memberships(
        &mut self,
        from: UserSeq,
        to: UserSeq,
        now: Millis,
    ) -> Result<(), StoreError>;
    /// Records that `from` was merged into `into`, so history kept per user (the events the
    /// segment index counts) follows the merge.
    fn record_merge(&mut self, from: UserSeq, into: UserSeq, now: Millis)
    -> Result<(), StoreError>;
}

/// Everything a unit of domain work may do inside its transaction: user and cohort primitives.
pub trait DomainTx: UserTx + CohortTx {}

impl<T: UserTx + CohortTx + ?Sized> DomainTx for T {}

/// A unit of work's result, type-erased so [`UserStore`] stays object-safe; [`run_unit`] and
/// [`read_unit`] put the type back.
pub type WorkOutput = Box<dyn Any + Send>;

/// A unit of domain work: it reads and writes through the transaction and returns its outcome,
/// or an error that rolls the transaction back. A store may run it **more than once** (a group
/// commit retried job by job, a serialization failure); only the last run's effects commit, so
/// the closure must not keep state between runs.
pub type UnitOfWork =
    Box<dyn FnMut(&mut dyn DomainTx, &mut WriteCtx<'_>) -> Result<WorkOutput, StoreError> + Send>;

/// Read-only work over users, run against a view that includes every acknowledged write.
pub type ReadWork = Box<dyn FnOnce(&mut dyn UserLookup) -> Result<WorkOutput, StoreError> + Send>;

/// Users and cohort membership: the write primitive and its read-only twin.
pub trait UserStore: Send + Sync {
    /// Runs `work` in one write transaction scoped to `workspace` (so cross-workspace access is
    /// impossible by construction) and answers once it has committed. `now` and fresh ids reach
    /// the work through its [`WriteCtx`]. Everything the work did — users, aliases, cohort
    /// members, Currents events — commits together or not at all. How transactions are
    /// batched (SQLite's group commit) or pooled (PostgreSQL) is the store's business.
    fn run_unit(
        &self,
        workspace: &Workspace,
        now: Millis,
        work: UnitOfWork,
    ) -> StoreFuture<'_, WorkOutput>;

    /// True if [`UserStore::run_keyed_unit`] uses its keys: a caller that would build them
    /// only for it skips that work otherwise.
    fn uses_keys(&self) -> bool {
        false
    }

    /// [`UserStore::run_unit`] for work that looks users up only by `keys` (it may use fewer;
    /// it must not depend on any other user's row). A store whose transactions lock users may
    /// lock all of them at once, in one order, before the work runs, so that units of one
    /// workspace naming different users run side by side and never wait for each other in a
    /// cycle (PostgreSQL; `postgres::users`, "Keyed batches"). A store that writes one unit at
    /// a time ignores them. The answer is the same either way; a unit that looks further
    /// is still correct, only no longer sure to run side by side.
    fn run_keyed_unit(
        &self,
        workspace: &Workspace,
        now: Millis,
        keys: Vec<LockKey>,
        work: UnitOfWork,
    ) -> StoreFuture<'_, WorkOutput> {
        let _ = keys;
        self.run_unit(workspace, now, work)
    }

    /// Runs `work` over a consistent read view of the workspace's users that includes every
    /// write acknowledged before the call.
    fn read_unit(&self, workspace: WorkspaceId, work: ReadWork) -> StoreFuture<'_, WorkOutput>;
}

fn downcast<T: 'static>(out: WorkOutput) -> Result<T, StoreError> {
    out.downcast::<T>()
        .map(|b| *b)
        .map_err(|_| StoreError::Corrupt("a unit of work returned another type".into()))
}

/// `work` with its result type-erased, as a [`UnitOfWork`].
fn erase<T, F>(mut work: F) -> UnitOfWork
where
    T: Send + 'static,
    F: FnMut(&mut dyn DomainTx, &mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
{
    Box::new(move |tx, ctx| work(tx, ctx).map(|t| Box::new(t) as WorkOutput))
}

/// A running unit's answer with its type put back.
fn typed<'s, T: 'static>(running: StoreFuture<'s, WorkOutput>) -> StoreFuture<'s, T> {
    Box::pin(async move { downcast(running.await?) })
}

/// [`UserStore::run_unit`] with a typed result.
pub fn run_unit<'s, S, T, F>(
    store: &'s S,
    workspace: &Workspace,
    now: Millis,
    work: F,
) -> StoreFuture<'s, T>
where
    S: UserStore + ?Sized,
    T: Send + 'static,
    F: FnMut(&mut dyn DomainTx, &mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
{
    typed(store.run_unit(workspace, now, erase(work)))
}

/// [`UserStore::run_keyed_unit`] with a typed result.
pub fn run_keyed_unit<'s, S, T, F>(
    store: &'s S,
    workspace: &Workspace,
    now: Millis,
    keys: Vec<LockKey>,
    work: F,
) -> StoreFuture<'s, T>
where
    S: UserStore + ?Sized,
    T: Send + 'static,
    F: FnMut(&mut dyn DomainTx, &mut WriteCtx<'_>) -> Result<T, StoreError> + Send + 'static,
{
    typed(store.run_keyed_unit(workspace, now, keys, erase(work)))
}

/// [`UserStore::read_unit`] with a typed result.
pub fn read_unit<'s, S, T, F>(store: &'s S, workspace: WorkspaceId, work: F) -> StoreFuture<'s, T>
where
    S: UserStore + ?Sized,
    T: Send + 'static,
    F: FnOnce(&mut dyn UserLookup) -> Result<T, StoreError> + Send + 'static,
{
    let erased: ReadWork = Box::new(move |tx| work(tx).map(|t| Box::new(t) as WorkOutput));
    let running = store.read_unit(workspace, erased);
    Box::pin(async move { downcast(running.await?) })
}
