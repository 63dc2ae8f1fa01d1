//! `tideway cohorts push` end to end against a running `tideway serve`: first push, an
//! unchanged re-run (sends nothing), a membership change (sends the delta), and a flaky server
//! that fails the first requests (retried with backoff), plus the partner admin commands that
//! issue the keys it needs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use serde_json::{Value, json};

use crate::support::{Api, Server, initial_admin_key, stderr, tideway, tideway_ok};

struct Push<'a> {
    url: &'a str,
    partner_key: &'a str,
    import_key: &'a str,
    input: &'a Path,
}

impl Push<'_> {
    async fn run(&self, url: Option<&str>) -> std::process::Output {
        let input = self.input.to_str().expect("utf-8 path");
        tideway(&[
            "cohorts",
            "push",
            "--input",
            input,
            "--url",
            url.unwrap_or(self.url),
            "--partner",
            "heap",
            "--partner-api-key",
            self.partner_key,
            "--client-secret",
            self.import_key,
            "--cohort-id",
            "trial-stuck",
            "--name",
            "Trial – stuck",
            "--backoff-base-ms",
            "1",
            "--backoff-cap-ms",
            "20",
        ])
        .await
    }

    async fn ok(&self, url: Option<&str>) -> String {
        let out = self.run(url).await;
        assert!(out.status.success(), "push failed: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

async fn members(api: &Api, key: &str) -> (u64, Vec<String>) {
    let client = reqwest::Client::new();
    let list: Value = client
        .get(format!("{}/api/v1/cohorts", api.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let count = list["cohorts"][0]["member_count"].as_u64().unwrap_or(0);
    assert_eq!(list["cohorts"][0]["name"], "Trial – stuck");
    let page: Value = client
        .get(format!(
            "{}/api/v1/cohorts/heap/trial-stuck/members",
            api.url
        ))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<String> = page["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m["external_id"]
                .as_str()
                .unwrap_or("(anonymous)")
                .to_owned()
        })
        .collect();
    ids.sort();
    (count, ids)
}

/// Fails the first `fail` requests with 503, then forwards to `upstream`.
#[derive(Clone)]
struct Flaky {
    upstream: String,
    fail: usize,
    seen: Arc<AtomicUsize>,
    client: reqwest::Client,
}

async fn flaky(State(f): State<Flaky>, uri: Uri, body: Bytes) -> (StatusCode, String) {
    if f.seen.fetch_add(1, Ordering::SeqCst) < f.fail {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"message":"Service Unavailable"}"#.to_owned(),
        );
    }
    let res = f
        .client
        .post(format!("{}{}", f.upstream, uri.path()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (
        StatusCode::from_u16(res.status().as_u16()).unwrap(),
        res.text().await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_sends_only_the_delta_and_retries_a_failing_server() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]).await;
    let api = Api::new(&server.url);
    let key = initial_admin_key(&data);
    let (status, _) = api
        .post_ok(
            "/users/track",
            &key,
            &json!({"attributes": [
                {"external_id": "u1", "x": 1}, {"external_id": "u2", "x": 1}, {"external_id": "u3", "x": 1},
                {"external_id": "u4", "x": 1}, {"device_id": "anon-1", "x": 1},
            ]}),
        )
        .await;
    assert_eq!(status, 201);

    let dir = data.to_str().unwrap();
    let partner_key = tideway_ok(&[
        "partners",
        "api-key",
        "--data-dir",
        dir,
        "--partner",
        "heap",
    ])
    .await
    .trim()
    .to_owned();
    assert_eq!(
        tideway_ok(&["partners", "api-key", "--data-dir", dir])
            .await
            .trim(),
        partner_key,
        "the same key every time"
    );
    let import_key = tideway_ok(&[
        "partners",
        "import-key",
        "--data-dir",
        dir,
        "--workspace",
        "default",
    ])
    .await
    .trim()
    .to_owned();
    assert_eq!(import_key.len(), 36, "only the key on stdout");
    assert!(
        tideway_ok(&[
            "partners",
            "import-keys",
            "--data-dir",
            dir,
            "--workspace",
            "default"
        ])
        .await
        .contains(&import_key[..8])
    );

    let input = tmp.path().join("members.csv");
    std::fs::write(
        &input,
        "external_id,device_id\nu1,\nu2,\nu3,\n,anon-1\nnot-a-user,\n",
    )
    .unwrap();
    let push = Push {
        url: &server.url,
        partner_key: &partner_key,
        import_key: &import_key,
        input: &input,
    };

    assert_eq!(
        push.ok(None).await,
        "added 5 removed 0 requests 2 retries 0"
    );
    assert_eq!(
        members(&api, &key).await,
        (
            4,
            vec!["(anonymous)".into(), "u1".into(), "u2".into(), "u3".into()]
        )
    );

    assert_eq!(
        push.ok(None).await,
        "added 0 removed 0 requests 1 retries 0",
        "an unchanged list sends only the naming call"
    );

    std::fs::write(
        &input,
        "external_id,device_id\nu2,\nu3,\nu4,\n,anon-1\nnot-a-user,\n",
    )
    .unwrap();
    assert_eq!(
        push.ok(None).await,
        "added 1 removed 1 requests 3 retries 0"
    );
    assert_eq!(
        members(&api, &key).await.1,
        vec![
            "(anonymous)".to_owned(),
            "u2".into(),
            "u3".into(),
            "u4".into()
        ]
    );

    // A server that fails the first three requests: retried, then everything lands. It is a
    // different endpoint URL, so the push starts from an empty state there and sends the whole
    // list (a delta computed against another server's state would be wrong).
    let state = Flaky {
        upstream: server.url.clone(),
        fail: 3,
        seen: Arc::new(AtomicUsize::new(0)),
        client: reqwest::Client::new(),
    };
    let router = axum::Router::new()
        .fallback(axum::routing::post(flaky))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = format!("http://{}", listener.local_addr().unwrap());
    let proxy_task = tokio::spawn(async move { axum::serve(listener, router).await });
    std::fs::write(&input, "external_id\nu1\nu2\nu3\nu4\n").unwrap();
    assert_eq!(
        push.ok(Some(&proxy)).await,
        "added 4 removed 0 requests 5 retries 3"
    );
    assert_eq!(state.seen.load(Ordering::SeqCst), 5);
    assert_eq!(
        members(&api, &key).await.1,
        vec![
            "(anonymous)".to_owned(),
            "u1".into(),
            "u2".into(),
            "u3".into(),
            "u4".into()
        ]
    );
    proxy_task.abort();

    // Wrong credentials fail at once with a hint, without retrying.
    let bad = Push {
        partner_key: "wrong",
        ..push
    };
    let out = bad.run(None).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Invalid Partner API key")
            && stderr(&out).contains("--partner-api-key"),
        "{}",
        stderr(&out)
    );
    assert!(server.terminate().await);
}
