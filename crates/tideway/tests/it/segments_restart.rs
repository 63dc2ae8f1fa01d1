//! The segment index across restarts of the real binary: after a clean stop the first `/size`
//! comes from the snapshot in `<data-dir>/segment-index/` (the process's own `/metrics` shows a
//! snapshot load and no load from the store) and still sees writes made after it; after a
//! `kill -9` the snapshot is older than the store and is caught up from the feed; a damaged
//! snapshot is thrown away and the index rebuilt, with the same answers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::{Api, Server, initial_admin_key};

/// `GET path` with a Bearer key; status and JSON body.
async fn get(api: &Api, key: &str, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", api.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn size(api: &Api, key: &str, id: &str) -> u64 {
    let (status, body) = get(api, key, &format!("/api/v1/segments/{id}/size")).await;
    assert_eq!(status, 200, "{body}");
    body["size"].as_u64().expect("a size")
}

async fn track_pro(api: &Api, key: &str, ids: &[&str]) {
    let attributes: Vec<Value> = ids
        .iter()
        .map(|id| json!({"external_id": id, "plan": "pro"}))
        .collect();
    let (status, body) = api
        .post_ok("/users/track", key, &json!({ "attributes": attributes }))
        .await;
    assert_eq!(status, 201, "{body}");
}

/// The value of `tideway_segment_index_loads_total{source=...}` in the server's `/metrics`
/// (0 when the series is absent).
async fn index_loads(api: &Api, source: &str) -> u64 {
    let text = reqwest::get(format!("{}/metrics", api.url))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    let wanted = format!("source=\"{source}\"");
    text.lines()
        .filter(|l| l.starts_with("tideway_segment_index_loads_total") && l.contains(&wanted))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn snapshots(data: &Path) -> Vec<PathBuf> {
    let dir = data.join("segment-index");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "snap"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_survives_restarts_and_catches_up_after_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");

    // First life: three users, a segment, a first size (a full build, then a snapshot).
    let server = Server::start(&data, &[]).await;
    let key = initial_admin_key(&data);
    let api = Api::new(&server.url);
    track_pro(&api, &key, &["u1", "u2", "u3"]).await;
    let (status, body) = api
        .post_ok(
            "/api/v1/segments",
            &key,
            &json!({"name": "pro", "filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(size(&api, &key, &id).await, 3);
    assert_eq!(index_loads(&api, "store").await, 1);
    assert!(server.terminate().await, "a clean stop");

    let files = snapshots(&data);
    assert_eq!(files.len(), 1, "one workspace, one snapshot: {files:?}");
    let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the snapshot holds user ids: owner only");

    // Second life: the index comes from the snapshot, and a write after the restart counts.
    let server = Server::start(&data, &[]).await;
    let api = Api::new(&server.url);
    track_pro(&api, &key, &["u4"]).await;
    assert_eq!(size(&api, &key, &id).await, 4);
    assert_eq!(index_loads(&api, "snapshot").await, 1);
    assert_eq!(
        index_loads(&api, "store").await,
        0,
        "a restart with a snapshot never loads every profile"
    );
    // Killed: the snapshot on disk (written at the clean stop) does not know u4 or u5.
    track_pro(&api, &key, &["u5"]).await;
    server.kill9().await;

    // Third life: caught up from the feed past the snapshot's position.
    let server = Server::start(&data, &[]).await;
    let api = Api::new(&server.url);
    assert_eq!(size(&api, &key, &id).await, 5);
    assert_eq!(index_loads(&api, "snapshot").await, 1);
    assert_eq!(index_loads(&api, "store").await, 0);
    assert!(server.terminate().await);

    // A damaged snapshot: thrown away, rebuilt from the store, same answer.
    let files = snapshots(&data);
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&files[0], &bytes).unwrap();
    let server = Server::start(&data, &[]).await;
    let api = Api::new(&server.url);
    assert_eq!(size(&api, &key, &id).await, 5);
    assert_eq!(index_loads(&api, "snapshot").await, 0);
    assert_eq!(index_loads(&api, "store").await, 1);
    assert!(server.terminate().await);
}
