//! What the writer does behind the acknowledgements: writing deferred `users` rows, deleting
//! the `user_log` rows that are superseded, and indexing custom events and purchases per user.
//!
//! Why: on `/users/track` nearly every object changes a different user, and a B-tree row
//! rewritten in place dirties a whole page, which the WAL then logs whole: done at commit
//! time, the ingest path wrote a page per object. So a saved profile is only *appended* to
//! `user_log` in the acknowledging transaction (many post-images per page, durable with the
//! Currents events), the writer's cache holds the user as the truth, and the **sweep** writes
//! the dirty rows a little at a time after each batch, walking them in row order so that the
//! rows sharing a page are written together. One sweep visits every user that was dirty when
//! it started, paced to take about [`SWEEP_PERIOD`]; when it ends, every `user_log` row
//! logged before it started is superseded and is deleted (in chunks, so no batch stalls).
//!
//! The same holds for the per-user index of behaviours the segment loader reads
//! (`user_behaviors`): it is filled from `event_log` in sorted batches, and
//! `store_marks.behaviors_indexed_upto` says how far; readers read the rest from the log. It
//! is filled only once some workspace has a segment (nothing else reads it), a bounded chunk
//! per batch, so a first segment on a long history is caught up without a stall.
//!
//! Readers that need profiles as of now (export, segments) first ask the writer to
//! [`flush_workspace`]. Opening the store, and any rollback that may have undone what the cache
//! remembered, resets: the cache is dropped ([`forget`]) and `user_log` is replayed into
//! `users` ([`replay`], each user's last logged state), which makes the rows the truth again.
//! Between a forget and a successful replay the rows may be stale, so the writer runs no job
//! in between (it refuses them, and retries the replay every batch).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use tideway_core::store::StoreError;

use super::segments::BEHAVIOR_TYPES;
use super::sql_err;
use super::users::{LogEntry, UserCache};

/// About how long one sweep over the dirty users takes, by default. Longer means fewer row
/// writes (a user changed many times is written once) and a longer `user_log` to replay after
/// a crash.
pub const SWEEP_PERIOD: Duration = Duration::from_secs(4);

/// How often an idle writer wakes to do a step.
pub const TICK: Duration = Duration::from_millis(250);

/// Above this many dirty users the sweep writes faster than its pace (bounded memory).
const MAX_DIRTY: usize = 250_000;

/// Most rows one batch writes beyond the sweep's pace (when dirty users pile up past
/// [`MAX_DIRTY`]), and most superseded `user_log` rows (one job's post-images each, tens of
/// KB) one batch deletes: every batch's step stays a few milliseconds, whatever piled up.
const MAX_EXTRA_ROWS: usize = 1_024;
const DELETE_CHUNK: i64 = 128;

/// How often behaviours are indexed while segments are in use, and how often the writer looks
/// whether they are (a segment created by another process shows up within this).
const INDEX_EVERY: Duration = Duration::from_millis(500);

/// Most `event_log` positions one step indexes: a first segment on a long history is caught up
/// over many batches, none of which stalls.
const INDEX_CHUNK: i64 = 200_000;

/// The writer's bookkeeping for work behind the acknowledgements.
#[derive(Debug)]
pub struct Behind {
    period: Duration,
    sweep: Option<Sweep>,
    /// `user_log` rows with ids up to this are superseded (a finished sweep covered them).
    deletable_upto: i64,
    /// ... and up to this they are gone.
    deleted_upto: i64,
    last_indexed: Instant,
    /// Whether any workspace has a segment: until one does, nothing reads `user_behaviors`,
    /// so the writer does not fill it (a segment's first load scans `event_log` anyway).
    segments_in_use: bool,
}

impl Behind {
    /// Sweeps paced to take about `period` each.
    pub fn new(period: Duration) -> Self {
        Behind {
            period: period.max(Duration::from_millis(1)),
            sweep: None,
            deletable_upto: 0,
            deleted_upto: 0,
            last_indexed: Instant::now() - INDEX_EVERY,
            segments_in_use: false,
        }
    }
}

#[derive(Debug)]
struct Sweep {
    started: Instant,
    /// Dirty users when it started (the pace is set by them).
    planned: usize,
    written: usize,
    /// Next row key to visit.
    cursor: (i64, u32),
    /// The last `user_log` id when it started: all rows up to it are superseded at its end.
    log_upto: i64,
}

/// Drops what the writer remembers of users (the cache, the sweep in progress) after a
/// rollback that may have undone some of it. The caller then [`replay`]s `user_log`, and
/// until a replay succeeds the rows are stale: no write may read them (the writer refuses
/// writes; see `SqliteStore`'s recovery).
pub fn forget(cache: &mut UserCache, behind: &mut Behind) {
    cache.clear();
    behind.sweep = None;
}

/// Writes each user's last logged state into their row, then empties the log.
pub fn replay(conn: &Connection) -> Result<usize, StoreError> {
    let mut latest: BTreeMap<(i64, u32), LogEntry> = BTreeMap::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT entries FROM user_log ORDER BY id")
            .map_err(sql_err)?;
        let mut rows = stmt.query([]).map_err(sql_err)?;
        while let Some(row) = rows.next().map_err(sql_err)? {
            let bytes = row
                .get_ref(0)
                .and_then(|v| v.as_blob().map_err(Into::into))
                .map_err(sql_err)?;
            for entry in LogEntry::decode(bytes)? {
                latest.insert((entry.workspace, entry.seq), entry);
            }
        }
    }
    let mut stmt = conn
        .prepare_cached(
            "UPDATE OR FAIL users SET created_at = ?3, updated_at = ?4, profile = ?5
             WHERE workspace_id = ?1 AND seq = ?2 AND deleted_at IS NULL",
        )
        .map_err(sql_err)?;
    for ((ws, seq), entry) in &latest {
        stmt.execute(params![
            ws,
            seq,
            entry.created_at,
            entry.updated_at,
            entry.profile
        ])
        .map_err(sql_err)?;
    }
    conn.execute("DELETE FROM user_log", []).map_err(sql_err)?;
    Ok(latest.len())
}

/// The id the next `user_log` row may take (above any row present).
pub fn next_log_id(conn: &Connection) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT COALESCE(MAX(id), 0) + 1 FROM user_log")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(sql_err)
}

/// One step after a batch, inside its transaction: index behaviours when due, write the next
/// part of the sweep, delete a chunk of superseded log rows.
pub fn step(
    conn: &Connection,
    cache: &mut UserCache,
    behind: &mut Behind,
) -> Result<(), StoreError> {
    let now = Instant::now();
    if now.duration_since(behind.last_indexed) >= INDEX_EVERY {
        if !behind.segments_in_use {
            behind.segments_in_use = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM segments)")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(sql_err)?;
        }
        let caught_up = !behind.segments_in_use || index_behaviors(conn)?;
        // Behind by more than a chunk: the next batch indexes the next one.
        if caught_up {
            behind.last_indexed = now;
        }
    }
    sweep_step(conn, cache, behind, now)?;
    if behind.deleted_upto < behind.deletable_upto {
        let upto = behind
            .deletable_upto
            .min(behind.deleted_upto + DELETE_CHUNK);
        conn.prepare_cached("DELETE FROM user_log WHERE id <= ?1")
            .and_then(|mut s| s.execute([upto]))
            .map_err(sql_err)?;
        behind.deleted_upto = upto;
    }
    metrics::gauge!("tideway_store_dirty_users").set(cache.dirty_len() as f64);
    Ok(())
}

fn sweep_step(
    conn: &Connection,
    cache: &mut UserCache,
    behind: &mut Behind,
    now: Instant,
) -> Result<(), StoreError> {
    let sweep = match &mut behind.sweep {
        Some(sweep) => sweep,
        None if cache.dirty.is_empty() => return Ok(()),
        None => behind.sweep.insert(Sweep {
            started: now,
            planned: cache.dirty.len(),
            written: 0,
            cursor: (i64::MIN, 0),
            log_upto: cache.next_log_id - 1,
        }),
    };
    let elapsed = now.duration_since(sweep.started).as_secs_f64();
    // The pace: `planned` rows per period, kept up past the period (the sweep also visits
    // users dirtied after it started, ahead of its cursor), so no batch writes a burst.
    let share = elapsed / behind.period.as_secs_f64();
    let mut due =
        ((sweep.planned.max(1) as f64 * share).ceil() as usize).saturating_sub(sweep.written);
    let excess = cache.dirty.len().saturating_sub(MAX_DIRTY);
    due = due.max(excess.min(MAX_EXTRA_ROWS));
    let keys: Vec<(i64, u32)> = cache
        .dirty
        .range(sweep.cursor..)
        .take(due)
        .map(|(k, _)| *k)
        .collect();
    let finished = keys.len() < due || cache.dirty.range(sweep.cursor..).nth(keys.len()).is_none();
    write_rows(conn, cache, &keys)?;
    sweep.written += keys.len();
    if let Some(&(ws, seq)) = keys.last() {
        sweep.cursor = match seq.checked_add(1) {
            Some(next) => (ws, next),
            None => (ws + 1, 0),
        };
    }
    if finished {
        behind.deletable_upto = behind.deletable_upto.max(sweep.log_upto);
        behind.sweep = None;
    }
    Ok(())
}

/// Writes the pending rows of `keys` (in key order) and marks those users clean. Their
/// `users` rows are current in this transaction; if it rolls back, the writer resets.
fn write_rows(
    conn: &Connection,
    cache: &mut UserCache,
    keys: &[(i64, u32)],
) -> Result<(), StoreError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut stmt = conn
        .prepare_cached(
            "UPDATE OR FAIL users SET created_at = ?3, updated_at = ?4, profile = ?5
             WHERE workspace_id = ?1 AND seq = ?2 AND deleted_at IS NULL",
        )
        .map_err(sql_err)?;
    for key in keys {
        if let Some(row) = cache.dirty.remove(key) {
            stmt.execute(params![
                key.0,
                key.1,
                row.created_at,
                row.updated_at,
                row.profile
            ])
            .map_err(sql_err)?;
        }
    }
    metrics::counter!("tideway_store_rows_written_behind_total").increment(keys.len() as u64);
    Ok(())
}

/// Writes every dirty row of `workspace`: after it commits, the workspace's `users` rows are
/// current. (Behaviours are not indexed here: readers scan the few `user_behaviors` does not
/// cover yet in the log.)
pub fn flush_workspace(
    conn: &Connection,
    cache: &mut UserCache,
    workspace: i64,
) -> Result<(), StoreError> {
    let keys: Vec<(i64, u32)> = cache
        .dirty
        .range((workspace, 0)..=(workspace, u32::MAX))
        .map(|(k, _)| *k)
        .collect();
    write_rows(conn, cache, &keys)
}

/// Indexes the custom events and purchases logged since the last time (at most
/// [`INDEX_CHUNK`] log positions), sorted by user so the index pages they land on are written
/// once per batch. Returns whether the index has caught up with the log.
fn index_behaviors(conn: &Connection) -> Result<bool, StoreError> {
    let upto = indexed_upto(conn)?;
    let log_head: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM event_log")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(sql_err)?;
    let head = log_head.min(upto.saturating_add(INDEX_CHUNK));
    if head <= upto {
        return Ok(true);
    }
    conn.prepare_cached(&format!(
        "INSERT OR IGNORE INTO user_behaviors (workspace_id, user_seq, log_seq)
         SELECT workspace_id, user_seq, seq FROM event_log
         WHERE seq > ?1 AND seq <= ?2 AND user_seq IS NOT NULL AND event_type IN {BEHAVIOR_TYPES}
         ORDER BY workspace_id, user_seq, seq"
    ))
    .and_then(|mut s| s.execute([upto, head]))
    .map_err(sql_err)?;
    conn.prepare_cached("UPDATE store_marks SET value = ?1 WHERE name = 'behaviors_indexed_upto'")
        .and_then(|mut s| s.execute([head]))
        .map_err(sql_err)?;
    Ok(head == log_head)
}

/// How far `user_behaviors` covers `event_log` (read in the caller's transaction).
pub fn indexed_upto(conn: &Connection) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT value FROM store_marks WHERE name = 'behaviors_indexed_upto'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(sql_err)
}
