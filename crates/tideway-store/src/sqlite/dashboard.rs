//! [`DashboardStore`] over SQLite: dashboard users, sessions (by token hash) and failed
//! sign-ins. Writes go through the group-commit writer like every other write; reads use the
//! reader pool.

use rusqlite::{Connection, OptionalExtension, Row, params};
use tideway_core::clock::Millis;
use tideway_core::dashboard::{PasswordHash, Role, Username};
use tideway_core::keys::{KeyHash, Secret};
use tideway_core::store::{
    DashboardSession, DashboardStore, DashboardUser, NewSession, StoreError, StoreFuture,
};

use super::{SqliteStore, sql_err};

const USER_COLUMNS: &str = "u.id, u.username, u.role, u.password_hash, u.created_at";

fn corrupt(what: &str) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(0, what.to_owned(), rusqlite::types::Type::Text)
}

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<DashboardUser> {
    let username: String = row.get(1)?;
    let role: String = row.get(2)?;
    Ok(DashboardUser {
        id: row.get(0)?,
        username: Username::parse(&username).map_err(|_| corrupt("dashboard username"))?,
        role: Role::parse(&role).map_err(|_| corrupt("dashboard role"))?,
        password_hash: PasswordHash::from_stored(row.get(3)?),
        created_at: Millis(row.get(4)?),
    })
}

fn count(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn create_user(
    conn: &Connection,
    username: &Username,
    role: Role,
    hash: &PasswordHash,
    now: Millis,
) -> Result<DashboardUser, StoreError> {
    let inserted = conn.execute(
        "INSERT INTO dashboard_users (username, role, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![username.as_str(), role.as_str(), hash.as_str(), now.0],
    );
    match inserted {
        Ok(_) => Ok(DashboardUser {
            id: conn.last_insert_rowid(),
            username: username.clone(),
            role,
            password_hash: hash.clone(),
            created_at: now,
        }),
        Err(e) => Err(match sql_err(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("dashboard user '{username}'")),
            other => other,
        }),
    }
}

fn find_user(conn: &Connection, username: &str) -> Result<Option<DashboardUser>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {USER_COLUMNS} FROM dashboard_users u WHERE u.username = ?1"
    ))
    .and_then(|mut s| s.query_row([username], user_from_row).optional())
    .map_err(sql_err)
}

fn list_users(conn: &Connection) -> Result<Vec<DashboardUser>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {USER_COLUMNS} FROM dashboard_users u ORDER BY u.id"
        ))
        .map_err(sql_err)?;
    let rows = stmt.query_map([], user_from_row).map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

fn set_password(conn: &Connection, username: &str, hash: &str) -> Result<bool, StoreError> {
    let changed = conn
        .execute(
            "UPDATE dashboard_users SET password_hash = ?2 WHERE username = ?1",
            params![username, hash],
        )
        .map_err(sql_err)?;
    if changed == 0 {
        return Ok(false);
    }
    conn.execute(
        "DELETE FROM dashboard_sessions WHERE user_id = (SELECT id FROM dashboard_users WHERE username = ?1)",
        [username],
    )
    .map_err(sql_err)?;
    Ok(true)
}

fn create_session(conn: &Connection, s: &NewSession) -> Result<(), StoreError> {
    conn.execute(
        "DELETE FROM dashboard_sessions WHERE expires_at <= ?1",
        [s.created_at.0],
    )
    .map_err(sql_err)?;
    conn.execute(
        "INSERT INTO dashboard_sessions (token_hash, user_id, csrf, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![s.token_hash.0.as_slice(), s.user_id, s.csrf.expose(), s.created_at.0, s.expires_at.0],
    )
    .map_err(sql_err)?;
    Ok(())
}

fn find_session(
    conn: &Connection,
    token_hash: KeyHash,
    now: Millis,
) -> Result<Option<DashboardSession>, StoreError> {
    let sql = format!(
        "SELECT {USER_COLUMNS}, s.csrf, s.expires_at FROM dashboard_sessions s
         JOIN dashboard_users u ON u.id = s.user_id
         WHERE s.token_hash = ?1 AND s.expires_at > ?2"
    );
    conn.prepare_cached(&sql)
        .and_then(|mut stmt| {
            stmt.query_row(params![token_hash.0.as_slice(), now.0], |row| {
                Ok(DashboardSession {
                    user: user_from_row(row)?,
                    csrf: Secret::new(row.get(5)?),
                    expires_at: Millis(row.get(6)?),
                })
            })
            .optional()
        })
        .map_err(sql_err)
}

fn record_failure(
    conn: &Connection,
    key: &str,
    now: Millis,
    since: Millis,
) -> Result<u32, StoreError> {
    conn.execute(
        "DELETE FROM dashboard_sign_in_failures WHERE key = ?1 AND at < ?2",
        params![key, since.0],
    )
    .map_err(sql_err)?;
    conn.execute(
        "INSERT INTO dashboard_sign_in_failures (key, at) VALUES (?1, ?2)",
        params![key, now.0],
    )
    .map_err(sql_err)?;
    failures(conn, key, since)
}

fn failures(conn: &Connection, key: &str, since: Millis) -> Result<u32, StoreError> {
    conn.query_row(
        "SELECT COUNT(*) FROM dashboard_sign_in_failures WHERE key = ?1 AND at >= ?2",
        params![key, since.0],
        |r| r.get::<_, i64>(0),
    )
    .map(count)
    .map_err(sql_err)
}

impl DashboardStore for SqliteStore {
    fn create_dashboard_user(
        &self,
        username: &Username,
        role: Role,
        password_hash: &PasswordHash,
        now: Millis,
    ) -> StoreFuture<'_, DashboardUser> {
        let (username, hash) = (username.clone(), password_hash.clone());
        self.write(move |conn, _, _| create_user(conn, &username, role, &hash, now))
    }

    fn dashboard_user(&self, username: &Username) -> StoreFuture<'_, Option<DashboardUser>> {
        let username = username.as_str().to_owned();
        self.read(move |conn| find_user(conn, &username))
    }

    fn list_dashboard_users(&self) -> StoreFuture<'_, Vec<DashboardUser>> {
        self.read(list_users)
    }

    fn set_dashboard_password(
        &self,
        username: &Username,
        password_hash: &PasswordHash,
    ) -> StoreFuture<'_, bool> {
        let username = username.as_str().to_owned();
        let hash = password_hash.as_str().to_owned();
        self.write(move |conn, _, _| set_password(conn, &username, &hash))
    }

    fn create_dashboard_session(&self, session: NewSession) -> StoreFuture<'_, ()> {
        self.write(move |conn, _, _| create_session(conn, &session))
    }

    fn dashboard_session(
        &self,
        token_hash: KeyHash,
        now: Millis,
    ) -> StoreFuture<'_, Option<DashboardSession>> {
        self.read(move |conn| find_session(conn, token_hash, now))
    }

    fn delete_dashboard_session(&self, token_hash: KeyHash) -> StoreFuture<'_, ()> {
        self.write(move |conn, _, _| {
            conn.execute(
                "DELETE FROM dashboard_sessions WHERE token_hash = ?1",
                [token_hash.0.as_slice()],
            )
            .map(|_| ())
            .map_err(sql_err)
        })
    }

    fn record_sign_in_failure(
        &self,
        key: &str,
        now: Millis,
        since: Millis,
    ) -> StoreFuture<'_, u32> {
        let key = key.to_owned();
        self.write(move |conn, _, _| record_failure(conn, &key, now, since))
    }

    fn sign_in_failures(&self, key: &str, since: Millis) -> StoreFuture<'_, u32> {
        let key = key.to_owned();
        self.read(move |conn| failures(conn, &key, since))
    }

    fn clear_sign_in_failures(&self, key: &str) -> StoreFuture<'_, ()> {
        let key = key.to_owned();
        self.write(move |conn, _, _| {
            conn.execute(
                "DELETE FROM dashboard_sign_in_failures WHERE key = ?1",
                [&key],
            )
            .map(|_| ())
            .map_err(sql_err)
        })
    }
}
