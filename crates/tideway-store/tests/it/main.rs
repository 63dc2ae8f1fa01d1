//! Integration tests of the SQLite store against a real database file: group commit, savepoint
//! isolation, identity rules end to end, persistence across reopen, and two processes' worth of
//! connections on one file.

use std::collections::HashSet;
use std::sync::Arc;
use tideway_core::store::prelude::*;

use serde_json::{Value, json};
use tideway_core::clock::Millis;
use tideway_core::ids::{AliasLabel, AliasName, DeviceId, ExternalId, UserAlias};
use tideway_core::keys::{IpAllowlist, PermissionSet, Secret};
use tideway_core::store::{NewApiKey, StoreError, Workspace};
use tideway_core::track::parse_track;
use tideway_core::users::{ExportRequest, IdentifyItem, IdentifySource, RenameItem};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

mod behind;
mod cohorts;
mod conformance;
mod files;
mod pg;
mod pg_admin;
mod pg_currents;
mod pg_segments;
mod pg_users;
mod postgres;
mod recovery;
mod segment_feed;
mod wal;

const NOW: Millis = Millis(1_750_000_000_000);

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("t.sqlite"), SqliteOptions::default()).expect("open store")
}

async fn track(
    store: &SqliteStore,
    ws: &Workspace,
    body: Value,
) -> tideway_core::users::TrackOutcome {
    let req = parse_track(body.as_object().expect("object")).expect("parses");
    store.track(ws, req, NOW).await.expect("track")
}

async fn export_one(
    store: &SqliteStore,
    ws: &Workspace,
    ext: &str,
) -> Option<serde_json::Map<String, Value>> {
    let req = ExportRequest {
        external_ids: vec![ExternalId::parse(ext).unwrap()],
        ..ExportRequest::default()
    };
    store
        .export_ids(ws, req)
        .await
        .expect("export")
        .users
        .into_iter()
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits_and_log_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tasks.push(tokio::spawn(async move {
            track(&store, &ws, json!({
                "attributes": [{"external_id": format!("u{i}"), "plan": "pro"}],
                "events": [{"external_id": format!("u{i}"), "name": "opened", "time": "2025-01-01T00:00:00Z"}],
            }))
            .await
        }));
    }
    for t in tasks {
        let out = t.await.unwrap();
        assert_eq!((out.attributes_processed, out.events_processed), (1, 1));
    }
    let events = store.read_events(ws.id, 0, 10_000).await.unwrap();
    assert_eq!(
        events.len(),
        400,
        "one profile update and one custom event per request"
    );
    let ids: HashSet<_> = events.iter().map(|e| e.event.id.0.clone()).collect();
    assert_eq!(ids.len(), 400, "event ids are unique");
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_job_rolls_back_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let dup = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.create_workspace("w", NOW).await })
    };
    let ok = {
        let store = Arc::clone(&store);
        let ws = ws.clone();
        tokio::spawn(async move {
            track(
                &store,
                &ws,
                json!({"attributes": [{"external_id": "a", "x": 1}]}),
            )
            .await
        })
    };
    assert!(matches!(dup.await.unwrap(), Err(StoreError::Conflict(_))));
    assert_eq!(ok.await.unwrap().attributes_processed, 1);
    assert!(export_one(&store, &ws, "a").await.is_some());
    assert_eq!(store.list_workspaces().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reopen_and_a_second_connection_can_write_beside_the_first() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(&dir);
        let ws = store.create_workspace("w", NOW).await.unwrap();
        track(
            &store,
            &ws,
            json!({"attributes": [{"external_id": "a", "first_name": "Ann"}]}),
        )
        .await;
        // A second store on the same file, as the admin CLI opens it beside a running server.
        let cli = open(&dir);
        let secret = Secret::new("k-123456789".into());
        cli.create_api_key(NewApiKey {
            workspace: ws.id,
            name: "cli".into(),
            prefix: "k-123456".into(),
            hash: secret.hash(),
            permissions: PermissionSet::all(),
            allow: IpAllowlist::default(),
            created_at: NOW,
        })
        .await
        .unwrap();
        assert!(
            store.find_api_key(secret.hash()).await.unwrap().is_some(),
            "the server sees the CLI's key"
        );
        assert!(cli.revoke_api_key(ws.id, "k-123456", NOW).await.unwrap());
        assert!(
            store.find_api_key(secret.hash()).await.unwrap().is_none(),
            "and its revocation"
        );
    }
    let store = open(&dir);
    let ws = store.workspace_by_name("w").await.unwrap().unwrap();
    let user = export_one(&store, &ws, "a").await.unwrap();
    assert_eq!(user["first_name"], "Ann");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_users_identify_in_place_or_merge_and_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(&store, &ws, json!({"attributes": [{"device_id": "d1", "color": "red"}, {"device_id": "d2", "color": "blue", "size": 3}]})).await;
    // d1's user becomes identified in place.
    track(
        &store,
        &ws,
        json!({"attributes": [{"external_id": "alice", "device_id": "d1", "plan": "pro"}]}),
    )
    .await;
    let alice = export_one(&store, &ws, "alice").await.unwrap();
    assert_eq!(
        alice["custom_attributes"],
        json!({"color": "red", "plan": "pro"})
    );
    // d2's anonymous user merges into the existing alice: alice's values win, new ones copy.
    let items = vec![(
        0,
        IdentifyItem {
            external_id: ExternalId::parse("alice").unwrap(),
            source: IdentifySource::Device(DeviceId::parse("d2").unwrap()),
        },
    )];
    assert_eq!(store.identify(&ws, items, NOW).await.unwrap().processed, 1);
    let alice = export_one(&store, &ws, "alice").await.unwrap();
    assert_eq!(
        alice["custom_attributes"],
        json!({"color": "red", "plan": "pro", "size": 3})
    );
    assert_eq!(alice["device_ids"], json!(["d1", "d2"]));
    let types: Vec<&str> = store
        .read_events(ws.id, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event.event_type.as_str())
        .collect::<Vec<_>>()
        .into_iter()
        .collect();
    assert!(types.contains(&"users.UserOrphan"));
    // The device still resolves for export.
    let by_device = store
        .export_ids(
            &ws,
            ExportRequest {
                device_id: Some(DeviceId::parse("d2").unwrap()),
                ..ExportRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(by_device.users[0]["external_id"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_external_ids_resolve_until_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let ws = store.create_workspace("w", NOW).await.unwrap();
    track(
        &store,
        &ws,
        json!({"attributes": [{"external_id": "old", "x": 1}, {"external_id": "taken", "x": 2}]}),
    )
    .await;
    let ext = |s: &str| ExternalId::parse(s).unwrap();
    let out = store
        .rename_external_ids(
            &ws,
            vec![
                RenameItem {
                    current: ext("old"),
                    new: ext("new"),
                },
                RenameItem {
                    current: ext("taken"),
                    new: ext("new"),
                },
            ],
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(out.renamed, [ext("new")]);
    assert_eq!(out.errors.len(), 1);
    assert_eq!(
        export_one(&store, &ws, "old").await.unwrap()["external_id"],
        "new"
    );
    let removed = store
        .remove_external_ids(&ws, vec![ext("old"), ext("new")])
        .await
        .unwrap();
    assert_eq!(removed.removed, [ext("old")]);
    assert_eq!(removed.errors.len(), 1, "a current id is not removable");
    assert!(export_one(&store, &ws, "old").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let a = store.create_workspace("a", NOW).await.unwrap();
    let b = store.create_workspace("b", NOW).await.unwrap();
    track(
        &store,
        &a,
        json!({"attributes": [{"external_id": "same", "where": "a"}]}),
    )
    .await;
    track(
        &store,
        &b,
        json!({"attributes": [{"external_id": "same", "where": "b"}]}),
    )
    .await;
    assert_eq!(
        export_one(&store, &a, "same").await.unwrap()["custom_attributes"]["where"],
        "a"
    );
    assert_eq!(
        export_one(&store, &b, "same").await.unwrap()["custom_attributes"]["where"],
        "b"
    );
    assert_eq!(store.read_events(a.id, 0, 100).await.unwrap().len(), 1);
    let alias = UserAlias {
        label: AliasLabel::parse("l").unwrap(),
        name: AliasName::parse("n").unwrap(),
    };
    let req = ExportRequest {
        aliases: vec![alias],
        ..ExportRequest::default()
    };
    assert!(store.export_ids(&b, req).await.unwrap().users.is_empty());
}
