//! Time values as Braze accepts and returns them.
//!
//! Core never reads the clock: callers pass `now`. This module parses the date formats Braze
//! documents for `/users/track` and formats timestamps the way Braze's export does
//! (`2018-04-17T17:28:56.807Z`).

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// A point in time with millisecond precision, as milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub i64);

impl Millis {
    pub fn from_secs(secs: i64) -> Self {
        Millis(secs * 1000)
    }

    pub fn secs(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// `2018-04-17T17:28:56.807Z`
    pub fn to_iso(self) -> String {
        let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            dt.millisecond()
        )
    }
}

/// Parses a Braze datetime string. Accepted (as Braze documents):
/// ISO 8601 with or without zone and fraction (`2024-01-02T03:04:05.678+02:00`, `…Z`),
/// `yyyy-MM-ddTHH:mm:ss:SSSZ`, `yyyy-MM-dd HH:mm:ss`, `yyyy-MM-dd`, `MM/dd/yyyy`,
/// `ddd MM dd HH:mm:ss.TZD YYYY`.
/// No zone means UTC; a date alone means midnight UTC. Years outside 0..=3000 are rejected
/// (Braze stores those as plain strings).
pub fn parse_datetime(raw: &str) -> Option<Millis> {
    parse_datetime_any_year(raw).filter(|at| (YEAR_0..YEAR_3001).contains(&at.0))
}

/// Braze's attribute dates: a date in a documented format is stored as a time when its year is
/// 0 to 3000, and as the string it was otherwise (braze-api.md §3.2): the value to store, or
/// `None` for text that is no date at all.
pub fn attribute_date(raw: &str) -> Option<serde_json::Value> {
    let at = parse_datetime_any_year(raw)?;
    Some(if (YEAR_0..YEAR_3001).contains(&at.0) {
        serde_json::Value::from(at.to_iso())
    } else {
        serde_json::Value::from(raw)
    })
}

/// 0000-01-01T00:00:00Z and 3001-01-01T00:00:00Z in milliseconds: Braze's range of dates.
const YEAR_0: i64 = -62_167_219_200_000;
const YEAR_3001: i64 = 32_535_216_000_000;

/// A standard profile timestamp (`date_of_first_session`, `date_of_last_session`,
/// `marked_email_as_spam_at`) as [`attribute_date`] stored it, moved back to `now` when it lies
/// in the future (braze-api.md §3.2: "future timestamps default to now"); `None` when it needs
/// no change. A session cannot have happened, nor a mail been marked as spam, after now. Custom
/// times keep future values: the connected-audience filters compare them "in the future".
pub fn no_later_than(stored: &serde_json::Value, now: Millis) -> Option<serde_json::Value> {
    let at = parse_datetime_any_year(stored.as_str()?)?;
    (at > now).then(|| serde_json::Value::from(now.to_iso()))
}

/// [`parse_datetime`] without the year range: for bounds a client may set far off
/// (`end_time=9999-12-31T23:59:59Z` meaning "everything"), and the dates Braze keeps as text.
pub fn parse_datetime_any_year(raw: &str) -> Option<Millis> {
    let raw = raw.trim();
    if let Some(ms) = parse_us_date(raw).or_else(|| parse_day_name_date(raw)) {
        return Some(ms);
    }
    let (date, rest) = parse_date_prefix(raw)?;
    if rest.is_empty() {
        return to_millis(date, Time::MIDNIGHT, 0, UtcOffset::UTC);
    }
    let rest = rest.strip_prefix('T').or_else(|| rest.strip_prefix(' '))?;
    let (time, millis, rest) = parse_time(rest)?;
    let offset = parse_offset(rest)?;
    to_millis(date, time, millis, offset)
}

fn to_millis(date: Date, time: Time, millis: u16, offset: UtcOffset) -> Option<Millis> {
    let dt = PrimitiveDateTime::new(date, time).assume_offset(offset);
    Some(Millis(dt.unix_timestamp() * 1000 + i64::from(millis)))
}

fn digits(s: &str, n: usize) -> Option<(u32, &str)> {
    if s.len() < n || !s.as_bytes()[..n].iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((s[..n].parse().ok()?, &s[n..]))
}

fn parse_date_prefix(s: &str) -> Option<(Date, &str)> {
    let (y, s) = digits(s, 4)?;
    let s = s.strip_prefix('-')?;
    let (m, s) = digits(s, 2)?;
    let s = s.strip_prefix('-')?;
    let (d, s) = digits(s, 2)?;
    let month = Month::try_from(u8::try_from(m).ok()?).ok()?;
    let date =
        Date::from_calendar_date(i32::try_from(y).ok()?, month, u8::try_from(d).ok()?).ok()?;
    Some((date, s))
}

fn parse_us_date(s: &str) -> Option<Millis> {
    let (m, s) = digits(s, 2)?;
    let s = s.strip_prefix('/')?;
    let (d, s) = digits(s, 2)?;
    let s = s.strip_prefix('/')?;
    let (y, s) = digits(s, 4)?;
    if !s.is_empty() {
        return None;
    }
    let month = Month::try_from(u8::try_from(m).ok()?).ok()?;
    let date =
        Date::from_calendar_date(i32::try_from(y).ok()?, month, u8::try_from(d).ok()?).ok()?;
    to_millis(date, Time::MIDNIGHT, 0, UtcOffset::UTC)
}

/// Braze's `ddd MM dd HH:mm:ss.TZD YYYY`: a day's name, the month (its number or its English
/// abbreviation), the day, the time with an optional fraction, the zone, the year, separated by
/// spaces: `Thu 01 02 03:04:05.+02:00 2024`, `Tue Jan 02 03:04:05.678Z 2024`, and the C library's
/// `Tue Jan 02 03:04:05 +0000 2024`. The zone may follow the seconds' `.` directly or stand
/// apart; `Z`, `UTC`, `GMT`, `±hh:mm` and `±hhmm` are zones. The day's name is not checked
/// against the date, as no client can be relied on to compute it.
fn parse_day_name_date(s: &str) -> Option<Millis> {
    let mut parts = s.split_ascii_whitespace();
    let day_name = parts.next()?;
    if !(day_name.len() == 3 && day_name.bytes().all(|b| b.is_ascii_alphabetic())) {
        return None;
    }
    let month = parts.next()?;
    let month = match digits(month, 2) {
        Some((m, "")) => Month::try_from(u8::try_from(m).ok()?).ok()?,
        _ => month_by_name(month)?,
    };
    let (day, "") = digits(parts.next()?, 2)? else {
        return None;
    };
    // The zone starts at the first byte after `HH:mm:ss` that is no digit, `.` or `:`.
    let time_and_zone = parts.next().filter(|t| t.is_ascii())?;
    let zone_at = time_and_zone
        .bytes()
        .enumerate()
        .skip(8)
        .find(|(_, b)| !(b.is_ascii_digit() || *b == b'.' || *b == b':'))
        .map_or(time_and_zone.len(), |(at, _)| at);
    let (clock, mut zone) = time_and_zone.split_at(zone_at);
    let clock = clock.strip_suffix('.').unwrap_or(clock);
    let (time, millis, "") = parse_time(clock)? else {
        return None;
    };
    if zone.is_empty() {
        zone = parts.next()?;
    }
    let offset = match zone {
        "UTC" | "GMT" => UtcOffset::UTC,
        _ => parse_offset(zone).filter(|_| !zone.is_empty())?,
    };
    let (year, "") = digits(parts.next()?, 4)? else {
        return None;
    };
    if parts.next().is_some() {
        return None;
    }
    let date =
        Date::from_calendar_date(i32::try_from(year).ok()?, month, u8::try_from(day).ok()?).ok()?;
    to_millis(date, time, millis, offset)
}

fn month_by_name(name: &str) -> Option<Month> {
    const NAMES: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let at = NAMES.iter().position(|n| n.eq_ignore_ascii_case(name))?;
    Month::try_from(u8::try_from(at + 1).ok()?).ok()
}

/// `HH:mm:ss` with an optional fraction introduced by `.` or (Braze's variant) `:`.
fn parse_time(s: &str) -> Option<(Time, u16, &str)> {
    let (h, s) = digits(s, 2)?;
    let s = s.strip_prefix(':')?;
    let (mi, s) = digits(s, 2)?;
    let (sec, s) = match s.strip_prefix(':') {
        Some(after) => digits(after, 2)?,
        None => (0, s),
    };
    let (millis, s) = match s.strip_prefix('.').or_else(|| s.strip_prefix(':')) {
        Some(frac) => {
            let len = frac.bytes().take_while(u8::is_ascii_digit).count();
            if len == 0 {
                return None;
            }
            let first3: String = frac[..len].chars().chain("000".chars()).take(3).collect();
            (first3.parse::<u16>().ok()?, &frac[len..])
        }
        None => (0, s),
    };
    let time = Time::from_hms(
        u8::try_from(h).ok()?,
        u8::try_from(mi).ok()?,
        u8::try_from(sec).ok()?,
    )
    .ok()?;
    Some((time, millis, s))
}

fn parse_offset(s: &str) -> Option<UtcOffset> {
    match s {
        "" | "Z" | "z" => return Some(UtcOffset::UTC),
        _ => {}
    }
    let sign: i8 = match s.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let s = &s[1..];
    let (h, s) = digits(s, 2)?;
    let s = s.strip_prefix(':').unwrap_or(s);
    let (m, s) = if s.is_empty() { (0, s) } else { digits(s, 2)? };
    // Real zones lie within ±14:00; ±18:00 is the widest any datetime library (java.time)
    // produces. `time` alone would take up to ±25:59, which no client means.
    if !s.is_empty() || m > 59 || h * 60 + m > 18 * 60 {
        return None;
    }
    UtcOffset::from_hms(
        sign * i8::try_from(h).ok()?,
        sign * i8::try_from(m).ok()?,
        0,
    )
    .ok()
}

/// Parses a `dob` value: exactly `YYYY-MM-DD`.
pub fn parse_dob(raw: &str) -> Option<Date> {
    match parse_date_prefix(raw) {
        Some((date, "")) => Some(date),
        _ => None,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn attribute_dates_past_year_3000_are_kept_as_strings() {
        use serde_json::json;
        assert_eq!(
            attribute_date("2024-01-02"),
            Some(json!("2024-01-02T00:00:00.000Z"))
        );
        assert_eq!(
            attribute_date("3000-12-31T23:59:59Z"),
            Some(json!("3000-12-31T23:59:59.000Z"))
        );
        for later in ["3001-01-01", "9999-12-31T00:00:00Z", "12/31/3001"] {
            assert_eq!(attribute_date(later), Some(json!(later)), "{later}");
            assert_eq!(parse_datetime(later), None, "{later}");
        }
        assert_eq!(
            attribute_date("0000-01-01"),
            Some(json!("0000-01-01T00:00:00.000Z"))
        );
        assert_eq!(attribute_date("soon"), None);
    }
    use super::*;

    #[test]
    fn parses_documented_formats() {
        let base = 1_704_164_645_000; // 2024-01-02T03:04:05Z
        assert_eq!(parse_datetime("2024-01-02T03:04:05Z"), Some(Millis(base)));
        assert_eq!(parse_datetime("2024-01-02T03:04:05"), Some(Millis(base)));
        assert_eq!(parse_datetime("2024-01-02 03:04:05"), Some(Millis(base)));
        assert_eq!(
            parse_datetime("2024-01-02T03:04:05.678Z"),
            Some(Millis(base + 678))
        );
        assert_eq!(
            parse_datetime("2024-01-02T03:04:05:678Z"),
            Some(Millis(base + 678))
        );
        assert_eq!(
            parse_datetime("2024-01-02T05:04:05+02:00"),
            Some(Millis(base))
        );
        assert_eq!(
            parse_datetime("2024-01-02T05:04:05+0200"),
            Some(Millis(base))
        );
        assert_eq!(
            parse_datetime("2024-01-01T09:04:05-18:00"),
            Some(Millis(base))
        );
        assert_eq!(
            parse_datetime("2024-01-02"),
            Some(Millis(1_704_153_600_000))
        );
        assert_eq!(
            parse_datetime("01/02/2024"),
            Some(Millis(1_704_153_600_000))
        );
        // `ddd MM dd HH:mm:ss.TZD YYYY`, with the month as a number or a name.
        for day_name in [
            "Tue 01 02 03:04:05.Z 2024",
            "Tue 01 02 05:04:05.+02:00 2024",
            "Tue 01 02 05:04:05.+0200 2024",
            "Tue Jan 02 03:04:05 +0000 2024",
            "Tue JAN 02 03:04:05 UTC 2024",
            "Mon 01 01 22:04:05.-05:00 2024",
        ] {
            assert_eq!(parse_datetime(day_name), Some(Millis(base)), "{day_name}");
        }
        assert_eq!(
            parse_datetime("Tue 01 02 03:04:05.678Z 2024"),
            Some(Millis(base + 678))
        );
    }

    #[test]
    fn day_name_dates_refuse_what_is_not_one() {
        for bad in [
            "Tue 13 02 03:04:05.Z 2024",
            "Tue Foo 02 03:04:05.Z 2024",
            "Tue 01 32 03:04:05.Z 2024",
            "Tue 01 02 03:04:05 2024",
            "Tue 01 02 03:04:05.Z 2024 extra",
            "Tue 01 02 03:04:05.Z 24",
            "Tuesday 01 02 03:04:05.Z 2024",
            "Tue 01 02 03:04:05.+25:00 2024",
            "Tue 01 02 0é:04:05Z 2024",
            "Tue 01 02 03:04:0é 2024",
            "Tue 01 02 03:04 2024",
        ] {
            assert_eq!(parse_datetime(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        /// Any text parses or not without a panic, and a time written in the day-name form
        /// reads back as itself (the oracle is `time`'s own calendar).
        #[test]
        fn day_name_dates_read_back(
            secs in 0i64..32_503_680_000,
            millis in 0i64..1000,
            zone_minutes in -18i64 * 60..=18 * 60,
            numeric_month in proptest::bool::ANY,
            junk in ".{0,40}",
        ) {
            let _ = parse_datetime(&junk);
            let _ = parse_datetime(&format!("Tue 01 02 {junk}"));
            let at = OffsetDateTime::from_unix_timestamp(secs).unwrap();
            let offset = UtcOffset::from_whole_seconds(i32::try_from(zone_minutes * 60).unwrap()).unwrap();
            let local = at.to_offset(offset);
            let month = if numeric_month {
                format!("{:02}", u8::from(local.month()))
            } else {
                local.month().to_string()[..3].to_owned()
            };
            let text = format!(
                "Sun {month} {:02} {:02}:{:02}:{:02}.{millis:03}{}{:02}:{:02} {:04}",
                local.day(),
                local.hour(),
                local.minute(),
                local.second(),
                if zone_minutes < 0 { '-' } else { '+' },
                zone_minutes.abs() / 60,
                zone_minutes.abs() % 60,
                local.year(),
            );
            proptest::prop_assert_eq!(
                parse_datetime_any_year(&text),
                Some(Millis(secs * 1000 + millis)),
                "{}", text
            );
        }
    }

    #[test]
    fn standard_timestamps_in_the_future_are_now() {
        use serde_json::json;
        let now = Millis(1_704_164_645_000); // 2024-01-02T03:04:05Z
        assert_eq!(
            no_later_than(&json!("2030-01-01T00:00:00.000Z"), now),
            Some(json!("2024-01-02T03:04:05.000Z"))
        );
        assert_eq!(
            no_later_than(&json!("9999-12-31"), now),
            Some(json!("2024-01-02T03:04:05.000Z"))
        );
        assert_eq!(no_later_than(&json!("2024-01-02T03:04:05.000Z"), now), None);
        assert_eq!(no_later_than(&json!("2020-01-01T00:00:00.000Z"), now), None);
    }

    #[test]
    fn rejects_garbage_and_out_of_range_years() {
        for bad in [
            "",
            "yesterday",
            "2024-13-01",
            "2024-01-02T25:00:00Z",
            "3001-01-01",
            "2024-01-02Tfoo",
            "2024-01-02T03:04:05+25:00",
            "2024-01-02T03:04:05-18:01",
            "2024-01-02T03:04:05+01:60",
        ] {
            assert_eq!(parse_datetime(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_like_braze_export() {
        assert_eq!(
            Millis(1_704_164_645_678).to_iso(),
            "2024-01-02T03:04:05.678Z"
        );
    }
}
