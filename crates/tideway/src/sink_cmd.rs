//! `tideway sink`: runs `tideway_heap::sink`, a local receiver that behaves like Heap's
//! Currents intake, until SIGINT or SIGTERM. Prints `Tideway sink is listening on http://ADDR`
//! when ready (stdout is an interface, as for `serve`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use tideway_heap::sink::{self, Faults, SinkConfig};

/// The prefix of the stdout line that announces the sink.
pub const SINK_LISTENING_LINE: &str = "Tideway sink is listening on ";

fn rate(raw: &str) -> Result<f64, String> {
    let p: f64 = raw.parse().map_err(|_| "must be a number".to_owned())?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err("must be between 0 and 1".to_owned())
    }
}

#[derive(Debug, clap::Args)]
pub struct SinkArgs {
    /// Address to listen on
    #[arg(long, env = "TIDEWAY_SINK_LISTEN", default_value = "127.0.0.1:9400")]
    pub listen: SocketAddr,
    /// Require `Authorization: Bearer TOKEN` (checked before the body is read; 401 otherwise)
    #[arg(long, env = "TIDEWAY_SINK_BEARER_TOKEN")]
    pub bearer_token: Option<String>,
    /// Directory for sink.sqlite (created if missing)
    #[arg(
        long,
        env = "TIDEWAY_SINK_DATA_DIR",
        default_value = "./tideway-sink-data"
    )]
    pub data_dir: PathBuf,
    /// Answer the first N authorised requests with 500
    #[arg(long, default_value_t = 0)]
    pub fail_first: u64,
    /// Answer each authorised request with 500 with this probability (0..=1)
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub fail_rate: f64,
    /// Answer every authorised request with this status code
    #[arg(long, value_parser = clap::value_parser!(u16).range(100..=599))]
    pub status: Option<u16>,
    /// Wait this many milliseconds before answering each request
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Answer 400 to a batch holding an event of this type (a "malformed" event)
    #[arg(long)]
    pub reject_event_type: Option<String>,
    /// Answer 413 to a batch of more than N events
    #[arg(long)]
    pub max_events: Option<usize>,
    /// Largest request body accepted (413 above)
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
}

pub async fn run(args: SinkArgs) -> anyhow::Result<()> {
    let config = SinkConfig {
        listen: args.listen,
        bearer_token: args.bearer_token,
        data_dir: args.data_dir.clone(),
        max_body_bytes: args.max_body_bytes,
        faults: Faults {
            fail_first: args.fail_first,
            fail_rate: args.fail_rate,
            status: args.status,
            delay_ms: args.delay_ms,
            reject_event_type: args.reject_event_type,
            max_events: args.max_events,
        },
    };
    let announce = |addr: SocketAddr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{SINK_LISTENING_LINE}http://{addr}");
        let _ = out.flush();
        tracing::info!(%addr, data_dir = %args.data_dir.display(), "sink ready");
    };
    sink::serve(config, announce, shutdown())
        .await
        .context("the sink failed")?;
    Ok(())
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
