//! `kill -9` durability: every `/users/track` request that got a 201 survives a SIGKILL of the
//! server mid-stream, fully (profile attributes and event counts, via `/users/export/ids`) and
//! with its Currents events in the log exactly once; a request in flight at the kill is applied
//! entirely or not at all. Three kills in a row on the same data directory.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tideway_core::currents::EventType;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use crate::support::{Api, Server, initial_admin_key};

const USERS_PER_REQUEST: usize = 3;
const EVENTS_PER_USER: usize = 2;
const WRITERS: usize = 4;
const ROUNDS: usize = 3;
/// Acknowledged requests per round before the kill (the writers keep going while it happens).
const ACKED_BEFORE_KILL: usize = 150;

/// One request the test sent: its id and the users it names.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    users: Vec<String>,
}

fn request(round: usize, writer: usize, n: usize) -> (Sent, Value) {
    let id = format!("r{round}-w{writer}-n{n}");
    let users: Vec<String> = (0..USERS_PER_REQUEST)
        .map(|u| format!("dur-{id}-u{u}"))
        .collect();
    let attributes: Vec<Value> = users
        .iter()
        .map(|u| json!({"external_id": u, "first_name": "Dur", "req": id, "round": round}))
        .collect();
    let events: Vec<Value> = users
        .iter()
        .flat_map(|u| {
            (0..EVENTS_PER_USER).map(move |k| json!({"external_id": u, "name": "dur_event", "time": "2024-05-01T10:00:00Z", "properties": {"k": k}}))
        })
        .collect();
    (
        Sent { id, users },
        json!({"attributes": attributes, "events": events}),
    )
}

/// What one round's writers saw.
#[derive(Default)]
struct Outcomes {
    acked: Vec<Sent>,
    /// Sent but not acknowledged (in flight at the kill): may or may not have been applied.
    unknown: Vec<Sent>,
}

async fn stream_until_killed(server: Server, api: &Api, key: &str, round: usize) -> Outcomes {
    let acked_count = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let (api, key, acked_count, killed) = (
            api.clone(),
            key.to_owned(),
            acked_count.clone(),
            killed.clone(),
        );
        writers.spawn(async move {
            let mut out = Outcomes::default();
            // Bounded: a writer stops at its first failure after the kill, or after 5,000 requests.
            for n in 0..5_000 {
                let (sent, body) = request(round, writer, n);
                match api.post("/users/track", &key, &body).await {
                    Ok((201, response)) => {
                        assert_eq!(response["message"], "success", "{response}");
                        out.acked.push(sent);
                        acked_count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok((status, response)) => {
                        assert!(
                            killed.load(Ordering::SeqCst),
                            "HTTP {status} before the kill: {response}"
                        );
                        out.unknown.push(sent);
                        break;
                    }
                    Err(_) => {
                        assert!(
                            killed.load(Ordering::SeqCst),
                            "request failed before the kill"
                        );
                        out.unknown.push(sent);
                        break;
                    }
                }
            }
            out
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked_count.load(Ordering::SeqCst) < ACKED_BEFORE_KILL {
        assert!(
            Instant::now() < deadline,
            "the writers got too few 201s before the deadline"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killed.store(true, Ordering::SeqCst);
    server.kill9().await;
    let mut all = Outcomes::default();
    while let Some(joined) = writers.join_next().await {
        let out = joined.expect("writer task");
        all.acked.extend(out.acked);
        all.unknown.extend(out.unknown);
    }
    all
}

/// Exported profiles by external id, 50 ids per call.
async fn export_all(api: &Api, key: &str, sent: &[Sent]) -> HashMap<String, Value> {
    let ids: Vec<String> = sent.iter().flat_map(|s| s.users.iter().cloned()).collect();
    let mut found = HashMap::new();
    for chunk in ids.chunks(50) {
        let body = api.export(key, chunk).await;
        for user in body["users"].as_array().expect("users array") {
            found.insert(
                user["external_id"]
                    .as_str()
                    .expect("external_id")
                    .to_owned(),
                user.clone(),
            );
        }
    }
    found
}

fn is_complete(sent: &Sent, user: &str, profile: &Value) -> bool {
    let events = profile["custom_events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    profile["custom_attributes"]["req"] == sent.id.as_str()
        && events
            .iter()
            .any(|e| e["name"] == "dur_event" && e["count"] == EVENTS_PER_USER as u64)
        && profile["external_id"] == user
}

async fn check_profiles(api: &Api, key: &str, acked: &[Sent], unknown: &[Sent]) {
    let found = export_all(api, key, acked).await;
    for sent in acked {
        for user in &sent.users {
            let profile = found
                .get(user)
                .unwrap_or_else(|| panic!("acknowledged request {} lost user {user}", sent.id));
            assert!(
                is_complete(sent, user, profile),
                "acknowledged request {} is incomplete for {user}: {profile}",
                sent.id
            );
        }
    }
    let found = export_all(api, key, unknown).await;
    for sent in unknown {
        let present: Vec<&String> = sent
            .users
            .iter()
            .filter(|u| found.contains_key(*u))
            .collect();
        assert!(
            present.is_empty() || present.len() == sent.users.len(),
            "request {} in flight at the kill was applied partially: {present:?}",
            sent.id
        );
        for user in present {
            assert!(
                is_complete(sent, user, &found[user]),
                "request {} in flight at the kill is incomplete for {user}",
                sent.id
            );
        }
    }
}

/// Every event of the default workspace, oldest first, read straight from the store.
async fn read_log(data_dir: &std::path::Path) -> Vec<tideway_core::store::LoggedEvent> {
    use tideway_core::store::prelude::*;
    let store = SqliteStore::open(&data_dir.join("tideway.sqlite"), SqliteOptions::default())
        .expect("open the store");
    let workspace = store
        .workspace_by_name("default")
        .await
        .expect("read workspaces")
        .expect("the default workspace");
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .read_events(workspace.id, after, 1_000)
            .await
            .expect("read events");
        let Some(last) = page.last() else { break };
        after = last.seq;
        events.extend(page);
    }
    events
}

fn check_log(events: &[tideway_core::store::LoggedEvent], acked: &[Sent], unknown: &[Sent]) {
    let mut ids = HashSet::new();
    // (external id, k) → how many custom events; external id → how many profile updates.
    let mut custom: HashMap<(String, u64), usize> = HashMap::new();
    let mut updates: HashMap<String, usize> = HashMap::new();
    let mut last_seq = 0;
    for logged in events {
        assert!(logged.seq > last_seq, "log positions must increase");
        last_seq = logged.seq;
        assert!(
            ids.insert(logged.event.id.0.clone()),
            "event id {} appears twice in the log",
            logged.event.id.0
        );
        let body = logged.event.body_value();
        assert_eq!(body["id"], logged.event.id.0.as_str());
        let user = body["user"]["external_user_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match logged.event.event_type {
            EventType::CustomEvent => {
                assert_eq!(body["properties"]["name"], "dur_event");
                let k = body["properties"]["custom_properties"]["k"]
                    .as_u64()
                    .expect("k");
                *custom.entry((user, k)).or_default() += 1;
            }
            EventType::ProfileUpdate => *updates.entry(user).or_default() += 1,
            other => panic!("unexpected event type {other:?}"),
        }
    }
    for sent in acked {
        for user in &sent.users {
            assert_eq!(
                updates.get(user),
                Some(&1),
                "profile update of {user} (request {}) must be logged exactly once",
                sent.id
            );
            for k in 0..EVENTS_PER_USER as u64 {
                assert_eq!(
                    custom.get(&(user.clone(), k)),
                    Some(&1),
                    "event {k} of {user} (request {}) must be logged exactly once",
                    sent.id
                );
            }
        }
    }
    for sent in unknown {
        for user in &sent.users {
            assert!(
                updates.get(user).copied().unwrap_or(0) <= 1,
                "{user} updated twice"
            );
            for k in 0..EVENTS_PER_USER as u64 {
                assert!(
                    custom.get(&(user.clone(), k)).copied().unwrap_or(0) <= 1,
                    "event {k} of {user} logged twice"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    // Lift the limits the verification would otherwise hit (export is 250/min by default).
    let flags = [
        "--track-rate-limit",
        "1000000",
        "--export-rate-limit",
        "1000000",
    ];
    let mut server = Server::start(&data_dir, &flags).await;
    let key = initial_admin_key(&data_dir);
    let mut acked = Vec::new();
    let mut unknown = Vec::new();
    for round in 0..ROUNDS {
        let api = Api::new(&server.url);
        let out = stream_until_killed(server, &api, &key, round).await;
        assert!(out.acked.len() >= ACKED_BEFORE_KILL);
        eprintln!(
            "round {round}: {} requests acknowledged, {} in flight at the kill",
            out.acked.len(),
            out.unknown.len()
        );
        acked.extend(out.acked);
        unknown.extend(out.unknown);
        server = Server::start(&data_dir, &flags).await;
        assert!(
            server.preamble.is_empty(),
            "a restart must not mint a new admin key: {:?}",
            server.preamble
        );
        check_profiles(&Api::new(&server.url), &key, &acked, &unknown).await;
    }
    assert!(
        server.terminate().await,
        "the server must exit 0 on SIGTERM"
    );
    let events = read_log(&data_dir).await;
    eprintln!("{} events in the log", events.len());
    check_log(&events, &acked, &unknown);
}
