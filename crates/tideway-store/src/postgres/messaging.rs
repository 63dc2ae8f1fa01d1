//! Messaging over PostgreSQL: campaigns, dispatches, the durable send queue, campaign receipts
//! and conversions, send ids, the trigger cursor and messaging settings (schema version 2),
//! campaign stats (schema version 3) and segment-entry trackers (schema version 4).
//!
//! The semantics are the SQLite store's (`sqlite/messaging.rs`, whose module docs say what
//! both decide: a receipt's time, expansion marks that only move forward, `next_due`); what
//! differs is what several nodes on one database need:
//! - **Compare-and-sets are in the writing statement** (`UPDATE … WHERE cursor = expected`,
//!   `… next_run IS NOT DISTINCT FROM expected`): at READ COMMITTED a second writer waits for
//!   the first to commit and re-checks its `WHERE` on the new row, so exactly one wins.
//! - **Receipts are one conditional upsert** for a whole enqueue (`INSERT … SELECT FROM unnest
//!   … ON CONFLICT … DO UPDATE … WHERE received_at + window <= now RETURNING`), and its answer
//!   decides which items go ahead: a concurrent enqueue of the same (campaign, user) waits on
//!   the row and then sees it taken. Items repeating a (campaign, user) within one enqueue are
//!   taken in rounds, so each sees the one before it, as on SQLite.
//! - **Claims** lock with `FOR UPDATE SKIP LOCKED`, so two nodes never claim one send and never
//!   wait for each other; a row another node leased and committed meanwhile fails the re-checked
//!   `WHERE`. **Settlements** of a call are one multi-row `UPDATE … FROM unnest` fenced by
//!   `lease_owner`, its `RETURNING` naming the accepted ones.
//! - **Receipt windows travel in the row**: `campaign_receipts.window_ms` holds the window the
//!   receipt was last taken with, so the upsert's `WHERE` can read the new item's window as
//!   `EXCLUDED.window_ms` (compared in `numeric`, which cannot overflow, as SQLite saturates).
//! - **Events go last**: every method that appends takes its event-log range as its last step
//!   before the commit (`currents::append_in`), so positions are in commit order (see
//!   `sequence.rs`). A settlement call may span workspaces (the dispatcher claims from all); it
//!   takes their ranges in workspace order, so two such calls never deadlock.
//! - **Heads are committed positions**: the workspace's counter in `workspace_sequences` moves
//!   only in the transaction that writes the rows, so the head read is never ahead of what a
//!   reader can see.
//! - `users_by_seq` reads the `users` rows, always current here, in one statement.
//! - **Campaign stats** and **send-id series** are tallied as on SQLite (`Tally`), then written in at most two
//!   statements whatever the number of increments: the unique ones' users recorded with one
//!   `INSERT … FROM unnest … ON CONFLICT DO NOTHING RETURNING` (a returned row is a new user,
//!   and counts), then one upsert adding each distinct (campaign, stat)'s total. Both write in
//!   key order, so concurrent enqueues lock the rows in one order.
//! - **Segment trackers** move by compare-and-set in the writing statement too (`INSERT … ON
//!   CONFLICT DO NOTHING` from none, `UPDATE … WHERE position = expected` otherwise), after a
//!   `FOR SHARE` lock on their campaign's row; `delete_campaign` deletes the trackers after
//!   the campaign row, so a tracker written concurrently with a delete is deleted with it or
//!   refused.

use std::collections::{BTreeMap, HashMap, HashSet};

use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::Row;

use tideway_core::clock::Millis;
use tideway_core::currents::CurrentsEvent;
use tideway_core::ids::{BrazeId, Email, ExternalId, Phone, UserSeq, WorkspaceId};
use tideway_core::profile::UserRecord;
use tideway_core::segments::FeedPosition;
use tideway_core::store::{
    CampaignRecord, CampaignStat, ClaimedSend, CohortEntry, DispatchRecord, Enqueue,
    EnqueueOutcome, MessagingStore, ReceiptRecord, SegmentTracker, SendCounts, SendJob,
    SendSeriesFigure, SendSeriesKey, SendStat, SendStatIncrement, SendState, SentMessage,
    Settlement, StatIncrement, StoreError, StoreFuture, TriggerCursor, UserSend,
};

use super::currents::append_in;
use super::sequence::Sequence;
use super::{PgStore, execute, get, pg_err, query, query_one, query_opt};
use crate::codec::{corrupt, u64_of};
use crate::profile_codec;
use crate::sqlite::messaging::{
    Receipts, TrackerMove, TrackerOwner, cas_conflict, expansion_conflict, json_of, queue_state_of,
    receipt_time, send_figure, send_id_cap, send_tally, source_columns, source_of, stat_tally,
    stats_of, status_of, tags_of, tags_text,
};

type Appends = Vec<(Option<UserSeq>, CurrentsEvent)>;

fn limit_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn seq_of(raw: i64) -> Result<UserSeq, StoreError> {
    u32::try_from(raw)
        .map(UserSeq)
        .map_err(|_| corrupt(format!("user seq {raw}")))
}

fn millis(m: Option<Millis>) -> Option<i64> {
    m.map(|m| m.0)
}

// ---- rows ---------------------------------------------------------------------------------

macro_rules! campaign_columns {
    () => {
        "id, name, description, tags, status, definition, created_at, updated_at, launched_at, \
         next_run, first_sent, last_sent"
    };
}

macro_rules! dispatch_columns {
    () => {
        "workspace_id, id, source, campaign_id, definition, send_id, per_user_ids, properties, \
         audience, created_at, expanding_after, not_before"
    };
}

fn campaign_at(row: &Row, at: usize) -> Result<CampaignRecord, StoreError> {
    let opt = |i: usize| -> Result<Option<Millis>, StoreError> {
        Ok(get::<Option<i64>>(row, at + i)?.map(Millis))
    };
    Ok(CampaignRecord {
        id: get(row, at)?,
        name: get(row, at + 1)?,
        description: get(row, at + 2)?,
        tags: tags_of(get(row, at + 3)?)?,
        status: status_of(get(row, at + 4)?)?,
        definition: json_of(get(row, at + 5)?, "campaign definition")?,
        created_at: Millis(get(row, at + 6)?),
        updated_at: Millis(get(row, at + 7)?),
        launched_at: opt(8)?,
        next_run: opt(9)?,
        first_sent: opt(10)?,
        last_sent: opt(11)?,
    })
}

fn dispatch_of(row: &Row) -> Result<DispatchRecord, StoreError> {
    Ok(DispatchRecord {
        workspace: WorkspaceId(get(row, 0)?),
        id: get(row, 1)?,
        source: source_of(get(row, 2)?, get(row, 3)?, get(row, 4)?)?,
        send_id: get(row, 5)?,
        per_user_ids: get(row, 6)?,
        properties: get(row, 7)?,
        audience: get::<Option<&str>>(row, 8)?
            .map(|a| json_of(a, "dispatch audience"))
            .transpose()?,
        created_at: Millis(get(row, 9)?),
        expanding_after: get::<Option<i64>>(row, 10)?.map(seq_of).transpose()?,
        not_before: get::<Option<i64>>(row, 11)?.map(Millis),
    })
}

fn parsed<T, E>(
    raw: &str,
    what: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, StoreError> {
    parse(raw).map_err(|_| corrupt(format!("{what} {raw:?}")))
}

/// A user from `seq, braze_id, external_id, email, phone, created_at, updated_at, profile`.
fn user_of(row: &Row) -> Result<UserRecord, StoreError> {
    Ok(UserRecord {
        seq: seq_of(get(row, 0)?)?,
        braze_id: parsed(get(row, 1)?, "users.braze_id", BrazeId::parse)?,
        external_id: get::<Option<&str>>(row, 2)?
            .map(|r| parsed(r, "users.external_id", ExternalId::parse))
            .transpose()?,
        email: get::<Option<&str>>(row, 3)?
            .map(|r| parsed(r, "users.email", Email::parse))
            .transpose()?,
        phone: get::<Option<&str>>(row, 4)?
            .map(|r| parsed(r, "users.phone", Phone::parse))
            .transpose()?,
        created_at: Millis(get(row, 5)?),
        updated_at: Millis(get(row, 6)?),
        profile: profile_codec::decode(get(row, 7)?)?,
    })
}

// ---- campaigns ------------------------------------------------------------------------------

async fn create_campaign(
    store: &PgStore,
    workspace: WorkspaceId,
    c: CampaignRecord,
) -> Result<CampaignRecord, StoreError> {
    let client = store.pool.client().await?;
    execute(
        &client,
        concat!(
            "INSERT INTO campaigns (workspace_id, ",
            campaign_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ),
        &[
            &workspace.0,
            &c.id,
            &c.name,
            &c.description,
            &tags_text(&c.tags),
            &c.status.as_str(),
            &c.definition.to_string(),
            &c.created_at.0,
            &c.updated_at.0,
            &millis(c.launched_at),
            &millis(c.next_run),
            &millis(c.first_sent),
            &millis(c.last_sent),
        ],
    )
    .await?;
    Ok(c)
}

async fn campaign<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    id: &str,
) -> Result<Option<CampaignRecord>, StoreError> {
    query_opt(
        c,
        concat!(
            "SELECT ",
            campaign_columns!(),
            " FROM campaigns WHERE workspace_id = $1 AND id = $2"
        ),
        &[&workspace.0, &id],
    )
    .await?
    .map(|row| campaign_at(&row, 0))
    .transpose()
}

async fn list_campaigns(
    store: &PgStore,
    workspace: WorkspaceId,
) -> Result<Vec<CampaignRecord>, StoreError> {
    let client = store.pool.client().await?;
    query(
        &client,
        concat!(
            "SELECT ",
            campaign_columns!(),
            " FROM campaigns WHERE workspace_id = $1 ORDER BY created_at, id"
        ),
        &[&workspace.0],
    )
    .await?
    .iter()
    .map(|row| campaign_at(row, 0))
    .collect()
}

async fn save_campaign(
    store: &PgStore,
    workspace: WorkspaceId,
    c: CampaignRecord,
) -> Result<Option<CampaignRecord>, StoreError> {
    let client = store.pool.client().await?;
    query_opt(
        &client,
        concat!(
            "UPDATE campaigns SET name = $3, description = $4, tags = $5, status = $6,
                 definition = $7, updated_at = $8, launched_at = $9, next_run = $10,
                 first_sent = $11, last_sent = $12
             WHERE workspace_id = $1 AND id = $2 RETURNING ",
            campaign_columns!()
        ),
        &[
            &workspace.0,
            &c.id,
            &c.name,
            &c.description,
            &tags_text(&c.tags),
            &c.status.as_str(),
            &c.definition.to_string(),
            &c.updated_at.0,
            &millis(c.launched_at),
            &millis(c.next_run),
            &millis(c.first_sent),
            &millis(c.last_sent),
        ],
    )
    .await?
    .map(|row| campaign_at(&row, 0))
    .transpose()
}

async fn delete_campaign(
    store: &PgStore,
    workspace: WorkspaceId,
    id: &str,
) -> Result<bool, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    execute(
        &tx,
        "DELETE FROM sends s USING dispatches d
         WHERE d.workspace_id = $1 AND d.campaign_id = $2
           AND s.workspace_id = $1 AND s.dispatch_id = d.id AND s.state = 'pending'",
        &[&workspace.0, &id],
    )
    .await?;
    // Its expansions end: an expander still running gets a conflict, not more jobs.
    execute(
        &tx,
        "UPDATE dispatches SET expanding_after = NULL
         WHERE workspace_id = $1 AND campaign_id = $2 AND expanding_after IS NOT NULL",
        &[&workspace.0, &id],
    )
    .await?;
    for sql in [
        "DELETE FROM campaign_stats WHERE workspace_id = $1 AND campaign_id = $2",
        "DELETE FROM campaign_stat_users WHERE workspace_id = $1 AND campaign_id = $2",
        "DELETE FROM send_stats WHERE workspace_id = $1 AND campaign_id = $2",
        "DELETE FROM send_stat_users WHERE workspace_id = $1 AND campaign_id = $2",
    ] {
        execute(&tx, sql, &[&workspace.0, &id]).await?;
    }
    let deleted = execute(
        &tx,
        "DELETE FROM campaigns WHERE workspace_id = $1 AND id = $2",
        &[&workspace.0, &id],
    )
    .await?;
    // After the campaign row: a tracker written by an enqueue that locked the row first is
    // committed by now and deleted here; a later one finds no campaign (see `move_trackers`).
    execute(
        &tx,
        "DELETE FROM segment_trackers WHERE workspace_id = $1 AND campaign_id = $2",
        &[&workspace.0, &id],
    )
    .await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(deleted > 0)
}

async fn active_campaigns(
    store: &PgStore,
) -> Result<Vec<(WorkspaceId, CampaignRecord)>, StoreError> {
    let client = store.pool.client().await?;
    query(
        &client,
        concat!(
            "SELECT workspace_id, ",
            campaign_columns!(),
            " FROM campaigns WHERE status = 'active' ORDER BY workspace_id, created_at, id"
        ),
        &[],
    )
    .await?
    .iter()
    .map(|row| Ok((WorkspaceId(get(row, 0)?), campaign_at(row, 1)?)))
    .collect()
}

async fn campaign_send_counts(
    store: &PgStore,
    workspace: WorkspaceId,
    id: &str,
) -> Result<SendCounts, StoreError> {
    let client = store.pool.client().await?;
    let rows = query(
        &client,
        "SELECT s.state, COUNT(*) FROM dispatches d
         JOIN sends s ON s.workspace_id = d.workspace_id AND s.dispatch_id = d.id
         WHERE d.workspace_id = $1 AND d.campaign_id = $2
         GROUP BY s.state",
        &[&workspace.0, &id],
    )
    .await?;
    let mut counts = SendCounts::default();
    for row in &rows {
        let n = u64_of(get(row, 1)?);
        match get::<&str>(row, 0)? {
            "pending" => counts.pending += n,
            "sent" => counts.sent += n,
            _ => counts.failed += n,
        }
    }
    Ok(counts)
}

async fn campaign_stats(
    store: &PgStore,
    workspace: WorkspaceId,
    campaign_id: &str,
) -> Result<Vec<(CampaignStat, u64)>, StoreError> {
    let client = store.pool.client().await?;
    let rows = query(
        &client,
        "SELECT stat, count FROM campaign_stats WHERE workspace_id = $1 AND campaign_id = $2",
        &[&workspace.0, &campaign_id],
    )
    .await?;
    stats_of(
        rows.iter()
            .map(|row| Ok((get(row, 0)?, get(row, 1)?)))
            .collect::<Result<Vec<(String, i64)>, StoreError>>()?,
    )
}

async fn send_series(
    store: &PgStore,
    workspace: WorkspaceId,
    campaign_id: &str,
    send_id: &str,
    (first_day, last_day): (Millis, Millis),
) -> Result<Vec<SendSeriesFigure>, StoreError> {
    let client = store.pool.client().await?;
    let rows = query(
        &client,
        "SELECT day, channel, variation, stat, count FROM send_stats
         WHERE workspace_id = $1 AND campaign_id = $2 AND send_id = $3
             AND day >= $4 AND day <= $5
         ORDER BY day, channel, variation, stat",
        &[
            &workspace.0,
            &campaign_id,
            &send_id,
            &first_day.0,
            &last_day.0,
        ],
    )
    .await?;
    rows.iter()
        .map(|row| {
            let stat: String = get(row, 3)?;
            send_figure(
                get(row, 0)?,
                get(row, 1)?,
                get(row, 2)?,
                &stat,
                get(row, 4)?,
            )
        })
        .collect()
}

// ---- enqueue --------------------------------------------------------------------------------

/// What an enqueue and a Canvas scan write before their items (as
/// `sqlite::messaging::write_marks`).
pub(super) async fn write_marks<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    (trackers, owner): (&[TrackerMove], TrackerOwner),
    dispatches: &[DispatchRecord],
    expansion: Option<&(String, Option<UserSeq>)>,
) -> Result<(), StoreError> {
    move_trackers(c, workspace, trackers, owner).await?;
    for d in dispatches {
        if d.workspace != workspace {
            return Err(corrupt(format!("dispatch {} of another workspace", d.id)));
        }
        insert_dispatch(c, d).await?;
    }
    if let Some((dispatch, mark)) = expansion {
        move_expansion(c, workspace, dispatch, *mark).await?;
    }
    Ok(())
}

/// Moves a dispatch's expansion mark forward (`None`: complete); a mark that does not apply
/// is a conflict (see `Enqueue::expansion`).
async fn move_expansion<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    dispatch: &str,
    mark: Option<UserSeq>,
) -> Result<(), StoreError> {
    let mark = mark.map(|u| i64::from(u.0));
    let moved = execute(
        c,
        "UPDATE dispatches SET expanding_after = $3::bigint
         WHERE workspace_id = $1 AND id = $2 AND expanding_after IS NOT NULL
           AND ($3::bigint IS NULL OR expanding_after < $3::bigint)",
        &[&workspace.0, &dispatch, &mark],
    )
    .await?;
    if moved == 0 {
        return Err(expansion_conflict(dispatch));
    }
    Ok(())
}

pub(super) async fn insert_dispatch<C: GenericClient>(
    c: &C,
    d: &DispatchRecord,
) -> Result<(), StoreError> {
    let (source, campaign_id, definition) = source_columns(&d.source);
    execute(
        c,
        concat!(
            "INSERT INTO dispatches (",
            dispatch_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ),
        &[
            &d.workspace.0,
            &d.id,
            &source,
            &campaign_id,
            &definition,
            &d.send_id,
            &d.per_user_ids,
            &d.properties,
            &d.audience.as_ref().map(Value::to_string),
            &d.created_at.0,
            &d.expanding_after.map(|u| i64::from(u.0)),
            &millis(d.not_before),
        ],
    )
    .await?;
    Ok(())
}

/// Moves the trigger cursor from `expected` to `new`, or `Conflict`. A workspace without a row
/// is at the default cursor, so from the default the row is created (or updated if it is).
async fn move_cursor<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    expected: TriggerCursor,
    new: TriggerCursor,
) -> Result<(), StoreError> {
    let sql = if expected == TriggerCursor::default() {
        "INSERT INTO messaging_workspaces AS m (workspace_id, cursor_events, cursor_cohort_changes)
         VALUES ($1, $4, $5)
         ON CONFLICT (workspace_id) DO UPDATE
             SET cursor_events = EXCLUDED.cursor_events,
                 cursor_cohort_changes = EXCLUDED.cursor_cohort_changes
             WHERE m.cursor_events = $2 AND m.cursor_cohort_changes = $3
         RETURNING 1"
    } else {
        "UPDATE messaging_workspaces SET cursor_events = $4, cursor_cohort_changes = $5
         WHERE workspace_id = $1 AND cursor_events = $2 AND cursor_cohort_changes = $3
         RETURNING 1"
    };
    let moved = query_opt(
        c,
        sql,
        &[
            &workspace.0,
            &expected.events,
            &expected.cohort_changes,
            &new.events,
            &new.cohort_changes,
        ],
    )
    .await?;
    match moved {
        Some(_) => Ok(()),
        None => Err(cas_conflict("the trigger cursor")),
    }
}

/// Applies [`Enqueue::segment_trackers`], each a compare-and-set on the stored position, or
/// `Conflict`.
async fn move_trackers<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    moves: &[(String, String, Option<FeedPosition>, SegmentTracker)],
    owner: TrackerOwner,
) -> Result<(), StoreError> {
    for (campaign_id, segment_id, expected, new) in moves {
        let campaign = query_opt(c, owner.exists_sql(true), &[&workspace.0, campaign_id]).await?;
        if campaign.is_none() {
            return Err(cas_conflict("the segment tracker's campaign or Canvas"));
        }
        let p = new.position;
        let moved = match expected {
            None => {
                query_opt(
                    c,
                    "INSERT INTO segment_trackers (workspace_id, campaign_id, segment_id,
                         event_seq, cohort_change_seq, user_change_seq, members)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (workspace_id, campaign_id, segment_id) DO NOTHING
                     RETURNING 1",
                    &[
                        &workspace.0,
                        campaign_id,
                        segment_id,
                        &p.event_seq,
                        &p.cohort_change_seq,
                        &p.user_change_seq,
                        &new.members,
                    ],
                )
                .await?
            }
            Some(old) => {
                query_opt(
                    c,
                    "UPDATE segment_trackers
                     SET event_seq = $7, cohort_change_seq = $8, user_change_seq = $9,
                         members = $10
                     WHERE workspace_id = $1 AND campaign_id = $2 AND segment_id = $3
                       AND event_seq = $4 AND cohort_change_seq = $5 AND user_change_seq = $6
                     RETURNING 1",
                    &[
                        &workspace.0,
                        campaign_id,
                        segment_id,
                        &old.event_seq,
                        &old.cohort_change_seq,
                        &old.user_change_seq,
                        &p.event_seq,
                        &p.cohort_change_seq,
                        &p.user_change_seq,
                        &new.members,
                    ],
                )
                .await?
            }
        };
        if moved.is_none() {
            return Err(cas_conflict("the segment tracker"));
        }
    }
    Ok(())
}

async fn segment_tracker(
    store: &PgStore,
    workspace: WorkspaceId,
    campaign_id: &str,
    segment_id: &str,
) -> Result<Option<SegmentTracker>, StoreError> {
    let client = store.pool.client().await?;
    let row = query_opt(
        &client,
        "SELECT event_seq, cohort_change_seq, user_change_seq, members FROM segment_trackers
         WHERE workspace_id = $1 AND campaign_id = $2 AND segment_id = $3",
        &[&workspace.0, &campaign_id, &segment_id],
    )
    .await?;
    row.map(|row| {
        Ok(SegmentTracker {
            position: FeedPosition {
                event_seq: get(&row, 0)?,
                cohort_change_seq: get(&row, 1)?,
                user_change_seq: get(&row, 2)?,
            },
            members: get(&row, 3)?,
        })
    })
    .transpose()
}

/// Receipts to take, column by column: users, owner ids, times, re-eligibility windows.
pub(super) type ReceiptRows<'a> = (&'a [i64], &'a [&'a str], &'a [i64], &'a [Option<i64>]);

/// Takes receipts at once — `(users, owner ids, times, re-eligibility windows)`, each
/// (user, owner) once — of campaigns or of Canvases (see `sqlite::messaging::take_receipt`);
/// returns the `(user, owner)` pairs taken. The window travels in the row.
pub(super) async fn take_receipt_rows<C: GenericClient>(
    c: &C,
    receipts: Receipts,
    workspace: WorkspaceId,
    (users, owners, times, windows): ReceiptRows<'_>,
) -> Result<HashSet<(i64, String)>, StoreError> {
    let sql = match receipts {
        Receipts::Campaign => {
            "INSERT INTO campaign_receipts AS r
                 (workspace_id, user_seq, campaign_id, received_at, window_ms)
             SELECT $1, x.u, x.c, x.t, x.w
             FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::bigint[]) AS x(u, c, t, w)
             ON CONFLICT (workspace_id, user_seq, campaign_id) DO UPDATE
                 SET received_at = GREATEST(r.received_at, EXCLUDED.received_at),
                     window_ms = EXCLUDED.window_ms
                 WHERE r.received_at::numeric + EXCLUDED.window_ms <= EXCLUDED.received_at
                    OR EXCLUDED.received_at::numeric + EXCLUDED.window_ms <= r.received_at
             RETURNING user_seq, campaign_id"
        }
        Receipts::Canvas => {
            "INSERT INTO canvas_receipts AS r
                 (workspace_id, user_seq, canvas_id, entered_at, window_ms)
             SELECT $1, x.u, x.c, x.t, x.w
             FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::bigint[]) AS x(u, c, t, w)
             ON CONFLICT (workspace_id, canvas_id, user_seq) DO UPDATE
                 SET entered_at = GREATEST(r.entered_at, EXCLUDED.entered_at),
                     window_ms = EXCLUDED.window_ms
                 WHERE r.entered_at::numeric + EXCLUDED.window_ms <= EXCLUDED.entered_at
                    OR EXCLUDED.entered_at::numeric + EXCLUDED.window_ms <= r.entered_at
             RETURNING user_seq, canvas_id"
        }
    };
    query(c, sql, &[&workspace.0, &users, &owners, &times, &windows])
        .await?
        .iter()
        .map(|row| Ok((get(row, 0)?, get(row, 1)?)))
        .collect()
}

/// Takes the receipts of the items that have one; returns which items may go ahead.
async fn take_receipts<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    e: &Enqueue,
) -> Result<Vec<bool>, StoreError> {
    let mut ahead = vec![true; e.items.len()];
    let mut waiting: Vec<usize> = (0..e.items.len())
        .filter(|&i| e.items[i].receipt.is_some())
        .collect();
    // Rounds: each holds a (user, campaign) once, so the upsert never meets its own row.
    while !waiting.is_empty() {
        let mut seen = HashSet::new();
        let (mut round, rest): (Vec<usize>, Vec<usize>) = waiting.iter().partition(|&&i| {
            let item = &e.items[i];
            let campaign = item.receipt.as_ref().map(|r| r.campaign_id.as_str());
            seen.insert((item.user, campaign))
        });
        waiting = rest;
        // In key order, so concurrent enqueues lock receipt rows in one order.
        round.sort_by_key(|&i| {
            let item = &e.items[i];
            (
                item.user,
                item.receipt.as_ref().map(|r| r.campaign_id.clone()),
            )
        });
        let mut users = Vec::with_capacity(round.len());
        let mut campaigns = Vec::with_capacity(round.len());
        let mut times = Vec::with_capacity(round.len());
        let mut windows = Vec::with_capacity(round.len());
        for &i in &round {
            let item = &e.items[i];
            let Some(receipt) = &item.receipt else {
                continue;
            };
            users.push(i64::from(item.user.0));
            campaigns.push(receipt.campaign_id.as_str());
            times.push(receipt_time(item, e).0);
            windows.push(receipt.reeligible_after_ms);
        }
        let taken = take_receipt_rows(
            c,
            Receipts::Campaign,
            workspace,
            (&users, &campaigns, &times, &windows),
        )
        .await?;
        for (k, &i) in round.iter().enumerate() {
            ahead[i] = taken.contains(&(users[k], campaigns[k].to_owned()));
        }
    }
    Ok(ahead)
}

async fn enqueue(
    store: &PgStore,
    workspace: WorkspaceId,
    e: &Enqueue,
) -> Result<EnqueueOutcome, StoreError> {
    let mut outcome = EnqueueOutcome::default();
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    // The compare-and-sets first; a conflict returns before the commit (dropping `tx` rolls
    // everything back).
    if let Some((expected, new)) = e.cursor {
        move_cursor(&tx, workspace, expected, new).await?;
    }
    if let Some((campaign_id, expected, new)) = &e.next_run {
        let moved = execute(
            &tx,
            "UPDATE campaigns SET next_run = $4
             WHERE workspace_id = $1 AND id = $2 AND next_run IS NOT DISTINCT FROM $3",
            &[&workspace.0, campaign_id, &millis(*expected), &millis(*new)],
        )
        .await?;
        if moved == 0 {
            return Err(cas_conflict("the campaign's next run"));
        }
    }
    write_marks(
        &tx,
        workspace,
        (&e.segment_trackers, TrackerOwner::Campaign),
        &e.dispatches,
        e.expansion.as_ref(),
    )
    .await?;
    let ahead = take_receipts(&tx, workspace, e).await?;
    let mut appends: Appends = Vec::new();
    let (mut dispatches, mut users, mut variants, mut dues, mut props) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (item, ahead) in e.items.iter().zip(ahead) {
        if !ahead {
            outcome.ineligible += 1;
            continue;
        }
        if let Some(job) = &item.job {
            dispatches.push(job.dispatch_id.as_str());
            users.push(i64::from(item.user.0));
            variants.push(job.variant.as_str());
            dues.push(job.due_at.0);
            props.push(job.properties.as_deref());
        }
        appends.extend(item.events.iter().map(|ev| (Some(item.user), ev.clone())));
    }
    if !dispatches.is_empty() {
        outcome.queued = execute(
            &tx,
            "INSERT INTO sends (workspace_id, dispatch_id, user_seq, variant, due_at, properties, state)
             SELECT $1, x.d, x.u, x.v, x.t, x.p, 'pending'
             FROM unnest($2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[])
                 WITH ORDINALITY AS x(d, u, v, t, p, ord)
             ORDER BY x.ord",
            &[&workspace.0, &dispatches, &users, &variants, &dues, &props],
        )
        .await?;
    }
    appends.extend(e.events.iter().cloned());
    if !e.conversions.is_empty() {
        let campaigns: Vec<&str> = e
            .conversions
            .iter()
            .map(|c| c.campaign_id.as_str())
            .collect();
        let users: Vec<i64> = e.conversions.iter().map(|c| i64::from(c.user.0)).collect();
        let indexes: Vec<i16> = e.conversions.iter().map(|c| i16::from(c.index)).collect();
        let ats: Vec<i64> = e
            .conversions
            .iter()
            .map(|c| Millis::from_secs(c.event.time).0)
            .collect();
        let mut added: HashSet<(String, i64, i16)> = query(
            &tx,
            "INSERT INTO campaign_conversions (workspace_id, campaign_id, user_seq, idx, at)
             SELECT $1, x.c, x.u, x.i, x.t
             FROM unnest($2::text[], $3::bigint[], $4::smallint[], $5::bigint[]) AS x(c, u, i, t)
             ON CONFLICT DO NOTHING
             RETURNING campaign_id, user_seq, idx",
            &[&workspace.0, &campaigns, &users, &indexes, &ats],
        )
        .await?
        .iter()
        .map(|row| Ok((get(row, 0)?, get(row, 1)?, get(row, 2)?)))
        .collect::<Result<_, StoreError>>()?;
        for (k, c) in e.conversions.iter().enumerate() {
            // The first of repeated conversions in one enqueue is the one written.
            if added.remove(&(campaigns[k].to_owned(), users[k], indexes[k])) {
                outcome.conversions += 1;
                appends.push((Some(c.user), c.event.clone()));
            }
        }
    }
    count_stats(&tx, workspace, &e.stats).await?;
    count_send_stats(&tx, workspace, &e.send_stats).await?;
    append_in(&tx, workspace, &appends).await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(outcome)
}

/// Applies an enqueue's stat increments in (at most) two statements: the unique ones' users
/// recorded, then one upsert of every distinct (campaign, stat)'s total.
async fn count_stats<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    stats: &[StatIncrement],
) -> Result<(), StoreError> {
    let mut tally = stat_tally(stats);
    let unique = std::mem::take(&mut tally.unique);
    if !unique.is_empty() {
        let (mut campaigns, mut names, mut users) = (
            Vec::with_capacity(unique.len()),
            Vec::with_capacity(unique.len()),
            Vec::with_capacity(unique.len()),
        );
        for &(campaign_id, stat, user) in &unique {
            campaigns.push(campaign_id);
            names.push(stat.as_str());
            users.push(i64::from(user.0));
        }
        let added: HashSet<(String, String, i64)> = query(
            c,
            "INSERT INTO campaign_stat_users (workspace_id, campaign_id, stat, user_seq)
             SELECT $1, x.c, x.s, x.u
             FROM unnest($2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY AS x(c, s, u, ord)
             ORDER BY x.ord
             ON CONFLICT DO NOTHING
             RETURNING campaign_id, stat, user_seq",
            &[&workspace.0, &campaigns, &names, &users],
        )
        .await?
        .iter()
        .map(|row| Ok((get(row, 0)?, get(row, 1)?, get(row, 2)?)))
        .collect::<Result<_, StoreError>>()?;
        for (k, &(campaign_id, stat, _)) in unique.iter().enumerate() {
            if added.contains(&(campaign_id.to_owned(), names[k].to_owned(), users[k])) {
                tally.count_new(campaign_id, stat);
            }
        }
    }
    if tally.counts.is_empty() {
        return Ok(());
    }
    let (mut campaigns, mut names, mut adds) = (
        Vec::with_capacity(tally.counts.len()),
        Vec::with_capacity(tally.counts.len()),
        Vec::with_capacity(tally.counts.len()),
    );
    for (&(campaign_id, stat), &n) in &tally.counts {
        campaigns.push(campaign_id);
        names.push(stat.as_str());
        adds.push(n);
    }
    execute(
        c,
        "INSERT INTO campaign_stats AS s (workspace_id, campaign_id, stat, count)
         SELECT $1, x.c, x.s, x.n
         FROM unnest($2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY AS x(c, s, n, ord)
         ORDER BY x.ord
         ON CONFLICT (workspace_id, campaign_id, stat) DO UPDATE
             SET count = s.count + EXCLUDED.count",
        &[&workspace.0, &campaigns, &names, &adds],
    )
    .await?;
    Ok(())
}

/// Applies an enqueue's send-series increments as [`count_stats`] applies campaign stats: the
/// unique ones' users recorded in one statement, then one upsert of every distinct
/// (key, stat)'s total.
async fn count_send_stats<C: GenericClient>(
    c: &C,
    workspace: WorkspaceId,
    stats: &[SendStatIncrement],
) -> Result<(), StoreError> {
    /// The statements' arrays, one element per (key, stat[, user]).
    #[derive(Default)]
    struct Columns<'a> {
        campaigns: Vec<&'a str>,
        sends: Vec<&'a str>,
        days: Vec<i64>,
        channels: Vec<&'a str>,
        variations: Vec<&'a str>,
        stats: Vec<&'static str>,
        numbers: Vec<i64>,
    }
    impl<'a> Columns<'a> {
        fn push(&mut self, key: &'a SendSeriesKey, stat: SendStat, number: i64) {
            self.campaigns.push(&key.campaign_id);
            self.sends.push(&key.send_id);
            self.days.push(key.day.0);
            self.channels.push(&key.channel);
            self.variations.push(&key.variation);
            self.stats.push(stat.as_str());
            self.numbers.push(number);
        }
    }
    let mut tally = send_tally(stats);
    let unique = std::mem::take(&mut tally.unique);
    if !unique.is_empty() {
        let mut cols = Columns::default();
        for &(key, stat, user) in &unique {
            cols.push(key, stat, i64::from(user.0));
        }
        type Recorded = (String, String, i64, String, String, String, i64);
        let added: HashSet<Recorded> = query(
            c,
            "INSERT INTO send_stat_users (workspace_id, campaign_id, send_id, day, channel,
                 variation, stat, user_seq)
             SELECT $1, x.c, x.s, x.d, x.ch, x.v, x.st, x.u
             FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                 $7::text[], $8::bigint[]) WITH ORDINALITY AS x(c, s, d, ch, v, st, u, ord)
             ORDER BY x.ord
             ON CONFLICT DO NOTHING
             RETURNING campaign_id, send_id, day, channel, variation, stat, user_seq",
            &[
                &workspace.0,
                &cols.campaigns,
                &cols.sends,
                &cols.days,
                &cols.channels,
                &cols.variations,
                &cols.stats,
                &cols.numbers,
            ],
        )
        .await?
        .iter()
        .map(|row| {
            Ok((
                get(row, 0)?,
                get(row, 1)?,
                get(row, 2)?,
                get(row, 3)?,
                get(row, 4)?,
                get(row, 5)?,
                get(row, 6)?,
            ))
        })
        .collect::<Result<_, StoreError>>()?;
        for &(key, stat, user) in &unique {
            let recorded: Recorded = (
                key.campaign_id.clone(),
                key.send_id.clone(),
                key.day.0,
                key.channel.clone(),
                key.variation.clone(),
                stat.as_str().to_owned(),
                i64::from(user.0),
            );
            if added.contains(&recorded) {
                tally.count_new(key, stat);
            }
        }
    }
    if tally.counts.is_empty() {
        return Ok(());
    }
    let mut cols = Columns::default();
    for (&(key, stat), &n) in &tally.counts {
        cols.push(key, stat, n);
    }
    execute(
        c,
        "INSERT INTO send_stats AS s (workspace_id, campaign_id, send_id, day, channel, variation,
             stat, count)
         SELECT $1, x.c, x.s, x.d, x.ch, x.v, x.st, x.n
         FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[],
             $8::bigint[]) WITH ORDINALITY AS x(c, s, d, ch, v, st, n, ord)
         ORDER BY x.ord
         ON CONFLICT (workspace_id, campaign_id, send_id, day, channel, variation, stat)
             DO UPDATE SET count = s.count + EXCLUDED.count",
        &[
            &workspace.0,
            &cols.campaigns,
            &cols.sends,
            &cols.days,
            &cols.channels,
            &cols.variations,
            &cols.stats,
            &cols.numbers,
        ],
    )
    .await?;
    Ok(())
}

async fn dispatch(
    store: &PgStore,
    workspace: WorkspaceId,
    id: &str,
) -> Result<Option<DispatchRecord>, StoreError> {
    let client = store.pool.client().await?;
    query_opt(
        &client,
        concat!(
            "SELECT ",
            dispatch_columns!(),
            " FROM dispatches WHERE workspace_id = $1 AND id = $2"
        ),
        &[&workspace.0, &id],
    )
    .await?
    .map(|row| dispatch_of(&row))
    .transpose()
}

async fn expanding_dispatches(
    store: &PgStore,
    now: Millis,
) -> Result<Vec<DispatchRecord>, StoreError> {
    let client = store.pool.client().await?;
    query(
        &client,
        concat!(
            "SELECT ",
            dispatch_columns!(),
            " FROM dispatches
             WHERE expanding_after IS NOT NULL AND (not_before IS NULL OR not_before <= $1)
             ORDER BY created_at, workspace_id, id"
        ),
        &[&now.0],
    )
    .await?
    .iter()
    .map(dispatch_of)
    .collect()
}

// ---- the queue ------------------------------------------------------------------------------

async fn claim_sends(
    store: &PgStore,
    owner: &str,
    now: Millis,
    lease_ms: u64,
    limit: usize,
) -> Result<Vec<ClaimedSend>, StoreError> {
    let until = now
        .0
        .saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
    let client = store.pool.client().await?;
    let rows = query(
        &client,
        "WITH free AS (
             SELECT workspace_id, id FROM sends
             WHERE state = 'pending' AND due_at <= $2
               AND (lease_until IS NULL OR lease_until <= $2)
             ORDER BY due_at, id LIMIT $4
             FOR UPDATE SKIP LOCKED)
         UPDATE sends s SET lease_owner = $1, lease_until = $3
         FROM free WHERE s.workspace_id = free.workspace_id AND s.id = free.id
         RETURNING s.id, s.workspace_id, s.user_seq, s.dispatch_id, s.variant, s.due_at,
             s.properties, s.attempts",
        &[&owner, &now.0, &until, &limit_of(limit)],
    )
    .await?;
    let mut claimed = rows
        .iter()
        .map(|r| {
            Ok(ClaimedSend {
                id: get(r, 0)?,
                workspace: WorkspaceId(get(r, 1)?),
                user: seq_of(get(r, 2)?)?,
                job: SendJob {
                    dispatch_id: get(r, 3)?,
                    variant: get(r, 4)?,
                    due_at: Millis(get(r, 5)?),
                    properties: get(r, 6)?,
                },
                attempts: u32::try_from(get::<i32>(r, 7)?).unwrap_or(0),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    // RETURNING comes in no particular order.
    claimed.sort_by_key(|c| (c.job.due_at, c.id));
    Ok(claimed)
}

async fn settle_sends(
    store: &PgStore,
    owner: &str,
    now: Millis,
    settlements: &[Settlement],
) -> Result<u64, StoreError> {
    if settlements.is_empty() {
        return Ok(0);
    }
    // One row per send (a repeated settlement of one send is refused, as the first settles
    // it), in key order so concurrent calls lock rows in one order.
    let mut seen = HashSet::new();
    let mut rows: Vec<usize> = (0..settlements.len())
        .filter(|&i| seen.insert((settlements[i].workspace, settlements[i].send)))
        .collect();
    rows.sort_by_key(|&i| (settlements[i].workspace, settlements[i].send));
    let mut wss = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut kinds = Vec::with_capacity(rows.len());
    let mut ats: Vec<Option<i64>> = Vec::with_capacity(rows.len());
    let mut addresses: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    let mut links: Vec<Option<&str>> = Vec::with_capacity(rows.len());
    for &i in &rows {
        let s = &settlements[i];
        wss.push(s.workspace.0);
        ids.push(s.send);
        let (kind, at, address, link) = match &s.state {
            SendState::Sent { address, links } => ("s", None, address.as_deref(), links.as_deref()),
            SendState::RetryAt { at } => ("r", Some(at.0), None, None),
            SendState::Deferred { at } => ("d", Some(at.0), None, None),
            SendState::Failed => ("f", None, None, None),
        };
        kinds.push(kind);
        ats.push(at);
        addresses.push(address);
        links.push(link);
    }
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    let settled = query(
        &tx,
        "UPDATE sends s SET
             state = CASE x.k WHEN 's' THEN 'sent' WHEN 'f' THEN 'failed' ELSE 'pending' END,
             sent_at = CASE WHEN x.k = 's' THEN $2 ELSE s.sent_at END,
             address = CASE WHEN x.k = 's' THEN x.a ELSE s.address END,
             links = CASE WHEN x.k = 's' THEN x.l ELSE s.links END,
             due_at = COALESCE(x.at, s.due_at),
             attempts = s.attempts + CASE WHEN x.k = 'd' THEN 0 ELSE 1 END,
             lease_owner = NULL, lease_until = NULL
         FROM unnest($3::bigint[], $4::bigint[], $5::text[], $6::bigint[], $7::text[], $8::text[])
             AS x(ws, id, k, at, a, l)
         WHERE s.workspace_id = x.ws AND s.id = x.id AND s.state = 'pending' AND s.lease_owner = $1
         RETURNING s.workspace_id, s.id, s.dispatch_id, x.k",
        &[&owner, &now.0, &wss, &ids, &kinds, &ats, &addresses, &links],
    )
    .await?;
    let mut accepted = HashSet::with_capacity(settled.len());
    let (mut sent_ws, mut sent_dispatch) = (Vec::new(), Vec::new());
    for row in &settled {
        let (ws, id): (i64, i64) = (get(row, 0)?, get(row, 1)?);
        accepted.insert((ws, id));
        if get::<&str>(row, 3)? == "s" {
            sent_ws.push(ws);
            sent_dispatch.push(get::<String>(row, 2)?);
        }
    }
    if !sent_ws.is_empty() {
        // Their campaigns' rows are locked in key order first, so two settlements of sends of
        // the same campaigns cannot deadlock (the `UPDATE … FROM` would lock in plan order).
        execute(
            &tx,
            "SELECT 1 FROM campaigns c
             WHERE (c.workspace_id, c.id) IN (
                 SELECT d.workspace_id, d.campaign_id FROM dispatches d
                 JOIN unnest($1::bigint[], $2::text[]) AS x(ws, id)
                   ON d.workspace_id = x.ws AND d.id = x.id)
             ORDER BY c.workspace_id, c.id
             FOR NO KEY UPDATE",
            &[&sent_ws, &sent_dispatch],
        )
        .await?;
        execute(
            &tx,
            "UPDATE campaigns c SET first_sent = COALESCE(c.first_sent, $1),
                 last_sent = GREATEST(COALESCE(c.last_sent, $1), $1)
             FROM (SELECT DISTINCT d.workspace_id, d.campaign_id FROM dispatches d
                   JOIN unnest($2::bigint[], $3::text[]) AS x(ws, id)
                     ON d.workspace_id = x.ws AND d.id = x.id
                   WHERE d.campaign_id IS NOT NULL) k
             WHERE c.workspace_id = k.workspace_id AND c.id = k.campaign_id",
            &[&now.0, &sent_ws, &sent_dispatch],
        )
        .await?;
    }
    // Events of the accepted settlements, by workspace in workspace order, in call order.
    let mut refused = 0;
    let mut events: BTreeMap<WorkspaceId, Appends> = BTreeMap::new();
    for s in settlements {
        if !accepted.remove(&(s.workspace.0, s.send)) {
            refused += 1;
            continue;
        }
        events
            .entry(s.workspace)
            .or_default()
            .extend(s.events.iter().map(|e| (Some(s.user), e.clone())));
    }
    for (ws, appends) in &events {
        append_in(&tx, *ws, appends).await?;
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(refused)
}

async fn next_due(store: &PgStore) -> Result<Option<Millis>, StoreError> {
    let client = store.pool.client().await?;
    let row = query_one(
        &client,
        "SELECT LEAST(
             (SELECT due_at FROM sends WHERE state = 'pending' AND lease_owner IS NULL
              ORDER BY due_at LIMIT 1),
             (SELECT MIN(GREATEST(lease_until, due_at)) FROM sends
              WHERE state = 'pending' AND lease_owner IS NOT NULL))",
        &[],
    )
    .await?;
    Ok(get::<Option<i64>>(&row, 0)?.map(Millis))
}

async fn sent_message(
    store: &PgStore,
    workspace: WorkspaceId,
    id: i64,
) -> Result<Option<SentMessage>, StoreError> {
    let client = store.pool.client().await?;
    query_opt(
        &client,
        "SELECT id, workspace_id, user_seq, dispatch_id, variant, address, links, sent_at
         FROM sends WHERE workspace_id = $1 AND id = $2 AND state = 'sent'",
        &[&workspace.0, &id],
    )
    .await?
    .map(|r| {
        Ok(SentMessage {
            id: get(&r, 0)?,
            workspace: WorkspaceId(get(&r, 1)?),
            user: seq_of(get(&r, 2)?)?,
            dispatch_id: get(&r, 3)?,
            variant: get(&r, 4)?,
            address: get(&r, 5)?,
            links: get(&r, 6)?,
            sent_at: Millis(get::<Option<i64>>(&r, 7)?.unwrap_or_default()),
        })
    })
    .transpose()
}

async fn record_engagement(
    store: &PgStore,
    workspace: WorkspaceId,
    user: UserSeq,
    events: Vec<CurrentsEvent>,
) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    let appends: Appends = events.into_iter().map(|e| (Some(user), e)).collect();
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    append_in(&tx, workspace, &appends).await?;
    tx.commit().await.map_err(pg_err)
}

async fn sends_since(
    store: &PgStore,
    workspace: WorkspaceId,
    user: UserSeq,
    since: Millis,
) -> Result<u64, StoreError> {
    let client = store.pool.client().await?;
    let row = query_one(
        &client,
        "SELECT COUNT(*) FROM sends
         WHERE workspace_id = $1 AND user_seq = $2 AND state = 'sent' AND sent_at >= $3",
        &[&workspace.0, &i64::from(user.0), &since.0],
    )
    .await?;
    Ok(u64_of(get(&row, 0)?))
}

async fn recent_sends(
    store: &PgStore,
    workspace: WorkspaceId,
    user: UserSeq,
    limit: usize,
) -> Result<Vec<UserSend>, StoreError> {
    // Served by `sends_user_recent` (workspace_id, user_seq, id) backwards, and the dispatch
    // by its primary key; both tables are distributed by workspace, so the join is co-located.
    let client = store.pool.client().await?;
    query(
        &client,
        "SELECT s.id, s.dispatch_id, d.source, d.campaign_id, d.definition, s.variant,
                s.state, s.due_at, s.sent_at, s.attempts
         FROM sends s
         LEFT JOIN dispatches d ON d.workspace_id = s.workspace_id AND d.id = s.dispatch_id
         WHERE s.workspace_id = $1 AND s.user_seq = $2
         ORDER BY s.id DESC LIMIT $3",
        &[
            &workspace.0,
            &i64::from(user.0),
            &i64::try_from(limit).unwrap_or(i64::MAX),
        ],
    )
    .await?
    .iter()
    .map(|row| {
        Ok(UserSend {
            id: get(row, 0)?,
            dispatch_id: get(row, 1)?,
            source: get::<Option<&str>>(row, 2)?
                .map(|k| source_of(k, get(row, 3)?, get(row, 4)?))
                .transpose()?,
            variant: get(row, 5)?,
            state: queue_state_of(get(row, 6)?)?,
            due_at: Millis(get(row, 7)?),
            sent_at: get::<Option<i64>>(row, 8)?.map(Millis),
            attempts: u32::try_from(get::<i32>(row, 9)?).unwrap_or(0),
        })
    })
    .collect()
}

/// The campaign receipts the pending sends of dispatch `$2` (of a campaign) took: a receipt
/// is taken at its send's due time, so one that still has that time is that send's. Moved with
/// a rescheduled dispatch, released with a cancelled one (a scheduled send that will not go out
/// must not keep the user from the campaign).
const PENDING_RECEIPTS: &str = "workspace_id = $1
    AND campaign_id = (SELECT campaign_id FROM dispatches
                       WHERE workspace_id = $1 AND id = $2 AND source = 'campaign')
    AND (user_seq, received_at) IN (SELECT user_seq, due_at FROM sends
                                    WHERE workspace_id = $1 AND dispatch_id = $2 AND state = 'pending')";

async fn reschedule_dispatch(
    store: &PgStore,
    workspace: WorkspaceId,
    id: &str,
    at: Millis,
) -> Result<bool, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    let exists = execute(
        &tx,
        "UPDATE dispatches SET not_before = CASE WHEN expanding_after IS NULL
             THEN not_before ELSE $3 END
         WHERE workspace_id = $1 AND id = $2",
        &[&workspace.0, &id, &at.0],
    )
    .await?;
    if exists == 0 {
        return Ok(false);
    }
    execute(
        &tx,
        &format!("UPDATE campaign_receipts SET received_at = $3 WHERE {PENDING_RECEIPTS}"),
        &[&workspace.0, &id, &at.0],
    )
    .await?;
    execute(
        &tx,
        "UPDATE sends SET due_at = $3
         WHERE workspace_id = $1 AND dispatch_id = $2 AND state = 'pending'",
        &[&workspace.0, &id, &at.0],
    )
    .await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(true)
}

async fn cancel_dispatch(
    store: &PgStore,
    workspace: WorkspaceId,
    id: &str,
) -> Result<bool, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    let exists = execute(
        &tx,
        "SELECT 1 FROM dispatches WHERE workspace_id = $1 AND id = $2 FOR UPDATE",
        &[&workspace.0, &id],
    )
    .await?;
    if exists == 0 {
        return Ok(false);
    }
    execute(
        &tx,
        &format!("DELETE FROM campaign_receipts WHERE {PENDING_RECEIPTS}"),
        &[&workspace.0, &id],
    )
    .await?;
    execute(
        &tx,
        "UPDATE dispatches SET expanding_after = NULL, not_before = NULL
         WHERE workspace_id = $1 AND id = $2",
        &[&workspace.0, &id],
    )
    .await?;
    execute(
        &tx,
        "DELETE FROM sends WHERE workspace_id = $1 AND dispatch_id = $2 AND state = 'pending'",
        &[&workspace.0, &id],
    )
    .await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(true)
}

async fn receipts_of(
    store: &PgStore,
    workspace: WorkspaceId,
    user: UserSeq,
) -> Result<Vec<ReceiptRecord>, StoreError> {
    let client = store.pool.client().await?;
    query(
        &client,
        "SELECT campaign_id, received_at FROM campaign_receipts
         WHERE workspace_id = $1 AND user_seq = $2 ORDER BY received_at DESC, campaign_id",
        &[&workspace.0, &i64::from(user.0)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(ReceiptRecord {
            campaign_id: get(r, 0)?,
            received_at: Millis(get(r, 1)?),
        })
    })
    .collect()
}

async fn create_send_id(
    store: &PgStore,
    workspace: WorkspaceId,
    campaign_id: &str,
    send_id: &str,
    now: Millis,
    day_start: Millis,
    max_per_day: u32,
) -> Result<bool, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = client.transaction().await.map_err(pg_err)?;
    // The workspace's row serialises its new send ids, so the daily count cannot be passed by
    // two nodes at once.
    execute(
        &tx,
        "INSERT INTO messaging_workspaces (workspace_id) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&workspace.0],
    )
    .await?;
    execute(
        &tx,
        "SELECT 1 FROM messaging_workspaces WHERE workspace_id = $1 FOR UPDATE",
        &[&workspace.0],
    )
    .await?;
    let exists = query_opt(
        &tx,
        "SELECT 1 FROM campaign_send_ids
         WHERE workspace_id = $1 AND campaign_id = $2 AND send_id = $3",
        &[&workspace.0, &campaign_id, &send_id],
    )
    .await?
    .is_some();
    if exists {
        return Ok(false);
    }
    let today: i64 = get(
        &query_one(
            &tx,
            "SELECT COUNT(*) FROM campaign_send_ids WHERE workspace_id = $1 AND created_at >= $2",
            &[&workspace.0, &day_start.0],
        )
        .await?,
        0,
    )?;
    if u64_of(today) >= u64::from(max_per_day) {
        return Err(send_id_cap(max_per_day));
    }
    execute(
        &tx,
        "INSERT INTO campaign_send_ids (workspace_id, campaign_id, send_id, created_at)
         VALUES ($1, $2, $3, $4)",
        &[&workspace.0, &campaign_id, &send_id, &now.0],
    )
    .await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(true)
}

async fn messaging_settings(
    store: &PgStore,
    workspace: WorkspaceId,
) -> Result<Option<Value>, StoreError> {
    let client = store.pool.client().await?;
    let row = query_opt(
        &client,
        "SELECT settings FROM messaging_workspaces WHERE workspace_id = $1",
        &[&workspace.0],
    )
    .await?;
    match row {
        Some(row) => get::<Option<&str>>(&row, 0)?
            .map(|t| json_of(t, "messaging settings"))
            .transpose(),
        None => Ok(None),
    }
}

async fn save_messaging_settings(
    store: &PgStore,
    workspace: WorkspaceId,
    settings: Value,
) -> Result<(), StoreError> {
    let client = store.pool.client().await?;
    execute(
        &client,
        "INSERT INTO messaging_workspaces (workspace_id, settings) VALUES ($1, $2)
         ON CONFLICT (workspace_id) DO UPDATE SET settings = EXCLUDED.settings",
        &[&workspace.0, &settings.to_string()],
    )
    .await?;
    Ok(())
}

// ---- triggers -------------------------------------------------------------------------------

async fn trigger_cursor(
    store: &PgStore,
    workspace: WorkspaceId,
) -> Result<TriggerCursor, StoreError> {
    let client = store.pool.client().await?;
    let row = query_opt(
        &client,
        "SELECT cursor_events, cursor_cohort_changes FROM messaging_workspaces
         WHERE workspace_id = $1",
        &[&workspace.0],
    )
    .await?;
    match row {
        Some(row) => Ok(TriggerCursor {
            events: get(&row, 0)?,
            cohort_changes: get(&row, 1)?,
        }),
        None => Ok(TriggerCursor::default()),
    }
}

async fn cohort_entries(
    store: &PgStore,
    workspace: WorkspaceId,
    after: i64,
    limit: usize,
) -> Result<Vec<CohortEntry>, StoreError> {
    let client = store.pool.client().await?;
    query(
        &client,
        "SELECT m.change_seq, m.seq, c.partner, c.cohort_id, m.at
         FROM cohort_membership_changes m
         JOIN cohorts c ON c.workspace_id = m.workspace_id AND c.id = m.cohort
         WHERE m.workspace_id = $1 AND m.change_seq > $2 AND m.entered
         ORDER BY m.change_seq LIMIT $3",
        &[&workspace.0, &after, &limit_of(limit)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(CohortEntry {
            position: get(r, 0)?,
            user: seq_of(get(r, 1)?)?,
            partner: get(r, 2)?,
            cohort_id: get(r, 3)?,
            at: Millis(get(r, 4)?),
        })
    })
    .collect()
}

/// The committed head of one of the workspace's logs: its counter moves only in the
/// transaction that writes the rows.
async fn head(store: &PgStore, workspace: WorkspaceId, log: Sequence) -> Result<i64, StoreError> {
    let client = store.pool.client().await?;
    let row = query_one(
        &client,
        "SELECT COALESCE((SELECT head FROM workspace_sequences
                          WHERE workspace_id = $1 AND name = $2), 0)",
        &[&workspace.0, &log.name()],
    )
    .await?;
    get(&row, 0)
}

async fn messaging_secret(store: &PgStore, candidate: [u8; 32]) -> Result<[u8; 32], StoreError> {
    let client = store.pool.client().await?;
    execute(
        &client,
        "INSERT INTO messaging_secrets (id, key) VALUES (1, $1) ON CONFLICT DO NOTHING",
        &[&candidate.as_slice()],
    )
    .await?;
    let row = query_one(
        &client,
        "SELECT key FROM messaging_secrets WHERE id = 1",
        &[],
    )
    .await?;
    get::<&[u8]>(&row, 0)?
        .try_into()
        .map_err(|_| corrupt("the messaging secret is not 32 bytes"))
}

/// The live users of the seqs `$2` in workspace `$1` (see `users_by_seq`).
pub(crate) const USERS_BY_SEQ: &str =
    "SELECT u.seq, u.braze_id, u.external_id, u.email, u.phone, u.created_at, u.updated_at,
        u.profile
     FROM unnest($2::bigint[]) AS k(seq) CROSS JOIN LATERAL (
         SELECT * FROM users u
         WHERE u.workspace_id = $1 AND u.seq = k.seq AND u.deleted_at IS NULL LIMIT 1) u";

async fn users_by_seq(
    store: &PgStore,
    workspace: WorkspaceId,
    seqs: Vec<UserSeq>,
) -> Result<Vec<UserRecord>, StoreError> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<i64> = seqs.iter().map(|s| i64::from(s.0)).collect();
    let client = store.pool.client().await?;
    // One primary-key probe per seq (`unnest … CROSS JOIN LATERAL`), as the users context's
    // lookups are written (see PostgreSQL migration 10 for the plan it must get).
    let rows = query(&client, USERS_BY_SEQ, &[&workspace.0, &wanted]).await?;
    let mut found: HashMap<UserSeq, UserRecord> = rows
        .iter()
        .map(|row| user_of(row).map(|u| (u.seq, u)))
        .collect::<Result<_, _>>()?;
    // In the order asked for, as the SQLite store answers.
    let mut users = Vec::with_capacity(found.len());
    for (i, seq) in seqs.iter().enumerate() {
        let repeated = seqs[i + 1..].contains(seq);
        let user = if repeated {
            found.get(seq).cloned()
        } else {
            found.remove(seq)
        };
        users.extend(user);
    }
    Ok(users)
}

// ---- the trait --------------------------------------------------------------------------------

impl MessagingStore for PgStore {
    fn create_campaign(
        &self,
        workspace: WorkspaceId,
        campaign: CampaignRecord,
    ) -> StoreFuture<'_, CampaignRecord> {
        Box::pin(create_campaign(self, workspace, campaign))
    }

    fn campaign(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, Option<CampaignRecord>> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(None) });
        }
        Box::pin(async move {
            let client = self.pool.client().await?;
            campaign(&client, workspace, &id).await
        })
    }

    fn list_campaigns(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<CampaignRecord>> {
        Box::pin(list_campaigns(self, workspace))
    }

    fn save_campaign(
        &self,
        workspace: WorkspaceId,
        campaign: CampaignRecord,
    ) -> StoreFuture<'_, Option<CampaignRecord>> {
        Box::pin(save_campaign(self, workspace, campaign))
    }

    fn delete_campaign(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(false) });
        }
        Box::pin(async move { delete_campaign(self, workspace, &id).await })
    }

    fn active_campaigns(&self) -> StoreFuture<'_, Vec<(WorkspaceId, CampaignRecord)>> {
        Box::pin(active_campaigns(self))
    }

    fn campaign_send_counts(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, SendCounts> {
        let id = id.to_owned();
        Box::pin(async move { campaign_send_counts(self, workspace, &id).await })
    }

    fn campaign_stats(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
    ) -> StoreFuture<'_, Vec<(CampaignStat, u64)>> {
        let campaign_id = campaign_id.to_owned();
        Box::pin(async move { campaign_stats(self, workspace, &campaign_id).await })
    }

    fn send_series(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
        send_id: &str,
        first_day: Millis,
        last_day: Millis,
    ) -> StoreFuture<'_, Vec<SendSeriesFigure>> {
        let (campaign_id, send_id) = (campaign_id.to_owned(), send_id.to_owned());
        Box::pin(async move {
            send_series(
                self,
                workspace,
                &campaign_id,
                &send_id,
                (first_day, last_day),
            )
            .await
        })
    }

    fn enqueue(&self, workspace: WorkspaceId, enqueue: Enqueue) -> StoreFuture<'_, EnqueueOutcome> {
        Box::pin(async move { self::enqueue(self, workspace, &enqueue).await })
    }

    fn dispatch(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, Option<DispatchRecord>> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(None) });
        }
        Box::pin(async move { dispatch(self, workspace, &id).await })
    }

    fn expanding_dispatches(&self, now: Millis) -> StoreFuture<'_, Vec<DispatchRecord>> {
        Box::pin(expanding_dispatches(self, now))
    }

    fn claim_sends(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<ClaimedSend>> {
        let owner = owner.to_owned();
        Box::pin(async move { claim_sends(self, &owner, now, lease_ms, limit).await })
    }

    fn settle_sends(
        &self,
        owner: &str,
        now: Millis,
        settlements: Vec<Settlement>,
    ) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        Box::pin(async move { settle_sends(self, &owner, now, &settlements).await })
    }

    fn next_due(&self) -> StoreFuture<'_, Option<Millis>> {
        Box::pin(next_due(self))
    }

    fn release_leases(&self, owner: &str) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let stmt = client
                .prepare_cached(
                    "UPDATE sends SET lease_owner = NULL, lease_until = NULL
                     WHERE state = 'pending' AND lease_owner = $1",
                )
                .await
                .map_err(pg_err)?;
            client.execute(&stmt, &[&owner]).await.map_err(pg_err)
        })
    }

    fn sent_message(
        &self,
        workspace: WorkspaceId,
        send: i64,
    ) -> StoreFuture<'_, Option<SentMessage>> {
        Box::pin(sent_message(self, workspace, send))
    }

    fn record_engagement(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
        events: Vec<CurrentsEvent>,
    ) -> StoreFuture<'_, ()> {
        Box::pin(record_engagement(self, workspace, user, events))
    }

    fn sends_since(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
        since: Millis,
    ) -> StoreFuture<'_, u64> {
        Box::pin(sends_since(self, workspace, user, since))
    }

    fn recent_sends(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
        limit: usize,
    ) -> StoreFuture<'_, Vec<UserSend>> {
        Box::pin(recent_sends(self, workspace, user, limit))
    }

    fn reschedule_dispatch(
        &self,
        workspace: WorkspaceId,
        id: &str,
        at: Millis,
    ) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(false) });
        }
        Box::pin(async move { reschedule_dispatch(self, workspace, &id, at).await })
    }

    fn cancel_dispatch(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(false) });
        }
        Box::pin(async move { cancel_dispatch(self, workspace, &id).await })
    }

    fn replace_adhoc_definition(
        &self,
        workspace: WorkspaceId,
        id: &str,
        definition: Value,
    ) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        Box::pin(async move {
            let client = self.pool.client().await?;
            let n = execute(
                &client,
                "UPDATE dispatches SET definition = $3
                 WHERE workspace_id = $1 AND id = $2 AND source = 'adhoc' AND not_before IS NOT NULL",
                &[&workspace.0, &id, &definition.to_string()],
            )
            .await?;
            Ok(n > 0)
        })
    }

    fn receipts_of(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
    ) -> StoreFuture<'_, Vec<ReceiptRecord>> {
        Box::pin(receipts_of(self, workspace, user))
    }

    fn create_send_id(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
        send_id: &str,
        now: Millis,
        day_start: Millis,
        max_per_day: u32,
    ) -> StoreFuture<'_, bool> {
        let (campaign_id, send_id) = (campaign_id.to_owned(), send_id.to_owned());
        Box::pin(async move {
            create_send_id(
                self,
                workspace,
                &campaign_id,
                &send_id,
                now,
                day_start,
                max_per_day,
            )
            .await
        })
    }

    fn messaging_settings(&self, workspace: WorkspaceId) -> StoreFuture<'_, Option<Value>> {
        Box::pin(messaging_settings(self, workspace))
    }

    fn save_messaging_settings(
        &self,
        workspace: WorkspaceId,
        settings: Value,
    ) -> StoreFuture<'_, ()> {
        Box::pin(save_messaging_settings(self, workspace, settings))
    }

    fn trigger_cursor(&self, workspace: WorkspaceId) -> StoreFuture<'_, TriggerCursor> {
        Box::pin(trigger_cursor(self, workspace))
    }

    fn cohort_entries(
        &self,
        workspace: WorkspaceId,
        after: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<CohortEntry>> {
        Box::pin(cohort_entries(self, workspace, after, limit))
    }

    fn cohort_changes_head(&self, workspace: WorkspaceId) -> StoreFuture<'_, i64> {
        Box::pin(head(self, workspace, Sequence::CohortMembershipChanges))
    }

    fn event_log_head(&self, workspace: WorkspaceId) -> StoreFuture<'_, i64> {
        Box::pin(head(self, workspace, Sequence::EventLog))
    }

    fn segment_tracker(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
        segment_id: &str,
    ) -> StoreFuture<'_, Option<SegmentTracker>> {
        let (campaign_id, segment_id) = (campaign_id.to_owned(), segment_id.to_owned());
        Box::pin(async move { segment_tracker(self, workspace, &campaign_id, &segment_id).await })
    }

    fn messaging_secret(&self, candidate: [u8; 32]) -> StoreFuture<'_, [u8; 32]> {
        Box::pin(messaging_secret(self, candidate))
    }

    fn users_by_seq(
        &self,
        workspace: WorkspaceId,
        users: Vec<UserSeq>,
    ) -> StoreFuture<'_, Vec<UserRecord>> {
        Box::pin(users_by_seq(self, workspace, users))
    }
}
