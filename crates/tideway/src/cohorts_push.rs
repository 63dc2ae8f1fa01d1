//! `tideway cohorts push`: the partner side of the cohort-import API as a tool.
//!
//! Given a cohort's full membership list, it names the cohort (`POST /partners/{p}/cohorts`),
//! computes the delta against the last successful push (kept in a local state file), sends
//! only the changes in chunks of at most 1,000 identifiers, retries 429 / 5xx / timeouts /
//! connection errors with capped exponential backoff and full jitter (honouring `Retry-After`),
//! and reports what it did. Because cohort import has set semantics, re-sending a chunk after a
//! failure is harmless. The state file is written when the push ends, successfully or not, with
//! exactly the changes that were acknowledged, so a re-run after a failure sends only the rest,
//! and a re-run with an unchanged list sends nothing. It speaks only the documented API, so it works against Braze too.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

/// One member of a cohort, as the input file names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Member {
    External(String),
    Device(String),
    Alias { label: String, name: String },
}

impl Member {
    /// The state file's one-line form (kind prefix, unit separator between alias parts).
    fn key(&self) -> String {
        match self {
            Member::External(id) => format!("e:{id}"),
            Member::Device(id) => format!("d:{id}"),
            Member::Alias { label, name } => format!("a:{label}\u{1f}{name}"),
        }
    }

    fn from_key(key: &str) -> Option<Member> {
        let (kind, rest) = key.split_once(':')?;
        match kind {
            "e" => Some(Member::External(rest.to_owned())),
            "d" => Some(Member::Device(rest.to_owned())),
            "a" => rest.split_once('\u{1f}').map(|(l, n)| Member::Alias {
                label: l.to_owned(),
                name: n.to_owned(),
            }),
            _ => None,
        }
    }

    fn from_columns(
        external_id: Option<&str>,
        device_id: Option<&str>,
        alias_name: Option<&str>,
        alias_label: Option<&str>,
    ) -> Option<Member> {
        let present = |v: Option<&str>| {
            v.map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        if let Some(e) = present(external_id) {
            return Some(Member::External(e));
        }
        if let Some(d) = present(device_id) {
            return Some(Member::Device(d));
        }
        match (present(alias_name), present(alias_label)) {
            (Some(name), Some(label)) => Some(Member::Alias { label, name }),
            _ => None,
        }
    }
}

/// Input file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// Comma-separated with a header row naming external_id, device_id, alias_name, alias_label.
    Csv,
    /// One JSON object per line with those keys.
    Jsonl,
}

/// Splits one CSV line (RFC 4180 quoting: `"a,b"`, `""` for a quote).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    fields.push(field);
    fields
}

/// Reads the membership list. Rows naming no identifier are errors (with their line number).
pub fn read_members(path: &Path, format: InputFormat) -> anyhow::Result<BTreeSet<Member>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the membership list {}", path.display()))?;
    let mut lines = BufReader::new(file).lines().enumerate();
    let mut members = BTreeSet::new();
    match format {
        InputFormat::Csv => {
            let Some((_, header)) = lines.next() else {
                return Ok(members);
            };
            let header: Vec<String> = csv_fields(header?.trim_end_matches('\r'))
                .into_iter()
                .map(|h| h.trim().to_owned())
                .collect();
            let col = |name: &str| header.iter().position(|h| h == name);
            let (e, d, an, al) = (
                col("external_id"),
                col("device_id"),
                col("alias_name"),
                col("alias_label"),
            );
            if e.is_none() && d.is_none() && (an.is_none() || al.is_none()) {
                bail!(
                    "{}: the header must name external_id, device_id, or alias_name and alias_label (found: {})",
                    path.display(),
                    header.join(",")
                );
            }
            for (n, line) in lines {
                let line = line?;
                let line = line.trim_end_matches('\r');
                if line.trim().is_empty() {
                    continue;
                }
                let f = csv_fields(line);
                let get = |i: Option<usize>| i.and_then(|i| f.get(i)).map(String::as_str);
                let member =
                    Member::from_columns(get(e), get(d), get(an), get(al)).with_context(|| {
                        format!(
                            "{} line {}: no external_id, device_id or alias_name+alias_label",
                            path.display(),
                            n + 1
                        )
                    })?;
                members.insert(member);
            }
        }
        InputFormat::Jsonl => {
            for (n, line) in lines {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&line)
                    .with_context(|| format!("{} line {}: not JSON", path.display(), n + 1))?;
                let s = |k: &str| v.get(k).and_then(Value::as_str);
                let member = Member::from_columns(
                    s("external_id"),
                    s("device_id"),
                    s("alias_name"),
                    s("alias_label"),
                )
                .with_context(|| {
                    format!(
                        "{} line {}: no external_id, device_id or alias_name+alias_label",
                        path.display(),
                        n + 1
                    )
                })?;
                members.insert(member);
            }
        }
    }
    Ok(members)
}

/// What was pushed last time, for one (endpoint, partner, cohort).
#[derive(Debug, Default)]
struct PushState {
    members: BTreeSet<Member>,
}

fn state_identity(url: &str, partner: &str, cohort_id: &str) -> String {
    format!("{url}|{partner}|{cohort_id}")
}

fn load_state(path: &Path, identity: &str) -> anyhow::Result<PushState> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PushState::default()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the state file {}", path.display()));
        }
    };
    let mut lines = text.lines();
    if lines.next() != Some(identity) {
        // State of another cohort or endpoint: start from scratch rather than send a wrong delta.
        return Ok(PushState::default());
    }
    let members = lines.filter_map(Member::from_key).collect();
    Ok(PushState { members })
}

fn save_state(path: &Path, identity: &str, state: &PushState) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut text = String::with_capacity(state.members.len() * 24 + identity.len() + 1);
    text.push_str(identity);
    text.push('\n');
    for m in &state.members {
        text.push_str(&m.key());
        text.push('\n');
    }
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot replace the state file {}", path.display()))
}

/// The request body's `cohort_changes` element for a chunk.
fn change_object(chunk: &[Member], remove: bool) -> Value {
    let mut user_ids = Vec::new();
    let mut device_ids = Vec::new();
    let mut aliases = Vec::new();
    for m in chunk {
        match m {
            Member::External(e) => user_ids.push(json!(e)),
            Member::Device(d) => device_ids.push(json!(d)),
            Member::Alias { label, name } => {
                aliases.push(json!({"alias_name": name, "alias_label": label}))
            }
        }
    }
    let mut obj = json!({"user_ids": user_ids, "device_ids": device_ids, "aliases": aliases});
    if remove {
        obj["should_remove"] = json!(true);
    }
    obj
}

/// Backoff schedule: capped exponential with full jitter (`random in [0, min(cap, base·2^n)]`).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    pub max_retries: u32,
}

impl Backoff {
    pub fn delay(&self, attempt: u32, unit_random: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(2u32.saturating_pow(attempt.min(20)));
        exp.min(self.cap).mul_f64(unit_random.clamp(0.0, 1.0))
    }
}

/// A uniform random number in [0, 1) from the OS (via a v4 UUID's random bits).
fn unit_random() -> f64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let n = u64::from_le_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[8], bytes[9],
    ]);
    (n >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The cohort's full membership list
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Input format; by default from the file extension (.csv, else JSON lines)
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// REST endpoint of Tideway or Braze, e.g. http://127.0.0.1:4000
    #[arg(long, env = "TIDEWAY_PUSH_URL")]
    pub url: String,
    /// Partner slug in the path (/partners/{partner}/…)
    #[arg(long, default_value = "heap")]
    pub partner: String,
    /// The partner API key issued by the operator
    #[arg(long, env = "TIDEWAY_PARTNER_API_KEY", hide_env_values = true)]
    pub partner_api_key: String,
    /// The workspace's data import key (sent as client_secret)
    #[arg(long, env = "TIDEWAY_DATA_IMPORT_KEY", hide_env_values = true)]
    pub client_secret: String,
    #[arg(long)]
    pub cohort_id: String,
    /// Cohort name shown in the dashboard (defaults to the cohort id)
    #[arg(long)]
    pub name: Option<String>,
    /// Where the last successful push is remembered (default: <input>.push-state)
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Identifiers per request (at most 1,000)
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub chunk: u16,
    /// Retries per request for 429, 5xx, timeouts and connection errors
    #[arg(long, default_value_t = 8)]
    pub max_retries: u32,
    /// First retry waits up to this many milliseconds (doubling each time, full jitter)
    #[arg(long, default_value_t = 250)]
    pub backoff_base_ms: u64,
    /// Longest wait between retries, milliseconds
    #[arg(long, default_value_t = 30_000)]
    pub backoff_cap_ms: u64,
    /// Per-request timeout, seconds
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

/// What a push did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PushSummary {
    pub added: usize,
    pub removed: usize,
    pub requests: usize,
    pub retries: usize,
}

struct Client {
    http: reqwest::Client,
    backoff: Backoff,
    requests: usize,
    retries: usize,
}

impl Client {
    /// POSTs `body`, retrying what is worth retrying; any other failure is final.
    async fn post(&mut self, url: &str, body: &Value) -> anyhow::Result<()> {
        let mut attempt = 0u32;
        loop {
            self.requests += 1;
            let result = self.http.post(url).json(body).send().await;
            let retry_after = match result {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.unwrap_or_default();
                    let retryable = status.as_u16() == 429
                        || status.is_server_error()
                        || status.as_u16() == 423;
                    if !retryable || attempt >= self.backoff.max_retries {
                        let hint = match status.as_u16() {
                            401 => " (check --partner-api-key, --client-secret and --partner)",
                            400 => " (the server refused the request's shape)",
                            _ => "",
                        };
                        bail!("{url} answered {status}: {text}{hint}");
                    }
                    retry_after
                }
                Err(e) => {
                    if attempt >= self.backoff.max_retries {
                        return Err(e).with_context(|| {
                            format!("{url} could not be reached after {} retries", attempt)
                        });
                    }
                    None
                }
            };
            let wait = retry_after
                .unwrap_or_else(|| self.backoff.delay(attempt, unit_random()))
                .min(self.backoff.cap);
            tracing::debug!(attempt, wait_ms = wait.as_millis() as u64, "retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
            self.retries += 1;
        }
    }
}

/// Runs a push end to end.
pub async fn push(args: &PushArgs, show_progress: bool) -> anyhow::Result<PushSummary> {
    let format = args
        .format
        .unwrap_or(match args.input.extension().and_then(|e| e.to_str()) {
            Some("csv") => InputFormat::Csv,
            _ => InputFormat::Jsonl,
        });
    let wanted = read_members(&args.input, format)?;
    let base = args.url.trim_end_matches('/');
    let identity = state_identity(base, &args.partner, &args.cohort_id);
    let state_path = args.state.clone().unwrap_or_else(|| {
        let mut p = args.input.clone().into_os_string();
        p.push(".push-state");
        PathBuf::from(p)
    });
    let mut state = load_state(&state_path, &identity)?;
    // The operator's own Tideway URL, given on the command line: not a user-supplied target.
    #[allow(clippy::disallowed_methods)]
    let mut client = Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(args.timeout_secs))
            .build()
            .context("cannot build the HTTP client")?,
        backoff: Backoff {
            base: Duration::from_millis(args.backoff_base_ms),
            cap: Duration::from_millis(args.backoff_cap_ms),
            max_retries: args.max_retries,
        },
        requests: 0,
        retries: 0,
    };
    let name = args.name.clone().unwrap_or_else(|| args.cohort_id.clone());
    let created_at =
        tideway_core::clock::Millis(time::OffsetDateTime::now_utc().unix_timestamp() * 1000)
            .to_iso();
    let naming = json!({
        "partner_api_key": args.partner_api_key, "client_secret": args.client_secret,
        "cohort_id": args.cohort_id, "name": name, "created_at": created_at,
    });
    client
        .post(
            &format!("{base}/partners/{}/cohorts", args.partner),
            &naming,
        )
        .await
        .context("naming the cohort failed")?;

    let adds: Vec<Member> = wanted.difference(&state.members).cloned().collect();
    let removes: Vec<Member> = state.members.difference(&wanted).cloned().collect();
    let bar = if show_progress {
        ProgressBar::new((adds.len() + removes.len()) as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} changes ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let url = format!("{base}/partners/{}/cohorts/users", args.partner);
    let mut summary = PushSummary::default();
    for (list, remove) in [(&adds, false), (&removes, true)] {
        for chunk in list.chunks(usize::from(args.chunk)) {
            let body = json!({
                "partner_api_key": args.partner_api_key, "client_secret": args.client_secret,
                "cohort_id": args.cohort_id, "cohort_changes": [change_object(chunk, remove)],
            });
            if let Err(e) = client.post(&url, &body).await {
                save_state(&state_path, &identity, &state)?;
                bar.abandon();
                return Err(e.context(format!(
                    "pushing stopped after {} added and {} removed; the state is saved, so re-running sends only the rest",
                    summary.added, summary.removed
                )));
            }
            for m in chunk {
                if remove {
                    state.members.remove(m);
                } else {
                    state.members.insert(m.clone());
                }
            }
            if remove {
                summary.removed += chunk.len();
            } else {
                summary.added += chunk.len();
            }
            bar.inc(chunk.len() as u64);
        }
    }
    save_state(&state_path, &identity, &state)?;
    bar.finish_and_clear();
    summary.requests = client.requests;
    summary.retries = client.retries;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting_and_columns() {
        assert_eq!(
            csv_fields(r#"a,"b,c","d""e",,"#),
            ["a", "b,c", "d\"e", "", ""]
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.csv");
        std::fs::write(
            &path,
            "alias_label,alias_name,external_id\r\nemail,a@b,\r\n,,u1\r\n\r\n",
        )
        .unwrap();
        let members = read_members(&path, InputFormat::Csv).unwrap();
        assert_eq!(
            members.into_iter().collect::<Vec<_>>(),
            [
                Member::External("u1".into()),
                Member::Alias {
                    label: "email".into(),
                    name: "a@b".into()
                }
            ]
        );
        std::fs::write(&path, "external_id\nu1\n,\n").unwrap();
        assert!(
            read_members(&path, InputFormat::Csv)
                .unwrap_err()
                .to_string()
                .contains("line 3")
        );
    }

    #[test]
    fn state_round_trips_and_ignores_another_cohort() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let state = PushState {
            members: [
                Member::External("x".into()),
                Member::Device("d".into()),
                Member::Alias {
                    label: "l".into(),
                    name: "n".into(),
                },
            ]
            .into(),
        };
        save_state(&path, "id", &state).unwrap();
        assert_eq!(load_state(&path, "id").unwrap().members, state.members);
        assert!(load_state(&path, "other").unwrap().members.is_empty());
    }

    #[test]
    fn backoff_is_capped_with_full_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            max_retries: 3,
        };
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay(10, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(10, 0.0), Duration::ZERO);
        let r = unit_random();
        assert!((0.0..1.0).contains(&r));
    }

    #[test]
    fn change_objects_split_identifier_kinds() {
        let chunk = [
            Member::External("e".into()),
            Member::Device("d".into()),
            Member::Alias {
                label: "l".into(),
                name: "n".into(),
            },
        ];
        assert_eq!(
            change_object(&chunk, true),
            json!({"user_ids": ["e"], "device_ids": ["d"], "aliases": [{"alias_name": "n", "alias_label": "l"}], "should_remove": true})
        );
    }
}
