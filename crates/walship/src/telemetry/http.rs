//! The HTTP endpoints: `/metrics`, `/healthz`, `/readyz` and `/active`, served with bounded cost.
//!
//! Owns the accept loop, the per-connection limits ([`Limits`]), the accept backoff, and the
//! mapping of paths to answers.
//!
//! Invariant: whatever its clients do, the endpoint costs the relay a bounded amount: at most
//! [`Limits::max_connections`] connections, each with a deadline, never a busy loop on accept
//! errors.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::encode::{registry, render};
use super::state::*;

/// Bounds on what the metrics/health server spends on its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once (at least 1); further ones wait in the listen backlog.
    pub max_connections: usize,
    /// From accepting a connection to the end of its request head.
    pub header_read_timeout: Duration,
    /// From accepting a connection to closing it, whatever it is doing (reading the request,
    /// writing the response to a client that does not read).
    pub connection_timeout: Duration,
}

impl Default for Limits {
    /// A scraper and a few probes need a handful of connections and answer in milliseconds;
    /// Prometheus' default scrape timeout is 10 s.
    fn default() -> Self {
        Self {
            max_connections: 16,
            header_read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
        }
    }
}

/// First wait after an accept error that is not about one peer.
pub(super) const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// Longest wait between accepts while such errors last.
pub(super) const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The wait before the next accept after a resource error (`EMFILE` and the like): it doubles
/// from [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`] while the errors last and starts over
/// after an accept succeeds.
#[derive(Debug, Default)]
pub(super) struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// The wait after one more failed accept.
    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = self.next.unwrap_or(ACCEPT_BACKOFF_MIN);
        self.next = Some((delay * 2).min(ACCEPT_BACKOFF_MAX));
        delay
    }

    /// An accept succeeded: the next error waits [`ACCEPT_BACKOFF_MIN`] again.
    pub(super) fn reset(&mut self) {
        self.next = None;
    }
}

/// Binds the metrics/health listener (so a bad address fails at start-up).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/active` for one pipeline named `name` with
/// the default [`Limits`] until the task is dropped.
pub async fn serve(listener: TcpListener, name: String, telemetry: Arc<Telemetry>) {
    serve_with(listener, name, telemetry, Limits::default()).await;
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/active` for one pipeline within `limits`
/// until the future is dropped; dropping it also drops the connections being served.
pub async fn serve_with(
    listener: TcpListener,
    name: String,
    telemetry: Arc<Telemetry>,
    limits: Limits,
) {
    serve_pipelines(listener, Arc::new([(name, telemetry)]), limits).await;
}

/// Serves the endpoints for every pipeline of a process: every per-pipeline metric carries a
/// `pipeline` label; `/readyz` is ready when every pipeline is healthy and `/active` when this
/// process streams at least one (each body has a line per pipeline); `/readyz/<pipeline>` and
/// `/active/<pipeline>` answer for one.
pub async fn serve_pipelines(listener: TcpListener, pipelines: Pipelines, limits: Limits) {
    let registry = Arc::new(registry(Arc::clone(&pipelines)));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(false)
        // hyper's smallest; a request head longer than this is refused.
        .max_buf_size(8192);
    loop {
        while connections.try_join_next().is_some() {}
        // A slot first, then the connection: while all slots are taken, new connections stay
        // in the kernel's backlog instead of costing a task each.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return; // the semaphore is never closed
        };
        let socket = accept(&mut || listener.accept(), &mut backoff).await.0;
        let service = {
            let pipelines = Arc::clone(&pipelines);
            let registry = Arc::clone(&registry);
            service_fn(move |request| {
                let response = respond(&pipelines, &registry, &request);
                async move { Ok::<_, std::convert::Infallible>(response) }
            })
        };
        let connection = http.serve_connection(TokioIo::new(socket), service);
        connections.spawn(serve_connection(
            connection,
            limits.connection_timeout,
            slot,
        ));
    }
}

/// Drives one connection until it ends or its deadline passes; the slot frees when this ends.
pub(super) async fn serve_connection<F>(
    connection: F,
    deadline: Duration,
    _slot: OwnedSemaphorePermit,
) where
    F: Future<Output = hyper::Result<()>>,
{
    match tokio::time::timeout(deadline, connection).await {
        Ok(Ok(())) => {}
        // Client errors (a timeout, a malformed request, a reset): nothing to do about them.
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection failed"),
        Err(_) => tracing::debug!(?deadline, "metrics connection dropped at its deadline"),
    }
}

/// Accepts one connection, skipping errors about one peer and waiting [`AcceptBackoff`]'s
/// delay after any other: those (out of descriptors, of memory) would fail again at once.
pub(super) async fn accept<F, Fut, T>(accept: &mut F, backoff: &mut AcceptBackoff) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(accepted) => {
                backoff.reset();
                return accepted;
            }
            Err(e) if is_peer_error(&e) => {
                tracing::debug!(error = %e, "metrics connection lost before it was accepted");
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "metrics endpoint cannot accept a connection; waiting");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// An accept error about the one peer it was accepting (the next accept may well succeed).
pub(super) fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// The answer to a request, by path (method, headers and body are ignored).
pub(super) fn respond<B>(
    pipelines: &[(String, Arc<Telemetry>)],
    registry: &Registry,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let one = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|name| pipelines.iter().find(|(p, _)| p == name))
    };
    let (status, body, kind) = match path {
        "/metrics" => (
            StatusCode::OK,
            render(registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        ),
        "/healthz" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/readyz" => readyz(pipelines.iter()),
        "/active" => active(pipelines.iter()),
        _ => {
            if let Some(p) = one("/readyz/") {
                readyz(std::iter::once(p))
            } else if let Some(p) = one("/active/") {
                active(std::iter::once(p))
            } else {
                (
                    StatusCode::NOT_FOUND,
                    "try /metrics, /healthz, /readyz[/<pipeline>] or /active[/<pipeline>]\n"
                        .to_owned(),
                    "text/plain",
                )
            }
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    response
}

/// 200 when `ok`, else 503.
pub(super) fn status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `/readyz` for some pipelines: 200 when every one is healthy ([`Telemetry::health`]: a
/// standby and a pipeline run elsewhere are); a `name: what it does` line each.
pub(super) fn readyz<'a>(
    pipelines: impl Iterator<Item = &'a (String, Arc<Telemetry>)>,
) -> (StatusCode, String, &'static str) {
    let mut all_healthy = true;
    let mut body = String::new();
    for (name, t) in pipelines {
        let health = t.health();
        all_healthy &= health.healthy;
        body.push_str(&format!("{name}: {}\n", health.line));
    }
    (status(all_healthy), body, "text/plain")
}

/// `/active` for some pipelines: 200 when this process streams at least one of them
/// ([`Role::Active`]), else 503; a `name: role` line each.
pub(super) fn active<'a>(
    pipelines: impl Iterator<Item = &'a (String, Arc<Telemetry>)>,
) -> (StatusCode, String, &'static str) {
    let mut any_active = false;
    let mut body = String::new();
    for (name, t) in pipelines {
        let role = t.role();
        any_active |= role == Role::Active;
        body.push_str(&format!("{name}: {}\n", role.name()));
    }
    (status(any_active), body, "text/plain")
}
