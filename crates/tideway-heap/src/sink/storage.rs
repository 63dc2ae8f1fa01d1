//! The sink's SQLite file: every distinct event once (deduplicated on `id`) with how often it
//! was delivered, counts per event type, and a few totals.
//!
//! One writer thread does group commit (every request waiting is written in one
//! transaction; each is answered only after the commit), so concurrent deliveries share
//! commits; reads use a second connection. A batch is acknowledged only once it is committed
//! (so it survives a crash of the sink process; without fsyncs, not a power cut: this is a
//! local stand-in, and fsyncs would make it slower than the exporter it is there to measure).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::HeapError;

/// One accepted event, ready to store.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub id: String,
    pub event_type: String,
    pub time: Option<i64>,
    pub body: String,
}

/// What a write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub new: u64,
    pub duplicates: u64,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub seq: i64,
    pub id: String,
    pub event_type: String,
    pub time: Option<i64>,
    pub received_at: i64,
    pub deliveries: u64,
    pub body: Value,
}

/// Totals over the whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub unique: u64,
    pub duplicates: u64,
    pub per_type: Vec<(String, u64)>,
}

struct Job {
    events: Vec<Incoming>,
    received_at: i64,
    reply: oneshot::Sender<Result<Written, HeapError>>,
}

/// The sink's storage handle (cheap to clone).
#[derive(Clone)]
pub struct SinkStore {
    jobs: mpsc::Sender<Job>,
    reader: Arc<Mutex<Connection>>,
}

fn storage(e: rusqlite::Error) -> HeapError {
    HeapError::Storage(e.to_string())
}

fn open(path: &Path) -> Result<Connection, HeapError> {
    let conn = Connection::open(path).map_err(storage)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(storage)?;
    // A local stand-in, not a system of record: commits survive a crash of the sink process
    // (WAL), not of the machine; fsyncs would make it slower than the exporter it measures.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF; PRAGMA cache_size = -65536; PRAGMA wal_autocheckpoint = 16384;",
    )
    .map_err(storage)?;
    Ok(conn)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    event_type   TEXT NOT NULL,
    time         INTEGER,
    received_at  INTEGER NOT NULL,
    deliveries   INTEGER NOT NULL DEFAULT 1,
    body         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS type_counts (event_type TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
";

impl SinkStore {
    /// Opens (creating) `<dir>/sink.sqlite` and starts the writer thread. The directory is
    /// created 0700 and the database 0600 (SQLite gives its `-wal` and `-shm` the database's
    /// mode): received events carry users' identifiers and properties.
    pub fn open(dir: &Path) -> Result<SinkStore, HeapError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| HeapError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("sink.sqlite");
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(HeapError::Storage(format!(
                    "cannot create {}: {e}",
                    path.display()
                )));
            }
        }
        let writer = open(&path)?;
        writer.execute_batch(SCHEMA).map_err(storage)?;
        let reader = open(&path)?;
        let (jobs, rx) = mpsc::channel::<Job>(1024);
        std::thread::Builder::new()
            .name("tideway-sink-writer".into())
            .spawn(move || writer_loop(writer, rx))
            .map_err(|e| HeapError::Storage(format!("cannot start the writer: {e}")))?;
        Ok(SinkStore {
            jobs,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// Stores `events` (deduplicating on id); answers after the commit.
    pub async fn write(
        &self,
        events: Vec<Incoming>,
        received_at: i64,
    ) -> Result<Written, HeapError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                events,
                received_at,
                reply,
            })
            .await
            .map_err(|_| HeapError::Storage("the writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| HeapError::Storage("the writer stopped".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, HeapError> {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = reader
                .lock()
                .map_err(|_| HeapError::Storage("reader poisoned".into()))?;
            f(&conn).map_err(storage)
        })
        .await
        .map_err(|e| HeapError::Storage(e.to_string()))?
    }

    pub async fn totals(&self) -> Result<Totals, HeapError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT event_type, count FROM type_counts ORDER BY count DESC, event_type",
            )?;
            let per_type: Vec<(String, u64)> = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
                })?
                .collect::<Result<_, _>>()?;
            let duplicates: i64 = conn
                .query_row(
                    "SELECT value FROM totals WHERE key = 'duplicates'",
                    [],
                    |r| r.get(0),
                )
                .optional()?
                .unwrap_or(0);
            Ok(Totals {
                unique: per_type.iter().map(|(_, n)| n).sum(),
                duplicates: duplicates.max(0) as u64,
                per_type,
            })
        })
        .await
    }

    /// Events after `after` (storage order), optionally of one type; newest first when
    /// `newest` is set.
    pub async fn events(
        &self,
        after: i64,
        limit: usize,
        event_type: Option<String>,
        order: Order,
    ) -> Result<Vec<StoredEvent>, HeapError> {
        self.read(move |conn| {
            let sql = match order {
                Order::Oldest => {
                    "SELECT seq, id, event_type, time, received_at, deliveries, body FROM events
                     WHERE seq > ?1 AND (?2 IS NULL OR event_type = ?2) ORDER BY seq LIMIT ?3"
                }
                Order::Newest => {
                    "SELECT seq, id, event_type, time, received_at, deliveries, body FROM events
                     WHERE seq > ?1 AND (?2 IS NULL OR event_type = ?2) ORDER BY seq DESC LIMIT ?3"
                }
            };
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(params![after, event_type, limit as i64], |r| {
                let body: String = r.get(6)?;
                Ok(StoredEvent {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    event_type: r.get(2)?,
                    time: r.get(3)?,
                    received_at: r.get(4)?,
                    deliveries: r.get::<_, i64>(5)?.max(0) as u64,
                    body: serde_json::from_str(&body).unwrap_or(Value::String(body)),
                })
            })?;
            rows.collect()
        })
        .await
    }
}

/// Which end of the file a listing starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Oldest,
    Newest,
}

fn write_one(conn: &Connection, job: &Job) -> rusqlite::Result<Written> {
    let mut insert =
        conn.prepare_cached("INSERT OR IGNORE INTO events (id, event_type, time, received_at, body) VALUES (?1, ?2, ?3, ?4, ?5)")?;
    let mut again =
        conn.prepare_cached("UPDATE events SET deliveries = deliveries + 1 WHERE id = ?1")?;
    let mut written = Written::default();
    let mut per_type: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for e in &job.events {
        if insert.execute(params![e.id, e.event_type, e.time, job.received_at, e.body])? == 1 {
            written.new += 1;
            *per_type.entry(e.event_type.as_str()).or_default() += 1;
        } else {
            again.execute([&e.id])?;
            written.duplicates += 1;
        }
    }
    let mut count = conn.prepare_cached(
        "INSERT INTO type_counts (event_type, count) VALUES (?1, ?2) ON CONFLICT (event_type) DO UPDATE SET count = count + excluded.count",
    )?;
    for (t, n) in per_type {
        count.execute(params![t, n])?;
    }
    if written.duplicates > 0 {
        conn.prepare_cached(
            "INSERT INTO totals (key, value) VALUES ('duplicates', ?1) ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
        )?
        .execute([written.duplicates as i64])?;
    }
    Ok(written)
}

fn writer_loop(conn: Connection, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(256);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut results = Vec::with_capacity(batch.len());
        let outcome = (|| -> rusqlite::Result<()> {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            for job in &batch {
                conn.execute_batch("SAVEPOINT job")?;
                match write_one(&conn, job) {
                    Ok(w) => {
                        conn.execute_batch("RELEASE job")?;
                        results.push(Ok(w));
                    }
                    Err(e) => {
                        conn.execute_batch("ROLLBACK TO job; RELEASE job")?;
                        results.push(Err(storage(e)));
                    }
                }
            }
            conn.execute_batch("COMMIT")
        })();
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "sink commit failed");
            let _ = conn.execute_batch("ROLLBACK");
        }
        for (i, job) in batch.drain(..).enumerate() {
            let answer = match &outcome {
                Ok(()) => results
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| Err(HeapError::Storage("no result".into()))),
                Err(e) => Err(storage_text(e)),
            };
            let _ = job.reply.send(answer);
        }
    }
}

fn storage_text(e: &rusqlite::Error) -> HeapError {
    HeapError::Storage(e.to_string())
}
