//! Canvas over SQLite: Canvases and versions, journeys (claimed by `wake_at` with a lease),
//! their inboxes, entry receipts, per-step counts and the Canvas cursor (schema: the Canvas
//! migration in `schema.rs`).
//!
//! Every write runs on the single writer (one job = one transaction, group-committed with
//! others), which is what makes a claim exclusive and the compare-and-sets safe here; the
//! PostgreSQL store gets the same from row locks (`postgres/canvas.rs`). Shared helpers
//! (row codecs, the inbox encoding) live here and are used by both.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Map, Value};
use tideway_core::canvas::{Happening, HappeningKind, Journey};
use tideway_core::clock::Millis;
use tideway_core::currents::CurrentsEvent;
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::store::{
    CanvasRecord, CanvasScan, CanvasSend, CanvasStat, CanvasStore, ClaimedJourney, ConversionWatch,
    JourneySettlement, ScanOutcome, SendCounts, StepCounts, StepStat, StoreError, StoreFuture,
    TriggerCursor,
};

use super::messaging::{cas_conflict, insert_dispatch, insert_send, status_of, tags_of, tags_text};
use super::users::SqlUsers;
use super::{SqliteStore, WriterEnv, sql_err};
use crate::codec::{corrupt, u64_of};
use tideway_core::users::WriteCtx;

// ---- shared with the PostgreSQL store ----------------------------------------------------

/// A happening's `(kind, name, properties)` columns.
pub(crate) fn happening_columns(h: &Happening) -> (&'static str, &str, String) {
    let props = Value::Object(h.properties.clone()).to_string();
    match &h.kind {
        HappeningKind::CustomEvent { name } => ("custom", name.as_str(), props),
        HappeningKind::Purchase { product_id } => ("purchase", product_id.as_str(), props),
    }
}

pub(crate) fn happening_of(
    at: i64,
    kind: &str,
    name: String,
    properties: &str,
) -> Result<Happening, StoreError> {
    let properties: Map<String, Value> = serde_json::from_str(properties)
        .map_err(|e| corrupt(format!("canvas inbox properties: {e}")))?;
    let kind = match kind {
        "custom" => HappeningKind::CustomEvent { name },
        "purchase" => HappeningKind::Purchase { product_id: name },
        other => return Err(corrupt(format!("canvas inbox kind {other:?}"))),
    };
    Ok(Happening {
        at: Millis(at),
        kind,
        properties,
    })
}

/// Per-step counts from `(step, stat, count)` rows and `(step, in step)` rows.
pub(crate) fn step_counts(
    stats: Vec<(String, String, i64)>,
    in_step: Vec<(String, i64)>,
) -> Result<Vec<StepCounts>, StoreError> {
    let mut by_step: BTreeMap<String, StepCounts> = BTreeMap::new();
    let slot = |by_step: &mut BTreeMap<String, StepCounts>, step: &str| {
        by_step
            .entry(step.to_owned())
            .or_insert_with(|| StepCounts {
                step_id: step.to_owned(),
                ..StepCounts::default()
            })
            .clone()
    };
    for (step, stat, count) in stats {
        let mut c = slot(&mut by_step, &step);
        let n = u64_of(count);
        match CanvasStat::parse(&stat).ok_or_else(|| corrupt(format!("canvas stat {stat:?}")))? {
            CanvasStat::Entered => c.entered = n,
            CanvasStat::Progressed => c.progressed = n,
            CanvasStat::Exited => c.exited = n,
            CanvasStat::Conversions => c.conversions = n,
        }
        by_step.insert(step, c);
    }
    for (step, n) in in_step {
        let mut c = slot(&mut by_step, &step);
        c.in_step = u64_of(n);
        by_step.insert(step, c);
    }
    Ok(by_step.into_values().collect())
}

/// Stat increments tallied per (canvas, step, stat), in key order.
pub(crate) fn tally<'a>(
    items: impl IntoIterator<Item = (&'a str, &'a StepStat)>,
) -> BTreeMap<(&'a str, &'a str, &'static str), i64> {
    let mut out = BTreeMap::new();
    for (canvas, (step, stat)) in items {
        *out.entry((canvas, step.as_str(), stat.as_str()))
            .or_insert(0) += 1;
    }
    out
}

pub(crate) const CANVAS_COLUMNS: &str = "id, name, description, tags, status, version, \
    definition, created_at, updated_at, launched_at, next_run, first_entry, last_entry, entries";

pub(crate) const JOURNEY_COLUMNS: &str = "entry_id, version, variant_id, step_id, entered_at, \
    step_at, due_at, converted, entry_properties, event_properties";

type Appends = Vec<(Option<UserSeq>, CurrentsEvent)>;

// ---- rows ---------------------------------------------------------------------------------

fn canvas_row(r: &Row<'_>) -> rusqlite::Result<RawCanvas> {
    Ok(RawCanvas {
        id: r.get(0)?,
        name: r.get(1)?,
        description: r.get(2)?,
        tags: r.get(3)?,
        status: r.get(4)?,
        version: r.get(5)?,
        definition: r.get(6)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
        launched_at: r.get(9)?,
        next_run: r.get(10)?,
        first_entry: r.get(11)?,
        last_entry: r.get(12)?,
        entries: r.get(13)?,
    })
}

/// A canvas row as read, before its text columns are parsed.
pub(crate) struct RawCanvas {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) tags: String,
    pub(crate) status: String,
    pub(crate) version: i64,
    pub(crate) definition: String,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) launched_at: Option<i64>,
    pub(crate) next_run: Option<i64>,
    pub(crate) first_entry: Option<i64>,
    pub(crate) last_entry: Option<i64>,
    pub(crate) entries: i64,
}

impl RawCanvas {
    pub(crate) fn parse(self) -> Result<CanvasRecord, StoreError> {
        Ok(CanvasRecord {
            id: self.id,
            name: self.name,
            description: self.description,
            tags: tags_of(&self.tags)?,
            status: status_of(&self.status)?,
            version: u32::try_from(self.version)
                .map_err(|_| corrupt(format!("canvas version {}", self.version)))?,
            definition: serde_json::from_str(&self.definition)
                .map_err(|e| corrupt(format!("canvas definition: {e}")))?,
            created_at: Millis(self.created_at),
            updated_at: Millis(self.updated_at),
            launched_at: self.launched_at.map(Millis),
            next_run: self.next_run.map(Millis),
            first_entry: self.first_entry.map(Millis),
            last_entry: self.last_entry.map(Millis),
            entries: u64_of(self.entries),
        })
    }
}

/// A journey's columns ([`JOURNEY_COLUMNS`]) starting at `at`.
pub(crate) struct RawJourney {
    pub(crate) entry_id: String,
    pub(crate) version: i64,
    pub(crate) variant_id: String,
    pub(crate) step_id: String,
    pub(crate) entered_at: i64,
    pub(crate) step_at: i64,
    pub(crate) due_at: i64,
    pub(crate) converted: i64,
    pub(crate) entry_properties: Option<String>,
    pub(crate) event_properties: Option<String>,
}

impl RawJourney {
    pub(crate) fn parse(self) -> Result<Journey, StoreError> {
        Ok(Journey {
            entry_id: self.entry_id,
            version: u32::try_from(self.version)
                .map_err(|_| corrupt(format!("journey version {}", self.version)))?,
            variant_id: self.variant_id,
            step_id: self.step_id,
            entered_at: Millis(self.entered_at),
            step_at: Millis(self.step_at),
            due_at: Millis(self.due_at),
            converted: u8::try_from(self.converted)
                .map_err(|_| corrupt(format!("journey conversions {}", self.converted)))?,
            entry_properties: self.entry_properties,
            event_properties: self.event_properties,
        })
    }
}

fn journey_row(r: &Row<'_>, at: usize) -> rusqlite::Result<RawJourney> {
    Ok(RawJourney {
        entry_id: r.get(at)?,
        version: r.get(at + 1)?,
        variant_id: r.get(at + 2)?,
        step_id: r.get(at + 3)?,
        entered_at: r.get(at + 4)?,
        step_at: r.get(at + 5)?,
        due_at: r.get(at + 6)?,
        converted: r.get(at + 7)?,
        entry_properties: r.get(at + 8)?,
        event_properties: r.get(at + 9)?,
    })
}

// ---- canvases -----------------------------------------------------------------------------

fn canvas(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
) -> Result<Option<CanvasRecord>, StoreError> {
    let sql = format!("SELECT {CANVAS_COLUMNS} FROM canvases WHERE workspace_id = ?1 AND id = ?2");
    conn.prepare_cached(&sql)
        .map_err(sql_err)?
        .query_row(params![workspace.0, id], canvas_row)
        .optional()
        .map_err(sql_err)?
        .map(RawCanvas::parse)
        .transpose()
}

fn store_version(
    conn: &Connection,
    workspace: WorkspaceId,
    c: &CanvasRecord,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO canvas_versions (workspace_id, canvas_id, version, definition)
         VALUES (?1, ?2, ?3, ?4)",
    )
    .map_err(sql_err)?
    .execute(params![
        workspace.0,
        c.id,
        c.version,
        c.definition.to_string()
    ])
    .map_err(sql_err)?;
    Ok(())
}

fn create_canvas(
    conn: &Connection,
    workspace: WorkspaceId,
    c: &CanvasRecord,
) -> Result<CanvasRecord, StoreError> {
    let sql = format!(
        "INSERT INTO canvases ({CANVAS_COLUMNS}, workspace_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL, NULL, 0, ?12)"
    );
    conn.prepare_cached(&sql)
        .map_err(sql_err)?
        .execute(params![
            c.id,
            c.name,
            c.description,
            tags_text(&c.tags),
            c.status.as_str(),
            c.version,
            c.definition.to_string(),
            c.created_at.0,
            c.updated_at.0,
            c.launched_at.map(|m| m.0),
            c.next_run.map(|m| m.0),
            workspace.0,
        ])
        .map_err(sql_err)?;
    store_version(conn, workspace, c)?;
    canvas(conn, workspace, &c.id)?.ok_or_else(|| corrupt("a canvas just written is missing"))
}

fn save_canvas(
    conn: &Connection,
    workspace: WorkspaceId,
    c: &CanvasRecord,
) -> Result<Option<CanvasRecord>, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE canvases SET name = ?3, description = ?4, tags = ?5, status = ?6,
                 version = ?7, definition = ?8, updated_at = ?9, launched_at = ?10, next_run = ?11
             WHERE workspace_id = ?1 AND id = ?2",
        )
        .map_err(sql_err)?
        .execute(params![
            workspace.0,
            c.id,
            c.name,
            c.description,
            tags_text(&c.tags),
            c.status.as_str(),
            c.version,
            c.definition.to_string(),
            c.updated_at.0,
            c.launched_at.map(|m| m.0),
            c.next_run.map(|m| m.0),
        ])
        .map_err(sql_err)?;
    if changed == 0 {
        return Ok(None);
    }
    store_version(conn, workspace, c)?;
    canvas(conn, workspace, &c.id)
}

fn conversion_watches(
    conn: &Connection,
    workspace: WorkspaceId,
    canvas_id: &str,
    users: &[UserSeq],
    now: Millis,
) -> Result<Vec<(UserSeq, ConversionWatch)>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT entry_id, version, variant_id, step_id, entered_at, converted, until
             FROM canvas_conversion_watches
             WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3 AND until >= ?4",
        )
        .map_err(sql_err)?;
    let mut out = Vec::new();
    for u in users {
        let found = stmt
            .query_row(params![workspace.0, canvas_id, u.0, now.0], |r| {
                Ok(ConversionWatch {
                    entry_id: r.get(0)?,
                    version: r.get(1)?,
                    variant_id: r.get(2)?,
                    step_id: r.get(3)?,
                    entered_at: Millis(r.get(4)?),
                    converted: r.get(5)?,
                    until: Millis(r.get(6)?),
                })
            })
            .optional()
            .map_err(sql_err)?;
        out.extend(found.map(|w| (*u, w)));
    }
    Ok(out)
}

fn delete_canvas(conn: &Connection, workspace: WorkspaceId, id: &str) -> Result<bool, StoreError> {
    let gone = conn
        .prepare_cached("DELETE FROM canvases WHERE workspace_id = ?1 AND id = ?2")
        .map_err(sql_err)?
        .execute(params![workspace.0, id])
        .map_err(sql_err)?;
    for table in [
        "canvas_versions",
        "canvas_journeys",
        "canvas_inbox",
        "canvas_receipts",
        "canvas_step_stats",
        "canvas_conversion_watches",
    ] {
        conn.prepare_cached(&format!(
            "DELETE FROM {table} WHERE workspace_id = ?1 AND canvas_id = ?2"
        ))
        .map_err(sql_err)?
        .execute(params![workspace.0, id])
        .map_err(sql_err)?;
    }
    // Its segment-entry trackers (keyed by the Canvas's id).
    conn.prepare_cached(
        "DELETE FROM segment_trackers WHERE workspace_id = ?1 AND campaign_id = ?2",
    )
    .map_err(sql_err)?
    .execute(params![workspace.0, id])
    .map_err(sql_err)?;
    Ok(gone > 0)
}

fn list(
    conn: &Connection,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<(WorkspaceId, CanvasRecord)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_err)?;
    let raws = stmt
        .query_map(args, |r| Ok((r.get::<_, i64>(14)?, canvas_row(r)?)))
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err)?;
    raws.into_iter()
        .map(|(ws, raw)| Ok((WorkspaceId(ws), raw.parse()?)))
        .collect()
}

fn canvas_cursor(conn: &Connection, workspace: WorkspaceId) -> Result<TriggerCursor, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT cursor_events, cursor_cohort_changes FROM canvas_cursors WHERE workspace_id = ?1",
        )
        .map_err(sql_err)?
        .query_row(params![workspace.0], |r| {
            Ok(TriggerCursor {
                events: r.get(0)?,
                cohort_changes: r.get(1)?,
            })
        })
        .optional()
        .map_err(sql_err)?
        .unwrap_or_default())
}

fn count_stats(
    conn: &Connection,
    workspace: WorkspaceId,
    tallied: &BTreeMap<(&str, &str, &'static str), i64>,
) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO canvas_step_stats (workspace_id, canvas_id, step_id, stat, count)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (workspace_id, canvas_id, step_id, stat) DO UPDATE
                 SET count = count + excluded.count",
        )
        .map_err(sql_err)?;
    for ((canvas, step, stat), n) in tallied {
        stmt.execute(params![workspace.0, canvas, step, stat, n])
            .map_err(sql_err)?;
    }
    Ok(())
}

fn insert_journey(
    conn: &Connection,
    workspace: WorkspaceId,
    canvas_id: &str,
    user: UserSeq,
    j: &Journey,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO canvas_journeys (workspace_id, canvas_id, user_seq, {JOURNEY_COLUMNS}, wake_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?10)"
    );
    conn.prepare_cached(&sql)
        .map_err(sql_err)?
        .execute(params![
            workspace.0,
            canvas_id,
            user.0,
            j.entry_id,
            j.version,
            j.variant_id,
            j.step_id,
            j.entered_at.0,
            j.step_at.0,
            j.due_at.0,
            j.converted,
            j.entry_properties,
            j.event_properties,
        ])
        .map_err(sql_err)?;
    Ok(())
}

fn enter_canvas(
    conn: &Connection,
    workspace: WorkspaceId,
    now: Millis,
    scan: &CanvasScan,
) -> Result<ScanOutcome, StoreError> {
    let mut outcome = ScanOutcome::default();
    if let Some((expected, new)) = &scan.cursor {
        if canvas_cursor(conn, workspace)? != *expected {
            return Err(cas_conflict("the Canvas cursor"));
        }
        conn.prepare_cached(
            "INSERT INTO canvas_cursors (workspace_id, cursor_events, cursor_cohort_changes)
             VALUES (?1, ?2, ?3)
             ON CONFLICT (workspace_id) DO UPDATE
                 SET cursor_events = excluded.cursor_events,
                     cursor_cohort_changes = excluded.cursor_cohort_changes",
        )
        .map_err(sql_err)?
        .execute(params![workspace.0, new.events, new.cohort_changes])
        .map_err(sql_err)?;
    }
    if let Some((id, expected, new)) = &scan.next_run {
        let moved = conn
            .prepare_cached(
                "UPDATE canvases SET next_run = ?4
                 WHERE workspace_id = ?1 AND id = ?2 AND next_run IS ?3",
            )
            .map_err(sql_err)?
            .execute(params![
                workspace.0,
                id,
                expected.map(|m| m.0),
                new.map(|m| m.0)
            ])
            .map_err(sql_err)?;
        if moved == 0 {
            return Err(cas_conflict("the Canvas's next run"));
        }
    }
    super::messaging::write_marks(
        conn,
        workspace,
        (
            &scan.segment_trackers,
            super::messaging::TrackerOwner::Canvas,
        ),
        &scan.dispatches,
        scan.expansion.as_ref(),
    )?;
    let mut appends: Appends = Vec::new();
    let mut stats: Vec<(&str, &StepStat)> = Vec::new();
    for e in &scan.entries {
        let entries: Option<i64> = conn
            .prepare_cached("SELECT entries FROM canvases WHERE workspace_id = ?1 AND id = ?2")
            .map_err(sql_err)?
            .query_row(params![workspace.0, e.canvas_id], |r| r.get(0))
            .optional()
            .map_err(sql_err)?;
        let Some(entries) = entries else {
            outcome.refused += 1;
            continue;
        };
        if e.entry_limit.is_some_and(|limit| u64_of(entries) >= limit) {
            outcome.refused += 1;
            continue;
        }
        let busy: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM canvas_journeys
                 WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3)",
            )
            .map_err(sql_err)?
            .query_row(params![workspace.0, e.canvas_id, e.user.0], |r| r.get(0))
            .map_err(sql_err)?;
        if busy {
            outcome.refused += 1;
            continue;
        }
        let taken = super::messaging::take_receipt(
            conn,
            super::messaging::Receipts::Canvas,
            workspace,
            e.user,
            &e.canvas_id,
            e.reentry_after_ms,
            now,
        )?;
        if !taken {
            outcome.refused += 1;
            continue;
        }
        conn.prepare_cached(
            "UPDATE canvases SET entries = entries + 1,
                 first_entry = COALESCE(first_entry, ?3), last_entry = ?3
             WHERE workspace_id = ?1 AND id = ?2",
        )
        .map_err(sql_err)?
        .execute(params![workspace.0, e.canvas_id, now.0])
        .map_err(sql_err)?;
        if let Some(j) = &e.journey {
            insert_journey(conn, workspace, &e.canvas_id, e.user, j)?;
        }
        conn.prepare_cached(
            "DELETE FROM canvas_conversion_watches
             WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3",
        )
        .map_err(sql_err)?
        .execute(params![workspace.0, e.canvas_id, e.user.0])
        .map_err(sql_err)?;
        appends.extend(e.events.iter().map(|ev| (Some(e.user), ev.clone())));
        stats.extend(e.stats.iter().map(|s| (e.canvas_id.as_str(), s)));
        outcome.entered += 1;
    }
    for item in &scan.inbox {
        let (kind, name, props) = happening_columns(&item.happening);
        let added = conn
            .prepare_cached(
                "INSERT INTO canvas_inbox (workspace_id, canvas_id, user_seq, at, kind, name, properties)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7
                 WHERE EXISTS (SELECT 1 FROM canvas_journeys
                     WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3)",
            )
            .map_err(sql_err)?
            .execute(params![
                workspace.0,
                item.canvas_id,
                item.user.0,
                item.happening.at.0,
                kind,
                name,
                props
            ])
            .map_err(sql_err)?;
        if added > 0 {
            conn.prepare_cached(
                "UPDATE canvas_journeys SET wake_at = min(wake_at, ?4)
                 WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3",
            )
            .map_err(sql_err)?
            .execute(params![
                workspace.0,
                item.canvas_id,
                item.user.0,
                item.happening.at.0
            ])
            .map_err(sql_err)?;
            outcome.inboxed += 1;
        }
    }
    for c in &scan.conversions {
        let marked = conn
            .prepare_cached(
                "UPDATE canvas_conversion_watches SET converted = converted | ?5
                 WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3
                   AND entry_id = ?4 AND converted & ?5 = 0",
            )
            .map_err(sql_err)?
            .execute(params![
                workspace.0,
                c.canvas_id,
                c.user.0,
                c.entry_id,
                1i64 << c.index
            ])
            .map_err(sql_err)?;
        if marked > 0 {
            appends.extend(c.events.iter().map(|ev| (Some(c.user), ev.clone())));
            stats.extend(c.stats.iter().map(|s| (c.canvas_id.as_str(), s)));
        }
    }
    conn.prepare_cached(
        "DELETE FROM canvas_conversion_watches WHERE workspace_id = ?1 AND until < ?2",
    )
    .map_err(sql_err)?
    .execute(params![workspace.0, now.0])
    .map_err(sql_err)?;
    count_stats(conn, workspace, &tally(stats))?;
    super::currents::append_events(conn, workspace, &appends)?;
    Ok(outcome)
}

fn claim_journeys(
    conn: &Connection,
    owner: &str,
    now: Millis,
    lease_ms: u64,
    limit: usize,
) -> Result<Vec<ClaimedJourney>, StoreError> {
    let until = now
        .0
        .saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let sql = format!(
        "UPDATE canvas_journeys SET lease_owner = ?1, lease_until = ?3
         WHERE (workspace_id, canvas_id, user_seq) IN (
             SELECT j.workspace_id, j.canvas_id, j.user_seq FROM canvas_journeys j
             JOIN canvases c ON c.workspace_id = j.workspace_id AND c.id = j.canvas_id
             WHERE j.wake_at <= ?2 AND (j.lease_until IS NULL OR j.lease_until <= ?2)
               AND c.status = 'active'
             ORDER BY j.wake_at LIMIT ?4)
         RETURNING workspace_id, canvas_id, user_seq, wake_at, {JOURNEY_COLUMNS}"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let raws = stmt
        .query_map(params![owner, now.0, until, limit], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, i64>(3)?,
                journey_row(r, 4)?,
            ))
        })
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err)?;
    let mut claimed = Vec::with_capacity(raws.len());
    let mut wakes = Vec::with_capacity(raws.len());
    let mut inbox_stmt = conn
        .prepare_cached(
            "SELECT id, at, kind, name, properties FROM canvas_inbox
             WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3 ORDER BY id",
        )
        .map_err(sql_err)?;
    for (ws, canvas_id, user, wake, raw) in raws {
        let journey = raw.parse()?;
        let inbox = inbox_for(&mut inbox_stmt, ws, &canvas_id, user)?;
        wakes.push(wake);
        claimed.push(ClaimedJourney {
            workspace: WorkspaceId(ws),
            canvas_id,
            user: UserSeq(user),
            journey,
            inbox,
        });
    }
    // RETURNING comes in no particular order: oldest wake first.
    let mut order: Vec<usize> = (0..claimed.len()).collect();
    order.sort_by_key(|&i| (wakes[i], claimed[i].workspace, claimed[i].user));
    let mut slots: Vec<Option<ClaimedJourney>> = claimed.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

fn inbox_for(
    stmt: &mut rusqlite::CachedStatement<'_>,
    ws: i64,
    canvas_id: &str,
    user: u32,
) -> Result<Vec<(i64, Happening)>, StoreError> {
    let rows = stmt
        .query_map(params![ws, canvas_id, user], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err)?;
    rows.into_iter()
        .map(|(id, at, kind, name, props)| Ok((id, happening_of(at, &kind, name, &props)?)))
        .collect()
}

fn write_sends(
    conn: &Connection,
    workspace: WorkspaceId,
    user: UserSeq,
    sends: &[CanvasSend],
) -> Result<(), StoreError> {
    for s in sends {
        if s.dispatch.workspace != workspace {
            return Err(corrupt(format!(
                "dispatch {} of another workspace",
                s.dispatch.id
            )));
        }
        let exists: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM dispatches WHERE workspace_id = ?1 AND id = ?2)",
            )
            .map_err(sql_err)?
            .query_row(params![workspace.0, s.dispatch.id], |r| r.get(0))
            .map_err(sql_err)?;
        if !exists {
            insert_dispatch(conn, &s.dispatch)?;
        }
        insert_send(conn, workspace, user, &s.job)?;
    }
    Ok(())
}

fn settle_journeys(
    conn: &Connection,
    env: &mut WriterEnv,
    owner: &str,
    now: Millis,
    settlements: &[JourneySettlement],
) -> Result<u64, StoreError> {
    let mut refused = 0;
    let mut appends: BTreeMap<WorkspaceId, Appends> = BTreeMap::new();
    let mut stats: BTreeMap<WorkspaceId, Vec<(&str, &StepStat)>> = BTreeMap::new();
    for s in settlements {
        let ws = s.workspace.0;
        let held: bool = conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM canvas_journeys
                 WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3
                   AND entry_id = ?4 AND lease_owner = ?5)",
            )
            .map_err(sql_err)?
            .query_row(params![ws, s.canvas_id, s.user.0, s.entry_id, owner], |r| {
                r.get(0)
            })
            .map_err(sql_err)?;
        if !held {
            refused += 1;
            continue;
        }
        if let Some(update) = &s.user_update {
            // The User Update steps' attributes, through the users context, in this
            // transaction: applied exactly when the journey moves past them.
            let mut users = SqlUsers::writer(conn, s.workspace, &mut env.cache);
            let mut ctx = WriteCtx {
                workspace: &update.workspace,
                now,
                ids: &mut env.ids,
                max_array_len: env.options.max_array_len,
            };
            tideway_core::users::track(&mut users, &mut ctx, &update.request)?;
            users.finish()?;
            #[cfg(feature = "failpoints")]
            env.options.failpoints.after_user_update()?;
        }
        if let Some(upto) = s.inbox_upto {
            conn.prepare_cached(
                "DELETE FROM canvas_inbox
                 WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3 AND id <= ?4",
            )
            .map_err(sql_err)?
            .execute(params![ws, s.canvas_id, s.user.0, upto])
            .map_err(sql_err)?;
        }
        match &s.journey {
            Some(j) => {
                let sql = "UPDATE canvas_journeys SET entry_id = ?4, version = ?5, variant_id = ?6,
                         step_id = ?7, entered_at = ?8, step_at = ?9, due_at = ?10, converted = ?11,
                         entry_properties = ?12, event_properties = ?13,
                         wake_at = CASE WHEN EXISTS (SELECT 1 FROM canvas_inbox i
                             WHERE i.workspace_id = ?1 AND i.canvas_id = ?2 AND i.user_seq = ?3)
                             THEN min(?10, ?14) ELSE ?10 END,
                         lease_owner = NULL, lease_until = NULL
                     WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3";
                conn.prepare_cached(sql)
                    .map_err(sql_err)?
                    .execute(params![
                        ws,
                        s.canvas_id,
                        s.user.0,
                        j.entry_id,
                        j.version,
                        j.variant_id,
                        j.step_id,
                        j.entered_at.0,
                        j.step_at.0,
                        j.due_at.0,
                        j.converted,
                        j.entry_properties,
                        j.event_properties,
                        now.0,
                    ])
                    .map_err(sql_err)?;
            }
            None => {
                conn.prepare_cached(
                    "DELETE FROM canvas_journeys
                     WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3",
                )
                .map_err(sql_err)?
                .execute(params![ws, s.canvas_id, s.user.0])
                .map_err(sql_err)?;
                conn.prepare_cached(
                    "DELETE FROM canvas_inbox
                     WHERE workspace_id = ?1 AND canvas_id = ?2 AND user_seq = ?3",
                )
                .map_err(sql_err)?
                .execute(params![ws, s.canvas_id, s.user.0])
                .map_err(sql_err)?;
                if let Some(w) = &s.watch {
                    conn.prepare_cached(
                        "INSERT INTO canvas_conversion_watches (workspace_id, canvas_id, user_seq,
                             entry_id, version, variant_id, step_id, entered_at, converted, until)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                         ON CONFLICT (workspace_id, canvas_id, user_seq) DO UPDATE SET
                             entry_id = excluded.entry_id, version = excluded.version,
                             variant_id = excluded.variant_id, step_id = excluded.step_id,
                             entered_at = excluded.entered_at, converted = excluded.converted,
                             until = excluded.until",
                    )
                    .map_err(sql_err)?
                    .execute(params![
                        ws,
                        s.canvas_id,
                        s.user.0,
                        w.entry_id,
                        w.version,
                        w.variant_id,
                        w.step_id,
                        w.entered_at.0,
                        w.converted,
                        w.until.0
                    ])
                    .map_err(sql_err)?;
                }
            }
        }
        write_sends(conn, s.workspace, s.user, &s.sends)?;
        appends
            .entry(s.workspace)
            .or_default()
            .extend(s.events.iter().map(|e| (Some(s.user), e.clone())));
        stats
            .entry(s.workspace)
            .or_default()
            .extend(s.stats.iter().map(|st| (s.canvas_id.as_str(), st)));
    }
    for (ws, items) in stats {
        count_stats(conn, ws, &tally(items))?;
    }
    for (ws, events) in &appends {
        super::currents::append_events(conn, *ws, events)?;
    }
    Ok(refused)
}

fn next_journey_due(conn: &Connection) -> Result<Option<Millis>, StoreError> {
    let at: Option<i64> = conn
        .prepare_cached(
            "SELECT min(max(j.wake_at, COALESCE(j.lease_until, 0))) FROM (
                 SELECT workspace_id, canvas_id, wake_at, lease_until FROM canvas_journeys
                 ORDER BY wake_at LIMIT 1000) j
             JOIN canvases c ON c.workspace_id = j.workspace_id AND c.id = j.canvas_id
             WHERE c.status = 'active'",
        )
        .map_err(sql_err)?
        .query_row([], |r| r.get(0))
        .map_err(sql_err)?;
    Ok(at.map(Millis))
}

fn canvas_step_counts(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
) -> Result<Vec<StepCounts>, StoreError> {
    let stats = conn
        .prepare_cached(
            "SELECT step_id, stat, count FROM canvas_step_stats
             WHERE workspace_id = ?1 AND canvas_id = ?2",
        )
        .map_err(sql_err)?
        .query_map(params![workspace.0, id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err)?;
    let in_step = conn
        .prepare_cached(
            "SELECT step_id, COUNT(*) FROM canvas_journeys
             WHERE workspace_id = ?1 AND canvas_id = ?2 GROUP BY step_id",
        )
        .map_err(sql_err)?
        .query_map(params![workspace.0, id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err)?;
    step_counts(stats, in_step)
}

fn dispatch_send_counts(
    conn: &Connection,
    workspace: WorkspaceId,
    ids: &[String],
) -> Result<Vec<SendCounts>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT state, COUNT(*) FROM sends
             WHERE workspace_id = ?1 AND dispatch_id = ?2 GROUP BY state",
        )
        .map_err(sql_err)?;
    ids.iter()
        .map(|id| {
            let rows = stmt
                .query_map(params![workspace.0, id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })
                .map_err(sql_err)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(sql_err)?;
            Ok(send_counts(rows))
        })
        .collect()
}

/// Counts by state from `(state, count)` rows.
pub(crate) fn send_counts(rows: Vec<(String, i64)>) -> SendCounts {
    let mut c = SendCounts::default();
    for (state, n) in rows {
        match state.as_str() {
            "pending" => c.pending = u64_of(n),
            "sent" => c.sent = u64_of(n),
            _ => c.failed += u64_of(n),
        }
    }
    c
}

impl CanvasStore for SqliteStore {
    fn create_canvas(
        &self,
        workspace: WorkspaceId,
        record: CanvasRecord,
    ) -> StoreFuture<'_, CanvasRecord> {
        self.write(move |conn, _, _| create_canvas(conn, workspace, &record))
    }

    fn canvas(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, Option<CanvasRecord>> {
        let id = id.to_owned();
        self.read(move |conn| canvas(conn, workspace, &id))
    }

    fn list_canvases(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<CanvasRecord>> {
        self.read(move |conn| {
            let sql = format!(
                "SELECT {CANVAS_COLUMNS}, workspace_id FROM canvases WHERE workspace_id = ?1
                 ORDER BY created_at, id"
            );
            Ok(list(conn, &sql, &[&workspace.0])?
                .into_iter()
                .map(|(_, c)| c)
                .collect())
        })
    }

    fn save_canvas(
        &self,
        workspace: WorkspaceId,
        record: CanvasRecord,
    ) -> StoreFuture<'_, Option<CanvasRecord>> {
        self.write(move |conn, _, _| save_canvas(conn, workspace, &record))
    }

    fn delete_canvas(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        self.write(move |conn, _, _| delete_canvas(conn, workspace, &id))
    }

    fn canvas_version(
        &self,
        workspace: WorkspaceId,
        id: &str,
        version: u32,
    ) -> StoreFuture<'_, Option<Value>> {
        let id = id.to_owned();
        self.read(move |conn| {
            let text: Option<String> = conn
                .prepare_cached(
                    "SELECT definition FROM canvas_versions
                     WHERE workspace_id = ?1 AND canvas_id = ?2 AND version = ?3",
                )
                .map_err(sql_err)?
                .query_row(params![workspace.0, id, version], |r| r.get(0))
                .optional()
                .map_err(sql_err)?;
            text.map(|t| {
                serde_json::from_str(&t).map_err(|e| corrupt(format!("canvas version: {e}")))
            })
            .transpose()
        })
    }

    fn active_canvases(&self) -> StoreFuture<'_, Vec<(WorkspaceId, CanvasRecord)>> {
        self.read(|conn| {
            let sql = format!(
                "SELECT {CANVAS_COLUMNS}, workspace_id FROM canvases WHERE status = 'active'
                 ORDER BY workspace_id, created_at, id"
            );
            list(conn, &sql, &[])
        })
    }

    fn canvas_cursor(&self, workspace: WorkspaceId) -> StoreFuture<'_, TriggerCursor> {
        self.read(move |conn| canvas_cursor(conn, workspace))
    }

    fn enter_canvas(
        &self,
        workspace: WorkspaceId,
        now: Millis,
        scan: CanvasScan,
    ) -> StoreFuture<'_, ScanOutcome> {
        self.write(move |conn, _, _| enter_canvas(conn, workspace, now, &scan))
    }

    fn claim_journeys(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<ClaimedJourney>> {
        let owner = owner.to_owned();
        self.write(move |conn, _, _| claim_journeys(conn, &owner, now, lease_ms, limit))
    }

    fn settle_journeys(
        &self,
        owner: &str,
        now: Millis,
        settlements: Vec<JourneySettlement>,
    ) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        self.write_env(move |conn, env| settle_journeys(conn, env, &owner, now, &settlements))
    }

    fn next_journey_due(&self) -> StoreFuture<'_, Option<Millis>> {
        self.read(next_journey_due)
    }

    fn release_journey_leases(&self, owner: &str) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        self.write(move |conn, _, _| {
            let n = conn
                .prepare_cached(
                    "UPDATE canvas_journeys SET lease_owner = NULL, lease_until = NULL
                     WHERE lease_owner = ?1",
                )
                .map_err(sql_err)?
                .execute(params![owner])
                .map_err(sql_err)?;
            Ok(n as u64)
        })
    }

    fn conversion_watches(
        &self,
        workspace: WorkspaceId,
        canvas_id: &str,
        users: Vec<UserSeq>,
        now: Millis,
    ) -> StoreFuture<'_, Vec<(UserSeq, ConversionWatch)>> {
        let canvas_id = canvas_id.to_owned();
        self.read(move |conn| conversion_watches(conn, workspace, &canvas_id, &users, now))
    }

    fn canvas_step_counts(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, Vec<StepCounts>> {
        let id = id.to_owned();
        self.read(move |conn| canvas_step_counts(conn, workspace, &id))
    }

    fn dispatch_send_counts(
        &self,
        workspace: WorkspaceId,
        dispatch_ids: Vec<String>,
    ) -> StoreFuture<'_, Vec<SendCounts>> {
        self.read(move |conn| dispatch_send_counts(conn, workspace, &dispatch_ids))
    }
}
