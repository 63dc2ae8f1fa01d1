//! Integration tests of the stores against real databases. The behaviours every backend shares
//! are in the conformance suite (`conformance/`), run on SQLite and PostgreSQL; the other
//! modules test what one backend has of its own. Here: the SQLite store's persistence across
//! reopen, and two processes' worth of connections on one file.

use tideway_core::store::prelude::*;

use serde_json::{Value, json};
use tideway_core::clock::Millis;
use tideway_core::ids::ExternalId;
use tideway_core::keys::{IpAllowlist, PermissionSet, Secret};
use tideway_core::store::{NewApiKey, Workspace};
use tideway_core::track::parse_track;
use tideway_core::users::ExportRequest;
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

mod behind;
mod conformance;
mod feed_model;
mod files;
mod pg;
mod pg_admin;
mod pg_currents;
mod pg_segments;
mod pg_users;
mod plans;
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
