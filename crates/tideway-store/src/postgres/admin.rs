//! [`AdminStore`] over PostgreSQL: workspaces, REST API keys, partner API keys, data import keys,
//! partners enabled per workspace and Heap webhook settings.
//!
//! The same rules as SQLite's (`sqlite/admin.rs` and the credential half of
//! `sqlite/cohorts.rs`), one statement or one short transaction per call, and no cache: every
//! node reads the shared tables, so a key revoked or a partner disabled through one node is
//! refused by all of them from the next request on. The lookups every request makes (REST key,
//! data import key, partner key, webhook secrets) use statements prepared once per connection.
//! The tables are Citus reference tables (found by hash or secret before the workspace is
//! known), except `workspace_partners`, which is distributed and always addressed by its
//! workspace.
//!
//! A workspace's `workspace_sequences` rows are not created here: `sequence::allocate` creates
//! each on its first use with `INSERT … ON CONFLICT DO UPDATE`, which two first writers at once
//! also serialise correctly (the second waits for the first's commit, then takes the update
//! path), and a reader of an unused counter gets 0. Rows made up front would change nothing.

use tideway_core::clock::Millis;
use tideway_core::ids::{AliasLabel, WorkspaceId};
use tideway_core::keys::{ApiKey, IpAllowlist, KeyHash, PermissionSet, Secret};
use tideway_core::store::{
    AdminStore, HeapWebhook, ImportKeyInfo, ImportKeyOwner, NewApiKey, StoreError, StoreFuture,
    Workspace,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, Row};

use super::{PgStore, pg_err};

/// How many leading characters of a data import key are kept as its visible prefix (SQLite's).
const IMPORT_KEY_PREFIX_CHARS: usize = 8;

const WORKSPACE_COLUMNS: &str = "w.id, w.name, w.app_group_id, w.created_at";

/// A workspace from four columns starting at `at` (`WORKSPACE_COLUMNS`).
fn workspace_at(row: &Row, at: usize) -> Result<Workspace, StoreError> {
    Ok(Workspace {
        id: WorkspaceId(row.try_get(at).map_err(pg_err)?),
        name: row.try_get(at + 1).map_err(pg_err)?,
        app_group_id: row.try_get(at + 2).map_err(pg_err)?,
        created_at: Millis(row.try_get(at + 3).map_err(pg_err)?),
    })
}

/// Maps a failed write that names a workspace: a foreign-key violation means the workspace does
/// not exist (SQLite, without enforced foreign keys, would store a dangling row instead).
pub(super) fn workspace_write_err(workspace: WorkspaceId, e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
        return StoreError::NotFound(format!("workspace {}", workspace.0));
    }
    pg_err(e)
}

fn hash_from(bytes: Vec<u8>, what: &str) -> Result<KeyHash, StoreError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what}: a key hash is not 32 bytes")))?;
    Ok(KeyHash(bytes))
}

const KEY_COLUMNS: &str = "k.id, k.workspace_id, k.name, k.prefix, k.hash, k.permissions, k.allow_ips, k.created_at, k.revoked_at";

/// The REST API key in the first nine columns (`KEY_COLUMNS`).
fn key_from_row(row: &Row) -> Result<ApiKey, StoreError> {
    let permissions: String = row.try_get(5).map_err(pg_err)?;
    let allow: String = row.try_get(6).map_err(pg_err)?;
    Ok(ApiKey {
        id: row.try_get(0).map_err(pg_err)?,
        workspace: WorkspaceId(row.try_get(1).map_err(pg_err)?),
        name: row.try_get(2).map_err(pg_err)?,
        prefix: row.try_get(3).map_err(pg_err)?,
        hash: hash_from(row.try_get(4).map_err(pg_err)?, "api_keys.hash")?,
        permissions: PermissionSet::parse_list(&permissions)
            .map_err(|_| StoreError::Corrupt(format!("api_keys.permissions {permissions:?}")))?,
        // Stored comma-joined, as SQLite stores it; an empty list allows every address.
        allow: IpAllowlist::parse_all(allow.split(',').filter(|s| !s.is_empty()))
            .map_err(|_| StoreError::Corrupt(format!("api_keys.allow_ips {allow:?}")))?,
        created_at: row.try_get(7).map_err(pg_err)?,
        revoked_at: row.try_get(8).map_err(pg_err)?,
    })
}

fn import_key_from_row(row: &Row) -> Result<ImportKeyInfo, StoreError> {
    Ok(ImportKeyInfo {
        id: row.try_get(0).map_err(pg_err)?,
        workspace: WorkspaceId(row.try_get(1).map_err(pg_err)?),
        partner: row.try_get(2).map_err(pg_err)?,
        prefix: row.try_get(3).map_err(pg_err)?,
        created_at: Millis(row.try_get(4).map_err(pg_err)?),
        invalidated_at: row
            .try_get::<_, Option<i64>>(5)
            .map_err(pg_err)?
            .map(Millis),
        last_used_at: row
            .try_get::<_, Option<i64>>(6)
            .map_err(pg_err)?
            .map(Millis),
    })
}

const WEBHOOK_SELECT: &str =
    "SELECT w.id, w.name, w.app_group_id, w.created_at, h.secret, h.alias_label
     FROM heap_webhooks h JOIN workspaces w ON w.id = h.workspace_id";

fn webhook_from_row(row: &Row) -> Result<HeapWebhook, StoreError> {
    let label: Option<String> = row.try_get(5).map_err(pg_err)?;
    Ok(HeapWebhook {
        workspace: workspace_at(row, 0)?,
        secret: Secret::new(row.try_get(4).map_err(pg_err)?),
        // As SQLite reads it: a label that no longer parses maps ids as external ids.
        alias_label: label.and_then(|l| AliasLabel::parse(&l).ok()),
    })
}

/// What a "revoke / invalidate by id or prefix" found before changing anything.
enum Match {
    None,
    One(i64),
    Several,
}

/// Locks the live rows of `table` that `id_or_prefix` names (`matches`: `$1` id, `$2` prefix,
/// then `extra` parameters), so a concurrent revocation of the same key waits, and says how
/// many there were: a prefix shared by several keys names none of them.
async fn lock_matching(
    tx: &tokio_postgres::Transaction<'_>,
    table: &str,
    matches: &str,
    id_or_prefix: &str,
    extra: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Match, StoreError> {
    let by_id: Option<i64> = id_or_prefix.parse().ok();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&by_id, &id_or_prefix];
    params.extend_from_slice(extra);
    let rows = tx
        .query(
            &format!("SELECT id FROM {table} WHERE {matches} FOR UPDATE"),
            &params,
        )
        .await
        .map_err(pg_err)?;
    Ok(match rows.as_slice() {
        [] => Match::None,
        [row] => Match::One(row.try_get(0).map_err(pg_err)?),
        _ => Match::Several,
    })
}

fn ambiguous_prefix(id_or_prefix: &str) -> StoreError {
    StoreError::Conflict(format!(
        "more than one key with prefix '{id_or_prefix}' (name the key by its id)"
    ))
}

impl AdminStore for PgStore {
    fn create_workspace(&self, name: &str, now: Millis) -> StoreFuture<'_, Workspace> {
        let name = name.trim().to_owned();
        Box::pin(async move {
            if name.is_empty() {
                return Err(StoreError::Conflict("an empty workspace name".into()));
            }
            let app_group_id = uuid::Uuid::new_v4().hyphenated().to_string();
            let client = self.pool.client().await?;
            let inserted = client
                .query_one(
                    "INSERT INTO workspaces (name, app_group_id, created_at) VALUES ($1, $2, $3)
                     RETURNING id",
                    &[&name, &app_group_id, &now.0],
                )
                .await;
            match inserted {
                Ok(row) => Ok(Workspace {
                    id: WorkspaceId(row.try_get(0).map_err(pg_err)?),
                    name,
                    app_group_id,
                    created_at: now,
                }),
                Err(e) => Err(match pg_err(e) {
                    StoreError::Conflict(_) => StoreError::Conflict(format!("workspace '{name}'")),
                    other => other,
                }),
            }
        })
    }

    fn accepts_writes(&self) -> StoreFuture<'_, bool> {
        Box::pin(self.pool.accepts_writes())
    }

    fn workspace_by_name(&self, name: &str) -> StoreFuture<'_, Option<Workspace>> {
        let name = name.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let row = client
                .query_opt(
                    &format!("SELECT {WORKSPACE_COLUMNS} FROM workspaces w WHERE w.name = $1"),
                    &[&name],
                )
                .await
                .map_err(pg_err)?;
            row.map(|row| workspace_at(&row, 0)).transpose()
        })
    }

    fn list_workspaces(&self) -> StoreFuture<'_, Vec<Workspace>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let rows = client
                .query(
                    &format!("SELECT {WORKSPACE_COLUMNS} FROM workspaces w ORDER BY w.id"),
                    &[],
                )
                .await
                .map_err(pg_err)?;
            rows.iter().map(|row| workspace_at(row, 0)).collect()
        })
    }

    fn create_api_key(&self, key: NewApiKey) -> StoreFuture<'_, ApiKey> {
        Box::pin(async move {
            let allow = key.allow.entries().collect::<Vec<_>>().join(",");
            let client = self.pool.client().await?;
            let row = client
                .query_one(
                    "INSERT INTO api_keys (workspace_id, name, prefix, hash, permissions, allow_ips, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    &[
                        &key.workspace.0,
                        &key.name,
                        &key.prefix,
                        &key.hash.0.as_slice(),
                        &key.permissions.to_list(),
                        &allow,
                        &key.created_at.0,
                    ],
                )
                .await
                .map_err(|e| workspace_write_err(key.workspace, e))?;
            Ok(ApiKey {
                id: row.try_get(0).map_err(pg_err)?,
                workspace: key.workspace,
                name: key.name,
                prefix: key.prefix,
                hash: key.hash,
                permissions: key.permissions,
                allow: key.allow,
                created_at: key.created_at.0,
                revoked_at: None,
            })
        })
    }

    fn list_api_keys(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<ApiKey>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.workspace_id = $1 ORDER BY k.id"
                    ),
                    &[&workspace.0],
                )
                .await
                .map_err(pg_err)?;
            rows.iter().map(key_from_row).collect()
        })
    }

    fn revoke_api_key(
        &self,
        workspace: WorkspaceId,
        id_or_prefix: &str,
        now: Millis,
    ) -> StoreFuture<'_, bool> {
        let id_or_prefix = id_or_prefix.to_owned();
        Box::pin(async move {
            let mut client = self.pool.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let found = lock_matching(
                &tx,
                "api_keys",
                "workspace_id = $3 AND revoked_at IS NULL AND (id = $1 OR prefix = $2)",
                &id_or_prefix,
                &[&workspace.0],
            )
            .await?;
            let id = match found {
                Match::None => return Ok(false),
                Match::Several => return Err(ambiguous_prefix(&id_or_prefix)),
                Match::One(id) => id,
            };
            tx.execute(
                "UPDATE api_keys SET revoked_at = $2 WHERE id = $1",
                &[&id, &now.0],
            )
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(true)
        })
    }

    fn find_api_key(&self, hash: KeyHash) -> StoreFuture<'_, Option<(ApiKey, Workspace)>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            // Every REST request asks: the statement is prepared once per connection.
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {KEY_COLUMNS}, {WORKSPACE_COLUMNS}
                     FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id
                     WHERE k.hash = $1 AND k.revoked_at IS NULL"
                ))
                .await
                .map_err(pg_err)?;
            let row = client
                .query_opt(&statement, &[&hash.0.as_slice()])
                .await
                .map_err(pg_err)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let key = key_from_row(&row)?;
            let workspace = workspace_at(&row, 9)?;
            // The lookup went by hash; compare once more in constant time so this path never
            // depends on how the database compares bytes.
            Ok(key.hash.matches(&hash).then_some((key, workspace)))
        })
    }

    fn partner_api_key(
        &self,
        partner: &str,
        fresh: Secret,
        now: Millis,
    ) -> StoreFuture<'_, Secret> {
        let partner = partner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            // Two statements, not one: a statement's snapshot would miss a key another node
            // committed between it starting and our insert finding the conflict.
            client
                .execute(
                    "INSERT INTO partner_api_keys (partner, secret, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT (partner) DO NOTHING",
                    &[&partner, &fresh.expose(), &now.0],
                )
                .await
                .map_err(pg_err)?;
            let secret: String = client
                .query_one(
                    "SELECT secret FROM partner_api_keys WHERE partner = $1",
                    &[&partner],
                )
                .await
                .map_err(pg_err)?
                .try_get(0)
                .map_err(pg_err)?;
            Ok(Secret::new(secret))
        })
    }

    fn check_partner_api_key(&self, partner: &str, key: Secret) -> StoreFuture<'_, bool> {
        let partner = partner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let statement = client
                .prepare_cached("SELECT secret FROM partner_api_keys WHERE partner = $1")
                .await
                .map_err(pg_err)?;
            let stored: Option<String> = client
                .query_opt(&statement, &[&partner])
                .await
                .map_err(pg_err)?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(pg_err)?;
            // Compare hashes in constant time: equal hashes ⇔ equal secrets.
            Ok(stored.is_some_and(|s| Secret::new(s).hash().matches(&key.hash())))
        })
    }

    fn create_import_key(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        secret: &Secret,
        now: Millis,
    ) -> StoreFuture<'_, ImportKeyInfo> {
        let partner = partner.to_owned();
        let prefix: String = secret
            .expose()
            .chars()
            .take(IMPORT_KEY_PREFIX_CHARS)
            .collect();
        let hash = secret.hash();
        Box::pin(async move {
            let mut client = self.pool.client().await?;
            // The key and the partner's enabling commit together: a key that works for a
            // disabled partner, or an enabled partner without the key, is never seen.
            let tx = client.transaction().await.map_err(pg_err)?;
            let id: i64 = tx
                .query_one(
                    "INSERT INTO import_keys (workspace_id, partner, prefix, hash, created_at)
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    &[&workspace.0, &partner, &prefix, &hash.0.as_slice(), &now.0],
                )
                .await
                .map_err(|e| workspace_write_err(workspace, e))?
                .try_get(0)
                .map_err(pg_err)?;
            enable_partner(&*tx, workspace, &partner, true).await?;
            tx.commit().await.map_err(pg_err)?;
            Ok(ImportKeyInfo {
                id,
                workspace,
                partner,
                prefix,
                created_at: now,
                invalidated_at: None,
                last_used_at: None,
            })
        })
    }

    fn list_import_keys(
        &self,
        workspace: WorkspaceId,
        partner: &str,
    ) -> StoreFuture<'_, Vec<ImportKeyInfo>> {
        let partner = partner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let rows = client
                .query(
                    "SELECT id, workspace_id, partner, prefix, created_at, invalidated_at, last_used_at
                     FROM import_keys WHERE workspace_id = $1 AND partner = $2 ORDER BY id",
                    &[&workspace.0, &partner],
                )
                .await
                .map_err(pg_err)?;
            rows.iter().map(import_key_from_row).collect()
        })
    }

    fn invalidate_import_key(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        id_or_prefix: &str,
        now: Millis,
    ) -> StoreFuture<'_, bool> {
        let (partner, id_or_prefix) = (partner.to_owned(), id_or_prefix.to_owned());
        Box::pin(async move {
            let mut client = self.pool.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            let found = lock_matching(
                &tx,
                "import_keys",
                "workspace_id = $3 AND partner = $4 AND invalidated_at IS NULL AND (id = $1 OR prefix = $2)",
                &id_or_prefix,
                &[&workspace.0, &partner],
            )
            .await?;
            let id = match found {
                Match::None => return Ok(false),
                Match::Several => return Err(ambiguous_prefix(&id_or_prefix)),
                Match::One(id) => id,
            };
            tx.execute(
                "UPDATE import_keys SET invalidated_at = $2 WHERE id = $1",
                &[&id, &now.0],
            )
            .await
            .map_err(pg_err)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(true)
        })
    }

    fn set_partner_enabled(
        &self,
        workspace: WorkspaceId,
        partner: &str,
        enabled: bool,
    ) -> StoreFuture<'_, ()> {
        let partner = partner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            enable_partner(&**client, workspace, &partner, enabled).await
        })
    }

    fn touch_import_key(&self, partner: &str, hash: KeyHash, now: Millis) -> StoreFuture<'_, ()> {
        let partner = partner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            client
                .execute(
                    "UPDATE import_keys SET last_used_at = $3::bigint WHERE partner = $1 AND hash = $2
                     AND (last_used_at IS NULL OR last_used_at <= $3::bigint - 60000)",
                    &[&partner, &hash.0.as_slice(), &now.0],
                )
                .await
                .map_err(pg_err)?;
            Ok(())
        })
    }

    fn partner_enabled(&self, workspace: WorkspaceId, partner: &str) -> StoreFuture<'_, bool> {
        let partner = partner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let row = client
                .query_opt(
                    "SELECT enabled FROM workspace_partners WHERE workspace_id = $1 AND partner = $2",
                    &[&workspace.0, &partner],
                )
                .await
                .map_err(pg_err)?;
            match row {
                Some(row) => row.try_get::<_, bool>(0).map_err(pg_err),
                None => Ok(false),
            }
        })
    }

    fn find_import_key(
        &self,
        partner: &str,
        hash: KeyHash,
    ) -> StoreFuture<'_, Option<ImportKeyOwner>> {
        let partner = partner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            // A partner never enabled or disabled in the workspace has no row or `false`:
            // import is refused either way.
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {WORKSPACE_COLUMNS}, k.hash, COALESCE(p.enabled, false)
                     FROM import_keys k JOIN workspaces w ON w.id = k.workspace_id
                     LEFT JOIN workspace_partners p
                         ON p.workspace_id = k.workspace_id AND p.partner = k.partner
                     WHERE k.hash = $1 AND k.partner = $2 AND k.invalidated_at IS NULL"
                ))
                .await
                .map_err(pg_err)?;
            let row = client
                .query_opt(&statement, &[&hash.0.as_slice(), &partner])
                .await
                .map_err(pg_err)?;
            let Some(row) = row else {
                return Ok(None);
            };
            let stored = hash_from(row.try_get(4).map_err(pg_err)?, "import_keys.hash")?;
            let owner = ImportKeyOwner {
                workspace: workspace_at(&row, 0)?,
                partner_enabled: row.try_get(5).map_err(pg_err)?,
            };
            // Constant-time, as for REST keys.
            Ok(stored.matches(&hash).then_some(owner))
        })
    }

    fn heap_webhook(
        &self,
        workspace: WorkspaceId,
        fresh: Secret,
        alias_label: Option<Option<AliasLabel>>,
    ) -> StoreFuture<'_, HeapWebhook> {
        Box::pin(async move {
            let mut client = self.pool.client().await?;
            let tx = client.transaction().await.map_err(pg_err)?;
            tx.execute(
                "INSERT INTO heap_webhooks (workspace_id, secret) VALUES ($1, $2)
                 ON CONFLICT (workspace_id) DO NOTHING",
                &[&workspace.0, &fresh.expose()],
            )
            .await
            .map_err(|e| workspace_write_err(workspace, e))?;
            // A webhook secret enables Heap, as a data import key does; a disable stays.
            tx.execute(
                "INSERT INTO workspace_partners (workspace_id, partner, enabled)
                 VALUES ($1, 'heap', true) ON CONFLICT (workspace_id, partner) DO NOTHING",
                &[&workspace.0],
            )
            .await
            .map_err(pg_err)?;
            if let Some(label) = &alias_label {
                tx.execute(
                    "UPDATE heap_webhooks SET alias_label = $2 WHERE workspace_id = $1",
                    &[&workspace.0, &label.as_ref().map(AliasLabel::as_str)],
                )
                .await
                .map_err(pg_err)?;
            }
            let row = tx
                .query_one(
                    &format!("{WEBHOOK_SELECT} WHERE h.workspace_id = $1"),
                    &[&workspace.0],
                )
                .await
                .map_err(pg_err)?;
            let webhook = webhook_from_row(&row)?;
            tx.commit().await.map_err(pg_err)?;
            Ok(webhook)
        })
    }

    fn heap_webhooks(&self) -> StoreFuture<'_, Vec<HeapWebhook>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let statement = client
                .prepare_cached(&format!("{WEBHOOK_SELECT} ORDER BY w.id"))
                .await
                .map_err(pg_err)?;
            let rows = client.query(&statement, &[]).await.map_err(pg_err)?;
            rows.iter().map(webhook_from_row).collect()
        })
    }
}

/// Enables or disables `partner` in `workspace` (inside the caller's transaction, if any).
async fn enable_partner(
    tx: &impl GenericClient,
    workspace: WorkspaceId,
    partner: &str,
    enabled: bool,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO workspace_partners (workspace_id, partner, enabled) VALUES ($1, $2, $3)
         ON CONFLICT (workspace_id, partner) DO UPDATE SET enabled = EXCLUDED.enabled",
        &[&workspace.0, &partner, &enabled],
    )
    .await
    .map_err(|e| workspace_write_err(workspace, e))?;
    Ok(())
}
