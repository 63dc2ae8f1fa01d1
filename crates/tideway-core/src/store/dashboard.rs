//! Dashboard users, their sessions and failed sign-ins: a small bounded context of its own.
//!
//! Sessions live in the store, not in a process, so a session made through one node is valid
//! on every node. A session is found by the SHA-256 of its cookie token (the token itself is
//! never stored), and carries the per-session CSRF token its forms must echo. Failed sign-ins
//! are counted per key (the edge uses username + client address) within a window, for rate
//! limiting that holds across nodes.

use crate::clock::Millis;
use crate::dashboard::{PasswordHash, Role, Username};
use crate::keys::{KeyHash, Secret};

use super::StoreFuture;

/// A dashboard user as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardUser {
    pub id: i64,
    pub username: Username,
    pub role: Role,
    pub password_hash: PasswordHash,
    pub created_at: Millis,
}

/// A session to store: found later by `token_hash`.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub token_hash: KeyHash,
    pub user_id: i64,
    pub csrf: Secret,
    pub created_at: Millis,
    pub expires_at: Millis,
}

/// A live session and its user.
#[derive(Debug, Clone)]
pub struct DashboardSession {
    pub user: DashboardUser,
    pub csrf: Secret,
    pub expires_at: Millis,
}

/// Dashboard users and sessions. Each method is one transaction.
pub trait DashboardStore: Send + Sync {
    /// `Conflict` if the username is taken.
    fn create_dashboard_user(
        &self,
        username: &Username,
        role: Role,
        password_hash: &PasswordHash,
        now: Millis,
    ) -> StoreFuture<'_, DashboardUser>;
    fn dashboard_user(&self, username: &Username) -> StoreFuture<'_, Option<DashboardUser>>;
    /// Every dashboard user, by id.
    fn list_dashboard_users(&self) -> StoreFuture<'_, Vec<DashboardUser>>;
    /// Replaces the user's password and ends all their sessions; `false` if there is no
    /// such user.
    fn set_dashboard_password(
        &self,
        username: &Username,
        password_hash: &PasswordHash,
    ) -> StoreFuture<'_, bool>;

    /// Stores a session (and forgets sessions expired by `session.created_at`).
    fn create_dashboard_session(&self, session: NewSession) -> StoreFuture<'_, ()>;
    /// The session with this token hash if it has not expired at `now`.
    fn dashboard_session(
        &self,
        token_hash: KeyHash,
        now: Millis,
    ) -> StoreFuture<'_, Option<DashboardSession>>;
    fn delete_dashboard_session(&self, token_hash: KeyHash) -> StoreFuture<'_, ()>;

    /// Records a failed sign-in for `key` at `now`, forgets the key's failures before
    /// `since`, and returns how many remain (this one included). Records of one key are
    /// serialised: concurrent calls return distinct counts, as if made one after another.
    fn record_sign_in_failure(&self, key: &str, now: Millis, since: Millis)
    -> StoreFuture<'_, u32>;
    /// How many failed sign-ins `key` has at or after `since`.
    fn sign_in_failures(&self, key: &str, since: Millis) -> StoreFuture<'_, u32>;
    /// Forgets the key's failures (after a successful sign-in).
    fn clear_sign_in_failures(&self, key: &str) -> StoreFuture<'_, ()>;
}
