//! Workspaces, REST API keys and event-log reads over SQLite.

use rusqlite::{Connection, OptionalExtension, Row, params};
use tideway_core::clock::Millis;
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::keys::{ApiKey, IpAllowlist, KeyHash, PermissionSet};
use tideway_core::store::{LoggedEvent, NewApiKey, StoreError, Workspace};

use super::sql_err;

fn workspace_from_row(row: &Row<'_>) -> rusqlite::Result<Workspace> {
    Ok(Workspace {
        id: WorkspaceId(row.get(0)?),
        name: row.get(1)?,
        app_group_id: row.get(2)?,
        created_at: Millis(row.get(3)?),
    })
}

pub fn create_workspace(
    conn: &Connection,
    name: &str,
    now: Millis,
) -> Result<Workspace, StoreError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(StoreError::Conflict("an empty workspace name".into()));
    }
    let app_group_id = uuid::Uuid::new_v4().hyphenated().to_string();
    let inserted = conn.execute(
        "INSERT INTO workspaces (name, app_group_id, created_at) VALUES (?1, ?2, ?3)",
        params![name, app_group_id, now.0],
    );
    match inserted {
        Ok(_) => Ok(Workspace {
            id: WorkspaceId(conn.last_insert_rowid()),
            name: name.to_owned(),
            app_group_id,
            created_at: now,
        }),
        Err(e) => Err(match sql_err(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("workspace '{name}'")),
            other => other,
        }),
    }
}

pub fn workspace_by_name(conn: &Connection, name: &str) -> Result<Option<Workspace>, StoreError> {
    conn.prepare_cached("SELECT id, name, app_group_id, created_at FROM workspaces WHERE name = ?1")
        .and_then(|mut s| s.query_row([name], workspace_from_row).optional())
        .map_err(sql_err)
}

pub fn list_workspaces(conn: &Connection) -> Result<Vec<Workspace>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT id, name, app_group_id, created_at FROM workspaces ORDER BY id")
        .map_err(sql_err)?;
    let rows = stmt.query_map([], workspace_from_row).map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

const KEY_COLUMNS: &str = "k.id, k.workspace_id, k.name, k.prefix, k.hash, k.permissions, k.allow_ips, k.created_at, k.revoked_at";

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<ApiKey> {
    let bad = |i: usize, what: &str| {
        rusqlite::Error::InvalidColumnType(i, what.to_owned(), rusqlite::types::Type::Text)
    };
    let hash: Vec<u8> = row.get(4)?;
    let permissions: String = row.get(5)?;
    let allow: String = row.get(6)?;
    Ok(ApiKey {
        id: row.get(0)?,
        workspace: WorkspaceId(row.get(1)?),
        name: row.get(2)?,
        prefix: row.get(3)?,
        hash: KeyHash(hash.try_into().map_err(|_| bad(4, "hash"))?),
        permissions: PermissionSet::parse_list(&permissions).map_err(|_| bad(5, "permissions"))?,
        allow: IpAllowlist::parse_all(allow.split(',').filter(|s| !s.is_empty()))
            .map_err(|_| bad(6, "allow_ips"))?,
        created_at: row.get(7)?,
        revoked_at: row.get(8)?,
    })
}

pub fn create_api_key(conn: &Connection, key: NewApiKey) -> Result<ApiKey, StoreError> {
    let allow: Vec<String> = key.allow.entries().collect();
    conn.execute(
        "INSERT INTO api_keys (workspace_id, name, prefix, hash, permissions, allow_ips, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![key.workspace.0, key.name, key.prefix, key.hash.0.as_slice(), key.permissions.to_list(), allow.join(","), key.created_at.0],
    )
    .map_err(sql_err)?;
    Ok(ApiKey {
        id: conn.last_insert_rowid(),
        workspace: key.workspace,
        name: key.name,
        prefix: key.prefix,
        hash: key.hash,
        permissions: key.permissions,
        allow: key.allow,
        created_at: key.created_at.0,
        revoked_at: None,
    })
}

pub fn list_api_keys(conn: &Connection, workspace: WorkspaceId) -> Result<Vec<ApiKey>, StoreError> {
    let sql =
        format!("SELECT {KEY_COLUMNS} FROM api_keys k WHERE k.workspace_id = ?1 ORDER BY k.id");
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let rows = stmt
        .query_map([workspace.0], key_from_row)
        .map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

pub fn revoke_api_key(
    conn: &Connection,
    workspace: WorkspaceId,
    id_or_prefix: &str,
    now: Millis,
) -> Result<bool, StoreError> {
    let by_id: Option<i64> = id_or_prefix.parse().ok();
    let matches = "workspace_id = ?1 AND revoked_at IS NULL AND (id = ?2 OR prefix = ?3)";
    let count: i64 = conn
        .query_row(
            &format!("SELECT COUNT(*) FROM api_keys WHERE {matches}"),
            params![workspace.0, by_id, id_or_prefix],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    if count > 1 {
        return Err(StoreError::Conflict(format!(
            "more than one key with prefix '{id_or_prefix}' (name the key by its id)"
        )));
    }
    let n = conn
        .execute(
            &format!("UPDATE api_keys SET revoked_at = ?4 WHERE {matches}"),
            params![workspace.0, by_id, id_or_prefix, now.0],
        )
        .map_err(sql_err)?;
    Ok(n > 0)
}

pub fn find_api_key(
    conn: &Connection,
    hash: KeyHash,
) -> Result<Option<(ApiKey, Workspace)>, StoreError> {
    let sql = format!(
        "SELECT {KEY_COLUMNS}, w.id, w.name, w.app_group_id, w.created_at FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id
         WHERE k.hash = ?1 AND k.revoked_at IS NULL"
    );
    let found = conn
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_row([hash.0.as_slice()], |row| {
                let key = key_from_row(row)?;
                let ws = Workspace {
                    id: WorkspaceId(row.get(9)?),
                    name: row.get(10)?,
                    app_group_id: row.get(11)?,
                    created_at: Millis(row.get(12)?),
                };
                Ok((key, ws))
            })
            .optional()
        })
        .map_err(sql_err)?;
    // The lookup went by hash; compare once more in constant time so this path never depends
    // on how SQLite compares blobs.
    Ok(found.filter(|(key, _)| key.hash.matches(&hash)))
}

pub fn read_events(
    conn: &Connection,
    workspace: WorkspaceId,
    after: i64,
    limit: usize,
) -> Result<Vec<LoggedEvent>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, user_seq, event_id, event_type, time, body FROM event_log WHERE workspace_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .map_err(sql_err)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt
        .query_map(params![workspace.0, after, limit], |row| {
            let event_type: String = row.get(3)?;
            let body: String = row.get(5)?;
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Option<u32>>(1)?,
                row.get::<_, String>(2)?,
                event_type,
                row.get::<_, i64>(4)?,
                body,
            ))
        })
        .map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, user, id, event_type, time, body) = row.map_err(sql_err)?;
        out.push(crate::codec::logged_event(
            seq,
            workspace,
            user.map(UserSeq),
            id,
            &event_type,
            time,
            body,
        )?);
    }
    Ok(out)
}
