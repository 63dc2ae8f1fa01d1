//! `tideway serve`: open the data directory, bootstrap a first workspace and admin key (and
//! the dashboard user `admin`), and run the REST API and the dashboard until SIGINT or SIGTERM.
//!
//! Stdout is an interface: scripts and tests read the line
//! `Tideway is listening on http://ADDR` (the bound address, so `--listen 127.0.0.1:0` shows
//! the real port) and, on the very first start, the admin key. Everything else is logged to
//! stderr. Shutdown is graceful: the listener closes, in-flight requests finish (and so their
//! writes commit) before the process exits. The accept loop is `tideway_server::serve`, with
//! the connection cap and the idle, header and body timeouts of the settings.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tideway_core::keys::{IpAllowlist, PermissionSet, Secret};
use tideway_core::store::{Store, StoreError};
use tideway_messaging::dispatcher::{Channels, DispatchConfig, Tracking};
use tideway_messaging::email::{SmtpSender, SmtpUrl};
use tideway_messaging::engine::EngineConfig;
use tideway_messaging::tracking::{TrackingKey, TrackingUrls};
use tideway_messaging::webhook::WebhookSender;
use tideway_server::{ConnectionLimits, MessagingOptions, ServerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{Resolved, Settings, initial_key_path, initial_password_path};
use crate::data;

/// The prefix of the stdout line that announces the REST endpoint.
pub const LISTENING_LINE: &str = "Tideway is listening on ";
/// The name of the workspace created on first start.
pub const DEFAULT_WORKSPACE: &str = "default";

/// Runs the server with resolved settings until a shutdown signal.
pub async fn run(settings: Resolved) -> anyhow::Result<()> {
    let _one_server = data::lock_for_serving(&settings.data_dir)?;
    let store = data::open_store(&settings, true).await?;
    bootstrap(store.as_ref(), &settings.data_dir).await?;
    bootstrap_dashboard(store.as_ref(), &settings.data_dir).await?;
    let metrics = tideway_server::install_metrics_recorder()
        .context("cannot install the metrics recorder")?;
    let currents = crate::currents::start(
        Arc::clone(&store),
        &settings.data_dir,
        settings.egress,
        settings.currents_lease_ttl,
    );
    let listener = TcpListener::bind(settings.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (is another server running there? pick another --listen)",
            settings.listen
        )
    })?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let messaging = messaging_options(store.as_ref(), &settings, addr).await?;
    let router = tideway_server::app_with_messaging(
        store,
        settings.server.clone(),
        metrics,
        Some(currents.clone()),
        Some(settings.segment_index_dir()),
        Some(messaging),
    );
    let draining = tideway_server::Draining::default();
    let router = tideway_server::with_draining(router, draining.clone());
    let signals = StopSignals::listen()?;
    announce(addr)?;
    tracing::info!(%addr, data_dir = %settings.data_dir.display(), database = %settings.database.describe(&settings.data_dir), synchronous = ?settings.synchronous, "serving the REST API");
    tideway_server::serve(
        listener,
        router,
        settings.connections.clone(),
        drain_then_stop(signals, draining, settings.shutdown_drain),
    )
    .await;
    tracing::info!("stopped: every in-flight request has been answered");
    crate::currents::stop(currents).await;
    Ok(())
}

/// The messaging engine's channels, tracking and clock, from the settings: webhooks under
/// the same egress policy as Currents, email through `smtp-url` (none: email sends are aborted
/// as undeliverable), tracking links under `public-url` (default: the bound address), signed
/// with the key every node of the database shares (drawn by the first to start).
async fn messaging_options(
    store: &dyn Store,
    settings: &Resolved,
    addr: SocketAddr,
) -> anyhow::Result<MessagingOptions> {
    let mut candidate = [0u8; 32];
    getrandom::fill(&mut candidate)
        .map_err(|e| anyhow::anyhow!("cannot draw a tracking-link signing key: {e}"))?;
    let secret = store
        .messaging_secret(candidate)
        .await
        .context("cannot read or store the tracking-link signing key")?;
    let public_url = settings
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let smtp = match &settings.smtp {
        None => None,
        Some(url) => {
            let parsed = SmtpUrl::parse(url.expose()).with_context(|| {
                format!("--smtp-url {url:?} is not usable; write it as smtp://HOST:PORT or smtps://USER:PASSWORD@HOST:465")
            })?;
            Some(
                SmtpSender::new(&parsed)
                    .with_context(|| format!("cannot set up the SMTP client for {url:?}"))?,
            )
        }
    };
    tracing::info!(public_url = %public_url, smtp = ?settings.smtp, egress = ?settings.egress, "starting the messaging engine");
    Ok(MessagingOptions {
        channels: Channels {
            webhook: WebhookSender::new(settings.egress, settings.webhook_timeout)
                .context("cannot build the webhook client")?,
            smtp,
        },
        tracking: Tracking {
            key: TrackingKey::new(secret),
            urls: TrackingUrls::new(&public_url),
        },
        clock: tideway_currents::Clock::system(),
        // The same stable name as the Currents leases: a restarted node takes back at once
        // the sends it had in flight when it died.
        engine: EngineConfig {
            dispatch: DispatchConfig {
                owner: crate::currents::owner(&settings.data_dir),
                ..DispatchConfig::default()
            },
            ..EngineConfig::default()
        },
    })
}

/// Prints (and flushes) the stable stdout line with the REST endpoint.
fn announce(addr: SocketAddr) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{LISTENING_LINE}http://{addr}")?;
    out.flush()?;
    Ok(())
}

/// On a data directory without workspaces: creates `default` and an admin key with every
/// permission, shown once on stdout and kept in `<data-dir>/initial-admin-key` (mode 0600).
async fn bootstrap(store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
    if !store
        .list_workspaces()
        .await
        .context("cannot list workspaces")?
        .is_empty()
    {
        return Ok(());
    }
    let now = data::now();
    let workspace = match store.create_workspace(DEFAULT_WORKSPACE, now).await {
        Ok(workspace) => workspace,
        // Another node on the same database bootstrapped it at the same moment: its key is
        // the admin key, printed by that node.
        Err(StoreError::Conflict(_)) => {
            tracing::info!(
                workspace = DEFAULT_WORKSPACE,
                "another node created the default workspace first"
            );
            return Ok(());
        }
        Err(e) => return Err(e).context("cannot create the default workspace"),
    };
    let (secret, key) = data::mint_key(
        workspace.id,
        "initial admin key",
        PermissionSet::all(),
        IpAllowlist::default(),
        now,
    );
    store
        .create_api_key(key)
        .await
        .context("cannot create the initial admin key")?;
    let path = initial_key_path(data_dir);
    data::write_secret_file(&path, &secret).with_context(|| {
        format!(
            "the admin key was created but could not be saved; create another with \
             `tideway keys create --data-dir {} --workspace {DEFAULT_WORKSPACE} --permissions all`",
            data_dir.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Created workspace '{DEFAULT_WORKSPACE}' (app_group_id {}).",
        workspace.app_group_id
    )?;
    writeln!(
        out,
        "Admin REST API key (every permission; shown once, saved to {}): {}",
        path.display(),
        secret.expose()
    )?;
    out.flush()?;
    tracing::info!(workspace = DEFAULT_WORKSPACE, key_file = %path.display(), "first start: created the default workspace and an admin key");
    Ok(())
}

/// When the database has no dashboard user: creates `admin` with a random password, shown once
/// on stdout and kept in `<data-dir>/initial-admin-password` (mode 0600), like the admin key.
async fn bootstrap_dashboard(store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
    let Some(password) = crate::users::bootstrap_admin(store).await? else {
        return Ok(());
    };
    let path = initial_password_path(data_dir);
    data::write_secret_file(&path, &Secret::new(password.clone())).with_context(|| {
        format!(
            "the dashboard user 'admin' was created but its password could not be saved; set              another with `tideway users reset-password admin --data-dir {}`",
            data_dir.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Dashboard user 'admin' (sign in at /dashboard; shown once, saved to {}): {password}",
        path.display()
    )?;
    out.flush()?;
    tracing::info!(password_file = %path.display(), "first start: created the dashboard user 'admin'");
    Ok(())
}

/// SIGINT and SIGTERM, listened for from the moment this is made: made before the readiness
/// line is printed, so a signal sent as soon as the line appears is caught (the default for a
/// signal nobody listens for is to kill the process, with no drain and no clean stop).
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    /// The next SIGINT (Ctrl-C) or SIGTERM, saying which.
    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => {
                tracing::info!("SIGINT: shutting down");
                Signal::Interrupt
            }
            _ = self.terminate.recv() => {
                tracing::info!("SIGTERM: shutting down");
                Signal::Terminate
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Interrupt,
    Terminate,
}

/// Resolves when the server should stop accepting: at once on SIGINT (someone at a terminal),
/// after `drain` on SIGTERM (a supervisor or orchestrator), during which the node answers as
/// [`tideway_server::with_draining`] describes; a second signal cuts the drain short.
async fn drain_then_stop(
    mut signals: StopSignals,
    draining: tideway_server::Draining,
    drain: std::time::Duration,
) {
    if signals.next().await == Signal::Interrupt || drain.is_zero() {
        return;
    }
    draining.start();
    tracing::info!(
        drain_ms = drain.as_millis(),
        "draining: /health answers 503 and every answer closes its connection; \
         a second SIGTERM or SIGINT stops at once"
    );
    tokio::select! {
        () = tokio::time::sleep(drain) => tracing::info!("drained: shutting down"),
        _ = signals.next() => tracing::info!("second signal: shutting down now"),
    }
}

/// A server running inside this process (for `tideway bench`): its address, and a handle that
/// stops it gracefully.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl InProcess {
    /// Serves `store` on a free loopback port, with the default connection limits.
    pub async fn start(store: Arc<dyn Store>, config: ServerConfig) -> anyhow::Result<InProcess> {
        let metrics = tideway_server::install_metrics_recorder()
            .context("cannot install the metrics recorder")?;
        InProcess::serve_router(tideway_server::app(store, config, metrics)).await
    }

    /// Serves an already built app on a free loopback port through the same accept loop as
    /// `tideway serve` (default connection limits).
    pub async fn serve_router(router: axum::Router) -> anyhow::Result<InProcess> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("cannot bind a loopback port")?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tideway_server::serve(
            listener,
            router,
            ConnectionLimits::default(),
            async {
                let _ = stopped.await;
            },
        ));
        Ok(InProcess { addr, stop, task })
    }

    /// Stops accepting, waits for in-flight requests.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("the server task panicked")?;
        Ok(())
    }
}

/// `tideway serve --print-config`: the effective settings as a TOML file.
/// Database and SMTP passwords are shown as `***`.
pub fn print_config(settings: &Settings) -> anyhow::Result<()> {
    let mut settings = settings.clone();
    settings.database_url = settings
        .database_url
        .as_deref()
        .map(crate::config::redact_url);
    settings.smtp_url = settings.smtp_url.as_deref().map(crate::config::redact_url);
    let text = toml::to_string(&settings).context("cannot render the configuration")?;
    print!("{text}");
    Ok(())
}
