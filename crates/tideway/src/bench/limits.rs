//! The limits `tideway bench ingest` measures beside Tideway, in the same run on the same
//! machine, so its figures read as ratios rather than noisy absolutes:
//!
//! - a no-op HTTP handler: the same requests, parsed into `serde_json::Value` by a minimal axum
//!   route that answers 201 and does nothing (the cost of HTTP + JSON alone);
//! - raw SQLite inserts: the same objects as rows of one table, prepared inserts in WAL mode with
//!   `synchronous=NORMAL`, in transactions as large as the largest group commit the clients can cause (the cost of the writes
//!   alone, without profiles, identity resolution or the event log).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Json;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::bench::load::{OBJECTS, Workload};
use crate::data;

/// A minimal axum server whose `/users/track` parses the body and answers 201.
pub struct NoopServer {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

async fn noop_track(Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    std::hint::black_box(&body);
    (StatusCode::CREATED, Json(json!({"message": "success"})))
}

impl NoopServer {
    pub async fn start() -> anyhow::Result<NoopServer> {
        let router = axum::Router::new().route("/users/track", post(noop_track));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("cannot bind a loopback port")?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(NoopServer { addr, stop, task })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task
            .await
            .context("the no-op server panicked")?
            .context("the no-op server failed")?;
        Ok(())
    }
}

/// One row per object of the workload: (external_id, kind, object JSON).
pub fn rows(requests: usize, users: u64) -> anyhow::Result<Vec<(String, &'static str, String)>> {
    let mut workload = Workload::new(0x5EED, users);
    let mut rows = Vec::with_capacity(requests * OBJECTS);
    for _ in 0..requests {
        let body: Value = serde_json::from_str(&workload.body(data::now()))
            .context("the workload made invalid JSON")?;
        for (array, kind) in [
            ("attributes", "attributes"),
            ("events", "event"),
            ("purchases", "purchase"),
        ] {
            for object in body[array].as_array().into_iter().flatten() {
                let external_id = object["external_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                rows.push((external_id, kind, object.to_string()));
            }
        }
    }
    Ok(rows)
}

/// Inserts the workload's objects as rows into a fresh database in `dir` for `duration`, in
/// transactions of `rows_per_transaction` rows. Returns (rows inserted, time taken). Blocking.
pub fn raw_sqlite(
    dir: &Path,
    users: u64,
    rows_per_transaction: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let pool = rows(200, users)?;
    let mut conn = rusqlite::Connection::open(dir.join("raw.sqlite"))
        .context("cannot create the raw SQLite database")?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         PRAGMA synchronous=NORMAL;
         CREATE TABLE rows (seq INTEGER PRIMARY KEY, external_id TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL);",
    )
    .context("cannot set up the raw SQLite database")?;
    let start = Instant::now();
    let mut inserted = 0u64;
    let mut next = 0usize;
    while start.elapsed() < duration {
        let tx = conn.transaction()?;
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO rows (external_id, kind, body) VALUES (?1, ?2, ?3)")?;
            for _ in 0..rows_per_transaction.max(1) {
                let (external_id, kind, body) = &pool[next % pool.len()];
                insert.execute((external_id, kind, body))?;
                next += 1;
            }
        }
        tx.commit()?;
        inserted += rows_per_transaction.max(1) as u64;
    }
    Ok((inserted, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_sqlite_inserts_whole_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let (rows, took) = raw_sqlite(dir.path(), 100, 150, Duration::from_millis(50)).unwrap();
        assert!(rows >= 150 && rows % 150 == 0, "{rows}");
        assert!(took >= Duration::from_millis(50));
        let conn = rusqlite::Connection::open(dir.path().join("raw.sqlite")).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM rows", [], |r| r.get(0))
            .unwrap();
        assert_eq!(u64::try_from(n).unwrap(), rows);
    }

    #[tokio::test]
    async fn the_noop_handler_answers_201_to_json() {
        let server = NoopServer::start().await.unwrap();
        let client = reqwest::Client::new();
        let url = format!("http://{}/users/track", server.addr);
        let ok = client
            .post(&url)
            .header("content-type", "application/json")
            .body("{\"events\":[]}")
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), reqwest::StatusCode::CREATED);
        let bad = client
            .post(&url)
            .header("content-type", "application/json")
            .body("{")
            .send()
            .await
            .unwrap();
        assert!(bad.status().is_client_error());
        server.stop().await.unwrap();
    }
}
