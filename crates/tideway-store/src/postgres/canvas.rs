//! Canvas over PostgreSQL: the semantics of `sqlite/canvas.rs` (whose helpers it shares), with
//! what several nodes need: journeys are claimed with `FOR UPDATE SKIP LOCKED` (two nodes never
//! claim one journey and never wait for each other), settlements are fenced in the writing
//! statement (`… AND lease_owner = $owner AND entry_id = $entry`), the cursor and next-run
//! compare-and-sets are in their `UPDATE`'s `WHERE`, an entry locks its Canvas row first
//! (`FOR UPDATE`: entry limits and receipts are decided one entry at a time), and events are
//! appended last (`append_in`), so log positions are in commit order. A journey that ran User
//! Update steps settles inside the users context's unit of work that applies them
//! (`users::AroundUnit`), so the update and the journey's move commit together.

use std::collections::{BTreeMap, HashMap, HashSet};

use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::Row;

use tideway_core::canvas::{Happening, Journey};
use tideway_core::clock::Millis;
use tideway_core::currents::CurrentsEvent;
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::store::{
    CanvasRecord, CanvasScan, CanvasSend, CanvasStore, ClaimedJourney, ConversionWatch,
    DispatchRecord, JourneySettlement, NewEntry, ScanOutcome, SendCounts, StepCounts, StepStat,
    StoreError, StoreFuture, TriggerCursor,
};

use deadpool_postgres::Transaction;
use tideway_core::store::{UnitOfWork, WorkOutput};
use tokio::runtime::Handle;

use super::currents::append_in;
use super::messaging::insert_dispatch;
use super::users::{AroundUnit, Skipped};
use super::{PgStore, execute, get, pg_err, query, query_one, query_opt};
use crate::codec::corrupt;
use crate::sqlite::canvas::{
    CANVAS_COLUMNS, JOURNEY_COLUMNS, RawCanvas, RawJourney, happening_columns, happening_of,
    send_counts, step_counts, tally,
};
use crate::sqlite::messaging::{cas_conflict, tags_text};

type Appends = Vec<(Option<UserSeq>, CurrentsEvent)>;

fn raw_canvas(r: &Row) -> Result<RawCanvas, StoreError> {
    Ok(RawCanvas {
        id: get(r, 0)?,
        name: get(r, 1)?,
        description: get(r, 2)?,
        tags: get(r, 3)?,
        status: get(r, 4)?,
        version: i64::from(get::<i32>(r, 5)?),
        definition: get(r, 6)?,
        created_at: get(r, 7)?,
        updated_at: get(r, 8)?,
        launched_at: get(r, 9)?,
        next_run: get(r, 10)?,
        first_entry: get(r, 11)?,
        last_entry: get(r, 12)?,
        entries: get(r, 13)?,
    })
}

fn raw_journey(r: &Row, at: usize) -> Result<Journey, StoreError> {
    RawJourney {
        entry_id: get(r, at)?,
        version: i64::from(get::<i32>(r, at + 1)?),
        variant_id: get(r, at + 2)?,
        step_id: get(r, at + 3)?,
        entered_at: get(r, at + 4)?,
        step_at: get(r, at + 5)?,
        due_at: get(r, at + 6)?,
        converted: i64::from(get::<i16>(r, at + 7)?),
        entry_properties: get(r, at + 8)?,
        event_properties: get(r, at + 9)?,
    }
    .parse()
}

fn version_of(v: u32) -> Result<i32, StoreError> {
    i32::try_from(v).map_err(|_| corrupt(format!("canvas version {v}")))
}

async fn canvas<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    id: &str,
) -> Result<Option<CanvasRecord>, StoreError> {
    let sql = format!("SELECT {CANVAS_COLUMNS} FROM canvases WHERE workspace_id = $1 AND id = $2");
    match query_opt(c, &sql, &[&workspace.0, &id]).await? {
        Some(row) => Ok(Some(raw_canvas(&row)?.parse()?)),
        None => Ok(None),
    }
}

async fn store_version<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    r: &CanvasRecord,
) -> Result<(), StoreError> {
    execute(
        c,
        "INSERT INTO canvas_versions (workspace_id, canvas_id, version, definition)
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        &[
            &workspace.0,
            &r.id,
            &version_of(r.version)?,
            &r.definition.to_string(),
        ],
    )
    .await?;
    Ok(())
}

async fn create_canvas(
    store: &PgStore,
    workspace: WorkspaceId,
    r: &CanvasRecord,
) -> Result<CanvasRecord, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    let sql = format!(
        "INSERT INTO canvases ({CANVAS_COLUMNS}, workspace_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, NULL, NULL, 0, $12)"
    );
    execute(
        &tx,
        &sql,
        &[
            &r.id,
            &r.name,
            &r.description,
            &tags_text(&r.tags),
            &r.status.as_str(),
            &version_of(r.version)?,
            &r.definition.to_string(),
            &r.created_at.0,
            &r.updated_at.0,
            &r.launched_at.map(|m| m.0),
            &r.next_run.map(|m| m.0),
            &workspace.0,
        ],
    )
    .await?;
    store_version(&tx, workspace, r).await?;
    let out = canvas(&tx, workspace, &r.id)
        .await?
        .ok_or_else(|| corrupt("a canvas just written is missing"))?;
    tx.commit().await.map_err(pg_err)?;
    Ok(out)
}

async fn save_canvas(
    store: &PgStore,
    workspace: WorkspaceId,
    r: &CanvasRecord,
) -> Result<Option<CanvasRecord>, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    let changed = execute(
        &tx,
        "UPDATE canvases SET name = $3, description = $4, tags = $5, status = $6,
             version = $7, definition = $8, updated_at = $9, launched_at = $10, next_run = $11
         WHERE workspace_id = $1 AND id = $2",
        &[
            &workspace.0,
            &r.id,
            &r.name,
            &r.description,
            &tags_text(&r.tags),
            &r.status.as_str(),
            &version_of(r.version)?,
            &r.definition.to_string(),
            &r.updated_at.0,
            &r.launched_at.map(|m| m.0),
            &r.next_run.map(|m| m.0),
        ],
    )
    .await?;
    if changed == 0 {
        return Ok(None);
    }
    store_version(&tx, workspace, r).await?;
    let out = canvas(&tx, workspace, &r.id).await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(out)
}

async fn delete_canvas(
    store: &PgStore,
    workspace: WorkspaceId,
    id: &str,
) -> Result<bool, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    let gone = execute(
        &tx,
        "DELETE FROM canvases WHERE workspace_id = $1 AND id = $2",
        &[&workspace.0, &id],
    )
    .await?;
    for table in [
        "canvas_versions",
        "canvas_journeys",
        "canvas_inbox",
        "canvas_receipts",
        "canvas_step_stats",
        "canvas_conversion_watches",
    ] {
        execute(
            &tx,
            &format!("DELETE FROM {table} WHERE workspace_id = $1 AND canvas_id = $2"),
            &[&workspace.0, &id],
        )
        .await?;
    }
    // Its segment-entry trackers (keyed by the Canvas's id).
    execute(
        &tx,
        "DELETE FROM segment_trackers WHERE workspace_id = $1 AND campaign_id = $2",
        &[&workspace.0, &id],
    )
    .await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(gone > 0)
}

async fn canvas_cursor<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
) -> Result<TriggerCursor, StoreError> {
    Ok(match query_opt(
        c,
        "SELECT cursor_events, cursor_cohort_changes FROM canvas_cursors WHERE workspace_id = $1",
        &[&workspace.0],
    )
    .await?
    {
        Some(row) => TriggerCursor {
            events: get(&row, 0)?,
            cohort_changes: get(&row, 1)?,
        },
        None => TriggerCursor::default(),
    })
}

async fn count_stats<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    tallied: &BTreeMap<(&str, &str, &'static str), i64>,
) -> Result<(), StoreError> {
    for ((canvas, step, stat), n) in tallied {
        execute(
            c,
            "INSERT INTO canvas_step_stats (workspace_id, canvas_id, step_id, stat, count)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (workspace_id, canvas_id, step_id, stat) DO UPDATE
                 SET count = canvas_step_stats.count + EXCLUDED.count",
            &[&workspace.0, canvas, step, stat, n],
        )
        .await?;
    }
    Ok(())
}

/// The journey columns of many journeys as one array each, in `JOURNEY_COLUMNS`' order, for
/// statements over `unnest` (the entry's insert and the settlement's update).
struct JourneyArrays<'a> {
    entry_id: Vec<&'a str>,
    version: Vec<i32>,
    variant_id: Vec<&'a str>,
    step_id: Vec<&'a str>,
    entered_at: Vec<i64>,
    step_at: Vec<i64>,
    due_at: Vec<i64>,
    converted: Vec<i16>,
    entry_properties: Vec<Option<&'a str>>,
    event_properties: Vec<Option<&'a str>>,
}

impl<'a> JourneyArrays<'a> {
    fn of(journeys: impl Iterator<Item = &'a Journey>) -> Result<Self, StoreError> {
        let mut a = JourneyArrays {
            entry_id: Vec::new(),
            version: Vec::new(),
            variant_id: Vec::new(),
            step_id: Vec::new(),
            entered_at: Vec::new(),
            step_at: Vec::new(),
            due_at: Vec::new(),
            converted: Vec::new(),
            entry_properties: Vec::new(),
            event_properties: Vec::new(),
        };
        for j in journeys {
            a.entry_id.push(&j.entry_id);
            a.version.push(version_of(j.version)?);
            a.variant_id.push(&j.variant_id);
            a.step_id.push(&j.step_id);
            a.entered_at.push(j.entered_at.0);
            a.step_at.push(j.step_at.0);
            a.due_at.push(j.due_at.0);
            a.converted.push(i16::from(j.converted));
            a.entry_properties.push(j.entry_properties.as_deref());
            a.event_properties.push(j.event_properties.as_deref());
        }
        Ok(a)
    }

    /// The ten arrays as statement parameters, in column order.
    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 10] {
        [
            &self.entry_id,
            &self.version,
            &self.variant_id,
            &self.step_id,
            &self.entered_at,
            &self.step_at,
            &self.due_at,
            &self.converted,
            &self.entry_properties,
            &self.event_properties,
        ]
    }
}

/// Decides and writes a scan's entries in a few statements (not five round trips each): the
/// Canvases' rows are locked (in id order), which serialises every entry into them, so what is
/// read next — journeys under way, entry receipts — cannot change before this commits. Then
/// each entry is decided in order, as one at a time would be: the Canvas exists, its entry
/// limit counts the entries accepted before this one, no journey is under way (nor started by
/// an earlier entry here), and the receipt rule of `take_receipt_rows` holds against the
/// receipt as earlier entries here left it. Returns which entries were accepted.
async fn admit_entries(
    tx: &Transaction<'_>,
    workspace: WorkspaceId,
    now: Millis,
    entries: &[NewEntry],
) -> Result<Vec<bool>, StoreError> {
    let mut accepted = vec![false; entries.len()];
    if entries.is_empty() {
        return Ok(accepted);
    }
    let mut canvas_ids: Vec<&str> = entries.iter().map(|e| e.canvas_id.as_str()).collect();
    canvas_ids.sort_unstable();
    canvas_ids.dedup();
    let mut counts: HashMap<String, i64> = HashMap::new();
    for r in query(
        tx,
        "SELECT id, entries FROM canvases WHERE workspace_id = $1 AND id = ANY($2::text[])
         ORDER BY id FOR UPDATE",
        &[&workspace.0, &canvas_ids],
    )
    .await?
    {
        counts.insert(get(&r, 0)?, get(&r, 1)?);
    }
    let keys: (Vec<&str>, Vec<i64>) = (
        entries.iter().map(|e| e.canvas_id.as_str()).collect(),
        entries.iter().map(|e| i64::from(e.user.0)).collect(),
    );
    let mut busy: HashSet<(String, i64)> = HashSet::new();
    for r in query(
        tx,
        "SELECT k.canvas_id, k.user_seq
         FROM unnest($2::text[], $3::bigint[]) AS k(canvas_id, user_seq)
         CROSS JOIN LATERAL (SELECT 1 FROM canvas_journeys j
             WHERE j.workspace_id = $1 AND j.canvas_id = k.canvas_id AND j.user_seq = k.user_seq
             LIMIT 1) j",
        &[&workspace.0, &keys.0, &keys.1],
    )
    .await?
    {
        busy.insert((get(&r, 0)?, get(&r, 1)?));
    }
    // The receipts as they stand: (entered_at) per (canvas, user).
    let mut receipts: HashMap<(String, i64), i64> = HashMap::new();
    for r in query(
        tx,
        "SELECT k.canvas_id, k.user_seq, r.entered_at
         FROM unnest($2::text[], $3::bigint[]) AS k(canvas_id, user_seq)
         CROSS JOIN LATERAL (SELECT r.entered_at FROM canvas_receipts r
             WHERE r.workspace_id = $1 AND r.canvas_id = k.canvas_id AND r.user_seq = k.user_seq
             LIMIT 1) r",
        &[&workspace.0, &keys.0, &keys.1],
    )
    .await?
    {
        receipts.insert((get(&r, 0)?, get(&r, 1)?), get(&r, 2)?);
    }
    // Decided in order; `taken` are the receipts to write (the last per key).
    let mut taken: BTreeMap<(String, i64), (i64, Option<i64>)> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let Some(count) = counts.get_mut(&e.canvas_id) else {
            continue;
        };
        if e.entry_limit
            .is_some_and(|limit| u64::try_from(*count).unwrap_or(0) >= limit)
        {
            continue;
        }
        let key = (e.canvas_id.clone(), i64::from(e.user.0));
        if busy.contains(&key) {
            continue;
        }
        // As `take_receipt_rows`: a first receipt, or the last one's entry plus this entry's
        // window at or before now (no window: never again).
        let free = match receipts.get(&key) {
            None => true,
            Some(&at) => e
                .reentry_after_ms
                .is_some_and(|w| i128::from(at) + i128::from(w) <= i128::from(now.0)),
        };
        if !free {
            continue;
        }
        accepted[i] = true;
        *count += 1;
        receipts.insert(key.clone(), now.0);
        taken.insert(key.clone(), (now.0, e.reentry_after_ms));
        if e.journey.is_some() {
            busy.insert(key);
        }
    }
    if taken.is_empty() {
        return Ok(accepted);
    }
    execute(
        tx,
        "INSERT INTO canvas_receipts AS r (workspace_id, user_seq, canvas_id, entered_at, window_ms)
         SELECT $1, x.u, x.c, x.t, x.w
         FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::bigint[]) AS x(u, c, t, w)
         ON CONFLICT (workspace_id, canvas_id, user_seq) DO UPDATE
             SET entered_at = EXCLUDED.entered_at, window_ms = EXCLUDED.window_ms",
        &[
            &workspace.0,
            &taken.keys().map(|k| k.1).collect::<Vec<_>>(),
            &taken.keys().map(|k| k.0.as_str()).collect::<Vec<_>>(),
            &taken.values().map(|v| v.0).collect::<Vec<_>>(),
            &taken.values().map(|v| v.1).collect::<Vec<_>>(),
        ],
    )
    .await?;
    let mut per_canvas: BTreeMap<&str, i64> = BTreeMap::new();
    for (e, _) in entries.iter().zip(&accepted).filter(|(_, a)| **a) {
        *per_canvas.entry(e.canvas_id.as_str()).or_default() += 1;
    }
    execute(
        tx,
        "UPDATE canvases c SET entries = c.entries + k.n,
             first_entry = COALESCE(c.first_entry, $2), last_entry = $2
         FROM unnest($3::text[], $4::bigint[]) AS k(id, n)
         WHERE c.workspace_id = $1 AND c.id = k.id",
        &[
            &workspace.0,
            &now.0,
            &per_canvas.keys().copied().collect::<Vec<_>>(),
            &per_canvas.values().copied().collect::<Vec<_>>(),
        ],
    )
    .await?;
    let starting: Vec<(&NewEntry, &Journey)> = entries
        .iter()
        .zip(&accepted)
        .filter(|(_, a)| **a)
        .filter_map(|(e, _)| e.journey.as_ref().map(|j| (e, j)))
        .collect();
    if !starting.is_empty() {
        let columns = JourneyArrays::of(starting.iter().map(|(_, j)| *j))?;
        let sql = format!(
            "INSERT INTO canvas_journeys (workspace_id, canvas_id, user_seq, {JOURNEY_COLUMNS}, wake_at)
             SELECT $1, k.canvas_id, k.user_seq, k.entry_id, k.version, k.variant_id, k.step_id,
                 k.entered_at, k.step_at, k.due_at, k.converted, k.entry_properties,
                 k.event_properties, k.due_at
             FROM unnest($2::text[], $3::bigint[], $4::text[], $5::integer[], $6::text[],
                     $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::smallint[],
                     $12::text[], $13::text[])
                 AS k(canvas_id, user_seq, entry_id, version, variant_id, step_id, entered_at,
                      step_at, due_at, converted, entry_properties, event_properties)"
        );
        let canvases: Vec<&str> = starting.iter().map(|(e, _)| e.canvas_id.as_str()).collect();
        let users: Vec<i64> = starting.iter().map(|(e, _)| i64::from(e.user.0)).collect();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&workspace.0, &canvases, &users];
        params.extend(columns.params());
        execute(tx, &sql, &params).await?;
    }
    // A new entry's conversions are counted afresh: the last journey's watch goes.
    execute(
        tx,
        "DELETE FROM canvas_conversion_watches w
         USING unnest($2::text[], $3::bigint[]) AS k(canvas_id, user_seq)
         WHERE w.workspace_id = $1 AND w.canvas_id = k.canvas_id AND w.user_seq = k.user_seq",
        &[
            &workspace.0,
            &taken.keys().map(|k| k.0.as_str()).collect::<Vec<_>>(),
            &taken.keys().map(|k| k.1).collect::<Vec<_>>(),
        ],
    )
    .await?;
    Ok(accepted)
}

async fn enter_canvas(
    store: &PgStore,
    workspace: WorkspaceId,
    now: Millis,
    scan: &CanvasScan,
) -> Result<ScanOutcome, StoreError> {
    let mut outcome = ScanOutcome::default();
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    if let Some((expected, new)) = &scan.cursor {
        let moved = if *expected == TriggerCursor::default() {
            execute(
                &tx,
                "INSERT INTO canvas_cursors (workspace_id, cursor_events, cursor_cohort_changes)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (workspace_id) DO UPDATE
                     SET cursor_events = EXCLUDED.cursor_events,
                         cursor_cohort_changes = EXCLUDED.cursor_cohort_changes
                     WHERE canvas_cursors.cursor_events = 0
                       AND canvas_cursors.cursor_cohort_changes = 0",
                &[&workspace.0, &new.events, &new.cohort_changes],
            )
            .await?
        } else {
            execute(
                &tx,
                "UPDATE canvas_cursors SET cursor_events = $4, cursor_cohort_changes = $5
                 WHERE workspace_id = $1 AND cursor_events = $2 AND cursor_cohort_changes = $3",
                &[
                    &workspace.0,
                    &expected.events,
                    &expected.cohort_changes,
                    &new.events,
                    &new.cohort_changes,
                ],
            )
            .await?
        };
        if moved == 0 {
            return Err(cas_conflict("the Canvas cursor"));
        }
    }
    if let Some((id, expected, new)) = &scan.next_run {
        let moved = execute(
            &tx,
            "UPDATE canvases SET next_run = $4
             WHERE workspace_id = $1 AND id = $2 AND next_run IS NOT DISTINCT FROM $3",
            &[&workspace.0, id, &expected.map(|m| m.0), &new.map(|m| m.0)],
        )
        .await?;
        if moved == 0 {
            return Err(cas_conflict("the Canvas's next run"));
        }
    }
    super::messaging::write_marks(
        &tx,
        workspace,
        (
            &scan.segment_trackers,
            crate::sqlite::messaging::TrackerOwner::Canvas,
        ),
        &scan.dispatches,
        scan.expansion.as_ref(),
    )
    .await?;
    let mut appends: Appends = Vec::new();
    let mut stats: Vec<(&str, &StepStat)> = Vec::new();
    let accepted = admit_entries(&tx, workspace, now, &scan.entries).await?;
    for (e, _) in scan.entries.iter().zip(&accepted).filter(|(_, a)| **a) {
        appends.extend(e.events.iter().map(|ev| (Some(e.user), ev.clone())));
        stats.extend(e.stats.iter().map(|s| (e.canvas_id.as_str(), s)));
        outcome.entered += 1;
    }
    outcome.refused += u64::try_from(accepted.iter().filter(|a| !**a).count()).unwrap_or(0);
    for item in &scan.inbox {
        let (kind, name, props) = happening_columns(&item.happening);
        let user = i64::from(item.user.0);
        let woke = execute(
            &tx,
            "UPDATE canvas_journeys SET wake_at = LEAST(wake_at, $4::bigint)
             WHERE workspace_id = $1 AND canvas_id = $2 AND user_seq = $3",
            &[&workspace.0, &item.canvas_id, &user, &item.happening.at.0],
        )
        .await?;
        if woke > 0 {
            execute(
                &tx,
                "INSERT INTO canvas_inbox (workspace_id, canvas_id, user_seq, at, kind, name, properties)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&workspace.0, &item.canvas_id, &user, &item.happening.at.0, &kind, &name, &props],
            )
            .await?;
            outcome.inboxed += 1;
        }
    }
    for c in &scan.conversions {
        let marked = execute(
            &tx,
            "UPDATE canvas_conversion_watches SET converted = converted | $5
             WHERE workspace_id = $1 AND canvas_id = $2 AND user_seq = $3
               AND entry_id = $4 AND converted & $5 = 0",
            &[
                &workspace.0,
                &c.canvas_id,
                &i64::from(c.user.0),
                &c.entry_id,
                &(1i16 << c.index),
            ],
        )
        .await?;
        if marked > 0 {
            appends.extend(c.events.iter().map(|ev| (Some(c.user), ev.clone())));
            stats.extend(c.stats.iter().map(|s| (c.canvas_id.as_str(), s)));
        }
    }
    execute(
        &tx,
        "DELETE FROM canvas_conversion_watches WHERE workspace_id = $1 AND until < $2",
        &[&workspace.0, &now.0],
    )
    .await?;
    count_stats(&tx, workspace, &tally(stats)).await?;
    append_in(&tx, workspace, &appends).await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(outcome)
}

async fn claim_journeys(
    store: &PgStore,
    owner: &str,
    now: Millis,
    lease_ms: u64,
    limit: usize,
) -> Result<Vec<ClaimedJourney>, StoreError> {
    let until = now
        .0
        .saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    let sql = format!(
        "WITH free AS (
             SELECT j.workspace_id, j.canvas_id, j.user_seq FROM canvas_journeys j
             JOIN canvases c ON c.workspace_id = j.workspace_id AND c.id = j.canvas_id
             WHERE j.wake_at <= $2 AND (j.lease_until IS NULL OR j.lease_until <= $2)
               AND c.status = 'active'
             ORDER BY j.wake_at LIMIT $4
             FOR UPDATE OF j SKIP LOCKED)
         UPDATE canvas_journeys s SET lease_owner = $1, lease_until = $3
         FROM free WHERE s.workspace_id = free.workspace_id AND s.canvas_id = free.canvas_id
             AND s.user_seq = free.user_seq
         RETURNING s.workspace_id, s.canvas_id, s.user_seq, s.wake_at, {}",
        JOURNEY_COLUMNS
            .split(", ")
            .map(|c| format!("s.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rows = query(&tx, &sql, &[&owner, &now.0, &until, &limit]).await?;
    let mut keys: (Vec<i64>, Vec<String>, Vec<i64>) = Default::default();
    for r in &rows {
        keys.0.push(get(r, 0)?);
        keys.1.push(get(r, 1)?);
        keys.2.push(get(r, 2)?);
    }
    // Every claimed journey's inbox in one statement (not a round trip per journey).
    let mut inboxes: BTreeMap<(i64, String, i64), Vec<(i64, Happening)>> = BTreeMap::new();
    for i in query(
        &tx,
        "SELECT i.workspace_id, i.canvas_id, i.user_seq, i.id, i.at, i.kind, i.name, i.properties
         FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS k(workspace_id, canvas_id, user_seq)
         JOIN canvas_inbox i ON i.workspace_id = k.workspace_id AND i.canvas_id = k.canvas_id
             AND i.user_seq = k.user_seq
         ORDER BY i.id",
        &[&keys.0, &keys.1, &keys.2],
    )
    .await?
    {
        inboxes
            .entry((get(&i, 0)?, get(&i, 1)?, get(&i, 2)?))
            .or_default()
            .push((
                get::<i64>(&i, 3)?,
                happening_of(get(&i, 4)?, get(&i, 5)?, get(&i, 6)?, get(&i, 7)?)?,
            ));
    }
    let mut claimed = Vec::with_capacity(rows.len());
    for r in &rows {
        let ws: i64 = get(r, 0)?;
        let canvas_id: String = get(r, 1)?;
        let user: i64 = get(r, 2)?;
        let wake: i64 = get(r, 3)?;
        let journey = raw_journey(r, 4)?;
        let inbox = inboxes
            .remove(&(ws, canvas_id.clone(), user))
            .unwrap_or_default();
        claimed.push((
            wake,
            ClaimedJourney {
                workspace: WorkspaceId(ws),
                canvas_id,
                user: UserSeq(
                    u32::try_from(user).map_err(|_| corrupt(format!("user seq {user}")))?,
                ),
                journey,
                inbox,
            },
        ));
    }
    tx.commit().await.map_err(pg_err)?;
    claimed.sort_by_key(|(wake, c)| (*wake, c.workspace, c.user));
    Ok(claimed.into_iter().map(|(_, c)| c).collect())
}

async fn settle_journeys(
    store: &PgStore,
    owner: &str,
    now: Millis,
    settlements: &[JourneySettlement],
) -> Result<u64, StoreError> {
    let (updating, plain): (Vec<&JourneySettlement>, Vec<&JourneySettlement>) =
        settlements.iter().partition(|s| s.user_update.is_some());
    let mut refused = 0;
    // A journey that ran User Update steps settles in the transaction of the users context's
    // unit of work that applies them: both commit, or neither.
    for s in updating {
        refused += settle_with_user_update(store, owner, now, s).await?;
    }
    if plain.is_empty() {
        return Ok(refused);
    }
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    refused += settle_in(&tx, owner, now, &plain).await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(refused)
}

/// Settles one journey that ran User Update steps: its lease is checked (and its row locked)
/// first, then the update is applied through the users context and the journey settled, in
/// that unit's transaction ([`AroundUnit`]). 1 if the lease was lost (nothing applied).
async fn settle_with_user_update(
    store: &PgStore,
    owner: &str,
    now: Millis,
    s: &JourneySettlement,
) -> Result<u64, StoreError> {
    let Some(update) = &s.user_update else {
        return Ok(0);
    };
    let request = update.request.clone();
    let work: UnitOfWork = Box::new(move |tx, ctx| {
        tideway_core::users::track(tx, ctx, &request).map(|_| Box::new(()) as WorkOutput)
    });
    let around = SettleAround {
        owner: owner.to_owned(),
        now,
        settlement: s.clone(),
    };
    let out = store
        .run_unit_around(&update.workspace, now, work, Box::new(around))
        .await?;
    Ok(u64::from(out.is::<Skipped>()))
}

/// A settlement around the unit of work that applies its User Update steps.
struct SettleAround {
    owner: String,
    now: Millis,
    settlement: JourneySettlement,
}

impl AroundUnit for SettleAround {
    fn before(&mut self, rt: &Handle, tx: &Transaction<'_>) -> Result<bool, StoreError> {
        let s = &self.settlement;
        rt.block_on(lease_held(tx, &self.owner, s))
    }

    fn after(&mut self, rt: &Handle, tx: &Transaction<'_>) -> Result<(), StoreError> {
        let one = [&self.settlement];
        let refused = rt.block_on(settle_in(tx, &self.owner, self.now, &one))?;
        if refused > 0 {
            // `before` locked the row with the lease held: nothing can have taken it since.
            return Err(corrupt(
                "a journey's lease was lost while its row was locked",
            ));
        }
        Ok(())
    }
}

/// Whether `owner` still holds the journey's lease (for its entry), locking its row.
async fn lease_held<C: GenericClient>(
    tx: &C,
    owner: &str,
    s: &JourneySettlement,
) -> Result<bool, StoreError> {
    Ok(query_opt(
        tx,
        "SELECT 1 FROM canvas_journeys
         WHERE workspace_id = $1 AND canvas_id = $2 AND user_seq = $3
           AND entry_id = $4 AND lease_owner = $5 FOR UPDATE",
        &[
            &s.workspace.0,
            &s.canvas_id,
            &i64::from(s.user.0),
            &s.entry_id,
            &owner,
        ],
    )
    .await?
    .is_some())
}

/// Which settlements' journeys `owner` still leases for the same entry (by index), locking
/// those rows in key order with one statement (so two calls never deadlock). A journey named twice is held for its first
/// settlement only, as if they had run one after the other (the first releases the lease).
async fn held_leases(
    tx: &Transaction<'_>,
    owner: &str,
    settlements: &[&JourneySettlement],
) -> Result<Vec<bool>, StoreError> {
    let mut accepted = vec![false; settlements.len()];
    if settlements.is_empty() {
        return Ok(accepted);
    }
    // Probed in key order, each a primary-key look-up that locks its row (a join let the
    // planner hash the whole table: 190 ms per 1,000).
    let mut order: Vec<usize> = (0..settlements.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&settlements[a], &settlements[b]);
        (a.workspace, &a.canvas_id, a.user).cmp(&(b.workspace, &b.canvas_id, b.user))
    });
    let rows = query(
        tx,
        "SELECT k.i FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[])
                 AS k(workspace_id, canvas_id, user_seq, entry_id, i)
             CROSS JOIN LATERAL (SELECT 1 FROM canvas_journeys j
                 WHERE j.workspace_id = k.workspace_id AND j.canvas_id = k.canvas_id
                   AND j.user_seq = k.user_seq AND j.entry_id = k.entry_id
                   AND j.lease_owner = $6
                 FOR UPDATE) j",
        &[
            &order
                .iter()
                .map(|&i| settlements[i].workspace.0)
                .collect::<Vec<_>>(),
            &order
                .iter()
                .map(|&i| settlements[i].canvas_id.as_str())
                .collect::<Vec<_>>(),
            &order
                .iter()
                .map(|&i| i64::from(settlements[i].user.0))
                .collect::<Vec<_>>(),
            &order
                .iter()
                .map(|&i| settlements[i].entry_id.as_str())
                .collect::<Vec<_>>(),
            &order
                .iter()
                .map(|&i| i64::try_from(i).unwrap_or(i64::MAX))
                .collect::<Vec<_>>(),
            &owner,
        ],
    )
    .await?;
    let mut seen = std::collections::HashSet::new();
    for r in &rows {
        let i = usize::try_from(get::<i64>(r, 0)?)
            .ok()
            .filter(|&i| i < settlements.len())
            .ok_or_else(|| corrupt("a settlement's index"))?;
        let s = settlements[i];
        if seen.insert((s.workspace, s.canvas_id.as_str(), s.user)) {
            accepted[i] = true;
        }
    }
    Ok(accepted)
}

/// Settles `settlements` in `tx`: those whose lease `owner` still holds are applied, the
/// others refused (counted). Rows are locked in key order (two calls never deadlock); events
/// are appended in call order, as on SQLite. A batch is a few statements whatever its size
/// (each over `unnest` arrays), not a round trip per journey: one lease check that locks the
/// held journeys, then each kind of write for all of them.
async fn settle_in(
    tx: &Transaction<'_>,
    owner: &str,
    now: Millis,
    settlements: &[&JourneySettlement],
) -> Result<u64, StoreError> {
    let mut appends: BTreeMap<WorkspaceId, Appends> = BTreeMap::new();
    let mut stats: BTreeMap<WorkspaceId, Vec<(&str, &StepStat)>> = BTreeMap::new();
    let accepted = held_leases(tx, owner, settlements).await?;
    for (s, _) in settlements.iter().zip(&accepted).filter(|(_, a)| **a) {
        if let Some(send) = s.sends.iter().find(|d| d.dispatch.workspace != s.workspace) {
            return Err(corrupt(format!(
                "dispatch {} of another workspace",
                send.dispatch.id
            )));
        }
    }
    let refused = u64::try_from(accepted.iter().filter(|a| !**a).count()).unwrap_or(u64::MAX);
    // In key order, as the rows were locked; sends take their ids in that order.
    let mut order: Vec<usize> = (0..settlements.len()).filter(|&k| accepted[k]).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&settlements[a], &settlements[b]);
        (a.workspace, &a.canvas_id, a.user).cmp(&(b.workspace, &b.canvas_id, b.user))
    });
    let key = |s: &JourneySettlement| (s.workspace.0, s.canvas_id.clone(), i64::from(s.user.0));

    let mut upto: (Vec<i64>, Vec<String>, Vec<i64>, Vec<i64>) = Default::default();
    for s in order.iter().map(|&k| settlements[k]) {
        if let Some(id) = s.inbox_upto {
            let (ws, canvas, user) = key(s);
            upto.0.push(ws);
            upto.1.push(canvas);
            upto.2.push(user);
            upto.3.push(id);
        }
    }
    if !upto.0.is_empty() {
        execute(
            tx,
            "DELETE FROM canvas_inbox i
             USING unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[])
                 AS k(workspace_id, canvas_id, user_seq, upto)
             WHERE i.workspace_id = k.workspace_id AND i.canvas_id = k.canvas_id
               AND i.user_seq = k.user_seq AND i.id <= k.upto",
            &[&upto.0, &upto.1, &upto.2, &upto.3],
        )
        .await?;
    }

    let moving: Vec<(&JourneySettlement, &Journey)> = order
        .iter()
        .map(|&k| settlements[k])
        .filter_map(|s| s.journey.as_ref().map(|j| (s, j)))
        .collect();
    if !moving.is_empty() {
        let keys: Vec<_> = moving.iter().map(|(s, _)| key(s)).collect();
        let (ws, canvases, users): (Vec<i64>, Vec<&str>, Vec<i64>) = (
            keys.iter().map(|k| k.0).collect(),
            keys.iter().map(|k| k.1.as_str()).collect(),
            keys.iter().map(|k| k.2).collect(),
        );
        let columns = JourneyArrays::of(moving.iter().map(|(_, j)| *j))?;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&ws, &canvases, &users];
        params.extend(columns.params());
        params.push(&now.0);
        execute(
            tx,
            "UPDATE canvas_journeys j SET entry_id = k.entry_id, version = k.version,
                 variant_id = k.variant_id, step_id = k.step_id, entered_at = k.entered_at,
                 step_at = k.step_at, due_at = k.due_at, converted = k.converted,
                 entry_properties = k.entry_properties, event_properties = k.event_properties,
                 wake_at = CASE WHEN EXISTS (SELECT 1 FROM canvas_inbox i
                     WHERE i.workspace_id = k.workspace_id AND i.canvas_id = k.canvas_id
                       AND i.user_seq = k.user_seq)
                     THEN LEAST(k.due_at, $14::bigint) ELSE k.due_at END,
                 lease_owner = NULL, lease_until = NULL
             FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::integer[],
                     $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],
                     $11::smallint[], $12::text[], $13::text[])
                 AS k(workspace_id, canvas_id, user_seq, entry_id, version, variant_id, step_id,
                      entered_at, step_at, due_at, converted, entry_properties, event_properties)
             WHERE j.workspace_id = k.workspace_id AND j.canvas_id = k.canvas_id
               AND j.user_seq = k.user_seq",
            &params,
        )
        .await?;
    }

    let ended: Vec<&JourneySettlement> = order
        .iter()
        .map(|&k| settlements[k])
        .filter(|s| s.journey.is_none())
        .collect();
    if !ended.is_empty() {
        let keys: Vec<_> = ended.iter().map(|s| key(s)).collect();
        let (ws, canvas, user): (Vec<i64>, Vec<&str>, Vec<i64>) = (
            keys.iter().map(|k| k.0).collect(),
            keys.iter().map(|k| k.1.as_str()).collect(),
            keys.iter().map(|k| k.2).collect(),
        );
        for table in ["canvas_journeys", "canvas_inbox"] {
            execute(
                tx,
                &format!(
                    "DELETE FROM {table} t
                     USING unnest($1::bigint[], $2::text[], $3::bigint[])
                         AS k(workspace_id, canvas_id, user_seq)
                     WHERE t.workspace_id = k.workspace_id AND t.canvas_id = k.canvas_id
                       AND t.user_seq = k.user_seq"
                ),
                &[&ws, &canvas, &user],
            )
            .await?;
        }
        let watched: Vec<(&JourneySettlement, &ConversionWatch)> = ended
            .iter()
            .filter_map(|s| s.watch.as_ref().map(|w| (*s, w)))
            .collect();
        if !watched.is_empty() {
            let keys: Vec<_> = watched.iter().map(|(s, _)| key(s)).collect();
            let versions = watched
                .iter()
                .map(|(_, w)| version_of(w.version))
                .collect::<Result<Vec<i32>, _>>()?;
            execute(
                tx,
                "INSERT INTO canvas_conversion_watches (workspace_id, canvas_id, user_seq,
                     entry_id, version, variant_id, step_id, entered_at, converted, until)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[],
                     $5::integer[], $6::text[], $7::text[], $8::bigint[], $9::smallint[],
                     $10::bigint[])
                 ON CONFLICT (workspace_id, canvas_id, user_seq) DO UPDATE SET
                     entry_id = EXCLUDED.entry_id, version = EXCLUDED.version,
                     variant_id = EXCLUDED.variant_id, step_id = EXCLUDED.step_id,
                     entered_at = EXCLUDED.entered_at, converted = EXCLUDED.converted,
                     until = EXCLUDED.until",
                &[
                    &keys.iter().map(|k| k.0).collect::<Vec<_>>(),
                    &keys.iter().map(|k| k.1.as_str()).collect::<Vec<_>>(),
                    &keys.iter().map(|k| k.2).collect::<Vec<_>>(),
                    &watched
                        .iter()
                        .map(|(_, w)| w.entry_id.as_str())
                        .collect::<Vec<_>>(),
                    &versions,
                    &watched
                        .iter()
                        .map(|(_, w)| w.variant_id.as_str())
                        .collect::<Vec<_>>(),
                    &watched
                        .iter()
                        .map(|(_, w)| w.step_id.as_str())
                        .collect::<Vec<_>>(),
                    &watched
                        .iter()
                        .map(|(_, w)| w.entered_at.0)
                        .collect::<Vec<_>>(),
                    &watched
                        .iter()
                        .map(|(_, w)| i16::from(w.converted))
                        .collect::<Vec<_>>(),
                    &watched.iter().map(|(_, w)| w.until.0).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
    }

    let sends: Vec<(&JourneySettlement, &CanvasSend)> = order
        .iter()
        .map(|&k| settlements[k])
        .flat_map(|s| s.sends.iter().map(move |d| (s, d)))
        .collect();
    if !sends.is_empty() {
        // A Message step's dispatch is shared by all its sends: created once, by the first.
        let mut dispatches: Vec<&DispatchRecord> = Vec::new();
        for (_, send) in &sends {
            if !dispatches
                .iter()
                .any(|d| d.workspace == send.dispatch.workspace && d.id == send.dispatch.id)
            {
                dispatches.push(&send.dispatch);
            }
        }
        for d in dispatches {
            let exists = query_opt(
                tx,
                "SELECT 1 FROM dispatches WHERE workspace_id = $1 AND id = $2",
                &[&d.workspace.0, &d.id],
            )
            .await?
            .is_some();
            if !exists {
                insert_dispatch(tx, d).await?;
            }
        }
        execute(
            tx,
            "INSERT INTO sends (workspace_id, dispatch_id, user_seq, variant, due_at, properties,
                 state)
             SELECT k.workspace_id, k.dispatch_id, k.user_seq, k.variant, k.due_at, k.properties,
                 'pending'
             FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                     $6::text[])
                 WITH ORDINALITY AS k(workspace_id, dispatch_id, user_seq, variant, due_at,
                                      properties, ord)
             ORDER BY k.ord",
            &[
                &sends.iter().map(|(s, _)| s.workspace.0).collect::<Vec<_>>(),
                &sends
                    .iter()
                    .map(|(_, d)| d.job.dispatch_id.as_str())
                    .collect::<Vec<_>>(),
                &sends
                    .iter()
                    .map(|(s, _)| i64::from(s.user.0))
                    .collect::<Vec<_>>(),
                &sends
                    .iter()
                    .map(|(_, d)| d.job.variant.as_str())
                    .collect::<Vec<_>>(),
                &sends
                    .iter()
                    .map(|(_, d)| d.job.due_at.0)
                    .collect::<Vec<_>>(),
                &sends
                    .iter()
                    .map(|(_, d)| d.job.properties.as_deref())
                    .collect::<Vec<_>>(),
            ],
        )
        .await?;
    }
    for (s, _) in settlements
        .iter()
        .copied()
        .zip(&accepted)
        .filter(|(_, a)| **a)
    {
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
        count_stats(tx, ws, &tally(items)).await?;
    }
    for (ws, events) in &appends {
        append_in(tx, *ws, events).await?;
    }
    Ok(refused)
}

impl CanvasStore for PgStore {
    fn create_canvas(
        &self,
        workspace: WorkspaceId,
        record: CanvasRecord,
    ) -> StoreFuture<'_, CanvasRecord> {
        Box::pin(async move { create_canvas(self, workspace, &record).await })
    }

    fn canvas(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, Option<CanvasRecord>> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(None) });
        }
        Box::pin(async move {
            let client = self.pool.client().await?;
            canvas(&client, workspace, &id).await
        })
    }

    fn list_canvases(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<CanvasRecord>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let sql = format!(
                "SELECT {CANVAS_COLUMNS} FROM canvases WHERE workspace_id = $1
                 ORDER BY created_at, id"
            );
            query(&client, &sql, &[&workspace.0])
                .await?
                .iter()
                .map(|r| raw_canvas(r)?.parse())
                .collect()
        })
    }

    fn save_canvas(
        &self,
        workspace: WorkspaceId,
        record: CanvasRecord,
    ) -> StoreFuture<'_, Option<CanvasRecord>> {
        Box::pin(async move { save_canvas(self, workspace, &record).await })
    }

    fn delete_canvas(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(false) });
        }
        Box::pin(async move { delete_canvas(self, workspace, &id).await })
    }

    fn canvas_version(
        &self,
        workspace: WorkspaceId,
        id: &str,
        version: u32,
    ) -> StoreFuture<'_, Option<Value>> {
        let id = id.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let row = query_opt(
                &client,
                "SELECT definition FROM canvas_versions
                 WHERE workspace_id = $1 AND canvas_id = $2 AND version = $3",
                &[&workspace.0, &id, &version_of(version)?],
            )
            .await?;
            row.map(|r| {
                serde_json::from_str(get::<&str>(&r, 0)?)
                    .map_err(|e| corrupt(format!("canvas version: {e}")))
            })
            .transpose()
        })
    }

    fn active_canvases(&self) -> StoreFuture<'_, Vec<(WorkspaceId, CanvasRecord)>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let sql = format!(
                "SELECT {CANVAS_COLUMNS}, workspace_id FROM canvases WHERE status = 'active'
                 ORDER BY workspace_id, created_at, id"
            );
            query(&client, &sql, &[])
                .await?
                .iter()
                .map(|r| Ok((WorkspaceId(get(r, 14)?), raw_canvas(r)?.parse()?)))
                .collect()
        })
    }

    fn canvas_cursor(&self, workspace: WorkspaceId) -> StoreFuture<'_, TriggerCursor> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            canvas_cursor(&client, workspace).await
        })
    }

    fn enter_canvas(
        &self,
        workspace: WorkspaceId,
        now: Millis,
        scan: CanvasScan,
    ) -> StoreFuture<'_, ScanOutcome> {
        Box::pin(async move { enter_canvas(self, workspace, now, &scan).await })
    }

    fn claim_journeys(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<ClaimedJourney>> {
        let owner = owner.to_owned();
        Box::pin(async move { claim_journeys(self, &owner, now, lease_ms, limit).await })
    }

    fn settle_journeys(
        &self,
        owner: &str,
        now: Millis,
        settlements: Vec<JourneySettlement>,
    ) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        Box::pin(async move { settle_journeys(self, &owner, now, &settlements).await })
    }

    fn next_journey_due(&self) -> StoreFuture<'_, Option<Millis>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let row = query_one(
                &client,
                "SELECT min(GREATEST(j.wake_at, COALESCE(j.lease_until, 0))) FROM (
                     SELECT workspace_id, canvas_id, wake_at, lease_until FROM canvas_journeys
                     ORDER BY wake_at LIMIT 1000) j
                 JOIN canvases c ON c.workspace_id = j.workspace_id AND c.id = j.canvas_id
                 WHERE c.status = 'active'",
                &[],
            )
            .await?;
            Ok(get::<Option<i64>>(&row, 0)?.map(Millis))
        })
    }

    fn release_journey_leases(&self, owner: &str) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            execute(
                &client,
                "UPDATE canvas_journeys SET lease_owner = NULL, lease_until = NULL
                 WHERE lease_owner = $1",
                &[&owner],
            )
            .await
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
        Box::pin(async move {
            let client = self.pool.client().await?;
            let seqs: Vec<i64> = users.iter().map(|u| i64::from(u.0)).collect();
            let rows = query(
                &client,
                "SELECT user_seq, entry_id, version, variant_id, step_id, entered_at, converted,
                        until
                 FROM canvas_conversion_watches
                 WHERE workspace_id = $1 AND canvas_id = $2 AND user_seq = ANY($3)
                   AND until >= $4
                 ORDER BY user_seq",
                &[&workspace.0, &canvas_id, &seqs, &now.0],
            )
            .await?;
            rows.iter()
                .map(|r| {
                    let seq: i64 = get(r, 0)?;
                    let version: i32 = get(r, 2)?;
                    let converted: i16 = get(r, 6)?;
                    Ok((
                        UserSeq(
                            u32::try_from(seq).map_err(|_| corrupt(format!("user seq {seq}")))?,
                        ),
                        ConversionWatch {
                            entry_id: get(r, 1)?,
                            version: u32::try_from(version)
                                .map_err(|_| corrupt(format!("version {version}")))?,
                            variant_id: get(r, 3)?,
                            step_id: get(r, 4)?,
                            entered_at: Millis(get(r, 5)?),
                            converted: u8::try_from(converted)
                                .map_err(|_| corrupt(format!("converted {converted}")))?,
                            until: Millis(get(r, 7)?),
                        },
                    ))
                })
                .collect()
        })
    }

    fn canvas_step_counts(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, Vec<StepCounts>> {
        let id = id.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let stats = query(
                &client,
                "SELECT step_id, stat, count FROM canvas_step_stats
                 WHERE workspace_id = $1 AND canvas_id = $2",
                &[&workspace.0, &id],
            )
            .await?
            .iter()
            .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
            let in_step = query(
                &client,
                "SELECT step_id, COUNT(*) FROM canvas_journeys
                 WHERE workspace_id = $1 AND canvas_id = $2 GROUP BY step_id",
                &[&workspace.0, &id],
            )
            .await?
            .iter()
            .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
            step_counts(stats, in_step)
        })
    }

    fn dispatch_send_counts(
        &self,
        workspace: WorkspaceId,
        dispatch_ids: Vec<String>,
    ) -> StoreFuture<'_, Vec<SendCounts>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let mut out = Vec::with_capacity(dispatch_ids.len());
            for id in &dispatch_ids {
                let rows = query(
                    &client,
                    "SELECT state, COUNT(*) FROM sends
                     WHERE workspace_id = $1 AND dispatch_id = $2 GROUP BY state",
                    &[&workspace.0, id],
                )
                .await?
                .iter()
                .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
                .collect::<Result<Vec<(String, i64)>, StoreError>>()?;
                out.push(send_counts(rows));
            }
            Ok(out)
        })
    }
}
