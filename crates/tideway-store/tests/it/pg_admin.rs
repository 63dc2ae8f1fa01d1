//! PostgreSQL store: workspaces and credentials. The same script of admin calls runs on SQLite
//! and on PostgreSQL and must give the same answers (SQLite is the reference); then what only a
//! shared database has: two nodes see each other's keys, revocations and partner switches at
//! once, race for a partner's first key and agree, and a missing workspace or a damaged row is
//! an error, not a panic.

use std::fmt::Debug;
use std::sync::Arc;

use tideway_core::clock::Millis;
use tideway_core::ids::{AliasLabel, WorkspaceId};
use tideway_core::keys::{IpAllowlist, Permission, Secret};
use tideway_core::store::{AdminStore, NewApiKey, StoreError, Workspace};
use tideway_store::sqlite::{SqliteOptions, SqliteStore};

use super::pg::TestDb;

const NOW: Millis = Millis(1_750_000_000_000);

fn secret(s: &str) -> Secret {
    Secret::new(s.to_owned())
}

fn new_key(workspace: WorkspaceId, name: &str, secret: &Secret) -> NewApiKey {
    NewApiKey {
        workspace,
        name: name.to_owned(),
        prefix: secret.expose().chars().take(8).collect(),
        hash: secret.hash(),
        permissions: [Permission::UsersTrack, Permission::UsersExportIds]
            .into_iter()
            .collect(),
        allow: IpAllowlist::parse_all(["10.0.0.0/8", "127.0.0.1"]).unwrap(),
        created_at: NOW,
    }
}

/// Records each answer; a workspace's random `app_group_id` is replaced by a stable name.
#[derive(Default)]
struct Transcript {
    lines: Vec<String>,
    app_group_ids: Vec<String>,
}

impl Transcript {
    fn note(&mut self, what: &str, answer: impl Debug) {
        let mut line = format!("{what}: {answer:?}");
        for (i, id) in self.app_group_ids.iter().enumerate() {
            line = line.replace(id, &format!("<app group {i}>"));
        }
        self.lines.push(line);
    }

    fn workspace(&mut self, what: &str, answer: Result<Workspace, StoreError>) -> Workspace {
        let ws = answer.expect(what);
        assert_eq!(
            uuid::Uuid::parse_str(&ws.app_group_id)
                .unwrap()
                .hyphenated()
                .to_string(),
            ws.app_group_id,
            "a hyphenated UUID"
        );
        self.app_group_ids.push(ws.app_group_id.clone());
        self.note(what, &ws);
        ws
    }
}

/// Every admin call, with its edge cases, on `store`.
async fn script(store: &impl AdminStore) -> Vec<String> {
    let mut t = Transcript::default();
    let a = t.workspace("create a", store.create_workspace("  a  ", NOW).await);
    let b = t.workspace(
        "create b",
        store.create_workspace("b", Millis(NOW.0 + 1)).await,
    );
    t.note("create a again", store.create_workspace("a", NOW).await);
    t.note("create blank", store.create_workspace("   ", NOW).await);
    t.note("by name a", store.workspace_by_name("a").await);
    t.note("by name missing", store.workspace_by_name("nope").await);
    t.note("list", store.list_workspaces().await);

    // REST keys: two share a prefix; revocation by id, by prefix, ambiguous prefix.
    let k1 = secret("key-aaaa-1111");
    let k2 = secret("key-aaaa-2222");
    let k3 = secret("other-3333");
    for (name, s) in [("one", &k1), ("two", &k2), ("three", &k3)] {
        t.note(
            "create key",
            store.create_api_key(new_key(a.id, name, s)).await,
        );
    }
    t.note("find k1", store.find_api_key(k1.hash()).await);
    t.note("find unknown", store.find_api_key(secret("x").hash()).await);
    t.note("list keys a", store.list_api_keys(a.id).await);
    t.note("list keys b", store.list_api_keys(b.id).await);
    t.note(
        "revoke ambiguous",
        store.revoke_api_key(a.id, "key-aaaa", NOW).await,
    );
    t.note(
        "revoke in other ws",
        store.revoke_api_key(b.id, "1", NOW).await,
    );
    t.note(
        "revoke by id",
        store.revoke_api_key(a.id, "1", Millis(NOW.0 + 5)).await,
    );
    t.note("revoke again", store.revoke_api_key(a.id, "1", NOW).await);
    t.note("find revoked", store.find_api_key(k1.hash()).await);
    t.note(
        "revoke prefix now unique",
        store.revoke_api_key(a.id, "key-aaaa", NOW).await,
    );
    t.note(
        "revoke by prefix",
        store.revoke_api_key(a.id, "other-33", NOW).await,
    );
    t.note("list keys after", store.list_api_keys(a.id).await);
    t.note(
        "duplicate secret",
        store
            .create_api_key(new_key(b.id, "dup", &k3))
            .await
            .map(|k| k.id),
    );

    // Partner API keys: the first `fresh` wins for ever.
    t.note(
        "partner key",
        store
            .partner_api_key("heap", secret("p-1"), NOW)
            .await
            .map(|s| s.expose().to_owned()),
    );
    t.note(
        "partner key kept",
        store
            .partner_api_key("heap", secret("p-2"), NOW)
            .await
            .map(|s| s.expose().to_owned()),
    );
    t.note(
        "check right",
        store.check_partner_api_key("heap", secret("p-1")).await,
    );
    t.note(
        "check wrong",
        store.check_partner_api_key("heap", secret("p-2")).await,
    );
    t.note(
        "check other partner",
        store.check_partner_api_key("segment", secret("p-1")).await,
    );

    // Data import keys: creating one enables the partner; invalidation; enable/disable.
    let i1 = secret("imp-aaaa-1");
    let i2 = secret("imp-aaaa-2");
    t.note(
        "import key 1",
        store.create_import_key(a.id, "heap", &i1, NOW).await,
    );
    t.note(
        "find import",
        store.find_import_key("heap", i1.hash()).await,
    );
    t.note(
        "find import other partner",
        store.find_import_key("segment", i1.hash()).await,
    );
    t.note(
        "disable",
        store.set_partner_enabled(a.id, "heap", false).await,
    );
    t.note(
        "find disabled",
        store.find_import_key("heap", i1.hash()).await,
    );
    t.note(
        "import key 2 re-enables",
        store
            .create_import_key(a.id, "heap", &i2, Millis(NOW.0 + 9))
            .await,
    );
    t.note(
        "find enabled",
        store.find_import_key("heap", i1.hash()).await,
    );
    t.note("list imports", store.list_import_keys(a.id, "heap").await);
    t.note(
        "list imports other partner",
        store.list_import_keys(a.id, "segment").await,
    );
    t.note(
        "invalidate ambiguous",
        store
            .invalidate_import_key(a.id, "heap", "imp-aaaa", NOW)
            .await,
    );
    t.note(
        "invalidate wrong partner",
        store.invalidate_import_key(a.id, "segment", "1", NOW).await,
    );
    t.note(
        "invalidate by id",
        store
            .invalidate_import_key(a.id, "heap", "1", Millis(NOW.0 + 3))
            .await,
    );
    t.note(
        "find invalidated",
        store.find_import_key("heap", i1.hash()).await,
    );
    t.note(
        "find the other",
        store
            .find_import_key("heap", i2.hash())
            .await
            .map(|o| o.map(|o| o.partner_enabled)),
    );
    t.note(
        "invalidate by prefix",
        store
            .invalidate_import_key(a.id, "heap", "imp-aaaa", NOW)
            .await,
    );
    t.note(
        "list imports after",
        store.list_import_keys(a.id, "heap").await,
    );
    t.note(
        "enable never-keyed partner",
        store.set_partner_enabled(b.id, "segment", true).await,
    );

    // Heap webhook: the secret is made once; the label is replaced only when given.
    let label = AliasLabel::parse("heap_user").unwrap();
    t.note(
        "webhook",
        store.heap_webhook(a.id, secret("wh-1"), None).await,
    );
    t.note(
        "webhook kept",
        store
            .heap_webhook(a.id, secret("wh-2"), Some(Some(label)))
            .await,
    );
    t.note(
        "webhook label kept",
        store.heap_webhook(a.id, secret("wh-3"), None).await,
    );
    t.note(
        "webhook label cleared",
        store.heap_webhook(a.id, secret("wh-4"), Some(None)).await,
    );
    t.note(
        "webhook b",
        store.heap_webhook(b.id, secret("wh-b"), None).await,
    );
    t.note("webhooks", store.heap_webhooks().await);
    t.lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_answer_as_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("t.sqlite"), SqliteOptions::default()).unwrap();
    let expected = script(&sqlite).await;
    let db = TestDb::create().await;
    let got = script(&db.store().await).await;
    for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(got, expected, "answer {i} differs from SQLite's");
    }
    assert_eq!(got.len(), expected.len());
    // Spot checks, so the comparison cannot pass by both being wrong the same way.
    let line = |what: &str| {
        got.iter()
            .find(|l| l.starts_with(&format!("{what}:")))
            .unwrap()
            .clone()
    };
    assert_eq!(
        line("create a again"),
        "create a again: Err(Conflict(\"workspace 'a'\"))"
    );
    assert!(line("revoke ambiguous").contains("more than one key with prefix 'key-aaaa'"));
    assert_eq!(line("revoke by id"), "revoke by id: Ok(true)");
    assert_eq!(line("find revoked"), "find revoked: Ok(None)");
    assert_eq!(line("partner key kept"), "partner key kept: Ok(\"p-1\")");
    assert!(line("find disabled").contains("partner_enabled: false"));
    assert!(line("find enabled").contains("partner_enabled: true"));
    assert_eq!(line("find invalidated"), "find invalidated: Ok(None)");
    assert!(line("webhook label kept").contains("heap_user"));
    assert!(line("webhook label cleared").contains("alias_label: None"));
}

/// Two stores on one database are two nodes: nothing is cached in either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_node_is_seen_by_the_other_at_once() {
    let db = TestDb::create().await;
    let (one, two) = (db.store().await, db.store().await);
    let ws = one.create_workspace("w", NOW).await.unwrap();
    assert_eq!(two.workspace_by_name("w").await.unwrap(), Some(ws.clone()));
    assert_eq!(
        two.create_workspace("w", NOW).await,
        Err(StoreError::Conflict("workspace 'w'".into()))
    );

    let rest = secret("rest-secret-1");
    one.create_api_key(new_key(ws.id, "k", &rest))
        .await
        .unwrap();
    let (key, owner) = two.find_api_key(rest.hash()).await.unwrap().unwrap();
    assert_eq!(owner, ws);
    assert_eq!(key.permissions.to_list(), "users.track,users.export.ids");
    assert_eq!(
        key.allow.entries().collect::<Vec<_>>(),
        ["10.0.0.0/8", "127.0.0.1/32"]
    );
    assert!(
        two.revoke_api_key(ws.id, &key.id.to_string(), NOW)
            .await
            .unwrap()
    );
    assert!(one.find_api_key(rest.hash()).await.unwrap().is_none());

    let import = secret("import-secret");
    one.create_import_key(ws.id, "heap", &import, NOW)
        .await
        .unwrap();
    assert!(
        two.find_import_key("heap", import.hash())
            .await
            .unwrap()
            .unwrap()
            .partner_enabled
    );
    two.set_partner_enabled(ws.id, "heap", false).await.unwrap();
    assert!(
        !one.find_import_key("heap", import.hash())
            .await
            .unwrap()
            .unwrap()
            .partner_enabled
    );

    let hook = one
        .heap_webhook(ws.id, secret("hook-1"), None)
        .await
        .unwrap();
    assert_eq!(two.heap_webhooks().await.unwrap(), [hook]);
}

/// Nodes starting at once each offer a fresh partner key: one wins and every node hands out
/// (and accepts) that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_nodes_agree_on_one_partner_key_and_one_webhook_secret() {
    let db = TestDb::create().await;
    let nodes = [Arc::new(db.store().await), Arc::new(db.store().await)];
    let ws = nodes[0].create_workspace("w", NOW).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let node = Arc::clone(&nodes[i % 2]);
        tasks.push(tokio::spawn(async move {
            let key = node
                .partner_api_key("heap", secret(&format!("fresh-{i}")), NOW)
                .await
                .unwrap();
            let hook = node
                .heap_webhook(ws.id, secret(&format!("hook-{i}")), None)
                .await
                .unwrap();
            (key.expose().to_owned(), hook.secret.expose().to_owned())
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let first = answers[0].clone();
    assert!(answers.iter().all(|a| *a == first), "{answers:?}");
    for node in &nodes {
        assert!(
            node.check_partner_api_key("heap", secret(&first.0))
                .await
                .unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_naming_a_missing_workspace_are_not_found() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let ghost = WorkspaceId(4242);
    fn missing<T: Debug>(answer: Result<T, StoreError>) {
        match answer {
            Err(StoreError::NotFound(what)) => assert_eq!(what, "workspace 4242"),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
    missing(
        store
            .create_api_key(new_key(ghost, "k", &secret("s1")))
            .await,
    );
    missing(
        store
            .create_import_key(ghost, "heap", &secret("s2"), NOW)
            .await,
    );
    missing(store.set_partner_enabled(ghost, "heap", true).await);
    missing(store.heap_webhook(ghost, secret("s3"), None).await);
    assert!(store.list_api_keys(ghost).await.unwrap().is_empty());
}

/// Rows written by something else (a bad migration, a hand edit) are `Corrupt`, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_credential_rows_are_corrupt() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let rest = secret("rest-secret-1");
    store
        .create_api_key(new_key(ws.id, "k", &rest))
        .await
        .unwrap();
    let client = db.client().await;

    client
        .execute("UPDATE api_keys SET permissions = 'users.fly'", &[])
        .await
        .unwrap();
    assert!(matches!(
        store.find_api_key(rest.hash()).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.list_api_keys(ws.id).await,
        Err(StoreError::Corrupt(_))
    ));
    client
        .execute(
            "UPDATE api_keys SET permissions = 'users.track', allow_ips = 'not-a-net'",
            &[],
        )
        .await
        .unwrap();
    assert!(matches!(
        store.list_api_keys(ws.id).await,
        Err(StoreError::Corrupt(_))
    ));
    client
        .execute("UPDATE api_keys SET allow_ips = '', hash = '\\x0102'", &[])
        .await
        .unwrap();
    assert!(matches!(
        store.list_api_keys(ws.id).await,
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_sequences_are_made_on_first_use_not_with_the_workspace() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let ws = store.create_workspace("w", NOW).await.unwrap();
    let client = db.client().await;
    let rows: i64 = client
        .query_one(
            "SELECT count(*) FROM workspace_sequences WHERE workspace_id = $1",
            &[&ws.id.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows, 0,
        "allocate creates each counter when a log is first written"
    );
    assert_eq!(
        store.list_workspaces().await.unwrap(),
        [ws],
        "and the workspace is complete without them"
    );
}
