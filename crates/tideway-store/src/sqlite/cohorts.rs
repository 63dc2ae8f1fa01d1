//! Partner cohorts over SQLite: partner credentials, data import keys, the Heap webhook
//! settings, cohorts and their membership (current members plus an append-only change log).

use rusqlite::{Connection, OptionalExtension, params};
use tideway_core::clock::Millis;
use tideway_core::cohorts::{CohortId, CohortKey, CohortTx};
use tideway_core::ids::{AliasLabel, BrazeId, ExternalId, UserSeq, WorkspaceId};
use tideway_core::keys::{KeyHash, Secret};
use tideway_core::store::{
    CohortMember, CohortSummary, HeapWebhook, ImportKeyInfo, ImportKeyOwner, StoreError,
    UserCohort, Workspace,
};

use super::sql_err;
use super::users::SqlUsers;

impl CohortTx for SqlUsers<'_> {
    fn mark_sync_page(&mut self, task: &str, page: i64, now: Millis) -> Result<bool, StoreError> {
        let inserted = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO heap_sync_pages (workspace_id, sync_task_id, page_number, applied_at) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut s| s.execute(params![self.workspace.0, task, page, now.0]))
            .map_err(sql_err)?;
        Ok(inserted == 1)
    }

    fn upsert_cohort(
        &mut self,
        partner: &str,
        cohort_id: &CohortId,
        name: Option<&str>,
        created_at: Millis,
        now: Millis,
    ) -> Result<CohortKey, StoreError> {
        let existing: Option<(i64, String)> = self
            .conn
            .prepare_cached("SELECT id, name FROM cohorts WHERE workspace_id = ?1 AND partner = ?2 AND cohort_id = ?3")
            .and_then(|mut s| s.query_row(params![self.workspace.0, partner, cohort_id.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(sql_err)?;
        match existing {
            Some((id, old)) => {
                if let Some(name) = name.filter(|n| *n != old) {
                    self.conn
                        .prepare_cached(
                            "UPDATE cohorts SET name = ?2, updated_at = ?3 WHERE id = ?1",
                        )
                        .and_then(|mut s| s.execute(params![id, name, now.0]))
                        .map_err(sql_err)?;
                }
                Ok(CohortKey(id))
            }
            None => {
                self.conn
                    .prepare_cached(
                        "INSERT INTO cohorts (workspace_id, partner, cohort_id, name, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .and_then(|mut s| s.execute(params![self.workspace.0, partner, cohort_id.as_str(), name.unwrap_or(cohort_id.as_str()), created_at.0, now.0]))
                    .map_err(sql_err)?;
                Ok(CohortKey(self.conn.last_insert_rowid()))
            }
        }
    }

    fn set_member(
        &mut self,
        cohort: CohortKey,
        user: UserSeq,
        member: bool,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let changed = if member {
            self.conn
                .prepare_cached("INSERT OR IGNORE INTO cohort_members (cohort, seq, entered_at) VALUES (?1, ?2, ?3)")
                .and_then(|mut s| s.execute(params![cohort.0, user.0, now.0]))
        } else {
            self.conn
                .prepare_cached("DELETE FROM cohort_members WHERE cohort = ?1 AND seq = ?2")
                .and_then(|mut s| s.execute(params![cohort.0, user.0]))
        }
        .map_err(sql_err)?;
        if changed == 0 {
            return Ok(false);
        }
        self.conn
            .prepare_cached("INSERT INTO cohort_membership_changes (workspace_id, cohort, seq, entered, at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .and_then(|mut s| s.execute(params![self.workspace.0, cohort.0, user.0, member, now.0]))
            .map_err(sql_err)?;
        Ok(true)
    }

    fn adjust_member_count(
        &mut self,
        cohort: CohortKey,
        delta: i64,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("UPDATE cohorts SET member_count = member_count + ?2, updated_at = ?3 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![cohort.0, delta, now.0]))
            .map_err(sql_err)?;
        Ok(())
    }

    fn members(&mut self, cohort: CohortKey) -> Result<Vec<UserSeq>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq FROM cohort_members WHERE cohort = ?1 ORDER BY seq")
            .map_err(sql_err)?;
        let rows = stmt
            .query_map([cohort.0], |r| r.get::<_, u32>(0))
            .map_err(sql_err)?;
        rows.map(|r| r.map(UserSeq))
            .collect::<Result<_, _>>()
            .map_err(sql_err)
    }
}

impl SqlUsers<'_> {
    /// The cohorts `user` belongs to in this workspace.
    pub fn memberships_of(&self, user: UserSeq) -> Result<Vec<(CohortKey, Millis)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT m.cohort, m.entered_at FROM cohort_members m JOIN cohorts c ON c.id = m.cohort WHERE c.workspace_id = ?1 AND m.seq = ?2",
            )
            .map_err(sql_err)?;
        let rows = stmt
            .query_map(params![self.workspace.0, user.0], |r| {
                Ok((CohortKey(r.get(0)?), Millis(r.get(1)?)))
            })
            .map_err(sql_err)?;
        rows.collect::<Result<_, _>>().map_err(sql_err)
    }

    /// Moves memberships from one user to another (merge): the survivor keeps the union.
    pub fn move_memberships(
        &mut self,
        from: UserSeq,
        to: UserSeq,
        now: Millis,
    ) -> Result<(), StoreError> {
        for (cohort, _) in self.memberships_of(from)? {
            self.set_member(cohort, from, false, now)?;
            let joined = self.set_member(cohort, to, true, now)?;
            // The source left; the target joined unless it was a member already.
            self.adjust_member_count(cohort, if joined { 0 } else { -1 }, now)?;
        }
        Ok(())
    }

    /// Records `user` leaving every cohort (delete).
    pub fn leave_all_cohorts(&mut self, user: UserSeq, now: Millis) -> Result<(), StoreError> {
        for (cohort, _) in self.memberships_of(user)? {
            if self.set_member(cohort, user, false, now)? {
                self.adjust_member_count(cohort, -1, now)?;
            }
        }
        Ok(())
    }
}

pub fn partner_api_key(
    conn: &Connection,
    partner: &str,
    fresh: &Secret,
    now: Millis,
) -> Result<Secret, StoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO partner_api_keys (partner, secret, created_at) VALUES (?1, ?2, ?3)",
        params![partner, fresh.expose(), now.0],
    )
    .map_err(sql_err)?;
    let secret: String = conn
        .query_row(
            "SELECT secret FROM partner_api_keys WHERE partner = ?1",
            [partner],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    Ok(Secret::new(secret))
}

pub fn check_partner_api_key(
    conn: &Connection,
    partner: &str,
    key: &Secret,
) -> Result<bool, StoreError> {
    let stored: Option<String> = conn
        .prepare_cached("SELECT secret FROM partner_api_keys WHERE partner = ?1")
        .and_then(|mut s| s.query_row([partner], |r| r.get(0)).optional())
        .map_err(sql_err)?;
    // Compare hashes in constant time: equal hashes ⇔ equal secrets.
    Ok(stored.is_some_and(|s| Secret::new(s).hash().matches(&key.hash())))
}

fn import_key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImportKeyInfo> {
    Ok(ImportKeyInfo {
        id: r.get(0)?,
        workspace: WorkspaceId(r.get(1)?),
        partner: r.get(2)?,
        prefix: r.get(3)?,
        created_at: Millis(r.get(4)?),
        invalidated_at: r.get::<_, Option<i64>>(5)?.map(Millis),
        last_used_at: r.get::<_, Option<i64>>(6)?.map(Millis),
    })
}

pub fn create_import_key(
    conn: &Connection,
    workspace: WorkspaceId,
    partner: &str,
    secret: &Secret,
    now: Millis,
) -> Result<ImportKeyInfo, StoreError> {
    let prefix: String = secret.expose().chars().take(8).collect();
    conn.execute(
        "INSERT INTO import_keys (workspace_id, partner, prefix, hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![workspace.0, partner, prefix, secret.hash().0.as_slice(), now.0],
    )
    .map_err(sql_err)?;
    let id = conn.last_insert_rowid();
    set_partner_enabled(conn, workspace, partner, true)?;
    Ok(ImportKeyInfo {
        id,
        workspace,
        partner: partner.to_owned(),
        prefix,
        created_at: now,
        invalidated_at: None,
        last_used_at: None,
    })
}

pub fn list_import_keys(
    conn: &Connection,
    workspace: WorkspaceId,
    partner: &str,
) -> Result<Vec<ImportKeyInfo>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, workspace_id, partner, prefix, created_at, invalidated_at, last_used_at FROM import_keys WHERE workspace_id = ?1 AND partner = ?2 ORDER BY id",
        )
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(params![workspace.0, partner], import_key_from_row)
        .map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

pub fn invalidate_import_key(
    conn: &Connection,
    workspace: WorkspaceId,
    partner: &str,
    id_or_prefix: &str,
    now: Millis,
) -> Result<bool, StoreError> {
    let id: Option<i64> = id_or_prefix.parse().ok();
    let matches = "workspace_id = ?1 AND partner = ?2 AND invalidated_at IS NULL AND (id = ?3 OR prefix = ?4)";
    let count: i64 = conn
        .query_row(
            &format!("SELECT COUNT(*) FROM import_keys WHERE {matches}"),
            params![workspace.0, partner, id, id_or_prefix],
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
            &format!("UPDATE import_keys SET invalidated_at = ?5 WHERE {matches}"),
            params![workspace.0, partner, id, id_or_prefix, now.0],
        )
        .map_err(sql_err)?;
    Ok(n > 0)
}

pub fn set_partner_enabled(
    conn: &Connection,
    workspace: WorkspaceId,
    partner: &str,
    enabled: bool,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO workspace_partners (workspace_id, partner, enabled) VALUES (?1, ?2, ?3)
         ON CONFLICT (workspace_id, partner) DO UPDATE SET enabled = excluded.enabled",
        params![workspace.0, partner, enabled],
    )
    .map_err(sql_err)?;
    Ok(())
}

/// How stale a recorded use may get before a new use is written.
pub const IMPORT_KEY_USE_GRANULARITY_MS: i64 = 60_000;

pub fn touch_import_key(
    conn: &Connection,
    partner: &str,
    hash: KeyHash,
    now: Millis,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE import_keys SET last_used_at = ?3 WHERE partner = ?1 AND hash = ?2
         AND (last_used_at IS NULL OR last_used_at <= ?3 - ?4)",
    )
    .and_then(|mut s| {
        s.execute(params![
            partner,
            hash.0.as_slice(),
            now.0,
            IMPORT_KEY_USE_GRANULARITY_MS
        ])
    })
    .map(|_| ())
    .map_err(sql_err)
}

pub fn partner_enabled(
    conn: &Connection,
    workspace: WorkspaceId,
    partner: &str,
) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "SELECT enabled FROM workspace_partners WHERE workspace_id = ?1 AND partner = ?2",
    )
    .and_then(|mut s| {
        s.query_row(params![workspace.0, partner], |r| r.get::<_, bool>(0))
            .optional()
    })
    .map(|enabled| enabled.unwrap_or(false))
    .map_err(sql_err)
}

pub fn find_import_key(
    conn: &Connection,
    partner: &str,
    hash: KeyHash,
) -> Result<Option<ImportKeyOwner>, StoreError> {
    let found = conn
        .prepare_cached(
            "SELECT k.hash, w.id, w.name, w.app_group_id, w.created_at, COALESCE(p.enabled, 0)
             FROM import_keys k JOIN workspaces w ON w.id = k.workspace_id
             LEFT JOIN workspace_partners p ON p.workspace_id = k.workspace_id AND p.partner = k.partner
             WHERE k.hash = ?1 AND k.partner = ?2 AND k.invalidated_at IS NULL",
        )
        .and_then(|mut s| {
            s.query_row(params![hash.0.as_slice(), partner], |r| {
                let stored: Vec<u8> = r.get(0)?;
                let workspace = Workspace { id: WorkspaceId(r.get(1)?), name: r.get(2)?, app_group_id: r.get(3)?, created_at: Millis(r.get(4)?) };
                Ok((stored, ImportKeyOwner { workspace, partner_enabled: r.get(5)? }))
            })
            .optional()
        })
        .map_err(sql_err)?;
    Ok(found.and_then(|(stored, owner)| {
        let stored = KeyHash(stored.try_into().ok()?);
        stored.matches(&hash).then_some(owner)
    }))
}

fn webhook_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HeapWebhook> {
    let label: Option<String> = r.get(6)?;
    Ok(HeapWebhook {
        workspace: Workspace {
            id: WorkspaceId(r.get(0)?),
            name: r.get(1)?,
            app_group_id: r.get(2)?,
            created_at: Millis(r.get(3)?),
        },
        secret: Secret::new(r.get(5)?),
        alias_label: label.and_then(|l| AliasLabel::parse(&l).ok()),
    })
}

const WEBHOOK_SELECT: &str = "SELECT w.id, w.name, w.app_group_id, w.created_at, h.workspace_id, h.secret, h.alias_label FROM heap_webhooks h JOIN workspaces w ON w.id = h.workspace_id";

pub fn heap_webhook(
    conn: &Connection,
    workspace: WorkspaceId,
    fresh: &Secret,
    alias_label: Option<Option<AliasLabel>>,
) -> Result<HeapWebhook, StoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO heap_webhooks (workspace_id, secret) VALUES (?1, ?2)",
        params![workspace.0, fresh.expose()],
    )
    .map_err(sql_err)?;
    // A webhook secret enables Heap, as a data import key does; a disable stays.
    conn.execute(
        "INSERT OR IGNORE INTO workspace_partners (workspace_id, partner, enabled) VALUES (?1, 'heap', 1)",
        params![workspace.0],
    )
    .map_err(sql_err)?;
    if let Some(label) = alias_label {
        conn.execute(
            "UPDATE heap_webhooks SET alias_label = ?2 WHERE workspace_id = ?1",
            params![workspace.0, label.as_ref().map(AliasLabel::as_str)],
        )
        .map_err(sql_err)?;
    }
    conn.query_row(
        &format!("{WEBHOOK_SELECT} WHERE h.workspace_id = ?1"),
        [workspace.0],
        webhook_from_row,
    )
    .map_err(sql_err)
}

pub fn heap_webhooks(conn: &Connection) -> Result<Vec<HeapWebhook>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!("{WEBHOOK_SELECT} ORDER BY w.id"))
        .map_err(sql_err)?;
    let rows = stmt.query_map([], webhook_from_row).map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

pub fn list_cohorts(
    conn: &Connection,
    workspace: WorkspaceId,
) -> Result<Vec<CohortSummary>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT partner, cohort_id, name, member_count, created_at, updated_at FROM cohorts WHERE workspace_id = ?1 ORDER BY partner, name, cohort_id",
        )
        .map_err(sql_err)?;
    let rows = stmt
        .query_map([workspace.0], |r| {
            let id: String = r.get(1)?;
            Ok(CohortSummary {
                partner: r.get(0)?,
                cohort_id: CohortId::parse(&id)
                    .ok_or_else(|| rusqlite::Error::InvalidColumnName("cohort_id".into()))?,
                name: r.get(2)?,
                member_count: r.get(3)?,
                created_at: Millis(r.get(4)?),
                updated_at: Millis(r.get(5)?),
            })
        })
        .map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

pub fn cohort_members(
    conn: &Connection,
    workspace: WorkspaceId,
    partner: &str,
    cohort_id: &CohortId,
    after: u32,
    limit: usize,
) -> Result<Option<Vec<CohortMember>>, StoreError> {
    let cohort: Option<i64> = conn
        .prepare_cached(
            "SELECT id FROM cohorts WHERE workspace_id = ?1 AND partner = ?2 AND cohort_id = ?3",
        )
        .and_then(|mut s| {
            s.query_row(params![workspace.0, partner, cohort_id.as_str()], |r| {
                r.get(0)
            })
            .optional()
        })
        .map_err(sql_err)?;
    let Some(cohort) = cohort else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT m.seq, u.braze_id, u.external_id, m.entered_at FROM cohort_members m
             JOIN users u ON u.workspace_id = ?1 AND u.seq = m.seq
             WHERE m.cohort = ?2 AND m.seq > ?3 ORDER BY m.seq LIMIT ?4",
        )
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(
            params![
                workspace.0,
                cohort,
                after,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                let braze: String = r.get(1)?;
                let ext: Option<String> = r.get(2)?;
                Ok(CohortMember {
                    user: UserSeq(r.get(0)?),
                    braze_id: BrazeId::parse(&braze)
                        .map_err(|_| rusqlite::Error::InvalidColumnName("braze_id".into()))?,
                    external_id: ext.and_then(|e| ExternalId::parse(&e).ok()),
                    entered_at: Millis(r.get(3)?),
                })
            },
        )
        .map_err(sql_err)?;
    rows.collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(sql_err)
}

pub fn recent_cohort_changes(
    conn: &Connection,
    workspace: WorkspaceId,
    last: usize,
) -> Result<Vec<tideway_core::store::RecentCohortChanges>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT c.partner, c.cohort_id, c.name, SUM(r.entered), SUM(1 - r.entered), MIN(r.at), MAX(r.at)
             FROM (SELECT cohort, entered, at FROM cohort_membership_changes
                   WHERE workspace_id = ?1 ORDER BY change_seq DESC LIMIT ?2) r
             JOIN cohorts c ON c.id = r.cohort
             GROUP BY r.cohort ORDER BY MAX(r.at) DESC, c.id",
        )
        .map_err(sql_err)?;
    let last = i64::try_from(last).unwrap_or(i64::MAX);
    let rows = stmt
        .query_map(params![workspace.0, last], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })
        .map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (partner, cohort_id, name, entered, left, first, last) = row.map_err(sql_err)?;
        out.push(tideway_core::store::RecentCohortChanges {
            partner,
            cohort_id: CohortId::parse(&cohort_id)
                .ok_or_else(|| StoreError::Corrupt("a stored cohort id".into()))?,
            name,
            entered: u64::try_from(entered).unwrap_or(0),
            left: u64::try_from(left).unwrap_or(0),
            first_at: Millis(first),
            last_at: Millis(last),
        });
    }
    Ok(out)
}

pub fn user_cohorts(
    conn: &Connection,
    workspace: WorkspaceId,
    braze_id: &BrazeId,
) -> Result<Option<Vec<UserCohort>>, StoreError> {
    let seq: Option<u32> = conn
        .prepare_cached("SELECT seq FROM users WHERE workspace_id = ?1 AND braze_id = ?2 AND deleted_at IS NULL")
        .and_then(|mut s| s.query_row(params![workspace.0, braze_id.as_str()], |r| r.get(0)).optional())
        .map_err(sql_err)?;
    let Some(seq) = seq else { return Ok(None) };
    let mut stmt = conn
        .prepare_cached(
            "SELECT c.partner, c.cohort_id, c.name, m.entered_at FROM cohort_members m JOIN cohorts c ON c.id = m.cohort
             WHERE c.workspace_id = ?1 AND m.seq = ?2 ORDER BY c.partner, c.name, c.cohort_id",
        )
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(params![workspace.0, seq], |r| {
            let id: String = r.get(1)?;
            Ok(UserCohort {
                partner: r.get(0)?,
                cohort_id: CohortId::parse(&id)
                    .ok_or_else(|| rusqlite::Error::InvalidColumnName("cohort_id".into()))?,
                name: r.get(2)?,
                entered_at: Millis(r.get(3)?),
            })
        })
        .map_err(sql_err)?;
    rows.collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(sql_err)
}
