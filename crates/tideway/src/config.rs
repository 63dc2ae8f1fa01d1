//! Configuration: one struct, [`Settings`], that is both the `serve` command line and the TOML
//! file.
//!
//! Every setting is optional at every layer, and precedence is flag > `TIDEWAY_*` environment
//! variable > `--config FILE` > built-in default. clap reads flags and environment variables
//! (a flag wins over its variable); [`Settings::or`] lets the file fill what is still unset and
//! [`Settings::resolve`] applies the defaults. The file's keys are the flag names without the
//! leading `--` (`data-dir = "/var/lib/tideway"`), and unknown keys are an error so a typo never
//! passes silently. `tideway serve --print-config` shows the effective result as a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tideway_core::egress::{EgressPolicy, PrivateEndpoints};
use tideway_server::{ConnectionLimits, RateLimits, ServerConfig};
use tideway_store::postgres::PgOptions;
use tideway_store::sqlite::{SqliteOptions, Synchronous};

/// The default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./tideway-data";
/// The default address of the REST API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4000";

/// How log lines are written (to stderr; stdout is kept for what scripts read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// SQLite's `synchronous` setting for the database (always in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Durable against a process crash (kill -9): a commit is in the OS once acknowledged. A
    /// power loss or kernel crash may lose the last commits (never corrupts the file).
    Normal,
    /// fsync on every commit: durable against power loss too, at a cost in throughput.
    Full,
}

impl From<SyncMode> for Synchronous {
    fn from(mode: SyncMode) -> Self {
        match mode {
            SyncMode::Normal => Synchronous::Normal,
            SyncMode::Full => Synchronous::Full,
        }
    }
}

/// The settings of `tideway serve`, as flags, `TIDEWAY_*` variables and TOML keys.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Directory for the SQLite database (tideway.sqlite) and the initial admin key; created if
    /// missing [default: ./tideway-data]
    #[arg(long, env = "TIDEWAY_DATA_DIR", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,

    /// PostgreSQL database to use instead of the data directory's SQLite file, e.g.
    /// postgres://tideway@127.0.0.1:5432/tideway. Several `tideway serve` nodes may share one;
    /// each keeps its own --data-dir for its key file and segment-index snapshots. Migrations
    /// run on start [default: none: SQLite in the data directory]
    #[arg(long, env = "TIDEWAY_DATABASE_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,

    /// Address of the REST API; port 0 picks a free port (the bound address is printed)
    /// [default: 127.0.0.1:4000]
    #[arg(long, env = "TIDEWAY_LISTEN", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,

    /// Log line format (logs go to stderr; filter with RUST_LOG, default info) [default: text]
    #[arg(long, env = "TIDEWAY_LOG_FORMAT", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,

    /// SQLite durability (WAL mode). normal: no acknowledged write is lost if the process
    /// crashes or is killed (kill -9), the last commits may be lost on power loss; full: fsync
    /// every commit, durable against power loss too, slower [default: normal]
    #[arg(long, env = "TIDEWAY_SYNCHRONOUS", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synchronous: Option<SyncMode>,

    /// Largest accepted request body in bytes; larger bodies get 413 [default: 4194304]
    #[arg(long, env = "TIDEWAY_MAX_BODY_BYTES", value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,

    /// /users/track requests per minute per key; more get 429 [default: 50000]
    #[arg(long, env = "TIDEWAY_TRACK_RATE_LIMIT", value_name = "PER_MINUTE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_rate_limit: Option<u32>,

    /// Requests per minute per key shared by /users/identify, /users/alias/*,
    /// /users/merge, /users/delete and /users/external_ids/* [default: 20000]
    #[arg(long, env = "TIDEWAY_BATCH_RATE_LIMIT", value_name = "PER_MINUTE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_rate_limit: Option<u32>,

    /// /users/export/ids requests per minute per key [default: 250]
    #[arg(long, env = "TIDEWAY_EXPORT_RATE_LIMIT", value_name = "PER_MINUTE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_rate_limit: Option<u32>,

    /// Longest array custom attribute; extra elements are dropped from the front [default: 25]
    #[arg(long, env = "TIDEWAY_MAX_ARRAY_LEN", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_array_len: Option<usize>,

    /// Milliseconds a client has to send a request's headers, from their first byte; a slower
    /// connection is closed [default: 10000]
    #[arg(long, env = "TIDEWAY_HEADER_TIMEOUT_MS", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout_ms: Option<u64>,

    /// Milliseconds a connection may stay open with no request in progress and no byte sent
    /// either way (before its first request, between keep-alive requests); then it is closed
    /// [default: 60000]
    #[arg(long, env = "TIDEWAY_IDLE_TIMEOUT_MS", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,

    /// Milliseconds a client has to send a request's body, from the end of its headers; a
    /// later body gets 408 Request Timeout and the connection is closed [default: 30000]
    #[arg(long, env = "TIDEWAY_BODY_TIMEOUT_MS", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_timeout_ms: Option<u64>,

    /// Connections open at once; beyond it a new connection gets 503 and is closed at once.
    /// Keep it below the open-file limit (`ulimit -n`) [default: the soft open-file limit
    /// minus 128, at least 32]
    #[arg(long, env = "TIDEWAY_MAX_CONNECTIONS", value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,

    /// Milliseconds a node's hold on a Current (its lease in the database) lasts without
    /// renewal; when a node dies, another node sharing the database takes its Currents over
    /// after at most this long, re-sending only the batches that were in flight. Leases are
    /// renewed every third of it [default: 30000]
    #[arg(long, env = "TIDEWAY_CURRENTS_LEASE_TTL_MS", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currents_lease_ttl_ms: Option<u64>,

    /// Refuse Current endpoints and webhooks on loopback, private and unspecified addresses
    /// (127/8, ::1, 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, 0.0.0.0), judged both
    /// in the URL and in what a host name resolves to at connect time; for a server whose
    /// keys others hold. Link-local addresses (169.254/16, fe80::/10) and cloud metadata
    /// services are refused whatever this says [default: false]
    #[arg(long, env = "TIDEWAY_DENY_PRIVATE_ENDPOINTS", value_name = "BOOL", num_args = 0..=1,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny_private_endpoints: Option<bool>,

    /// SMTP server for email messages: smtp://HOST:PORT (plain, or STARTTLS when the server
    /// offers it), smtps://USER:PASSWORD@HOST:465 (TLS), with optional USER:PASSWORD@; the
    /// password is never logged or printed. Without it, email sends are aborted as
    /// undeliverable [default: none]
    #[arg(
        long,
        env = "TIDEWAY_SMTP_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_url: Option<String>,

    /// The address people's mail clients reach this server at: the base of the open-pixel,
    /// click-tracking and unsubscribe links written into emails, e.g. https://mail.example.com
    /// [default: http://<listen address>]
    #[arg(long, env = "TIDEWAY_PUBLIC_URL", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,

    /// Milliseconds one webhook message request may take before it counts as a timeout (and is
    /// retried) [default: 90000]
    #[arg(long, env = "TIDEWAY_WEBHOOK_TIMEOUT_MS", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_timeout_ms: Option<u64>,

    /// Milliseconds a node keeps serving after SIGTERM, with /health answering 503 `draining`
    /// and every answer closing its connection, so that a load balancer and keep-alive clients
    /// move to other nodes before it stops; 0 stops at once. SIGINT (Ctrl-C), or a second
    /// signal, stops at once [default: 1000]
    #[arg(long, env = "TIDEWAY_SHUTDOWN_DRAIN_MS", value_name = "MS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_drain_ms: Option<u64>,
}

/// The `smtp-url` setting, checked; `Debug` hides its password.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpSetting(String);

impl SmtpSetting {
    /// The URL as given (with its password): for the SMTP client only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SmtpSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// Which database holds the data.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// `<data-dir>/tideway.sqlite` (the default).
    Sqlite,
    /// A PostgreSQL database, possibly shared by several nodes.
    Postgres(String),
}

impl Database {
    /// Where the data is, for messages and logs: a PostgreSQL URL without its password.
    pub fn describe(&self, data_dir: &Path) -> String {
        match self {
            Database::Sqlite => database_path(data_dir).display().to_string(),
            Database::Postgres(url) => redact_url(url),
        }
    }

    /// The flags that name this database again, for the commands an error message suggests.
    pub fn flags(&self, data_dir: &Path) -> String {
        match self {
            Database::Sqlite => format!("--data-dir {}", data_dir.display()),
            Database::Postgres(url) => format!("--database-url {}", redact_url(url)),
        }
    }
}

impl std::fmt::Debug for Database {
    // The URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite => f.write_str("Sqlite"),
            Database::Postgres(url) => write!(f, "Postgres({})", redact_url(url)),
        }
    }
}

/// `text` with every password it carries masked as `***`, for logs, messages and
/// `--print-config`: the password of each URL's user (`postgres://user:secret@host/db` →
/// `postgres://user:***@host/db`, also inside a longer text such as an error quoting a line of
/// the configuration file) and every `password=` parameter, of a URL's query
/// (`?password=secret&…`) or of a `key=value` connection string (`password='s e c'`). Text
/// without a password is returned as it is. Where a URL is ambiguous (an `@` in its path) more
/// is masked, never less.
pub fn redact_url(text: &str) -> String {
    mask_password_parameters(&mask_user_passwords(text))
}

/// Masks the password of `scheme://user:password@host…` wherever it appears in `text`.
fn mask_user_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The URL runs to the next blank or quote; its user part to its last `@`.
        let end = after
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(after.len());
        let url = &after[..end];
        match url.rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                out.push_str(user);
                out.push_str(":***@");
                out.push_str(host);
            }
            _ => out.push_str(url),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Masks the value of every `password=` (any case): up to the next `&`, blank or quote, or
/// the whole of a single-quoted value.
fn mask_password_parameters(text: &str) -> String {
    const KEY: &str = "password=";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.to_ascii_lowercase().find(KEY) {
        let (before, after) = rest.split_at(at + KEY.len());
        out.push_str(before);
        out.push_str("***");
        let end = match after.strip_prefix('\'') {
            Some(quoted) => quoted.find('\'').map_or(after.len(), |close| close + 2),
            None => after
                .find(|c: char| c == '&' || c.is_whitespace() || c == '"')
                .unwrap_or(after.len()),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// [`Settings`] with every value decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub data_dir: PathBuf,
    pub database: Database,
    pub listen: SocketAddr,
    pub log_format: LogFormat,
    pub synchronous: SyncMode,
    pub server: ServerConfig,
    /// Timeouts and the cap of the HTTP listener.
    pub connections: ConnectionLimits,
    /// Where outgoing requests (Currents, webhooks) may go.
    pub egress: EgressPolicy,
    /// How long a Currents lease lasts without renewal.
    pub currents_lease_ttl: Duration,
    /// The SMTP server for email messages, if any.
    pub smtp: Option<SmtpSetting>,
    /// The base of tracking links; `None`: `http://<bound address>`.
    pub public_url: Option<String>,
    /// How long one webhook message request may take.
    pub webhook_timeout: Duration,
    /// How long the node serves on, draining, after SIGTERM.
    pub shutdown_drain: Duration,
}

impl Settings {
    /// Fills every unset value from `fallback` (the lower-precedence layer).
    pub fn or(self, fallback: Settings) -> Settings {
        Settings {
            data_dir: self.data_dir.or(fallback.data_dir),
            database_url: self.database_url.or(fallback.database_url),
            listen: self.listen.or(fallback.listen),
            log_format: self.log_format.or(fallback.log_format),
            synchronous: self.synchronous.or(fallback.synchronous),
            max_body_bytes: self.max_body_bytes.or(fallback.max_body_bytes),
            track_rate_limit: self.track_rate_limit.or(fallback.track_rate_limit),
            batch_rate_limit: self.batch_rate_limit.or(fallback.batch_rate_limit),
            export_rate_limit: self.export_rate_limit.or(fallback.export_rate_limit),
            max_array_len: self.max_array_len.or(fallback.max_array_len),
            header_timeout_ms: self.header_timeout_ms.or(fallback.header_timeout_ms),
            idle_timeout_ms: self.idle_timeout_ms.or(fallback.idle_timeout_ms),
            body_timeout_ms: self.body_timeout_ms.or(fallback.body_timeout_ms),
            max_connections: self.max_connections.or(fallback.max_connections),
            deny_private_endpoints: self
                .deny_private_endpoints
                .or(fallback.deny_private_endpoints),
            currents_lease_ttl_ms: self
                .currents_lease_ttl_ms
                .or(fallback.currents_lease_ttl_ms),
            smtp_url: self.smtp_url.or(fallback.smtp_url),
            public_url: self.public_url.or(fallback.public_url),
            webhook_timeout_ms: self.webhook_timeout_ms.or(fallback.webhook_timeout_ms),
            shutdown_drain_ms: self.shutdown_drain_ms.or(fallback.shutdown_drain_ms),
        }
    }

    /// The built-in defaults, every value set.
    pub fn defaults() -> Settings {
        let server = ServerConfig::default();
        Settings {
            data_dir: Some(PathBuf::from(DEFAULT_DATA_DIR)),
            database_url: None,
            listen: Some(
                DEFAULT_LISTEN
                    .parse()
                    .expect("the default listen address parses"),
            ),
            log_format: Some(LogFormat::Text),
            synchronous: Some(SyncMode::Normal),
            max_body_bytes: Some(server.max_body_bytes),
            track_rate_limit: Some(server.rate_limits.users_track_per_minute),
            batch_rate_limit: Some(server.rate_limits.users_batch_per_minute),
            export_rate_limit: Some(server.rate_limits.users_export_per_minute),
            max_array_len: Some(server.max_array_len),
            header_timeout_ms: Some(millis(ConnectionLimits::DEFAULT_HEADER_TIMEOUT)),
            idle_timeout_ms: Some(millis(ConnectionLimits::DEFAULT_IDLE_TIMEOUT)),
            body_timeout_ms: Some(millis(ConnectionLimits::DEFAULT_BODY_TIMEOUT)),
            max_connections: Some(tideway_server::default_max_connections()),
            deny_private_endpoints: Some(false),
            currents_lease_ttl_ms: Some(30_000),
            smtp_url: None,
            public_url: None,
            webhook_timeout_ms: Some(DEFAULT_WEBHOOK_TIMEOUT_MS),
            shutdown_drain_ms: Some(DEFAULT_SHUTDOWN_DRAIN_MS),
        }
    }

    /// Reads a TOML configuration file.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
        // The parser's message quotes the offending line, which may hold a password.
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!(redact_url(&e.to_string())))
            .with_context(|| {
            format!(
                "{} is not a valid Tideway configuration (keys are the `tideway serve` flag names \
                 without `--`, see `tideway serve --help`)",
                path.display()
            )
        })
    }

    /// Applies the file (if any) and the defaults.
    pub fn layered(self, file: Option<&Path>) -> anyhow::Result<Settings> {
        let from_file = match file {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        Ok(self.or(from_file).or(Settings::defaults()))
    }

    /// Applies the file (if any) and the defaults and checks the result.
    pub fn resolve(self, file: Option<&Path>) -> anyhow::Result<Resolved> {
        let full = self.layered(file)?;
        let missing = || anyhow::anyhow!("a setting has no default (a bug)");
        let mut resolved = Resolved {
            data_dir: full.data_dir.ok_or_else(missing)?,
            database: match full.database_url {
                None => Database::Sqlite,
                // Set, but to nothing (an environment variable whose secret did not arrive):
                // falling back to SQLite would have this node acknowledge writes into a store
                // of its own while its peers share PostgreSQL.
                Some(url) if url.trim().is_empty() => anyhow::bail!(
                    "--database-url (or TIDEWAY_DATABASE_URL, or `database-url` in the \
                     configuration file) is set but empty; give postgres://USER[:PASSWORD]@HOST:PORT/DATABASE, \
                     or unset it to use SQLite in the data directory"
                ),
                Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                    Database::Postgres(url)
                }
                Some(url) => anyhow::bail!(
                    "--database-url {} is not a PostgreSQL URL; write it as \
                     postgres://USER[:PASSWORD]@HOST:PORT/DATABASE, or leave it out to use SQLite \
                     in the data directory",
                    redact_url(&url)
                ),
            },
            listen: full.listen.ok_or_else(missing)?,
            log_format: full.log_format.ok_or_else(missing)?,
            synchronous: full.synchronous.ok_or_else(missing)?,
            server: ServerConfig {
                max_body_bytes: full.max_body_bytes.ok_or_else(missing)?,
                rate_limits: RateLimits {
                    users_track_per_minute: full.track_rate_limit.ok_or_else(missing)?,
                    users_batch_per_minute: full.batch_rate_limit.ok_or_else(missing)?,
                    users_export_per_minute: full.export_rate_limit.ok_or_else(missing)?,
                    ..RateLimits::default()
                },
                max_array_len: full.max_array_len.ok_or_else(missing)?,
                dashboard: tideway_server::dashboard::DashboardConfig::default(),
            },
            connections: ConnectionLimits {
                header_timeout: Duration::from_millis(full.header_timeout_ms.ok_or_else(missing)?),
                idle_timeout: Duration::from_millis(full.idle_timeout_ms.ok_or_else(missing)?),
                body_timeout: Duration::from_millis(full.body_timeout_ms.ok_or_else(missing)?),
                max_connections: full.max_connections.ok_or_else(missing)?,
            },
            egress: EgressPolicy {
                private: if full.deny_private_endpoints.ok_or_else(missing)? {
                    PrivateEndpoints::Deny
                } else {
                    PrivateEndpoints::Allow
                },
            },
            currents_lease_ttl: Duration::from_millis(
                full.currents_lease_ttl_ms.ok_or_else(missing)?,
            ),
            smtp: match full.smtp_url.filter(|u| !u.trim().is_empty()) {
                None => None,
                Some(url) => {
                    if let Err(e) = tideway_messaging::email::SmtpUrl::parse(&url) {
                        anyhow::bail!(
                            "--smtp-url {} is not usable ({e}); write it as smtp://HOST:PORT, \
                             smtp://USER:PASSWORD@HOST:587 or smtps://USER:PASSWORD@HOST:465",
                            redact_url(&url)
                        );
                    }
                    Some(SmtpSetting(url))
                }
            },
            public_url: match full.public_url.filter(|u| !u.trim().is_empty()) {
                None => None,
                Some(url) => Some(public_url(&url)?),
            },
            webhook_timeout: Duration::from_millis(full.webhook_timeout_ms.ok_or_else(missing)?),
            shutdown_drain: Duration::from_millis(full.shutdown_drain_ms.ok_or_else(missing)?),
        };
        // The dashboard shows the public URL as the REST endpoint, and marks its cookies
        // `Secure` when it is https.
        resolved.server.dashboard.public_url = resolved.public_url.clone();
        if resolved.webhook_timeout.is_zero() {
            anyhow::bail!("--webhook-timeout-ms must be at least 1");
        }
        if resolved.currents_lease_ttl < Duration::from_millis(300) {
            anyhow::bail!(
                "--currents-lease-ttl-ms must be at least 300 (a lease is renewed every third of it)"
            );
        }
        let limits = &resolved.server.rate_limits;
        if limits.users_track_per_minute == 0
            || limits.users_batch_per_minute == 0
            || limits.users_export_per_minute == 0
        {
            anyhow::bail!("rate limits must be at least 1 request per minute");
        }
        if resolved.server.max_body_bytes == 0 || resolved.server.max_array_len == 0 {
            anyhow::bail!("--max-body-bytes and --max-array-len must be at least 1");
        }
        let connections = &resolved.connections;
        if connections.header_timeout.is_zero()
            || connections.idle_timeout.is_zero()
            || connections.body_timeout.is_zero()
            || connections.max_connections == 0
        {
            anyhow::bail!(
                "--header-timeout-ms, --idle-timeout-ms, --body-timeout-ms and --max-connections \
                 must be at least 1"
            );
        }
        Ok(resolved)
    }
}

impl Resolved {
    /// Where this node keeps its segment-index snapshots: per database, so a node pointed at
    /// another database (or switched from SQLite to PostgreSQL) never loads positions that
    /// belong to another store.
    pub fn segment_index_dir(&self) -> PathBuf {
        let root = self.data_dir.join("segment-index");
        match &self.database {
            Database::Sqlite => root,
            Database::Postgres(url) => {
                // The URL without credentials names the database; a short stable digest of it
                // keeps the directory name a plain word.
                let place = url.rsplit_once('@').map_or(url.as_str(), |(_, host)| host);
                let digest = place.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
                root.join(format!("postgres-{digest:016x}"))
            }
        }
    }

    pub fn pg_options(&self) -> PgOptions {
        PgOptions {
            max_array_len: self.server.max_array_len,
        }
    }

    pub fn sqlite_options(&self) -> SqliteOptions {
        SqliteOptions {
            synchronous: self.synchronous.into(),
            max_array_len: self.server.max_array_len,
            ..SqliteOptions::default()
        }
    }
}

/// The default `webhook-timeout-ms`: Braze's 90 seconds per attempt.
pub const DEFAULT_WEBHOOK_TIMEOUT_MS: u64 = 90_000;

/// One second: enough for keep-alive clients mid-conversation to be told to reconnect; a load
/// balancer that polls `/health` less often wants more (`--shutdown-drain-ms`).
pub const DEFAULT_SHUTDOWN_DRAIN_MS: u64 = 1_000;

/// Checks a `public-url`: an absolute http(s) URL without query or fragment; returned without
/// its trailing slash (links are appended to it).
fn public_url(raw: &str) -> anyhow::Result<String> {
    let url = raw.trim();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let fine = rest.is_some_and(|r| {
        let host = r.split('/').next().unwrap_or_default();
        !host.is_empty() && !host.contains('@') && !r.contains(['?', '#', ' '])
    });
    if !fine {
        anyhow::bail!(
            "--public-url {url} is not usable; write the address people reach this server at, \
             such as https://mail.example.com or http://203.0.113.7:4000 (no query or fragment)"
        );
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// A duration as a whole number of milliseconds (a setting's unit).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `<data-dir>/tideway.sqlite`
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tideway.sqlite")
}

/// `<data-dir>/initial-admin-key`
pub fn initial_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("initial-admin-key")
}

/// Where the first start saves the dashboard's `admin` password.
pub fn initial_password_path(data_dir: &Path) -> PathBuf {
    data_dir.join("initial-admin-password")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_wherever_a_text_carries_them() {
        for (given, shown) in [
            (
                "postgres://u:secret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgres://u:pa/ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            (
                "postgres://u@h/db?password=secret&sslmode=disable",
                "postgres://u@h/db?password=***&sslmode=disable",
            ),
            (
                "postgres://u@h/db?PASSWORD=secret",
                "postgres://u@h/db?PASSWORD=***",
            ),
            (
                "host=h password=secret dbname=x",
                "host=h password=*** dbname=x",
            ),
            (
                "host=h password='s e c' dbname=x",
                "host=h password=*** dbname=x",
            ),
            (
                "line 2: database_url = \"postgres://postgres:secret@127.0.0.1:5/tw\" unknown",
                "line 2: database_url = \"postgres://postgres:***@127.0.0.1:5/tw\" unknown",
            ),
            (
                "smtp://user:pw@mail:587 and postgres://a:b@c/d",
                "smtp://user:***@mail:587 and postgres://a:***@c/d",
            ),
            ("no secrets here", "no secrets here"),
        ] {
            assert_eq!(redact_url(given), shown, "{given}");
        }
    }

    #[test]
    fn an_empty_database_url_is_refused_rather_than_sqlite() {
        let settings = Settings {
            database_url: Some("  ".into()),
            ..Settings::default()
        };
        let error = settings.resolve(None).unwrap_err().to_string();
        assert!(error.contains("set but empty"), "{error}");
        let unset = Settings::default().resolve(None).unwrap();
        assert_eq!(unset.database, Database::Sqlite);
    }

    #[test]
    fn a_configuration_file_error_does_not_quote_a_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tideway.toml");
        std::fs::write(
            &path,
            "database_url = \"postgres://postgres:hunter2@127.0.0.1:5432/tw\"\n",
        )
        .unwrap();
        let error = format!("{:#}", Settings::from_file(&path).unwrap_err());
        assert!(!error.contains("hunter2"), "{error}");
        assert!(
            error.contains("not a valid Tideway configuration"),
            "{error}"
        );
    }
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn parse(args: &[&str]) -> Settings {
        Cli::try_parse_from(std::iter::once("tideway").chain(args.iter().copied()))
            .unwrap()
            .settings
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let r = parse(&[]).resolve(None).unwrap();
        assert_eq!(r.data_dir, PathBuf::from("./tideway-data"));
        assert_eq!(r.listen, "127.0.0.1:4000".parse().unwrap());
        assert_eq!(r.log_format, LogFormat::Text);
        assert_eq!(r.synchronous, SyncMode::Normal);
        assert_eq!(r.server, ServerConfig::default());
        assert_eq!(r.connections, ConnectionLimits::default());
        assert_eq!(
            database_path(&r.data_dir),
            PathBuf::from("./tideway-data/tideway.sqlite")
        );
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let f = file(
            "listen = \"127.0.0.1:5000\"\ndata-dir = \"/from/file\"\nsynchronous = \"full\"\ntrack-rate-limit = 7\n",
        );
        let r = parse(&["--listen", "127.0.0.1:6000", "--track-rate-limit", "9"])
            .resolve(Some(f.path()))
            .unwrap();
        assert_eq!(r.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(r.server.rate_limits.users_track_per_minute, 9);
        assert_eq!(r.data_dir, PathBuf::from("/from/file"));
        assert_eq!(r.synchronous, SyncMode::Full);
        assert_eq!(
            r.server.rate_limits.users_export_per_minute,
            ServerConfig::default().rate_limits.users_export_per_minute
        );
    }

    #[test]
    fn unknown_file_keys_are_rejected_with_the_file_name() {
        let f = file("listn = \"127.0.0.1:5000\"\n");
        let err = format!("{:#}", parse(&[]).resolve(Some(f.path())).unwrap_err());
        assert!(err.contains("listn"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");
    }

    #[test]
    fn printed_config_reads_back_as_the_same_settings() {
        let full = parse(&["--synchronous", "full", "--log-format", "json"])
            .layered(None)
            .unwrap();
        let text = toml::to_string(&full).unwrap();
        let back: Settings = toml::from_str(&text).unwrap();
        assert_eq!(back, full);
        assert!(text.contains("synchronous = \"full\""), "{text}");
    }

    #[test]
    fn help_documents_the_real_defaults() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        let d = ServerConfig::default();
        for value in [
            d.max_body_bytes.to_string(),
            d.rate_limits.users_track_per_minute.to_string(),
            d.rate_limits.users_batch_per_minute.to_string(),
            d.rate_limits.users_export_per_minute.to_string(),
            d.max_array_len.to_string(),
            millis(ConnectionLimits::DEFAULT_HEADER_TIMEOUT).to_string(),
            millis(ConnectionLimits::DEFAULT_IDLE_TIMEOUT).to_string(),
            millis(ConnectionLimits::DEFAULT_BODY_TIMEOUT).to_string(),
        ] {
            assert!(
                help.contains(&format!("[default: {value}]")),
                "help lacks default {value}:\n{help}"
            );
        }
        assert!(help.contains("[default: ./tideway-data]"));
        assert!(help.contains("[default: 127.0.0.1:4000]"));
        assert!(
            help.contains("[default: the soft open-file limit minus 128, at least 32]"),
            "{help}"
        );
        assert_eq!(
            tideway_server::FD_HEADROOM,
            128,
            "the help text names the headroom"
        );
    }

    #[test]
    fn deny_private_endpoints_is_a_flag_a_value_and_a_file_key() {
        assert_eq!(
            parse(&[]).resolve(None).unwrap().egress,
            EgressPolicy::ALLOW_PRIVATE
        );
        assert_eq!(
            parse(&["--deny-private-endpoints"])
                .resolve(None)
                .unwrap()
                .egress,
            EgressPolicy::DENY_PRIVATE
        );
        let f = file("deny-private-endpoints = true\n");
        assert_eq!(
            parse(&[]).resolve(Some(f.path())).unwrap().egress,
            EgressPolicy::DENY_PRIVATE
        );
        assert_eq!(
            parse(&["--deny-private-endpoints=false"])
                .resolve(Some(f.path()))
                .unwrap()
                .egress,
            EgressPolicy::ALLOW_PRIVATE,
            "the flag beats the file"
        );
        let full = parse(&["--deny-private-endpoints", "--listen", "127.0.0.1:0"])
            .layered(None)
            .unwrap();
        assert_eq!(full.listen, Some("127.0.0.1:0".parse().unwrap()));
        let text = toml::to_string(&full).unwrap();
        assert!(text.contains("deny-private-endpoints = true"), "{text}");
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("--deny-private-endpoints"), "{help}");
        assert!(help.contains("TIDEWAY_DENY_PRIVATE_ENDPOINTS"), "{help}");
    }

    #[test]
    fn connection_limits_are_flags_file_keys_and_variables() {
        let f = file("header-timeout-ms = 1500\nidle-timeout-ms = 2500\nmax-connections = 40\n");
        let r = parse(&["--idle-timeout-ms", "700", "--body-timeout-ms", "900"])
            .resolve(Some(f.path()))
            .unwrap();
        assert_eq!(
            r.connections,
            ConnectionLimits {
                header_timeout: Duration::from_millis(1500),
                idle_timeout: Duration::from_millis(700),
                body_timeout: Duration::from_millis(900),
                max_connections: 40,
            }
        );
        let full = parse(&[]).layered(None).unwrap();
        assert_eq!(
            full.max_connections,
            Some(tideway_server::default_max_connections()),
            "the default cap is sized from the open-file limit"
        );
        let text = toml::to_string(&full).unwrap();
        assert!(text.contains("idle-timeout-ms = 60000"), "{text}");
        for zero in [
            "--header-timeout-ms",
            "--idle-timeout-ms",
            "--body-timeout-ms",
            "--max-connections",
        ] {
            assert!(parse(&[zero, "0"]).resolve(None).is_err(), "{zero} 0");
        }
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for variable in [
            "TIDEWAY_HEADER_TIMEOUT_MS",
            "TIDEWAY_IDLE_TIMEOUT_MS",
            "TIDEWAY_BODY_TIMEOUT_MS",
            "TIDEWAY_MAX_CONNECTIONS",
        ] {
            assert!(help.contains(variable), "{help}");
        }
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(parse(&["--export-rate-limit", "0"]).resolve(None).is_err());
    }
}
