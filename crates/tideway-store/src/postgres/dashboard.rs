//! [`DashboardStore`] over PostgreSQL: dashboard users, sessions (by token hash) and failed
//! sign-ins, the same rules as `sqlite/dashboard.rs`. The three tables are Citus reference
//! tables: they belong to no workspace and are read before any workspace is known.

use tideway_core::clock::Millis;
use tideway_core::dashboard::{PasswordHash, Role, Username};
use tideway_core::keys::{KeyHash, Secret};
use tideway_core::store::{
    DashboardSession, DashboardStore, DashboardUser, NewSession, StoreError, StoreFuture,
};
use tokio_postgres::Row;

use super::{PgStore, execute, get, pg_err, query, query_one, query_opt};

const USER_COLUMNS: &str = "u.id, u.username, u.role, u.password_hash, u.created_at";

fn user_from_row(row: &Row) -> Result<DashboardUser, StoreError> {
    let username: String = get(row, 1)?;
    let role: String = get(row, 2)?;
    Ok(DashboardUser {
        id: get(row, 0)?,
        username: Username::parse(&username)
            .map_err(|_| StoreError::Corrupt("a dashboard username".into()))?,
        role: Role::parse(&role).map_err(|_| StoreError::Corrupt("a dashboard role".into()))?,
        password_hash: PasswordHash::from_stored(get(row, 3)?),
        created_at: Millis(get(row, 4)?),
    })
}

fn count(row: &Row) -> Result<u32, StoreError> {
    let n: i64 = get(row, 0)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

impl DashboardStore for PgStore {
    fn create_dashboard_user(
        &self,
        username: &Username,
        role: Role,
        password_hash: &PasswordHash,
        now: Millis,
    ) -> StoreFuture<'_, DashboardUser> {
        let (username, hash) = (username.clone(), password_hash.clone());
        Box::pin(async move {
            let client = self.pool.client().await?;
            let inserted = client
                .query_one(
                    "INSERT INTO dashboard_users (username, role, password_hash, created_at)
                     VALUES ($1, $2, $3, $4) RETURNING id",
                    &[&username.as_str(), &role.as_str(), &hash.as_str(), &now.0],
                )
                .await;
            match inserted {
                Ok(row) => Ok(DashboardUser {
                    id: get(&row, 0)?,
                    username,
                    role,
                    password_hash: hash,
                    created_at: now,
                }),
                Err(e) => Err(match pg_err(e) {
                    StoreError::Conflict(_) => {
                        StoreError::Conflict(format!("dashboard user '{username}'"))
                    }
                    other => other,
                }),
            }
        })
    }

    fn dashboard_user(&self, username: &Username) -> StoreFuture<'_, Option<DashboardUser>> {
        let username = username.as_str().to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let sql = format!("SELECT {USER_COLUMNS} FROM dashboard_users u WHERE u.username = $1");
            query_opt(&client, &sql, &[&username])
                .await?
                .as_ref()
                .map(user_from_row)
                .transpose()
        })
    }

    fn list_dashboard_users(&self) -> StoreFuture<'_, Vec<DashboardUser>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let sql = format!("SELECT {USER_COLUMNS} FROM dashboard_users u ORDER BY u.id");
            query(&client, &sql, &[])
                .await?
                .iter()
                .map(user_from_row)
                .collect()
        })
    }

    fn set_dashboard_password(
        &self,
        username: &Username,
        password_hash: &PasswordHash,
    ) -> StoreFuture<'_, bool> {
        let username = username.as_str().to_owned();
        let hash = password_hash.as_str().to_owned();
        Box::pin(async move {
            let mut client = self.pool.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let row = tx
                .query_opt(
                    "UPDATE dashboard_users SET password_hash = $2 WHERE username = $1 RETURNING id",
                    &[&username, &hash],
                )
                .await
                .map_err(pg_err)?;
            let Some(row) = row else {
                return Ok(false);
            };
            let id: i64 = get(&row, 0)?;
            tx.execute("DELETE FROM dashboard_sessions WHERE user_id = $1", &[&id])
                .await
                .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(true)
        })
    }

    fn create_dashboard_session(&self, session: NewSession) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut client = self.pool.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            tx.execute(
                "DELETE FROM dashboard_sessions WHERE expires_at <= $1",
                &[&session.created_at.0],
            )
            .await
            .map_err(pg_err)?;
            tx.execute(
                "INSERT INTO dashboard_sessions (token_hash, user_id, csrf, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &session.token_hash.0.as_slice(),
                    &session.user_id,
                    &session.csrf.expose(),
                    &session.created_at.0,
                    &session.expires_at.0,
                ],
            )
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)
        })
    }

    fn dashboard_session(
        &self,
        token_hash: KeyHash,
        now: Millis,
    ) -> StoreFuture<'_, Option<DashboardSession>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let sql = format!(
                "SELECT {USER_COLUMNS}, s.csrf, s.expires_at FROM dashboard_sessions s
                 JOIN dashboard_users u ON u.id = s.user_id
                 WHERE s.token_hash = $1 AND s.expires_at > $2"
            );
            let Some(row) = query_opt(&client, &sql, &[&token_hash.0.as_slice(), &now.0]).await?
            else {
                return Ok(None);
            };
            Ok(Some(DashboardSession {
                user: user_from_row(&row)?,
                csrf: Secret::new(get(&row, 5)?),
                expires_at: Millis(get(&row, 6)?),
            }))
        })
    }

    fn delete_dashboard_session(&self, token_hash: KeyHash) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            execute(
                &client,
                "DELETE FROM dashboard_sessions WHERE token_hash = $1",
                &[&token_hash.0.as_slice()],
            )
            .await
            .map(|_| ())
        })
    }

    fn record_sign_in_failure(
        &self,
        key: &str,
        now: Millis,
        since: Millis,
    ) -> StoreFuture<'_, u32> {
        let key = key.to_owned();
        Box::pin(async move {
            let mut client = self.pool.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            // One key's records are counted one at a time (on every node), so each attempt
            // sees those before it: READ COMMITTED alone would let concurrent ones miss each
            // other's uncommitted rows.
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('tideway-sign-in:' || $1, 0))",
                &[&key],
            )
            .await
            .map_err(pg_err)?;
            tx.execute(
                "DELETE FROM dashboard_sign_in_failures WHERE key = $1 AND at < $2",
                &[&key, &since.0],
            )
            .await
            .map_err(pg_err)?;
            tx.execute(
                "INSERT INTO dashboard_sign_in_failures (key, at) VALUES ($1, $2)",
                &[&key, &now.0],
            )
            .await
            .map_err(pg_err)?;
            let row = tx
                .query_one(
                    "SELECT COUNT(*) FROM dashboard_sign_in_failures WHERE key = $1 AND at >= $2",
                    &[&key, &since.0],
                )
                .await
                .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            count(&row)
        })
    }

    fn sign_in_failures(&self, key: &str, since: Millis) -> StoreFuture<'_, u32> {
        let key = key.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let row = query_one(
                &client,
                "SELECT COUNT(*) FROM dashboard_sign_in_failures WHERE key = $1 AND at >= $2",
                &[&key, &since.0],
            )
            .await?;
            count(&row)
        })
    }

    fn clear_sign_in_failures(&self, key: &str) -> StoreFuture<'_, ()> {
        let key = key.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            execute(
                &client,
                "DELETE FROM dashboard_sign_in_failures WHERE key = $1",
                &[&key],
            )
            .await
            .map(|_| ())
        })
    }
}
