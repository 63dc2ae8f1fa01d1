//! File modes: the database holds Currents bearer tokens, the Heap webhook secret, partner API
//! keys and every user's profile, so every file the store creates is readable by its owner
//! only, and files left looser are tightened when the store opens them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tideway_core::store::prelude::*;

use serde_json::json;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::{NOW, track};

/// Every file in `dir` with its permission bits.
fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut modes: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            (entry.file_name().to_string_lossy().into_owned(), mode)
        })
        .collect();
    modes.sort();
    modes
}

async fn write_some(store: &SqliteStore) {
    let ws = match store.workspace_by_name("w").await.unwrap() {
        Some(ws) => ws,
        None => store.create_workspace("w", NOW).await.unwrap(),
    };
    let attributes: Vec<_> = (0..50)
        .map(|i| json!({"external_id": format!("u{i}"), "plan": "pro"}))
        .collect();
    track(store, &ws, json!({"attributes": attributes})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_database_file_is_readable_by_its_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("t.sqlite"), SqliteOptions::default()).unwrap();
    write_some(&store).await;
    let found = modes(dir.path());
    let names: Vec<&str> = found.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["t.sqlite", "t.sqlite-shm", "t.sqlite-wal"]);
    for (name, mode) in &found {
        assert_eq!(*mode, 0o600, "{name} is {mode:o}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looser_database_files_are_tightened_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sqlite");
    // A store that crashed (its WAL and shared memory left behind) from a version that
    // created its files world-readable.
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    write_some(&store).await;
    std::mem::forget(store);
    for (name, _) in modes(dir.path()) {
        std::fs::set_permissions(
            dir.path().join(name),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
    write_some(&store).await;
    let found = modes(dir.path());
    assert_eq!(found.len(), 3, "{found:?}");
    for (name, mode) in &found {
        assert_eq!(*mode, 0o600, "{name} is {mode:o}");
    }
}
