//! The status-code table (`reference/currents-connector.md` §4): what the exporter does with
//! a receiver's answer. A pure function of the answer and the size of the batch that got it,
//! so the whole table is unit-tested here and the delivery loop only acts on the verdict.
//!
//! | answer | batch > 1 | batch = 1 |
//! |---|---|---|
//! | 2xx | ack | ack |
//! | 400 | split into single events | dead letter (`rejected`), with the response |
//! | 413 | halve | dead letter (`too_large_for_receiver`) |
//! | 401, 403, 404 | halt the Current, keep the queue | same |
//! | 429, 503 | retry after `max(backoff, Retry-After)` | same |
//! | anything else (1xx, 3xx, other 4xx, 5xx), timeout, connection error | retry with backoff | same |

use std::time::Duration;

use tideway_core::currents_store::DeadLetterReason;

/// What came back from one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP response; `retry_after` is the parsed `Retry-After` header, if any.
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No response within the request timeout.
    Timeout,
    /// The connection could not be made or broke.
    Connection,
}

/// What to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ack,
    /// Re-send every event of the batch alone.
    SplitToSingles,
    /// Re-send the batch as two halves.
    Halve,
    /// Move the (single) event to the dead-letter store.
    DeadLetter(DeadLetterReason),
    /// Stop the Current until it is re-enabled; nothing is acknowledged.
    Halt,
    /// Send the same batch again later, not before `at_least` when the receiver said so.
    Retry {
        at_least: Option<Duration>,
    },
}

/// The table.
pub fn classify(answer: Answer, batch_len: usize) -> Verdict {
    match answer {
        Answer::Status {
            code: 200..=299, ..
        } => Verdict::Ack,
        Answer::Status { code: 400, .. } if batch_len > 1 => Verdict::SplitToSingles,
        Answer::Status { code: 400, .. } => Verdict::DeadLetter(DeadLetterReason::Rejected),
        Answer::Status { code: 413, .. } if batch_len > 1 => Verdict::Halve,
        Answer::Status { code: 413, .. } => {
            Verdict::DeadLetter(DeadLetterReason::TooLargeForReceiver)
        }
        Answer::Status {
            code: 401 | 403 | 404,
            ..
        } => Verdict::Halt,
        Answer::Status {
            code: 429 | 503,
            retry_after,
        } => Verdict::Retry {
            at_least: retry_after,
        },
        Answer::Status { .. } | Answer::Timeout | Answer::Connection => {
            Verdict::Retry { at_least: None }
        }
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (relative to `now_unix_secs`).
pub fn parse_retry_after(raw: &str, now_unix_secs: i64) -> Option<Duration> {
    let raw = raw.trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let at = time::PrimitiveDateTime::parse(raw, &format)
        .ok()?
        .assume_utc()
        .unix_timestamp();
    Some(Duration::from_secs(
        u64::try_from(at - now_unix_secs).unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Answer {
        Answer::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn the_status_code_table() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(classify(status(code), 100), Verdict::Ack);
            assert_eq!(classify(status(code), 1), Verdict::Ack);
        }
        assert_eq!(classify(status(400), 100), Verdict::SplitToSingles);
        assert_eq!(classify(status(400), 2), Verdict::SplitToSingles);
        assert_eq!(
            classify(status(400), 1),
            Verdict::DeadLetter(DeadLetterReason::Rejected)
        );
        assert_eq!(classify(status(413), 100), Verdict::Halve);
        assert_eq!(
            classify(status(413), 1),
            Verdict::DeadLetter(DeadLetterReason::TooLargeForReceiver)
        );
        for code in [401, 403, 404] {
            assert_eq!(classify(status(code), 100), Verdict::Halt);
            assert_eq!(classify(status(code), 1), Verdict::Halt);
        }
        for code in [
            100, 301, 302, 304, 402, 405, 408, 409, 422, 500, 502, 504, 599,
        ] {
            assert_eq!(
                classify(status(code), 100),
                Verdict::Retry { at_least: None },
                "{code}"
            );
        }
        let wait = Some(Duration::from_secs(7));
        assert_eq!(
            classify(
                Answer::Status {
                    code: 429,
                    retry_after: wait
                },
                10
            ),
            Verdict::Retry { at_least: wait }
        );
        assert_eq!(
            classify(
                Answer::Status {
                    code: 503,
                    retry_after: wait
                },
                10
            ),
            Verdict::Retry { at_least: wait }
        );
        assert_eq!(
            classify(
                Answer::Status {
                    code: 500,
                    retry_after: wait
                },
                10
            ),
            Verdict::Retry { at_least: None }
        );
        assert_eq!(
            classify(Answer::Timeout, 5),
            Verdict::Retry { at_least: None }
        );
        assert_eq!(
            classify(Answer::Connection, 1),
            Verdict::Retry { at_least: None }
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("120", 0), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", 0), Some(Duration::ZERO));
        // Sun, 06 Nov 1994 08:49:37 GMT = 784111777
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_770),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_800),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", 0), None);
        assert_eq!(parse_retry_after("-5", 0), None);
    }
}
