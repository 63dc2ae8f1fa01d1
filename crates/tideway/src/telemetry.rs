//! Logging: a `tracing` subscriber writing to stderr, as text or JSON, filtered by `RUST_LOG`.
//!
//! Logs never go to stdout: stdout carries what scripts and tests read (the listening line, a
//! new key's secret), so the two must not mix.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG` is unset or invalid
/// (e.g. `info`, or `warn` for the one-shot admin commands).
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init` fails only if a subscriber is already set (e.g. twice in one process); the
    // first one stays, which is what we want.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
