//! Two `tideway serve` processes on one PostgreSQL database, as behind a load balancer.
//!
//! Writers drive `/users/track`, the partner cohort import and Heap's signed segment-sync
//! webhook through both nodes while a Current exports to a local sink; the node holding the
//! Current's lease is SIGKILLed mid-stream, the writers carry on through the other, the other
//! takes the Current over, and the killed node comes back while the writes go on. Then: both
//! nodes agree on a segment's size within 1 s of the last write; every acknowledged write is
//! readable through either node; every logged event reached the sink at least once and
//! nothing else did; the duplicates stay within the batches in flight at the kill. The admin CLI
//! works on the same database (`--database-url`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tideway_heap::webhook::sign;
use tideway_store::testing::TestDb;
use tokio::sync::Mutex;

use crate::support::{
    Api, Server, Sink, initial_admin_key, management, stderr, tideway, tideway_ok,
};

const DEADLINE: Duration = Duration::from_secs(120);
const WRITERS: usize = 4;
const BATCH_SIZE: u64 = 10;
const IN_FLIGHT: u64 = 2;
const ROUNDS: usize = 40;

/// What the writers saw: requests acknowledged (user ids tracked with 201), and the ones whose
/// outcome is unknown (the node died under them).
#[derive(Default)]
struct Ledger {
    acked_users: Vec<String>,
    cohort_members: HashSet<String>,
    unknown: usize,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One writer's round `n`: a track request through `api` for 25 new users (attributes and an
/// event each), then those users into the partner cohort `trial`, then (every 4th round) a Heap
/// segment-sync page adding them to Heap segment 4242. Returns whether each part was
/// acknowledged.
async fn write_round(
    api: &Api,
    key: &str,
    partner: (&str, &str),
    hook_secret: &str,
    writer: usize,
    n: usize,
    ledger: &Mutex<Ledger>,
) -> bool {
    let users: Vec<String> = (0..25).map(|i| format!("w{writer}-r{n}-u{i}")).collect();
    let attributes: Vec<Value> = users
        .iter()
        .map(|u| json!({"external_id": u, "plan": "trial", "round": n}))
        .collect();
    let events: Vec<Value> = users
        .iter()
        .map(|u| json!({"external_id": u, "name": "signed_up", "time": "2026-11-01T00:00:00Z"}))
        .collect();
    let body = json!({"attributes": attributes, "events": events});
    let Some((status, answer)) = try_post(api, "/users/track", key, &body).await else {
        ledger.lock().await.unknown += 1;
        return false;
    };
    assert_eq!(status, 201, "{answer}");
    ledger
        .lock()
        .await
        .acked_users
        .extend(users.iter().cloned());

    let changes = json!({"partner_api_key": partner.0, "client_secret": partner.1, "cohort_id": "trial",
        "cohort_changes": [{"user_ids": users}]});
    let Some((status, answer)) = try_post(api, "/partners/heap/cohorts/users", "", &changes).await
    else {
        ledger.lock().await.unknown += 1;
        return false;
    };
    assert_eq!(status, 201, "{answer}");
    ledger
        .lock()
        .await
        .cohort_members
        .extend(users.iter().cloned());

    if n.is_multiple_of(4) {
        let page = json!({"action_type": "segment.users.sync",
            "data": {"segment": {"id": 4242, "name": "Heap Trial"},
                "sync_info": {"page_number": n, "total_pages": 1000, "sync_task_id": format!("task-w{writer}")},
                "add": users.iter().map(|id| json!({"id": id})).collect::<Vec<_>>(), "remove": []}});
        let raw = page.to_string();
        let sent = api
            .client
            .post(format!("{}/partners/heap/segment-sync", api.url))
            .header(
                "heap-hash",
                sign(hook_secret.as_bytes(), now_ms(), raw.as_bytes()),
            )
            .body(raw)
            .send()
            .await;
        match sent {
            Ok(r) => assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await),
            Err(_) => {
                ledger.lock().await.unknown += 1;
                return false;
            }
        }
    }
    true
}

/// POSTs JSON; `None` when the node did not answer (it was killed).
async fn try_post(api: &Api, path: &str, key: &str, body: &Value) -> Option<(u16, Value)> {
    let mut req = api.client.post(format!("{}{path}", api.url)).json(body);
    if !key.is_empty() {
        req = req.bearer_auth(key);
    }
    let r = req.send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

/// Every event id in the database's log.
async fn logged_ids(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT event_id FROM event_log ORDER BY workspace_id, seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The node (by data directory) that holds the Current's lease now.
async fn lease_holder(db: &TestDb, dirs: &[&Path]) -> Option<usize> {
    let owner: Option<String> = db
        .client()
        .await
        .query_opt("SELECT lease_owner FROM currents LIMIT 1", &[])
        .await
        .unwrap()
        .and_then(|r| r.get(0));
    let owner = owner?;
    dirs.iter().position(|d| {
        let canonical = std::fs::canonicalize(d).unwrap();
        owner.ends_with(&canonical.display().to_string())
    })
}

/// How many times a node's exporter started consuming (took a Current's lease), from its
/// `/metrics`.
async fn consumer_starts(api: &Api) -> u64 {
    let text = api
        .client
        .get(format!("{}/metrics", api.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("tideway_currents_consumer_starts_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn segment_size(api: &Api, key: &str, id: &str) -> u64 {
    let (status, body) = management(
        api,
        reqwest::Method::GET,
        &format!("/api/v1/segments/{id}/size"),
        key,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["size"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_database_share_the_work_and_survive_a_sigkill() {
    let db = TestDb::create().await;
    let tmp = tempfile::tempdir().unwrap();
    let dirs = [tmp.path().join("node-a"), tmp.path().join("node-b")];
    let database = [
        "--database-url",
        db.url.as_str(),
        "--currents-lease-ttl-ms",
        "1500",
    ];
    let sink = Sink::start(&tmp.path().join("sink"), &["--delay-ms", "2"]).await;

    let node_a = Server::start(&dirs[0], &database).await;
    let key = initial_admin_key(&dirs[0]);
    let node_b = Server::start(&dirs[1], &database).await;
    assert!(
        !dirs[1].join("initial-admin-key").exists(),
        "the second node finds the workspace and makes no second admin key"
    );
    let mut nodes = vec![Some(node_a), Some(node_b)];
    let apis: Vec<Api> = nodes
        .iter()
        .map(|n| Api::new(&n.as_ref().unwrap().url))
        .collect();

    // The admin CLI on the same database.
    let partner_key = tideway_ok(&["partners", "api-key", "--database-url", &db.url])
        .await
        .trim()
        .to_owned();
    let import_key = tideway_ok(&[
        "partners",
        "import-key",
        "--database-url",
        &db.url,
        "--workspace",
        "default",
    ])
    .await
    .trim()
    .to_owned();
    let hook_secret = tideway_ok(&[
        "partners",
        "heap-webhook-secret",
        "--database-url",
        &db.url,
        "--workspace",
        "default",
    ])
    .await
    .trim()
    .to_owned();

    // A Current created through node A, a segment through node B.
    let (status, current) = management(
        &apis[0],
        reqwest::Method::POST,
        "/api/v1/currents",
        &key,
        Some(
            json!({"name": "sink", "kind": "custom_http", "endpoint": sink.url,
            "categories": ["customer_behavior", "user"], "batch_size": BATCH_SIZE,
            "max_in_flight": IN_FLIGHT, "flush_interval_ms": 20, "launch": true}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{current}");
    let (status, named) = try_post(
        &apis[1],
        "/partners/heap/cohorts",
        "",
        &json!({"partner_api_key": partner_key, "client_secret": import_key, "cohort_id": "trial",
            "name": "Trial", "created_at": "2026-11-01T00:00:00Z"}),
    )
    .await
    .expect("node B answers");
    assert_eq!(status, 201, "{named}");
    let (status, segment) = management(
        &apis[1],
        reqwest::Method::POST,
        "/api/v1/segments",
        &key,
        Some(json!({"name": "trial", "filter":
            {"cohort": {"partner": "heap", "cohort_id": "trial", "op": "includes"}}})),
    )
    .await;
    assert_eq!(status, 201, "{segment}");
    let segment_id = segment["id"].as_str().unwrap().to_owned();

    // Writers alternate between the nodes; while a node is down its share goes to the other.
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let nodes_now = Arc::new(std::sync::Mutex::new(apis.clone()));
    let dead = Arc::new(std::sync::Mutex::new(None::<usize>));
    let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (nodes_now, key, ledger, dead, rounds) = (
            Arc::clone(&nodes_now),
            key.clone(),
            Arc::clone(&ledger),
            Arc::clone(&dead),
            Arc::clone(&rounds),
        );
        let (partner_key, import_key, hook_secret) =
            (partner_key.clone(), import_key.clone(), hook_secret.clone());
        writers.push(tokio::spawn(async move {
            for n in 0..ROUNDS {
                let pick = (writer + n) % 2;
                let node = match *dead.lock().unwrap() {
                    Some(d) if d == pick => 1 - pick,
                    _ => pick,
                };
                let api = nodes_now.lock().unwrap()[node].clone();
                write_round(
                    &api,
                    &key,
                    (&partner_key, &import_key),
                    &hook_secret,
                    writer,
                    n,
                    &ledger,
                )
                .await;
                rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }));
    }

    // Kill the lease holder once the sink has seen deliveries and the writers are under way;
    // bring it back while they go on.
    let started = Instant::now();
    let holder = loop {
        let delivered = sink.unique().await;
        let done = rounds.load(std::sync::atomic::Ordering::SeqCst);
        if delivered > 200 && done >= WRITERS * 10 {
            let paths = [dirs[0].as_path(), dirs[1].as_path()];
            if let Some(holder) = lease_holder(&db, &paths).await {
                break holder;
            }
        }
        assert!(started.elapsed() < DEADLINE, "no deliveries to the sink");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let survivor = 1 - holder;
    *dead.lock().unwrap() = Some(holder);
    nodes[holder].take().unwrap().kill9().await;
    let killed_at_round = rounds.load(std::sync::atomic::Ordering::SeqCst);
    // Let the survivor carry the writes, and take the Current over, before the restart.
    let started = Instant::now();
    while lease_holder(&db, &[dirs[0].as_path(), dirs[1].as_path()]).await != Some(survivor) {
        assert!(
            started.elapsed() < DEADLINE,
            "the survivor never took the Current's lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restarted = Server::start(&dirs[holder], &database).await;
    nodes_now.lock().unwrap()[holder] = Api::new(&restarted.url);
    *dead.lock().unwrap() = None;
    nodes[holder] = Some(restarted);
    for w in writers {
        w.await.unwrap();
    }
    let last_write = Instant::now();
    let apis = nodes_now.lock().unwrap().clone();
    let ledger = ledger.lock().await;
    assert!(
        rounds.load(std::sync::atomic::Ordering::SeqCst) > killed_at_round,
        "writes went on after the kill"
    );

    // Both nodes — the survivor and the restarted one, each following the shared feed — agree
    // on the segment within 1 s of the last acknowledged write.
    let heap_members = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM cohort_members m JOIN cohorts c ON c.workspace_id = m.workspace_id AND c.id = m.cohort WHERE c.cohort_id = 'trial'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0) as u64;
    assert!(heap_members as usize >= ledger.cohort_members.len());
    let agreed = loop {
        let sizes = [
            segment_size(&apis[0], &key, &segment_id).await,
            segment_size(&apis[1], &key, &segment_id).await,
        ];
        if sizes == [heap_members, heap_members] {
            break last_write.elapsed();
        }
        assert!(
            last_write.elapsed() < DEADLINE,
            "sizes {sizes:?}, {heap_members} members in the database"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("both nodes agree on the segment {agreed:?} after the last write");
    assert!(
        agreed <= Duration::from_secs(1),
        "the nodes agreed only {agreed:?} after the last write"
    );
    let cohorts: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM cohorts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        cohorts, 2,
        "the partner cohort and the Heap webhook's segment"
    );

    // Every acknowledged write is readable, through either node.
    assert!(
        ledger.acked_users.len() >= 25 * WRITERS * (ROUNDS - 5),
        "too few writes acknowledged"
    );
    for (i, chunk) in ledger.acked_users.chunks(50).enumerate() {
        let exported = apis[i % 2].export(&key, chunk).await;
        let users = exported["users"].as_array().unwrap();
        assert_eq!(
            users.len(),
            chunk.len(),
            "acknowledged users missing: {exported}"
        );
        for u in users {
            assert_eq!(u["custom_attributes"]["plan"], "trial", "{u}");
        }
    }

    // Every logged event reached the sink at least once, with its id; nothing else did; the
    // duplicates are the batches in flight at the kill, re-sent by the node that took over.
    let expected = logged_ids(&db).await;
    let started = Instant::now();
    while (sink.unique().await as usize) < expected.len() {
        assert!(
            started.elapsed() < DEADLINE,
            "the sink has {} of {} events",
            sink.unique().await,
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stored, duplicates) = sink.all().await;
    for id in &expected {
        assert!(stored.contains_key(id), "event {id} never reached the sink");
    }
    assert_eq!(
        stored.len(),
        expected.len(),
        "the sink holds only logged events"
    );
    // Every consumer start after the first (the takeover, and any later change of hands on a
    // busy machine) may re-send the batches in flight before it; the killed node's starts died
    // with it, and its first start re-sent nothing.
    let mut starts = 0;
    for api in &apis {
        starts += consumer_starts(api).await;
    }
    assert!(starts >= 1, "the survivor took the Current over");
    let bound = starts * IN_FLIGHT * BATCH_SIZE;
    eprintln!(
        "{} events, {} writes of unknown outcome, {starts} consumer starts on the live nodes, {duplicates} duplicates (bound {bound})",
        expected.len(),
        ledger.unknown
    );
    if duplicates > bound {
        for entry in std::fs::read_dir(tmp.path()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.contains(".log-") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                for line in text
                    .lines()
                    .filter(|l| l.contains("urrent") || l.contains("lease"))
                {
                    eprintln!("{name}: {line}");
                }
            }
        }
    }
    assert!(duplicates <= bound, "{duplicates} duplicates > {bound}");

    for node in nodes.into_iter().flatten() {
        assert!(node.terminate().await, "a node did not stop cleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_works_on_postgres_and_says_what_is_wrong_with_a_database_url() {
    let db = TestDb::create().await;
    let url = db.url.as_str();
    let app_group_id = tideway_ok(&["workspaces", "create", "acme", "--database-url", url]).await;
    assert_eq!(app_group_id.trim().len(), 36, "{app_group_id}");
    let listed = tideway_ok(&["workspaces", "list", "--database-url", url]).await;
    assert!(listed.contains("acme"), "{listed}");
    let key = tideway_ok(&[
        "keys",
        "create",
        "--database-url",
        url,
        "--workspace",
        "acme",
        "--permissions",
        "all",
    ])
    .await
    .trim()
    .to_owned();
    let keys = tideway_ok(&["keys", "list", "--database-url", url, "--workspace", "acme"]).await;
    assert!(keys.contains(&key[..8]), "{keys}");

    // A server on the same database accepts the key at once, and an export from the database
    // sees what it acknowledged.
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("node"), &["--database-url", url]).await;
    let api = Api::new(&server.url);
    let (status, body) = api
        .post_ok(
            "/users/track",
            &key,
            &json!({"attributes": [{"external_id": "u1", "plan": "pro"}, {"external_id": "u2", "plan": "free"}]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, segment) = api
        .post_ok(
            "/api/v1/segments",
            &key,
            &json!({"name": "pro", "filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}}),
        )
        .await;
    assert_eq!(status, 201, "{segment}");
    let id = segment["id"].as_str().unwrap();
    let exported = tideway_ok(&[
        "segments",
        "export",
        id,
        "--format",
        "jsonl",
        "--database-url",
        url,
        "--workspace",
        "acme",
    ])
    .await;
    let rows: Vec<Value> = exported
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{exported}");
    assert_eq!(rows[0]["external_id"], "u1");
    let revoked = tideway(&[
        "keys",
        "revoke",
        "--database-url",
        url,
        "--workspace",
        "acme",
        &key[..8],
    ])
    .await;
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let (status, _) = api
        .post_ok(
            "/users/track",
            &key,
            &json!({"attributes": [{"external_id": "u3"}]}),
        )
        .await;
    assert_eq!(
        status, 401,
        "a key revoked through the CLI is refused by the server at once"
    );
    assert!(server.terminate().await);

    // Errors name the database by its flags, and say what to do.
    let missing = tideway(&["keys", "list", "--database-url", url, "--workspace", "nope"]).await;
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains(&format!("tideway workspaces list --database-url {url}")),
        "{}",
        stderr(&missing)
    );
    let wrong = tideway(&["workspaces", "list", "--database-url", "mysql://x@y/z"]).await;
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("is not a PostgreSQL URL"),
        "{}",
        stderr(&wrong)
    );
    let down = tideway(&[
        "workspaces",
        "list",
        "--database-url",
        "postgres://tideway:hunter2@127.0.0.1:1/tideway",
    ])
    .await;
    assert!(!down.status.success());
    let said = stderr(&down);
    assert!(said.contains("check that the server is running"), "{said}");
    assert!(
        said.contains("postgres://tideway:***@127.0.0.1:1/tideway") && !said.contains("hunter2"),
        "the password never shows: {said}"
    );
    let down = tideway(&[
        "workspaces",
        "list",
        "--database-url",
        "postgres://tideway@127.0.0.1:1/tideway?password=hunter2",
    ])
    .await;
    let said = stderr(&down);
    assert!(
        said.contains("?password=***") && !said.contains("hunter2"),
        "nor as a parameter: {said}"
    );
    // An empty setting is refused, not taken for "SQLite in the data directory".
    let empty = tideway(&["workspaces", "list", "--database-url", ""]).await;
    assert!(!empty.status.success());
    assert!(
        stderr(&empty).contains("set but empty"),
        "{}",
        stderr(&empty)
    );

    // An admin command pointed at a database no node has set up says so, and leaves it empty.
    let other = TestDb::create().await;
    let blank = tideway(&["workspaces", "list", "--database-url", &other.url]).await;
    assert!(!blank.status.success());
    assert!(
        stderr(&blank).contains("has no Tideway tables"),
        "{}",
        stderr(&blank)
    );
    let tables: i64 = other
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "no table was created");
}
