//! `tideway segments export`: writes a segment's members (braze_id, external_id) as JSON
//! lines or CSV, for audiences too large to page through the HTTP API.
//!
//! It reads the data directory directly and builds the workspace's segment index with the same
//! loader the server uses (`Store::segment_profiles` → `LiveIndex`), so the audience is the one
//! `GET /api/v1/segments/{id}/members` would return at that moment.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use tideway_core::segments::{LiveIndex, Member, segment_lookup};

use crate::admin::{Location, find_workspace};

#[derive(Debug, clap::Subcommand)]
pub enum SegmentsCommand {
    /// Write a segment's members (braze_id, external_id) to a file or stdout
    Export(ExportArgs),
}

/// Output format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line: {"braze_id": "…", "external_id": "…" | null}
    Jsonl,
    /// A header line `braze_id,external_id`, then one row per member (RFC 4180 quoting)
    Csv,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The segment's id
    pub id: String,
    /// Output format
    #[arg(long, value_enum, default_value = "jsonl")]
    pub format: Format,
    /// Write here instead of stdout
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The workspace the segment belongs to
    #[arg(long)]
    pub workspace: String,
    #[command(flatten)]
    pub location: Location,
}

pub async fn run(command: SegmentsCommand, show_progress: bool) -> anyhow::Result<()> {
    match command {
        SegmentsCommand::Export(args) => {
            let count = export(&args, show_progress).await?;
            eprintln!("exported {count} members");
            Ok(())
        }
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn write_member(out: &mut dyn Write, format: Format, m: &Member) -> std::io::Result<()> {
    match format {
        Format::Jsonl => {
            let line =
                serde_json::json!({"braze_id": m.braze_id.as_str(), "external_id": m.external_id});
            writeln!(out, "{line}")
        }
        Format::Csv => writeln!(
            out,
            "{},{}",
            m.braze_id.as_str(),
            csv_field(m.external_id.as_deref().unwrap_or(""))
        ),
    }
}

/// Exports the members; returns how many were written.
pub async fn export(args: &ExportArgs, show_progress: bool) -> anyhow::Result<u64> {
    let (store, flags) = args.location.open_store().await?;
    let workspace = find_workspace(store.as_ref(), &args.workspace, &flags).await?;
    let segments = store
        .list_segments(workspace.id)
        .await
        .context("cannot read segments")?;
    let Some(segment) = segments.iter().find(|s| s.id == args.id) else {
        bail!("no segment '{}' in workspace '{}'", args.id, args.workspace);
    };
    let filter = segment
        .parsed_filter()
        .with_context(|| format!("segment '{}' has a damaged filter", args.id))?;
    let lookup = segment_lookup(&segments);
    let snapshot = store
        .segment_profiles(workspace.id)
        .await
        .context("cannot load the workspace's profiles")?;
    let live = LiveIndex::from_snapshot(snapshot);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let members: Vec<Member> = live.all_members(&filter, now, &lookup).collect();

    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let bar = if show_progress {
        ProgressBar::new(members.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} members {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if args.format == Format::Csv {
        writeln!(out, "braze_id,external_id").context("cannot write the export")?;
    }
    for (i, m) in members.iter().enumerate() {
        write_member(out.as_mut(), args.format, m).context("cannot write the export")?;
        if i % 1024 == 1023 {
            bar.inc(1024);
        }
    }
    out.flush().context("cannot write the export")?;
    bar.finish_and_clear();
    Ok(members.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_when_needed() {
        assert_eq!(csv_field("u1"), "u1");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
