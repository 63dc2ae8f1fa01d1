//! `tideway segments export` end to end: users tracked and a segment created through a running
//! `tideway serve`, then the audience exported from the data directory as CSV and JSON lines.

use serde_json::{Value, json};

use crate::support::{Api, Server, initial_admin_key, stderr, tideway, tideway_ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_the_members_as_csv_and_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]).await;
    let key = initial_admin_key(&data);
    let api = Api::new(&server.url);
    let (status, body) = api
        .post_ok(
            "/users/track",
            &key,
            &json!({"attributes": [
                {"external_id": "u1", "plan": "pro"},
                {"external_id": "u,2", "plan": "pro"},
                {"external_id": "u3", "plan": "free"},
            ]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api
        .post_ok(
            "/api/v1/segments",
            &key,
            &json!({"name": "pro", "filter": {"attribute": {"name": "plan", "op": "equals", "value": "pro"}}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert!(server.terminate().await);

    let dir = data.to_str().unwrap();
    let csv = tmp.path().join("pro.csv");
    let out = tideway(&[
        "segments",
        "export",
        &id,
        "--format",
        "csv",
        "--output",
        csv.to_str().unwrap(),
        "--data-dir",
        dir,
        "--workspace",
        "default",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("exported 2 members"),
        "{}",
        stderr(&out)
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "braze_id,external_id");
    assert_eq!(lines.len(), 3);
    assert!(
        lines[1].ends_with(",u1") && lines[2].ends_with(",\"u,2\""),
        "{text}"
    );

    let jsonl = tideway_ok(&[
        "segments",
        "export",
        &id,
        "--format",
        "jsonl",
        "--data-dir",
        dir,
        "--workspace",
        "default",
    ])
    .await;
    let rows: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ext: Vec<&str> = rows
        .iter()
        .map(|r| r["external_id"].as_str().unwrap())
        .collect();
    assert_eq!(ext, ["u1", "u,2"]);
    assert_eq!(rows[0]["braze_id"].as_str().unwrap().len(), 24);

    let out = tideway(&[
        "segments",
        "export",
        "nope",
        "--data-dir",
        dir,
        "--workspace",
        "default",
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no segment 'nope'"),
        "{}",
        stderr(&out)
    );
}
