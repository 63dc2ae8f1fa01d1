//! Segment evaluation benchmark (DESIGN.md §4): `cargo bench -p tideway-segment --bench segments`.
//!
//! Builds a [`SegmentIndex`] of `TIDEWAY_BENCH_USERS` (default 10 000 000) deterministic
//! synthetic users, streamed one profile at a time (no profile is kept), then measures:
//! (a) bitmap evaluation of `cohort includes ∧ plan equals pro ∧ checkout_started count_at_least
//! 2 within 30 days` (median of several runs) against the 50 ms target; (b) `estimate_size`
//! against 10 ms; (c) index memory per user; (d) the naive evaluator on the same users
//! (regenerated in chunks; only the `matches` calls are timed; if it passes 10 s it stops and
//! extrapolates, and says so) and the speed-up against the ≥ 20× target. The bitmap result must
//! equal the naive one, or the run fails.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tideway_segment::{
    EventHistory, Filter, NoSegments, PurchaseRecord, SegmentIndex, SegmentProfile, matches,
};

/// 2024-06-15T12:00:00Z
const NOW: i64 = 1_718_452_800;
const DAY: i64 = 86_400;
const EVAL_LIMIT_MS: f64 = 50.0;
const ESTIMATE_LIMIT_MS: f64 = 10.0;
const SPEEDUP_TARGET: f64 = 20.0;
const NAIVE_BUDGET: Duration = Duration::from_secs(10);
const CHUNK: u32 = 100_000;

/// xorshift64* seeded per user with splitmix64, so any user can be regenerated alone.
struct Rng(u64);

impl Rng {
    fn for_user(uid: u32) -> Self {
        let mut z = u64::from(uid).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent_x100 / 10 000`.
    fn chance(&mut self, percent_x100: u64) -> bool {
        self.below(10_000) < percent_x100
    }
}

const COUNTRIES: [&str; 20] = [
    "US", "GB", "DE", "FR", "BR", "IN", "CA", "AU", "ES", "IT", "NL", "SE", "JP", "MX", "PL", "BE",
    "CH", "AT", "IE", "NZ",
];
const COHORTS: u64 = 20;

/// Cohort `i` holds about 1 % + 29 % · i / 19 of users (1 %–30 %).
fn cohort_share_x100(i: u64) -> u64 {
    100 + 2900 * i / (COHORTS - 1)
}

fn user(uid: u32) -> SegmentProfile {
    let mut r = Rng::for_user(uid);
    let mut p = SegmentProfile::new(uid, NOW - r.below(3 * 365 * DAY as u64) as i64);
    p.random_bucket = (r.next() % 10_000) as u16;
    if r.chance(8000) {
        p.external_id = Some(format!("u{uid}"));
    }
    let a = &mut p.attributes;
    let plan = match r.below(10) {
        0..=5 => "free",
        6..=8 => "pro",
        _ => "enterprise",
    };
    a.insert("plan".into(), json!(plan));
    let country = COUNTRIES[r.below(20).min(r.below(20)) as usize];
    a.insert("country".into(), json!(country));
    if r.chance(9200) {
        let dob = format!(
            "{}-{:02}-{:02}",
            1950 + r.below(59),
            1 + r.below(12),
            1 + r.below(28)
        );
        a.insert("dob".into(), Value::String(dob));
    }
    if r.chance(7000) {
        a.insert("ltv".into(), json!(r.below(500_000) as f64 / 100.0));
    }
    a.insert("newsletter".into(), json!(r.chance(5000)));
    for i in 0..COHORTS {
        if r.chance(cohort_share_x100(i)) {
            p.cohorts.insert(("heap".into(), format!("cohort-{i}")));
        }
    }
    for (name, share, max) in [
        ("session_start", 8500, 12),
        ("checkout_started", 3500, 6),
        ("push_clicked", 2000, 4),
    ] {
        if r.chance(share) {
            let n = 1 + r.below(max) as usize;
            let times = (0..n)
                .map(|_| NOW - r.below(90 * DAY as u64) as i64)
                .collect();
            p.events
                .insert(name.into(), EventHistory::from_times(times));
        }
    }
    if r.chance(1000) {
        for _ in 0..1 + r.below(3) {
            p.purchases.push(PurchaseRecord {
                product_id: format!("sku-{}", r.below(5)),
                time: NOW - r.below(90 * DAY as u64) as i64,
                price: r.below(20_000) as f64 / 100.0,
            });
        }
    }
    p
}

fn median_ms(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
    )
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let users: u32 = std::env::var("TIDEWAY_BENCH_USERS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(10_000_000);
    println!("tideway-segment bench: {users} users, now = 2024-06-15T12:00:00Z");
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at start: {}", load().trim());

    let started = Instant::now();
    let mut index = SegmentIndex::new();
    let mut upserting = Duration::ZERO;
    for uid in 0..users {
        let p = user(uid);
        let t = Instant::now();
        index.upsert(&p);
        upserting += t.elapsed();
    }
    let build = started.elapsed();
    let started = Instant::now();
    index.optimize();
    let optimize = started.elapsed();
    println!(
        "build: {:.1} s by incremental upserts, of which upsert calls {:.1} s ({:.2} µs/user; the rest is generating the profiles), then optimize {:.1} s",
        build.as_secs_f64(),
        upserting.as_secs_f64(),
        upserting.as_secs_f64() * 1e6 / f64::from(users.max(1)),
        optimize.as_secs_f64()
    );
    let bytes = index.memory_bytes() as f64;
    println!(
        "memory: index {:.0} MiB = {:.1} bytes/user; process peak RSS {} MiB",
        bytes / 1048576.0,
        bytes / f64::from(users.max(1)),
        peak_rss_kib().map_or("?".to_owned(), |k| (k / 1024).to_string())
    );

    let query = json!({"and": [
        {"cohort": {"partner": "heap", "cohort_id": "cohort-9", "op": "includes"}},
        {"attribute": {"name": "plan", "op": "equals", "value": "pro"}},
        {"event": {"name": "checkout_started", "op": "count_at_least", "value": 2, "within_days": 30}}
    ]});
    let extras = [
        json!({"and": [
            {"attribute": {"name": "ltv", "op": "greater_than", "value": 1000}},
            {"attribute": {"name": "age", "op": "greater_or_equal", "value": 30}},
            {"attribute": {"name": "country", "op": "equals", "value": "FR"}}
        ]}),
        json!({"and": [
            {"cohort": {"partner": "heap", "cohort_id": "cohort-19", "op": "includes"}},
            {"not": {"cohort": {"partner": "heap", "cohort_id": "cohort-5", "op": "includes"}}},
            {"or": [
                {"purchase": {"op": "total_spend_at_least", "value": 100}},
                {"event": {"name": "session_start", "op": "last_performed_within_days", "value": 3}}
            ]}
        ]}),
    ];
    let filter = Filter::from_json(&query).expect("query parses");
    let extras: Vec<Filter> = extras
        .iter()
        .map(|v| Filter::from_json(v).expect("parses"))
        .collect();

    let result = index.evaluate(&filter, NOW, &NoSegments);
    let eval_runs: usize = std::env::var("TIDEWAY_BENCH_EVAL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(31);
    let runs = (0..eval_runs.max(1))
        .map(|_| {
            let t = Instant::now();
            let n = index.evaluate(&filter, NOW, &NoSegments).len();
            let d = t.elapsed();
            assert_eq!(n, result.len());
            d
        })
        .collect();
    let (eval_ms, eval_min, eval_max) = median_ms(runs);
    println!(
        "query: cohort-9 includes ∧ plan equals pro ∧ checkout_started count_at_least 2 within 30 days → {} users",
        result.len()
    );
    println!(
        "eval: {eval_ms:.2} ms median of {eval_runs} (min {eval_min:.2}, max {eval_max:.2}) (limit {EVAL_LIMIT_MS} ms, ratio {:.3})",
        eval_ms / EVAL_LIMIT_MS
    );

    // where the time goes: the same query with its children added one at a time
    let steps = [
        ("cohort", json!({"and": [query["and"][0]]})),
        (
            "cohort ∧ plan",
            json!({"and": [query["and"][0], query["and"][1]]}),
        ),
        ("cohort ∧ plan ∧ event (full query)", query.clone()),
    ];
    let breakdown: Vec<String> = steps
        .iter()
        .map(|(name, q)| {
            let f = Filter::from_json(q).expect("parses");
            let runs = (0..15)
                .map(|_| {
                    let t = Instant::now();
                    index.evaluate(&f, NOW, &NoSegments);
                    t.elapsed()
                })
                .collect();
            let (median, min, _) = median_ms(runs);
            format!("{name} {median:.2} ms (min {min:.2})")
        })
        .collect();
    println!("eval breakdown (median of 15): {}", breakdown.join("; "));

    let mut estimate = (0, false);
    let runs = (0..31)
        .map(|_| {
            let t = Instant::now();
            estimate = index.estimate_size(&filter, NOW, &NoSegments);
            t.elapsed()
        })
        .collect();
    let (est_ms, est_min, est_max) = median_ms(runs);
    let exact = result.len() as f64;
    println!(
        "estimate_size: {est_ms:.3} ms median of 31 (min {est_min:.3}, max {est_max:.3}) → {} ({}, error {:+.2} % vs exact) (limit {ESTIMATE_LIMIT_MS} ms, ratio {:.4})",
        estimate.0,
        if estimate.1 { "sampled" } else { "exact" },
        if exact > 0.0 {
            (estimate.0 as f64 - exact) * 100.0 / exact
        } else {
            0.0
        },
        est_ms / ESTIMATE_LIMIT_MS
    );

    println!("load average after the timed runs: {}", load().trim());
    let extra_results: Vec<_> = extras
        .iter()
        .map(|f| {
            let t = Instant::now();
            let r = index.evaluate(f, NOW, &NoSegments);
            (r, t.elapsed())
        })
        .collect();

    // naive evaluator over the same users, regenerated chunk by chunk; only `matches` is timed
    let mut naive_time = Duration::ZERO;
    let mut naive_count = 0u64;
    let mut extra_counts = vec![0u64; extras.len()];
    let mut covered = 0u32;
    while covered < users && naive_time < NAIVE_BUDGET {
        let end = covered.saturating_add(CHUNK).min(users);
        let chunk: Vec<SegmentProfile> = (covered..end).map(user).collect();
        let t = Instant::now();
        for p in &chunk {
            if matches(&filter, p, NOW, &NoSegments) {
                naive_count += 1;
            }
        }
        naive_time += t.elapsed();
        for p in &chunk {
            for (f, n) in extras.iter().zip(&mut extra_counts) {
                if matches(f, p, NOW, &NoSegments) {
                    *n += 1;
                }
            }
        }
        covered = end;
    }
    let in_covered = |b: &roaring::RoaringBitmap| b.range(0..covered).count() as u64;
    assert_eq!(
        in_covered(&result),
        naive_count,
        "bitmap and naive evaluators disagree"
    );
    for ((r, _), n) in extra_results.iter().zip(&extra_counts) {
        assert_eq!(
            in_covered(r),
            *n,
            "bitmap and naive evaluators disagree on an extra query"
        );
    }
    let naive_ms = naive_time.as_secs_f64() * 1e3;
    let (naive_total_ms, how) = if covered == users {
        (naive_ms, format!("over all {users} users"))
    } else {
        let total = naive_ms * f64::from(users) / f64::from(covered);
        (
            total,
            format!(
                "EXTRAPOLATED from {naive_ms:.0} ms over the first {covered} users (passed 10 s)"
            ),
        )
    };
    let speedup = naive_total_ms / eval_ms;
    println!(
        "naive: {naive_total_ms:.0} ms {how}; agrees with the bitmap result ({naive_count} users in the users checked)"
    );
    println!(
        "speed-up: {speedup:.1}× (target ≥ {SPEEDUP_TARGET}×, ratio {:.2})",
        speedup / SPEEDUP_TARGET
    );
    for (i, ((r, d), n)) in extra_results.iter().zip(&extra_counts).enumerate() {
        println!(
            "extra {}: {:.2} ms → {} users (naive agrees: {n} in the users checked): {}",
            i + 1,
            d.as_secs_f64() * 1e3,
            r.len(),
            extras[i].to_json()
        );
    }
}
