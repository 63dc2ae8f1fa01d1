//! `tideway`: the one binary. Parses the command line and hands each subcommand to its module:
//! `serve` (the REST API and the dashboard), `workspaces`, `keys` and `users` (admin on the
//! database), `bench` (measurements against the limits beside them).
//!
//! This crate is wiring only: domain rules live in `tideway-core`, SQL in `tideway-store`, HTTP
//! in `tideway-server` (the bench's limits alone run SQL here, on scratch tables of their own).
//! Errors are `anyhow` with context, printed once on stderr with a non-zero exit code.

// The doc comments on clap's arguments are `--help` text, written for a terminal: a bare URL or
// `<data-dir>` there is meant literally, not as a link or HTML.
#![allow(rustdoc::bare_urls, rustdoc::invalid_html_tags)]

mod admin;
mod bench;
mod cohorts_push;
mod config;
mod currents;
mod data;
mod partners;
mod segments;
mod serve;
mod sink_cmd;
mod telemetry;
mod users;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, Settings};

/// mimalloc: the ingest path allocates and frees many small objects per request on two threads
/// (parsed JSON, profiles, event bodies, SQLite's own buffers); glibc's allocator cost the
/// writer thread a fifth of its time there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tideway: a self-hosted engagement hub that speaks Braze's REST API.
#[derive(Debug, Parser)]
#[command(name = "tideway", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the REST API, on an embedded SQLite database or on PostgreSQL (--database-url).
    ///
    /// Settings come from flags, then TIDEWAY_* environment variables, then the --config TOML
    /// file (keys are the flag names without `--`), then the defaults shown below. On first
    /// start it creates the workspace `default` and an admin REST API key with every
    /// permission, printed once and saved to <data-dir>/initial-admin-key (mode 0600). Prints
    /// `Tideway is listening on http://ADDR` when ready. SIGINT/SIGTERM stop it gracefully.
    Serve(ServeArgs),
    /// Create and list workspaces.
    #[command(subcommand)]
    Workspaces(admin::WorkspacesCommand),
    /// Create, list and revoke REST API keys.
    #[command(subcommand)]
    Keys(admin::KeysCommand),
    /// Dashboard users: create, reset a password, list.
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// Partner cohort import: partner API keys, data import keys, the Heap webhook secret.
    #[command(subcommand)]
    Partners(partners::PartnersCommand),
    /// Cohorts, from the partner's side.
    #[command(subcommand)]
    Cohorts(CohortsCommand),
    /// Segments: export an audience.
    #[command(subcommand)]
    Segments(segments::SegmentsCommand),
    /// Benchmarks that report ratios against limits measured in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run a local Heap-like Currents receiver (token check first, dedupe on id, SQLite
    /// storage, an HTML page at / and JSON at /events) with fault injection for tests and demos.
    Sink(sink_cmd::SinkArgs),
}

#[derive(Debug, Subcommand)]
enum CohortsCommand {
    /// Push a cohort's full membership list to Tideway (or Braze) through the partner
    /// cohort-import API, sending only what changed since the last successful push.
    Push(cohorts_push::PushArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file: its keys are the setting flags' names without `--` (e.g.
    /// `database-url = "postgres://…"`, `listen = "0.0.0.0:4000"`); --print-config writes one
    #[arg(long, env = "TIDEWAY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    settings: Settings,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            if args.print_config {
                return serve::print_config(&args.settings.layered(args.config.as_deref())?);
            }
            let settings = args.settings.resolve(args.config.as_deref())?;
            telemetry::init(settings.log_format, "info");
            serve::run(settings).await
        }
        Command::Workspaces(command) => {
            telemetry::init(LogFormat::Text, "warn");
            admin::workspaces(command).await
        }
        Command::Keys(command) => {
            telemetry::init(LogFormat::Text, "warn");
            admin::keys(command).await
        }
        Command::Users(command) => {
            telemetry::init(LogFormat::Text, "warn");
            users::run(command).await
        }
        Command::Partners(command) => {
            telemetry::init(LogFormat::Text, "warn");
            partners::run(command).await
        }
        Command::Cohorts(CohortsCommand::Push(args)) => {
            telemetry::init(LogFormat::Text, "warn");
            let summary =
                cohorts_push::push(&args, std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .await?;
            println!(
                "added {} removed {} requests {} retries {}",
                summary.added, summary.removed, summary.requests, summary.retries
            );
            Ok(())
        }
        Command::Segments(command) => {
            telemetry::init(LogFormat::Text, "warn");
            segments::run(
                command,
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
            )
            .await
        }
        Command::Bench(command) => {
            telemetry::init(LogFormat::Text, "warn");
            bench::run(command).await
        }
        Command::Sink(args) => {
            telemetry::init(LogFormat::Text, "info");
            sink_cmd::run(args).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn admin_forms_parse() {
        for args in [
            &["tideway", "workspaces", "create", "acme", "--data-dir", "d"][..],
            &["tideway", "workspaces", "list", "--data-dir", "d"],
            &[
                "tideway",
                "users",
                "create",
                "ops",
                "--role",
                "read_only",
                "--data-dir",
                "d",
            ],
            &[
                "tideway",
                "users",
                "reset-password",
                "admin",
                "--password-stdin",
            ],
            &[
                "tideway",
                "users",
                "list",
                "--database-url",
                "postgres://x@h/db",
            ],
            &[
                "tideway",
                "keys",
                "create",
                "--data-dir",
                "d",
                "--workspace",
                "w",
                "--permissions",
                "users.track,users.identify",
                "--name",
                "l",
                "--allow-ip",
                "10.0.0.0/8",
                "--allow-ip",
                "127.0.0.1",
            ],
            &[
                "tideway",
                "keys",
                "list",
                "--data-dir",
                "d",
                "--workspace",
                "w",
            ],
            &[
                "tideway",
                "keys",
                "revoke",
                "--data-dir",
                "d",
                "--workspace",
                "w",
                "abcd1234",
            ],
            &[
                "tideway",
                "serve",
                "--data-dir",
                "d",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--synchronous",
                "full",
            ],
            &[
                "tideway",
                "bench",
                "ingest",
                "--clients",
                "4",
                "--seconds",
                "1",
                "--rate",
                "50000",
            ],
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        assert!(
            Cli::try_parse_from(["tideway", "keys", "create", "--permissions", "users.nope"])
                .is_err()
        );
    }
}
