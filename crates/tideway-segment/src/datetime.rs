//! Time in the filter language: ISO-8601 text to unix seconds, day windows and age in years.
//!
//! Both evaluators call these functions, so a time value means the same thing to the naive
//! evaluator (the spec) and to the bitmap index. Everything is UTC and whole seconds; `now` is
//! always a parameter, never read from a clock.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, OffsetDateTime, PrimitiveDateTime, Time};

/// Seconds in a day; day windows are `days × 86 400` seconds (no calendar, no DST).
pub(crate) const DAY_SECS: i64 = 86_400;

/// Parses ISO-8601 text to unix seconds (sub-seconds are dropped, rounding towards the past).
///
/// Accepted: RFC 3339 (`2024-05-01T10:00:00Z`, `…+02:00`, with fractions), and without a zone
/// (then UTC, as Braze does) `2024-05-01T10:00:00[.fff]`, `2024-05-01 10:00:00` and
/// `2024-05-01` (midnight UTC).
pub(crate) fn parse_time(text: &str) -> Option<i64> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Some(t.unix_timestamp());
    }
    let naive = [
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond]"),
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"),
    ];
    for format in naive {
        if let Ok(t) = PrimitiveDateTime::parse(text, format) {
            return Some(t.assume_utc().unix_timestamp());
        }
    }
    Date::parse(text, format_description!("[year]-[month]-[day]"))
        .ok()
        .map(|d| d.midnight().assume_utc().unix_timestamp())
}

/// The first second whose UTC date [`age_years`] can compute.
pub(crate) fn min_instant() -> i64 {
    PrimitiveDateTime::new(Date::MIN, Time::MIDNIGHT)
        .assume_utc()
        .unix_timestamp()
}

/// The last second whose UTC date [`age_years`] can compute.
pub(crate) fn max_instant() -> i64 {
    PrimitiveDateTime::new(Date::MAX, Time::MIDNIGHT)
        .assume_utc()
        .unix_timestamp()
        + DAY_SECS
        - 1
}

/// Age in whole years at `now` of someone born at `dob` (both unix seconds, compared as UTC
/// dates): the birthday counts from its day on; a 29 February birthday counts from 1 March in
/// other years. Non-increasing in `dob`, which the index relies on. `None` outside the
/// representable dates (year ±9999).
pub(crate) fn age_years(dob: i64, now: i64) -> Option<i64> {
    let born = OffsetDateTime::from_unix_timestamp(dob).ok()?.date();
    let today = OffsetDateTime::from_unix_timestamp(now).ok()?.date();
    let mut age = i64::from(today.year()) - i64::from(born.year());
    if (u8::from(today.month()), today.day()) < (u8::from(born.month()), born.day()) {
        age -= 1;
    }
    Some(age)
}

/// `now − days`, saturating.
pub(crate) fn days_before(now: i64, days: u32) -> i64 {
    now.saturating_sub(i64::from(days) * DAY_SECS)
}

/// `now + days`, saturating.
pub(crate) fn days_after(now: i64, days: u32) -> i64 {
    now.saturating_add(i64::from(days) * DAY_SECS)
}

/// How many of the sorted `times` lie in `[lo, hi]`.
pub(crate) fn count_between(times: &[i64], lo: i64, hi: i64) -> usize {
    if times.len() <= 16 {
        // branch-free for short lists: the index scans many users' lists back to back
        return times.iter().filter(|&&t| t >= lo && t <= hi).count();
    }
    let start = times.partition_point(|&t| t < lo);
    let end = times.partition_point(|&t| t <= hi);
    end.saturating_sub(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_forms() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_time("1970-01-01T00:00:01.900Z"), Some(1));
        assert_eq!(parse_time("1970-01-02T00:00:00"), Some(86_400));
        assert_eq!(parse_time("1970-01-02T00:00:00.5"), Some(86_400));
        assert_eq!(parse_time("1970-01-02 00:00:00"), Some(86_400));
        assert_eq!(parse_time("1970-01-02"), Some(86_400));
        assert_eq!(parse_time("1969-12-31"), Some(-86_400));
        assert_eq!(parse_time("2024-13-01"), None);
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time(""), None);
    }

    #[test]
    fn age_counts_birthdays() {
        let at = |s: &str| parse_time(s).unwrap();
        assert_eq!(
            age_years(at("1990-05-03"), at("2020-05-02T23:59:59Z")),
            Some(29)
        );
        assert_eq!(age_years(at("1990-05-03"), at("2020-05-03")), Some(30));
        assert_eq!(age_years(at("2000-02-29"), at("2021-02-28")), Some(20));
        assert_eq!(age_years(at("2000-02-29"), at("2021-03-01")), Some(21));
        assert_eq!(age_years(at("2030-01-01"), at("2020-01-01")), Some(-10));
        assert!(age_years(min_instant(), 0).is_some());
        assert!(age_years(max_instant(), 0).is_some());
        assert!(age_years(min_instant() - 1, 0).is_none());
        assert!(age_years(max_instant() + 1, 0).is_none());
    }

    #[test]
    fn windows_count_inclusive_bounds() {
        let times = [1, 5, 5, 9, 12];
        assert_eq!(count_between(&times, 5, 9), 3);
        assert_eq!(count_between(&times, 6, 8), 0);
        assert_eq!(count_between(&times, 10, 2), 0);
        let long: Vec<i64> = (0..40).map(|i| i / 2).collect();
        assert_eq!(count_between(&long, 5, 9), 10);
        assert_eq!(count_between(&long, 30, 2), 0);
        assert_eq!(days_before(i64::MIN + 5, 1), i64::MIN);
        assert_eq!(days_after(i64::MAX - 5, 1), i64::MAX);
    }
}
