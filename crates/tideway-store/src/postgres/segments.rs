//! [`SegmentStore`] over PostgreSQL: the `segments` table, and the profile feed a node's segment
//! index is built and kept fresh from.
//!
//! The profile of a user is what SQLite's is (`sqlite/segments.rs`): the `users` row
//! (identifiers, attributes), every custom event and purchase in `event_log` — the user's own
//! and those of the users merged into them, transitively through `user_merges` — and the
//! memberships in `cohort_members`. PostgreSQL has no write-behind: a row is current as soon as
//! its transaction commits, so neither read flushes or consults anything but the tables.
//!
//! - A **full load** ([`SegmentStore::segment_profiles`]) is six statements whatever the size of
//!   the workspace: the log heads, the merges, the cohorts, then every live user, every
//!   behaviour and every membership, each streamed. Behaviours come through the partial index
//!   `event_log_user_behaviors` in `(user_seq, seq)` order, so each user's arrive in log order
//!   (purchases are summed in it) without sorting the log; only the few users with others
//!   merged into them have theirs gathered and put back into log order.
//! - The **feed** after a position ([`SegmentStore::segment_profile_changes`]) is incremental:
//!   custom events and purchases logged after it become occurrences in log order; users named
//!   by any other `event_log` row after it (profile update, delete, orphan) or by
//!   `segment_user_changes` after it (creation and identifier changes, which log no event) get
//!   their current attributes from their row, or are removed if it is gone or a tombstone; a
//!   merge's survivor (named by the loser's `users.UserOrphan` event) is reloaded whole; and
//!   `cohort_membership_changes` after it are deltas.
//!
//! **Positions.** Each call runs in one `REPEATABLE READ READ ONLY` transaction, and the
//! position it returns is the largest seq of each log visible in that snapshot. Per-workspace
//! seqs are handed out in commit order (`sequence.rs`), so every entry at or below it is in the
//! snapshot and none can commit there later: the data read and the position agree exactly, and
//! the next call, reading after the position, misses nothing. [`SegmentStore::segment_feed_head`]
//! is the same three maxima in one statement (one snapshot).
//!
//! Rows come through portals (cursors of the transaction) `BATCH` at a time, so memory holds one
//! batch, not a result set; decoding (profiles, event bodies) runs on the blocking pool while
//! the next batch streams in, since a million-user load would otherwise hold an async worker
//! thread for seconds. Measured here (2 cores shared with the server; release build): 1 M users,
//! 3 M custom events and purchases and 500 k memberships load in about 10 s with a warm cache,
//! 15 s cold; receiving the event bodies takes about half of it and decoding the profiles most
//! of the rest.

use std::collections::{BTreeSet, HashMap, HashSet};

use deadpool_postgres::{GenericClient, Transaction};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use tideway_core::clock::Millis;
use tideway_core::currents::EventType;
use tideway_core::ids::{BrazeId, Email, ExternalId, Phone, UserSeq, WorkspaceId};
use tideway_core::profile::UserRecord;
use tideway_core::segments::{
    Behavior, CohortDelta, FeedPosition, Occurrence, ProfileChanges, ProfileSnapshot, Segment,
    SegmentUser, base_profile,
};
use tideway_core::store::{DefinitionsLock, SegmentStore, StoreError, StoreFuture};
use tideway_segment::{PurchaseRecord, SegmentProfile};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

use super::admin::workspace_write_err;
use super::{PgClient, PgStore, pg_err};
use crate::profile_codec;
use crate::sqlite::segments::behavior;

/// One statement parameter.
type Param<'a> = &'a (dyn ToSql + Sync);

const SEGMENT_COLUMNS: &str = "id, name, filter, created_at, updated_at";

const USER_COLUMNS: &str =
    "seq, braze_id, external_id, email, phone, created_at, updated_at, profile";

/// The `event_log` types segment profiles are made of. Written exactly as the predicate of the
/// partial index `event_log_user_behaviors`, so the planner can use it.
const BEHAVIOR_TYPES: &str = "('users.behaviors.CustomEvent', 'users.behaviors.Purchase')";

/// Rows decoded per blocking task: large enough that handing a batch over costs nothing next to
/// decoding it, small enough to keep the next one streaming meanwhile.
const BATCH: usize = 4096;
const BATCH_ROWS: i32 = BATCH as i32;

/// A merge chain longer than this is damaged data (a cycle); following stops there rather than
/// hang, as in SQLite.
const MAX_MERGE_HOPS: usize = 64;

fn segment_from_row(row: &Row) -> Result<Segment, StoreError> {
    let id: String = row.try_get(0).map_err(pg_err)?;
    let text: String = row.try_get(2).map_err(pg_err)?;
    let filter = serde_json::from_str(&text)
        .map_err(|e| StoreError::Corrupt(format!("segment {id}: filter: {e}")))?;
    Ok(Segment {
        id,
        name: row.try_get(1).map_err(pg_err)?,
        filter,
        created_at: Millis(row.try_get(3).map_err(pg_err)?),
        updated_at: Millis(row.try_get(4).map_err(pg_err)?),
    })
}

/// A user seq as stored (`bigint`) to the index's dense `u32`.
fn user_seq(value: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{what} {value} is not a user seq")))
}

/// The user record in `USER_COLUMNS`. Errors name the column and the user, never the value
/// (identifiers are personal data and errors are logged).
fn record_from_row(row: &Row) -> Result<UserRecord, StoreError> {
    let seq = user_seq(row.try_get(0).map_err(pg_err)?, "users.seq")?;
    let bad = |column: &str| StoreError::Corrupt(format!("users.{column} of user {seq}"));
    let text = |i: usize| -> Result<Option<String>, StoreError> { row.try_get(i).map_err(pg_err) };
    let braze_id: String = row.try_get(1).map_err(pg_err)?;
    let profile: String = row.try_get(7).map_err(pg_err)?;
    Ok(UserRecord {
        seq: UserSeq(seq),
        braze_id: BrazeId::parse(&braze_id).map_err(|_| bad("braze_id"))?,
        external_id: text(2)?
            .map(|s| ExternalId::parse(&s))
            .transpose()
            .map_err(|_| bad("external_id"))?,
        email: text(3)?
            .map(|s| Email::parse(&s))
            .transpose()
            .map_err(|_| bad("email"))?,
        phone: text(4)?
            .map(|s| Phone::parse(&s))
            .transpose()
            .map_err(|_| bad("phone"))?,
        created_at: Millis(row.try_get(5).map_err(pg_err)?),
        updated_at: Millis(row.try_get(6).map_err(pg_err)?),
        profile: profile_codec::decode(&profile)?,
    })
}

fn segment_user(record: UserRecord) -> SegmentUser {
    SegmentUser {
        profile: base_profile(&record),
        braze_id: record.braze_id,
    }
}

fn add_behavior(profile: &mut SegmentProfile, behavior: Behavior) {
    match behavior {
        Behavior::Event { name, time } => profile.events.entry(name).or_default().record(time),
        Behavior::Purchase(p) => profile.purchases.push(p),
    }
}

/// The custom event or purchase a logged body records, as `sqlite::segments::behavior` (the
/// definition) decodes it, without building a JSON tree for the common body: a full load
/// decodes every behaviour ever logged, and a tree costs about nine times a pass that only
/// picks out `properties.name`, `properties.product_id` and `properties.price`. A body the
/// quick pass does not take (an escaped string, a field of another type, `properties` not an
/// object, malformed JSON) goes to the definition, so the answer is the same either way for
/// every body Tideway writes. (The quick pass skips the other fields without checking that
/// their numbers fit an f64 or that their `\u` escapes pair up, as a tree would; the event
/// encoders never write either.)
fn decode_behavior(event_type: &str, time: i64, body: &str) -> Option<Behavior> {
    let custom = event_type == EventType::CustomEvent.as_str();
    if !custom && event_type != EventType::Purchase.as_str() {
        return None;
    }
    let Ok(LoggedBody(properties)) = serde_json::from_str::<LoggedBody<'_>>(body) else {
        return behavior(event_type, time, body);
    };
    // No `properties`: `Value`'s index gives null, whose fields are absent.
    let properties = properties?;
    if custom {
        Some(Behavior::Event {
            name: properties.name?.to_owned(),
            time,
        })
    } else {
        Some(Behavior::Purchase(PurchaseRecord {
            product_id: properties.product_id?.to_owned(),
            time,
            price: properties.price.unwrap_or(0.0),
        }))
    }
}

/// A logged body's `properties`, if it has them. Read as a map only (serde's derived structs
/// would also take an array, which `Value` indexing treats as having no fields), and the last
/// of repeated keys wins, as in a `Value`.
struct LoggedBody<'a>(Option<LoggedProperties<'a>>);

/// The fields of `properties` a profile needs, borrowed from the body (a string with escapes
/// does not borrow: the quick pass fails and the definition decodes it).
#[derive(Default)]
struct LoggedProperties<'a> {
    name: Option<&'a str>,
    product_id: Option<&'a str>,
    price: Option<f64>,
}

impl<'de> Deserialize<'de> for LoggedBody<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = LoggedBody<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an event body object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut properties = None;
                while let Some(key) = map.next_key::<&'de str>()? {
                    if key == "properties" {
                        properties = Some(map.next_value::<LoggedProperties<'de>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(LoggedBody(properties))
            }
        }
        deserializer.deserialize_map(BodyVisitor)
    }
}

impl<'de> Deserialize<'de> for LoggedProperties<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PropertiesVisitor;
        impl<'de> Visitor<'de> for PropertiesVisitor {
            type Value = LoggedProperties<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an event's properties object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut properties = LoggedProperties::default();
                while let Some(key) = map.next_key::<&'de str>()? {
                    match key {
                        "name" => properties.name = map.next_value()?,
                        "product_id" => properties.product_id = map.next_value()?,
                        "price" => properties.price = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(properties)
            }
        }
        deserializer.deserialize_map(PropertiesVisitor)
    }
}

/// The user whose history `seq`'s now belongs to, following merges (A into B, B into C: C).
fn survivor(merged_into: &HashMap<u32, u32>, mut seq: u32) -> u32 {
    for _ in 0..MAX_MERGE_HOPS {
        match merged_into.get(&seq) {
            Some(&into) => seq = into,
            None => break,
        }
    }
    seq
}

/// A repeatable-read, read-only transaction: every statement of the call sees one snapshot.
async fn snapshot_tx(
    client: &mut PgClient,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_err)
}

// `ORDER BY … DESC LIMIT 1`, not `MAX(…)`: the planner turns MAX into that backward probe only
// when it believes the workspace has rows; for a workspace younger than the last ANALYZE it
// aggregated over every entry instead (16–31 ms for 50 k events, on every catch-up).
const HEADS: &str = "SELECT
    COALESCE((SELECT seq FROM event_log WHERE workspace_id = $1
              ORDER BY seq DESC LIMIT 1), 0),
    COALESCE((SELECT change_seq FROM cohort_membership_changes WHERE workspace_id = $1
              ORDER BY change_seq DESC LIMIT 1), 0),
    COALESCE((SELECT change_seq FROM segment_user_changes WHERE workspace_id = $1
              ORDER BY change_seq DESC LIMIT 1), 0)";

/// The workspace's log heads as one statement sees them (each an index's last entry).
async fn heads(
    client: &impl GenericClient,
    workspace: WorkspaceId,
) -> Result<FeedPosition, StoreError> {
    let statement = client.prepare_cached(HEADS).await.map_err(pg_err)?;
    let row = client
        .query_one(&statement, &[&workspace.0])
        .await
        .map_err(pg_err)?;
    Ok(FeedPosition {
        event_seq: row.try_get(0).map_err(pg_err)?,
        cohort_change_seq: row.try_get(1).map_err(pg_err)?,
        user_change_seq: row.try_get(2).map_err(pg_err)?,
    })
}

/// Who each merged-away user of the workspace was merged into.
async fn merges(
    tx: &Transaction<'_>,
    workspace: WorkspaceId,
) -> Result<HashMap<u32, u32>, StoreError> {
    let statement = tx
        .prepare_cached("SELECT from_seq, into_seq FROM user_merges WHERE workspace_id = $1")
        .await
        .map_err(pg_err)?;
    let rows = tx
        .query(&statement, &[&workspace.0])
        .await
        .map_err(pg_err)?;
    rows.iter()
        .map(|r| {
            Ok((
                user_seq(r.try_get(0).map_err(pg_err)?, "user_merges.from_seq")?,
                user_seq(r.try_get(1).map_err(pg_err)?, "user_merges.into_seq")?,
            ))
        })
        .collect()
}

/// `(partner, cohort_id)` of each of the workspace's cohorts by its row id: memberships and
/// deltas are read as ids and named here, rather than carrying two strings on every row.
async fn cohort_names(
    tx: &Transaction<'_>,
    workspace: WorkspaceId,
) -> Result<HashMap<i64, (String, String)>, StoreError> {
    let statement = tx
        .prepare_cached("SELECT id, partner, cohort_id FROM cohorts WHERE workspace_id = $1")
        .await
        .map_err(pg_err)?;
    let rows = tx
        .query(&statement, &[&workspace.0])
        .await
        .map_err(pg_err)?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0).map_err(pg_err)?,
                (r.try_get(1).map_err(pg_err)?, r.try_get(2).map_err(pg_err)?),
            ))
        })
        .collect()
}

/// Runs `sql` in `tx` and folds its rows into `state` with `apply`, a batch at a time on the
/// blocking pool. The rows come through a portal (a cursor of the transaction), `BATCH` at a
/// time, and the next batch is fetched while one is decoded.
async fn fold_rows<S: Send + 'static>(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[Param<'_>],
    state: S,
    apply: fn(S, Vec<Row>) -> Result<S, StoreError>,
) -> Result<S, StoreError> {
    let statement = tx.prepare_cached(sql).await.map_err(pg_err)?;
    let portal = tx.bind(&statement, params).await.map_err(pg_err)?;
    let fetch = || async { tx.query_portal(&portal, BATCH_ROWS).await.map_err(pg_err) };
    let mut state = state;
    let mut batch = fetch().await?;
    while !batch.is_empty() {
        // A short batch was the last one: no round trip to learn that the portal is empty.
        let more = batch.len() == BATCH;
        let decoding = tokio::task::spawn_blocking(move || apply(state, batch));
        let next = if more { fetch().await } else { Ok(Vec::new()) };
        state = decoding.await.map_err(join_err)??;
        batch = next?;
    }
    Ok(state)
}

/// A decoding task that did not finish: a panic in it is a bug and goes on unwinding here; a
/// cancellation means the runtime is shutting down.
fn join_err(e: tokio::task::JoinError) -> StoreError {
    if e.is_panic() {
        std::panic::resume_unwind(e.into_panic());
    }
    StoreError::Unavailable("a segment profile read was cancelled".to_owned())
}

/// A full load in progress.
struct FullLoad {
    users: HashMap<u32, SegmentUser>,
    merged_into: HashMap<u32, u32>,
    /// Survivors with users merged into them. Behaviours arrive by `(user_seq, seq)`, so such a
    /// user's come as their own, then each loser's: they are gathered here as
    /// `(user, log seq, behaviour)` and added in log order at the end.
    families: HashSet<u32>,
    gathered: Vec<(u32, i64, Behavior)>,
    cohorts: HashMap<i64, (String, String)>,
}

impl FullLoad {
    fn users(mut self, rows: Vec<Row>) -> Result<Self, StoreError> {
        for row in &rows {
            let user = segment_user(record_from_row(row)?);
            self.users.insert(user.profile.uid, user);
        }
        Ok(self)
    }

    /// Rows: `user_seq, seq, event_type, time, body`, by `(user_seq, seq)`.
    fn behaviors(mut self, rows: Vec<Row>) -> Result<Self, StoreError> {
        for row in &rows {
            let user = survivor(
                &self.merged_into,
                user_seq(row.try_get(0).map_err(pg_err)?, "event_log.user_seq")?,
            );
            // A deleted user's history is not decoded at all.
            let Some(profile) = self.users.get_mut(&user).map(|u| &mut u.profile) else {
                continue;
            };
            let event_type: &str = row.try_get(2).map_err(pg_err)?;
            let time: i64 = row.try_get(3).map_err(pg_err)?;
            let body: &str = row.try_get(4).map_err(pg_err)?;
            let Some(behavior) = decode_behavior(event_type, time, body) else {
                continue;
            };
            if self.families.contains(&user) {
                let seq: i64 = row.try_get(1).map_err(pg_err)?;
                self.gathered.push((user, seq, behavior));
            } else {
                add_behavior(profile, behavior);
            }
        }
        Ok(self)
    }

    /// Rows: `seq, cohort`.
    fn memberships(mut self, rows: Vec<Row>) -> Result<Self, StoreError> {
        for row in &rows {
            let user = user_seq(row.try_get(0).map_err(pg_err)?, "cohort_members.seq")?;
            let cohort: i64 = row.try_get(1).map_err(pg_err)?;
            if let (Some(user), Some(name)) = (self.users.get_mut(&user), self.cohorts.get(&cohort))
            {
                user.profile.cohorts.insert(name.clone());
            }
        }
        Ok(self)
    }

    fn finish(mut self, position: FeedPosition) -> ProfileSnapshot {
        self.gathered.sort_by_key(|(user, seq, _)| (*user, *seq));
        for (user, _, behavior) in self.gathered {
            if let Some(u) = self.users.get_mut(&user) {
                add_behavior(&mut u.profile, behavior);
            }
        }
        let mut users: Vec<SegmentUser> = self.users.into_values().collect();
        users.sort_by_key(|u| u.profile.uid);
        ProfileSnapshot { users, position }
    }
}

/// Every live user of the workspace with events, purchases and cohorts, and the position.
async fn full_load(store: &PgStore, workspace: WorkspaceId) -> Result<ProfileSnapshot, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = snapshot_tx(&mut client).await?;
    let position = heads(&tx, workspace).await?;
    let merged_into = merges(&tx, workspace).await?;
    let families = merged_into
        .keys()
        .map(|&from| survivor(&merged_into, from))
        .collect();
    let load = FullLoad {
        users: HashMap::new(),
        merged_into,
        families,
        gathered: Vec::new(),
        cohorts: cohort_names(&tx, workspace).await?,
    };
    // No statement needs `seq <= position`: the snapshot the heads came from bounds them all.
    let ws: Param<'_> = &workspace.0;
    let load = fold_rows(
        &tx,
        &format!("SELECT {USER_COLUMNS} FROM users WHERE workspace_id = $1 AND deleted_at IS NULL"),
        &[ws],
        load,
        FullLoad::users,
    )
    .await?;
    let load = fold_rows(
        &tx,
        &format!(
            "SELECT user_seq, seq, event_type, time, body FROM event_log
             WHERE workspace_id = $1 AND user_seq IS NOT NULL AND event_type IN {BEHAVIOR_TYPES}
             ORDER BY user_seq, seq"
        ),
        &[ws],
        load,
        FullLoad::behaviors,
    )
    .await?;
    let load = fold_rows(
        &tx,
        "SELECT seq, cohort FROM cohort_members WHERE workspace_id = $1",
        &[ws],
        load,
        FullLoad::memberships,
    )
    .await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(load.finish(position))
}

/// The feed's reading of `event_log` after a position.
#[derive(Default)]
struct LogRead {
    occurrences: Vec<Occurrence>,
    /// Users whose attributes to send (or who are gone).
    named: BTreeSet<u32>,
    /// Merge survivors by braze_id, to reload whole.
    survivors: BTreeSet<String>,
}

impl LogRead {
    /// Rows: `user_seq, event_type, time, body` (body only where it is read), in log order.
    fn rows(mut self, rows: Vec<Row>) -> Result<Self, StoreError> {
        for row in &rows {
            let user = user_seq(row.try_get(0).map_err(pg_err)?, "event_log.user_seq")?;
            let event_type: &str = row.try_get(1).map_err(pg_err)?;
            let time: i64 = row.try_get(2).map_err(pg_err)?;
            let body: Option<&str> = row.try_get(3).map_err(pg_err)?;
            if event_type == EventType::CustomEvent.as_str()
                || event_type == EventType::Purchase.as_str()
            {
                if let Some(behavior) =
                    body.and_then(|body| decode_behavior(event_type, time, body))
                {
                    self.occurrences.push(Occurrence {
                        user: UserSeq(user),
                        behavior,
                    });
                }
                continue;
            }
            if event_type == EventType::UserOrphan.as_str()
                && let Some(Ok(body)) = body.map(serde_json::from_str::<Value>)
                && let Some(into) = body["properties"]["orphaned_by_id"].as_str()
            {
                self.survivors.insert(into.to_owned());
            }
            self.named.insert(user);
        }
        Ok(self)
    }
}

/// Cohort deltas after a position, named by [`cohort_names`].
struct DeltaRead {
    cohorts: HashMap<i64, (String, String)>,
    deltas: Vec<CohortDelta>,
}

impl DeltaRead {
    /// Rows: `seq, cohort, entered`, in change order. A delta of a cohort that no longer exists
    /// is dropped, as its members' memberships were (`ON DELETE CASCADE`).
    fn rows(mut self, rows: Vec<Row>) -> Result<Self, StoreError> {
        for row in &rows {
            let user = user_seq(
                row.try_get(0).map_err(pg_err)?,
                "cohort_membership_changes.seq",
            )?;
            let cohort: i64 = row.try_get(1).map_err(pg_err)?;
            if let Some((partner, cohort_id)) = self.cohorts.get(&cohort) {
                self.deltas.push(CohortDelta {
                    user: UserSeq(user),
                    partner: partner.clone(),
                    cohort_id: cohort_id.clone(),
                    entered: row.try_get(2).map_err(pg_err)?,
                });
            }
        }
        Ok(self)
    }
}

/// Current records by seq.
fn records(
    mut found: HashMap<u32, UserRecord>,
    rows: Vec<Row>,
) -> Result<HashMap<u32, UserRecord>, StoreError> {
    for row in &rows {
        let record = record_from_row(row)?;
        found.insert(record.seq.0, record);
    }
    Ok(found)
}

/// Merge survivors reloaded whole: the users (attributes) first, then their behaviours and
/// cohorts.
struct Reload {
    users: HashMap<u32, SegmentUser>,
    cohorts: HashMap<i64, (String, String)>,
}

impl Reload {
    /// Rows: `root, event_type, time, body`, by `(root, seq)`: each survivor's own behaviours
    /// and those of everyone merged into it, in log order.
    fn behaviors(mut self, rows: Vec<Row>) -> Result<Self, StoreError> {
        for row in &rows {
            let user = user_seq(row.try_get(0).map_err(pg_err)?, "user_merges.into_seq")?;
            let event_type: &str = row.try_get(1).map_err(pg_err)?;
            let time: i64 = row.try_get(2).map_err(pg_err)?;
            let body: &str = row.try_get(3).map_err(pg_err)?;
            if let (Some(u), Some(behavior)) = (
                self.users.get_mut(&user),
                decode_behavior(event_type, time, body),
            ) {
                add_behavior(&mut u.profile, behavior);
            }
        }
        Ok(self)
    }

    /// Rows: `seq, cohort`.
    fn memberships(mut self, rows: Vec<Row>) -> Result<Self, StoreError> {
        for row in &rows {
            let user = user_seq(row.try_get(0).map_err(pg_err)?, "cohort_members.seq")?;
            let cohort: i64 = row.try_get(1).map_err(pg_err)?;
            if let (Some(u), Some(name)) = (self.users.get_mut(&user), self.cohorts.get(&cohort)) {
                u.profile.cohorts.insert(name.clone());
            }
        }
        Ok(self)
    }
}

/// What changed after `after` (see the module documentation).
async fn changes(
    store: &PgStore,
    workspace: WorkspaceId,
    after: FeedPosition,
) -> Result<ProfileChanges, StoreError> {
    let mut client = store.pool.client().await?;
    let tx = snapshot_tx(&mut client).await?;
    let head = heads(&tx, workspace).await?;
    // Per log, never behind the caller: a position ahead of the store (a restored database)
    // reads nothing rather than going back.
    let position = FeedPosition {
        event_seq: head.event_seq.max(after.event_seq),
        cohort_change_seq: head.cohort_change_seq.max(after.cohort_change_seq),
        user_change_seq: head.user_change_seq.max(after.user_change_seq),
    };
    let mut out = ProfileChanges {
        position,
        ..ProfileChanges::default()
    };
    if position == after {
        tx.commit().await.map_err(pg_err)?;
        return Ok(out);
    }
    let ws: Param<'_> = &workspace.0;
    let mut log = LogRead::default();
    if position.event_seq > after.event_seq {
        // Bodies only where they are read: behaviours, and the orphan naming its survivor.
        log = fold_rows(
            &tx,
            &format!(
                "SELECT user_seq, event_type, time,
                        CASE WHEN event_type IN {BEHAVIOR_TYPES} OR event_type = 'users.UserOrphan'
                             THEN body END
                 FROM event_log
                 WHERE workspace_id = $1 AND seq > $2 AND seq <= $3 AND user_seq IS NOT NULL
                 ORDER BY seq"
            ),
            &[ws, &after.event_seq, &position.event_seq],
            log,
            LogRead::rows,
        )
        .await?;
    }
    out.occurrences = std::mem::take(&mut log.occurrences);
    let mut named = log.named;
    if position.user_change_seq > after.user_change_seq {
        let statement = tx
            .prepare_cached(
                "SELECT DISTINCT seq FROM segment_user_changes
                 WHERE workspace_id = $1 AND change_seq > $2 AND change_seq <= $3",
            )
            .await
            .map_err(pg_err)?;
        let rows = tx
            .query(
                &statement,
                &[ws, &after.user_change_seq, &position.user_change_seq],
            )
            .await
            .map_err(pg_err)?;
        for row in &rows {
            named.insert(user_seq(
                row.try_get(0).map_err(pg_err)?,
                "segment_user_changes.seq",
            )?);
        }
    }
    let mut cohorts = None;
    if position.cohort_change_seq > after.cohort_change_seq {
        let read = DeltaRead {
            cohorts: cohort_names(&tx, workspace).await?,
            deltas: Vec::new(),
        };
        let read = fold_rows(
            &tx,
            "SELECT seq, cohort, entered FROM cohort_membership_changes
             WHERE workspace_id = $1 AND change_seq > $2 AND change_seq <= $3
             ORDER BY change_seq",
            &[ws, &after.cohort_change_seq, &position.cohort_change_seq],
            read,
            DeltaRead::rows,
        )
        .await?;
        out.cohort_deltas = read.deltas;
        cohorts = Some(read.cohorts);
    }
    let mut reload: BTreeSet<u32> = BTreeSet::new();
    if !log.survivors.is_empty() {
        let braze_ids: Vec<&str> = log.survivors.iter().map(String::as_str).collect();
        let statement = tx
            .prepare_cached("SELECT seq FROM users WHERE workspace_id = $1 AND braze_id = ANY($2)")
            .await
            .map_err(pg_err)?;
        let rows = tx
            .query(&statement, &[ws, &braze_ids])
            .await
            .map_err(pg_err)?;
        for row in &rows {
            reload.insert(user_seq(row.try_get(0).map_err(pg_err)?, "users.seq")?);
        }
    }
    named.extend(&reload);
    let mut current = HashMap::new();
    if !named.is_empty() {
        let seqs: Vec<i64> = named.iter().map(|&s| i64::from(s)).collect();
        current = fold_rows(
            &tx,
            &format!(
                "SELECT {USER_COLUMNS} FROM users
                 WHERE workspace_id = $1 AND seq = ANY($2) AND deleted_at IS NULL"
            ),
            &[ws, &seqs],
            current,
            records,
        )
        .await?;
    }
    out.removed = named
        .iter()
        .filter(|seq| !current.contains_key(seq))
        .map(|&seq| UserSeq(seq))
        .collect();
    reload.retain(|seq| current.contains_key(seq));
    if !reload.is_empty() {
        let cohorts = match cohorts {
            Some(cohorts) => cohorts,
            None => cohort_names(&tx, workspace).await?,
        };
        let users = reload
            .iter()
            .filter_map(|seq| current.remove(seq))
            .map(|record| (record.seq.0, segment_user(record)))
            .collect();
        let reload: Vec<i64> = reload.iter().map(|&seq| i64::from(seq)).collect();
        let whole = Reload { users, cohorts };
        // Each survivor with everyone merged into it (transitively; UNION stops at a cycle).
        let whole = fold_rows(
            &tx,
            &format!(
                "WITH RECURSIVE family (root, member) AS (
                     SELECT s, s FROM unnest($2::bigint[]) AS s
                     UNION
                     SELECT f.root, m.from_seq FROM user_merges m JOIN family f ON m.into_seq = f.member
                     WHERE m.workspace_id = $1
                 )
                 SELECT f.root, e.event_type, e.time, e.body
                 FROM family f JOIN event_log e ON e.workspace_id = $1 AND e.user_seq = f.member
                 WHERE e.event_type IN {BEHAVIOR_TYPES}
                 ORDER BY f.root, e.seq"
            ),
            &[ws, &reload],
            whole,
            Reload::behaviors,
        )
        .await?;
        let whole = fold_rows(
            &tx,
            "SELECT seq, cohort FROM cohort_members WHERE workspace_id = $1 AND seq = ANY($2)",
            &[ws, &reload],
            whole,
            Reload::memberships,
        )
        .await?;
        let mut users: Vec<SegmentUser> = whole.users.into_values().collect();
        users.sort_by_key(|u| u.profile.uid);
        out.users = users;
    }
    tx.commit().await.map_err(pg_err)?;
    let mut attributes: Vec<UserRecord> = current.into_values().collect();
    attributes.sort_by_key(|r| r.seq);
    out.attributes = attributes.into_iter().map(segment_user).collect();
    Ok(out)
}

/// Key class of the session-level advisory lock that is a workspace's segment definitions
/// lock ("tdsg" in ASCII); the second key is the workspace.
const DEFINITIONS_LOCK_CLASS: i32 = 0x7464_7367;

/// The advisory lock's second key. Workspaces beyond 2^31 share keys with others: their
/// segment changes only wait for each other more.
fn definitions_lock_key(workspace: WorkspaceId) -> i32 {
    i32::try_from(workspace.0.rem_euclid(i64::from(i32::MAX))).unwrap_or_default()
}

/// The pooled connection whose session holds a workspace's segment definitions lock. Dropped,
/// it unlocks and goes back to the pool; if it cannot (no runtime, or the unlock fails), the
/// connection is closed instead, which releases the lock just as well.
struct HeldDefinitions {
    client: Option<super::PgClient>,
    workspace: WorkspaceId,
}

impl Drop for HeldDefinitions {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let key = definitions_lock_key(self.workspace);
        // Until the unlock is confirmed the connection is closed rather than pooled, also if
        // the task never runs to its end (the runtime shutting down).
        let mut unlocking = Unpooled(Some(client));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let Some(client) = unlocking.0.as_ref() else {
                        return;
                    };
                    let unlocked = client
                        .query_one(
                            "SELECT pg_advisory_unlock($1, $2)",
                            &[&DEFINITIONS_LOCK_CLASS, &key],
                        )
                        .await
                        .is_ok_and(|row| row.try_get::<_, bool>(0).unwrap_or(false));
                    if unlocked {
                        // Back to the pool, unlocked.
                        drop(unlocking.0.take());
                    }
                });
            }
            Err(_) => drop(unlocking),
        }
    }
}

/// A pooled connection that is closed, not given back to the pool, if dropped while it holds
/// it: closing the session releases its advisory locks.
struct Unpooled(Option<super::PgClient>);

impl Drop for Unpooled {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Client::take(client));
        }
    }
}

impl SegmentStore for PgStore {
    fn create_segment(&self, workspace: WorkspaceId, segment: Segment) -> StoreFuture<'_, Segment> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            client
                .execute(
                    "INSERT INTO segments (workspace_id, id, name, filter, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &workspace.0,
                        &segment.id,
                        &segment.name,
                        &segment.filter.to_string(),
                        &segment.created_at.0,
                        &segment.updated_at.0,
                    ],
                )
                .await
                .map_err(|e| workspace_write_err(workspace, e))?;
            Ok(segment)
        })
    }

    fn segment(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, Option<Segment>> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(None) });
        }
        Box::pin(async move {
            let client = self.pool.client().await?;
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {SEGMENT_COLUMNS} FROM segments WHERE workspace_id = $1 AND id = $2"
                ))
                .await
                .map_err(pg_err)?;
            let row = client
                .query_opt(&statement, &[&workspace.0, &id])
                .await
                .map_err(pg_err)?;
            row.as_ref().map(segment_from_row).transpose()
        })
    }

    fn list_segments(&self, workspace: WorkspaceId) -> StoreFuture<'_, Vec<Segment>> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            let statement = client
                .prepare_cached(&format!(
                    "SELECT {SEGMENT_COLUMNS} FROM segments WHERE workspace_id = $1
                     ORDER BY created_at, id"
                ))
                .await
                .map_err(pg_err)?;
            let rows = client
                .query(&statement, &[&workspace.0])
                .await
                .map_err(pg_err)?;
            rows.iter().map(segment_from_row).collect()
        })
    }

    fn update_segment(
        &self,
        workspace: WorkspaceId,
        id: &str,
        name: String,
        filter: Value,
        now: Millis,
    ) -> StoreFuture<'_, Option<Segment>> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(None) });
        }
        Box::pin(async move {
            let client = self.pool.client().await?;
            let row = client
                .query_opt(
                    &format!(
                        "UPDATE segments SET name = $3, filter = $4, updated_at = $5
                         WHERE workspace_id = $1 AND id = $2 RETURNING {SEGMENT_COLUMNS}"
                    ),
                    &[&workspace.0, &id, &name, &filter.to_string(), &now.0],
                )
                .await
                .map_err(pg_err)?;
            row.as_ref().map(segment_from_row).transpose()
        })
    }

    fn delete_segment(&self, workspace: WorkspaceId, id: &str) -> StoreFuture<'_, bool> {
        let id = id.to_owned();
        if super::names_nothing(&id) {
            return Box::pin(async { Ok(false) });
        }
        Box::pin(async move {
            let client = self.pool.client().await?;
            let n = client
                .execute(
                    "DELETE FROM segments WHERE workspace_id = $1 AND id = $2",
                    &[&workspace.0, &id],
                )
                .await
                .map_err(pg_err)?;
            Ok(n > 0)
        })
    }

    fn lock_segment_definitions(&self, workspace: WorkspaceId) -> StoreFuture<'_, DefinitionsLock> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            client
                .execute(
                    "SELECT pg_advisory_lock($1, $2)",
                    &[&DEFINITIONS_LOCK_CLASS, &definitions_lock_key(workspace)],
                )
                .await
                .map_err(pg_err)?;
            Ok(DefinitionsLock::new(HeldDefinitions {
                client: Some(client),
                workspace,
            }))
        })
    }

    fn segment_profiles(&self, workspace: WorkspaceId) -> StoreFuture<'_, ProfileSnapshot> {
        Box::pin(full_load(self, workspace))
    }

    fn segment_profile_changes(
        &self,
        workspace: WorkspaceId,
        after: FeedPosition,
    ) -> StoreFuture<'_, ProfileChanges> {
        Box::pin(changes(self, workspace, after))
    }

    fn segment_feed_head(&self, workspace: WorkspaceId) -> StoreFuture<'_, FeedPosition> {
        Box::pin(async move {
            let client = self.pool.client().await?;
            heads(&client, workspace).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick pass answers as the definition on bodies of every shape it must hand over or
    /// read alike.
    #[test]
    fn the_quick_decoding_agrees_with_the_definition() {
        let bodies = [
            r#"{"id":"e","user":{"user_id":"u"},"properties":{"name":"open","properties":{"name":"inner"}},"time":1}"#,
            r#"{"properties":{"product_id":"p1","price":9.5,"currency":"USD"}}"#,
            r#"{"properties":{"product_id":"p1","price":3}}"#,
            r#"{"properties":{"product_id":"p1","price":-2}}"#,
            r#"{"properties":{"product_id":"p1","price":18446744073709551615}}"#,
            r#"{"properties":{"product_id":"p1"}}"#,
            r#"{"properties":{"product_id":"p1","price":null}}"#,
            r#"{"properties":{"product_id":"p1","price":"9.5"}}"#,
            r#"{"properties":{"name":"a\"quoted\" \u00e9vent","product_id":"p\u0031"}}"#,
            r#"{"properties":{"name":"first","name":"last","product_id":"a","product_id":"b"}}"#,
            r#"{"properties":{"name":"x"},"properties":{"name":"y"}}"#,
            r#"{"properties":[],"properties":{"name":"after an array"}}"#,
            r#"{"properties":{"name":"before null"},"properties":null}"#,
            r#"{"properties":{"name":7,"product_id":false}}"#,
            r#"{"properties":{"name":null}}"#,
            r#"{"properties":["open","p1",9.5]}"#,
            r#"[{"name":"open","product_id":"p1"}]"#,
            r#"{"properties":"open"}"#,
            r#"{"properties":null}"#,
            r#"{"id":"no properties"}"#,
            r#"{"properties":{"name":"open"}} trailing"#,
            r#"{"properties":{"name":"open""#,
            "",
            "null",
            r#"  {  "properties" : { "name" : "spaced" , "price" : 1e2 }  }  "#,
        ];
        for body in bodies {
            for event_type in [
                EventType::CustomEvent.as_str(),
                EventType::Purchase.as_str(),
                EventType::UserOrphan.as_str(),
            ] {
                assert_eq!(
                    decode_behavior(event_type, 42, body),
                    behavior(event_type, 42, body),
                    "{event_type} {body}"
                );
            }
        }
        // The common bodies take the quick pass (the ones above it hands over are for the
        // definition to decide).
        for quick in [0, 1, 2, 3, 4, 5, 6, 9, 10, 24] {
            assert!(
                serde_json::from_str::<LoggedBody<'_>>(bodies[quick]).is_ok(),
                "{quick}"
            );
        }
        assert_eq!(
            decode_behavior(EventType::CustomEvent.as_str(), 42, bodies[0]),
            Some(Behavior::Event {
                name: "open".into(),
                time: 42
            })
        );
    }
}
