//! Load generation for `tideway bench ingest`: a deterministic `/users/track` workload, a
//! closed-loop driver (N clients, each sending its next request when the last is answered:
//! maximum throughput) and an open-loop driver (requests started on a fixed schedule whatever
//! the answers: latency at a given rate, without coordinated omission), and latency statistics.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::StatusCode;
use tideway_core::clock::Millis;

use crate::data;

/// Attribute objects per request.
pub const ATTRIBUTES: usize = 20;
/// Event objects per request.
pub const EVENTS: usize = 50;
/// Purchase objects per request.
pub const PURCHASES: usize = 5;
/// Objects per request (Braze's per-array limit is 75; the mix stays within one request's 75).
pub const OBJECTS: usize = ATTRIBUTES + EVENTS + PURCHASES;

const EVENT_NAMES: [&str; 5] = [
    "viewed_product",
    "added_to_cart",
    "searched",
    "checkout_started",
    "shared",
];
const CATEGORIES: [&str; 4] = ["shoes", "books", "garden", "toys"];
const PLANS: [&str; 3] = ["free", "trial", "pro"];
const COUNTRIES: [&str; 4] = ["US", "FR", "DE", "BR"];

/// A deterministic stream of realistic `/users/track` bodies: attributes with a few standard and
/// custom attributes (one changes every time, so every attribute object is a real write),
/// events with properties and a few purchases, spread uniformly over `users` external ids.
pub struct Workload {
    state: u64,
    users: u64,
    requests: u64,
}

impl Workload {
    pub fn new(seed: u64, users: u64) -> Workload {
        Workload {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03,
            users: users.max(1),
            requests: 0,
        }
    }

    /// splitmix64: tiny, fast, good enough to spread ids.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }

    /// The next request body (JSON text, written directly: building a `Value` would cost the
    /// client more CPU than the server spends parsing it).
    pub fn body(&mut self, now: Millis) -> String {
        self.requests += 1;
        let time = now.to_iso();
        let mut s = String::with_capacity(OBJECTS * 220);
        s.push_str("{\"attributes\":[");
        for i in 0..ATTRIBUTES {
            let user = self.next() % self.users;
            let (country, plan) = (self.pick(&COUNTRIES), self.pick(&PLANS));
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"external_id\":\"bench-{user}\",\"first_name\":\"User{user}\",\"country\":\"{country}\",\"language\":\"en\",\
                 \"plan\":\"{plan}\",\"visits\":{{\"inc\":1}},\"last_request\":{}}}",
                self.requests
            );
        }
        s.push_str("],\"events\":[");
        for i in 0..EVENTS {
            let user = self.next() % self.users;
            let (name, category) = (self.pick(&EVENT_NAMES), self.pick(&CATEGORIES));
            let sku = self.next() % 5000;
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"external_id\":\"bench-{user}\",\"name\":\"{name}\",\"time\":\"{time}\",\
                 \"properties\":{{\"product_id\":\"sku-{sku}\",\"category\":\"{category}\",\"price\":{}.99,\"source\":\"web\"}}}}",
                sku % 100
            );
        }
        s.push_str("],\"purchases\":[");
        for i in 0..PURCHASES {
            let user = self.next() % self.users;
            let sku = self.next() % 5000;
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"external_id\":\"bench-{user}\",\"product_id\":\"sku-{sku}\",\"currency\":\"USD\",\"price\":{}.99,\
                 \"quantity\":1,\"time\":\"{time}\",\"properties\":{{\"coupon\":\"SPRING\"}}}}",
                sku % 100
            );
        }
        s.push_str("]}");
        s
    }
}

/// Where requests go.
#[derive(Clone)]
pub struct Target {
    pub client: reqwest::Client,
    /// The full URL of the endpoint (`…/users/track`).
    pub url: String,
    pub api_key: Option<String>,
    /// The same endpoint on other nodes of one cluster: clients are spread round-robin over
    /// `url` and these, as a load balancer would.
    pub spread: Vec<String>,
}

impl Target {
    /// The target client number `client` talks to.
    fn for_client(&self, client: usize) -> Target {
        let nodes = 1 + self.spread.len();
        let url = match client % nodes {
            0 => self.url.clone(),
            i => self.spread[i - 1].clone(),
        };
        Target {
            url,
            spread: Vec::new(),
            ..self.clone()
        }
    }

    async fn send(&self, body: String) -> Result<(), String> {
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading the response failed: {e}"))?;
        if status == StatusCode::CREATED {
            Ok(())
        } else {
            Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ))
        }
    }
}

/// What one measured phase saw.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latency of each acknowledged request, in microseconds.
    pub latencies_us: Vec<u64>,
    pub elapsed: Duration,
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        self.requests += other.requests;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies_us.extend(other.latencies_us);
    }

    /// Adds a later phase of the same shape: its requests, latencies and time.
    pub fn then(&mut self, later: Stats) {
        self.elapsed += later.elapsed;
        self.merge(later);
    }

    fn record(&mut self, result: Result<(), String>, latency: Duration) {
        match result {
            Ok(()) => {
                self.requests += 1;
                self.latencies_us
                    .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    pub fn objects(&self) -> u64 {
        self.requests * OBJECTS as u64
    }

    pub fn objects_per_sec(&self) -> f64 {
        self.objects() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`-th percentile latency (0 < p ≤ 100), nearest rank.
    pub fn percentile(&mut self, p: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        self.latencies_us.sort_unstable();
        let rank = ((p / 100.0) * self.latencies_us.len() as f64).ceil() as usize;
        Duration::from_micros(self.latencies_us[rank.clamp(1, self.latencies_us.len()) - 1])
    }
}

fn progress(label: &str, duration: Duration) -> ProgressBar {
    let bar = ProgressBar::new(duration.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>16} [{bar:30}] {pos}/{len} s  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_owned());
    bar
}

/// Spawns a task that keeps the progress bar's position and rate message current.
fn tick_progress(
    bar: ProgressBar,
    objects: Arc<AtomicU64>,
    start: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(250));
        loop {
            every.tick().await;
            let secs = start.elapsed().as_secs_f64();
            bar.set_position(secs as u64);
            bar.set_message(format!(
                "{} objects/s",
                thousands(objects.load(Ordering::Relaxed) as f64 / secs.max(1e-3))
            ));
        }
    })
}

/// `clients` connections, each sending its next request as soon as the last is answered, for
/// `duration`.
pub async fn closed_loop(
    target: &Target,
    label: &str,
    clients: usize,
    users: u64,
    duration: Duration,
) -> Stats {
    let start = Instant::now();
    let deadline = start + duration;
    let objects = Arc::new(AtomicU64::new(0));
    let bar = progress(label, duration);
    let ticker = tick_progress(bar.clone(), objects.clone(), start);
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let target = target.for_client(client);
        let objects = objects.clone();
        tasks.spawn(async move {
            let mut workload = Workload::new(client as u64 + 1, users);
            let mut stats = Stats::default();
            while Instant::now() < deadline {
                let body = workload.body(data::now());
                let sent = Instant::now();
                let result = target.send(body).await;
                if result.is_ok() {
                    objects.fetch_add(OBJECTS as u64, Ordering::Relaxed);
                }
                stats.record(result, sent.elapsed());
                // A server that refuses everything: stop hammering it, the report will say why.
                if stats.requests == 0 && stats.errors >= 20 {
                    break;
                }
            }
            stats
        });
    }
    let mut total = Stats::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(stats) => total.merge(stats),
            Err(e) => total.record(Err(format!("a client task failed: {e}")), Duration::ZERO),
        }
    }
    total.elapsed = start.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    total
}

/// Most requests allowed in flight in open-loop mode (beyond it the schedule slips, and the
/// slip counts in the latencies, which are measured from the scheduled start).
const MAX_IN_FLIGHT: usize = 2048;

/// Requests of `OBJECTS` objects started on a fixed schedule so that `objects_per_sec` are
/// offered, for `duration`. Latency is measured from each request's scheduled start.
pub async fn open_loop(
    target: &Target,
    label: &str,
    objects_per_sec: u64,
    users: u64,
    duration: Duration,
) -> Stats {
    let requests_per_sec = (objects_per_sec as f64 / OBJECTS as f64).max(0.1);
    let start = Instant::now();
    let objects = Arc::new(AtomicU64::new(0));
    let bar = progress(label, duration);
    let ticker = tick_progress(bar.clone(), objects.clone(), start);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut schedule = tokio::time::interval(Duration::from_secs_f64(1.0 / requests_per_sec));
    schedule.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let deadline = tokio::time::Instant::now() + duration;
    let mut workload = Workload::new(0xB0B, users);
    let mut tasks = tokio::task::JoinSet::new();
    let mut total = Stats::default();
    loop {
        let scheduled = schedule.tick().await;
        if scheduled >= deadline {
            break;
        }
        let body = workload.body(data::now());
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let target = target.clone();
        let objects = objects.clone();
        tasks.spawn(async move {
            let result = target.send(body).await;
            drop(slot);
            if result.is_ok() {
                objects.fetch_add(OBJECTS as u64, Ordering::Relaxed);
            }
            (result, scheduled.elapsed())
        });
        while let Some(done) = tasks.try_join_next() {
            record_joined(&mut total, done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        record_joined(&mut total, done);
    }
    total.elapsed = start.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    total
}

fn record_joined(
    total: &mut Stats,
    joined: Result<(Result<(), String>, Duration), tokio::task::JoinError>,
) {
    match joined {
        Ok((result, latency)) => total.record(result, latency),
        Err(e) => total.record(Err(format!("a request task failed: {e}")), Duration::ZERO),
    }
}

/// `1234567.8` → `1,234,568`
pub fn thousands(value: f64) -> String {
    let n = value.round().max(0.0) as u64;
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency for humans: `0.42 ms`, `4.1 ms`, `21 ms`.
pub fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        format!("{ms:.2} ms")
    } else if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_valid_track_requests_of_75_objects() {
        let mut w = Workload::new(1, 1000);
        let body: serde_json::Value =
            serde_json::from_str(&w.body(Millis(1_700_000_000_000))).unwrap();
        let map = body.as_object().unwrap();
        let parsed = tideway_core::track::parse_track(map).unwrap();
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(parsed.valid_objects(), OBJECTS);
        assert_eq!(OBJECTS, 75);
        // The changing attribute makes every attribute object a real write.
        let again: serde_json::Value =
            serde_json::from_str(&w.body(Millis(1_700_000_000_000))).unwrap();
        assert_ne!(
            body["attributes"][0]["last_request"],
            again["attributes"][0]["last_request"]
        );
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Stats {
            latencies_us: (1..=100).rev().collect(),
            ..Stats::default()
        };
        assert_eq!(s.percentile(50.0), Duration::from_micros(50));
        assert_eq!(s.percentile(99.0), Duration::from_micros(99));
        assert_eq!(s.percentile(100.0), Duration::from_micros(100));
        assert_eq!(Stats::default().percentile(99.0), Duration::ZERO);
    }

    #[test]
    fn numbers_format_for_humans() {
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(0.0), "0");
        assert_eq!(millis(Duration::from_micros(4_100)), "4.1 ms");
        assert_eq!(millis(Duration::from_micros(21_400)), "21 ms");
        assert_eq!(millis(Duration::from_micros(420)), "0.42 ms");
    }
}
