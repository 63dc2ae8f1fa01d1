//! The command line as scripts use it: first start, `workspaces`, `keys` (create, list,
//! revoke) beside a running server, configuration precedence, helpful failures, and graceful
//! shutdown.

use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use crate::support::{Api, Server, initial_admin_key, stderr, stdout, tideway, tideway_ok};

fn track_one(external_id: &str) -> serde_json::Value {
    json!({"attributes": [{"external_id": external_id, "plan": "pro"}]})
}

#[tokio::test(flavor = "multi_thread")]
async fn first_start_prints_the_endpoint_and_a_private_admin_key_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let server = Server::start(&data_dir, &[]).await;
    assert!(
        server.url.starts_with("http://127.0.0.1:") && !server.url.ends_with(":0"),
        "{}",
        server.url
    );
    let key = initial_admin_key(&data_dir);
    assert!(
        uuid::Uuid::parse_str(&key).is_ok(),
        "the key looks like a Braze key (a UUID): {key}"
    );
    assert!(
        server.preamble.iter().any(|l| l.contains(&key)),
        "the key is shown once on stdout: {:?}",
        server.preamble
    );
    let mode = std::fs::metadata(data_dir.join("initial-admin-key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(data_dir.join("tideway.sqlite").is_file());
    assert_eq!(
        std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777,
        0o700,
        "the data directory is private"
    );

    // The admin key has every permission.
    let api = Api::new(&server.url);
    let (status, body) = api
        .post_ok("/users/track", &key, &track_one("first-user"))
        .await;
    assert_eq!(status, 201, "{body}");
    let exported = api.export(&key, &["first-user".to_owned()]).await;
    assert_eq!(exported["users"][0]["custom_attributes"]["plan"], "pro");
    assert!(server.terminate().await, "exit 0 on SIGTERM");

    // A restart finds the workspace: no new key, the old one still works.
    let server = Server::start(&data_dir, &[]).await;
    assert!(server.preamble.is_empty(), "{:?}", server.preamble);
    assert_eq!(initial_admin_key(&data_dir), key);
    let (status, _) = Api::new(&server.url)
        .post_ok("/users/track", &key, &track_one("second-user"))
        .await;
    assert_eq!(status, 201);

    // One server per data directory: a second one says so and exits non-zero.
    let second = tideway(&[
        "serve",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("another `tideway serve` is running on"),
        "{}",
        stderr(&second)
    );
    assert!(server.terminate().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_scoped_to_their_workspace_and_permissions_and_revocation_is_immediate() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let dir = data_dir.to_str().unwrap();
    let server = Server::start(&data_dir, &[]).await;
    let api = Api::new(&server.url);
    let admin = initial_admin_key(&data_dir);

    // Workspaces, created beside the running server.
    let app_group_id = tideway_ok(&["workspaces", "create", "acme", "--data-dir", dir]).await;
    assert_eq!(
        app_group_id.lines().count(),
        1,
        "only the app_group_id on stdout: {app_group_id:?}"
    );
    assert!(!app_group_id.trim().is_empty());
    let listing = tideway_ok(&["workspaces", "list", "--data-dir", dir]).await;
    assert!(
        listing.contains("default")
            && listing.contains("acme")
            && listing.contains(app_group_id.trim()),
        "{listing}"
    );
    let again = tideway(&["workspaces", "create", "acme", "--data-dir", dir]).await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    // A track-only key of the default workspace: stdout is exactly the secret.
    let out = tideway_ok(&[
        "keys",
        "create",
        "--data-dir",
        dir,
        "--workspace",
        "default",
        "--permissions",
        "users.track",
        "--name",
        "tracker",
    ])
    .await;
    let tracker = out.trim().to_owned();
    assert_eq!(
        out,
        format!("{tracker}\n"),
        "stdout must be only the secret"
    );
    assert!(uuid::Uuid::parse_str(&tracker).is_ok(), "{tracker}");
    let (status, body) = api
        .post_ok("/users/track", &tracker, &track_one("in-default"))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = api
        .post_ok(
            "/users/export/ids",
            &tracker,
            &json!({"external_ids": ["in-default"]}),
        )
        .await;
    assert_eq!(status, 403, "no users.export.ids permission");

    // A key of workspace acme writes and reads only acme.
    let acme = tideway_ok(&[
        "keys",
        "create",
        "--data-dir",
        dir,
        "--workspace",
        "acme",
        "--permissions",
        "users.track,users.export.ids",
    ])
    .await;
    let acme = acme.trim();
    let (status, _) = api
        .post_ok("/users/track", acme, &track_one("in-acme"))
        .await;
    assert_eq!(status, 201);
    let seen_by_acme = api
        .export(acme, &["in-acme".to_owned(), "in-default".to_owned()])
        .await;
    let ids: Vec<&str> = seen_by_acme["users"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["external_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["in-acme"],
        "acme's key sees only acme's users: {seen_by_acme}"
    );
    let seen_by_default = api
        .export(&admin, &["in-acme".to_owned(), "in-default".to_owned()])
        .await;
    let ids: Vec<&str> = seen_by_default["users"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|u| u["external_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["in-default"],
        "the default workspace's key sees only its users: {seen_by_default}"
    );
    let (status, _) = api
        .post_ok("/users/identify", acme, &json!({"aliases_to_identify": []}))
        .await;
    assert_eq!(status, 403, "acme's key has no users.identify");

    // Unknown keys are 401.
    let (status, body) = api
        .post_ok(
            "/users/track",
            "00000000-0000-4000-8000-000000000000",
            &track_one("x"),
        )
        .await;
    assert_eq!(status, 401, "{body}");

    // An IP allowlist that excludes loopback refuses the key.
    let fenced = tideway_ok(&[
        "keys",
        "create",
        "--data-dir",
        dir,
        "--workspace",
        "default",
        "--permissions",
        "users.track",
        "--allow-ip",
        "10.0.0.0/8",
    ])
    .await;
    let (status, _) = api
        .post_ok("/users/track", fenced.trim(), &track_one("fenced"))
        .await;
    assert_eq!(status, 403, "loopback is outside 10.0.0.0/8");
    let open = tideway_ok(&[
        "keys",
        "create",
        "--data-dir",
        dir,
        "--workspace",
        "default",
        "--permissions",
        "users.track",
        "--allow-ip",
        "127.0.0.1",
    ])
    .await;
    let (status, _) = api
        .post_ok("/users/track", open.trim(), &track_one("allowed"))
        .await;
    assert_eq!(status, 201);

    // Listing shows the key's prefix, name and permissions, never its secret.
    let keys = tideway_ok(&["keys", "list", "--data-dir", dir, "--workspace", "default"]).await;
    let prefix = &tracker[..8];
    let line = keys
        .lines()
        .find(|l| l.contains("tracker"))
        .unwrap_or_else(|| panic!("no tracker key in:\n{keys}"));
    assert!(
        line.contains(prefix) && line.contains("users.track"),
        "{line}"
    );
    assert!(
        !keys.contains(&tracker) && !keys.contains(&admin),
        "a listing must never show a secret:\n{keys}"
    );
    assert!(keys.contains("10.0.0.0/8"), "{keys}");

    // Revoking (by prefix) takes effect on the running server at once.
    tideway_ok(&[
        "keys",
        "revoke",
        "--data-dir",
        dir,
        "--workspace",
        "default",
        prefix,
    ])
    .await;
    let (status, _) = api
        .post_ok("/users/track", &tracker, &track_one("after-revoke"))
        .await;
    assert_eq!(status, 401, "a revoked key is refused");
    let keys = tideway_ok(&["keys", "list", "--data-dir", dir, "--workspace", "default"]).await;
    let line = keys.lines().find(|l| l.contains("tracker")).unwrap();
    assert!(
        !line.trim_end().ends_with('-'),
        "the revoked column is filled: {line}"
    );
    let twice = tideway(&[
        "keys",
        "revoke",
        "--data-dir",
        dir,
        "--workspace",
        "default",
        prefix,
    ])
    .await;
    assert!(!twice.status.success());
    assert!(stderr(&twice).contains("keys list"), "{}", stderr(&twice));
    // Revoking in the wrong workspace does nothing.
    let acme_prefix = &acme[..8];
    let wrong = tideway(&[
        "keys",
        "revoke",
        "--data-dir",
        dir,
        "--workspace",
        "default",
        acme_prefix,
    ])
    .await;
    assert!(!wrong.status.success());
    let (status, _) = api
        .post_ok("/users/track", acme, &track_one("still-works"))
        .await;
    assert_eq!(status, 201);

    assert!(server.terminate().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn mistakes_fail_with_a_message_that_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let dir = dir.to_str().unwrap();

    // No database yet: admin commands (other than workspaces create) refuse and point at serve.
    let out = tideway(&["keys", "list", "--data-dir", dir]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("tideway serve"), "{}", stderr(&out));
    assert!(
        !std::path::Path::new(dir).join("tideway.sqlite").exists(),
        "a failed command must not create a database"
    );

    tideway_ok(&["workspaces", "create", "default", "--data-dir", dir]).await;

    // A database a newer build wrote is refused, untouched, saying which release to run.
    {
        let db =
            rusqlite::Connection::open(std::path::Path::new(dir).join("tideway.sqlite")).unwrap();
        let known: i64 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        db.execute_batch(&format!("PRAGMA user_version = {}", known + 1))
            .unwrap();
        let out = tideway(&["workspaces", "list", "--data-dir", dir]).await;
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("newer than this build's"),
            "{}",
            stderr(&out)
        );
        let after: i64 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(after, known + 1);
        db.execute_batch(&format!("PRAGMA user_version = {known}"))
            .unwrap();
    }

    // A misspelt permission.
    let out = tideway(&[
        "keys",
        "create",
        "--data-dir",
        dir,
        "--permissions",
        "users.track,users.trak",
    ])
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("users.trak") && err.contains("users.identify"),
        "names the bad one and lists the known ones: {err}"
    );
    assert!(
        stdout(&out).is_empty(),
        "nothing on stdout when no key was made"
    );

    // An unknown workspace.
    let out = tideway(&[
        "keys",
        "create",
        "--data-dir",
        dir,
        "--workspace",
        "nope",
        "--permissions",
        "users.track",
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("workspaces create nope"),
        "{}",
        stderr(&out)
    );

    // A bad allowlist entry.
    let out = tideway(&[
        "keys",
        "create",
        "--data-dir",
        dir,
        "--permissions",
        "users.track",
        "--allow-ip",
        "10.0.0.300",
    ])
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("10.0.0.300"), "{}", stderr(&out));

    // A configuration file with a typo.
    let config = tmp.path().join("tideway.toml");
    std::fs::write(&config, "listn = \"127.0.0.1:1\"\n").unwrap();
    let out = tideway(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        dir,
    ])
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("listn"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_come_from_flags_then_environment_then_file_then_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tideway.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:5001\"\nsynchronous = \"full\"\nmax-array-len = 50\ntrack-rate-limit = 10\n").unwrap();
    let out = tokio::process::Command::new(crate::support::binary())
        .args([
            "serve",
            "--print-config",
            "--config",
            config.to_str().unwrap(),
            "--track-rate-limit",
            "30",
        ])
        .env("TIDEWAY_LISTEN", "127.0.0.1:5002")
        .env("TIDEWAY_TRACK_RATE_LIMIT", "20")
        .env_remove("TIDEWAY_DATA_DIR")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: toml::Table = toml::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        printed["listen"].as_str(),
        Some("127.0.0.1:5002"),
        "env beats the file"
    );
    assert_eq!(
        printed["track-rate-limit"].as_integer(),
        Some(30),
        "a flag beats env and file"
    );
    assert_eq!(
        printed["synchronous"].as_str(),
        Some("full"),
        "the file beats the default"
    );
    assert_eq!(printed["max-array-len"].as_integer(), Some(50));
    assert_eq!(
        printed["data-dir"].as_str(),
        Some("./tideway-data"),
        "the default"
    );
    assert_eq!(
        printed["export-rate-limit"].as_integer(),
        Some(250),
        "the default"
    );

    let help = tideway_ok(&["serve", "--help"]).await;
    for documented in [
        "[default: ./tideway-data]",
        "[default: 127.0.0.1:4000]",
        "[default: normal]",
        "[default: text]",
        "TIDEWAY_LISTEN",
        "kill -9",
    ] {
        assert!(
            help.contains(documented),
            "serve --help lacks {documented}:\n{help}"
        );
    }
}
