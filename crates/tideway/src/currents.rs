//! The Currents exporter inside `tideway serve`: started beside the REST API on the same
//! store, stopped after the API has drained.
//!
//! The lease owner is this host and data directory, so a restarted server (after a crash
//! included) takes its Currents back at once instead of waiting for its old leases to expire,
//! while another node sharing a database gets a different name. Every request it makes keeps
//! the egress policy from the settings (`deny-private-endpoints`), and the management API
//! judges new definitions by the same policy (it reads it from the exporter).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tideway_core::egress::EgressPolicy;
use tideway_core::store::Store;
use tideway_currents::{Exporter, ExporterConfig};
use tideway_server::CurrentsApi;

/// This node's name as a lease owner (Currents and the send queue): host and data directory.
pub(crate) fn owner(data_dir: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    format!("{host}:{}", dir.display())
}

/// Starts the exporter; the returned handle goes to the HTTP edge.
pub fn start(
    store: Arc<dyn Store>,
    data_dir: &Path,
    egress: EgressPolicy,
    lease_ttl: Duration,
) -> CurrentsApi {
    let defaults = ExporterConfig::default();
    let lease_ttl_ms = u64::try_from(lease_ttl.as_millis()).unwrap_or(u64::MAX);
    let config = ExporterConfig {
        owner: owner(data_dir),
        egress,
        lease_ttl_ms,
        // Renewed three times per lease, so one slow round never lets it lapse.
        maintenance_interval_ms: defaults.maintenance_interval_ms.min(lease_ttl_ms / 3),
        // A node looks for Currents a dead node left at least once per lease.
        rescan_interval_ms: defaults.rescan_interval_ms.min(lease_ttl_ms),
        ..defaults
    };
    tracing::info!(egress = ?egress, "starting the Currents exporter");
    let store: Arc<dyn tideway_core::currents_store::CurrentsStore> = store;
    let exporter = Arc::new(Exporter::start(Arc::clone(&store), config));
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
