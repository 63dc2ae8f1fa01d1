//! The Currents exporter inside `tideway serve`: started beside the REST API on the same
//! SQLite store, stopped after the API has drained.
//!
//! The lease owner is this host and data directory, so a restarted server (after a crash
//! included) takes its Currents back at once instead of waiting for its old leases to expire,
//! while another node sharing a database gets a different name. Every request it makes keeps
//! the egress policy from the settings (`deny-private-endpoints`), and the management API
//! judges new definitions by the same policy (it reads it from the exporter).

use std::path::Path;
use std::sync::Arc;

use tideway_core::egress::EgressPolicy;
use tideway_currents::{Exporter, ExporterConfig};
use tideway_server::CurrentsApi;
use tideway_store::sqlite::SqliteStore;

fn owner(data_dir: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    format!("{host}:{}", dir.display())
}

/// Starts the exporter; the returned handle goes to the HTTP edge.
pub fn start(store: Arc<SqliteStore>, data_dir: &Path, egress: EgressPolicy) -> CurrentsApi {
    let config = ExporterConfig {
        owner: owner(data_dir),
        egress,
        ..ExporterConfig::default()
    };
    tracing::info!(egress = ?egress, "starting the Currents exporter");
    let exporter = Arc::new(Exporter::start(store.clone(), config));
    CurrentsApi { store, exporter }
}

/// Stops the exporter once nothing else holds it (in-flight batches are re-sent next start).
pub async fn stop(api: CurrentsApi) {
    let CurrentsApi { exporter, .. } = api;
    match Arc::try_unwrap(exporter) {
        Ok(exporter) => exporter.stop().await,
        Err(shared) => drop(shared),
    }
}
