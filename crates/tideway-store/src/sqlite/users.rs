//! `UserLookup` and `UserTx` over SQLite: the primitives the core user services run on.
//!
//! One [`SqlUsers`] value is scoped to one workspace; every statement filters on it, so a
//! service can never reach another workspace's rows. Statements are prepared once per
//! connection (`prepare_cached`), which matters on the ingest path.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use rusqlite::{Connection, OptionalExtension, Row, params};
use tideway_core::clock::Millis;
use tideway_core::currents::CurrentsEvent;
use tideway_core::ids::{
    AliasLabel, AliasName, BrazeId, DeviceId, Email, ExternalId, Phone, UserAlias, UserSeq,
    WorkspaceId,
};
use tideway_core::profile::UserRecord;
use tideway_core::store::{StoreError, UserLookup, UserTx};

use super::sql_err;
use crate::profile_codec;

pub struct SqlUsers<'c> {
    pub conn: &'c Connection,
    pub workspace: WorkspaceId,
    /// The writer's cache; readers go to the database every time.
    cache: Option<&'c mut UserCache>,
    /// Post-images saved by this job, written to `user_log` as one row by [`SqlUsers::finish`].
    log: Vec<u8>,
    /// Currents events appended by this job and not yet inserted (multi-row INSERTs).
    events: Vec<(Option<u32>, CurrentsEvent)>,
    /// The identifiers in the row of each user this job was handed (the writer only): a save
    /// that keeps them writes only the log; one that changes them writes the row.
    handed: FxHashMap<(i64, u32), RowIdentifiers>,
}

/// The identifier columns of a `users` row (always current: they are written at once).
#[derive(Clone, PartialEq, Eq)]
struct RowIdentifiers {
    external_id: Option<ExternalId>,
    email: Option<Email>,
    phone: Option<Phone>,
}

impl RowIdentifiers {
    fn of(user: &UserRecord) -> Self {
        RowIdentifiers {
            external_id: user.external_id.clone(),
            email: user.email.clone(),
            phone: user.phone.clone(),
        }
    }

    fn matches(&self, user: &UserRecord) -> bool {
        self.external_id == user.external_id && self.email == user.email && self.phone == user.phone
    }
}

/// The writer's view of users. A user's truth is the record held here if there is one, else
/// their `users` row with the pending post-image (if the row is behind) laid over it.
///
/// Only the writer writes users, so this holds: `users` has the records the writer saved (the
/// latest state); `dirty` has the profile of every user whose row is behind, until the sweep
/// (`sqlite/behind.rs`) writes it; `by_external` maps external ids to users exactly (identifier
/// changes are written at once and update it). A lookup *hands out* the cached record (removes
/// it: no copy), and the save that follows puts it back; a record handed out and never saved
/// is simply gone, which is safe, since the row plus the pending post-image say the same.
/// Whenever a rollback may have undone something remembered here, the writer clears it and
/// replays `user_log` into `users` ([`super::behind::forget`], [`super::behind::replay`]), which
/// makes the rows the truth.
pub struct UserCache {
    /// Above this many cached users (or mapped external ids) they are dropped.
    max_users: usize,
    users: FxHashMap<(i64, u32), UserRecord>,
    /// Per workspace: external id → seq (a map per workspace so a lookup borrows the id).
    by_external: FxHashMap<i64, FxHashMap<String, u32>>,
    next_seq: FxHashMap<i64, u32>,
    /// Users whose `users` row is behind, keyed in row order, with the row as it must become.
    pub(super) dirty: BTreeMap<(i64, u32), PendingRow>,
    /// The id the next `user_log` row gets (monotonic for the writer's life).
    pub(super) next_log_id: i64,
}

/// A `users` row's profile columns as the sweep will write them (the post-image also logged).
pub(super) struct PendingRow {
    pub created_at: i64,
    pub updated_at: i64,
    pub profile: String,
}

impl UserCache {
    /// A cache of at most `max_users` records (~1 KB each) and as many external ids.
    pub fn with_limit(max_users: usize) -> Self {
        UserCache {
            max_users,
            users: FxHashMap::default(),
            by_external: FxHashMap::default(),
            next_seq: FxHashMap::default(),
            dirty: BTreeMap::new(),
            next_log_id: 0,
        }
    }

    pub fn clear(&mut self) {
        self.users.clear();
        self.by_external.clear();
        self.next_seq.clear();
        self.dirty.clear();
    }

    /// Keeps memory bounded; called between batches. Pending rows stay: they are the only
    /// place the latest profiles of users whose rows are behind live outside the log.
    pub fn trim(&mut self) {
        if self.users.len() > self.max_users {
            self.users.clear();
        }
        if self.by_external.values().map(FxHashMap::len).sum::<usize>() > self.max_users {
            self.by_external.clear();
        }
    }

    /// Number of users whose row is behind.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// Holds `user` as the truth (the writer just saved or created it).
    fn keep(&mut self, ws: WorkspaceId, user: UserRecord) {
        if let Some(ext) = &user.external_id {
            self.map_external(ws, ext, user.seq.0);
        }
        self.users.insert((ws.0, user.seq.0), user);
    }

    fn map_external(&mut self, ws: WorkspaceId, ext: &ExternalId, seq: u32) {
        let ids = self.by_external.entry(ws.0).or_default();
        if ids.get(ext.as_str()) != Some(&seq) {
            ids.insert(ext.as_str().to_owned(), seq);
        }
    }

    fn unmap_external(&mut self, ws: WorkspaceId, ext: &ExternalId) {
        if let Some(ids) = self.by_external.get_mut(&ws.0) {
            ids.remove(ext.as_str());
        }
    }

    fn seq_of_external(&self, ws: WorkspaceId, id: &ExternalId) -> Option<u32> {
        self.by_external.get(&ws.0)?.get(id.as_str()).copied()
    }

    /// Lays the pending post-image over a user read from their (maybe behind) row.
    fn patch(&self, ws: WorkspaceId, user: &mut UserRecord) -> Result<(), StoreError> {
        if let Some(pending) = self.dirty.get(&(ws.0, user.seq.0)) {
            user.profile = profile_codec::decode(&pending.profile)
                .map_err(|e| StoreError::Corrupt(format!("pending profile: {e}")))?;
            user.created_at = Millis(pending.created_at);
            user.updated_at = Millis(pending.updated_at);
        }
        Ok(())
    }
}

impl<'c> SqlUsers<'c> {
    pub fn reader(conn: &'c Connection, workspace: WorkspaceId) -> Self {
        SqlUsers {
            conn,
            workspace,
            cache: None,
            log: Vec::new(),
            events: Vec::new(),
            handed: FxHashMap::default(),
        }
    }

    pub fn writer(conn: &'c Connection, workspace: WorkspaceId, cache: &'c mut UserCache) -> Self {
        SqlUsers {
            conn,
            workspace,
            cache: Some(cache),
            log: Vec::new(),
            events: Vec::new(),
            handed: FxHashMap::default(),
        }
    }

    /// Turns a user read from their row into the truth (the writer's cached record, or the row
    /// with the pending post-image laid over it) and hands it out.
    fn truth_of_row(&mut self, row: Option<UserRecord>) -> Result<Option<UserRecord>, StoreError> {
        let Some(mut user) = row else {
            return Ok(None);
        };
        if self.cache.is_none() {
            return Ok(Some(user));
        }
        if let Some(cached) = self.take_cached(user.seq.0) {
            return Ok(Some(cached));
        }
        if let Some(cache) = self.cache.as_deref() {
            cache.patch(self.workspace, &mut user)?;
        }
        Ok(Some(self.hand_out(user)))
    }

    /// The cached record of `seq`, handed out (the writer only).
    fn take_cached(&mut self, seq: u32) -> Option<UserRecord> {
        let user = self
            .cache
            .as_deref_mut()?
            .users
            .remove(&(self.workspace.0, seq))?;
        Some(self.hand_out(user))
    }

    /// Notes the identifiers of a user this job was handed (see `handed`).
    fn hand_out(&mut self, user: UserRecord) -> UserRecord {
        if self.cache.is_some() {
            self.handed
                .entry((self.workspace.0, user.seq.0))
                .or_insert_with(|| RowIdentifiers::of(&user));
        }
        user
    }
}

pub(super) const USER_COLUMNS: &str =
    "seq, braze_id, external_id, email, phone, created_at, updated_at, profile";

fn corrupt(what: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, what.to_owned(), rusqlite::types::Type::Text)
}

pub(super) fn user_from_row(row: &Row<'_>) -> rusqlite::Result<UserRecord> {
    let opt = |i: usize| -> rusqlite::Result<Option<String>> { row.get(i) };
    let profile_text: String = row.get(7)?;
    Ok(UserRecord {
        seq: UserSeq(row.get(0)?),
        braze_id: BrazeId::parse(&row.get::<_, String>(1)?).map_err(|_| corrupt("braze_id"))?,
        external_id: opt(2)?
            .map(|s| ExternalId::parse(&s))
            .transpose()
            .map_err(|_| corrupt("external_id"))?,
        email: opt(3)?
            .map(|s| Email::parse(&s))
            .transpose()
            .map_err(|_| corrupt("email"))?,
        phone: opt(4)?
            .map(|s| Phone::parse(&s))
            .transpose()
            .map_err(|_| corrupt("phone"))?,
        created_at: Millis(row.get(5)?),
        updated_at: Millis(row.get(6)?),
        profile: profile_codec::decode(&profile_text).map_err(|_| corrupt("profile"))?,
    })
}

impl SqlUsers<'_> {
    fn one(&mut self, sql: &str, key: &str) -> Result<Option<UserRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(sql_err)?;
        let found = stmt
            .query_row(params![self.workspace.0, key], user_from_row)
            .optional()
            .map_err(sql_err)?;
        self.truth_of_row(found)
    }

    fn many(&mut self, sql: &str, key: &str) -> Result<Vec<UserRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(sql_err)?;
        let rows = stmt
            .query_map(params![self.workspace.0, key], user_from_row)
            .map_err(sql_err)?;
        let rows: Vec<UserRecord> = rows.collect::<Result<_, _>>().map_err(sql_err)?;
        let mut users = Vec::with_capacity(rows.len());
        for row in rows {
            users.extend(self.truth_of_row(Some(row))?);
        }
        // The rows' order used their `updated_at`, which may be behind the cached users'.
        users.sort_by_key(|u| std::cmp::Reverse((u.updated_at, u.seq.0)));
        Ok(users)
    }

    fn by_seq_via(&mut self, sql: &str, key: &str) -> Result<Option<UserRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(sql_err)?;
        let seq: Option<u32> = stmt
            .query_row(params![self.workspace.0, key], |r| r.get(0))
            .optional()
            .map_err(sql_err)?;
        match seq {
            Some(seq) => self.by_seq(UserSeq(seq)),
            None => Ok(None),
        }
    }

    pub fn by_seq(&mut self, seq: UserSeq) -> Result<Option<UserRecord>, StoreError> {
        if let Some(user) = self.take_cached(seq.0) {
            return Ok(Some(user));
        }
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users WHERE workspace_id = ?1 AND seq = ?2 AND deleted_at IS NULL"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(sql_err)?;
        let found = stmt
            .query_row(params![self.workspace.0, seq.0], user_from_row)
            .optional()
            .map_err(sql_err)?;
        self.truth_of_row(found)
    }
}

impl UserLookup for SqlUsers<'_> {
    fn user_by_external_id(&mut self, id: &ExternalId) -> Result<Option<UserRecord>, StoreError> {
        let ws = self.workspace;
        let known = self
            .cache
            .as_deref()
            .and_then(|c| c.seq_of_external(ws, id));
        if let Some(seq) = known {
            // The map is exact, so this is the user (read from the row if not cached).
            return self.by_seq(UserSeq(seq));
        }
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users WHERE workspace_id = ?1 AND external_id = ?2"
        );
        if let Some(u) = self.one(&sql, id.as_str())? {
            return Ok(Some(u));
        }
        self.by_seq_via(
            "SELECT seq FROM deprecated_external_ids WHERE workspace_id = ?1 AND external_id = ?2",
            id.as_str(),
        )
    }

    fn user_by_alias(&mut self, alias: &UserAlias) -> Result<Option<UserRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq FROM user_aliases WHERE workspace_id = ?1 AND label = ?2 AND name = ?3",
            )
            .map_err(sql_err)?;
        let seq: Option<u32> = stmt
            .query_row(
                params![self.workspace.0, alias.label.as_str(), alias.name.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql_err)?;
        match seq {
            Some(seq) => self.by_seq(UserSeq(seq)),
            None => Ok(None),
        }
    }

    fn user_by_braze_id(&mut self, id: &BrazeId) -> Result<Option<UserRecord>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users WHERE workspace_id = ?1 AND braze_id = ?2 AND deleted_at IS NULL"
        );
        self.one(&sql, id.as_str())
    }

    fn user_by_device(&mut self, device: &DeviceId) -> Result<Option<UserRecord>, StoreError> {
        self.by_seq_via(
            "SELECT seq FROM user_devices WHERE workspace_id = ?1 AND device_id = ?2",
            device.as_str(),
        )
    }

    fn users_by_email(&mut self, email: &Email) -> Result<Vec<UserRecord>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users WHERE workspace_id = ?1 AND email = ?2 ORDER BY updated_at DESC, seq DESC"
        );
        self.many(&sql, email.as_str())
    }

    fn users_by_phone(&mut self, phone: &Phone) -> Result<Vec<UserRecord>, StoreError> {
        let sql = format!(
            "SELECT {USER_COLUMNS} FROM users WHERE workspace_id = ?1 AND phone = ?2 ORDER BY updated_at DESC, seq DESC"
        );
        self.many(&sql, phone.as_str())
    }

    fn aliases_of(&mut self, user: UserSeq) -> Result<Vec<UserAlias>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT label, name FROM user_aliases WHERE workspace_id = ?1 AND seq = ?2 ORDER BY label")
            .map_err(sql_err)?;
        let rows = stmt
            .query_map(params![self.workspace.0, user.0], |r| {
                let label: String = r.get(0)?;
                let name: String = r.get(1)?;
                Ok(AliasLabel::parse(&label)
                    .ok()
                    .zip(AliasName::parse(&name).ok())
                    .map(|(label, name)| UserAlias { label, name }))
            })
            .map_err(sql_err)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(
                row.map_err(sql_err)?
                    .ok_or_else(|| StoreError::Corrupt("alias".into()))?,
            );
        }
        Ok(out)
    }

    fn devices_of(&mut self, user: UserSeq) -> Result<Vec<DeviceId>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT device_id FROM user_devices WHERE workspace_id = ?1 AND seq = ?2 ORDER BY device_id")
            .map_err(sql_err)?;
        let rows = stmt
            .query_map(params![self.workspace.0, user.0], |r| r.get::<_, String>(0))
            .map_err(sql_err)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(
                DeviceId::parse(&row.map_err(sql_err)?)
                    .map_err(|_| StoreError::Corrupt("device id".into()))?,
            );
        }
        Ok(out)
    }

    fn seq_by_external_id(&mut self, id: &ExternalId) -> Result<Option<UserSeq>, StoreError> {
        let ws = self.workspace;
        if let Some(seq) = self
            .cache
            .as_deref()
            .and_then(|c| c.seq_of_external(ws, id))
        {
            return Ok(Some(UserSeq(seq)));
        }
        let ws = self.workspace.0;
        match self.seq_where("SELECT seq FROM users WHERE workspace_id = ?1 AND external_id = ?2", params![ws, id.as_str()])? {
            Some(seq) => Ok(Some(seq)),
            None => self.seq_where("SELECT seq FROM deprecated_external_ids WHERE workspace_id = ?1 AND external_id = ?2", params![ws, id.as_str()]),
        }
    }

    fn seq_by_alias(&mut self, alias: &UserAlias) -> Result<Option<UserSeq>, StoreError> {
        self.seq_where(
            "SELECT seq FROM user_aliases WHERE workspace_id = ?1 AND label = ?2 AND name = ?3",
            params![self.workspace.0, alias.label.as_str(), alias.name.as_str()],
        )
    }

    fn anonymous_seq_by_device(
        &mut self,
        device: &DeviceId,
    ) -> Result<Option<UserSeq>, StoreError> {
        self.seq_where(
            "SELECT u.seq FROM user_devices d JOIN users u ON u.workspace_id = d.workspace_id AND u.seq = d.seq
             WHERE d.workspace_id = ?1 AND d.device_id = ?2 AND u.external_id IS NULL AND u.deleted_at IS NULL",
            params![self.workspace.0, device.as_str()],
        )
    }

    fn is_deprecated_external_id(&mut self, id: &ExternalId) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM deprecated_external_ids WHERE workspace_id = ?1 AND external_id = ?2")
            .map_err(sql_err)?;
        stmt.exists(params![self.workspace.0, id.as_str()])
            .map_err(sql_err)
    }
}

impl SqlUsers<'_> {
    /// Writes `user` (see `save_user`) without remembering it in the cache.
    fn write_user(&mut self, user: &UserRecord) -> Result<(), StoreError> {
        let profile = profile_codec::encode(&user.profile);
        let ws = self.workspace;
        // When the identifiers are as the writer last saw them, only the profile changed: log
        // its post-image (one append) and let the sweep write the row later, in row order,
        // together with the user's other changes. Identifier changes are written to the row at
        // once, since lookups by external id, email and phone read the rows' indexes.
        let key = (ws.0, user.seq.0);
        // The row's identifiers: those of the user as handed to this job, or of the cached
        // record (the writer saved it; its identifiers went to the row at once).
        let row_ids = self.handed.get(&key).cloned().or_else(|| {
            self.cache
                .as_deref()
                .and_then(|c| c.users.get(&key))
                .map(RowIdentifiers::of)
        });
        if let Some(cache) = self.cache.as_deref_mut()
            && row_ids.as_ref().is_some_and(|ids| ids.matches(user))
        {
            LogEntry::push(&mut self.log, ws.0, user, &profile);
            cache.dirty.insert(
                (ws.0, user.seq.0),
                PendingRow {
                    created_at: user.created_at.0,
                    updated_at: user.updated_at.0,
                    profile,
                },
            );
            return Ok(());
        }
        let mut stmt = self
            .conn
            .prepare_cached(
                "UPDATE OR FAIL users SET external_id = ?3, email = ?4, phone = ?5, created_at = ?6, updated_at = ?7, profile = ?8
                 WHERE workspace_id = ?1 AND seq = ?2 AND deleted_at IS NULL",
            )
            .map_err(sql_err)?;
        let changed = stmt
            .execute(params![
                ws.0,
                user.seq.0,
                user.external_id.as_ref().map(ExternalId::as_str),
                user.email.as_ref().map(Email::as_str),
                user.phone.as_ref().map(Phone::as_str),
                user.created_at.0,
                user.updated_at.0,
                profile,
            ])
            .map_err(sql_err)?;
        if changed != 1 {
            return Err(StoreError::NotFound(format!("user {}", user.braze_id)));
        }
        if let Some(cache) = self.cache.as_deref_mut() {
            // Logged too, so a replay after a crash, which applies each user's last logged
            // state, never puts an older deferred state over this one.
            LogEntry::push(&mut self.log, ws.0, user, &profile);
            cache.dirty.remove(&key);
            // Keep the external-id map exact.
            match row_ids.as_ref().map(|ids| ids.external_id.as_ref()) {
                Some(old) if old == user.external_id.as_ref() => {}
                Some(Some(old)) => cache.unmap_external(ws, old),
                Some(None) => {}
                // Not known what the row held: forget the workspace's map (an optimisation).
                None => {
                    cache.by_external.remove(&ws.0);
                }
            }
            if let Some(ext) = &user.external_id {
                cache.map_external(ws, ext, user.seq.0);
            }
            self.handed.insert(key, RowIdentifiers::of(user));
        }
        Ok(())
    }

    /// One INSERT for a new user, with its external id when it has one.
    fn insert_user(
        &mut self,
        braze_id: BrazeId,
        external_id: Option<&ExternalId>,
        now: Millis,
    ) -> Result<UserRecord, StoreError> {
        let ws = self.workspace.0;
        let seq = match self
            .cache
            .as_deref()
            .and_then(|c| c.next_seq.get(&ws).copied())
        {
            Some(seq) => seq,
            None => {
                let mut next = self
                    .conn
                    .prepare_cached(
                        "SELECT COALESCE(MAX(seq), 0) + 1 FROM users WHERE workspace_id = ?1",
                    )
                    .map_err(sql_err)?;
                next.query_row([ws], |r| r.get(0)).map_err(sql_err)?
            }
        };
        let mut user = UserRecord::new(UserSeq(seq), braze_id, now);
        user.external_id = external_id.cloned();
        self.conn
            .prepare_cached(
                "INSERT OR FAIL INTO users (workspace_id, seq, braze_id, external_id, created_at, updated_at, profile) VALUES (?1, ?2, ?3, ?4, ?5, ?5, '{}')",
            )
            .and_then(|mut s| {
                s.execute(params![
                    ws,
                    seq,
                    user.braze_id.as_str(),
                    external_id.map(ExternalId::as_str),
                    now.0
                ])
            })
            .map_err(sql_err)?;
        if let Some(cache) = self.cache.as_deref_mut() {
            cache.next_seq.insert(ws, seq + 1);
            if let Some(ext) = external_id {
                cache.map_external(self.workspace, ext, seq);
            }
        }
        Ok(self.hand_out(user))
    }

    fn seq_where(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Option<UserSeq>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(sql_err)?;
        stmt.query_row(params, |r| r.get::<_, u32>(0))
            .optional()
            .map(|s| s.map(UserSeq))
            .map_err(sql_err)
    }
}

impl UserTx for SqlUsers<'_> {
    fn create_user(&mut self, braze_id: BrazeId, now: Millis) -> Result<UserRecord, StoreError> {
        self.insert_user(braze_id, None, now)
    }

    fn create_user_with_external_id(
        &mut self,
        braze_id: BrazeId,
        external_id: &ExternalId,
        now: Millis,
    ) -> Result<UserRecord, StoreError> {
        self.insert_user(braze_id, Some(external_id), now)
    }

    fn save_user(&mut self, user: UserRecord) -> Result<(), StoreError> {
        self.write_user(&user)?;
        let ws = self.workspace;
        if let Some(cache) = self.cache.as_deref_mut() {
            cache.keep(ws, user);
        }
        Ok(())
    }

    fn delete_user(&mut self, user: UserSeq, now: Millis) -> Result<(), StoreError> {
        self.leave_all_cohorts(user, now)?;
        let ws = self.workspace;
        if let Some(cache) = self.cache.as_deref_mut() {
            let key = (ws.0, user.0);
            cache.dirty.remove(&key);
            let cached = cache.users.remove(&key).map(|u| u.external_id);
            let handed = self.handed.remove(&key).map(|ids| ids.external_id);
            match cached.or(handed) {
                Some(Some(ext)) => cache.unmap_external(ws, &ext),
                Some(None) => {}
                None => {
                    // The row's external id is not known here: drop the workspace's map rather
                    // than risk a stale entry.
                    cache.by_external.remove(&ws.0);
                }
            }
        }
        let ws = self.workspace.0;
        for sql in [
            "DELETE FROM user_aliases WHERE workspace_id = ?1 AND seq = ?2",
            "DELETE FROM user_devices WHERE workspace_id = ?1 AND seq = ?2",
            "DELETE FROM deprecated_external_ids WHERE workspace_id = ?1 AND seq = ?2",
        ] {
            self.conn
                .prepare_cached(sql)
                .and_then(|mut s| s.execute(params![ws, user.0]))
                .map_err(sql_err)?;
        }
        self.conn
            .prepare_cached(
                "UPDATE users SET external_id = NULL, email = NULL, phone = NULL, profile = '{}', deleted_at = ?3, updated_at = ?3
                 WHERE workspace_id = ?1 AND seq = ?2",
            )
            .and_then(|mut s| s.execute(params![ws, user.0, now.0]))
            .map_err(sql_err)?;
        Ok(())
    }

    fn put_alias(&mut self, user: UserSeq, alias: &UserAlias) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO user_aliases (workspace_id, label, name, seq) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut s| s.execute(params![self.workspace.0, alias.label.as_str(), alias.name.as_str(), user.0]))
            .map_err(sql_err)?;
        Ok(())
    }

    fn remove_alias(&mut self, alias: &UserAlias) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "DELETE FROM user_aliases WHERE workspace_id = ?1 AND label = ?2 AND name = ?3",
            )
            .and_then(|mut s| {
                s.execute(params![
                    self.workspace.0,
                    alias.label.as_str(),
                    alias.name.as_str()
                ])
            })
            .map_err(sql_err)?;
        Ok(())
    }

    fn put_device(&mut self, user: UserSeq, device: &DeviceId) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO user_devices (workspace_id, device_id, seq) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![self.workspace.0, device.as_str(), user.0]))
            .map_err(sql_err)?;
        Ok(())
    }

    fn put_deprecated_external_id(
        &mut self,
        user: UserSeq,
        old: &ExternalId,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO deprecated_external_ids (workspace_id, external_id, seq) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![self.workspace.0, old.as_str(), user.0]))
            .map_err(sql_err)?;
        Ok(())
    }

    fn remove_deprecated_external_id(&mut self, old: &ExternalId) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "DELETE FROM deprecated_external_ids WHERE workspace_id = ?1 AND external_id = ?2",
            )
            .and_then(|mut s| s.execute(params![self.workspace.0, old.as_str()]))
            .map_err(sql_err)?;
        Ok(n > 0)
    }

    fn move_cohort_memberships(
        &mut self,
        from: UserSeq,
        to: UserSeq,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.move_memberships(from, to, now)
    }

    fn record_merge(
        &mut self,
        from: UserSeq,
        into: UserSeq,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO user_merges (workspace_id, from_seq, into_seq, at) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut s| s.execute(params![self.workspace.0, from.0, into.0, now.0]))
            .map_err(sql_err)?;
        Ok(())
    }

    fn append_event(
        &mut self,
        user: Option<UserSeq>,
        event: CurrentsEvent,
    ) -> Result<(), StoreError> {
        self.events.push((user.map(|u| u.0), event));
        if self.events.len() >= EVENT_ROWS_PER_INSERT * 4 {
            self.write_events()?;
        }
        Ok(())
    }
}

/// Events per multi-row `INSERT` into `event_log`.
const EVENT_ROWS_PER_INSERT: usize = 16;

/// `INSERT OR FAIL INTO event_log ... VALUES (?, ?, ?, ?, ?, ?), ...` for `rows` rows.
fn insert_events_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT OR FAIL INTO event_log (workspace_id, user_seq, event_id, event_type, time, body) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push(',');
        }
        sql.push_str("(?, ?, ?, ?, ?, ?)");
    }
    sql
}

/// One post-image in a `user_log` row: `workspace i64, seq u32, created_at i64, updated_at
/// i64, profile length u32, profile bytes`, little-endian, repeated.
pub(super) struct LogEntry {
    pub workspace: i64,
    pub seq: u32,
    pub created_at: i64,
    pub updated_at: i64,
    pub profile: String,
}

impl LogEntry {
    fn push(out: &mut Vec<u8>, workspace: i64, user: &UserRecord, profile: &str) {
        out.extend_from_slice(&workspace.to_le_bytes());
        out.extend_from_slice(&user.seq.0.to_le_bytes());
        out.extend_from_slice(&user.created_at.0.to_le_bytes());
        out.extend_from_slice(&user.updated_at.0.to_le_bytes());
        // A profile is far below 4 GiB (attribute and array limits bound it).
        out.extend_from_slice(&(profile.len() as u32).to_le_bytes());
        out.extend_from_slice(profile.as_bytes());
    }

    /// Every entry of one row, in the order they were saved.
    pub fn decode(mut bytes: &[u8]) -> Result<Vec<LogEntry>, StoreError> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], StoreError> {
            if bytes.len() < n {
                return Err(StoreError::Corrupt("user_log entry is cut short".into()));
            }
            let (head, rest) = bytes.split_at(n);
            *bytes = rest;
            Ok(head)
        }
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let i64_at = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or([0; 4]));
            let workspace = i64_at(take(&mut bytes, 8)?);
            let seq = u32_at(take(&mut bytes, 4)?);
            let created_at = i64_at(take(&mut bytes, 8)?);
            let updated_at = i64_at(take(&mut bytes, 8)?);
            let len = u32_at(take(&mut bytes, 4)?) as usize;
            let profile = std::str::from_utf8(take(&mut bytes, len)?)
                .map_err(|_| StoreError::Corrupt("user_log profile is not UTF-8".into()))?
                .to_owned();
            out.push(LogEntry {
                workspace,
                seq,
                created_at,
                updated_at,
                profile,
            });
        }
        Ok(out)
    }
}

impl SqlUsers<'_> {
    /// Inserts the buffered events, [`EVENT_ROWS_PER_INSERT`] rows per statement (one
    /// statement per row was a tenth of the ingest writer's time), the rest one by one.
    fn write_events(&mut self) -> Result<(), StoreError> {
        const COLUMNS: usize = 6;
        let mut events = std::mem::take(&mut self.events);
        let ws = self.workspace.0;
        let bind = |stmt: &mut rusqlite::CachedStatement<'_>,
                    row: usize,
                    (user, event): &(Option<u32>, CurrentsEvent)|
         -> rusqlite::Result<()> {
            let at = row * COLUMNS;
            stmt.raw_bind_parameter(at + 1, ws)?;
            stmt.raw_bind_parameter(at + 2, *user)?;
            stmt.raw_bind_parameter(at + 3, event.id.0.as_str())?;
            stmt.raw_bind_parameter(at + 4, event.event_type.as_str())?;
            stmt.raw_bind_parameter(at + 5, event.time)?;
            stmt.raw_bind_parameter(at + 6, event.body.as_str())
        };
        let mut chunks = events.chunks_exact(EVENT_ROWS_PER_INSERT);
        if chunks.len() > 0 {
            let mut stmt = self
                .conn
                .prepare_cached(&insert_events_sql(EVENT_ROWS_PER_INSERT))
                .map_err(sql_err)?;
            for chunk in &mut chunks {
                for (row, event) in chunk.iter().enumerate() {
                    bind(&mut stmt, row, event).map_err(sql_err)?;
                }
                stmt.raw_execute().map_err(sql_err)?;
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut stmt = self
                .conn
                .prepare_cached(&insert_events_sql(1))
                .map_err(sql_err)?;
            for event in rest {
                bind(&mut stmt, 0, event).map_err(sql_err)?;
                stmt.raw_execute().map_err(sql_err)?;
            }
        }
        events.clear();
        self.events = events;
        Ok(())
    }

    /// Ends the job: inserts its buffered events and writes the post-images it saved to
    /// `user_log`, one row.
    pub fn finish(&mut self) -> Result<(), StoreError> {
        self.write_events()?;
        let Some(cache) = self.cache.as_deref_mut() else {
            return Ok(());
        };
        if self.log.is_empty() {
            return Ok(());
        }
        let id = cache.next_log_id;
        self.conn
            .prepare_cached("INSERT OR FAIL INTO user_log (id, entries) VALUES (?1, ?2)")
            .and_then(|mut s| s.execute(params![id, self.log]))
            .map_err(sql_err)?;
        cache.next_log_id += 1;
        self.log.clear();
        Ok(())
    }
}
