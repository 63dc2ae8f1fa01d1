//! The PostgreSQL groundwork against a real PostgreSQL 15: migrations (idempotent, and safe when
//! two nodes start at once), the Citus distribution rule read back from the catalog, and the
//! per-workspace commit sequence that orders the logs.
//!
//! Each test creates its own database on the server named by `TIDEWAY_TEST_DATABASE_URL`
//! (`scripts/test` starts one) and drops it at the end. Without the variable a test starts a
//! private cluster in a temp dir if the PostgreSQL binaries are installed, and fails otherwise:
//! these tests never pass by not running.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tideway_core::ids::WorkspaceId;
use tideway_store::postgres::schema::{MIGRATION_LOCK, SCHEMA_VERSION};
use tideway_store::postgres::{
    DISTRIBUTION, Distribution, MigrateOutcome, PgPool, Sequence, allocate, migrate,
};
use tokio_postgres::Client;

use super::pg::TestDb;
const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it holds, failing the test past the deadline.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn waiting_on_a_lock(observer: &Client, pids: &[i32]) -> usize {
    let n: i64 = observer
        .query_one(
            "SELECT count(DISTINCT pid) FROM pg_locks WHERE NOT granted AND pid = ANY($1)",
            &[&pids],
        )
        .await
        .unwrap()
        .get(0);
    n as usize
}

// --- migrations ----------------------------------------------------------------------------------

async fn migration_rows(client: &Client) -> Vec<i32> {
    client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_on_an_empty_database_and_are_idempotent() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    assert_eq!(
        migrate(&pool).await.unwrap(),
        MigrateOutcome {
            from: 0,
            to: SCHEMA_VERSION
        }
    );
    assert_eq!(
        migrate(&pool).await.unwrap(),
        MigrateOutcome {
            from: SCHEMA_VERSION,
            to: SCHEMA_VERSION
        },
        "a second run finds the schema current and does nothing"
    );
    let client = db.client().await;
    assert_eq!(
        migration_rows(&client).await,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    let tables: BTreeSet<String> = public_tables(&client).await;
    let listed: BTreeSet<String> = DISTRIBUTION.iter().map(|(t, _)| t.to_string()).collect();
    assert_eq!(
        tables, listed,
        "the migrations create exactly the tables of DISTRIBUTION"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_migrating_at_once_both_succeed_and_the_schema_is_applied_once() {
    let db = TestDb::create().await;
    // Two pools, as two `tideway serve` processes starting together.
    let (a, b) = (db.pool().await, db.pool().await);
    // Hold the migration lock so both calls are provably inside `migrate` at the same time.
    let mut holder = db.client().await;
    let held = holder.transaction().await.unwrap();
    held.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .unwrap();
    let first = tokio::spawn(async move { migrate(&a).await });
    let second = tokio::spawn(async move { migrate(&b).await });
    let observer = db.client().await;
    wait_until("both migrations to queue on the advisory lock", || async {
        let n: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        n == 2
    })
    .await;
    assert!(
        !first.is_finished() && !second.is_finished(),
        "neither migrates while another holds the lock"
    );
    held.commit().await.unwrap();
    let mut outcomes = vec![
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    ];
    outcomes.sort_by_key(|o| o.from);
    assert_eq!(
        outcomes,
        [
            MigrateOutcome {
                from: 0,
                to: SCHEMA_VERSION
            },
            MigrateOutcome {
                from: SCHEMA_VERSION,
                to: SCHEMA_VERSION
            },
        ],
        "one node migrates; the other waits, then finds the version and does nothing"
    );
    assert_eq!(
        migration_rows(&observer).await,
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
}

// --- the Citus distribution rule -------------------------------------------------------------

async fn public_tables(client: &Client) -> BTreeSet<String> {
    client
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// One way a table breaks the distribution rule: (table, rule), plus what was found.
struct Violation {
    table: String,
    rule: &'static str,
    detail: String,
}

/// Reads the schema from the catalog and lists every break of the rules Citus imposes, given
/// where each table goes:
/// - every table is placed (`missing`) and has a primary key (`no primary key`: Citus moves
///   shards by logical replication, which needs one);
/// - a distributed table has its distribution column, NOT NULL (`column`);
/// - its primary key and every unique constraint or unique index start with that column
///   (`unique`: Citus enforces uniqueness per shard only);
/// - a foreign key between distributed tables starts with the distribution column on both
///   sides (`foreign key`: only co-located keys are enforceable);
/// - a reference table references no distributed table (`reference`).
async fn distribution_violations(
    client: &Client,
    placement: &[(&str, Distribution)],
) -> Vec<Violation> {
    let place = |table: &str| placement.iter().find(|(t, _)| *t == table).map(|(_, d)| *d);
    let mut out = Vec::new();
    let mut violation = |table: &str, rule, detail: String| {
        out.push(Violation {
            table: table.to_owned(),
            rule,
            detail,
        })
    };
    for table in public_tables(client).await {
        let Some(placed) = place(&table) else {
            violation(&table, "missing", "not in DISTRIBUTION".into());
            continue;
        };
        let has_pk: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = $1::text::regclass AND indisprimary)",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        if !has_pk {
            violation(&table, "no primary key", String::new());
        }
        if let Distribution::Distributed { column } = placed {
            let nullable: Option<String> = client
                .query_opt(
                    "SELECT is_nullable::text FROM information_schema.columns
                     WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
                    &[&table, &column],
                )
                .await
                .unwrap()
                .map(|r| r.get(0));
            if nullable.as_deref() != Some("NO") {
                violation(&table, "column", format!("{column}: {nullable:?}"));
            }
        }
    }
    // Primary keys, unique constraints (each has its index) and unique indexes, with their
    // leading column (NULL for an expression).
    let unique = client
        .query(
            "SELECT t.relname::text, i.relname::text, a.attname::text
             FROM pg_index x
             JOIN pg_class i ON i.oid = x.indexrelid
             JOIN pg_class t ON t.oid = x.indrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
             LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
             WHERE n.nspname = 'public' AND x.indisunique",
            &[],
        )
        .await
        .unwrap();
    for row in unique {
        let (table, index, first): (String, String, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        if let Some(Distribution::Distributed { column }) = place(&table)
            && first.as_deref() != Some(column)
        {
            violation(&table, "unique", format!("{index} starts with {first:?}"));
        }
    }
    let foreign = client
        .query(
            "SELECT c.conname::text, s.relname::text, d.relname::text,
                    ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
                    ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o)
             FROM pg_constraint c
             JOIN pg_class s ON s.oid = c.conrelid
             JOIN pg_class d ON d.oid = c.confrelid
             JOIN pg_namespace n ON n.oid = s.relnamespace
             WHERE n.nspname = 'public' AND c.contype = 'f'",
            &[],
        )
        .await
        .unwrap();
    for row in foreign {
        let (name, from, to, from_cols, to_cols): (
            String,
            String,
            String,
            Vec<String>,
            Vec<String>,
        ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        match (place(&from), place(&to)) {
            (
                Some(Distribution::Distributed { column: a }),
                Some(Distribution::Distributed { column: b }),
            ) if from_cols.first().map(String::as_str) != Some(a)
                || to_cols.first().map(String::as_str) != Some(b) =>
            {
                violation(
                    &from,
                    "foreign key",
                    format!("{name}: ({from_cols:?}) -> {to} ({to_cols:?})"),
                );
            }
            (Some(Distribution::Reference), Some(Distribution::Distributed { .. })) => {
                violation(&from, "reference", format!("{name} -> distributed {to}"));
            }
            // Co-located keys, and keys to a reference table (anything may refer to one);
            // unplaced tables are already reported.
            _ => {}
        }
    }
    out
}

fn describe(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("\n  {}: {} ({})", v.table, v.rule, v.detail))
        .collect()
}

fn rules_broken(violations: &[Violation]) -> BTreeSet<(String, &'static str)> {
    violations
        .iter()
        .map(|v| (v.table.clone(), v.rule))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_obeys_the_citus_distribution_rule_and_the_check_catches_a_break() {
    let db = TestDb::create().await;
    migrate(&db.pool().await).await.unwrap();
    let client = db.client().await;
    let violations = distribution_violations(&client, DISTRIBUTION).await;
    assert!(
        violations.is_empty(),
        "the schema breaks the distribution rule:{}",
        describe(&violations)
    );
    // Something to check: the schema has foreign keys between distributed tables and from
    // distributed tables to reference ones.
    let fks: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
             WHERE n.nspname = 'public' AND c.contype = 'f'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(fks >= 20, "only {fks} foreign keys");

    // The check itself fails on tables that break each rule.
    client
        .batch_execute(
            "CREATE TABLE bad_pk (workspace_id bigint NOT NULL, id bigint NOT NULL, PRIMARY KEY (id, workspace_id));
             CREATE TABLE bad_unique (workspace_id bigint NOT NULL, id bigint NOT NULL, email text,
                 PRIMARY KEY (workspace_id, id), UNIQUE (email));
             CREATE TABLE bad_unique_index (workspace_id bigint NOT NULL, id bigint NOT NULL, email text,
                 PRIMARY KEY (workspace_id, id));
             CREATE UNIQUE INDEX bad_unique_index_email ON bad_unique_index (email, workspace_id) WHERE email IS NOT NULL;
             CREATE TABLE bad_fk (workspace_id bigint NOT NULL, id bigint NOT NULL, user_seq bigint NOT NULL,
                 PRIMARY KEY (workspace_id, id),
                 FOREIGN KEY (user_seq, workspace_id) REFERENCES bad_pk (id, workspace_id));
             CREATE TABLE bad_nullable (workspace_id bigint, id bigint NOT NULL, PRIMARY KEY (id));
             CREATE TABLE bad_reference (id bigint PRIMARY KEY, workspace_id bigint NOT NULL, seq bigint NOT NULL,
                 FOREIGN KEY (workspace_id, seq) REFERENCES users (workspace_id, seq));
             CREATE TABLE bad_no_pk (workspace_id bigint NOT NULL, x bigint);
             CREATE TABLE unlisted (workspace_id bigint NOT NULL, id bigint NOT NULL, PRIMARY KEY (workspace_id, id));",
        )
        .await
        .unwrap();
    let by_workspace = Distribution::Distributed {
        column: "workspace_id",
    };
    let mut placement = DISTRIBUTION.to_vec();
    placement.extend([
        ("bad_pk", by_workspace),
        ("bad_unique", by_workspace),
        ("bad_unique_index", by_workspace),
        ("bad_fk", by_workspace),
        ("bad_nullable", by_workspace),
        ("bad_reference", Distribution::Reference),
        ("bad_no_pk", by_workspace),
    ]);
    let violations = distribution_violations(&client, &placement).await;
    let s = |t: &str, r| (t.to_owned(), r);
    assert_eq!(
        rules_broken(&violations),
        BTreeSet::from([
            s("bad_pk", "unique"),
            s("bad_unique", "unique"),
            s("bad_unique_index", "unique"),
            s("bad_fk", "foreign key"),
            s("bad_nullable", "column"),
            s("bad_nullable", "unique"),
            s("bad_reference", "reference"),
            s("bad_no_pk", "no primary key"),
            s("unlisted", "missing"),
        ]),
        "{}",
        describe(&violations)
    );
}

// --- the per-workspace commit sequence -----------------------------------------------------------

/// A log consumer's view: its position, and the check that a read after it continues it
/// without a hole (a hole is a seq that may still commit below a position once passed).
#[derive(Default)]
struct Consumer {
    position: i64,
    rounds_with_rows: usize,
}

impl Consumer {
    fn observe(&mut self, seqs: &[i64]) -> Result<(), String> {
        for &seq in seqs {
            if seq != self.position + 1 {
                return Err(format!("read {seq} after position {}", self.position));
            }
            self.position = seq;
        }
        self.rounds_with_rows += usize::from(!seqs.is_empty());
        Ok(())
    }

    async fn poll(&mut self, client: &Client, table: &str, ws: i64) -> Result<(), String> {
        let seqs: Vec<i64> = client
            .query(
                &format!(
                    "SELECT seq FROM {table} WHERE workspace_id = $1 AND seq > $2 ORDER BY seq"
                ),
                &[&ws, &self.position],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        self.observe(&seqs)?;
        // Nothing appeared below the position since it was passed.
        let below: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE workspace_id = $1 AND seq <= $2"),
                &[&ws, &self.position],
            )
            .await
            .unwrap()
            .get(0);
        if below != self.position {
            return Err(format!(
                "{below} rows at or below position {}",
                self.position
            ));
        }
        Ok(())
    }
}

async fn new_workspace(client: &Client, name: &str) -> WorkspaceId {
    WorkspaceId(
        client
            .query_one(
                "INSERT INTO workspaces (name, app_group_id, created_at) VALUES ($1, $1, 0) RETURNING id",
                &[&name],
            )
            .await
            .unwrap()
            .get(0),
    )
}

/// Appends `n` events in one transaction the way a store will: the work first, the range from
/// the workspace's counter last, then the rows, then commit. Returns the seqs.
async fn append_events(pool: &PgPool, ws: WorkspaceId, n: u32) -> Vec<i64> {
    let mut client = pool.client().await.unwrap();
    let tx = client.transaction().await.unwrap();
    // Stands for the transaction's domain work: a round trip during which others interleave.
    tx.execute("SELECT 1", &[]).await.unwrap();
    let first = allocate(&tx, ws, Sequence::EventLog, n).await.unwrap();
    let seqs: Vec<i64> = (first..first + i64::from(n)).collect();
    let ids: Vec<String> = seqs
        .iter()
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    tx.execute(
        "INSERT INTO event_log (workspace_id, seq, event_id, event_type, time, body)
         SELECT $1, s, id, 'users.behaviors.CustomEvent', 0, '{}' FROM unnest($2::bigint[], $3::text[]) AS e(s, id)",
        &[&ws.0, &seqs, &ids],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_gap_free_seqs_in_commit_order_and_a_reader_skips_none() {
    const TASKS: u32 = 8;
    const TXS: u32 = 50;
    let db = TestDb::create().await;
    let pool = db.pool().await;
    migrate(&pool).await.unwrap();
    let client = db.client().await;
    let ws = new_workspace(&client, "w").await;
    // A second workspace written at the same time has a sequence of its own.
    let other = new_workspace(&client, "other").await;

    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = Arc::clone(&done);
        let reader_client = db.client().await;
        tokio::spawn(async move {
            let mut consumer = Consumer::default();
            loop {
                let finished = done.load(Ordering::Acquire);
                consumer.poll(&reader_client, "event_log", ws.0).await?;
                // One more poll after the writers finished reads everything they committed.
                if finished {
                    return Ok::<_, String>(consumer);
                }
            }
        })
    };
    let mut writers = Vec::new();
    for task in 0..TASKS {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..TXS {
                // 1 to 3 events per transaction.
                let n = 1 + (task + i) % 3;
                mine.push(append_events(&pool, ws, n).await);
                append_events(&pool, other, 1).await;
            }
            mine
        }));
    }
    let mut total = 0;
    let mut all = Vec::new();
    for writer in writers {
        let mine = writer.await.unwrap();
        let firsts: Vec<i64> = mine.iter().map(|s| s[0]).collect();
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "a task's later transaction commits later and gets later seqs: {firsts:?}"
        );
        total += mine.iter().map(Vec::len).sum::<usize>() as i64;
        all.extend(mine.into_iter().flatten());
    }
    done.store(true, Ordering::Release);
    let consumer = reader.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=total).collect::<Vec<_>>(),
        "gap-free, no seq twice"
    );
    assert_eq!(consumer.position, total, "the reader read every event");
    assert!(
        consumer.rounds_with_rows > 1,
        "the reader polled while the writers ran"
    );
    let other_head: i64 = client
        .query_one(
            "SELECT max(seq) FROM event_log WHERE workspace_id = $1",
            &[&other.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(other_head, i64::from(TASKS * TXS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waits_for_an_earlier_allocation_to_commit_where_a_sequence_would_let_a_reader_skip()
 {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    migrate(&pool).await.unwrap();
    let observer = db.client().await;
    let ws = new_workspace(&observer, "w").await;

    // The failure this design prevents, with a plain PostgreSQL sequence: A takes 1, B takes
    // 2 and commits first; a reader passes 2, then 1 commits below its position.
    observer
        .batch_execute("CREATE TABLE naive_log (workspace_id bigint NOT NULL, seq bigserial, PRIMARY KEY (workspace_id, seq))")
        .await
        .unwrap();
    let (mut a, mut b) = (db.client().await, db.client().await);
    let tx_a = a.transaction().await.unwrap();
    tx_a.execute("INSERT INTO naive_log (workspace_id) VALUES ($1)", &[&ws.0])
        .await
        .unwrap();
    let tx_b = b.transaction().await.unwrap();
    tx_b.execute("INSERT INTO naive_log (workspace_id) VALUES ($1)", &[&ws.0])
        .await
        .unwrap();
    tx_b.commit().await.unwrap();
    let mut naive = Consumer::default();
    let skipped = naive.poll(&observer, "naive_log", ws.0).await;
    assert!(
        skipped.is_err(),
        "the consumer check sees the hole a late commit leaves"
    );
    tx_a.commit().await.unwrap();

    // The same interleaving with the workspace's counter: B's allocation waits for A's commit.
    let tx_a = a.transaction().await.unwrap();
    assert_eq!(allocate(&tx_a, ws, Sequence::EventLog, 1).await.unwrap(), 1);
    let b_pid = backend_pid(&b).await;
    let second = tokio::spawn(async move {
        let tx_b = b.transaction().await.unwrap();
        let first = allocate(&tx_b, ws, Sequence::EventLog, 2).await.unwrap();
        tx_b.execute(
            "INSERT INTO event_log (workspace_id, seq, event_id, event_type, time, body)
             SELECT $1, s, s::text, 't', 0, '{}' FROM generate_series($2::bigint, $2 + 1) s",
            &[&ws.0, &first],
        )
        .await
        .unwrap();
        tx_b.commit().await.unwrap();
        first
    });
    wait_until("B to wait for A's counter row", || async {
        waiting_on_a_lock(&observer, &[b_pid]).await == 1
    })
    .await;
    assert!(!second.is_finished());
    let mut consumer = Consumer::default();
    consumer.poll(&observer, "event_log", ws.0).await.unwrap();
    assert_eq!(consumer.position, 0, "nothing is visible yet");
    tx_a.execute(
        "INSERT INTO event_log (workspace_id, seq, event_id, event_type, time, body) VALUES ($1, 1, 'a', 't', 0, '{}')",
        &[&ws.0],
    )
    .await
    .unwrap();
    tx_a.commit().await.unwrap();
    assert_eq!(second.await.unwrap(), 2, "B's range starts after A's");
    consumer.poll(&observer, "event_log", ws.0).await.unwrap();
    assert_eq!(consumer.position, 3);

    // Other counters and other workspaces do not wait: with A's successor holding the
    // workspace's event-log row, a user seq and another workspace's log are taken at once.
    let tx_a = a.transaction().await.unwrap();
    allocate(&tx_a, ws, Sequence::EventLog, 1).await.unwrap();
    let other = new_workspace(&observer, "other").await;
    let mut c = db.client().await;
    let tx_c = c.transaction().await.unwrap();
    let quick = tokio::time::timeout(DEADLINE, async {
        (
            allocate(&tx_c, ws, Sequence::Users, 1).await.unwrap(),
            allocate(&tx_c, other, Sequence::EventLog, 1).await.unwrap(),
            allocate(&tx_c, ws, Sequence::SegmentUserChanges, 0)
                .await
                .unwrap(),
        )
    })
    .await
    .expect("independent counters do not wait");
    assert_eq!(quick, (1, 1, 1));
    tx_c.commit().await.unwrap();
    tx_a.rollback().await.unwrap();
    // A rolled-back allocation leaves no hole.
    let tx_a = a.transaction().await.unwrap();
    assert_eq!(allocate(&tx_a, ws, Sequence::EventLog, 1).await.unwrap(), 4);
}

/// A read-only refusal, and the refusal of the statement after it in the same transaction
/// (pipelined statements may answer with the follower's), are `Unavailable` (503: retry), not
/// `Corrupt` (500); the text names PostgreSQL's SQLSTATE and message rather than "db error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_a_read_only_or_failed_transaction_are_unavailable_and_say_why() {
    use tideway_core::store::StoreError;
    use tideway_store::postgres::pg_err;
    let db = TestDb::create().await;
    let client = db.client().await;
    client.batch_execute("BEGIN READ ONLY").await.unwrap();
    let first = client
        .execute("CREATE TABLE refused (a int)", &[])
        .await
        .unwrap_err();
    match pg_err(first) {
        StoreError::Unavailable(why) => assert!(why.contains("25006"), "{why}"),
        other => panic!("read-only: {other:?}"),
    }
    let after = client.query("SELECT 1", &[]).await.unwrap_err();
    match pg_err(after) {
        StoreError::Unavailable(why) => assert!(why.contains("25P02"), "{why}"),
        other => panic!("after a failed statement: {other:?}"),
    }
    client.batch_execute("ROLLBACK").await.unwrap();
    let nul = client
        .query("SELECT $1::text", &[&"a\u{0}b"])
        .await
        .unwrap_err();
    assert!(matches!(pg_err(nul), StoreError::Invalid(_)));
}

/// Begins a transaction on `client` that inserts `n` into `outcome`, and returns its id
/// (`txid_current()`), leaving it open.
async fn insert_in_open_transaction(client: &Client, n: i32) -> i64 {
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute("INSERT INTO outcome VALUES ($1)", &[&n])
        .await
        .unwrap();
    client
        .query_one("SELECT txid_current()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A batch that lost its connection with its commit in flight asks another connection how its
/// transaction ended: committed, rolled back, or (still running past the wait) not known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_answer_is_looked_up_by_transaction_id() {
    use tideway_store::postgres::transaction_committed;
    let db = TestDb::create().await;
    let pool = db.pool().await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE outcome (a int)")
        .await
        .unwrap();
    let wait = Duration::from_millis(300);
    // Committed.
    let committed = insert_in_open_transaction(&client, 1).await;
    client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        transaction_committed(&pool, committed, wait).await,
        Some(true)
    );
    // Rolled back.
    let aborted = insert_in_open_transaction(&client, 2).await;
    client.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        transaction_committed(&pool, aborted, wait).await,
        Some(false)
    );
    // Still running: not known once the wait is over.
    let running = insert_in_open_transaction(&client, 3).await;
    assert_eq!(transaction_committed(&pool, running, wait).await, None);
    client.batch_execute("ROLLBACK").await.unwrap();
}

/// A session keeps the `default_transaction_read_only` it started with. After an operator
/// resets the database's, a pool whose idle sessions were opened while it was on closes them
/// once a write is refused as read-only, so writes come back without anyone ending them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_closes_sessions_left_read_only_once_a_write_is_refused() {
    use tideway_core::store::StoreError;
    use tideway_store::postgres::pg_err;
    let db = TestDb::create().await;
    let admin = db.client().await;
    let name = db.name();
    admin
        .batch_execute(&format!(
            "CREATE TABLE written (a int);
             ALTER DATABASE {name} SET default_transaction_read_only = on"
        ))
        .await
        .unwrap();
    let pool = db.pool().await;
    // Three sessions opened while the database was read-only, back in the pool idle.
    let held = [
        pool.client().await.unwrap(),
        pool.client().await.unwrap(),
        pool.client().await.unwrap(),
    ];
    drop(held);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} RESET default_transaction_read_only"
        ))
        .await
        .unwrap();
    let insert = "INSERT INTO written VALUES (1)";
    let mut refused = 0;
    loop {
        match pool.client().await.unwrap().execute(insert, &[]).await {
            Ok(_) => break,
            Err(e) => {
                let mapped = pg_err(e);
                assert!(
                    matches!(&mapped, StoreError::Unavailable(why) if why.contains("25006")),
                    "{mapped:?}"
                );
                refused += 1;
                // Retirements are at most one a second (another test's refusal may have
                // just caused one); a stale pool would be refused for ever.
                assert!(refused < 40, "the stale sessions were never closed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(refused >= 1, "the first write met a stale session");
    for _ in 0..5 {
        pool.client()
            .await
            .unwrap()
            .execute(insert, &[])
            .await
            .expect("every pooled session takes writes again");
    }
}

/// What the server's configuration refuses — a database that does not exist, a login refused,
/// a privilege missing — is `Unavailable` naming the SQLSTATE (a 503 at the edge; at start, a
/// message to fix the URL or the grants), not "damaged data".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_by_the_servers_configuration_are_unavailable() {
    use tideway_core::store::StoreError;
    use tideway_store::postgres::{ConnectError, connect, pg_err};
    let db = TestDb::create().await;
    // `postgres://USER@HOST:PORT/DB`, as `scripts/test` and `TestDb` make it.
    let (base, dbname) = db.url.rsplit_once('/').unwrap();
    let (scheme, rest) = base.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let expect_unavailable = |outcome: Result<_, ConnectError>, code: &str| match outcome {
        Err(ConnectError::Store(StoreError::Unavailable(why))) => {
            assert!(why.contains(code), "{code}: {why}")
        }
        Err(other) => panic!("{code}: {other:?}"),
        Ok(_) => panic!("{code}: connected"),
    };
    expect_unavailable(
        connect(&format!("{base}/tideway_no_such_database")).await,
        "3D000",
    );
    let admin = db.client().await;
    let role = format!("tideway_role_{}", uuid::Uuid::new_v4().simple());
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} NOLOGIN; CREATE TABLE private (a int);"
        ))
        .await
        .unwrap();
    let as_role = format!("{scheme}://{role}@{host}/{dbname}");
    expect_unavailable(connect(&as_role).await, "28000");
    admin
        .batch_execute(&format!("ALTER ROLE {role} LOGIN"))
        .await
        .unwrap();
    let pool = connect(&as_role).await.unwrap();
    let refused = pool
        .client()
        .await
        .unwrap()
        .query("SELECT a FROM private", &[])
        .await
        .unwrap_err();
    match pg_err(refused) {
        StoreError::Unavailable(why) => assert!(why.contains("42501"), "{why}"),
        other => panic!("42501: {other:?}"),
    }
    drop(pool);
    admin
        .batch_execute(&format!("DROP TABLE private; DROP ROLE {role}"))
        .await
        .unwrap();
}
