//! Query plans the indexes were made for, read back from each database's planner: the
//! dashboard's user lookup reads a user's newest sends (`MessagingStore::recent_sends`) from
//! `sends_user_recent` (SQLite migration 15, PostgreSQL migration 7) — never a scan of every
//! send in the workspace, never a sort.
//!
//! The statements are copies of the ones `recent_sends` prepares (`sqlite/messaging.rs`,
//! `postgres/messaging.rs`); each test also runs `recent_sends` on the same rows, so a copy that
//! drifted from what the store returns shows up here.

use tideway_core::clock::Millis;
use tideway_core::ids::UserSeq;
use tideway_core::store::prelude::*;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::pg::TestDb;

const NOW: Millis = Millis(1_750_000_000_000);

/// Users and sends per user the tables are filled with: enough that reading one user's sends
/// through any other index (or the table) is the costlier plan.
const USERS: i64 = 200;
const SENDS_PER_USER: i64 = 50;
/// The user whose recent sends are asked for, and how many (the lookup page's 20).
const USER: u32 = 7;
const LIMIT: i64 = 20;

/// `recent_sends`'s statement on SQLite.
const SQLITE_RECENT_SENDS: &str =
    "SELECT s.id, s.dispatch_id, d.source, d.campaign_id, d.definition, s.variant,
        s.state, s.due_at, s.sent_at, s.attempts
 FROM sends s
 LEFT JOIN dispatches d ON d.workspace_id = s.workspace_id AND d.id = s.dispatch_id
 WHERE s.workspace_id = ?1 AND s.user_seq = ?2
 ORDER BY s.id DESC LIMIT ?3";

/// `recent_sends`'s statement on PostgreSQL.
const PG_RECENT_SENDS: &str =
    "SELECT s.id, s.dispatch_id, d.source, d.campaign_id, d.definition, s.variant,
        s.state, s.due_at, s.sent_at, s.attempts
 FROM sends s
 LEFT JOIN dispatches d ON d.workspace_id = s.workspace_id AND d.id = s.dispatch_id
 WHERE s.workspace_id = $1 AND s.user_seq = $2
 ORDER BY s.id DESC LIMIT $3";

/// The ids `recent_sends` should return for [`USER`]: sends are inserted round-robin over the
/// users, so the user's are every `USERS`-th id, newest first.
fn expected_ids(first_id: i64) -> Vec<i64> {
    let mut ids: Vec<i64> = (0..USERS * SENDS_PER_USER)
        .filter(|n| n % USERS == i64::from(USER))
        .map(|n| first_id + n)
        .collect();
    ids.reverse();
    ids.truncate(LIMIT as usize);
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_recent_sends_reads_the_user_recent_index_without_a_sort() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sqlite");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open store");
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)
         INSERT INTO sends (workspace_id, dispatch_id, user_seq, variant, due_at, state)
         SELECT ?1, 'd', i % ?3, 'v', i, 'pending' FROM n",
        rusqlite::params![ws.id.0, USERS * SENDS_PER_USER, USERS],
    )
    .unwrap();
    conn.execute_batch("ANALYZE").unwrap();
    let first_id: i64 = conn
        .query_row("SELECT min(id) FROM sends", [], |r| r.get(0))
        .unwrap();

    let mut stmt = conn
        .prepare(&["EXPLAIN QUERY PLAN ", SQLITE_RECENT_SENDS].concat())
        .unwrap();
    let plan: Vec<String> = stmt
        .query_map(rusqlite::params![ws.id.0, USER, LIMIT], |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let sends = plan
        .iter()
        .find(|line| line.contains("SCAN s") || line.contains("SEARCH s"))
        .unwrap_or_else(|| panic!("no step reads sends: {plan:?}"));
    assert!(
        sends.starts_with("SEARCH s USING") && sends.contains("INDEX sends_user_recent"),
        "sends are not read through sends_user_recent: {plan:?}"
    );
    assert!(
        !plan.iter().any(|line| line.contains("TEMP B-TREE")),
        "the plan sorts: {plan:?}"
    );

    let got = store
        .recent_sends(ws.id, UserSeq(USER), LIMIT as usize)
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|s| s.id).collect::<Vec<_>>(),
        expected_ids(first_id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_recent_sends_reads_the_user_recent_index_without_a_sort() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO sends (workspace_id, dispatch_id, user_seq, variant, due_at, state)
             SELECT $1, 'd', n % $3::bigint, 'v', n, 'pending'
             FROM generate_series(0, $2::bigint - 1) AS n",
            &[&ws.id.0, &(USERS * SENDS_PER_USER), &USERS],
        )
        .await
        .unwrap();
    client.batch_execute("ANALYZE sends").await.unwrap();
    let first_id: i64 = client
        .query_one("SELECT min(id) FROM sends", &[])
        .await
        .unwrap()
        .get(0);

    // The statement as the store sends it: with parameters bound (a custom plan, as the store's
    // first executions of a prepared statement get).
    let plan: Vec<String> = client
        .query(
            &["EXPLAIN ", PG_RECENT_SENDS].concat(),
            &[&ws.id.0, &i64::from(USER), &LIMIT],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    assert!(
        plan.iter().any(|line| line.contains("Index Scan")
            && line.contains("using sends_user_recent on sends s")),
        "sends are not read through sends_user_recent: {plan:#?}"
    );
    assert!(
        !plan.iter().any(|line| line.contains("Seq Scan on sends")),
        "a sequential scan of sends: {plan:#?}"
    );
    assert!(
        !plan.iter().any(|line| line.contains("Sort")),
        "the plan sorts: {plan:#?}"
    );

    let got = store
        .recent_sends(ws.id, UserSeq(USER), LIMIT as usize)
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|s| s.id).collect::<Vec<_>>(),
        expected_ids(first_id)
    );
}

/// `claim_journeys`'s statement on SQLite (without its `RETURNING`), as `sqlite/canvas.rs`
/// prepares it.
const SQLITE_CLAIM_JOURNEYS: &str = "UPDATE canvas_journeys SET lease_owner = ?1, lease_until = ?3
         WHERE (workspace_id, canvas_id, user_seq) IN (
             SELECT j.workspace_id, j.canvas_id, j.user_seq FROM canvas_journeys j
             JOIN canvases c ON c.workspace_id = j.workspace_id AND c.id = j.canvas_id
             WHERE j.wake_at <= ?2 AND (j.lease_until IS NULL OR j.lease_until <= ?2)
               AND c.status = 'active'
             ORDER BY j.wake_at LIMIT ?4)";

/// The Canvas timer claim finds due journeys through `canvas_journeys_wake` and leases each by
/// its primary key: the journeys not due (here 20,000 waiting a day beside 100 due) are never
/// read. (SQLite 3.40 drives this row-value `IN (…)` from its leading column alone, reading every
/// journey of the workspace per claim; the bundled SQLite must not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_journey_claim_reads_only_due_journeys() {
    const WAITING: i64 = 20_000;
    const DUE: i64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sqlite");
    let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open store");
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO canvases (workspace_id, id, name, description, tags, status, version,
             definition, created_at, updated_at)
         VALUES (?1, 'c', 'c', '', '[]', 'active', 1, '{}', 0, 0)",
        rusqlite::params![ws.id.0],
    )
    .unwrap();
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < ?2)
         INSERT INTO canvas_journeys (workspace_id, canvas_id, user_seq, entry_id, version,
             variant_id, step_id, entered_at, step_at, due_at, wake_at, converted)
         SELECT ?1, 'c', i, 'e' || i, 1, 'v', 's', 0, 0, ?3, ?3, 0 FROM n",
        rusqlite::params![ws.id.0, WAITING + DUE, NOW.0 + 86_400_000],
    )
    .unwrap();
    conn.execute(
        "UPDATE canvas_journeys SET wake_at = ?1 - user_seq, due_at = ?1 - user_seq
         WHERE user_seq >= ?2",
        rusqlite::params![NOW.0, WAITING],
    )
    .unwrap();
    // No ANALYZE: the store never runs it, so the planner works without statistics, as here.

    let mut stmt = conn
        .prepare(&["EXPLAIN QUERY PLAN ", SQLITE_CLAIM_JOURNEYS].concat())
        .unwrap();
    let plan: Vec<String> = stmt
        .query_map(rusqlite::params!["node", NOW.0, NOW.0 + 1, 1_000], |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|line| line.contains("SEARCH j USING INDEX canvas_journeys_wake")),
        "due journeys are not found through canvas_journeys_wake: {plan:?}"
    );
    assert!(
        plan.iter().any(|line| line
            .contains("SEARCH canvas_journeys USING PRIMARY KEY (workspace_id=? AND canvas_id=? AND user_seq=?)")),
        "claimed journeys are not leased by their primary key: {plan:?}"
    );
    assert!(
        !plan
            .iter()
            .any(|line| line.contains("SCAN canvas_journeys")
                || line.contains("canvas_journeys_step")),
        "the claim reads journeys that are not due: {plan:?}"
    );

    let claimed = store
        .claim_journeys("node", NOW, 60_000, 1_000)
        .await
        .unwrap();
    let users: Vec<u32> = claimed.iter().map(|c| c.user.0).collect();
    let oldest_first: Vec<u32> = (WAITING..WAITING + DUE)
        .rev()
        .map(|u| u32::try_from(u).unwrap())
        .collect();
    assert_eq!(users, oldest_first, "the due journeys, oldest wake first");
}
