//! Test support: the built `tideway` binary as a child process (`serve` and the admin CLI),
//! and a small HTTP client for the REST API.
//!
//! Readiness is never guessed with sleeps: a server is ready when it has printed its listening
//! line and answered `/health`, polled against a deadline.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const LISTENING_LINE: &str = "Tideway is listening on ";
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tideway")
}

/// The SQLite database file of a server's data directory, opened read-only (a test looks at
/// what a killed server left).
pub fn open_db(data_dir: &Path) -> rusqlite::Connection {
    let db = std::fs::read_dir(data_dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "sqlite" || x == "db"))
        .expect("the server's SQLite file");
    rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

/// A `tideway serve` child process.
pub struct Server {
    child: Child,
    pub url: String,
    /// Stdout lines printed before the listening line (the first-start key announcement).
    pub preamble: Vec<String>,
}

impl Server {
    /// Starts `tideway serve --data-dir DIR --listen 127.0.0.1:0 EXTRA…` and waits until it is
    /// listening and healthy. Its stderr (logs) is appended to a file beside the data
    /// directory, quoted if the server dies during startup.
    pub async fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let log = data_dir.with_extension(format!("log-{}", std::process::id()));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the server log");
        let mut child = Command::new(binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("TIDEWAY_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tideway serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut preamble = Vec::new();
        let url = tokio::time::timeout(STARTUP_DEADLINE, async {
            loop {
                match lines.next_line().await.expect("read stdout") {
                    Some(line) => match line.strip_prefix(LISTENING_LINE) {
                        Some(url) => return url.trim().to_owned(),
                        None => preamble.push(line),
                    },
                    None => {
                        let logs = std::fs::read_to_string(&log).unwrap_or_default();
                        panic!("tideway serve exited before listening; stdout {preamble:?}; logs:\n{logs}");
                    }
                }
            }
        })
        .await
        .expect("tideway serve did not print its listening line in time");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let server = Server {
            child,
            url,
            preamble,
        };
        server.wait_healthy().await;
        server
    }

    pub async fn wait_healthy(&self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.url)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never became healthy",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, no chance to clean up (`Child::kill` sends SIGKILL on Unix), then reaps it.
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("SIGKILL the server");
    }

    /// SIGTERM, then waits for the process to exit on its own; returns whether it exited 0.
    pub async fn terminate(self) -> bool {
        self.signal("TERM").await;
        self.wait_exit().await
    }

    /// Sends the signal `name` (`TERM`, `INT`) and returns at once.
    pub async fn signal(&self, name: &str) {
        let pid = self.child.id().expect("the server is running");
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit on its own; returns whether it exited 0.
    pub async fn wait_exit(mut self) -> bool {
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the server did not stop within 30 s of SIGTERM")
            .expect("wait for the server");
        exit.success()
    }
}

/// The key the first start saved.
pub fn initial_admin_key(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("initial-admin-key"))
        .expect("read initial-admin-key")
        .trim()
        .to_owned()
}

/// Runs `tideway ARGS…` to completion.
pub async fn tideway(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("TIDEWAY_DATA_DIR")
        .env_remove("TIDEWAY_CONFIG")
        .env_remove("TIDEWAY_DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run tideway")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `tideway ARGS…` and expects success; returns stdout.
pub async fn tideway_ok(args: &[&str]) -> String {
    let out = tideway(args).await;
    assert!(
        out.status.success(),
        "tideway {args:?} failed: {}",
        stderr(&out)
    );
    stdout(&out)
}

/// A REST client bound to one server URL.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub url: String,
}

impl Api {
    pub fn new(url: &str) -> Api {
        Api {
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client"),
            url: url.to_owned(),
        }
    }

    /// POSTs JSON with a Bearer key; returns status and JSON body (Null if none).
    pub async fn post(
        &self,
        path: &str,
        key: &str,
        body: &Value,
    ) -> Result<(u16, Value), reqwest::Error> {
        let response = self
            .client
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    pub async fn post_ok(&self, path: &str, key: &str, body: &Value) -> (u16, Value) {
        self.post(path, key, body)
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// `/users/export/ids` for these external ids (≤ 50), every field.
    pub async fn export(&self, key: &str, external_ids: &[String]) -> Value {
        let body = serde_json::json!({
            "external_ids": external_ids,
            "fields_to_export": ["external_id", "custom_attributes", "custom_events"],
        });
        let (status, body) = self.post_ok("/users/export/ids", key, &body).await;
        assert_eq!(status, 201, "export failed: {body}");
        body
    }
}

const SINK_LINE: &str = "Tideway sink is listening on ";
const SMTP_SINK_LINE: &str = "Tideway SMTP sink is listening on ";
/// A child `tideway sink`: a Currents receiver that stores what it gets, by event id (and,
/// with `--smtp-listen`, a mailbox).
pub struct Sink {
    _child: Child,
    pub url: String,
    /// `smtp://ADDR` when started with `--smtp-listen`.
    pub smtp: Option<String>,
    client: reqwest::Client,
}

impl Sink {
    pub async fn start(dir: &Path, extra: &[&str]) -> Sink {
        let mut child = Command::new(binary())
            .arg("sink")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tideway sink");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut smtp = None;
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("read")
                    .expect("the sink exited before listening");
                if let Some(url) = line.strip_prefix(SMTP_SINK_LINE) {
                    smtp = Some(url.trim().to_owned());
                }
                if let Some(url) = line.strip_prefix(SINK_LINE) {
                    return url.trim().to_owned();
                }
            }
        })
        .await
        .expect("the sink did not start");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Sink {
            _child: child,
            url,
            smtp,
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    /// The SMTP address of a sink started with `--smtp-listen`.
    pub fn smtp_url(&self) -> String {
        self.smtp
            .clone()
            .expect("the sink was started without --smtp-listen")
    }

    /// Waits until the mailbox holds `n` mails; returns them (`/mails`).
    pub async fn wait_mail(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let body: Value = self
                .client
                .get(format!("{}/mails", self.url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let mails = body["mails"].as_array().cloned().unwrap_or_default();
            if mails.len() >= n {
                return mails;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} mails arrived",
                mails.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every stored event's body as received (`/events` pages).
    pub async fn events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.page(after).await;
            let events = page["events"].as_array().cloned().unwrap_or_default();
            if events.is_empty() {
                return out;
            }
            after = page["next_after"].as_i64().unwrap();
            out.extend(events.into_iter().map(|e| match &e["event"] {
                Value::String(text) => serde_json::from_str(text).unwrap_or(Value::Null),
                body => body.clone(),
            }));
        }
    }

    pub async fn page(&self, after: i64) -> Value {
        self.client
            .get(format!("{}/events?after={after}&limit=10000", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// (id → deliveries) of everything stored, and the total duplicate deliveries.
    pub async fn all(&self) -> (std::collections::HashMap<String, u64>, u64) {
        let mut out = std::collections::HashMap::new();
        let mut after = 0;
        loop {
            let page = self.page(after).await;
            let events = page["events"].as_array().unwrap().clone();
            if events.is_empty() {
                return (out, page["duplicates"].as_u64().unwrap());
            }
            after = page["next_after"].as_i64().unwrap();
            for e in events {
                out.insert(
                    e["id"].as_str().unwrap().to_owned(),
                    e["deliveries"].as_u64().unwrap(),
                );
            }
        }
    }

    pub async fn unique(&self) -> u64 {
        self.page(i64::MAX - 1).await["unique"].as_u64().unwrap()
    }
}

/// A management API call with a bearer key: status and JSON body.
pub async fn management(
    api: &Api,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut req = client
        .request(method, format!("{}{path}", api.url))
        .bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}
