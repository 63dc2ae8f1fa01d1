//! Messaging over SQLite: campaigns, dispatches, the durable send queue, campaign receipts and
//! conversions, send ids, the trigger cursor, segment-entry trackers, messaging settings and
//! campaign stats (schema versions 7, 8, 9 and 10).
//!
//! Every write runs on the writer, as one job of its group commit, so each method is one
//! transaction and its events go to `event_log` in that transaction (positions in commit order,
//! as every append here). The single writer also makes the compare-and-sets (trigger cursor,
//! `next_run`), receipts and claims race-free without locks: two enqueues of the same
//! (campaign, user) run one after the other, and the second sees the first's receipt.
//!
//! The contract's docs say what both backends do (`tideway_core::store::MessagingStore`, checked
//! by the conformance suite on both); the helpers that decide it are here and reused by
//! `postgres/messaging.rs`:
//! - **A receipt's time** ([`receipt_time`]): the contract's [`Enqueue`] carries no clock, so an
//!   item's receipt is taken at its job's `due_at` (when the user receives it), else at its
//!   first event's time (a control-group enrolment), else at the newest dispatch the enqueue
//!   creates, else 0; [`take_receipt`] takes a campaign's or a Canvas's receipt in one
//!   statement (PostgreSQL: `take_receipt_rows`, the same rule in one statement for many).
//! - **Expansion marks only move forward** ([`move_expansion`]): a mark `Some(u)` applies
//!   only to a dispatch that is still expanding and has not reached `u` yet, and `None` only
//!   to one still expanding; a mark that does not apply makes the whole enqueue a
//!   [`StoreError::Conflict`] (nothing written). So a cancelled or deleted campaign's dispatch
//!   gets no more jobs from an expander already running, and two nodes resuming one
//!   expansion queue each chunk — the last one too — once.
//! - **`next_due`** is when the next send can be claimed: the earliest `due_at` of a pending
//!   send without a lease, or for one under a lease (claimed sends in flight; a crashed
//!   node's expire then) the later of its `due_at` and `lease_until` — a rescheduled send
//!   whose lease ran out is not claimable before its new due time.
//! - A `next_run` compare-and-set on a campaign that does not exist is a conflict too (it can
//!   no longer be dispatched).
//! - Send ids are never reused (`AUTOINCREMENT`, schema version 8): a send's id is its
//!   idempotency key.
//! - **Campaign stats** ([`Tally`], schema version 9) are tallied before they are written:
//!   a unique increment's (campaign, stat, user) is recorded once (`INSERT OR IGNORE` into
//!   `campaign_stat_users`) and counts only if that row is new; then each distinct
//!   (campaign, stat) gets one upsert adding its total, whatever the number of events.
//!   **Send-id series** (`send_stats`, schema version 19) are counted the same way, keyed by
//!   (campaign, send id, day, channel, variation).

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;
use tideway_core::campaigns::CampaignStatus;
use tideway_core::clock::Millis;
use tideway_core::currents::CurrentsEvent;
use tideway_core::ids::{UserSeq, WorkspaceId};
use tideway_core::profile::UserRecord;
use tideway_core::segments::FeedPosition;
use tideway_core::store::{
    CampaignRecord, CampaignStat, CanvasRecipient, ClaimedSend, CohortEntry, DispatchRecord,
    DispatchSource, Enqueue, EnqueueOutcome, MessagingStore, NewSend, QueueState, ReceiptRecord,
    SegmentTracker, SendCounts, SendJob, SendSeriesFigure, SendSeriesKey, SendStat,
    SendStatIncrement, SendState, SentMessage, Settlement, StatIncrement, StoreError, StoreFuture,
    TriggerCursor, UserSend,
};

use super::users::SqlUsers;
use super::{SqliteStore, sql_err};
use crate::codec::{corrupt, u64_of};

// ---- shared with the PostgreSQL store ----------------------------------------------------

/// The time an item's receipt is taken at (see the module docs).
pub(crate) fn receipt_time(item: &NewSend, enqueue: &Enqueue) -> Millis {
    if let Some(job) = &item.job {
        return job.due_at;
    }
    if let Some(event) = item.events.first() {
        return Millis::from_secs(event.time);
    }
    enqueue
        .dispatches
        .iter()
        .map(|d| d.created_at)
        .max()
        .unwrap_or(Millis(0))
}

/// The conflict of a mark that does not move an expansion forward.
pub(crate) fn expansion_conflict(dispatch: &str) -> StoreError {
    StoreError::Conflict(format!(
        "expansion of dispatch {dispatch} (ended, or already past this point)"
    ))
}

/// The conflict of a compare-and-set that found another value.
pub(crate) fn cas_conflict(what: &str) -> StoreError {
    StoreError::Conflict(format!("{what} moved by another writer"))
}

/// The stored text of a campaign's tags.
pub(crate) fn tags_text(tags: &[String]) -> String {
    Value::from(tags.to_vec()).to_string()
}

pub(crate) fn tags_of(text: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(format!("campaign tags: {e}")))
}

pub(crate) fn json_of(text: &str, what: &str) -> Result<Value, StoreError> {
    serde_json::from_str(text).map_err(|e| corrupt(format!("{what}: {e}")))
}

pub(crate) fn status_of(text: &str) -> Result<CampaignStatus, StoreError> {
    CampaignStatus::parse(text).ok_or_else(|| corrupt(format!("campaign status {text:?}")))
}

/// A dispatch's source as its `(source, campaign_id, definition)` columns. A Canvas entry
/// dispatch keeps its Canvas id in `campaign_id` and its named recipients (if any) in
/// `definition`, as `[[user_seq, properties text or null], …]`.
pub(crate) fn source_columns(
    source: &DispatchSource,
) -> (&'static str, Option<&str>, Option<String>) {
    match source {
        DispatchSource::Campaign { campaign_id } => ("campaign", Some(campaign_id.as_str()), None),
        DispatchSource::AdHoc { definition } => ("adhoc", None, Some(definition.to_string())),
        DispatchSource::Canvas {
            canvas_id,
            recipients,
        } => (
            "canvas",
            Some(canvas_id.as_str()),
            recipients.as_ref().map(|list| {
                Value::Array(
                    list.iter()
                        .map(|r| serde_json::json!([r.user.0, r.properties]))
                        .collect(),
                )
                .to_string()
            }),
        ),
    }
}

pub(crate) fn source_of(
    kind: &str,
    campaign_id: Option<String>,
    definition: Option<&str>,
) -> Result<DispatchSource, StoreError> {
    match (kind, campaign_id, definition) {
        ("campaign", Some(campaign_id), _) => Ok(DispatchSource::Campaign { campaign_id }),
        ("adhoc", _, Some(text)) => Ok(DispatchSource::AdHoc {
            definition: json_of(text, "dispatch definition")?,
        }),
        ("canvas", Some(canvas_id), text) => {
            let recipients = text
                .map(|t| {
                    let bad = || corrupt(format!("Canvas dispatch recipients {t:?}"));
                    let Value::Array(list) = json_of(t, "Canvas dispatch recipients")? else {
                        return Err(bad());
                    };
                    list.iter()
                        .map(|r| {
                            Ok(CanvasRecipient {
                                user: UserSeq(
                                    r[0].as_u64()
                                        .and_then(|n| u32::try_from(n).ok())
                                        .ok_or_else(bad)?,
                                ),
                                properties: r[1].as_str().map(str::to_owned),
                            })
                        })
                        .collect::<Result<Vec<_>, StoreError>>()
                })
                .transpose()?;
            Ok(DispatchSource::Canvas {
                canvas_id,
                recipients,
            })
        }
        (kind, ..) => Err(corrupt(format!("dispatch source {kind:?}"))),
    }
}

/// An enqueue's stat increments, tallied: what to add per (key, stat) without a user, and the
/// distinct (key, stat, user) of the unique ones, which add one each only where the user is
/// not recorded yet. Both in key order (the order rows are written and locked in). The key is
/// a campaign id for campaign stats, a [`SendSeriesKey`] for send-id series.
#[derive(Debug)]
pub(crate) struct Tally<K, S> {
    pub(crate) counts: BTreeMap<(K, S), i64>,
    pub(crate) unique: BTreeSet<(K, S, UserSeq)>,
}

impl<K: Ord + Copy, S: Ord + Copy> Tally<K, S> {
    pub(crate) fn of(increments: impl IntoIterator<Item = (K, S, Option<UserSeq>)>) -> Self {
        let mut tally = Tally {
            counts: BTreeMap::new(),
            unique: BTreeSet::new(),
        };
        for (key, stat, unique_user) in increments {
            match unique_user {
                None => tally.count_new(key, stat),
                Some(user) => {
                    tally.unique.insert((key, stat, user));
                }
            }
        }
        tally
    }

    /// Adds one to (key, stat): a plain increment, or a unique one whose user was newly
    /// recorded.
    pub(crate) fn count_new(&mut self, key: K, stat: S) {
        *self.counts.entry((key, stat)).or_default() += 1;
    }
}

/// A campaign's stat increments, tallied.
pub(crate) fn stat_tally(stats: &[StatIncrement]) -> Tally<&str, CampaignStat> {
    Tally::of(
        stats
            .iter()
            .map(|s| (s.campaign_id.as_str(), s.stat, s.unique_user)),
    )
}

/// Send-id series increments, tallied.
pub(crate) fn send_tally(stats: &[SendStatIncrement]) -> Tally<&SendSeriesKey, SendStat> {
    Tally::of(stats.iter().map(|s| (&s.key, s.stat, s.unique_user)))
}

/// A send id's series from its stored rows, in the order read.
pub(crate) fn send_figure(
    day: i64,
    channel: String,
    variation: String,
    stat: &str,
    count: i64,
) -> Result<SendSeriesFigure, StoreError> {
    Ok(SendSeriesFigure {
        day: Millis(day),
        channel,
        variation,
        stat: SendStat::parse(stat).ok_or_else(|| corrupt(format!("send stat {stat:?}")))?,
        count: u64_of(count),
    })
}

/// A campaign's stats from its stored `(stat, count)` rows: every stat, in
/// [`CampaignStat::ALL`] order, zero where there is no row.
pub(crate) fn stats_of(
    rows: impl IntoIterator<Item = (String, i64)>,
) -> Result<Vec<(CampaignStat, u64)>, StoreError> {
    let mut stats: Vec<(CampaignStat, u64)> = CampaignStat::ALL.map(|s| (s, 0)).to_vec();
    for (name, count) in rows {
        let stat =
            CampaignStat::parse(&name).ok_or_else(|| corrupt(format!("campaign stat {name:?}")))?;
        for slot in stats.iter_mut().filter(|(s, _)| *s == stat) {
            slot.1 = u64_of(count);
        }
    }
    Ok(stats)
}

/// Every event an enqueue appends, in order: the accepted items', the loose ones, the new
/// conversions'.
type Appends = Vec<(Option<UserSeq>, CurrentsEvent)>;

// ---- rows ---------------------------------------------------------------------------------

const CAMPAIGN_COLUMNS: &str = "id, name, description, tags, status, definition, created_at, \
     updated_at, launched_at, next_run, first_sent, last_sent";

const DISPATCH_COLUMNS: &str = "workspace_id, id, source, campaign_id, definition, send_id, \
     per_user_ids, properties, audience, created_at, expanding_after, not_before";

/// A row's columns before decoding (rusqlite's row closure cannot return our error).
struct RawCampaign {
    id: String,
    name: String,
    description: String,
    tags: String,
    status: String,
    definition: String,
    times: [Option<i64>; 6],
}

fn raw_campaign(row: &Row<'_>, at: usize) -> rusqlite::Result<RawCampaign> {
    Ok(RawCampaign {
        id: row.get(at)?,
        name: row.get(at + 1)?,
        description: row.get(at + 2)?,
        tags: row.get(at + 3)?,
        status: row.get(at + 4)?,
        definition: row.get(at + 5)?,
        times: [
            row.get(at + 6)?,
            row.get(at + 7)?,
            row.get(at + 8)?,
            row.get(at + 9)?,
            row.get(at + 10)?,
            row.get(at + 11)?,
        ],
    })
}

fn campaign_of(raw: RawCampaign) -> Result<CampaignRecord, StoreError> {
    let [created, updated, launched, next_run, first_sent, last_sent] = raw.times;
    Ok(CampaignRecord {
        id: raw.id,
        name: raw.name,
        description: raw.description,
        tags: tags_of(&raw.tags)?,
        status: status_of(&raw.status)?,
        definition: json_of(&raw.definition, "campaign definition")?,
        created_at: Millis(created.unwrap_or_default()),
        updated_at: Millis(updated.unwrap_or_default()),
        launched_at: launched.map(Millis),
        next_run: next_run.map(Millis),
        first_sent: first_sent.map(Millis),
        last_sent: last_sent.map(Millis),
    })
}

struct RawDispatch {
    workspace: i64,
    id: String,
    source: String,
    campaign_id: Option<String>,
    definition: Option<String>,
    send_id: Option<String>,
    per_user_ids: bool,
    properties: Option<String>,
    audience: Option<String>,
    created_at: i64,
    expanding_after: Option<u32>,
    not_before: Option<i64>,
}

fn raw_dispatch(row: &Row<'_>) -> rusqlite::Result<RawDispatch> {
    Ok(RawDispatch {
        workspace: row.get(0)?,
        id: row.get(1)?,
        source: row.get(2)?,
        campaign_id: row.get(3)?,
        definition: row.get(4)?,
        send_id: row.get(5)?,
        per_user_ids: row.get(6)?,
        properties: row.get(7)?,
        audience: row.get(8)?,
        created_at: row.get(9)?,
        expanding_after: row.get(10)?,
        not_before: row.get(11)?,
    })
}

fn dispatch_of(raw: RawDispatch) -> Result<DispatchRecord, StoreError> {
    Ok(DispatchRecord {
        id: raw.id,
        workspace: WorkspaceId(raw.workspace),
        source: source_of(&raw.source, raw.campaign_id, raw.definition.as_deref())?,
        send_id: raw.send_id,
        per_user_ids: raw.per_user_ids,
        properties: raw.properties,
        audience: raw
            .audience
            .as_deref()
            .map(|a| json_of(a, "dispatch audience"))
            .transpose()?,
        created_at: Millis(raw.created_at),
        expanding_after: raw.expanding_after.map(UserSeq),
        not_before: raw.not_before.map(Millis),
    })
}

// ---- campaigns ------------------------------------------------------------------------------

fn campaign(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
) -> Result<Option<CampaignRecord>, StoreError> {
    let sql =
        format!("SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE workspace_id = ?1 AND id = ?2");
    conn.prepare_cached(&sql)
        .map_err(sql_err)?
        .query_row(params![workspace.0, id], |r| raw_campaign(r, 0))
        .optional()
        .map_err(sql_err)?
        .map(campaign_of)
        .transpose()
}

fn create_campaign(
    conn: &Connection,
    workspace: WorkspaceId,
    c: &CampaignRecord,
) -> Result<CampaignRecord, StoreError> {
    let sql = format!(
        "INSERT INTO campaigns ({CAMPAIGN_COLUMNS}, workspace_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
    );
    conn.prepare_cached(&sql)
        .map_err(sql_err)?
        .execute(params![
            c.id,
            c.name,
            c.description,
            tags_text(&c.tags),
            c.status.as_str(),
            c.definition.to_string(),
            c.created_at.0,
            c.updated_at.0,
            c.launched_at.map(|m| m.0),
            c.next_run.map(|m| m.0),
            c.first_sent.map(|m| m.0),
            c.last_sent.map(|m| m.0),
            workspace.0,
        ])
        .map_err(sql_err)?;
    Ok(c.clone())
}

fn list_campaigns(
    conn: &Connection,
    workspace: WorkspaceId,
) -> Result<Vec<CampaignRecord>, StoreError> {
    let sql = format!(
        "SELECT {CAMPAIGN_COLUMNS} FROM campaigns WHERE workspace_id = ?1 ORDER BY created_at, id"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let raws = stmt
        .query_map(params![workspace.0], |r| raw_campaign(r, 0))
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err)?;
    raws.into_iter().map(campaign_of).collect()
}

fn save_campaign(
    conn: &Connection,
    workspace: WorkspaceId,
    c: &CampaignRecord,
) -> Result<Option<CampaignRecord>, StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE campaigns SET name = ?3, description = ?4, tags = ?5, status = ?6,
                 definition = ?7, updated_at = ?8, launched_at = ?9, next_run = ?10,
                 first_sent = ?11, last_sent = ?12
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
            c.definition.to_string(),
            c.updated_at.0,
            c.launched_at.map(|m| m.0),
            c.next_run.map(|m| m.0),
            c.first_sent.map(|m| m.0),
            c.last_sent.map(|m| m.0),
        ])
        .map_err(sql_err)?;
    if changed == 0 {
        return Ok(None);
    }
    campaign(conn, workspace, &c.id)
}

fn delete_campaign(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "DELETE FROM sends WHERE workspace_id = ?1 AND state = 'pending' AND dispatch_id IN
             (SELECT id FROM dispatches WHERE workspace_id = ?1 AND campaign_id = ?2)",
    )
    .map_err(sql_err)?
    .execute(params![workspace.0, id])
    .map_err(sql_err)?;
    // Its expansions end: an expander still running gets a conflict, not more jobs.
    conn.prepare_cached(
        "UPDATE dispatches SET expanding_after = NULL
         WHERE workspace_id = ?1 AND campaign_id = ?2 AND expanding_after IS NOT NULL",
    )
    .map_err(sql_err)?
    .execute(params![workspace.0, id])
    .map_err(sql_err)?;
    for sql in [
        "DELETE FROM campaign_stats WHERE workspace_id = ?1 AND campaign_id = ?2",
        "DELETE FROM campaign_stat_users WHERE workspace_id = ?1 AND campaign_id = ?2",
        "DELETE FROM send_stats WHERE workspace_id = ?1 AND campaign_id = ?2",
        "DELETE FROM send_stat_users WHERE workspace_id = ?1 AND campaign_id = ?2",
        "DELETE FROM segment_trackers WHERE workspace_id = ?1 AND campaign_id = ?2",
    ] {
        conn.prepare_cached(sql)
            .map_err(sql_err)?
            .execute(params![workspace.0, id])
            .map_err(sql_err)?;
    }
    let deleted = conn
        .prepare_cached("DELETE FROM campaigns WHERE workspace_id = ?1 AND id = ?2")
        .map_err(sql_err)?
        .execute(params![workspace.0, id])
        .map_err(sql_err)?;
    Ok(deleted > 0)
}

fn active_campaigns(conn: &Connection) -> Result<Vec<(WorkspaceId, CampaignRecord)>, StoreError> {
    let sql = format!(
        "SELECT workspace_id, {CAMPAIGN_COLUMNS} FROM campaigns WHERE status = 'active'
         ORDER BY workspace_id, created_at, id"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let raws = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, raw_campaign(r, 1)?)))
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err)?;
    raws.into_iter()
        .map(|(ws, raw)| Ok((WorkspaceId(ws), campaign_of(raw)?)))
        .collect()
}

fn counts_of(rows: impl IntoIterator<Item = (String, i64)>) -> SendCounts {
    let mut counts = SendCounts::default();
    for (state, n) in rows {
        match state.as_str() {
            "pending" => counts.pending += u64_of(n),
            "sent" => counts.sent += u64_of(n),
            _ => counts.failed += u64_of(n),
        }
    }
    counts
}

fn campaign_send_counts(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
) -> Result<SendCounts, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT s.state, COUNT(*) FROM dispatches d
             JOIN sends s ON s.workspace_id = d.workspace_id AND s.dispatch_id = d.id
             WHERE d.workspace_id = ?1 AND d.campaign_id = ?2
             GROUP BY s.state",
        )
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(params![workspace.0, id], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<(String, i64)>>>()
        .map_err(sql_err)?;
    Ok(counts_of(rows))
}

fn campaign_stats(
    conn: &Connection,
    workspace: WorkspaceId,
    campaign_id: &str,
) -> Result<Vec<(CampaignStat, u64)>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT stat, count FROM campaign_stats WHERE workspace_id = ?1 AND campaign_id = ?2",
        )
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(params![workspace.0, campaign_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<(String, i64)>>>()
        .map_err(sql_err)?;
    stats_of(rows)
}

// ---- enqueue --------------------------------------------------------------------------------

pub(crate) fn insert_dispatch(conn: &Connection, d: &DispatchRecord) -> Result<(), StoreError> {
    let (source, campaign_id, definition) = source_columns(&d.source);
    let sql = format!(
        "INSERT INTO dispatches ({DISPATCH_COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
    );
    conn.prepare_cached(&sql)
        .map_err(sql_err)?
        .execute(params![
            d.workspace.0,
            d.id,
            source,
            campaign_id,
            definition,
            d.send_id,
            d.per_user_ids,
            d.properties,
            d.audience.as_ref().map(Value::to_string),
            d.created_at.0,
            d.expanding_after.map(|u| u.0),
            d.not_before.map(|m| m.0),
        ])
        .map_err(sql_err)?;
    Ok(())
}

fn trigger_cursor(conn: &Connection, workspace: WorkspaceId) -> Result<TriggerCursor, StoreError> {
    let found = conn
        .prepare_cached(
            "SELECT cursor_events, cursor_cohort_changes FROM messaging_workspaces
             WHERE workspace_id = ?1",
        )
        .map_err(sql_err)?
        .query_row(params![workspace.0], |r| {
            Ok(TriggerCursor {
                events: r.get(0)?,
                cohort_changes: r.get(1)?,
            })
        })
        .optional()
        .map_err(sql_err)?;
    Ok(found.unwrap_or_default())
}

fn segment_tracker(
    conn: &Connection,
    workspace: WorkspaceId,
    campaign_id: &str,
    segment_id: &str,
) -> Result<Option<SegmentTracker>, StoreError> {
    conn.prepare_cached(
        "SELECT event_seq, cohort_change_seq, user_change_seq, members FROM segment_trackers
         WHERE workspace_id = ?1 AND campaign_id = ?2 AND segment_id = ?3",
    )
    .map_err(sql_err)?
    .query_row(params![workspace.0, campaign_id, segment_id], |r| {
        Ok(SegmentTracker {
            position: FeedPosition {
                event_seq: r.get(0)?,
                cohort_change_seq: r.get(1)?,
                user_change_seq: r.get(2)?,
            },
            members: r.get(3)?,
        })
    })
    .optional()
    .map_err(sql_err)
}

/// Whose segment-entry trackers are moved: their `campaign_id` names a campaign or a Canvas.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TrackerOwner {
    Campaign,
    Canvas,
}

impl TrackerOwner {
    /// The owner's existence check (`?1` workspace, `?2` / `$1`, `$2` id).
    pub(crate) fn exists_sql(self, dollar: bool) -> &'static str {
        match (self, dollar) {
            (TrackerOwner::Campaign, false) => {
                "SELECT 1 FROM campaigns WHERE workspace_id = ?1 AND id = ?2"
            }
            (TrackerOwner::Canvas, false) => {
                "SELECT 1 FROM canvases WHERE workspace_id = ?1 AND id = ?2"
            }
            (TrackerOwner::Campaign, true) => {
                "SELECT 1 FROM campaigns WHERE workspace_id = $1 AND id = $2 FOR SHARE"
            }
            (TrackerOwner::Canvas, true) => {
                "SELECT 1 FROM canvases WHERE workspace_id = $1 AND id = $2 FOR SHARE"
            }
        }
    }
}

/// Applies [`Enqueue::segment_trackers`] (or a Canvas scan's): each a compare-and-set on the
/// stored position, of a tracker whose owner exists.
fn move_segment_trackers(
    conn: &Connection,
    workspace: WorkspaceId,
    moves: &[(String, String, Option<FeedPosition>, SegmentTracker)],
    owner: TrackerOwner,
) -> Result<(), StoreError> {
    for (campaign_id, segment_id, expected, new) in moves {
        let exists = conn
            .prepare_cached(owner.exists_sql(false))
            .map_err(sql_err)?
            .exists(params![workspace.0, campaign_id])
            .map_err(sql_err)?;
        if !exists {
            return Err(cas_conflict("the segment tracker's campaign or Canvas"));
        }
        let stored = segment_tracker(conn, workspace, campaign_id, segment_id)?;
        if stored.map(|t| t.position) != *expected {
            return Err(cas_conflict("the segment tracker"));
        }
        let p = new.position;
        conn.prepare_cached(
            "INSERT INTO segment_trackers (workspace_id, campaign_id, segment_id, event_seq,
                 cohort_change_seq, user_change_seq, members)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (workspace_id, campaign_id, segment_id) DO UPDATE
                 SET event_seq = excluded.event_seq,
                     cohort_change_seq = excluded.cohort_change_seq,
                     user_change_seq = excluded.user_change_seq,
                     members = excluded.members",
        )
        .map_err(sql_err)?
        .execute(params![
            workspace.0,
            campaign_id,
            segment_id,
            p.event_seq,
            p.cohort_change_seq,
            p.user_change_seq,
            new.members
        ])
        .map_err(sql_err)?;
    }
    Ok(())
}

/// Takes the receipt: true when the item may go ahead.
/// Whose receipts are taken: a campaign's sends, or a Canvas's entries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Receipts {
    Campaign,
    Canvas,
}

/// Takes a receipt of `owner_id` (a campaign or a Canvas) for the user at `now`: a new one, or
/// an old one taken again when the two are a re-eligibility window apart (a window is set; the
/// new one may be the earlier of the two: a send scheduled ahead took its receipt at its own
/// time, and concurrent sends take theirs in any order). The row keeps the later time. Whether
/// it was taken; one statement, so a row left unchanged is a user still ineligible.
pub(crate) fn take_receipt(
    conn: &Connection,
    receipts: Receipts,
    workspace: WorkspaceId,
    user: UserSeq,
    owner_id: &str,
    window_ms: Option<i64>,
    now: Millis,
) -> Result<bool, StoreError> {
    let sql = match receipts {
        Receipts::Campaign => {
            "INSERT INTO campaign_receipts (workspace_id, user_seq, campaign_id, received_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (workspace_id, user_seq, campaign_id) DO UPDATE
                 SET received_at = max(campaign_receipts.received_at, excluded.received_at)
                 WHERE ?5 IS NOT NULL AND (campaign_receipts.received_at + ?5 <= excluded.received_at
                     OR excluded.received_at + ?5 <= campaign_receipts.received_at)"
        }
        Receipts::Canvas => {
            "INSERT INTO canvas_receipts (workspace_id, user_seq, canvas_id, entered_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (workspace_id, canvas_id, user_seq) DO UPDATE
                 SET entered_at = max(canvas_receipts.entered_at, excluded.entered_at)
                 WHERE ?5 IS NOT NULL AND (canvas_receipts.entered_at + ?5 <= excluded.entered_at
                     OR excluded.entered_at + ?5 <= canvas_receipts.entered_at)"
        }
    };
    let changed = conn
        .prepare_cached(sql)
        .map_err(sql_err)?
        .execute(params![workspace.0, user.0, owner_id, now.0, window_ms])
        .map_err(sql_err)?;
    Ok(changed > 0)
}

pub(crate) fn insert_send(
    conn: &Connection,
    workspace: WorkspaceId,
    user: UserSeq,
    job: &SendJob,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO sends (workspace_id, dispatch_id, user_seq, variant, due_at, properties, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending')",
    )
    .map_err(sql_err)?
    .execute(params![
        workspace.0,
        job.dispatch_id,
        user.0,
        job.variant,
        job.due_at.0,
        job.properties
    ])
    .map_err(sql_err)?;
    Ok(())
}

/// What an enqueue and a Canvas scan write before their items: segment trackers moved (of
/// campaigns or Canvases), dispatches created, a dispatch's expansion mark moved — each
/// compare-and-set a conflict when it does not apply.
pub(crate) fn write_marks(
    conn: &Connection,
    workspace: WorkspaceId,
    (trackers, owner): (&[TrackerMove], TrackerOwner),
    dispatches: &[DispatchRecord],
    expansion: Option<&(String, Option<UserSeq>)>,
) -> Result<(), StoreError> {
    move_segment_trackers(conn, workspace, trackers, owner)?;
    for d in dispatches {
        if d.workspace != workspace {
            return Err(corrupt(format!("dispatch {} of another workspace", d.id)));
        }
        insert_dispatch(conn, d)?;
    }
    if let Some((dispatch, mark)) = expansion {
        move_expansion(conn, workspace, dispatch, *mark)?;
    }
    Ok(())
}

/// A segment tracker's move: `(owner id, segment id, expected position, new tracker)`.
pub(crate) type TrackerMove = (String, String, Option<FeedPosition>, SegmentTracker);

/// Moves a dispatch's expansion mark forward (`None`: complete). It applies to a dispatch still
/// expanding whose mark it moves forward, or that it ends; nothing changed is a conflict.
fn move_expansion(
    conn: &Connection,
    workspace: WorkspaceId,
    dispatch: &str,
    mark: Option<UserSeq>,
) -> Result<(), StoreError> {
    let changed = conn
        .prepare_cached(
            "UPDATE dispatches SET expanding_after = ?3
             WHERE workspace_id = ?1 AND id = ?2 AND expanding_after IS NOT NULL
               AND (?3 IS NULL OR expanding_after < ?3)",
        )
        .map_err(sql_err)?
        .execute(params![workspace.0, dispatch, mark.map(|u| u.0)])
        .map_err(sql_err)?;
    if changed == 0 {
        return Err(expansion_conflict(dispatch));
    }
    Ok(())
}

/// Applies an enqueue's stat increments: each unique one's user recorded (counting only if
/// new), then one upsert per distinct (campaign, stat).
fn count_stats(
    conn: &Connection,
    workspace: WorkspaceId,
    stats: &[StatIncrement],
) -> Result<(), StoreError> {
    let mut tally = stat_tally(stats);
    let unique = std::mem::take(&mut tally.unique);
    for (campaign_id, stat, user) in unique {
        let added = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO campaign_stat_users (workspace_id, campaign_id, stat, user_seq)
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(sql_err)?
            .execute(params![workspace.0, campaign_id, stat.as_str(), user.0])
            .map_err(sql_err)?;
        if added > 0 {
            tally.count_new(campaign_id, stat);
        }
    }
    for ((campaign_id, stat), n) in tally.counts {
        conn.prepare_cached(
            "INSERT INTO campaign_stats (workspace_id, campaign_id, stat, count)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (workspace_id, campaign_id, stat) DO UPDATE
                 SET count = count + excluded.count",
        )
        .map_err(sql_err)?
        .execute(params![workspace.0, campaign_id, stat.as_str(), n])
        .map_err(sql_err)?;
    }
    Ok(())
}

/// Applies an enqueue's send-series increments as [`count_stats`] applies campaign stats.
fn count_send_stats(
    conn: &Connection,
    workspace: WorkspaceId,
    stats: &[SendStatIncrement],
) -> Result<(), StoreError> {
    let mut tally = send_tally(stats);
    let unique = std::mem::take(&mut tally.unique);
    for (key, stat, user) in unique {
        let added = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO send_stat_users (workspace_id, campaign_id, send_id, day,
                     channel, variation, stat, user_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(sql_err)?
            .execute(params![
                workspace.0,
                key.campaign_id,
                key.send_id,
                key.day.0,
                key.channel,
                key.variation,
                stat.as_str(),
                user.0
            ])
            .map_err(sql_err)?;
        if added > 0 {
            tally.count_new(key, stat);
        }
    }
    for ((key, stat), n) in tally.counts {
        conn.prepare_cached(
            "INSERT INTO send_stats (workspace_id, campaign_id, send_id, day, channel, variation,
                 stat, count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (workspace_id, campaign_id, send_id, day, channel, variation, stat)
                 DO UPDATE SET count = count + excluded.count",
        )
        .map_err(sql_err)?
        .execute(params![
            workspace.0,
            key.campaign_id,
            key.send_id,
            key.day.0,
            key.channel,
            key.variation,
            stat.as_str(),
            n
        ])
        .map_err(sql_err)?;
    }
    Ok(())
}

fn send_series(
    conn: &Connection,
    workspace: WorkspaceId,
    campaign_id: &str,
    send_id: &str,
    (first_day, last_day): (Millis, Millis),
) -> Result<Vec<SendSeriesFigure>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT day, channel, variation, stat, count FROM send_stats
             WHERE workspace_id = ?1 AND campaign_id = ?2 AND send_id = ?3
                 AND day >= ?4 AND day <= ?5
             ORDER BY day, channel, variation, stat",
        )
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(
            params![workspace.0, campaign_id, send_id, first_day.0, last_day.0],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, String>(3)?,
                    r.get(4)?,
                ))
            },
        )
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<(i64, String, String, String, i64)>>>()
        .map_err(sql_err)?;
    rows.into_iter()
        .map(|(day, channel, variation, stat, count)| {
            send_figure(day, channel, variation, &stat, count)
        })
        .collect()
}

fn enqueue(
    conn: &Connection,
    workspace: WorkspaceId,
    e: &Enqueue,
) -> Result<EnqueueOutcome, StoreError> {
    let mut outcome = EnqueueOutcome::default();
    // The compare-and-sets first: a conflict writes nothing (the job fails and rolls back).
    if let Some((expected, new)) = &e.cursor {
        if trigger_cursor(conn, workspace)? != *expected {
            return Err(cas_conflict("the trigger cursor"));
        }
        conn.prepare_cached(
            "INSERT INTO messaging_workspaces (workspace_id, cursor_events, cursor_cohort_changes)
             VALUES (?1, ?2, ?3)
             ON CONFLICT (workspace_id) DO UPDATE
                 SET cursor_events = excluded.cursor_events,
                     cursor_cohort_changes = excluded.cursor_cohort_changes",
        )
        .map_err(sql_err)?
        .execute(params![workspace.0, new.events, new.cohort_changes])
        .map_err(sql_err)?;
    }
    if let Some((campaign_id, expected, new)) = &e.next_run {
        let changed = conn
            .prepare_cached(
                "UPDATE campaigns SET next_run = ?4
                 WHERE workspace_id = ?1 AND id = ?2 AND next_run IS ?3",
            )
            .map_err(sql_err)?
            .execute(params![
                workspace.0,
                campaign_id,
                expected.map(|m| m.0),
                new.map(|m| m.0)
            ])
            .map_err(sql_err)?;
        if changed == 0 {
            return Err(cas_conflict("the campaign's next run"));
        }
    }
    write_marks(
        conn,
        workspace,
        (&e.segment_trackers, TrackerOwner::Campaign),
        &e.dispatches,
        e.expansion.as_ref(),
    )?;
    let mut appends: Appends = Vec::new();
    for item in &e.items {
        if let Some(receipt) = &item.receipt {
            let now = receipt_time(item, e);
            let taken = take_receipt(
                conn,
                Receipts::Campaign,
                workspace,
                item.user,
                &receipt.campaign_id,
                receipt.reeligible_after_ms,
                now,
            )?;
            if !taken {
                outcome.ineligible += 1;
                continue;
            }
        }
        if let Some(job) = &item.job {
            insert_send(conn, workspace, item.user, job)?;
            outcome.queued += 1;
        }
        appends.extend(item.events.iter().map(|ev| (Some(item.user), ev.clone())));
    }
    appends.extend(e.events.iter().cloned());
    for c in &e.conversions {
        let added = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO campaign_conversions (workspace_id, campaign_id, user_seq, idx, at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(sql_err)?
            .execute(params![
                workspace.0,
                c.campaign_id,
                c.user.0,
                c.index,
                Millis::from_secs(c.event.time).0
            ])
            .map_err(sql_err)?;
        if added > 0 {
            outcome.conversions += 1;
            appends.push((Some(c.user), c.event.clone()));
        }
    }
    count_stats(conn, workspace, &e.stats)?;
    count_send_stats(conn, workspace, &e.send_stats)?;
    super::currents::append_events(conn, workspace, &appends)?;
    Ok(outcome)
}

fn dispatch(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
) -> Result<Option<DispatchRecord>, StoreError> {
    let sql =
        format!("SELECT {DISPATCH_COLUMNS} FROM dispatches WHERE workspace_id = ?1 AND id = ?2");
    conn.prepare_cached(&sql)
        .map_err(sql_err)?
        .query_row(params![workspace.0, id], raw_dispatch)
        .optional()
        .map_err(sql_err)?
        .map(dispatch_of)
        .transpose()
}

fn expanding_dispatches(conn: &Connection, now: Millis) -> Result<Vec<DispatchRecord>, StoreError> {
    let sql = format!(
        "SELECT {DISPATCH_COLUMNS} FROM dispatches
         WHERE expanding_after IS NOT NULL AND (not_before IS NULL OR not_before <= ?1)
         ORDER BY created_at, workspace_id, id"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(sql_err)?;
    let raws = stmt
        .query_map(params![now.0], raw_dispatch)
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err)?;
    raws.into_iter().map(dispatch_of).collect()
}

// ---- the queue ------------------------------------------------------------------------------

fn claim_sends(
    conn: &Connection,
    owner: &str,
    now: Millis,
    lease_ms: u64,
    limit: usize,
) -> Result<Vec<ClaimedSend>, StoreError> {
    let until = now
        .0
        .saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn
        .prepare_cached(
            "UPDATE sends SET lease_owner = ?1, lease_until = ?3
             WHERE id IN (
                 SELECT id FROM sends
                 WHERE state = 'pending' AND due_at <= ?2
                   AND (lease_until IS NULL OR lease_until <= ?2)
                 ORDER BY due_at, id LIMIT ?4)
             RETURNING id, workspace_id, user_seq, dispatch_id, variant, due_at, properties, attempts",
        )
        .map_err(sql_err)?;
    let mut claimed = stmt
        .query_map(params![owner, now.0, until, limit], |r| {
            Ok(ClaimedSend {
                id: r.get(0)?,
                workspace: WorkspaceId(r.get(1)?),
                user: UserSeq(r.get(2)?),
                job: SendJob {
                    dispatch_id: r.get(3)?,
                    variant: r.get(4)?,
                    due_at: Millis(r.get(5)?),
                    properties: r.get(6)?,
                },
                attempts: r.get(7)?,
            })
        })
        .map_err(sql_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(sql_err)?;
    // RETURNING comes in no particular order.
    claimed.sort_by_key(|c| (c.job.due_at, c.id));
    Ok(claimed)
}

fn settle_sends(
    conn: &Connection,
    owner: &str,
    now: Millis,
    settlements: &[Settlement],
) -> Result<u64, StoreError> {
    let mut refused = 0;
    let mut sent = conn
        .prepare_cached(
            "UPDATE sends SET state = 'sent', sent_at = ?4, address = ?5, links = ?6,
                 lease_owner = NULL, lease_until = NULL, attempts = attempts + 1
             WHERE id = ?1 AND workspace_id = ?2 AND state = 'pending' AND lease_owner = ?3",
        )
        .map_err(sql_err)?;
    let mut later = conn
        .prepare_cached(
            "UPDATE sends SET due_at = ?4, attempts = attempts + ?5,
                 lease_owner = NULL, lease_until = NULL
             WHERE id = ?1 AND workspace_id = ?2 AND state = 'pending' AND lease_owner = ?3",
        )
        .map_err(sql_err)?;
    let mut failed = conn
        .prepare_cached(
            "UPDATE sends SET state = 'failed', attempts = attempts + 1,
                 lease_owner = NULL, lease_until = NULL
             WHERE id = ?1 AND workspace_id = ?2 AND state = 'pending' AND lease_owner = ?3",
        )
        .map_err(sql_err)?;
    let mut dispatch_of = conn
        .prepare_cached("SELECT dispatch_id FROM sends WHERE id = ?1")
        .map_err(sql_err)?;
    let mut campaign_sent = conn
        .prepare_cached(
            "UPDATE campaigns SET first_sent = COALESCE(first_sent, ?3),
                 last_sent = MAX(COALESCE(last_sent, ?3), ?3)
             WHERE workspace_id = ?1 AND id =
                 (SELECT campaign_id FROM dispatches WHERE workspace_id = ?1 AND id = ?2)",
        )
        .map_err(sql_err)?;
    let mut sent_dispatches: std::collections::BTreeSet<(i64, String)> =
        std::collections::BTreeSet::new();
    for s in settlements {
        let accepted = match &s.state {
            SendState::Sent { address, links } => {
                // No RETURNING: SQLite materialises a RETURNING statement's rows in a
                // temporary b-tree each time it runs, which cost the writer a third of its
                // time at one statement per send. A lookup by key is far cheaper.
                let updated = sent
                    .execute(params![s.send, s.workspace.0, owner, now.0, address, links])
                    .map_err(sql_err)?;
                let dispatch: Option<String> = if updated == 0 {
                    None
                } else {
                    dispatch_of
                        .query_row(params![s.send], |r| r.get(0))
                        .optional()
                        .map_err(sql_err)?
                };
                let accepted = dispatch.is_some();
                if let Some(dispatch) = dispatch {
                    // A campaign's first/last sent time moves once per dispatch per batch,
                    // not once per message (a broadcast settles thousands per batch).
                    sent_dispatches.insert((s.workspace.0, dispatch));
                }
                accepted
            }
            SendState::RetryAt { at } => {
                later
                    .execute(params![s.send, s.workspace.0, owner, at.0, 1])
                    .map_err(sql_err)?
                    > 0
            }
            SendState::Deferred { at } => {
                later
                    .execute(params![s.send, s.workspace.0, owner, at.0, 0])
                    .map_err(sql_err)?
                    > 0
            }
            SendState::Failed => {
                failed
                    .execute(params![s.send, s.workspace.0, owner])
                    .map_err(sql_err)?
                    > 0
            }
        };
        if !accepted {
            refused += 1;
            continue;
        }
        if !s.events.is_empty() {
            let events: Appends = s.events.iter().map(|e| (Some(s.user), e.clone())).collect();
            super::currents::append_events(conn, s.workspace, &events)?;
        }
    }
    for (workspace, dispatch) in sent_dispatches {
        campaign_sent
            .execute(params![workspace, dispatch, now.0])
            .map_err(sql_err)?;
    }
    Ok(refused)
}

fn next_due(conn: &Connection) -> Result<Option<Millis>, StoreError> {
    let free: Option<i64> = conn
        .prepare_cached(
            "SELECT due_at FROM sends WHERE state = 'pending' AND lease_owner IS NULL
             ORDER BY due_at LIMIT 1",
        )
        .map_err(sql_err)?
        .query_row([], |r| r.get(0))
        .optional()
        .map_err(sql_err)?;
    // Claimed sends (few: those in flight) are claimable again when their lease ends, but not
    // before they are due (a dispatch rescheduled while they were claimed).
    let leased: Option<i64> = conn
        .prepare_cached(
            "SELECT MIN(MAX(lease_until, due_at)) FROM sends
             WHERE state = 'pending' AND lease_owner IS NOT NULL",
        )
        .map_err(sql_err)?
        .query_row([], |r| r.get(0))
        .map_err(sql_err)?;
    Ok(match (free, leased) {
        (Some(a), Some(b)) => Some(Millis(a.min(b))),
        (a, b) => a.or(b).map(Millis),
    })
}

fn sent_message(
    conn: &Connection,
    workspace: WorkspaceId,
    id: i64,
) -> Result<Option<SentMessage>, StoreError> {
    conn.prepare_cached(
        "SELECT id, workspace_id, user_seq, dispatch_id, variant, address, links, sent_at
         FROM sends WHERE id = ?1 AND workspace_id = ?2 AND state = 'sent'",
    )
    .map_err(sql_err)?
    .query_row(params![id, workspace.0], |r| {
        Ok(SentMessage {
            id: r.get(0)?,
            workspace: WorkspaceId(r.get(1)?),
            user: UserSeq(r.get(2)?),
            dispatch_id: r.get(3)?,
            variant: r.get(4)?,
            address: r.get(5)?,
            links: r.get(6)?,
            sent_at: Millis(r.get::<_, Option<i64>>(7)?.unwrap_or_default()),
        })
    })
    .optional()
    .map_err(sql_err)
}

fn sends_since(
    conn: &Connection,
    workspace: WorkspaceId,
    user: UserSeq,
    since: Millis,
) -> Result<u64, StoreError> {
    let n: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM sends
             WHERE workspace_id = ?1 AND user_seq = ?2 AND state = 'sent' AND sent_at >= ?3",
        )
        .map_err(sql_err)?
        .query_row(params![workspace.0, user.0, since.0], |r| r.get(0))
        .map_err(sql_err)?;
    Ok(u64_of(n))
}

fn recent_sends(
    conn: &Connection,
    workspace: WorkspaceId,
    user: UserSeq,
    limit: usize,
) -> Result<Vec<UserSend>, StoreError> {
    // Served by `sends_user_recent` (workspace_id, user_seq; the rowid `id` ends the index),
    // newest first, and the dispatch by its primary key.
    let mut stmt = conn
        .prepare_cached(
            "SELECT s.id, s.dispatch_id, d.source, d.campaign_id, d.definition, s.variant,
                    s.state, s.due_at, s.sent_at, s.attempts
             FROM sends s
             LEFT JOIN dispatches d ON d.workspace_id = s.workspace_id AND d.id = s.dispatch_id
             WHERE s.workspace_id = ?1 AND s.user_seq = ?2
             ORDER BY s.id DESC LIMIT ?3",
        )
        .map_err(sql_err)?;
    let rows = stmt
        .query_map(
            params![
                workspace.0,
                user.0,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                    r.get::<_, i64>(9)?,
                ))
            },
        )
        .map_err(sql_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, dispatch_id, kind, campaign_id, definition, variant, state, due, sent, attempts) =
            row.map_err(sql_err)?;
        out.push(UserSend {
            id,
            dispatch_id,
            source: kind
                .map(|k| source_of(&k, campaign_id, definition.as_deref()))
                .transpose()?,
            variant,
            state: queue_state_of(&state)?,
            due_at: Millis(due),
            sent_at: sent.map(Millis),
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        });
    }
    Ok(out)
}

pub(crate) fn queue_state_of(text: &str) -> Result<QueueState, StoreError> {
    QueueState::parse(text).ok_or_else(|| corrupt(format!("send state {text:?}")))
}

/// The campaign receipts the pending sends of dispatch `?2` (of a campaign) took: a receipt
/// is taken at its send's due time, so one that still has that time is that send's. Moved with
/// a rescheduled dispatch, released with a cancelled one (a scheduled send that will not go out
/// must not keep the user from the campaign).
const PENDING_RECEIPTS: &str = "workspace_id = ?1
    AND campaign_id = (SELECT campaign_id FROM dispatches
                       WHERE workspace_id = ?1 AND id = ?2 AND source = 'campaign')
    AND (user_seq, received_at) IN (SELECT user_seq, due_at FROM sends
                                    WHERE workspace_id = ?1 AND dispatch_id = ?2 AND state = 'pending')";

fn reschedule_dispatch(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
    at: Millis,
) -> Result<bool, StoreError> {
    let exists = conn
        .prepare_cached(
            "UPDATE dispatches SET not_before = CASE WHEN expanding_after IS NULL
                 THEN not_before ELSE ?3 END
             WHERE workspace_id = ?1 AND id = ?2",
        )
        .map_err(sql_err)?
        .execute(params![workspace.0, id, at.0])
        .map_err(sql_err)?;
    if exists == 0 {
        return Ok(false);
    }
    conn.prepare_cached(&format!(
        "UPDATE campaign_receipts SET received_at = ?3 WHERE {PENDING_RECEIPTS}"
    ))
    .map_err(sql_err)?
    .execute(params![workspace.0, id, at.0])
    .map_err(sql_err)?;
    conn.prepare_cached(
        "UPDATE sends SET due_at = ?3
         WHERE workspace_id = ?1 AND dispatch_id = ?2 AND state = 'pending'",
    )
    .map_err(sql_err)?
    .execute(params![workspace.0, id, at.0])
    .map_err(sql_err)?;
    Ok(true)
}

fn cancel_dispatch(
    conn: &Connection,
    workspace: WorkspaceId,
    id: &str,
) -> Result<bool, StoreError> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM dispatches WHERE workspace_id = ?1 AND id = ?2")
        .map_err(sql_err)?
        .exists(params![workspace.0, id])
        .map_err(sql_err)?;
    if !exists {
        return Ok(false);
    }
    conn.prepare_cached(&format!(
        "DELETE FROM campaign_receipts WHERE {PENDING_RECEIPTS}"
    ))
    .map_err(sql_err)?
    .execute(params![workspace.0, id])
    .map_err(sql_err)?;
    conn.prepare_cached(
        "UPDATE dispatches SET expanding_after = NULL, not_before = NULL
         WHERE workspace_id = ?1 AND id = ?2",
    )
    .map_err(sql_err)?
    .execute(params![workspace.0, id])
    .map_err(sql_err)?;
    conn.prepare_cached(
        "DELETE FROM sends WHERE workspace_id = ?1 AND dispatch_id = ?2 AND state = 'pending'",
    )
    .map_err(sql_err)?
    .execute(params![workspace.0, id])
    .map_err(sql_err)?;
    Ok(true)
}

fn receipts_of(
    conn: &Connection,
    workspace: WorkspaceId,
    user: UserSeq,
) -> Result<Vec<ReceiptRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT campaign_id, received_at FROM campaign_receipts
             WHERE workspace_id = ?1 AND user_seq = ?2 ORDER BY received_at DESC, campaign_id",
        )
        .map_err(sql_err)?;
    stmt.query_map(params![workspace.0, user.0], |r| {
        Ok(ReceiptRecord {
            campaign_id: r.get(0)?,
            received_at: Millis(r.get(1)?),
        })
    })
    .map_err(sql_err)?
    .collect::<rusqlite::Result<Vec<_>>>()
    .map_err(sql_err)
}

/// The conflict of a send id over the daily cap.
pub(crate) fn send_id_cap(max_per_day: u32) -> StoreError {
    StoreError::Conflict(format!(
        "the daily quota of {max_per_day} new send ids (a new send id)"
    ))
}

fn create_send_id(
    conn: &Connection,
    workspace: WorkspaceId,
    campaign_id: &str,
    send_id: &str,
    now: Millis,
    day_start: Millis,
    max_per_day: u32,
) -> Result<bool, StoreError> {
    let exists = conn
        .prepare_cached(
            "SELECT 1 FROM campaign_send_ids
             WHERE workspace_id = ?1 AND campaign_id = ?2 AND send_id = ?3",
        )
        .map_err(sql_err)?
        .exists(params![workspace.0, campaign_id, send_id])
        .map_err(sql_err)?;
    if exists {
        return Ok(false);
    }
    let today: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM campaign_send_ids WHERE workspace_id = ?1 AND created_at >= ?2",
        )
        .map_err(sql_err)?
        .query_row(params![workspace.0, day_start.0], |r| r.get(0))
        .map_err(sql_err)?;
    if u64_of(today) >= u64::from(max_per_day) {
        return Err(send_id_cap(max_per_day));
    }
    conn.prepare_cached(
        "INSERT INTO campaign_send_ids (workspace_id, campaign_id, send_id, created_at)
         VALUES (?1, ?2, ?3, ?4)",
    )
    .map_err(sql_err)?
    .execute(params![workspace.0, campaign_id, send_id, now.0])
    .map_err(sql_err)?;
    Ok(true)
}

fn messaging_settings(
    conn: &Connection,
    workspace: WorkspaceId,
) -> Result<Option<Value>, StoreError> {
    let text: Option<Option<String>> = conn
        .prepare_cached("SELECT settings FROM messaging_workspaces WHERE workspace_id = ?1")
        .map_err(sql_err)?
        .query_row(params![workspace.0], |r| r.get(0))
        .optional()
        .map_err(sql_err)?;
    text.flatten()
        .map(|t| json_of(&t, "messaging settings"))
        .transpose()
}

fn save_messaging_settings(
    conn: &Connection,
    workspace: WorkspaceId,
    settings: &Value,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO messaging_workspaces (workspace_id, settings) VALUES (?1, ?2)
         ON CONFLICT (workspace_id) DO UPDATE SET settings = excluded.settings",
    )
    .map_err(sql_err)?
    .execute(params![workspace.0, settings.to_string()])
    .map_err(sql_err)?;
    Ok(())
}

// ---- triggers -------------------------------------------------------------------------------

fn cohort_entries(
    conn: &Connection,
    workspace: WorkspaceId,
    after: i64,
    limit: usize,
) -> Result<Vec<CohortEntry>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT m.change_seq, m.seq, c.partner, c.cohort_id, m.at
             FROM cohort_membership_changes m JOIN cohorts c ON c.id = m.cohort
             WHERE m.workspace_id = ?1 AND m.change_seq > ?2 AND m.entered = 1
             ORDER BY m.change_seq LIMIT ?3",
        )
        .map_err(sql_err)?;
    stmt.query_map(
        params![workspace.0, after, i64::try_from(limit).unwrap_or(i64::MAX)],
        |r| {
            Ok(CohortEntry {
                position: r.get(0)?,
                user: UserSeq(r.get(1)?),
                partner: r.get(2)?,
                cohort_id: r.get(3)?,
                at: Millis(r.get(4)?),
            })
        },
    )
    .map_err(sql_err)?
    .collect::<rusqlite::Result<Vec<_>>>()
    .map_err(sql_err)
}

fn max_of(conn: &Connection, sql: &str, workspace: WorkspaceId) -> Result<i64, StoreError> {
    conn.prepare_cached(sql)
        .map_err(sql_err)?
        .query_row(params![workspace.0], |r| r.get::<_, Option<i64>>(0))
        .map(Option::unwrap_or_default)
        .map_err(sql_err)
}

fn messaging_secret(conn: &Connection, candidate: [u8; 32]) -> Result<[u8; 32], StoreError> {
    conn.prepare_cached("INSERT OR IGNORE INTO messaging_secrets (id, key) VALUES (1, ?1)")
        .map_err(sql_err)?
        .execute(params![candidate.as_slice()])
        .map_err(sql_err)?;
    let key: Vec<u8> = conn
        .prepare_cached("SELECT key FROM messaging_secrets WHERE id = 1")
        .map_err(sql_err)?
        .query_row([], |r| r.get(0))
        .map_err(sql_err)?;
    key.try_into()
        .map_err(|_| corrupt("the messaging secret is not 32 bytes"))
}

// ---- the trait --------------------------------------------------------------------------------

impl MessagingStore for SqliteStore {
    fn create_campaign(
        &self,
        workspace: WorkspaceId,
        campaign: CampaignRecord,
    ) -> StoreFuture<'_, CampaignRecord> {
        self.write(move |conn, _, _| create_campaign(conn, workspace, &campaign))
    }

    fn campaign(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, Option<CampaignRecord>> {
        let id = id.to_owned();
        self.read(move |conn| campaign(conn, workspace, &id))
    }

    fn list_campaigns(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<CampaignRecord>> {
        self.read(move |conn| list_campaigns(conn, workspace))
    }

    fn save_campaign(
        &self,
        workspace: WorkspaceId,
        campaign: CampaignRecord,
    ) -> StoreFuture<'_, Option<CampaignRecord>> {
        self.write(move |conn, _, _| save_campaign(conn, workspace, &campaign))
    }

    fn delete_campaign(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        self.write(move |conn, _, _| delete_campaign(conn, workspace, &id))
    }

    fn active_campaigns(&self) -> StoreFuture<'_, Vec<(WorkspaceId, CampaignRecord)>> {
        self.read(active_campaigns)
    }

    fn campaign_send_counts(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, SendCounts> {
        let id = id.to_owned();
        self.read(move |conn| campaign_send_counts(conn, workspace, &id))
    }

    fn campaign_stats(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
    ) -> StoreFuture<'_, Vec<(CampaignStat, u64)>> {
        let campaign_id = campaign_id.to_owned();
        self.read(move |conn| campaign_stats(conn, workspace, &campaign_id))
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
        self.read(move |conn| {
            send_series(
                conn,
                workspace,
                &campaign_id,
                &send_id,
                (first_day, last_day),
            )
        })
    }

    fn enqueue(&self, workspace: WorkspaceId, enqueue: Enqueue) -> StoreFuture<'_, EnqueueOutcome> {
        self.write(move |conn, _, _| self::enqueue(conn, workspace, &enqueue))
    }

    fn dispatch(
        &self,
        workspace: WorkspaceId,
        id: &str,
    ) -> StoreFuture<'_, Option<DispatchRecord>> {
        let id = id.to_owned();
        self.read(move |conn| dispatch(conn, workspace, &id))
    }

    fn expanding_dispatches(&self, now: Millis) -> StoreFuture<'_, Vec<DispatchRecord>> {
        self.read(move |conn| expanding_dispatches(conn, now))
    }

    fn claim_sends(
        &self,
        owner: &str,
        now: Millis,
        lease_ms: u64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<ClaimedSend>> {
        let owner = owner.to_owned();
        self.write(move |conn, _, _| claim_sends(conn, &owner, now, lease_ms, limit))
    }

    fn settle_sends(
        &self,
        owner: &str,
        now: Millis,
        settlements: Vec<Settlement>,
    ) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        self.write(move |conn, _, _| settle_sends(conn, &owner, now, &settlements))
    }

    fn next_due(&self) -> StoreFuture<'_, Option<Millis>> {
        self.read(next_due)
    }

    fn release_leases(&self, owner: &str) -> StoreFuture<'_, u64> {
        let owner = owner.to_owned();
        self.write(move |conn, _, _| {
            let n = conn
                .prepare_cached(
                    "UPDATE sends SET lease_owner = NULL, lease_until = NULL
                     WHERE state = 'pending' AND lease_owner = ?1",
                )
                .map_err(sql_err)?
                .execute(params![owner])
                .map_err(sql_err)?;
            Ok(n as u64)
        })
    }

    fn sent_message(
        &self,
        workspace: WorkspaceId,
        send: i64,
    ) -> StoreFuture<'_, Option<SentMessage>> {
        self.read(move |conn| sent_message(conn, workspace, send))
    }

    fn record_engagement(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
        events: Vec<CurrentsEvent>,
    ) -> StoreFuture<'_, ()> {
        let events: Appends = events.into_iter().map(|e| (Some(user), e)).collect();
        self.write(move |conn, _, _| {
            super::currents::append_events(conn, workspace, &events).map(|_| ())
        })
    }

    fn sends_since(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
        since: Millis,
    ) -> StoreFuture<'_, u64> {
        self.read(move |conn| sends_since(conn, workspace, user, since))
    }

    fn recent_sends(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
        limit: usize,
    ) -> StoreFuture<'_, Vec<UserSend>> {
        self.read(move |conn| recent_sends(conn, workspace, user, limit))
    }

    fn reschedule_dispatch(
        &self,
        workspace: WorkspaceId,
        id: &str,
        at: Millis,
    ) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        self.write(move |conn, _, _| reschedule_dispatch(conn, workspace, &id, at))
    }

    fn cancel_dispatch(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        self.write(move |conn, _, _| cancel_dispatch(conn, workspace, &id))
    }

    fn replace_adhoc_definition(
        &self,
        workspace: WorkspaceId,
        id: &str,
        definition: Value,
    ) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        let text = definition.to_string();
        self.write(move |conn, _, _| {
            conn.prepare_cached(
                "UPDATE dispatches SET definition = ?3
                 WHERE workspace_id = ?1 AND id = ?2 AND source = 'adhoc' AND not_before IS NOT NULL",
            )
            .map_err(sql_err)?
            .execute(params![workspace.0, id, text])
            .map(|n| n > 0)
            .map_err(sql_err)
        })
    }

    fn receipts_of(
        &self,
        workspace: WorkspaceId,
        user: UserSeq,
    ) -> StoreFuture<'_, Vec<ReceiptRecord>> {
        self.read(move |conn| receipts_of(conn, workspace, user))
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
        self.write(move |conn, _, _| {
            create_send_id(
                conn,
                workspace,
                &campaign_id,
                &send_id,
                now,
                day_start,
                max_per_day,
            )
        })
    }

    fn messaging_settings(&self, workspace: WorkspaceId) -> StoreFuture<'_, Option<Value>> {
        self.read(move |conn| messaging_settings(conn, workspace))
    }

    fn save_messaging_settings(
        &self,
        workspace: WorkspaceId,
        settings: Value,
    ) -> StoreFuture<'_, ()> {
        self.write(move |conn, _, _| save_messaging_settings(conn, workspace, &settings))
    }

    fn trigger_cursor(&self, workspace: WorkspaceId) -> StoreFuture<'_, TriggerCursor> {
        self.read(move |conn| trigger_cursor(conn, workspace))
    }

    fn cohort_entries(
        &self,
        workspace: WorkspaceId,
        after: i64,
        limit: usize,
    ) -> StoreFuture<'_, Vec<CohortEntry>> {
        self.read(move |conn| cohort_entries(conn, workspace, after, limit))
    }

    fn cohort_changes_head(&self, workspace: WorkspaceId) -> StoreFuture<'_, i64> {
        self.read(move |conn| {
            max_of(
                conn,
                "SELECT MAX(change_seq) FROM cohort_membership_changes WHERE workspace_id = ?1",
                workspace,
            )
        })
    }

    fn event_log_head(&self, workspace: WorkspaceId) -> StoreFuture<'_, i64> {
        self.read(move |conn| {
            max_of(
                conn,
                "SELECT MAX(seq) FROM event_log WHERE workspace_id = ?1",
                workspace,
            )
        })
    }

    fn segment_tracker(
        &self,
        workspace: WorkspaceId,
        campaign_id: &str,
        segment_id: &str,
    ) -> StoreFuture<'_, Option<SegmentTracker>> {
        let (campaign_id, segment_id) = (campaign_id.to_owned(), segment_id.to_owned());
        self.read(move |conn| segment_tracker(conn, workspace, &campaign_id, &segment_id))
    }

    fn messaging_secret(&self, candidate: [u8; 32]) -> StoreFuture<'_, [u8; 32]> {
        self.write(move |conn, _, _| messaging_secret(conn, candidate))
    }

    fn users_by_seq(
        &self,
        workspace: WorkspaceId,
        users: Vec<UserSeq>,
    ) -> StoreFuture<'_, Vec<UserRecord>> {
        Box::pin(async move {
            // Profile rows are kept behind the writer's acknowledgements: write this
            // workspace's first (as `read_unit` does), so every acknowledged write is seen.
            self.flush_workspace(workspace).await?;
            self.read(move |conn| {
                let mut reader = SqlUsers::reader(conn, workspace);
                let mut found = Vec::with_capacity(users.len());
                for seq in users {
                    if let Some(user) = reader.by_seq(seq)? {
                        found.push(user);
                    }
                }
                Ok(found)
            })
            .await
        })
    }
}
