//! Currents over PostgreSQL: the event log's reads and appends, connector definitions,
//! consumer positions and leases, retry state, dead letters, replay windows, retention drops,
//! test-send accounting and the log clock.
//!
//! The semantics are the SQLite store's (`sqlite/currents.rs`), method for method; what differs
//! is what several nodes on one database need:
//! - **Positions are per workspace.** A Current's position is a seq of its workspace's
//!   `event_log` (gap-free, in commit order: `sequence.rs`), and "the head of the log" is that
//!   workspace's `event_log` counter in `workspace_sequences`, as committed — an append that
//!   has taken its range but not committed is not in it, and commits above it.
//! - **The log clock is per workspace** (`currents_log_clock` is distributed by workspace):
//!   `tick_log_clock` samples every workspace's head in one `INSERT … SELECT` over the counters.
//! - **Leases fence every progress write** in the statement that writes (`… AND lease_owner =
//!   $owner`), as in SQLite; writes of several statements (`ack` with dead letters or a replay
//!   source, `apply_retention`, `record_test_events`) first lock the Current's row
//!   (`FOR UPDATE`), so a takeover waits for them to commit and no check goes stale
//!   between statements. Nothing is kept in the process.
//! - **Every statement on a child table is keyed by workspace** (`workspace_id` leads their
//!   keys and is their distribution column). Methods that get only a [`CurrentId`] find it in
//!   `currents` (one small table) — in the same statement as an uncorrelated subquery, or in
//!   the locking read that opens the transaction.
//! - **Checks are in the writing statement**, not read first: a status change's allowed-from
//!   rule is its `WHERE`, so two nodes cannot both start from the same status.
//! - **Foreign keys hold** (SQLite's Currents tables have none): a Current's records go with
//!   it by `ON DELETE CASCADE`, and a test send for a Current that does not exist is
//!   `NotFound`.
//!
//! The spec's JSON column is encoded by the SQLite module's codec, so both backends store the
//! same text; event rows are decoded as SQLite's `read_events` decodes them.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::codec::{corrupt, i64_of, u64_of};
use tideway_core::clock::Millis;
use tideway_core::currents::CurrentsEvent;
use tideway_core::currents_store::{
    Ack, BatchSource, Claimed, Counters, Current, CurrentId, CurrentSpec, CurrentStatus,
    CurrentsStore, DeadLetter, DeadLetterPick, DeadLetterReason, DropRecord, LAG_EXACT_UP_TO, Lag,
    LastError, LoggedEvent, NewDeadLetter, QueuedEvent, ReplayWindow, StatusChange, TypeFilter,
};
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::store::{StoreError, StoreFuture};

use super::sequence::{Sequence, allocate};
use super::{PgStore, execute, get, pg_err, query, query_one, query_opt};
use crate::sqlite::currents::{decode_spec, encode_spec};

/// The columns a [`Current`] is read from, in [`current_of`]'s order (a macro so statements
/// are `concat!`ed at compile time and the statement cache keys on fixed text).
macro_rules! current_columns {
    () => {
        "id, workspace_id, spec, status, revision, position, delivered, retried, dead_lettered, \
         dropped, skipped, failing_since, last_error_at, last_error_status, last_error, \
         last_success_at, created_at, updated_at"
    };
}

/// The columns a [`DeadLetter`] is read from, in [`dead_letter_of`]'s order.
macro_rules! dead_columns {
    () => {
        "id, current_id, event_seq, event_id, event_type, user_seq, body, reason, detail, \
         response_status, response_body, created_at, attempts, replay_pending"
    };
}

/// The committed head of workspace `$1`'s event log.
macro_rules! head_of {
    ($ws:literal) => {
        concat!(
            "COALESCE((SELECT s.head FROM workspace_sequences s WHERE s.workspace_id = ",
            $ws,
            " AND s.name = 'event_log'), 0)"
        )
    };
}

fn limit_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn not_found(id: CurrentId) -> StoreError {
    StoreError::NotFound(format!("current {id}"))
}

fn lease_lost(id: CurrentId) -> StoreError {
    StoreError::Conflict(format!("the lease on current {id}"))
}

/// A stored `user_seq` (`bigint`) as the domain's `u32`; anything else is damage.
fn user_of(raw: Option<i64>) -> Result<Option<UserSeq>, StoreError> {
    raw.map(|v| {
        u32::try_from(v)
            .map(UserSeq)
            .map_err(|_| corrupt(format!("event_log.user_seq {v}")))
    })
    .transpose()
}

fn status_of(raw: Option<i32>) -> Option<u16> {
    raw.and_then(|s| u16::try_from(s).ok())
}

// ---- rows ---------------------------------------------------------------------------------

fn current_of(row: &Row) -> Result<Current, StoreError> {
    let status: String = get(row, 3)?;
    let status =
        CurrentStatus::parse(&status).ok_or_else(|| corrupt(format!("current status {status}")))?;
    let last_error = match (
        get::<Option<i64>>(row, 12)?,
        get::<Option<String>>(row, 14)?,
    ) {
        (Some(at), Some(message)) => Some(LastError {
            at: Millis(at),
            status: status_of(get(row, 13)?),
            message,
        }),
        _ => None,
    };
    Ok(Current {
        id: CurrentId(get(row, 0)?),
        workspace: WorkspaceId(get(row, 1)?),
        spec: decode_spec(get(row, 2)?)?,
        status,
        revision: get(row, 4)?,
        position: get(row, 5)?,
        counters: Counters {
            delivered: u64_of(get(row, 6)?),
            retried: u64_of(get(row, 7)?),
            dead_lettered: u64_of(get(row, 8)?),
            dropped: u64_of(get(row, 9)?),
            skipped: u64_of(get(row, 10)?),
        },
        failing_since: get::<Option<i64>>(row, 11)?.map(Millis),
        last_error,
        last_success_at: get::<Option<i64>>(row, 15)?.map(Millis),
        created_at: Millis(get(row, 16)?),
        updated_at: Millis(get(row, 17)?),
    })
}

fn dead_letter_of(row: &Row) -> Result<DeadLetter, StoreError> {
    let reason: String = get(row, 7)?;
    let attempts: i64 = get(row, 12)?;
    Ok(DeadLetter {
        id: get(row, 0)?,
        current: CurrentId(get(row, 1)?),
        event: QueuedEvent {
            seq: get(row, 2)?,
            event_id: get(row, 3)?,
            event_type: get(row, 4)?,
            user: user_of(get(row, 5)?)?,
            body: get(row, 6)?,
        },
        reason: DeadLetterReason::parse(&reason)
            .ok_or_else(|| corrupt(format!("dead letter reason {reason}")))?,
        detail: get(row, 8)?,
        response_status: status_of(get(row, 9)?),
        response_body: get(row, 10)?,
        created_at: Millis(get(row, 11)?),
        attempts: u32::try_from(attempts)
            .map_err(|_| corrupt(format!("dead letter attempts {attempts}")))?,
        replay_pending: get(row, 13)?,
    })
}

/// One `event_log` row as a [`LoggedEvent`] (checked as on SQLite: `codec::logged_event`).
fn logged_event_of(row: &Row, workspace: WorkspaceId) -> Result<LoggedEvent, StoreError> {
    let event_type: String = get(row, 3)?;
    crate::codec::logged_event(
        get(row, 0)?,
        workspace,
        user_of(get(row, 1)?)?,
        get(row, 2)?,
        &event_type,
        get(row, 4)?,
        get(row, 5)?,
    )
}

async fn load<C: GenericClient>(c: &C, id: CurrentId) -> Result<Option<Current>, StoreError> {
    const SQL: &str = concat!(
        "SELECT ",
        current_columns!(),
        " FROM currents WHERE id = $1"
    );
    query_opt(c, SQL, &[&id.0])
        .await?
        .as_ref()
        .map(current_of)
        .transpose()
}

/// Locks Current `id`'s row for the rest of the transaction; returns its workspace and
/// position, or `None` when there is no such Current.
async fn lock<C: GenericClient>(
    c: &C,
    id: CurrentId,
) -> Result<Option<(WorkspaceId, i64)>, StoreError> {
    const SQL: &str = "SELECT workspace_id, position FROM currents WHERE id = $1 FOR UPDATE";
    query_opt(c, SQL, &[&id.0])
        .await?
        .map(|row| Ok((WorkspaceId(get(&row, 0)?), get(&row, 1)?)))
        .transpose()
}

// ---- definitions --------------------------------------------------------------------------

async fn create_current(
    store: &PgStore,
    workspace: WorkspaceId,
    spec: &CurrentSpec,
    initial: CurrentStatus,
    now: Millis,
) -> Result<Current, StoreError> {
    // The workspace check and the head read are one statement: no row means no workspace.
    const SQL: &str = concat!(
        "INSERT INTO currents (workspace_id, name, kind, spec, status, revision, position, created_at, updated_at)
         SELECT w.id, $2, $3, $4, $5, 1, ",
        head_of!("w.id"),
        ", $6, $6 FROM workspaces w WHERE w.id = $1
         RETURNING ",
        current_columns!()
    );
    let client = store.pool.client().await?;
    let row = query_opt(
        &client,
        SQL,
        &[
            &workspace.0,
            &spec.name,
            &spec.kind.as_str(),
            &encode_spec(spec),
            &initial.as_str(),
            &now.0,
        ],
    )
    .await?
    .ok_or_else(|| StoreError::NotFound(format!("workspace {}", workspace.0)))?;
    current_of(&row)
}

async fn update_current(
    store: &PgStore,
    workspace: WorkspaceId,
    id: CurrentId,
    spec: &CurrentSpec,
    now: Millis,
) -> Result<Current, StoreError> {
    const SQL: &str = concat!(
        "UPDATE currents SET name = $3, kind = $4, spec = $5, revision = revision + 1, updated_at = $6
         WHERE workspace_id = $2 AND id = $1 RETURNING ",
        current_columns!()
    );
    let client = store.pool.client().await?;
    let row = query_opt(
        &client,
        SQL,
        &[
            &id.0,
            &workspace.0,
            &spec.name,
            &spec.kind.as_str(),
            &encode_spec(spec),
            &now.0,
        ],
    )
    .await?
    .ok_or_else(|| not_found(id))?;
    current_of(&row)
}

async fn get_current(
    store: &PgStore,
    workspace: WorkspaceId,
    id: CurrentId,
) -> Result<Option<Current>, StoreError> {
    const SQL: &str = concat!(
        "SELECT ",
        current_columns!(),
        " FROM currents WHERE workspace_id = $1 AND id = $2"
    );
    let client = store.pool.client().await?;
    query_opt(&client, SQL, &[&workspace.0, &id.0])
        .await?
        .as_ref()
        .map(current_of)
        .transpose()
}

async fn list_currents(
    store: &PgStore,
    workspace: Option<WorkspaceId>,
) -> Result<Vec<Current>, StoreError> {
    const ONE: &str = concat!(
        "SELECT ",
        current_columns!(),
        " FROM currents WHERE workspace_id = $1 ORDER BY id"
    );
    const ALL: &str = concat!("SELECT ", current_columns!(), " FROM currents ORDER BY id");
    let client = store.pool.client().await?;
    let rows = match workspace {
        Some(ws) => query(&client, ONE, &[&ws.0]).await?,
        None => query(&client, ALL, &[]).await?,
    };
    rows.iter().map(current_of).collect()
}

async fn delete_current(
    store: &PgStore,
    workspace: WorkspaceId,
    id: CurrentId,
) -> Result<bool, StoreError> {
    // Dead letters, replays, drops and test sends go with it (`ON DELETE CASCADE`).
    const SQL: &str = "DELETE FROM currents WHERE workspace_id = $1 AND id = $2";
    let client = store.pool.client().await?;
    Ok(execute(&client, SQL, &[&workspace.0, &id.0]).await? > 0)
}

async fn change_status(
    store: &PgStore,
    id: CurrentId,
    change: StatusChange,
    reason: Option<&LastError>,
    now: Millis,
) -> Result<Current, StoreError> {
    // The allowed-from check is the statement's `WHERE`, so two nodes changing the status at
    // once cannot both start from the same status. A launch starts at the log head.
    const SQL: &str = concat!(
        "UPDATE currents SET status = $3, revision = revision + 1, updated_at = $4,
             failing_since = CASE WHEN $5 THEN NULL ELSE failing_since END,
             position = CASE WHEN $6 THEN GREATEST(position, ",
        head_of!("currents.workspace_id"),
        ") ELSE position END,
             last_error_at = CASE WHEN $7 THEN $8::bigint ELSE last_error_at END,
             last_error_status = CASE WHEN $7 THEN $9::integer ELSE last_error_status END,
             last_error = CASE WHEN $7 THEN $10::text ELSE last_error END
         WHERE id = $1 AND status = ANY($2::text[])
         RETURNING ",
        current_columns!()
    );
    let (from, to) = change.rule();
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    let client = store.pool.client().await?;
    let row = query_opt(
        &client,
        SQL,
        &[
            &id.0,
            &from,
            &to.as_str(),
            &now.0,
            &(change == StatusChange::Enable),
            &(change == StatusChange::Launch),
            &reason.is_some(),
            &reason.map(|e| e.at.0),
            &reason.and_then(|e| e.status.map(i32::from)),
            &reason.map(|e| e.message.as_str()),
        ],
    )
    .await?;
    if let Some(row) = row {
        return current_of(&row);
    }
    match load(&client, id).await? {
        None => Err(not_found(id)),
        Some(current) => Err(StoreError::Conflict(format!(
            "a {} Current cannot {change:?}",
            current.status.as_str()
        ))),
    }
}

// ---- the log ------------------------------------------------------------------------------

async fn read_events(
    store: &PgStore,
    workspace: WorkspaceId,
    after: i64,
    limit: usize,
) -> Result<Vec<LoggedEvent>, StoreError> {
    const SQL: &str = "SELECT seq, user_seq, event_id, event_type, time, body FROM event_log
         WHERE workspace_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
    let client = store.pool.client().await?;
    query(&client, SQL, &[&workspace.0, &after, &limit_of(limit)])
        .await?
        .iter()
        .map(|row| logged_event_of(row, workspace))
        .collect()
}

async fn append_events(
    store: &PgStore,
    workspace: WorkspaceId,
    events: &[(Option<UserSeq>, CurrentsEvent)],
) -> Result<i64, StoreError> {
    if events.is_empty() {
        return Ok(0);
    }
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    let last = append_in(&tx, workspace, events).await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(last)
}

/// Appends `events` to the workspace's log inside `tx` and returns the last position (0 when
/// there are none). Call it as the transaction's last step, right before the commit: the
/// range it takes keeps the workspace's counter row locked until then (see `sequence.rs`).
pub(super) async fn append_in(
    tx: &deadpool_postgres::Transaction<'_>,
    workspace: WorkspaceId,
    events: &[(Option<UserSeq>, CurrentsEvent)],
) -> Result<i64, StoreError> {
    if events.is_empty() {
        return Ok(0);
    }
    let n = u32::try_from(events.len())
        .map_err(|_| corrupt(format!("{} events in one append", events.len())))?;
    let users: Vec<Option<i64>> = events
        .iter()
        .map(|(u, _)| u.map(|u| i64::from(u.0)))
        .collect();
    let ids: Vec<&str> = events.iter().map(|(_, e)| e.id.0.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|(_, e)| e.event_type.as_str()).collect();
    let times: Vec<i64> = events.iter().map(|(_, e)| e.time).collect();
    let bodies: Vec<&str> = events.iter().map(|(_, e)| e.body.as_str()).collect();
    // The range comes last, right before the rows: the counter row stays locked until commit
    // (see `sequence.rs`).
    let first = allocate(tx, workspace, Sequence::EventLog, n).await?;
    execute(
        tx,
        "INSERT INTO event_log (workspace_id, seq, user_seq, event_id, event_type, time, body)
         SELECT $1, $2 + e.ord - 1, e.u, e.i, e.t, e.tm, e.b
         FROM unnest($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::text[])
             WITH ORDINALITY AS e(u, i, t, tm, b, ord)",
        &[&workspace.0, &first, &users, &ids, &types, &times, &bodies],
    )
    .await?;
    Ok(first + i64::from(n) - 1)
}

// ---- consuming ----------------------------------------------------------------------------

async fn acquire_lease(
    store: &PgStore,
    id: CurrentId,
    owner: &str,
    now: Millis,
    ttl_ms: u64,
) -> Result<bool, StoreError> {
    // One statement: two nodes taking a free lease at once serialise on the row, and the
    // second re-checks the `WHERE` against the first one's lease (and gets nothing).
    const SQL: &str = "UPDATE currents SET lease_owner = $2, lease_until = $4
         WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $3)";
    let client = store.pool.client().await?;
    let until = now.0.saturating_add(i64_of(ttl_ms));
    Ok(execute(&client, SQL, &[&id.0, &owner, &now.0, &until]).await? > 0)
}

async fn release_lease(store: &PgStore, id: CurrentId, owner: &str) -> Result<(), StoreError> {
    const SQL: &str = "UPDATE currents SET lease_owner = NULL, lease_until = NULL
         WHERE id = $1 AND lease_owner = $2";
    let client = store.pool.client().await?;
    execute(&client, SQL, &[&id.0, &owner]).await?;
    Ok(())
}

async fn claim(
    store: &PgStore,
    workspace: WorkspaceId,
    after: i64,
    scan: usize,
    types: &TypeFilter,
) -> Result<Claimed, StoreError> {
    // Every scanned row comes back (they all count towards `scanned_to`), but only selected
    // ones bring their body: a Current of one type over a log of another transfers no bodies.
    const SQL: &str = "SELECT seq, event_id, event_type, user_seq,
             CASE WHEN $4::text[] IS NULL OR event_type = ANY($4::text[]) THEN body END
         FROM event_log WHERE workspace_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
    let client = store.pool.client().await?;
    let rows = query(
        &client,
        SQL,
        &[&workspace.0, &after, &limit_of(scan), types],
    )
    .await?;
    let mut claimed = Claimed {
        events: Vec::new(),
        scanned_to: after,
        scanned: 0,
    };
    for row in &rows {
        let seq: i64 = get(row, 0)?;
        claimed.scanned_to = seq;
        claimed.scanned += 1;
        let Some(body) = get::<Option<String>>(row, 4)? else {
            continue;
        };
        claimed.events.push(QueuedEvent {
            seq,
            event_id: get(row, 1)?,
            event_type: get(row, 2)?,
            user: user_of(get(row, 3)?)?,
            body,
        });
    }
    Ok(claimed)
}

/// Inserts or refreshes one dead letter; returns true when it is new. One statement: `prior`
/// reads the table as it was before the statement, so it tells an insert from a refresh.
async fn put_dead_letter<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    current: CurrentId,
    dl: &NewDeadLetter,
    now: Millis,
) -> Result<bool, StoreError> {
    const SQL: &str = "WITH prior AS (
             SELECT 1 FROM currents_dead_letters
             WHERE workspace_id = $1 AND current_id = $2 AND event_id = $4
         ), put AS (
             INSERT INTO currents_dead_letters AS d
                 (workspace_id, current_id, event_seq, event_id, event_type, user_seq, body, reason, detail,
                  response_status, response_body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (workspace_id, current_id, event_id) DO UPDATE SET
                 reason = EXCLUDED.reason, detail = EXCLUDED.detail,
                 response_status = EXCLUDED.response_status, response_body = EXCLUDED.response_body,
                 attempts = d.attempts + 1, replay_pending = false
         )
         SELECT NOT EXISTS (SELECT 1 FROM prior)";
    let row = query_one(
        c,
        SQL,
        &[
            &workspace.0,
            &current.0,
            &dl.event.seq,
            &dl.event.event_id,
            &dl.event.event_type,
            &dl.event.user.map(|u| i64::from(u.0)),
            &dl.event.body,
            &dl.reason.as_str(),
            &dl.detail,
            &dl.response_status.map(i32::from),
            &dl.response_body,
            &now.0,
        ],
    )
    .await?;
    get(&row, 0)
}

/// The fenced progress write of an acknowledgement: position (when the batch came from the
/// live log), counters, last success, and the end of the failure streak.
async fn ack_counters<C: GenericClient>(
    c: &C,
    ack: &Ack,
    position: Option<i64>,
    fresh_dead: u64,
) -> Result<(), StoreError> {
    const SQL: &str = "UPDATE currents SET
             position = CASE WHEN $3::bigint IS NULL THEN position ELSE GREATEST(position, $3::bigint) END,
             delivered = delivered + $4, skipped = skipped + $5, dead_lettered = dead_lettered + $6,
             last_success_at = CASE WHEN $4 > 0 THEN $7 ELSE last_success_at END,
             failing_since = CASE WHEN $8 THEN NULL ELSE failing_since END
         WHERE id = $1 AND lease_owner = $2";
    let resolved_something = ack.delivered > 0 || ack.skipped > 0 || !ack.dead_letters.is_empty();
    let n = execute(
        c,
        SQL,
        &[
            &ack.current.0,
            &ack.owner,
            &position,
            &i64_of(ack.delivered),
            &i64_of(ack.skipped),
            &i64_of(fresh_dead),
            &ack.at.0,
            &resolved_something,
        ],
    )
    .await?;
    if n == 0 {
        return Err(lease_lost(ack.current));
    }
    Ok(())
}

async fn ack(store: &PgStore, ack: &Ack) -> Result<(), StoreError> {
    let mut client = store.pool.client().await?;
    // The hot path — a live batch with no dead letters — is one fenced statement.
    if let (BatchSource::Live { resolved_to }, true) = (&ack.source, ack.dead_letters.is_empty()) {
        return ack_counters(&client, ack, Some(*resolved_to), 0).await;
    }
    let tx = client.transaction().await.map_err(pg_err)?;
    // Fence first and hold the row: nothing below is written unless this owner holds the
    // lease, and a takeover waits until this transaction ends.
    let workspace = query_opt(
        &tx,
        "SELECT workspace_id FROM currents WHERE id = $1 AND lease_owner = $2 FOR UPDATE",
        &[&ack.current.0, &ack.owner],
    )
    .await?
    .map(|row| get(&row, 0).map(WorkspaceId))
    .transpose()?
    .ok_or_else(|| lease_lost(ack.current))?;
    // Dead letters before the source: a replayed dead letter refused again is refreshed here
    // (no longer pending), so the `DeadLetters` delete below keeps it.
    let mut fresh_dead = 0u64;
    for dl in &ack.dead_letters {
        if put_dead_letter(&tx, workspace, ack.current, dl, ack.at).await? {
            fresh_dead += 1;
        }
    }
    let position = match &ack.source {
        BatchSource::Live { resolved_to } => Some(*resolved_to),
        BatchSource::Window {
            window,
            resolved_to,
        } => {
            execute(
                &tx,
                "UPDATE currents_replays SET cursor = GREATEST(cursor, $4)
                 WHERE workspace_id = $1 AND current_id = $2 AND id = $3",
                &[&workspace.0, &ack.current.0, window, resolved_to],
            )
            .await?;
            execute(
                &tx,
                "DELETE FROM currents_replays
                 WHERE workspace_id = $1 AND current_id = $2 AND id = $3 AND cursor >= to_seq",
                &[&workspace.0, &ack.current.0, window],
            )
            .await?;
            None
        }
        BatchSource::DeadLetters { ids } => {
            execute(
                &tx,
                "DELETE FROM currents_dead_letters
                 WHERE workspace_id = $1 AND current_id = $2 AND id = ANY($3::bigint[]) AND replay_pending",
                &[&workspace.0, &ack.current.0, ids],
            )
            .await?;
            None
        }
    };
    ack_counters(&tx, ack, position, fresh_dead).await?;
    tx.commit().await.map_err(pg_err)
}

async fn record_failure(
    store: &PgStore,
    id: CurrentId,
    owner: &str,
    error: &LastError,
    retried: u64,
) -> Result<Millis, StoreError> {
    const SQL: &str = "UPDATE currents SET failing_since = COALESCE(failing_since, $3),
             last_error_at = $3, last_error_status = $4, last_error = $5, retried = retried + $6
         WHERE id = $1 AND lease_owner = $2 RETURNING failing_since";
    let client = store.pool.client().await?;
    let row = query_opt(
        &client,
        SQL,
        &[
            &id.0,
            &owner,
            &error.at.0,
            &error.status.map(i32::from),
            &error.message,
            &i64_of(retried),
        ],
    )
    .await?
    .ok_or_else(|| lease_lost(id))?;
    Ok(Millis(get(&row, 0)?))
}

async fn apply_retention(
    store: &PgStore,
    id: CurrentId,
    owner: &str,
    cutoff: Millis,
    types: &TypeFilter,
    now: Millis,
) -> Result<Option<DropRecord>, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    // Locked, so the position read here is the one the update below moves from.
    let (workspace, position) = lock(&tx, id).await?.ok_or_else(|| not_found(id))?;
    // The last position known to have entered the log before the cutoff, and the selected
    // events between the position and it (none when it is not past the position).
    let row = query_one(
        &tx,
        "SELECT h.old_head,
             (SELECT COUNT(*) FROM event_log
              WHERE workspace_id = $1 AND seq > $2 AND seq <= h.old_head
                AND ($4::text[] IS NULL OR event_type = ANY($4::text[])))
         FROM (SELECT MAX(head) AS old_head FROM currents_log_clock
               WHERE workspace_id = $1 AND at < $3) h",
        &[&workspace.0, &position, &cutoff.0, types],
    )
    .await?;
    let Some(old_head) = get::<Option<i64>>(&row, 0)? else {
        return Ok(None);
    };
    if old_head <= position {
        return Ok(None);
    }
    let count = u64_of(get(&row, 1)?);
    let n = execute(
        &tx,
        "UPDATE currents SET position = GREATEST(position, $3), dropped = dropped + $4
         WHERE id = $1 AND lease_owner = $2",
        &[&id.0, &owner, &old_head, &i64_of(count)],
    )
    .await?;
    if n == 0 {
        return Err(lease_lost(id));
    }
    // Nothing selected was dropped, but the position still moves past what was scanned.
    if count > 0 {
        execute(
            &tx,
            "INSERT INTO currents_drops (workspace_id, current_id, from_seq, to_seq, count, at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &workspace.0,
                &id.0,
                &position,
                &old_head,
                &i64_of(count),
                &now.0,
            ],
        )
        .await?;
    }
    tx.commit().await.map_err(pg_err)?;
    Ok((count > 0).then_some(DropRecord {
        current: id,
        from_seq: position,
        to_seq: old_head,
        count,
        at: now,
    }))
}

async fn lag(store: &PgStore, id: CurrentId, types: &TypeFilter) -> Result<Lag, StoreError> {
    // Counted up to the cap; the first selected event after the position and the clock's
    // earliest sample that covers it; the workspace's head for the estimate past the cap.
    // The first event is `ORDER BY seq LIMIT 1` rather than `MIN(seq)`, so it is one index
    // probe even when the planner's statistics predate the workspace (see `segments::HEADS`).
    const SQL: &str = concat!(
        "SELECT
             (SELECT COUNT(*) FROM (SELECT 1 FROM event_log
                  WHERE workspace_id = c.workspace_id AND seq > c.position
                    AND ($2::text[] IS NULL OR event_type = ANY($2::text[])) LIMIT $3) s),
             f.first,
             (SELECT MIN(at) FROM currents_log_clock
              WHERE workspace_id = c.workspace_id AND head >= f.first),
             c.position, ",
        head_of!("c.workspace_id"),
        "
         FROM currents c
             LEFT JOIN LATERAL (SELECT seq AS first FROM event_log
                      WHERE workspace_id = c.workspace_id AND seq > c.position
                        AND ($2::text[] IS NULL OR event_type = ANY($2::text[]))
                      ORDER BY seq LIMIT 1) f ON true
         WHERE c.id = $1"
    );
    let client = store.pool.client().await?;
    let row = query_opt(&client, SQL, &[&id.0, types, &i64_of(LAG_EXACT_UP_TO)])
        .await?
        .ok_or_else(|| not_found(id))?;
    let counted = u64_of(get(&row, 0)?);
    if counted == 0 {
        return Ok(Lag {
            events: 0,
            exact: true,
            oldest_logged_at: None,
        });
    }
    let (events, exact) = if counted < LAG_EXACT_UP_TO {
        (counted, true)
    } else {
        // Too many to count on a status read: every log position of the workspace after ours.
        let position: i64 = get(&row, 3)?;
        let head: i64 = get(&row, 4)?;
        (u64_of(head - position).max(LAG_EXACT_UP_TO), false)
    };
    Ok(Lag {
        events,
        exact,
        oldest_logged_at: get::<Option<i64>>(&row, 2)?.map(Millis),
    })
}

async fn tick_log_clock(store: &PgStore, now: Millis, keep_ms: u64) -> Result<(), StoreError> {
    // One sample per workspace whose head moved since its newest sample (bounded work: one
    // row per workspace), then forget samples older than the cutoff except each workspace's
    // newest one before it, so old positions still map to a time.
    const SAMPLE: &str = "INSERT INTO currents_log_clock (workspace_id, at, head)
         SELECT s.workspace_id, $1, s.head FROM workspace_sequences s
         WHERE s.name = 'event_log' AND s.head > 0
           AND s.head > COALESCE((SELECT c.head FROM currents_log_clock c
                                  WHERE c.workspace_id = s.workspace_id
                                  ORDER BY c.at DESC LIMIT 1), 0)
         ON CONFLICT (workspace_id, at) DO UPDATE
             SET head = GREATEST(currents_log_clock.head, EXCLUDED.head)";
    const FORGET: &str = "DELETE FROM currents_log_clock c
         WHERE c.at < $1 AND c.at < (SELECT MAX(o.at) FROM currents_log_clock o
                                     WHERE o.workspace_id = c.workspace_id AND o.at < $1)";
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    execute(&tx, SAMPLE, &[&now.0]).await?;
    let cutoff = now.0.saturating_sub(i64_of(keep_ms));
    execute(&tx, FORGET, &[&cutoff]).await?;
    tx.commit().await.map_err(pg_err)
}

// ---- dead letters and replays -------------------------------------------------------------

async fn list_dead_letters(
    store: &PgStore,
    id: CurrentId,
    after_id: i64,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    const SQL: &str = concat!(
        "SELECT ",
        dead_columns!(),
        " FROM currents_dead_letters
         WHERE workspace_id = (SELECT c.workspace_id FROM currents c WHERE c.id = $1)
           AND current_id = $1 AND id > $2 ORDER BY id LIMIT $3"
    );
    let client = store.pool.client().await?;
    query(&client, SQL, &[&id.0, &after_id, &limit_of(limit)])
        .await?
        .iter()
        .map(dead_letter_of)
        .collect()
}

async fn claim_dead_letters(
    store: &PgStore,
    id: CurrentId,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    const SQL: &str = concat!(
        "SELECT ",
        dead_columns!(),
        " FROM currents_dead_letters
         WHERE workspace_id = (SELECT c.workspace_id FROM currents c WHERE c.id = $1)
           AND current_id = $1 AND replay_pending ORDER BY id LIMIT $2"
    );
    let client = store.pool.client().await?;
    query(&client, SQL, &[&id.0, &limit_of(limit)])
        .await?
        .iter()
        .map(dead_letter_of)
        .collect()
}

async fn replay_dead_letters(
    store: &PgStore,
    id: CurrentId,
    pick: &DeadLetterPick,
) -> Result<u64, StoreError> {
    let client = store.pool.client().await?;
    let all: Option<Vec<i64>> = match pick {
        DeadLetterPick::All => None,
        DeadLetterPick::Ids(ids) => Some(ids.clone()),
    };
    const SQL: &str = "UPDATE currents_dead_letters SET replay_pending = true
         WHERE workspace_id = (SELECT c.workspace_id FROM currents c WHERE c.id = $1)
           AND current_id = $1 AND ($2::bigint[] IS NULL OR id = ANY($2::bigint[]))";
    execute(&client, SQL, &[&id.0, &all]).await
}

async fn replay_window(
    store: &PgStore,
    id: CurrentId,
    from: Millis,
    to: Millis,
    now: Millis,
) -> Result<Option<ReplayWindow>, StoreError> {
    // Everything the window needs from the log clock, in one read: the first position after
    // the newest sample before `from`; the newest sample at or before `to` (or the head when
    // `to` is past the newest sample); and the position.
    const SQL: &str = concat!(
        "SELECT c.workspace_id, c.position,
             COALESCE((SELECT MAX(head) FROM currents_log_clock
                       WHERE workspace_id = c.workspace_id AND at < $2), 0) + 1,
             (SELECT MAX(at) FROM currents_log_clock WHERE workspace_id = c.workspace_id),
             COALESCE((SELECT MAX(head) FROM currents_log_clock
                       WHERE workspace_id = c.workspace_id AND at <= $3), 0), ",
        head_of!("c.workspace_id"),
        "
         FROM currents c WHERE c.id = $1"
    );
    let client = store.pool.client().await?;
    let row = query_opt(&client, SQL, &[&id.0, &from.0, &to.0])
        .await?
        .ok_or_else(|| not_found(id))?;
    let workspace: i64 = get(&row, 0)?;
    let position: i64 = get(&row, 1)?;
    let from_seq: i64 = get(&row, 2)?;
    let last_tick: Option<i64> = get(&row, 3)?;
    let to_seq: i64 = if last_tick.is_none_or(|t| to.0 > t) {
        get(&row, 5)?
    } else {
        get(&row, 4)?
    };
    // Past the position the live consumer delivers anyway: a replay re-delivers only what is
    // already resolved.
    let to_seq = to_seq.min(position);
    if from_seq > to_seq {
        return Ok(None);
    }
    let cursor = from_seq - 1;
    let row = query_one(
        &client,
        "INSERT INTO currents_replays (workspace_id, current_id, from_seq, to_seq, cursor, created_at)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        &[&workspace, &id.0, &from_seq, &to_seq, &cursor, &now.0],
    )
    .await?;
    Ok(Some(ReplayWindow {
        id: get(&row, 0)?,
        current: id,
        from_seq,
        to_seq,
        cursor,
    }))
}

async fn next_replay_window(
    store: &PgStore,
    id: CurrentId,
) -> Result<Option<ReplayWindow>, StoreError> {
    const SQL: &str = "SELECT id, from_seq, to_seq, cursor FROM currents_replays
         WHERE workspace_id = (SELECT c.workspace_id FROM currents c WHERE c.id = $1)
           AND current_id = $1 ORDER BY id LIMIT 1";
    let client = store.pool.client().await?;
    query_opt(&client, SQL, &[&id.0])
        .await?
        .map(|row| {
            Ok(ReplayWindow {
                id: get(&row, 0)?,
                current: id,
                from_seq: get(&row, 1)?,
                to_seq: get(&row, 2)?,
                cursor: get(&row, 3)?,
            })
        })
        .transpose()
}

async fn list_drops(
    store: &PgStore,
    id: CurrentId,
    limit: usize,
) -> Result<Vec<DropRecord>, StoreError> {
    const SQL: &str = "SELECT from_seq, to_seq, count, at FROM currents_drops
         WHERE workspace_id = (SELECT c.workspace_id FROM currents c WHERE c.id = $1)
           AND current_id = $1 ORDER BY id DESC LIMIT $2";
    let client = store.pool.client().await?;
    query(&client, SQL, &[&id.0, &limit_of(limit)])
        .await?
        .iter()
        .map(|row| {
            Ok(DropRecord {
                current: id,
                from_seq: get(row, 0)?,
                to_seq: get(row, 1)?,
                count: u64_of(get(row, 2)?),
                at: Millis(get(row, 3)?),
            })
        })
        .collect()
}

async fn record_test_events(
    store: &PgStore,
    id: CurrentId,
    count: u64,
    max: u64,
    window_ms: u64,
    now: Millis,
) -> Result<(), StoreError> {
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    // The Current's row lock serialises test sends from every node, so two at once cannot
    // both fit under the cap.
    let (workspace, _) = lock(&tx, id).await?.ok_or_else(|| not_found(id))?;
    let since = now.0.saturating_sub(i64_of(window_ms));
    // The sum reads the table as it was before the delete, so it counts only what stays.
    let row = query_one(
        &tx,
        "WITH gone AS (
             DELETE FROM currents_test_sends WHERE workspace_id = $1 AND current_id = $2 AND at < $3
         )
         SELECT COALESCE(SUM(count), 0)::bigint FROM currents_test_sends
         WHERE workspace_id = $1 AND current_id = $2 AND at >= $3",
        &[&workspace.0, &id.0, &since],
    )
    .await?;
    let sent: i64 = get(&row, 0)?;
    if u64_of(sent).saturating_add(count) > max {
        return Err(StoreError::Conflict(format!(
            "test events over the cap of {max} per rolling window ({sent} already sent)"
        )));
    }
    execute(
        &tx,
        "INSERT INTO currents_test_sends (workspace_id, current_id, at, count) VALUES ($1, $2, $3, $4)",
        &[&workspace.0, &id.0, &now.0, &i64_of(count)],
    )
    .await?;
    tx.commit().await.map_err(pg_err)
}

// ---- the trait ----------------------------------------------------------------------------

impl CurrentsStore for PgStore {
    fn create_current(
        &self,
        workspace: WorkspaceId,
        spec: CurrentSpec,
        initial: CurrentStatus,
        now: Millis,
    ) -> StoreFuture<'_, Current> {
        Box::pin(async move { create_current(self, workspace, &spec, initial, now).await })
    }

    fn update_current(
        &self,
        workspace: WorkspaceId,
        id: CurrentId,
        spec: CurrentSpec,
        now: Millis,
    ) -> StoreFuture<'_, Current> {
        Box::pin(async move { update_current(self, workspace, id, &spec, now).await })
    }

    fn get_current(
        &self,
        workspace: WorkspaceId,
        id: CurrentId,
    ) -> StoreFuture<'_, Option<Current>> {
        Box::pin(get_current(self, workspace, id))
    }

    fn list_currents(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<Current>> {
        Box::pin(list_currents(self, Some(workspace)))
    }

    fn all_currents(&self) -> StoreFuture<'_, Vec<Current>> {
        Box::pin(list_currents(self, None))
    }

    fn delete_current(&self, workspace: WorkspaceId, id: CurrentId) -> StoreFuture<'_, bool> {
        Box::pin(delete_current(self, workspace, id))
    }

    fn change_status(
        &self,
        id: CurrentId,
        change: StatusChange,
        reason: Option<LastError>,
        now: Millis,
    ) -> StoreFuture<'_, Current> {
        Box::pin(async move { change_status(self, id, change, reason.as_ref(), now).await })
    }

    fn read_events(
        &self,
        workspace: WorkspaceId,
        after: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<LoggedEvent>> {
        Box::pin(read_events(self, workspace, after, limit))
    }

    fn acquire_lease(
        &self,
        id: CurrentId,
        owner: &str,
        now: Millis,
        ttl_ms: u64,
    ) -> StoreFuture<'_, bool> {
        let owner = owner.to_owned();
        Box::pin(async move { acquire_lease(self, id, &owner, now, ttl_ms).await })
    }

    fn release_lease(&self, id: CurrentId, owner: &str) -> StoreFuture<'_, ()> {
        let owner = owner.to_owned();
        Box::pin(async move { release_lease(self, id, &owner).await })
    }

    fn claim(
        &self,
        workspace: WorkspaceId,
        after: i64,
        scan: usize,
        types: TypeFilter,
    ) -> StoreFuture<'_, Claimed> {
        Box::pin(async move { claim(self, workspace, after, scan, &types).await })
    }

    fn ack(&self, ack: Ack) -> StoreFuture<'_, ()> {
        Box::pin(async move { self::ack(self, &ack).await })
    }

    fn record_failure(
        &self,
        id: CurrentId,
        owner: &str,
        error: LastError,
        retried: u64,
    ) -> StoreFuture<'_, Millis> {
        let owner = owner.to_owned();
        Box::pin(async move { record_failure(self, id, &owner, &error, retried).await })
    }

    fn apply_retention(
        &self,
        id: CurrentId,
        owner: &str,
        cutoff: Millis,
        types: TypeFilter,
        now: Millis,
    ) -> StoreFuture<'_, Option<DropRecord>> {
        let owner = owner.to_owned();
        Box::pin(async move { apply_retention(self, id, &owner, cutoff, &types, now).await })
    }

    fn lag(&self, id: CurrentId, types: TypeFilter) -> StoreFuture<'_, Lag> {
        Box::pin(async move { lag(self, id, &types).await })
    }

    fn tick_log_clock(&self, now: Millis, keep_ms: u64) -> StoreFuture<'_, ()> {
        Box::pin(tick_log_clock(self, now, keep_ms))
    }

    fn list_dead_letters(
        &self,
        id: CurrentId,
        after_id: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<DeadLetter>> {
        Box::pin(list_dead_letters(self, id, after_id, limit))
    }

    fn replay_dead_letters(&self, id: CurrentId, pick: DeadLetterPick) -> StoreFuture<'_, u64> {
        Box::pin(async move { replay_dead_letters(self, id, &pick).await })
    }

    fn claim_dead_letters(&self, id: CurrentId, limit: usize) -> StoreFuture<'_, Vec<DeadLetter>> {
        Box::pin(claim_dead_letters(self, id, limit))
    }

    fn replay_window(
        &self,
        id: CurrentId,
        from: Millis,
        to: Millis,
    ) -> StoreFuture<'_, Option<ReplayWindow>> {
        // As in SQLite, the window is stamped with its end (the trait passes no clock).
        Box::pin(replay_window(self, id, from, to, to))
    }

    fn next_replay_window(&self, id: CurrentId) -> StoreFuture<'_, Option<ReplayWindow>> {
        Box::pin(next_replay_window(self, id))
    }

    fn list_drops(&self, id: CurrentId, limit: usize) -> StoreFuture<'_, Vec<DropRecord>> {
        Box::pin(list_drops(self, id, limit))
    }

    fn record_test_events(
        &self,
        id: CurrentId,
        count: u64,
        max: u64,
        window_ms: u64,
        now: Millis,
    ) -> StoreFuture<'_, ()> {
        Box::pin(record_test_events(self, id, count, max, window_ms, now))
    }

    fn append_events(
        &self,
        workspace: WorkspaceId,
        events: Vec<(Option<UserSeq>, CurrentsEvent)>,
    ) -> StoreFuture<'_, i64> {
        Box::pin(async move { append_events(self, workspace, &events).await })
    }
}
