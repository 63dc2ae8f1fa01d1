//! `tideway bench …`: benchmarks as subcommands. Each one measures, in the same run, a limit
//! beside the figure it reports (DESIGN.md §4), prints the ratio, and says PASS or FAIL against
//! the target. Results and the commands that produced them are recorded in BENCHMARKS.md.

// Benchmarks drive Tideway and receivers they start on loopback: plain clients are right here.
#![allow(clippy::disallowed_methods)]

mod canvas;
mod cohorts;
mod cpu;
mod currents;
mod ingest;
mod ingest_pg;
mod limits;
mod load;
mod segments;
mod send;

pub use ingest::IngestArgs;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Drive /users/track over loopback and compare with a no-op handler and raw SQLite inserts
    Ingest(IngestArgs),
    /// Partner cohort import: 1,000,000 membership changes against 1,000,000 users, beside a
    /// handler that only parses the same requests
    Cohorts(cohorts::CohortsArgs),
    /// Currents export: events/s to `tideway sink` and to a no-op receiver (batches of 100),
    /// p50/p99 event-to-delivery latency below saturation, RSS with a 10 M-event backlog;
    /// beside each receiver's own maximum
    Currents(currents::CurrentsArgs),
    /// Segment size right after a restart (index from its snapshot, beside a full build) and
    /// p50/p99 under /users/track load
    Segments(segments::SegmentsArgs),
    /// Campaign sends through the webhook channel: a 1 M-user broadcast beside the receiver's
    /// own maximum, and cohort entry → webhook → its `webhook.Send` at a Current's receiver
    Send(send::SendArgs),
    /// Canvas timers: users waiting in a Delay (bytes per waiting user), timers due at once
    /// (time to settle them all, beside the webhook receiver's own maximum), and lateness p99
    /// of timers spread over time
    Canvas(canvas::CanvasArgs),
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Ingest(args) => ingest::run(args).await,
        BenchCommand::Cohorts(args) => cohorts::run(args).await,
        BenchCommand::Currents(args) => currents::run(args).await,
        BenchCommand::Segments(args) => segments::run(args).await,
        BenchCommand::Send(args) => send::run(args).await,
        BenchCommand::Canvas(args) => canvas::run(args).await,
    }
}

/// The store a bench runs on: a SQLite file in `dir`, or the PostgreSQL database at
/// `database_url` (a workspace of the bench's own in it).
async fn open_store(
    dir: &std::path::Path,
    database_url: Option<&str>,
) -> anyhow::Result<std::sync::Arc<dyn tideway_core::store::Store>> {
    use anyhow::Context;
    Ok(match database_url {
        None => std::sync::Arc::new(crate::data::open(
            dir,
            tideway_store::sqlite::SqliteOptions::default(),
        )?),
        Some(url) => std::sync::Arc::new(
            tideway_store::postgres::PgStore::open(url)
                .await
                .with_context(|| {
                    format!(
                        "cannot use PostgreSQL at {}; is it running, and may this user create tables?",
                        crate::config::redact_url(url)
                    )
                })?,
        ),
    })
}
