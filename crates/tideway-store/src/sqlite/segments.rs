//! Segments over SQLite: the `segments` table, and the profile feed the segment index is built
//! and kept fresh from.
//!
//! A profile for segment evaluation is the user row (identifiers, attributes) plus every
//! occurrence of its custom events and purchases, read from `event_log`, plus its cohort
//! memberships. A full load ([`snapshot`]) reads all of it. The change feed after a position
//! ([`changes`]) is incremental, so a round costs what changed, not the changed users' history:
//!
//! - the custom events and purchases in `event_log` after the position, in log order, become
//!   occurrences to append;
//! - users named by any other `event_log` row (a profile update, a delete request, an orphan) or
//!   by `segment_user_changes` (creation and identifier changes, which write no event) get their
//!   *current attributes*: the row, whose identifier columns are always current, with the
//!   user's newest post-image in `user_log` laid over it (see below); a user whose row is gone
//!   or deleted is removed;
//! - a merge's survivor (named by the `users.UserOrphan` row) is reloaded whole, since its
//!   history gained the loser's;
//! - `cohort_membership_changes` rows are deltas.
//!
//! **No flush.** A saved profile reaches its `users` row only when the writer's sweep gets to it
//! (`behind.rs`); until then the committed truth is its newest post-image in `user_log`. The
//! sweep deletes `user_log` rows only as a prefix (ids up to one a finished sweep covered), and
//! only after writing every row they were behind for, so: a user's newest post-image still in
//! `user_log` is their current profile, and a user with none there has a current row. The feed
//! therefore scans `user_log` from the newest row down until it has seen every user it needs,
//! and reads the row for the others — whether their post-images were deleted by a sweep since
//! the position (a reader far behind, or after a restart, whose replay empties `user_log`), or
//! they never had one. A user changed after the position logged their post-image after it, so
//! the scan normally stops within the rows logged since the last round.
//!
//! Each read runs in one read transaction, so the positions it returns match exactly the data it
//! loaded.

use std::collections::{BTreeSet, HashMap};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;
use tideway_core::clock::Millis;
use tideway_core::currents::EventType;
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::profile::UserRecord;
use tideway_core::segments::{
    Behavior, CohortDelta, FeedPosition, Occurrence, ProfileChanges, ProfileSnapshot, Segment,
    SegmentUser, base_profile,
};
use tideway_core::store::StoreError;
use tideway_segment::{PurchaseRecord, SegmentProfile};

use super::sql_err;
use super::users::{LogEntry, USER_COLUMNS, user_from_row};
use crate::profile_codec;

const SEGMENT_COLUMNS: &str = "id, name, filter, created_at, updated_at";

fn segment_from_row(row: &Row<'_>) -> rusqlite::Result<Segment> {
    let text: String = row.get(2)?;
    let filter = serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(Segment {
        id: row.get(0)?,
        name: row.get(1)?,
        filter,
        created_at: Millis(row.get(3)?),
        updated_at: Millis(row.get(4)?),
    })
}

pub fn create_segment(
    conn: &Connection,
    workspace: WorkspaceId,
    segment: Segment,
) -> Result<Segment, StoreError> {
    conn.prepare_cached(
        "INSERT INTO segments (id, workspace_id, name, filter, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            segment.id,
            workspace.0,
            segment.name,
            segment.filter.to_string(),
            segment.created_at.0,
            segment.updated_at.0
        ])
    })
    .map_err(sql_err)?;
    Ok(segment)
}

pub fn segment(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
) -> Result<Option<Segment>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {SEGMENT_COLUMNS} FROM segments WHERE workspace_id = ?1 AND id = ?2"
    ))
    .and_then(|mut s| {
        s.query_row(params![workspace.0, id], segment_from_row)
            .optional()
    })
    .map_err(sql_err)
}

pub fn list_segments(
    conn: &Connection,
    workspace: WorkspaceId,
) -> Result<Vec<Segment>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {SEGMENT_COLUMNS} FROM segments WHERE workspace_id = ?1 ORDER BY created_at, id"
        ))
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(params![workspace.0], segment_from_row)
        .map_err(sql_err)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(sql_err)
}

pub fn update_segment(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
    name: &str,
    filter: &Value,
    now: Millis,
) -> Result<Option<Segment>, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE segments SET name = ?3, filter = ?4, updated_at = ?5 WHERE workspace_id = ?1 AND id = ?2",
        )
        .and_then(|mut s| s.execute(params![workspace.0, id, name, filter.to_string(), now.0]))
        .map_err(sql_err)?;
    if changed == 0 {
        return Ok(None);
    }
    segment(conn, workspace, id)
}

pub fn delete_segment(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
) -> Result<bool, StoreError> {
    conn.prepare_cached("DELETE FROM segments WHERE workspace_id = ?1 AND id = ?2")
        .and_then(|mut s| s.execute(params![workspace.0, id]))
        .map(|n| n > 0)
        .map_err(sql_err)
}

/// The log heads of a workspace, read inside the caller's transaction.
fn heads(conn: &Connection, workspace: WorkspaceId) -> Result<FeedPosition, StoreError> {
    let event_seq = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM event_log WHERE workspace_id = ?1")
        .and_then(|mut s| s.query_row(params![workspace.0], |r| r.get(0)))
        .map_err(sql_err)?;
    let cohort_change_seq = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(change_seq), 0) FROM cohort_membership_changes WHERE workspace_id = ?1",
        )
        .and_then(|mut s| s.query_row(params![workspace.0], |r| r.get(0)))
        .map_err(sql_err)?;
    let user_change_seq = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(change_seq), 0) FROM segment_user_changes WHERE workspace_id = ?1",
        )
        .and_then(|mut s| s.query_row(params![workspace.0], |r| r.get(0)))
        .map_err(sql_err)?;
    Ok(FeedPosition {
        event_seq,
        cohort_change_seq,
        user_change_seq,
    })
}

/// The log heads of a workspace, in a read transaction of their own.
pub fn feed_head(conn: &Connection, workspace: WorkspaceId) -> Result<FeedPosition, StoreError> {
    let tx = conn.unchecked_transaction().map_err(sql_err)?;
    let head = heads(&tx, workspace)?;
    tx.commit().map_err(sql_err)?;
    Ok(head)
}

/// The custom event or purchase one `event_log` row records; `None` for rows of other types,
/// or whose body lacks the needed fields.
pub(crate) fn behavior(event_type: &str, time: i64, body: &str) -> Option<Behavior> {
    let custom = event_type == EventType::CustomEvent.as_str();
    if !custom && event_type != EventType::Purchase.as_str() {
        return None;
    }
    let body = serde_json::from_str::<Value>(body).ok()?;
    let props = &body["properties"];
    if custom {
        Some(Behavior::Event {
            name: props["name"].as_str()?.to_owned(),
            time,
        })
    } else {
        Some(Behavior::Purchase(PurchaseRecord {
            product_id: props["product_id"].as_str()?.to_owned(),
            time,
            price: props["price"].as_f64().unwrap_or(0.0),
        }))
    }
}

/// Adds one `event_log` behaviour row to a profile; rows of other types, or whose body lacks
/// the needed fields, are skipped.
fn add_behavior(profile: &mut SegmentProfile, event_type: &str, time: i64, body: &str) {
    match behavior(event_type, time, body) {
        Some(Behavior::Event { name, time }) => {
            profile.events.entry(name).or_default().record(time)
        }
        Some(Behavior::Purchase(p)) => profile.purchases.push(p),
        None => {}
    }
}

/// The `event_log` types the segment loader (and `user_behaviors`) index per user.
pub(super) const BEHAVIOR_TYPES: &str =
    "('users.behaviors.CustomEvent', 'users.behaviors.Purchase')";

/// Every live user of the workspace, with events, purchases and cohorts.
pub fn snapshot(conn: &Connection, workspace: WorkspaceId) -> Result<ProfileSnapshot, StoreError> {
    let tx = conn.unchecked_transaction().map_err(sql_err)?;
    let position = heads(&tx, workspace)?;
    let mut users: HashMap<u32, SegmentUser> = HashMap::new();
    {
        let mut stmt = tx
            .prepare(&format!(
                "SELECT {USER_COLUMNS} FROM users WHERE workspace_id = ?1 AND deleted_at IS NULL"
            ))
            .map_err(sql_err)?;
        let rows = stmt
            .query_map(params![workspace.0], user_from_row)
            .map_err(sql_err)?;
        for record in rows {
            let record = record.map_err(sql_err)?;
            users.insert(
                record.seq.0,
                SegmentUser {
                    profile: base_profile(&record),
                    braze_id: record.braze_id,
                },
            );
        }
    }
    {
        let mut stmt = tx
            .prepare(&format!(
                "SELECT user_seq, event_type, time, body FROM event_log
                 WHERE workspace_id = ?1 AND seq <= ?2 AND user_seq IS NOT NULL AND event_type IN {BEHAVIOR_TYPES}
                 ORDER BY seq"
            ))
            .map_err(sql_err)?;
        let merged_into = merges(&tx, workspace)?;
        let mut rows = stmt
            .query(params![workspace.0, position.event_seq])
            .map_err(sql_err)?;
        while let Some(row) = rows.next().map_err(sql_err)? {
            let seq = survivor(&merged_into, row.get(0).map_err(sql_err)?);
            if let Some(user) = users.get_mut(&seq) {
                let event_type: String = row.get(1).map_err(sql_err)?;
                let time: i64 = row.get(2).map_err(sql_err)?;
                let body: String = row.get(3).map_err(sql_err)?;
                add_behavior(&mut user.profile, &event_type, time, &body);
            }
        }
    }
    {
        let mut stmt = tx
            .prepare(
                "SELECT m.seq, c.partner, c.cohort_id FROM cohort_members m JOIN cohorts c ON c.id = m.cohort
                 WHERE c.workspace_id = ?1",
            )
            .map_err(sql_err)?;
        let mut rows = stmt.query(params![workspace.0]).map_err(sql_err)?;
        while let Some(row) = rows.next().map_err(sql_err)? {
            let seq: u32 = row.get(0).map_err(sql_err)?;
            if let Some(user) = users.get_mut(&seq) {
                user.profile
                    .cohorts
                    .insert((row.get(1).map_err(sql_err)?, row.get(2).map_err(sql_err)?));
            }
        }
    }
    tx.commit().map_err(sql_err)?;
    let mut users: Vec<SegmentUser> = users.into_values().collect();
    users.sort_by_key(|u| u.profile.uid);
    Ok(ProfileSnapshot { users, position })
}

/// Who each merged-away user was merged into.
fn merges(conn: &Connection, workspace: WorkspaceId) -> Result<HashMap<u32, u32>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT from_seq, into_seq FROM user_merges WHERE workspace_id = ?1")
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(params![workspace.0], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

/// The user whose history `seq`'s now belongs to, following merges (A into B, B into C: C).
fn survivor(merged_into: &HashMap<u32, u32>, mut seq: u32) -> u32 {
    // Bounded: a merge chain is acyclic, but stored data must never hang a reader.
    for _ in 0..64 {
        match merged_into.get(&seq) {
            Some(&into) => seq = into,
            None => break,
        }
    }
    seq
}

/// One behaviour row of `event_log`: (type, time, body).
type BehaviorRow = (String, i64, String);

/// The custom events and purchases logged in `(from, until]` that `user_behaviors` does not
/// cover yet, grouped by the user they now belong to (following merges).
fn unindexed_behaviors(
    conn: &Connection,
    workspace: WorkspaceId,
    from: i64,
    until: i64,
) -> Result<HashMap<u32, Vec<BehaviorRow>>, StoreError> {
    let mut out: HashMap<u32, Vec<BehaviorRow>> = HashMap::new();
    if until <= from {
        return Ok(out);
    }
    let merged_into = merges(conn, workspace)?;
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT user_seq, event_type, time, body FROM event_log
             WHERE workspace_id = ?1 AND seq > ?2 AND seq <= ?3 AND user_seq IS NOT NULL AND event_type IN {BEHAVIOR_TYPES}
             ORDER BY seq"
        ))
        .map_err(sql_err)?;
    let mut rows = stmt
        .query(params![workspace.0, from, until])
        .map_err(sql_err)?;
    while let Some(row) = rows.next().map_err(sql_err)? {
        let seq = survivor(&merged_into, row.get(0).map_err(sql_err)?);
        out.entry(seq).or_default().push((
            row.get(1).map_err(sql_err)?,
            row.get(2).map_err(sql_err)?,
            row.get(3).map_err(sql_err)?,
        ));
    }
    Ok(out)
}

/// One user's full profile for segment evaluation from their current `record`: behaviours up
/// to `indexed` from `user_behaviors` (their own and those of the users merged into them), then
/// `unindexed` (those logged after, up to the feed position), and cohorts.
fn load_user(
    conn: &Connection,
    workspace: WorkspaceId,
    record: UserRecord,
    indexed: i64,
    unindexed: &HashMap<u32, Vec<BehaviorRow>>,
) -> Result<SegmentUser, StoreError> {
    let seq = record.seq.0;
    let mut profile = base_profile(&record);
    {
        let mut stmt = conn
            .prepare_cached(
                "WITH RECURSIVE merged(s) AS (
                     SELECT ?2 UNION SELECT m.from_seq FROM user_merges m JOIN merged ON m.into_seq = merged.s WHERE m.workspace_id = ?1
                 )
                 SELECT e.event_type, e.time, e.body FROM user_behaviors b JOIN event_log e ON e.seq = b.log_seq
                 WHERE b.workspace_id = ?1 AND b.user_seq IN (SELECT s FROM merged) AND b.log_seq <= ?3
                 ORDER BY b.log_seq",
            )
            .map_err(sql_err)?;
        let mut rows = stmt
            .query(params![workspace.0, seq, indexed])
            .map_err(sql_err)?;
        while let Some(row) = rows.next().map_err(sql_err)? {
            let event_type: String = row.get(0).map_err(sql_err)?;
            let time: i64 = row.get(1).map_err(sql_err)?;
            let body: String = row.get(2).map_err(sql_err)?;
            add_behavior(&mut profile, &event_type, time, &body);
        }
    }
    for (event_type, time, body) in unindexed.get(&seq).into_iter().flatten() {
        add_behavior(&mut profile, event_type, *time, body);
    }
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT c.partner, c.cohort_id FROM cohort_members m JOIN cohorts c ON c.id = m.cohort
                 WHERE m.seq = ?2 AND c.workspace_id = ?1",
            )
            .map_err(sql_err)?;
        let rows = stmt
            .query_map(params![workspace.0, seq], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql_err)?;
        profile.cohorts = rows.collect::<Result<BTreeSet<_>, _>>().map_err(sql_err)?;
    }
    Ok(SegmentUser {
        braze_id: record.braze_id,
        profile,
    })
}

/// The current records of the live users among `seqs` (a deleted or unknown user has none),
/// without asking the writer to flush: each row (identifiers are written to it at once) with
/// the user's newest post-image in `user_log`, if any, laid over it. See the module
/// documentation for why that is the committed truth.
fn current_records(
    conn: &Connection,
    workspace: WorkspaceId,
    seqs: &BTreeSet<u32>,
) -> Result<HashMap<u32, UserRecord>, StoreError> {
    let mut records = HashMap::with_capacity(seqs.len());
    {
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {USER_COLUMNS} FROM users WHERE workspace_id = ?1 AND seq = ?2 AND deleted_at IS NULL"
            ))
            .map_err(sql_err)?;
        for &seq in seqs {
            if let Some(record) = stmt
                .query_row(params![workspace.0, seq], user_from_row)
                .optional()
                .map_err(sql_err)?
            {
                records.insert(seq, record);
            }
        }
    }
    let mut wanted: BTreeSet<u32> = records.keys().copied().collect();
    if wanted.is_empty() {
        return Ok(records);
    }
    let mut stmt = conn
        .prepare_cached("SELECT entries FROM user_log ORDER BY id DESC")
        .map_err(sql_err)?;
    let mut rows = stmt.query([]).map_err(sql_err)?;
    while !wanted.is_empty()
        && let Some(row) = rows.next().map_err(sql_err)?
    {
        let bytes = row
            .get_ref(0)
            .and_then(|v| v.as_blob().map_err(Into::into))
            .map_err(sql_err)?;
        // entries of one row are in save order: the last one of a user is their newest
        for entry in LogEntry::decode(bytes)?.into_iter().rev() {
            if entry.workspace != workspace.0 || !wanted.remove(&entry.seq) {
                continue;
            }
            if let Some(record) = records.get_mut(&entry.seq) {
                record.created_at = Millis(entry.created_at);
                record.updated_at = Millis(entry.updated_at);
                record.profile = profile_codec::decode(&entry.profile)?;
            }
        }
    }
    Ok(records)
}

/// What changed after `after`, incrementally (see the module documentation).
pub fn changes(
    conn: &Connection,
    workspace: WorkspaceId,
    after: FeedPosition,
) -> Result<ProfileChanges, StoreError> {
    let tx = conn.unchecked_transaction().map_err(sql_err)?;
    let position = heads(&tx, workspace)?.max(after);
    let mut out = ProfileChanges {
        position,
        ..ProfileChanges::default()
    };
    if position == after {
        return Ok(out);
    }
    // Users whose attributes to read, and merge survivors (by braze_id) to reload whole.
    let mut named: BTreeSet<u32> = BTreeSet::new();
    let mut survivors: BTreeSet<String> = BTreeSet::new();
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT user_seq, event_type, time, body FROM event_log
                 WHERE workspace_id = ?1 AND seq > ?2 AND seq <= ?3 AND user_seq IS NOT NULL
                 ORDER BY seq",
            )
            .map_err(sql_err)?;
        let mut rows = stmt
            .query(params![workspace.0, after.event_seq, position.event_seq])
            .map_err(sql_err)?;
        while let Some(row) = rows.next().map_err(sql_err)? {
            let user: u32 = row.get(0).map_err(sql_err)?;
            let event_type = row
                .get_ref(1)
                .and_then(|v| Ok(v.as_str()?))
                .map_err(sql_err)?;
            let time: i64 = row.get(2).map_err(sql_err)?;
            let body = row
                .get_ref(3)
                .and_then(|v| Ok(v.as_str()?))
                .map_err(sql_err)?;
            if event_type == EventType::CustomEvent.as_str()
                || event_type == EventType::Purchase.as_str()
            {
                if let Some(behavior) = behavior(event_type, time, body) {
                    out.occurrences.push(Occurrence {
                        user: UserSeq(user),
                        behavior,
                    });
                }
                continue;
            }
            if event_type == EventType::UserOrphan.as_str()
                && let Ok(body) = serde_json::from_str::<Value>(body)
                && let Some(into) = body["properties"]["orphaned_by_id"].as_str()
            {
                survivors.insert(into.to_owned());
            }
            named.insert(user);
        }
    }
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT seq FROM segment_user_changes WHERE workspace_id = ?1 AND change_seq > ?2 AND change_seq <= ?3",
            )
            .map_err(sql_err)?;
        let rows = stmt
            .query_map(
                params![workspace.0, after.user_change_seq, position.user_change_seq],
                |r| r.get(0),
            )
            .map_err(sql_err)?;
        for seq in rows {
            named.insert(seq.map_err(sql_err)?);
        }
    }
    {
        let mut stmt = tx
            .prepare_cached(
                "SELECT ch.seq, c.partner, c.cohort_id, ch.entered FROM cohort_membership_changes ch
                 JOIN cohorts c ON c.id = ch.cohort
                 WHERE ch.workspace_id = ?1 AND ch.change_seq > ?2 AND ch.change_seq <= ?3
                 ORDER BY ch.change_seq",
            )
            .map_err(sql_err)?;
        let rows = stmt
            .query_map(
                params![
                    workspace.0,
                    after.cohort_change_seq,
                    position.cohort_change_seq
                ],
                |r| {
                    Ok(CohortDelta {
                        user: UserSeq(r.get(0)?),
                        partner: r.get(1)?,
                        cohort_id: r.get(2)?,
                        entered: r.get(3)?,
                    })
                },
            )
            .map_err(sql_err)?;
        out.cohort_deltas = rows.collect::<Result<_, _>>().map_err(sql_err)?;
    }
    let mut reload: BTreeSet<u32> = BTreeSet::new();
    {
        let mut stmt = tx
            .prepare_cached("SELECT seq FROM users WHERE workspace_id = ?1 AND braze_id = ?2")
            .map_err(sql_err)?;
        for braze_id in &survivors {
            if let Some(seq) = stmt
                .query_row(params![workspace.0, braze_id], |r| r.get(0))
                .optional()
                .map_err(sql_err)?
            {
                reload.insert(seq);
            }
        }
    }
    named.extend(&reload);
    let mut records = current_records(&tx, workspace, &named)?;
    for seq in &named {
        if !records.contains_key(seq) {
            out.removed.push(UserSeq(*seq));
        }
    }
    if reload.iter().any(|s| records.contains_key(s)) {
        let indexed = super::behind::indexed_upto(&tx)?.min(position.event_seq);
        let unindexed = unindexed_behaviors(&tx, workspace, indexed, position.event_seq)?;
        for seq in &reload {
            if let Some(record) = records.remove(seq) {
                out.users
                    .push(load_user(&tx, workspace, record, indexed, &unindexed)?);
            }
        }
    }
    let mut attributes: Vec<UserRecord> = records.into_values().collect();
    attributes.sort_by_key(|r| r.seq);
    out.attributes = attributes
        .into_iter()
        .map(|record| SegmentUser {
            profile: base_profile(&record),
            braze_id: record.braze_id,
        })
        .collect();
    tx.commit().map_err(sql_err)?;
    Ok(out)
}
