//! Currents over SQLite: connector definitions, consumer positions and leases, retry state,
//! dead letters, replay windows, retention drops, test-send accounting and the log clock.
//!
//! A Current's spec is one JSON column (encoded and decoded here, so the domain types in
//! `tideway-core` carry no `Serialize`); everything the exporter updates on its hot path
//! (position, counters, lease, failure streak) is a plain column. Every progress write checks
//! the lease owner in its `WHERE` clause: a consumer that lost its lease changes nothing.
//! Type filters in counting queries use `json_each`, so one prepared statement serves any
//! selection.

use crate::codec::{corrupt, i64_of, u64_of};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::{Map, Value, json};
use tideway_core::clock::Millis;
use tideway_core::currents::{CurrentsEvent, EventCategory};
use tideway_core::currents_store::CurrentsStore;
use tideway_core::currents_store::{
    Ack, BatchSource, BearerToken, Claimed, Counters, Current, CurrentId, CurrentKind, CurrentSpec,
    CurrentStatus, DeadLetter, DeadLetterPick, DeadLetterReason, DropRecord, EndpointUrl,
    FieldAction, HeapIdentity, HeapTrackSettings, LAG_EXACT_UP_TO, Lag, LastError, NamePrefix,
    NewDeadLetter, Ordering, QueuedEvent, ReplayWindow, RetryPolicy, Selection, StatusChange,
    Transformation, TypeFilter, Windows,
};
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::store::LoggedEvent;
use tideway_core::store::{StoreError, StoreFuture};

use super::{SqliteStore, sql_err};

const CURRENT_COLUMNS: &str = "id, workspace_id, spec, status, revision, position, delivered, retried, dead_lettered, dropped, skipped, \
     failing_since, last_error_at, last_error_status, last_error, last_success_at, created_at, updated_at";

// ---- spec codec ---------------------------------------------------------------------------

/// The spec as stored (JSON text). The bearer token is stored as given: it has to be sent.
pub fn encode_spec(spec: &CurrentSpec) -> String {
    let selection = match &spec.selection {
        Selection::EventTypes(types) => json!({"event_types": types}),
        Selection::Categories(cats) => {
            json!({"categories": cats.iter().map(|c| c.as_str()).collect::<Vec<_>>()})
        }
    };
    let heap = spec.heap.as_ref().map(|h| {
        json!({
            "app_id": h.app_id,
            "identity": h.identity.as_str(),
            "prefix": matches!(h.prefix, NamePrefix::Braze),
            "app_events_per_minute": h.app_events_per_minute,
            "identity_events_per_minute": h.identity_events_per_minute,
        })
    });
    json!({
        "name": spec.name,
        "kind": spec.kind.as_str(),
        "endpoint": spec.endpoint.as_str(),
        "bearer_token": spec.bearer_token.as_ref().map(BearerToken::expose),
        "selection": selection,
        "batch_size": spec.batch_size,
        "flush_interval_ms": spec.flush_interval_ms,
        "transformations": spec.transformations.iter().map(|t| json!({"field": t.field, "action": t.action.as_str()})).collect::<Vec<_>>(),
        "per_user_ordering": matches!(spec.ordering, Ordering::PerUser),
        "max_in_flight": spec.max_in_flight,
        "retry": {
            "base_ms": spec.retry.base_ms,
            "multiplier": spec.retry.multiplier,
            "cap_ms": spec.retry.cap_ms,
            "request_timeout_ms": spec.retry.request_timeout_ms,
            "max_retry_after_ms": spec.retry.max_retry_after_ms,
        },
        "windows": {
            "failure_window_ms": spec.windows.failure_window_ms,
            "retention_ms": spec.windows.retention_ms,
            "alert_after_ms": spec.windows.alert_after_ms,
        },
        "alert_webhook": spec.alert_webhook.as_ref().map(EndpointUrl::as_str),
        "heap": heap,
    })
    .to_string()
}

fn field<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a Value, StoreError> {
    m.get(k)
        .ok_or_else(|| corrupt(format!("current spec: missing {k}")))
}

fn str_field<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a str, StoreError> {
    field(m, k)?
        .as_str()
        .ok_or_else(|| corrupt(format!("current spec: {k} is not a string")))
}

fn u64_field(m: &Map<String, Value>, k: &str) -> Result<u64, StoreError> {
    field(m, k)?
        .as_u64()
        .ok_or_else(|| corrupt(format!("current spec: {k} is not a number")))
}

fn u32_field(m: &Map<String, Value>, k: &str) -> Result<u32, StoreError> {
    u32::try_from(u64_field(m, k)?).map_err(|_| corrupt(format!("current spec: {k} out of range")))
}

fn obj_field<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a Map<String, Value>, StoreError> {
    field(m, k)?
        .as_object()
        .ok_or_else(|| corrupt(format!("current spec: {k} is not an object")))
}

pub fn decode_spec(text: &str) -> Result<CurrentSpec, StoreError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| corrupt(format!("current spec: {e}")))?;
    let m = value
        .as_object()
        .ok_or_else(|| corrupt("current spec is not an object"))?;
    let kind =
        CurrentKind::parse(str_field(m, "kind")?).ok_or_else(|| corrupt("current spec: kind"))?;
    let endpoint = EndpointUrl::parse(str_field(m, "endpoint")?)
        .map_err(|e| corrupt(format!("current spec: endpoint {e}")))?;
    let bearer_token = match m.get("bearer_token") {
        Some(Value::String(t)) => {
            Some(BearerToken::parse(t).map_err(|_| corrupt("current spec: bearer_token"))?)
        }
        _ => None,
    };
    let sel = obj_field(m, "selection")?;
    let selection = if let Some(types) = sel.get("event_types").and_then(Value::as_array) {
        Selection::EventTypes(
            types
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
        )
    } else {
        let cats = sel
            .get("categories")
            .and_then(Value::as_array)
            .ok_or_else(|| corrupt("current spec: selection"))?;
        Selection::Categories(
            cats.iter()
                .map(|c| {
                    c.as_str()
                        .and_then(EventCategory::parse)
                        .ok_or_else(|| corrupt("current spec: category"))
                })
                .collect::<Result<_, _>>()?,
        )
    };
    let transformations = field(m, "transformations")?
        .as_array()
        .ok_or_else(|| corrupt("current spec: transformations"))?
        .iter()
        .map(|t| {
            let t = t
                .as_object()
                .ok_or_else(|| corrupt("current spec: transformation"))?;
            Ok(Transformation {
                field: str_field(t, "field")?.to_owned(),
                action: FieldAction::parse(str_field(t, "action")?)
                    .ok_or_else(|| corrupt("current spec: action"))?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let r = obj_field(m, "retry")?;
    let retry = RetryPolicy {
        base_ms: u64_field(r, "base_ms")?,
        multiplier: u32_field(r, "multiplier")?,
        cap_ms: u64_field(r, "cap_ms")?,
        request_timeout_ms: u64_field(r, "request_timeout_ms")?,
        max_retry_after_ms: u64_field(r, "max_retry_after_ms")?,
    };
    let w = obj_field(m, "windows")?;
    let windows = Windows {
        failure_window_ms: u64_field(w, "failure_window_ms")?,
        retention_ms: u64_field(w, "retention_ms")?,
        alert_after_ms: u64_field(w, "alert_after_ms")?,
    };
    let alert_webhook = match m.get("alert_webhook") {
        Some(Value::String(u)) => Some(
            EndpointUrl::parse(u)
                .map_err(|e| corrupt(format!("current spec: alert_webhook {e}")))?,
        ),
        _ => None,
    };
    let heap = match m.get("heap") {
        Some(Value::Object(h)) => Some(HeapTrackSettings {
            app_id: str_field(h, "app_id")?.to_owned(),
            identity: HeapIdentity::parse(str_field(h, "identity")?)
                .ok_or_else(|| corrupt("current spec: heap identity"))?,
            prefix: if field(h, "prefix")?.as_bool() == Some(true) {
                NamePrefix::Braze
            } else {
                NamePrefix::None
            },
            app_events_per_minute: u32_field(h, "app_events_per_minute")?,
            identity_events_per_minute: u32_field(h, "identity_events_per_minute")?,
        }),
        _ => None,
    };
    Ok(CurrentSpec {
        name: str_field(m, "name")?.to_owned(),
        kind,
        endpoint,
        bearer_token,
        selection,
        batch_size: u32_field(m, "batch_size")?,
        flush_interval_ms: u64_field(m, "flush_interval_ms")?,
        transformations,
        ordering: if field(m, "per_user_ordering")?.as_bool() == Some(true) {
            Ordering::PerUser
        } else {
            Ordering::Unordered
        },
        max_in_flight: u32_field(m, "max_in_flight")?,
        retry,
        windows,
        alert_webhook,
        heap,
    })
}

// ---- rows ---------------------------------------------------------------------------------

struct RawCurrent {
    id: i64,
    workspace: i64,
    spec: String,
    status: String,
    revision: i64,
    position: i64,
    counters: [i64; 5],
    failing_since: Option<i64>,
    last_error_at: Option<i64>,
    last_error_status: Option<i64>,
    last_error: Option<String>,
    last_success_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

fn raw_current(row: &Row<'_>) -> rusqlite::Result<RawCurrent> {
    Ok(RawCurrent {
        id: row.get(0)?,
        workspace: row.get(1)?,
        spec: row.get(2)?,
        status: row.get(3)?,
        revision: row.get(4)?,
        position: row.get(5)?,
        counters: [
            row.get(6)?,
            row.get(7)?,
            row.get(8)?,
            row.get(9)?,
            row.get(10)?,
        ],
        failing_since: row.get(11)?,
        last_error_at: row.get(12)?,
        last_error_status: row.get(13)?,
        last_error: row.get(14)?,
        last_success_at: row.get(15)?,
        created_at: row.get(16)?,
        updated_at: row.get(17)?,
    })
}

fn current_of(raw: RawCurrent) -> Result<Current, StoreError> {
    let status = CurrentStatus::parse(&raw.status)
        .ok_or_else(|| corrupt(format!("current status {}", raw.status)))?;
    let [delivered, retried, dead_lettered, dropped, skipped] = raw.counters.map(u64_of);
    let last_error = match (raw.last_error_at, raw.last_error) {
        (Some(at), Some(message)) => Some(LastError {
            at: Millis(at),
            status: raw.last_error_status.and_then(|s| u16::try_from(s).ok()),
            message,
        }),
        _ => None,
    };
    Ok(Current {
        id: CurrentId(raw.id),
        workspace: WorkspaceId(raw.workspace),
        spec: decode_spec(&raw.spec)?,
        status,
        revision: raw.revision,
        position: raw.position,
        counters: Counters {
            delivered,
            retried,
            dead_lettered,
            dropped,
            skipped,
        },
        failing_since: raw.failing_since.map(Millis),
        last_error,
        last_success_at: raw.last_success_at.map(Millis),
        created_at: Millis(raw.created_at),
        updated_at: Millis(raw.updated_at),
    })
}

fn load(conn: &Connection, id: CurrentId) -> Result<Option<Current>, StoreError> {
    let sql = format!("SELECT {CURRENT_COLUMNS} FROM currents WHERE id = ?1");
    let raw = conn
        .prepare_cached(&sql)
        .and_then(|mut s| s.query_row([id.0], raw_current).optional())
        .map_err(sql_err)?;
    raw.map(current_of).transpose()
}

fn load_in(
    conn: &Connection,
    workspace: WorkspaceId,
    id: CurrentId,
) -> Result<Option<Current>, StoreError> {
    Ok(load(conn, id)?.filter(|c| c.workspace == workspace))
}

fn head(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM event_log", [], |r| {
        r.get(0)
    })
    .map_err(sql_err)
}

// ---- definitions --------------------------------------------------------------------------

pub fn create_current(
    conn: &Connection,
    workspace: WorkspaceId,
    spec: &CurrentSpec,
    initial: CurrentStatus,
    now: Millis,
) -> Result<Current, StoreError> {
    let exists: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM workspaces WHERE id = ?1)",
            [workspace.0],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    if !exists {
        return Err(StoreError::NotFound(format!("workspace {}", workspace.0)));
    }
    let position = head(conn)?;
    conn.execute(
        "INSERT INTO currents (workspace_id, name, kind, spec, status, revision, position, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7, ?7)",
        params![workspace.0, spec.name, spec.kind.as_str(), encode_spec(spec), initial.as_str(), position, now.0],
    )
    .map_err(sql_err)?;
    load(conn, CurrentId(conn.last_insert_rowid()))?.ok_or_else(|| corrupt("current vanished"))
}

pub fn update_current(
    conn: &Connection,
    workspace: WorkspaceId,
    id: CurrentId,
    spec: &CurrentSpec,
    now: Millis,
) -> Result<Current, StoreError> {
    let n = conn
        .execute(
            "UPDATE currents SET name = ?3, kind = ?4, spec = ?5, revision = revision + 1, updated_at = ?6 WHERE id = ?1 AND workspace_id = ?2",
            params![id.0, workspace.0, spec.name, spec.kind.as_str(), encode_spec(spec), now.0],
        )
        .map_err(sql_err)?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("current {id}")));
    }
    load(conn, id)?.ok_or_else(|| corrupt("current vanished"))
}

pub fn get_current(
    conn: &Connection,
    workspace: WorkspaceId,
    id: CurrentId,
) -> Result<Option<Current>, StoreError> {
    load_in(conn, workspace, id)
}

pub fn list_currents(
    conn: &Connection,
    workspace: Option<WorkspaceId>,
) -> Result<Vec<Current>, StoreError> {
    let sql = format!(
        "SELECT {CURRENT_COLUMNS} FROM currents WHERE ?1 IS NULL OR workspace_id = ?1 ORDER BY id"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let rows = stmt
        .query_map([workspace.map(|w| w.0)], raw_current)
        .map_err(sql_err)?;
    let raws: Vec<RawCurrent> = rows.collect::<Result<_, _>>().map_err(sql_err)?;
    raws.into_iter().map(current_of).collect()
}

pub fn delete_current(
    conn: &Connection,
    workspace: WorkspaceId,
    id: CurrentId,
) -> Result<bool, StoreError> {
    let n = conn
        .execute(
            "DELETE FROM currents WHERE id = ?1 AND workspace_id = ?2",
            params![id.0, workspace.0],
        )
        .map_err(sql_err)?;
    if n > 0 {
        for table in [
            "currents_dead_letters",
            "currents_replays",
            "currents_drops",
            "currents_test_sends",
        ] {
            conn.execute(
                &format!("DELETE FROM {table} WHERE current_id = ?1"),
                [id.0],
            )
            .map_err(sql_err)?;
        }
    }
    Ok(n > 0)
}

pub fn change_status(
    conn: &Connection,
    id: CurrentId,
    change: StatusChange,
    reason: Option<&LastError>,
    now: Millis,
) -> Result<Current, StoreError> {
    let current = load(conn, id)?.ok_or_else(|| StoreError::NotFound(format!("current {id}")))?;
    let (from, to) = change.rule();
    if !from.contains(&current.status) {
        return Err(StoreError::Conflict(format!(
            "a {} Current cannot {change:?}",
            current.status.as_str()
        )));
    }
    conn.execute(
        "UPDATE currents SET status = ?2, revision = revision + 1, updated_at = ?3,
             failing_since = CASE WHEN ?4 THEN NULL ELSE failing_since END,
             position = CASE WHEN ?5 THEN MAX(position, (SELECT COALESCE(MAX(seq), 0) FROM event_log)) ELSE position END
         WHERE id = ?1",
        params![id.0, to.as_str(), now.0, change == StatusChange::Enable, change == StatusChange::Launch],
    )
    .map_err(sql_err)?;
    if let Some(e) = reason {
        conn.execute(
            "UPDATE currents SET last_error_at = ?2, last_error_status = ?3, last_error = ?4 WHERE id = ?1",
            params![id.0, e.at.0, e.status, e.message],
        )
        .map_err(sql_err)?;
    }
    load(conn, id)?.ok_or_else(|| corrupt("current vanished"))
}

// ---- consuming ----------------------------------------------------------------------------

pub fn acquire_lease(
    conn: &Connection,
    id: CurrentId,
    owner: &str,
    now: Millis,
    ttl_ms: u64,
) -> Result<bool, StoreError> {
    let n = conn
        .prepare_cached(
            "UPDATE currents SET lease_owner = ?2, lease_until = ?4
             WHERE id = ?1 AND (lease_owner IS NULL OR lease_owner = ?2 OR lease_until < ?3)",
        )
        .and_then(|mut s| {
            s.execute(params![
                id.0,
                owner,
                now.0,
                now.0.saturating_add(i64_of(ttl_ms))
            ])
        })
        .map_err(sql_err)?;
    Ok(n > 0)
}

pub fn release_lease(conn: &Connection, id: CurrentId, owner: &str) -> Result<(), StoreError> {
    conn.execute("UPDATE currents SET lease_owner = NULL, lease_until = NULL WHERE id = ?1 AND lease_owner = ?2", params![id.0, owner])
        .map_err(sql_err)?;
    Ok(())
}

fn lease_lost(id: CurrentId) -> StoreError {
    StoreError::Conflict(format!("the lease on current {id}"))
}

pub fn claim(
    conn: &Connection,
    workspace: WorkspaceId,
    after: i64,
    scan: usize,
    types: &TypeFilter,
) -> Result<Claimed, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, event_id, event_type, user_seq, body FROM event_log WHERE workspace_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .map_err(sql_err)?;
    let mut rows = stmt
        .query(params![workspace.0, after, i64_of(scan as u64)])
        .map_err(sql_err)?;
    let mut claimed = Claimed {
        events: Vec::new(),
        scanned_to: after,
        scanned: 0,
    };
    while let Some(row) = rows.next().map_err(sql_err)? {
        let seq: i64 = row.get(0).map_err(sql_err)?;
        claimed.scanned_to = seq;
        claimed.scanned += 1;
        let event_type: String = row.get(2).map_err(sql_err)?;
        if let Some(types) = types
            && !types.contains(&event_type)
        {
            continue;
        }
        claimed.events.push(QueuedEvent {
            seq,
            event_id: row.get(1).map_err(sql_err)?,
            event_type,
            user: row.get::<_, Option<u32>>(3).map_err(sql_err)?.map(UserSeq),
            body: row.get(4).map_err(sql_err)?,
        });
    }
    Ok(claimed)
}

/// Inserts or refreshes one dead letter; returns true when it is new.
fn put_dead_letter(
    conn: &Connection,
    current: CurrentId,
    dl: &NewDeadLetter,
    now: Millis,
) -> Result<bool, StoreError> {
    let existed: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM currents_dead_letters WHERE current_id = ?1 AND event_id = ?2)")
        .and_then(|mut s| s.query_row(params![current.0, dl.event.event_id], |r| r.get(0)))
        .map_err(sql_err)?;
    conn.prepare_cached(
        "INSERT INTO currents_dead_letters
             (current_id, event_seq, event_id, event_type, user_seq, body, reason, detail, response_status, response_body, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (current_id, event_id) DO UPDATE SET
             reason = excluded.reason, detail = excluded.detail, response_status = excluded.response_status,
             response_body = excluded.response_body, attempts = attempts + 1, replay_pending = 0",
    )
    .and_then(|mut s| {
        s.execute(params![
            current.0,
            dl.event.seq,
            dl.event.event_id,
            dl.event.event_type,
            dl.event.user.map(|u| u.0),
            dl.event.body,
            dl.reason.as_str(),
            dl.detail,
            dl.response_status,
            dl.response_body,
            now.0
        ])
    })
    .map_err(sql_err)?;
    Ok(!existed)
}

pub fn ack(conn: &Connection, ack: &Ack) -> Result<(), StoreError> {
    let resolved_something = ack.delivered > 0 || ack.skipped > 0 || !ack.dead_letters.is_empty();
    let mut fresh_dead = 0u64;
    for dl in &ack.dead_letters {
        if put_dead_letter(conn, ack.current, dl, ack.at)? {
            fresh_dead += 1;
        }
    }
    let position = match &ack.source {
        BatchSource::Live { resolved_to } => Some(*resolved_to),
        BatchSource::Window {
            window,
            resolved_to,
        } => {
            conn.execute(
                "UPDATE currents_replays SET cursor = MAX(cursor, ?2) WHERE id = ?1",
                params![window, resolved_to],
            )
            .map_err(sql_err)?;
            conn.execute(
                "DELETE FROM currents_replays WHERE id = ?1 AND cursor >= to_seq",
                [window],
            )
            .map_err(sql_err)?;
            None
        }
        BatchSource::DeadLetters { ids } => {
            let mut stmt = conn
                .prepare_cached("DELETE FROM currents_dead_letters WHERE current_id = ?1 AND id = ?2 AND replay_pending = 1")
                .map_err(sql_err)?;
            for id in ids {
                stmt.execute(params![ack.current.0, id]).map_err(sql_err)?;
            }
            None
        }
    };
    let n = conn
        .prepare_cached(
            "UPDATE currents SET
                 position = CASE WHEN ?3 IS NULL THEN position ELSE MAX(position, ?3) END,
                 delivered = delivered + ?4, skipped = skipped + ?5, dead_lettered = dead_lettered + ?6,
                 last_success_at = CASE WHEN ?4 > 0 THEN ?7 ELSE last_success_at END,
                 failing_since = CASE WHEN ?8 THEN NULL ELSE failing_since END
             WHERE id = ?1 AND lease_owner = ?2",
        )
        .and_then(|mut s| {
            s.execute(params![
                ack.current.0,
                ack.owner,
                position,
                i64_of(ack.delivered),
                i64_of(ack.skipped),
                i64_of(fresh_dead),
                ack.at.0,
                resolved_something
            ])
        })
        .map_err(sql_err)?;
    if n == 0 {
        return Err(lease_lost(ack.current));
    }
    Ok(())
}

pub fn record_failure(
    conn: &Connection,
    id: CurrentId,
    owner: &str,
    error: &LastError,
    retried: u64,
) -> Result<Millis, StoreError> {
    let since: Option<i64> = conn
        .prepare_cached(
            "UPDATE currents SET failing_since = COALESCE(failing_since, ?3), last_error_at = ?3, last_error_status = ?4,
                 last_error = ?5, retried = retried + ?6
             WHERE id = ?1 AND lease_owner = ?2 RETURNING failing_since",
        )
        .and_then(|mut s| {
            s.query_row(params![id.0, owner, error.at.0, error.status, error.message, i64_of(retried)], |r| r.get(0)).optional()
        })
        .map_err(sql_err)?;
    since.map(Millis).ok_or_else(|| lease_lost(id))
}

fn types_json(types: &TypeFilter) -> Option<String> {
    types.as_ref().map(|t| Value::from(t.clone()).to_string())
}

fn count_selected(
    conn: &Connection,
    workspace: WorkspaceId,
    after: i64,
    upto: i64,
    types: &TypeFilter,
) -> Result<u64, StoreError> {
    conn.prepare_cached(
        "SELECT COUNT(*) FROM event_log WHERE workspace_id = ?1 AND seq > ?2 AND seq <= ?3
             AND (?4 IS NULL OR event_type IN (SELECT value FROM json_each(?4)))",
    )
    .and_then(|mut s| {
        s.query_row(params![workspace.0, after, upto, types_json(types)], |r| {
            r.get::<_, i64>(0)
        })
    })
    .map(u64_of)
    .map_err(sql_err)
}

/// The last log position known to have entered the log before `cutoff`.
fn head_before(conn: &Connection, cutoff: Millis) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT MAX(head) FROM currents_log_clock WHERE at < ?1")
        .and_then(|mut s| s.query_row([cutoff.0], |r| r.get(0)))
        .map_err(sql_err)
}

pub fn apply_retention(
    conn: &Connection,
    id: CurrentId,
    owner: &str,
    cutoff: Millis,
    types: &TypeFilter,
    now: Millis,
) -> Result<Option<DropRecord>, StoreError> {
    let current = load(conn, id)?.ok_or_else(|| StoreError::NotFound(format!("current {id}")))?;
    let Some(old_head) = head_before(conn, cutoff)? else {
        return Ok(None);
    };
    if old_head <= current.position {
        return Ok(None);
    }
    let count = count_selected(conn, current.workspace, current.position, old_head, types)?;
    let n = conn
        .execute(
            "UPDATE currents SET position = MAX(position, ?3), dropped = dropped + ?4 WHERE id = ?1 AND lease_owner = ?2",
            params![id.0, owner, old_head, i64_of(count)],
        )
        .map_err(sql_err)?;
    if n == 0 {
        return Err(lease_lost(id));
    }
    if count == 0 {
        return Ok(None);
    }
    conn.execute(
        "INSERT INTO currents_drops (current_id, from_seq, to_seq, count, at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id.0, current.position, old_head, i64_of(count), now.0],
    )
    .map_err(sql_err)?;
    Ok(Some(DropRecord {
        current: id,
        from_seq: current.position,
        to_seq: old_head,
        count,
        at: now,
    }))
}

pub fn lag(conn: &Connection, id: CurrentId, types: &TypeFilter) -> Result<Lag, StoreError> {
    let current = load(conn, id)?.ok_or_else(|| StoreError::NotFound(format!("current {id}")))?;
    let counted: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM (SELECT 1 FROM event_log WHERE workspace_id = ?1 AND seq > ?2
                 AND (?3 IS NULL OR event_type IN (SELECT value FROM json_each(?3))) LIMIT ?4)",
        )
        .and_then(|mut s| {
            s.query_row(
                params![
                    current.workspace.0,
                    current.position,
                    types_json(types),
                    i64_of(LAG_EXACT_UP_TO)
                ],
                |r| r.get(0),
            )
        })
        .map_err(sql_err)?;
    if counted == 0 {
        return Ok(Lag {
            events: 0,
            exact: true,
            oldest_logged_at: None,
        });
    }
    let (events, exact) = if u64_of(counted) < LAG_EXACT_UP_TO {
        (u64_of(counted), true)
    } else {
        // Too many to count on a status read: every log position of the workspace after ours.
        let last: i64 = conn
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM event_log WHERE workspace_id = ?1")
            .and_then(|mut s| s.query_row([current.workspace.0], |r| r.get(0)))
            .map_err(sql_err)?;
        (u64_of(last - current.position).max(LAG_EXACT_UP_TO), false)
    };
    let first: Option<i64> = conn
        .prepare_cached(
            "SELECT MIN(seq) FROM event_log WHERE workspace_id = ?1 AND seq > ?2
                 AND (?3 IS NULL OR event_type IN (SELECT value FROM json_each(?3)))",
        )
        .and_then(|mut s| {
            s.query_row(
                params![current.workspace.0, current.position, types_json(types)],
                |r| r.get(0),
            )
        })
        .map_err(sql_err)?;
    let oldest = match first {
        Some(seq) => conn
            .prepare_cached("SELECT MIN(at) FROM currents_log_clock WHERE head >= ?1")
            .and_then(|mut s| s.query_row([seq], |r| r.get::<_, Option<i64>>(0)))
            .map_err(sql_err)?
            .map(Millis),
        None => None,
    };
    Ok(Lag {
        events,
        exact,
        oldest_logged_at: oldest,
    })
}

pub fn tick_log_clock(conn: &Connection, now: Millis, keep_ms: u64) -> Result<(), StoreError> {
    let head = head(conn)?;
    let last: Option<i64> = conn
        .prepare_cached("SELECT head FROM currents_log_clock ORDER BY at DESC LIMIT 1")
        .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
        .map_err(sql_err)?;
    if head > 0 && last.is_none_or(|l| head > l) {
        conn.prepare_cached("INSERT INTO currents_log_clock (at, head) VALUES (?1, ?2) ON CONFLICT (at) DO UPDATE SET head = MAX(head, excluded.head)")
            .and_then(|mut s| s.execute(params![now.0, head]))
            .map_err(sql_err)?;
    }
    let cutoff = now.0.saturating_sub(i64_of(keep_ms));
    conn.prepare_cached(
        "DELETE FROM currents_log_clock WHERE at < ?1 AND at < (SELECT MAX(at) FROM currents_log_clock WHERE at < ?1)",
    )
    .and_then(|mut s| s.execute([cutoff]))
    .map_err(sql_err)?;
    Ok(())
}

// ---- dead letters and replays -------------------------------------------------------------

const DEAD_COLUMNS: &str = "id, current_id, event_seq, event_id, event_type, user_seq, body, reason, detail, response_status, \
     response_body, created_at, attempts, replay_pending";

fn dead_letter(row: &Row<'_>) -> rusqlite::Result<(DeadLetter, String)> {
    let reason: String = row.get(7)?;
    Ok((
        DeadLetter {
            id: row.get(0)?,
            current: CurrentId(row.get(1)?),
            event: QueuedEvent {
                seq: row.get(2)?,
                event_id: row.get(3)?,
                event_type: row.get(4)?,
                user: row.get::<_, Option<u32>>(5)?.map(UserSeq),
                body: row.get(6)?,
            },
            reason: DeadLetterReason::Rejected,
            detail: row.get(8)?,
            response_status: row
                .get::<_, Option<i64>>(9)?
                .and_then(|s| u16::try_from(s).ok()),
            response_body: row.get(10)?,
            created_at: Millis(row.get(11)?),
            attempts: row.get(12)?,
            replay_pending: row.get(13)?,
        },
        reason,
    ))
}

fn dead_letters(
    conn: &Connection,
    sql: &str,
    id: CurrentId,
    a: i64,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(sql_err)?;
    let rows = stmt
        .query_map(params![id.0, a, i64_of(limit as u64)], dead_letter)
        .map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (mut dl, reason) = row.map_err(sql_err)?;
        dl.reason = DeadLetterReason::parse(&reason)
            .ok_or_else(|| corrupt(format!("dead letter reason {reason}")))?;
        out.push(dl);
    }
    Ok(out)
}

pub fn list_dead_letters(
    conn: &Connection,
    id: CurrentId,
    after_id: i64,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let sql = format!(
        "SELECT {DEAD_COLUMNS} FROM currents_dead_letters WHERE current_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
    );
    dead_letters(conn, &sql, id, after_id, limit)
}

pub fn claim_dead_letters(
    conn: &Connection,
    id: CurrentId,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let sql = format!(
        "SELECT {DEAD_COLUMNS} FROM currents_dead_letters WHERE current_id = ?1 AND replay_pending = ?2 ORDER BY id LIMIT ?3"
    );
    dead_letters(conn, &sql, id, 1, limit)
}

pub fn replay_dead_letters(
    conn: &Connection,
    id: CurrentId,
    pick: &DeadLetterPick,
) -> Result<u64, StoreError> {
    let n = match pick {
        DeadLetterPick::All => conn
            .execute(
                "UPDATE currents_dead_letters SET replay_pending = 1 WHERE current_id = ?1",
                [id.0],
            )
            .map_err(sql_err)?,
        DeadLetterPick::Ids(ids) => {
            let mut stmt = conn
                .prepare_cached("UPDATE currents_dead_letters SET replay_pending = 1 WHERE current_id = ?1 AND id = ?2")
                .map_err(sql_err)?;
            let mut n = 0;
            for dl in ids {
                n += stmt.execute(params![id.0, dl]).map_err(sql_err)?;
            }
            n
        }
    };
    Ok(n as u64)
}

pub fn replay_window(
    conn: &Connection,
    id: CurrentId,
    from: Millis,
    to: Millis,
    now: Millis,
) -> Result<Option<ReplayWindow>, StoreError> {
    let current = load(conn, id)?.ok_or_else(|| StoreError::NotFound(format!("current {id}")))?;
    let from_seq = head_before(conn, from)?.unwrap_or(0) + 1;
    let last_tick: Option<i64> = conn
        .query_row("SELECT MAX(at) FROM currents_log_clock", [], |r| r.get(0))
        .map_err(sql_err)?;
    let to_seq = if last_tick.is_none_or(|t| to.0 > t) {
        head(conn)?
    } else {
        conn.query_row(
            "SELECT COALESCE(MAX(head), 0) FROM currents_log_clock WHERE at <= ?1",
            [to.0],
            |r| r.get(0),
        )
        .map_err(sql_err)?
    };
    // Past the position the live consumer delivers anyway: a replay re-delivers only what is
    // already resolved.
    let to_seq = to_seq.min(current.position);
    if from_seq > to_seq {
        return Ok(None);
    }
    conn.execute(
        "INSERT INTO currents_replays (current_id, from_seq, to_seq, cursor, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id.0, from_seq, to_seq, from_seq - 1, now.0],
    )
    .map_err(sql_err)?;
    Ok(Some(ReplayWindow {
        id: conn.last_insert_rowid(),
        current: id,
        from_seq,
        to_seq,
        cursor: from_seq - 1,
    }))
}

pub fn next_replay_window(
    conn: &Connection,
    id: CurrentId,
) -> Result<Option<ReplayWindow>, StoreError> {
    conn.prepare_cached("SELECT id, from_seq, to_seq, cursor FROM currents_replays WHERE current_id = ?1 ORDER BY id LIMIT 1")
        .and_then(|mut s| {
            s.query_row([id.0], |r| Ok(ReplayWindow { id: r.get(0)?, current: id, from_seq: r.get(1)?, to_seq: r.get(2)?, cursor: r.get(3)? }))
                .optional()
        })
        .map_err(sql_err)
}

pub fn list_drops(
    conn: &Connection,
    id: CurrentId,
    limit: usize,
) -> Result<Vec<DropRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT from_seq, to_seq, count, at FROM currents_drops WHERE current_id = ?1 ORDER BY id DESC LIMIT ?2")
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(params![id.0, i64_of(limit as u64)], |r| {
            Ok(DropRecord {
                current: id,
                from_seq: r.get(0)?,
                to_seq: r.get(1)?,
                count: u64_of(r.get(2)?),
                at: Millis(r.get(3)?),
            })
        })
        .map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

pub fn record_test_events(
    conn: &Connection,
    id: CurrentId,
    count: u64,
    max: u64,
    window_ms: u64,
    now: Millis,
) -> Result<(), StoreError> {
    let since = now.0.saturating_sub(i64_of(window_ms));
    conn.execute(
        "DELETE FROM currents_test_sends WHERE current_id = ?1 AND at < ?2",
        params![id.0, since],
    )
    .map_err(sql_err)?;
    let sent: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(count), 0) FROM currents_test_sends WHERE current_id = ?1",
            [id.0],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    if u64_of(sent).saturating_add(count) > max {
        return Err(StoreError::Conflict(format!(
            "test events over the cap of {max} per rolling window ({sent} already sent)"
        )));
    }
    conn.execute(
        "INSERT INTO currents_test_sends (current_id, at, count) VALUES (?1, ?2, ?3)",
        params![id.0, now.0, i64_of(count)],
    )
    .map_err(sql_err)?;
    Ok(())
}

pub fn append_events(
    conn: &Connection,
    workspace: WorkspaceId,
    events: &[(Option<UserSeq>, CurrentsEvent)],
) -> Result<i64, StoreError> {
    let mut stmt = conn
        .prepare_cached("INSERT INTO event_log (workspace_id, user_seq, event_id, event_type, time, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        .map_err(sql_err)?;
    let mut last = 0;
    for (user, event) in events {
        stmt.execute(params![
            workspace.0,
            user.map(|u| u.0),
            event.id.0,
            event.event_type.as_str(),
            event.time,
            event.body.as_str()
        ])
        .map_err(sql_err)?;
        last = conn.last_insert_rowid();
    }
    Ok(last)
}

// ---- the trait ----------------------------------------------------------------------------

impl CurrentsStore for SqliteStore {
    fn read_events(
        &self,
        workspace: WorkspaceId,
        after: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<LoggedEvent>> {
        self.read(move |conn| super::admin::read_events(conn, workspace, after, limit))
    }

    fn create_current(
        &self,
        workspace: WorkspaceId,
        spec: CurrentSpec,
        initial: CurrentStatus,
        now: Millis,
    ) -> StoreFuture<'_, Current> {
        self.write(move |conn, _, _| create_current(conn, workspace, &spec, initial, now))
    }

    fn update_current(
        &self,
        workspace: WorkspaceId,
        id: CurrentId,
        spec: CurrentSpec,
        now: Millis,
    ) -> StoreFuture<'_, Current> {
        self.write(move |conn, _, _| update_current(conn, workspace, id, &spec, now))
    }

    fn get_current(
        &self,
        workspace: WorkspaceId,
        id: CurrentId,
    ) -> StoreFuture<'_, Option<Current>> {
        self.read(move |conn| get_current(conn, workspace, id))
    }

    fn list_currents(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<Current>> {
        self.read(move |conn| list_currents(conn, Some(workspace)))
    }

    fn all_currents(&self) -> StoreFuture<'_, Vec<Current>> {
        self.read(|conn| list_currents(conn, None))
    }

    fn delete_current(&self, workspace: WorkspaceId, id: CurrentId) -> StoreFuture<'_, bool> {
        self.write(move |conn, _, _| delete_current(conn, workspace, id))
    }

    fn change_status(
        &self,
        id: CurrentId,
        change: StatusChange,
        reason: Option<LastError>,
        now: Millis,
    ) -> StoreFuture<'_, Current> {
        self.write(move |conn, _, _| change_status(conn, id, change, reason.as_ref(), now))
    }

    fn acquire_lease(
        &self,
        id: CurrentId,
        owner: &str,
        now: Millis,
        ttl_ms: u64,
    ) -> StoreFuture<'_, bool> {
        let owner = owner.to_owned();
        self.write(move |conn, _, _| acquire_lease(conn, id, &owner, now, ttl_ms))
    }

    fn release_lease(&self, id: CurrentId, owner: &str) -> StoreFuture<'_, ()> {
        let owner = owner.to_owned();
        self.write(move |conn, _, _| release_lease(conn, id, &owner))
    }

    fn claim(
        &self,
        workspace: WorkspaceId,
        after: i64,
        scan: usize,
        types: TypeFilter,
    ) -> StoreFuture<'_, Claimed> {
        self.read(move |conn| claim(conn, workspace, after, scan, &types))
    }

    fn ack(&self, ack: Ack) -> StoreFuture<'_, ()> {
        self.write(move |conn, _, _| self::ack(conn, &ack))
    }

    fn record_failure(
        &self,
        id: CurrentId,
        owner: &str,
        error: LastError,
        retried: u64,
    ) -> StoreFuture<'_, Millis> {
        let owner = owner.to_owned();
        self.write(move |conn, _, _| record_failure(conn, id, &owner, &error, retried))
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
        self.write(move |conn, _, _| apply_retention(conn, id, &owner, cutoff, &types, now))
    }

    fn lag(&self, id: CurrentId, types: TypeFilter) -> StoreFuture<'_, Lag> {
        self.read(move |conn| lag(conn, id, &types))
    }

    fn tick_log_clock(&self, now: Millis, keep_ms: u64) -> StoreFuture<'_, ()> {
        self.write(move |conn, _, _| tick_log_clock(conn, now, keep_ms))
    }

    fn list_dead_letters(
        &self,
        id: CurrentId,
        after_id: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<DeadLetter>> {
        self.read(move |conn| list_dead_letters(conn, id, after_id, limit))
    }

    fn replay_dead_letters(&self, id: CurrentId, pick: DeadLetterPick) -> StoreFuture<'_, u64> {
        self.write(move |conn, _, _| replay_dead_letters(conn, id, &pick))
    }

    fn claim_dead_letters(&self, id: CurrentId, limit: usize) -> StoreFuture<'_, Vec<DeadLetter>> {
        self.read(move |conn| claim_dead_letters(conn, id, limit))
    }

    fn replay_window(
        &self,
        id: CurrentId,
        from: Millis,
        to: Millis,
    ) -> StoreFuture<'_, Option<ReplayWindow>> {
        self.write(move |conn, _, _| replay_window(conn, id, from, to, to))
    }

    fn next_replay_window(&self, id: CurrentId) -> StoreFuture<'_, Option<ReplayWindow>> {
        self.read(move |conn| next_replay_window(conn, id))
    }

    fn list_drops(&self, id: CurrentId, limit: usize) -> StoreFuture<'_, Vec<DropRecord>> {
        self.read(move |conn| list_drops(conn, id, limit))
    }

    fn record_test_events(
        &self,
        id: CurrentId,
        count: u64,
        max: u64,
        window_ms: u64,
        now: Millis,
    ) -> StoreFuture<'_, ()> {
        self.write(move |conn, _, _| record_test_events(conn, id, count, max, window_ms, now))
    }

    fn append_events(
        &self,
        workspace: WorkspaceId,
        events: Vec<(Option<UserSeq>, CurrentsEvent)>,
    ) -> StoreFuture<'_, i64> {
        self.write(move |conn, _, _| append_events(conn, workspace, &events))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideway_core::currents::{CurrentsEvent, EventUser};
    use tideway_core::currents_store::{
        DEFAULT_BATCH_SIZE, DEFAULT_FLUSH_INTERVAL_MS, DEFAULT_MAX_IN_FLIGHT,
    };
    use tideway_core::ids::{BrazeId, EventId};

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        conn.execute(
            "INSERT INTO workspaces (name, app_group_id, created_at) VALUES ('w', 'ag', 0)",
            [],
        )
        .unwrap();
        conn
    }

    fn spec() -> CurrentSpec {
        CurrentSpec {
            name: "c".into(),
            kind: CurrentKind::HeapTrack,
            endpoint: EndpointUrl::parse("https://h.example/x?k=1").unwrap(),
            bearer_token: Some(BearerToken::parse("t0k==").unwrap()),
            selection: Selection::Categories(vec![
                EventCategory::User,
                EventCategory::CustomerBehavior,
            ]),
            batch_size: DEFAULT_BATCH_SIZE,
            flush_interval_ms: DEFAULT_FLUSH_INTERVAL_MS,
            transformations: vec![Transformation {
                field: "email_address".into(),
                action: FieldAction::Hash,
            }],
            ordering: Ordering::PerUser,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            retry: RetryPolicy::default(),
            windows: Windows::default(),
            alert_webhook: Some(EndpointUrl::parse("http://alerts.example/").unwrap()),
            heap: Some(HeapTrackSettings {
                app_id: "11".into(),
                identity: HeapIdentity::UserId,
                prefix: NamePrefix::Braze,
                app_events_per_minute: 15_000,
                identity_events_per_minute: 1_000,
            }),
        }
    }

    fn append(conn: &Connection, n: usize) -> i64 {
        let braze = BrazeId::from_bytes([1; 12]);
        let user = EventUser {
            braze_id: &braze,
            external_id: None,
            device_id: None,
            time_zone: None,
        };
        let events: Vec<_> = (0..n)
            .map(|i| {
                (
                    None,
                    CurrentsEvent::custom_event(
                        EventId(format!("e{i}")),
                        Millis(0),
                        &user,
                        "ag",
                        None,
                        "n",
                        &Map::new(),
                    ),
                )
            })
            .collect();
        append_events(conn, WorkspaceId(1), &events).unwrap()
    }

    fn queued(seq: i64) -> QueuedEvent {
        QueuedEvent {
            seq,
            event_id: format!("e{seq}"),
            event_type: "t".into(),
            user: None,
            body: "{}".into(),
        }
    }

    #[test]
    fn specs_round_trip_through_the_json_column() {
        let s = spec();
        assert_eq!(decode_spec(&encode_spec(&s)).unwrap(), s);
        let mut plain = spec();
        plain.selection = Selection::EventTypes(vec!["users.behaviors.CustomEvent".into()]);
        plain.bearer_token = None;
        plain.heap = None;
        plain.alert_webhook = None;
        plain.ordering = Ordering::Unordered;
        assert_eq!(decode_spec(&encode_spec(&plain)).unwrap(), plain);
    }

    #[test]
    fn a_current_starts_at_the_head_and_status_rules_hold() {
        let conn = db();
        append(&conn, 3);
        let c = create_current(
            &conn,
            WorkspaceId(1),
            &spec(),
            CurrentStatus::Draft,
            Millis(1),
        )
        .unwrap();
        assert_eq!(
            (c.position, c.status, c.revision),
            (3, CurrentStatus::Draft, 1)
        );
        assert!(matches!(
            change_status(&conn, c.id, StatusChange::Resume, None, Millis(2)),
            Err(StoreError::Conflict(_))
        ));
        append(&conn, 2);
        let c = change_status(&conn, c.id, StatusChange::Launch, None, Millis(2)).unwrap();
        assert_eq!(
            (c.status, c.position, c.revision),
            (CurrentStatus::Active, 5, 2),
            "launch starts at the head"
        );
        assert!(
            create_current(
                &conn,
                WorkspaceId(9),
                &spec(),
                CurrentStatus::Draft,
                Millis(1)
            )
            .is_err()
        );
        assert!(
            get_current(&conn, WorkspaceId(2), c.id).unwrap().is_none(),
            "other workspaces cannot see it"
        );
    }

    #[test]
    fn leases_fence_progress_writes() {
        let conn = db();
        append(&conn, 4);
        let c = create_current(
            &conn,
            WorkspaceId(1),
            &spec(),
            CurrentStatus::Active,
            Millis(1),
        )
        .unwrap();
        conn.execute("UPDATE currents SET position = 0", [])
            .unwrap();
        assert!(acquire_lease(&conn, c.id, "a", Millis(0), 1_000).unwrap());
        assert!(
            !acquire_lease(&conn, c.id, "b", Millis(500), 1_000).unwrap(),
            "held"
        );
        assert!(
            acquire_lease(&conn, c.id, "a", Millis(900), 1_000).unwrap(),
            "renewed by its owner"
        );
        let ack_by = |owner: &str| Ack {
            current: c.id,
            owner: owner.into(),
            source: BatchSource::Live { resolved_to: 2 },
            delivered: 2,
            skipped: 0,
            dead_letters: vec![],
            at: Millis(1_000),
        };
        assert!(matches!(
            ack(&conn, &ack_by("b")),
            Err(StoreError::Conflict(_))
        ));
        ack(&conn, &ack_by("a")).unwrap();
        assert!(
            acquire_lease(&conn, c.id, "b", Millis(2_000), 1_000).unwrap(),
            "expired: taken over"
        );
        assert!(
            matches!(ack(&conn, &ack_by("a")), Err(StoreError::Conflict(_))),
            "the old owner is fenced off"
        );
        let c = load(&conn, c.id).unwrap().unwrap();
        assert_eq!(
            (c.position, c.counters.delivered, c.last_success_at),
            (2, 2, Some(Millis(1_000)))
        );
    }

    #[test]
    fn failures_streaks_dead_letters_and_replays() {
        let conn = db();
        append(&conn, 4);
        let c = create_current(
            &conn,
            WorkspaceId(1),
            &spec(),
            CurrentStatus::Active,
            Millis(1),
        )
        .unwrap();
        acquire_lease(&conn, c.id, "a", Millis(0), 60_000).unwrap();
        let err = |at| LastError {
            at: Millis(at),
            status: Some(503),
            message: "HTTP 503".into(),
        };
        assert_eq!(
            record_failure(&conn, c.id, "a", &err(10), 100).unwrap(),
            Millis(10)
        );
        assert_eq!(
            record_failure(&conn, c.id, "a", &err(20), 100).unwrap(),
            Millis(10),
            "the streak keeps its start"
        );
        let dl = NewDeadLetter {
            event: queued(3),
            reason: DeadLetterReason::Rejected,
            detail: "HTTP 400".into(),
            response_status: Some(400),
            response_body: Some("bad".into()),
        };
        let a = Ack {
            current: c.id,
            owner: "a".into(),
            source: BatchSource::Live { resolved_to: 4 },
            delivered: 3,
            skipped: 0,
            dead_letters: vec![dl.clone()],
            at: Millis(30),
        };
        ack(&conn, &a).unwrap();
        let c2 = load(&conn, c.id).unwrap().unwrap();
        assert_eq!(
            (
                c2.failing_since,
                c2.counters.retried,
                c2.counters.dead_lettered
            ),
            (None, 200, 1)
        );
        assert_eq!(c2.last_error.unwrap().status, Some(503));
        let dead = list_dead_letters(&conn, c.id, 0, 10).unwrap();
        assert_eq!(
            (
                dead[0].reason,
                dead[0].response_body.as_deref(),
                dead[0].attempts
            ),
            (DeadLetterReason::Rejected, Some("bad"), 1)
        );
        assert_eq!(
            replay_dead_letters(&conn, c.id, &DeadLetterPick::Ids(vec![dead[0].id])).unwrap(),
            1
        );
        assert_eq!(claim_dead_letters(&conn, c.id, 10).unwrap().len(), 1);
        // Refused again: it stays, with one more attempt, and is not counted twice.
        let again = Ack {
            source: BatchSource::DeadLetters {
                ids: vec![dead[0].id],
            },
            delivered: 0,
            ..a.clone()
        };
        ack(&conn, &again).unwrap();
        let dead = list_dead_letters(&conn, c.id, 0, 10).unwrap();
        assert_eq!(
            (dead.len(), dead[0].attempts, dead[0].replay_pending),
            (1, 2, false)
        );
        assert_eq!(
            load(&conn, c.id).unwrap().unwrap().counters.dead_lettered,
            1
        );
        // Replayed and accepted: it leaves the store.
        replay_dead_letters(&conn, c.id, &DeadLetterPick::All).unwrap();
        let ok = Ack {
            source: BatchSource::DeadLetters {
                ids: vec![dead[0].id],
            },
            delivered: 1,
            dead_letters: vec![],
            ..a
        };
        ack(&conn, &ok).unwrap();
        assert!(list_dead_letters(&conn, c.id, 0, 10).unwrap().is_empty());
    }

    #[test]
    fn the_log_clock_drives_retention_lag_and_replay_windows() {
        let conn = db();
        let c = create_current(
            &conn,
            WorkspaceId(1),
            &spec(),
            CurrentStatus::Active,
            Millis(1),
        )
        .unwrap();
        acquire_lease(&conn, c.id, "a", Millis(0), i64::MAX as u64 / 2).unwrap();
        append(&conn, 5);
        tick_log_clock(&conn, Millis(1_000), 1_000_000).unwrap();
        append(&conn, 5);
        tick_log_clock(&conn, Millis(2_000), 1_000_000).unwrap();
        tick_log_clock(&conn, Millis(2_500), 1_000_000).unwrap();
        append(&conn, 5);
        let lag = lag(&conn, c.id, &None).unwrap();
        assert_eq!(
            lag,
            Lag {
                events: 15,
                exact: true,
                oldest_logged_at: Some(Millis(1_000))
            }
        );
        let typed =
            super::lag(&conn, c.id, &Some(vec!["users.behaviors.Purchase".into()])).unwrap();
        assert_eq!(typed.events, 0);
        // Everything logged before 1.5 s (the first 5) passed retention.
        let drop = apply_retention(&conn, c.id, "a", Millis(1_500), &None, Millis(3_000))
            .unwrap()
            .unwrap();
        assert_eq!((drop.from_seq, drop.to_seq, drop.count), (0, 5, 5));
        assert!(
            apply_retention(&conn, c.id, "a", Millis(1_500), &None, Millis(3_000))
                .unwrap()
                .is_none()
        );
        let c2 = load(&conn, c.id).unwrap().unwrap();
        assert_eq!((c2.position, c2.counters.dropped), (5, 5));
        assert_eq!(list_drops(&conn, c.id, 10).unwrap().len(), 1);
        // Deliver up to 12; a window over (1 s, 2 s] is positions 6..=10.
        conn.execute("UPDATE currents SET position = 12", [])
            .unwrap();
        let w = replay_window(&conn, c.id, Millis(1_001), Millis(2_000), Millis(4_000))
            .unwrap()
            .unwrap();
        assert_eq!((w.from_seq, w.to_seq, w.cursor), (6, 10, 5));
        let open_ended = replay_window(&conn, c.id, Millis(1_001), Millis(9_999), Millis(4_000))
            .unwrap()
            .unwrap();
        assert_eq!(open_ended.to_seq, 12, "capped at the position");
        assert_eq!(next_replay_window(&conn, c.id).unwrap(), Some(w));
        let done = Ack {
            current: c.id,
            owner: "a".into(),
            source: BatchSource::Window {
                window: w.id,
                resolved_to: 10,
            },
            delivered: 5,
            skipped: 0,
            dead_letters: vec![],
            at: Millis(5_000),
        };
        ack(&conn, &done).unwrap();
        assert_eq!(
            next_replay_window(&conn, c.id).unwrap().map(|x| x.id),
            Some(open_ended.id)
        );
        // Old samples are forgotten, keeping the newest one before the cutoff.
        tick_log_clock(&conn, Millis(10_000), 5_000).unwrap();
        let kept: i64 = conn
            .query_row("SELECT COUNT(*) FROM currents_log_clock", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 2);
    }

    #[test]
    fn claims_filter_types_and_report_how_far_they_looked() {
        let conn = db();
        append(&conn, 10);
        let all = claim(&conn, WorkspaceId(1), 2, 5, &None).unwrap();
        assert_eq!((all.events.len(), all.scanned_to, all.scanned), (5, 7, 5));
        let none = claim(&conn, WorkspaceId(1), 0, 100, &Some(vec!["x".into()])).unwrap();
        assert_eq!(
            (none.events.len(), none.scanned_to, none.scanned),
            (0, 10, 10)
        );
        assert_eq!(
            claim(&conn, WorkspaceId(2), 0, 100, &None).unwrap().scanned,
            0
        );
    }

    #[test]
    fn test_sends_are_capped_per_rolling_window() {
        let conn = db();
        let c = create_current(
            &conn,
            WorkspaceId(1),
            &spec(),
            CurrentStatus::Draft,
            Millis(1),
        )
        .unwrap();
        record_test_events(&conn, c.id, 6, 10, 1_000, Millis(0)).unwrap();
        assert!(matches!(
            record_test_events(&conn, c.id, 6, 10, 1_000, Millis(500)),
            Err(StoreError::Conflict(_))
        ));
        record_test_events(&conn, c.id, 6, 10, 1_000, Millis(1_001)).unwrap();
        assert!(delete_current(&conn, WorkspaceId(1), c.id).unwrap());
        assert!(!delete_current(&conn, WorkspaceId(1), c.id).unwrap());
    }
}
