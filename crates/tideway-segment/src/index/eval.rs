//! Evaluation of a [`Filter`] over the index: each node gets a candidate set and returns the
//! candidates that match, so the result of `f` over candidates `C` is
//! `{u ∈ C : matches(f, u)}`.
//!
//! `and` orders its children by [`Eval::rank`] (plain bitmap lookups first, smallest first;
//! bit-sliced comparisons next; per-user scans last; nested segments at the end) and narrows the
//! candidates child by child, so a scan such as an event count only visits users who passed
//! every cheaper test. `or` hands each child only the candidates not yet matched.

use std::cmp::Reverse;
use std::collections::HashMap;

use roaring::RoaringBitmap;
use serde_json::Value;

use super::SegmentIndex;
use super::attr::AttrIndex;
use super::bsi::{Cmp, f64_key, i64_key};
use crate::datetime::{age_years, days_after, days_before, max_instant, min_instant};
use crate::filter::{AttributeOp, CohortOp, EventOp, Filter, NumberOp, PurchaseOp, SegmentLookup};
use crate::predicate::{
    array_includes, count_op, event_matches, event_matches_by_summary, num, number_op,
    purchase_matches, time_op, value_test,
};

/// Cost tiers for ordering `and` children, cheapest first.
const BITMAP: u8 = 0;
const SLICED: u8 = 1;
const SCAN: u8 = 2;
const NESTED: u8 = 3;

pub(crate) struct Eval<'a> {
    ix: &'a SegmentIndex,
    now: i64,
    lookup: &'a dyn SegmentLookup,
    /// Segment ids being evaluated (a repeated one is a cycle and matches nobody).
    stack: Vec<String>,
    /// Nested segments already evaluated in this evaluation: the users each was evaluated
    /// over, and those of them that matched. A segment named again is evaluated only over
    /// candidates it has not seen, so each user is tested at most once per segment: without
    /// this, `and` of ten `in_segment`s of a segment that does the same, eight deep, is 10⁸
    /// evaluations (minutes holding the index's read lock) rather than nine.
    memo: HashMap<String, (RoaringBitmap, RoaringBitmap)>,
    /// Cycles cut so far. A nested result that cut one depends on what was on the stack, so
    /// it is not memoised (validation refuses cycles; this keeps a stored one exact).
    cycles_cut: u64,
}

fn with(set: &RoaringBitmap, member: bool, candidates: &RoaringBitmap) -> RoaringBitmap {
    if member {
        candidates & set
    } else {
        candidates - set
    }
}

fn cmp_of(op: NumberOp) -> Cmp {
    match op {
        NumberOp::Equals | NumberOp::NotEquals => Cmp::Eq,
        NumberOp::GreaterThan => Cmp::Gt,
        NumberOp::GreaterOrEqual => Cmp::Ge,
        NumberOp::LessThan => Cmp::Lt,
        NumberOp::LessOrEqual => Cmp::Le,
    }
}

/// The largest `k` in `[lo, hi]` with `p` true on `[lo, k]`, for `p` true on a prefix.
fn last_true(lo: i64, hi: i64, p: impl Fn(i64) -> bool) -> Option<i64> {
    if !p(lo) {
        return None;
    }
    let (mut a, mut b) = (lo, hi);
    while a < b {
        let mid = a + (b - a + 1) / 2;
        if p(mid) {
            a = mid;
        } else {
            b = mid - 1;
        }
    }
    Some(a)
}

/// The smallest `k` in `[lo, hi]` with `p` true on `[k, hi]`, for `p` true on a suffix.
fn first_true(lo: i64, hi: i64, p: impl Fn(i64) -> bool) -> Option<i64> {
    if !p(hi) {
        return None;
    }
    let (mut a, mut b) = (lo, hi);
    while a < b {
        let mid = a + (b - a) / 2;
        if p(mid) {
            b = mid;
        } else {
            a = mid + 1;
        }
    }
    Some(a)
}

/// The `users` for which `test` holds on their data, fetched by `fetch`. Users are taken in
/// batches: first every fetch of a batch (independent loads, which the CPU overlaps), then every
/// test; per-user data of a large index is a cache miss per user, so this is markedly faster
/// than fetching and testing one user at a time.
fn scan<D: Copy>(
    users: &RoaringBitmap,
    fetch: impl Fn(u32) -> D,
    test: impl Fn(D) -> bool,
) -> RoaringBitmap {
    const BATCH: usize = 128;
    let mut out = RoaringBitmap::new();
    let mut uids = [0u32; BATCH];
    let mut data = Vec::with_capacity(BATCH);
    let mut iter = users.iter();
    loop {
        let batch = iter.next_many(&mut uids);
        if batch.is_empty() {
            return out;
        }
        data.clear();
        data.extend(batch.iter().map(|&u| fetch(u)));
        for (&u, &d) in batch.iter().zip(&data) {
            if test(d) {
                out.insert(u);
            }
        }
    }
}

/// Candidates whose time value compares `cmp` to `t`.
fn times(a: Option<&AttrIndex>, cmp: Cmp, t: i64, candidates: &RoaringBitmap) -> RoaringBitmap {
    a.map_or_else(RoaringBitmap::new, |a| {
        a.times.select(cmp, i64_key(t), candidates)
    })
}

impl<'a> Eval<'a> {
    pub(crate) fn new(ix: &'a SegmentIndex, now: i64, lookup: &'a dyn SegmentLookup) -> Self {
        Self {
            ix,
            now,
            lookup,
            stack: Vec::new(),
            memo: HashMap::new(),
            cycles_cut: 0,
        }
    }

    /// The candidates that match `f`.
    pub(crate) fn eval(&mut self, f: &Filter, candidates: &RoaringBitmap) -> RoaringBitmap {
        if candidates.is_empty() {
            return RoaringBitmap::new();
        }
        let ix = self.ix;
        match f {
            Filter::And(fs) => {
                let mut order: Vec<&Filter> = fs.iter().collect();
                order.sort_by_cached_key(|c| self.rank(c));
                let mut survivors: Option<RoaringBitmap> = None;
                for c in order {
                    let next = self.eval(c, survivors.as_ref().unwrap_or(candidates));
                    let done = next.is_empty();
                    survivors = Some(next);
                    if done {
                        break;
                    }
                }
                survivors.unwrap_or_else(|| candidates.clone())
            }
            Filter::Or(fs) => {
                let mut order: Vec<&Filter> = fs.iter().collect();
                order.sort_by_cached_key(|c| {
                    let (tier, size) = self.rank(c);
                    (tier, Reverse(size))
                });
                let mut matched = RoaringBitmap::new();
                for c in order {
                    let part = if matched.is_empty() {
                        self.eval(c, candidates)
                    } else {
                        let rest = candidates - &matched;
                        if rest.is_empty() {
                            break;
                        }
                        self.eval(c, &rest)
                    };
                    matched |= part;
                }
                matched
            }
            Filter::Not(c) => candidates - self.eval(c, candidates),
            Filter::Cohort(c) => match (ix.cohort(&c.partner, &c.cohort_id), c.op) {
                // every index bitmap holds live users only
                (Some(m), CohortOp::Includes) if std::ptr::eq(candidates, &ix.live) => m.clone(),
                (Some(m), CohortOp::Includes) => candidates & m,
                (Some(m), CohortOp::Excludes) => candidates - m,
                (None, CohortOp::Includes) => RoaringBitmap::new(),
                (None, CohortOp::Excludes) => candidates.clone(),
            },
            Filter::Attribute { name, op } => self.attribute(name, op, candidates),
            Filter::Age { op, value } => self.age(*op, num(value), candidates),
            Filter::EmailAvailable(b) => with(&ix.email_available, *b, candidates),
            Filter::PhoneAvailable(b) => with(&ix.phone_available, *b, candidates),
            Filter::Event { name, op } => self.event(name, op, candidates),
            Filter::Purchase(op) => self.purchase(op, candidates),
            Filter::InSegment(id) => {
                if self.stack.iter().any(|s| s == id) {
                    self.cycles_cut += 1;
                    return RoaringBitmap::new();
                }
                // Filters match user by user, so the result over `candidates` is what matched
                // among those seen before, plus the evaluation over the unseen rest.
                let unseen = match self.memo.get(id) {
                    Some((seen, matched)) => {
                        let unseen = candidates - seen;
                        if unseen.is_empty() {
                            return candidates & matched;
                        }
                        unseen
                    }
                    None => candidates.clone(),
                };
                let Some(g) = self.lookup.filter(id) else {
                    return RoaringBitmap::new();
                };
                let cut_before = self.cycles_cut;
                self.stack.push(id.clone());
                let fresh = self.eval(&g, &unseen);
                self.stack.pop();
                if self.cycles_cut != cut_before {
                    // Context-dependent: answer for all the candidates in this context.
                    if unseen.len() == candidates.len() {
                        return fresh;
                    }
                    self.stack.push(id.clone());
                    let all = self.eval(&g, candidates);
                    self.stack.pop();
                    return all;
                }
                let (seen, matched) = self.memo.entry(id.clone()).or_default();
                *seen |= &unseen;
                *matched |= &fresh;
                candidates & &*matched
            }
            Filter::RandomBucket { min, max } => {
                let mut out = candidates.clone();
                out.retain(|u| {
                    ix.buckets
                        .get(u as usize)
                        .is_some_and(|b| (*min..=*max).contains(b))
                });
                out
            }
            Filter::Created { op, at } => {
                let mut out = candidates.clone();
                out.retain(|u| {
                    ix.created
                        .get(u as usize)
                        .is_some_and(|&c| time_op(*op, c, at.unix()))
                });
                out
            }
            Filter::Identified(b) => with(&ix.identified, *b, candidates),
        }
    }

    /// `(tier, estimated size)`: how `and` orders its children.
    fn rank(&self, f: &Filter) -> (u8, u64) {
        let ix = self.ix;
        let live = ix.live.len();
        let len = |b: Option<&RoaringBitmap>| b.map_or(0, RoaringBitmap::len);
        let member = |b: u64, wanted: bool| if wanted { b } else { live.saturating_sub(b) };
        match f {
            Filter::And(fs) => fs
                .iter()
                .map(|c| self.rank(c))
                .fold((BITMAP, live), |(t, s), (ct, cs)| (t.max(ct), s.min(cs))),
            Filter::Or(fs) => fs
                .iter()
                .map(|c| self.rank(c))
                .fold((BITMAP, 0), |(t, s), (ct, cs)| {
                    (t.max(ct), s.saturating_add(cs).min(live))
                }),
            Filter::Not(c) => match self.rank(c) {
                (BITMAP, s) => (BITMAP, live.saturating_sub(s)),
                (t, _) => (t, live),
            },
            Filter::Cohort(c) => {
                let n = len(ix.cohort(&c.partner, &c.cohort_id));
                (BITMAP, member(n, c.op == CohortOp::Includes))
            }
            Filter::Attribute { name, op } => {
                let a = ix.attributes.get(name);
                match op {
                    AttributeOp::StringEquals(s) => {
                        (BITMAP, len(a.and_then(|a| a.string_users(s))))
                    }
                    AttributeOp::StringNotEquals(s) => (
                        BITMAP,
                        member(len(a.and_then(|a| a.string_users(s))), false),
                    ),
                    AttributeOp::BoolEquals(b) => {
                        (BITMAP, len(a.and_then(|a| a.json_users(&Value::Bool(*b)))))
                    }
                    AttributeOp::Exists(b) => (BITMAP, member(len(a.map(|a| &a.present)), *b)),
                    AttributeOp::Number(..) => (SLICED, len(a.map(|a| a.numbers.exists()))),
                    _ => (SLICED, live),
                }
            }
            Filter::Age { .. } => (SLICED, live),
            Filter::EmailAvailable(b) => (BITMAP, member(ix.email_available.len(), *b)),
            Filter::PhoneAvailable(b) => (BITMAP, member(ix.phone_available.len(), *b)),
            Filter::Identified(b) => (BITMAP, member(ix.identified.len(), *b)),
            Filter::Event { name, op } => {
                let never = event_matches(op, &[], self.now);
                let doers = len(ix.events.get(name).map(|e| &e.ever));
                (SCAN, if never { live } else { doers })
            }
            Filter::Purchase(PurchaseOp::MadeAny(b)) => {
                (BITMAP, member(ix.purchases.any.len(), *b))
            }
            Filter::Purchase(PurchaseOp::Count { .. }) => (SCAN, live),
            Filter::Purchase(_) => (SLICED, live),
            Filter::RandomBucket { min, max } => {
                let width = u64::from(max.saturating_sub(*min)) + 1;
                (SCAN, live.saturating_mul(width) / 10_000)
            }
            Filter::Created { .. } => (SCAN, live),
            Filter::InSegment(_) => (NESTED, live),
        }
    }

    fn attribute(&self, name: &str, op: &AttributeOp, candidates: &RoaringBitmap) -> RoaringBitmap {
        let a = self.ix.attributes.get(name);
        let now = self.now;
        let none = RoaringBitmap::new;
        let all = || candidates.clone();
        match op {
            AttributeOp::StringEquals(s) => a
                .and_then(|a| a.string_users(s))
                .map_or_else(none, |u| candidates & u),
            AttributeOp::StringNotEquals(s) => a
                .and_then(|a| a.string_users(s))
                .map_or_else(all, |u| candidates - u),
            AttributeOp::IsBlank => a.map_or_else(all, |a| {
                let not_blank = (candidates & &a.present) - &a.blank;
                candidates - not_blank
            }),
            AttributeOp::Exists(true) => a.map_or_else(none, |a| candidates & &a.present),
            AttributeOp::Exists(false) => a.map_or_else(all, |a| candidates - &a.present),
            AttributeOp::Number(NumberOp::NotEquals, x) => a.map_or_else(all, |a| {
                candidates - a.numbers.select(Cmp::Eq, f64_key(num(x)), candidates)
            }),
            AttributeOp::Number(op, x) => a.map_or_else(none, |a| {
                a.numbers.select(cmp_of(*op), f64_key(num(x)), candidates)
            }),
            AttributeOp::BoolEquals(b) => a
                .and_then(|a| a.json_users(&Value::Bool(*b)))
                .map_or_else(none, |u| candidates & u),
            AttributeOp::Before(t) => times(a, Cmp::Lt, t.unix(), candidates),
            AttributeOp::After(t) => times(a, Cmp::Gt, t.unix(), candidates),
            AttributeOp::MoreThanDaysAgo(d) => times(a, Cmp::Lt, days_before(now, *d), candidates),
            AttributeOp::LessThanDaysAgo(d) => {
                let after = times(a, Cmp::Gt, days_before(now, *d), candidates);
                times(a, Cmp::Le, now, &after)
            }
            AttributeOp::WithinDaysFuture(d) => {
                let after = times(a, Cmp::Gt, now, candidates);
                times(a, Cmp::Le, days_after(now, *d), &after)
            }
            AttributeOp::NotIncludesValue(e) => a.map_or_else(all, |a| {
                candidates - a.select(candidates, |v| array_includes(v, e))
            }),
            AttributeOp::Matches(_)
            | AttributeOp::StartsWith(_)
            | AttributeOp::IncludesValue(_)
            | AttributeOp::SizeEquals(_)
            | AttributeOp::SizeGreaterThan(_)
            | AttributeOp::SizeLessThan(_) => a.map_or_else(none, |a| {
                a.select(candidates, |v| value_test(op, v).unwrap_or(false))
            }),
        }
    }

    /// `age op x`: age is non-increasing in the birth instant, so `>=`/`>` hold on a prefix of
    /// birth instants and `<=`/`<` on a suffix; find the boundary with the spec's own age
    /// function and answer with a range over the `dob` time index.
    fn age(&self, op: NumberOp, x: f64, candidates: &RoaringBitmap) -> RoaringBitmap {
        if op == NumberOp::NotEquals {
            return candidates - self.age(NumberOp::Equals, x, candidates);
        }
        let Some(dob) = self.ix.attributes.get("dob") else {
            return RoaringBitmap::new();
        };
        let now = self.now;
        let (lo, hi) = (min_instant(), max_instant());
        let holds = |op: NumberOp, t: i64| number_op(op, age_years(t, now).map(|a| a as f64), x);
        let range = match op {
            NumberOp::GreaterThan | NumberOp::GreaterOrEqual => {
                last_true(lo, hi, |t| holds(op, t)).map(|k| (lo, k))
            }
            NumberOp::LessThan | NumberOp::LessOrEqual => {
                first_true(lo, hi, |t| holds(op, t)).map(|k| (k, hi))
            }
            NumberOp::Equals | NumberOp::NotEquals => {
                let from = first_true(lo, hi, |t| holds(NumberOp::LessOrEqual, t));
                let to = last_true(lo, hi, |t| holds(NumberOp::GreaterOrEqual, t));
                from.zip(to).filter(|(a, b)| a <= b)
            }
        };
        let Some((from, to)) = range else {
            return RoaringBitmap::new();
        };
        let old_enough = dob.times.select(Cmp::Ge, i64_key(from), candidates);
        dob.times.select(Cmp::Le, i64_key(to), &old_enough)
    }

    fn event(&self, name: &str, op: &EventOp, candidates: &RoaringBitmap) -> RoaringBitmap {
        let now = self.now;
        let never_matches = event_matches(op, &[], now);
        let Some(e) = self.ix.events.get(name) else {
            return if never_matches {
                candidates.clone()
            } else {
                RoaringBitmap::new()
            };
        };
        let doers = candidates & &e.ever;
        let mut out = scan(
            &doers,
            |u| e.times.span(u),
            |s| {
                event_matches_by_summary(op, s.len as usize, s.last, now)
                    .unwrap_or_else(|| event_matches(op, e.times.slice(s), now))
            },
        );
        if never_matches {
            out |= candidates - &e.ever;
        }
        out
    }

    fn purchase(&self, op: &PurchaseOp, candidates: &RoaringBitmap) -> RoaringBitmap {
        let p = &self.ix.purchases;
        let now = self.now;
        let none_matches = purchase_matches(op, &[], now);
        let with_non_buyers = |mut out: RoaringBitmap, buyers: &RoaringBitmap| {
            if none_matches {
                out |= candidates - buyers;
            }
            out
        };
        match op {
            PurchaseOp::MadeAny(b) => with(&p.any, *b, candidates),
            PurchaseOp::TotalSpendAtLeast(x) => {
                with_non_buyers(p.spend.select(Cmp::Ge, f64_key(num(x)), candidates), &p.any)
            }
            PurchaseOp::TotalSpendAtMost(x) => {
                with_non_buyers(p.spend.select(Cmp::Le, f64_key(num(x)), candidates), &p.any)
            }
            PurchaseOp::Count {
                product_id,
                op,
                value,
                within_days,
            } => {
                let (buyers, product) = match product_id {
                    None => (Some(&p.any), None),
                    Some(id) => match p.product_numbers.get(id) {
                        Some(&n) => (p.buyers.get(n as usize), Some(n)),
                        None => (None, None),
                    },
                };
                let Some(buyers) = buyers else {
                    return with_non_buyers(RoaringBitmap::new(), &RoaringBitmap::new());
                };
                let (from, to) =
                    within_days.map_or((i64::MIN, i64::MAX), |d| (days_before(now, d), now));
                let out = scan(
                    &(candidates & buyers),
                    |u| p.records.span(u),
                    |span| {
                        if span.last < from {
                            // every purchase is before the window
                            return count_op(*op, 0, *value);
                        }
                        let records = p.records.slice(span);
                        let start = records.partition_point(|r| r.0 < from);
                        let end = records.partition_point(|r| r.0 <= to).max(start);
                        let n = records[start..end]
                            .iter()
                            .filter(|r| product.is_none_or(|n| r.1 == n))
                            .count();
                        count_op(*op, n, *value)
                    },
                );
                with_non_buyers(out, buyers)
            }
        }
    }
}
