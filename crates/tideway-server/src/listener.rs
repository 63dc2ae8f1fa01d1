//! The accept loop: serves the [`Router`] over HTTP/1 with the limits a public listener needs
//! and `axum::serve` does not have.
//!
//! `axum::serve` keeps a connection open as long as the client does: idle keep-alive
//! connections, a header that never ends (slowloris) and a body that stalls halfway all hold a
//! socket and a file descriptor forever, and nothing caps how many are open. A few hundred
//! such connections from one client without any key exhaust the open-file limit, and then the
//! listener cannot accept anyone — `/health` included — without a word in the log. So
//! [`serve`] drives hyper's HTTP/1 connections itself and enforces [`ConnectionLimits`]:
//!
//! - **Idle timeout**: a connection with no request in the application and no byte read or
//!   written for `idle_timeout` (before its first request, between keep-alive requests, or
//!   while a client does not read its response) is closed.
//! - **Header timeout**: once the first byte of a request arrives, its whole head must arrive
//!   within `header_timeout`, however slowly it trickles; otherwise the connection is closed.
//!   hyper has a `header_read_timeout`, but (in hyper 1.x) its clock starts when hyper *starts
//!   waiting* for a head, so it also bounds the idle wait between keep-alive requests with the
//!   same value; it is switched off and both timeouts are kept by a per-connection watchdog
//!   that watches the bytes going through the socket.
//! - **Body timeout**: a request's body must have arrived `body_timeout` after its head.
//!   Otherwise the handler is cancelled and the client gets `408 {"message": "Request
//!   Timeout"}` with `Connection: close` (the rest of the body is never read). That check runs
//!   inside the router ([`enforce_body_deadline`], under `observe`, so the 408 is logged and
//!   counted like any answer); this module stamps each request with its deadline.
//! - **Connection cap**: at most `max_connections` are open at once, by default the process's
//!   open-file limit less [`FD_HEADROOM`] for the database files and outgoing connections.
//!   Beyond it a new connection is accepted and closed at once, with a minimal 503 when the
//!   socket takes it without waiting; it never waits in the kernel's backlog behind a listener
//!   that has stopped accepting. A rate-limited warning says so, and
//!   `tideway_http_connections_refused_total` counts it.
//!
//! Also here, because hyper answers `100 Continue` as soon as the body is first read: a
//! request with `Expect: 100-continue` that declares a `Content-Length` over the body limit is
//! answered 413 at once ([`refuse_declared_oversize`]), without reading a byte of its body.
//!
//! Shutdown is graceful: when `shutdown` resolves the listener closes, idle connections close,
//! and [`serve`] returns once every in-flight request has been answered. Each request carries
//! the client's address as `ConnectInfo<SocketAddr>` (key IP allowlists need it).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::error::ApiError;

pub const HTTP_CONNECTIONS_OPEN: &str = "tideway_http_connections_open";
pub const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "tideway_http_connections_refused_total";
pub const HTTP_CONNECTIONS_TIMED_OUT_TOTAL: &str = "tideway_http_connections_timed_out_total";

/// File descriptors kept back from the default connection cap: the SQLite database, its WAL
/// and shared-memory files, log files, and the outgoing connections of the Currents exporter.
pub const FD_HEADROOM: u64 = 128;
/// The smallest default connection cap, however low the open-file limit.
pub const MIN_DEFAULT_CONNECTIONS: usize = 32;
/// The default connection cap when the open-file limit is unlimited.
pub const UNLIMITED_DEFAULT_CONNECTIONS: usize = 65_536;
/// The open-file limit assumed when it cannot be read (Linux's usual soft limit).
const ASSUMED_OPEN_FILE_LIMIT: u64 = 1024;

/// How often the "connection cap reached" and accept-failure warnings may be logged.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// How long the loop pauses after an accept failure that is not one connection's problem
/// (out of file descriptors, out of memory), so it does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The answer a connection over the cap gets, if its socket takes it without waiting.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 33\r\n\
\r\n\
{\"message\":\"Service Unavailable\"}";

/// How long connections may stay open and how many may be open at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time for a request's whole head, from its first byte. Default 10 s.
    pub header_timeout: Duration,
    /// Time a connection may stay open without a request in the application and without a byte
    /// read or written. Default 60 s.
    pub idle_timeout: Duration,
    /// Time for a request's whole body, from the end of its head; later is a 408. Default 30 s.
    pub body_timeout: Duration,
    /// Connections open at once; more are refused. Default: [`default_max_connections`].
    pub max_connections: usize,
}

impl ConnectionLimits {
    pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
}

/// The default timeouts, and a connection cap sized from this process's open-file limit.
impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_timeout: Self::DEFAULT_HEADER_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            body_timeout: Self::DEFAULT_BODY_TIMEOUT,
            max_connections: default_max_connections(),
        }
    }
}

/// The process's soft open-file limit (`RLIMIT_NOFILE`), read from `/proc/self/limits`;
/// `Some(u64::MAX)` when unlimited, `None` when it cannot be read (not Linux).
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&text)
}

/// The soft limit from the `Max open files` line of a `/proc/<pid>/limits` text.
fn parse_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        Some(u64::MAX)
    } else {
        soft.parse().ok()
    }
}

/// The default connection cap for this process: see [`max_connections_for`].
pub fn default_max_connections() -> usize {
    max_connections_for(open_file_limit())
}

/// The default connection cap for an open-file limit: the limit less [`FD_HEADROOM`], at least
/// `MIN_DEFAULT_CONNECTIONS`; `UNLIMITED_DEFAULT_CONNECTIONS` when unlimited; a limit that
/// cannot be read counts as 1024.
pub fn max_connections_for(open_file_limit: Option<u64>) -> usize {
    match open_file_limit.unwrap_or(ASSUMED_OPEN_FILE_LIMIT) {
        u64::MAX => UNLIMITED_DEFAULT_CONNECTIONS,
        limit => usize::try_from(limit.saturating_sub(FD_HEADROOM))
            .unwrap_or(UNLIMITED_DEFAULT_CONNECTIONS)
            .max(MIN_DEFAULT_CONNECTIONS),
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then stops
/// accepting and returns once every open connection has finished its request.
pub async fn serve<F>(listener: TcpListener, router: Router, limits: ConnectionLimits, shutdown: F)
where
    F: Future<Output = ()>,
{
    let max_connections = limits.max_connections.max(1);
    tracing::info!(
        max_connections,
        open_file_limit = open_file_limit(),
        header_timeout_ms = limits.header_timeout.as_millis(),
        idle_timeout_ms = limits.idle_timeout.as_millis(),
        body_timeout_ms = limits.body_timeout.as_millis(),
        "accepting connections"
    );
    let slots = Arc::new(Semaphore::new(max_connections));
    let app = TowerToHyperService::new(router);
    let limits = Arc::new(limits);
    // `stop` tells the connections to finish; every connection holds a receiver, so the
    // sender's `closed()` is "every connection is gone".
    let (stop, stopping) = watch::channel(false);
    let mut refusals = Throttle::new(WARN_EVERY);
    let mut accept_failures = Throttle::new(WARN_EVERY);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    if let Some(count) = accept_failures.hit(Instant::now()) {
                        tracing::warn!(%error, count, "cannot accept connections (out of file \
                            descriptors? lower --max-connections or raise `ulimit -n`)");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            refuse(&stream);
            drop(stream);
            metrics::counter!(HTTP_CONNECTIONS_REFUSED_TOTAL).increment(1);
            if let Some(refused) = refusals.hit(Instant::now()) {
                tracing::warn!(
                    max_connections,
                    refused,
                    "connection cap reached: refusing new connections (if this is real load, \
                     raise --max-connections and the open-file limit, `ulimit -n`)"
                );
            }
            continue;
        };
        tokio::spawn(connection(
            stream,
            peer,
            app.clone(),
            Arc::clone(&limits),
            stopping.clone(),
            Open::new(slot),
        ));
    }
    drop(listener);
    drop(stopping);
    let open = max_connections - slots.available_permits();
    tracing::info!(
        open,
        "stopped accepting; waiting for open connections to finish"
    );
    stop.send_replace(true);
    stop.closed().await;
}

/// Errors of one incoming connection (it went away before it was accepted), not of the
/// listener.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Writes the 503 if the socket takes it without waiting (a fresh socket's send buffer is
/// empty, so it nearly always does); the caller closes the socket.
fn refuse(stream: &TcpStream) {
    if let Err(error) = stream.try_write(REFUSAL) {
        tracing::debug!(%error, "could not write the refusal before closing");
    }
}

/// One accepted connection's share of the cap; counted in the open-connections gauge.
struct Open {
    _slot: OwnedSemaphorePermit,
}

impl Open {
    fn new(slot: OwnedSemaphorePermit) -> Open {
        metrics::gauge!(HTTP_CONNECTIONS_OPEN).increment(1.0);
        Open { _slot: slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!(HTTP_CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// Serves one connection: hyper's HTTP/1 state machine plus the watchdog that closes it when
/// its idle or header time is up, and the graceful stop.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: TowerToHyperService<Router>,
    limits: Arc<ConnectionLimits>,
    mut stopping: watch::Receiver<bool>,
    _open: Open,
) {
    let activity = Arc::new(Mutex::new(Activity::new(Instant::now())));
    let io = TokioIo::new(Watched {
        stream,
        activity: Arc::clone(&activity),
    });
    let body_timeout = limits.body_timeout;
    let in_app = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut()
            .insert(BodyDeadline(Instant::now() + body_timeout));
        let request = InApp::enter(Arc::clone(&in_app));
        let response = app.call(req);
        async move {
            let response: Result<Response, Infallible> = response.await;
            drop(request);
            response
        }
    });
    let mut builder = http1::Builder::new();
    // The watchdog keeps the header timeout (see the module documentation).
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stop_requested = false;
    loop {
        // No deadline that appears later (a new head, a finished request) can fall sooner
        // than one header or idle timeout from now, so waking by then misses none.
        let soonest_new = Instant::now() + limits.header_timeout.min(limits.idle_timeout);
        let check_at = lock(&activity)
            .deadline(&limits)
            .map_or(soonest_new, |(at, _)| at.min(soonest_new));
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(check_at) => {
                let expired = lock(&activity)
                    .deadline(&limits)
                    .filter(|(at, _)| *at <= Instant::now());
                if let Some((_, expiry)) = expired {
                    tracing::debug!(%peer, reason = expiry.as_str(), "closing connection: timed out");
                    metrics::counter!(HTTP_CONNECTIONS_TIMED_OUT_TOTAL, "reason" => expiry.as_str())
                        .increment(1);
                    return;
                }
            }
            _ = stopping.changed(), if !stop_requested => {
                // Idle connections close now; a request in progress finishes first.
                conn.as_mut().graceful_shutdown();
                stop_requested = true;
            }
        }
    }
}

fn lock(activity: &Mutex<Activity>) -> std::sync::MutexGuard<'_, Activity> {
    activity.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a connection is doing, as far as the timeouts care. Updated by the socket wrapper
/// and the service, all on the connection's own task.
#[derive(Debug)]
struct Activity {
    /// The last byte read or written, or the last response handed to hyper.
    last: Instant,
    /// When the first byte of the next request arrived (no request was in the application).
    head_since: Option<Instant>,
    /// Requests whose head has been read and whose response is not yet produced.
    in_app: usize,
}

/// Which timeout closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Idle,
    Header,
}

impl Expiry {
    fn as_str(self) -> &'static str {
        match self {
            Expiry::Idle => "idle",
            Expiry::Header => "header",
        }
    }
}

impl Activity {
    fn new(now: Instant) -> Activity {
        Activity {
            last: now,
            head_since: None,
            in_app: 0,
        }
    }

    fn on_read(&mut self, now: Instant) {
        self.last = now;
        if self.in_app == 0 && self.head_since.is_none() {
            self.head_since = Some(now);
        }
    }

    fn on_write(&mut self, now: Instant) {
        self.last = now;
    }

    fn on_request(&mut self) {
        self.in_app += 1;
        self.head_since = None;
    }

    fn on_response(&mut self, now: Instant) {
        self.in_app = self.in_app.saturating_sub(1);
        self.last = now;
    }

    /// When the connection is due to close if nothing else happens, and why; `None` while a
    /// request is in the application (its body has its own deadline).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, Expiry)> {
        if self.in_app > 0 {
            return None;
        }
        Some(match self.head_since {
            Some(since) => (since + limits.header_timeout, Expiry::Header),
            None => (self.last + limits.idle_timeout, Expiry::Idle),
        })
    }
}

/// A request inside the application; leaving (the response is ready, or hyper dropped the
/// request) restarts the idle clock.
struct InApp(Arc<Mutex<Activity>>);

impl InApp {
    fn enter(activity: Arc<Mutex<Activity>>) -> InApp {
        lock(&activity).on_request();
        InApp(activity)
    }
}

impl Drop for InApp {
    fn drop(&mut self) {
        lock(&self.0).on_response(Instant::now());
    }
}

/// The TCP stream, reporting every byte read or written to the connection's [`Activity`].
struct Watched {
    stream: TcpStream,
    activity: Arc<Mutex<Activity>>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            lock(&this.activity).on_read(Instant::now());
        }
        poll
    }
}

impl Watched {
    fn wrote(&self, poll: &Poll<io::Result<usize>>) {
        if matches!(poll, Poll::Ready(Ok(n)) if *n > 0) {
            lock(&self.activity).on_write(Instant::now());
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote(&poll);
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Counts events and says when one may be logged: the first, then at most one per period,
/// each time with how many happened since the last one logged.
#[derive(Debug)]
struct Throttle {
    every: Duration,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// Records one event; `Some(n)` when it is time to log the `n` events since the last log.
    fn hit(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last_logged
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            return None;
        }
        self.last_logged = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// When a request's body must have arrived; put on each request by [`serve`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyDeadline(Instant);

/// Middleware: a request whose body has not fully arrived by its [`BodyDeadline`] is answered
/// `408 {"message": "Request Timeout"}` with `Connection: close`, and its handler is cancelled.
/// Requests without a deadline (served by something other than [`serve`]) pass untouched.
pub(crate) async fn enforce_body_deadline(req: Request, next: Next) -> Response {
    let Some(BodyDeadline(deadline)) = req.extensions().get::<BodyDeadline>().copied() else {
        return next.run(req).await;
    };
    let received = Arc::new(AtomicBool::new(req.body().is_end_stream()));
    let watched = Arc::clone(&received);
    let req = req.map(|inner| {
        Body::new(Arrival {
            inner,
            received: watched,
        })
    });
    let handler = next.run(req);
    tokio::pin!(handler);
    tokio::select! {
        response = &mut handler => response,
        () = body_overdue(deadline, &received) => {
            tracing::info!("the request body did not arrive in time: 408, closing the connection");
            let mut response = crate::error::ApiError::RequestTimeout.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// Resolves at `deadline` if the body has not arrived by then; never otherwise.
async fn body_overdue(deadline: Instant, received: &AtomicBool) {
    tokio::time::sleep_until(deadline).await;
    if received.load(Ordering::Acquire) {
        std::future::pending::<()>().await;
    }
}

/// A request body that records when its last byte has been read.
struct Arrival {
    inner: Body,
    received: Arc<AtomicBool>,
}

impl HttpBody for Arrival {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        let done = match &poll {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => false,
        };
        if done {
            this.received.store(true, Ordering::Release);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware: a request with `Expect: 100-continue` that declares a `Content-Length` over the
/// body limit (the state) is answered `413 {"message": "Payload Too Large"}` at once, instead
/// of `100 Continue` and a body read for nothing. Without `Expect` the body is on its way
/// anyway: the pipeline reads it up to the limit after authentication, so that 413 carries
/// the key's rate-limit headers.
pub(crate) async fn refuse_declared_oversize(
    State(max_body_bytes): State<usize>,
    req: Request,
    next: Next,
) -> Response {
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue {
        return next.run(req).await;
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > u64::try_from(max_body_bytes).unwrap_or(u64::MAX) => {
            let mut response = ApiError::PayloadTooLarge.into_response();
            // The body stays unread, so this connection cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        _ => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
";

    #[test]
    fn the_soft_open_file_limit_is_read_from_proc_limits() {
        assert_eq!(parse_open_file_limit(PROC_LIMITS), Some(1024));
        let unlimited = PROC_LIMITS.replace("1024                 524288", "unlimited unlimited");
        assert_eq!(parse_open_file_limit(&unlimited), Some(u64::MAX));
        assert_eq!(parse_open_file_limit("Limit Soft Hard\n"), None);
    }

    #[test]
    fn this_process_has_a_readable_open_file_limit() {
        // The tests run on Linux, where /proc/self/limits exists.
        let limit = open_file_limit().expect("/proc/self/limits names the open-file limit");
        assert!(limit > 0);
    }

    #[test]
    fn the_default_cap_leaves_headroom_and_has_a_floor() {
        assert_eq!(max_connections_for(Some(1024)), 896);
        assert_eq!(max_connections_for(Some(65_536)), 65_408);
        assert_eq!(max_connections_for(Some(100)), MIN_DEFAULT_CONNECTIONS);
        assert_eq!(max_connections_for(Some(0)), MIN_DEFAULT_CONNECTIONS);
        assert_eq!(
            max_connections_for(Some(u64::MAX)),
            UNLIMITED_DEFAULT_CONNECTIONS
        );
        assert_eq!(max_connections_for(None), 896, "unknown counts as 1024");
    }

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            max_connections: 8,
        }
    }

    #[test]
    fn idle_then_header_then_no_deadline_in_the_app_then_idle_again() {
        let limits = limits();
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        assert_eq!(
            a.deadline(&limits),
            Some((t0 + limits.idle_timeout, Expiry::Idle))
        );
        // The first byte of a head starts the header clock; later bytes do not move it.
        let t1 = t0 + Duration::from_secs(5);
        a.on_read(t1);
        a.on_read(t1 + Duration::from_secs(3));
        assert_eq!(
            a.deadline(&limits),
            Some((t1 + limits.header_timeout, Expiry::Header))
        );
        a.on_request();
        assert_eq!(a.deadline(&limits), None, "a request is in the application");
        // Body bytes read while the request is in the application are not a new head.
        a.on_read(t1 + Duration::from_secs(4));
        let t2 = t1 + Duration::from_secs(20);
        a.on_response(t2);
        assert_eq!(
            a.deadline(&limits),
            Some((t2 + limits.idle_timeout, Expiry::Idle))
        );
        // Writing the response moves the idle clock.
        let t3 = t2 + Duration::from_secs(1);
        a.on_write(t3);
        assert_eq!(
            a.deadline(&limits),
            Some((t3 + limits.idle_timeout, Expiry::Idle))
        );
    }

    #[test]
    fn the_throttle_logs_the_first_event_then_one_per_period_with_the_count() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.hit(t0), Some(1));
        assert_eq!(throttle.hit(t0 + Duration::from_secs(1)), None);
        assert_eq!(throttle.hit(t0 + Duration::from_secs(9)), None);
        assert_eq!(throttle.hit(t0 + Duration::from_secs(10)), Some(3));
        assert_eq!(throttle.hit(t0 + Duration::from_secs(11)), None);
    }
}
