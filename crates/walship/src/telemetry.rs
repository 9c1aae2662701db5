//! Metrics and health: process-lifetime counters, the commit→ack histogram, and the HTTP
//! endpoints `/metrics` (Prometheus text format 0.0.4), `/healthz` and `/readyz`.
//!
//! Invariant: recording is a few relaxed atomic operations on the hot path, never a lock or an
//! allocation; all formatting happens when a scraper asks. The values survive reconnects: a new
//! session reuses the same [`Telemetry`].
//!
//! ```text
//!  pipeline, progress, run ──(relaxed atomics)──▶ Telemetry
//!                                                     │ read at scrape time
//!  scraper ──TCP──▶ accept loop ──▶ hyper HTTP/1 ──▶ TelemetryCollector ──▶ prometheus-client
//!                   (slot per connection)            (encodes the atomics)   text encoder
//! ```
//!
//! The endpoint must never cost the relay more than a bounded amount, whatever its clients do:
//! - at most [`Limits::max_connections`] connections are served at once; further ones wait in
//!   the kernel's listen backlog until a slot frees (they are not accepted, so they hold no
//!   task, buffer or descriptor of walship's);
//! - a client has [`Limits::header_read_timeout`] from connecting to finish sending its request
//!   head, however it trickles it, and the whole connection (request and response) is dropped
//!   after [`Limits::connection_timeout`]; there is no keep-alive, so no idle connection stays;
//! - an accept error that concerns one peer (reset, aborted) is skipped; any other (`EMFILE`,
//!   `ENFILE`, `ENOBUFS`, ...) would repeat at once, so the loop waits before the next accept,
//!   doubling the wait from 10 ms to 1 s while the errors last (`AcceptBackoff`): never a busy
//!   loop, and at most one warning per wait.
//!
//! HTTP parsing is hyper's, the exposition format prometheus-client's; this module only maps
//! paths to answers and the atomics to metric families.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Upper bounds (seconds) of the commit→ack histogram buckets.
pub const LATENCY_BUCKETS: [f64; 20] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
    2.0, 5.0, 10.0, 30.0, 60.0,
];

/// walship's counters and gauges.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// Events acknowledged by the broker.
    pub events_published: AtomicU64,
    /// Payload + key bytes of acknowledged events.
    pub bytes_published: AtomicU64,
    /// Transactions completed (every event acknowledged), with or without events.
    pub transactions: AtomicU64,
    /// Events handed to the producer and not yet reported (updated by the pipeline).
    pub in_flight: AtomicU64,
    /// Transactions tracked from the oldest unacknowledged one (bounded by
    /// `run.max_pending_transactions`).
    pub pending_transactions: AtomicU64,
    /// The position confirmed to PostgreSQL.
    pub safe_lsn: AtomicU64,
    /// The server's WAL position: `IDENTIFY_SYSTEM`'s at each session start, then sampled every
    /// `postgres.watch_interval_ms` (the stream itself does not carry it: a logical walsender
    /// reports only how far it has decoded).
    pub server_wal_end: AtomicU64,
    /// Commit time (Unix ms) of the newest fully acknowledged transaction with events.
    pub last_acked_commit_ms: AtomicI64,
    /// Delivery failures by class.
    pub errors_transient: AtomicU64,
    /// Records the broker can never accept (bad rows).
    pub errors_record: AtomicU64,
    /// Configuration/permission failures.
    pub errors_fatal: AtomicU64,
    /// Sessions restarted after a transient error.
    pub reconnects: AtomicU64,
    /// Rows sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Events not sent again after a restart because an earlier run had delivered them.
    pub resume_skipped: AtomicU64,
    /// True while a session streams.
    pub streaming: AtomicBool,
    /// The timeline and highest confirmed position of earlier sessions (failover checks).
    pub lineage: crate::failover::Lineage,
    /// Unix ms of the last delivery report (any outcome).
    pub last_delivery_ms: AtomicI64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Telemetry {
    /// Records a transaction whose events are all acknowledged: `now - commit time`.
    pub fn observe_commit_to_ack(&self, commit_ms: i64, now_ms: i64) {
        let secs = (now_ms - commit_ms).max(0) as f64 / 1000.0;
        let idx = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency_buckets[idx].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Counts a failed delivery (or a record the producer refused at once) by its class.
    pub fn count_error(&self, class: walship_kafka::ErrorClass) {
        let counter = match class {
            walship_kafka::ErrorClass::Transient => &self.errors_transient,
            walship_kafka::ErrorClass::Record => &self.errors_record,
            walship_kafka::ErrorClass::Fatal => &self.errors_fatal,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes the slot's consumer is behind the server's WAL.
    pub fn lag_bytes(&self) -> u64 {
        self.server_wal_end
            .load(Ordering::Relaxed)
            .saturating_sub(self.safe_lsn.load(Ordering::Relaxed))
    }

    /// Ready: streaming, and the broker answered recently or nothing is waiting for it.
    pub fn is_ready(&self) -> bool {
        let quiet_broker = self.in_flight.load(Ordering::Relaxed) > 0
            && unix_ms() - self.last_delivery_ms.load(Ordering::Relaxed) > 30_000;
        self.streaming.load(Ordering::Relaxed) && !quiet_broker
    }
}

/// The `/metrics` registry: one collector that reads `telemetry`'s atomics at each scrape.
///
/// Built once per server; the hot path never touches it.
fn registry(telemetry: Arc<Telemetry>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(TelemetryCollector(telemetry)));
    registry
}

/// The Prometheus text exposition (format 0.0.4) of `registry`.
fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Writing to a String fails only if a collector fails, and ours does not.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// Encodes a [`Telemetry`] as metric families when a scraper asks.
///
/// Counters are named without `_total`: the encoder appends it.
#[derive(Debug)]
struct TelemetryCollector(Arc<Telemetry>);

impl Collector for TelemetryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let t = &*self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut encoder,
            "walship_events_published",
            "Outbox events acknowledged by Kafka.",
            get(&t.events_published),
        )?;
        counter(
            &mut encoder,
            "walship_bytes_published",
            "Key and value bytes acknowledged by Kafka.",
            get(&t.bytes_published),
        )?;
        counter(
            &mut encoder,
            "walship_transactions",
            "Committed transactions decoded, with or without outbox events (again after a reconnect).",
            get(&t.transactions),
        )?;
        gauge(
            &mut encoder,
            "walship_in_flight_events",
            "Events handed to the producer and not yet acknowledged.",
            get(&t.in_flight),
        )?;
        gauge(
            &mut encoder,
            "walship_pending_transactions",
            "Transactions tracked from the oldest not yet acknowledged (bounded by run.max_pending_transactions).",
            get(&t.pending_transactions),
        )?;
        gauge(
            &mut encoder,
            "walship_safe_lsn",
            "WAL position confirmed to PostgreSQL (as a number).",
            get(&t.safe_lsn),
        )?;
        gauge(
            &mut encoder,
            "walship_lag_bytes",
            "Bytes of WAL between the server's position (sampled at session start and every postgres.watch_interval_ms) and the confirmed position.",
            t.lag_bytes(),
        )?;
        let last = t.last_acked_commit_ms.load(Ordering::Relaxed);
        let since = if last == 0 {
            0.0
        } else {
            (unix_ms() - last).max(0) as f64 / 1000.0
        };
        gauge(
            &mut encoder,
            "walship_seconds_since_last_acked_commit",
            "Seconds since the commit time of the newest acknowledged transaction with events (0 before the first).",
            since,
        )?;
        counter(
            &mut encoder,
            "walship_reconnects",
            "Sessions restarted after a transient error.",
            get(&t.reconnects),
        )?;
        counter(
            &mut encoder,
            "walship_dead_lettered",
            "Outbox rows published to the dead-letter topic.",
            get(&t.dead_lettered),
        )?;
        counter(
            &mut encoder,
            "walship_resume_skipped",
            "Events not sent again after a restart because an earlier run had delivered them.",
            get(&t.resume_skipped),
        )?;
        gauge(
            &mut encoder,
            "walship_streaming",
            "1 while streaming from the slot.",
            u64::from(t.streaming.load(Ordering::Relaxed)),
        )?;
        let mut errors = encoder.encode_descriptor(
            "walship_delivery_errors",
            "Failed deliveries by class.",
            None,
            MetricType::Counter,
        )?;
        for (class, v) in [
            ("transient", &t.errors_transient),
            ("record", &t.errors_record),
            ("fatal", &t.errors_fatal),
        ] {
            errors
                .encode_family(&[("class", class)])?
                .encode_counter::<NoLabelSet, _, u64>(&get(v), None)?;
        }
        // Per-bucket counts: the encoder makes them cumulative and adds `+Inf` (= count).
        let buckets: [(f64, u64); LATENCY_BUCKETS.len()] =
            std::array::from_fn(|i| (LATENCY_BUCKETS[i], get(&t.latency_buckets[i])));
        let count = buckets.iter().map(|&(_, n)| n).sum::<u64>()
            + get(&t.latency_buckets[LATENCY_BUCKETS.len()]);
        encoder
            .encode_descriptor(
                "walship_commit_to_ack_seconds",
                "Time from a transaction's commit to the acknowledgement of its last event.",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                get(&t.latency_sum_us) as f64 / 1e6,
                count,
                &buckets,
                None,
            )
    }
}

/// Encodes one unlabelled counter (`name` without `_total`).
fn counter(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: u64) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

/// Encodes one unlabelled gauge.
fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: impl prometheus_client::encoding::EncodeGaugeValue,
) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

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
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest wait between accepts while such errors last.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The wait before the next accept after a resource error (`EMFILE` and the like): it doubles
/// from [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`] while the errors last and starts over
/// after an accept succeeds.
#[derive(Debug, Default)]
struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    /// The wait after one more failed accept.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next.unwrap_or(ACCEPT_BACKOFF_MIN);
        self.next = Some((delay * 2).min(ACCEPT_BACKOFF_MAX));
        delay
    }

    /// An accept succeeded: the next error waits [`ACCEPT_BACKOFF_MIN`] again.
    fn reset(&mut self) {
        self.next = None;
    }
}

/// Binds the metrics/health listener (so a bad address fails at start-up).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` with the default [`Limits`] until the task is
/// dropped.
pub async fn serve(listener: TcpListener, telemetry: Arc<Telemetry>) {
    serve_with(listener, telemetry, Limits::default()).await;
}

/// Serves `/metrics`, `/healthz` and `/readyz` within `limits` until the future is dropped;
/// dropping it also drops the connections being served.
pub async fn serve_with(listener: TcpListener, telemetry: Arc<Telemetry>, limits: Limits) {
    let registry = Arc::new(registry(Arc::clone(&telemetry)));
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
            let telemetry = Arc::clone(&telemetry);
            let registry = Arc::clone(&registry);
            service_fn(move |request| {
                let response = respond(&telemetry, &registry, &request);
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
async fn serve_connection<F>(connection: F, deadline: Duration, _slot: OwnedSemaphorePermit)
where
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
async fn accept<F, Fut, T>(accept: &mut F, backoff: &mut AcceptBackoff) -> T
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
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// The answer to a request, by path (method, headers and body are ignored).
fn respond<B>(
    telemetry: &Telemetry,
    registry: &Registry,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let (status, body, kind) = match request.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            render(registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        ),
        "/healthz" => (StatusCode::OK, "ok\n".to_owned(), "text/plain"),
        "/readyz" if telemetry.is_ready() => (StatusCode::OK, "ready\n".to_owned(), "text/plain"),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not streaming or the broker is not answering\n".to_owned(),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "try /metrics, /healthz or /readyz\n".to_owned(),
            "text/plain",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    response
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Bound on every wait for something that should happen.
    const WAIT: Duration = Duration::from_secs(10);

    fn scrape(t: &Arc<Telemetry>) -> String {
        render(&registry(Arc::clone(t)))
    }

    /// One family of a parsed exposition: its type, help and samples (`name{labels}` → value).
    #[derive(Debug, Default)]
    struct Family {
        kind: String,
        help: String,
        samples: BTreeMap<String, f64>,
    }

    /// Parses the Prometheus text format (0.0.4) strictly enough to catch a malformed line, a
    /// sample outside any declared family, or a family declared twice.
    fn parse(text: &str) -> BTreeMap<String, Family> {
        let mut families = BTreeMap::<String, Family>::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(
                    !families.contains_key(name),
                    "{name} declared twice:\n{text}"
                );
                current = name.to_owned();
                families.entry(current.clone()).or_default().help = help.to_owned();
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert_eq!(name, current, "TYPE after another family's HELP");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                families.get_mut(name).expect("HELP before TYPE").kind = kind.to_owned();
            } else {
                let (series, value) = line.rsplit_once(' ').expect("sample: series value");
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
                let name = series.split('{').next().expect("name");
                assert!(
                    name.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                    "{line}"
                );
                if let Some(labels) = series.strip_prefix(name) {
                    assert!(
                        labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                        "{line}"
                    );
                }
                let family = &families[&current];
                let own = match family.kind.as_str() {
                    "histogram" => ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name == format!("{current}{s}")),
                    _ => name == current,
                };
                assert!(own, "{name} is not a sample of {current}:\n{text}");
                families
                    .get_mut(&current)
                    .expect("family")
                    .samples
                    .insert(series.to_owned(), value);
            }
        }
        families
    }

    #[test]
    fn exposition_parses_and_carries_every_value() {
        let t = Arc::new(Telemetry::default());
        t.events_published.store(30, Ordering::Relaxed);
        t.bytes_published.store(4567, Ordering::Relaxed);
        t.transactions.store(31, Ordering::Relaxed);
        t.in_flight.store(2, Ordering::Relaxed);
        t.pending_transactions.store(7, Ordering::Relaxed);
        t.safe_lsn.store(123_456_789, Ordering::Relaxed);
        t.server_wal_end.store(123_456_800, Ordering::Relaxed);
        t.errors_transient.store(1, Ordering::Relaxed);
        t.errors_record.store(2, Ordering::Relaxed);
        t.errors_fatal.store(3, Ordering::Relaxed);
        t.reconnects.store(4, Ordering::Relaxed);
        t.dead_lettered.store(5, Ordering::Relaxed);
        t.resume_skipped.store(6, Ordering::Relaxed);
        t.streaming.store(true, Ordering::Relaxed);
        let text = scrape(&t);
        let families = parse(&text);
        let value = |family: &str, series: &str| families[family].samples[series];
        for (name, kind, v) in [
            ("walship_events_published_total", "counter", 30.0),
            ("walship_bytes_published_total", "counter", 4567.0),
            ("walship_transactions_total", "counter", 31.0),
            ("walship_in_flight_events", "gauge", 2.0),
            ("walship_pending_transactions", "gauge", 7.0),
            ("walship_safe_lsn", "gauge", 123_456_789.0),
            ("walship_lag_bytes", "gauge", 11.0),
            ("walship_seconds_since_last_acked_commit", "gauge", 0.0),
            ("walship_reconnects_total", "counter", 4.0),
            ("walship_dead_lettered_total", "counter", 5.0),
            ("walship_resume_skipped_total", "counter", 6.0),
            ("walship_streaming", "gauge", 1.0),
        ] {
            assert_eq!(families[name].kind, kind, "{name}");
            assert_eq!(value(name, name), v, "{name}");
        }
        let errors = "walship_delivery_errors_total";
        assert_eq!(families[errors].kind, "counter");
        for (class, v) in [("transient", 1.0), ("record", 2.0), ("fatal", 3.0)] {
            assert_eq!(value(errors, &format!("{errors}{{class=\"{class}\"}}")), v);
        }
        assert_eq!(families["walship_commit_to_ack_seconds"].kind, "histogram");
        // The same families, in the same order, with the same help as before prometheus-client.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP "))
            .collect();
        assert_eq!(
            declared,
            [
                "walship_events_published_total Outbox events acknowledged by Kafka.",
                "walship_bytes_published_total Key and value bytes acknowledged by Kafka.",
                "walship_transactions_total Committed transactions decoded, with or without outbox events (again after a reconnect).",
                "walship_in_flight_events Events handed to the producer and not yet acknowledged.",
                "walship_pending_transactions Transactions tracked from the oldest not yet acknowledged (bounded by run.max_pending_transactions).",
                "walship_safe_lsn WAL position confirmed to PostgreSQL (as a number).",
                "walship_lag_bytes Bytes of WAL between the server's position (sampled at session start and every postgres.watch_interval_ms) and the confirmed position.",
                "walship_seconds_since_last_acked_commit Seconds since the commit time of the newest acknowledged transaction with events (0 before the first).",
                "walship_reconnects_total Sessions restarted after a transient error.",
                "walship_dead_lettered_total Outbox rows published to the dead-letter topic.",
                "walship_resume_skipped_total Events not sent again after a restart because an earlier run had delivered them.",
                "walship_streaming 1 while streaming from the slot.",
                "walship_delivery_errors_total Failed deliveries by class.",
                "walship_commit_to_ack_seconds Time from a transaction's commit to the acknowledgement of its last event.",
            ]
        );
    }

    #[test]
    fn histogram_is_cumulative() {
        let t = Arc::new(Telemetry::default());
        t.observe_commit_to_ack(1000, 1003); // 3 ms
        t.observe_commit_to_ack(1000, 1500); // 500 ms
        t.observe_commit_to_ack(1000, 200_000); // beyond the last bucket
        let text = scrape(&t);
        let histogram = &parse(&text)["walship_commit_to_ack_seconds"];
        let bucket = |le: &str| {
            histogram.samples[&format!("walship_commit_to_ack_seconds_bucket{{le=\"{le}\"}}")]
        };
        assert_eq!(bucket("0.002"), 0.0, "{text}");
        assert_eq!(bucket("0.005"), 1.0, "{text}");
        assert_eq!(bucket("0.5"), 2.0, "{text}");
        assert_eq!(bucket("60"), 2.0, "{text}");
        assert_eq!(bucket("+Inf"), 3.0, "{text}");
        assert_eq!(
            histogram.samples["walship_commit_to_ack_seconds_count"],
            3.0
        );
        assert_eq!(
            histogram.samples["walship_commit_to_ack_seconds_sum"],
            199.503
        );
        // Every bound of LATENCY_BUCKETS, written as before (`1`, not `1.0`), then +Inf.
        let les: Vec<String> = histogram
            .samples
            .keys()
            .filter_map(|s| s.strip_prefix("walship_commit_to_ack_seconds_bucket{le=\""))
            .map(|s| s.trim_end_matches("\"}").to_owned())
            .collect();
        let mut expected: Vec<String> = LATENCY_BUCKETS.iter().map(f64::to_string).collect();
        expected.push("+Inf".to_owned());
        let (mut les, mut expected) = (les, expected);
        les.sort();
        expected.sort();
        assert_eq!(les, expected);
    }

    #[test]
    fn lag_and_readiness() {
        let t = Telemetry::default();
        t.server_wal_end.store(500, Ordering::Relaxed);
        t.safe_lsn.store(200, Ordering::Relaxed);
        assert_eq!(t.lag_bytes(), 300);
        assert!(!t.is_ready(), "not streaming");
        t.streaming.store(true, Ordering::Relaxed);
        assert!(t.is_ready());
        t.in_flight.store(5, Ordering::Relaxed);
        t.last_delivery_ms
            .store(unix_ms() - 60_000, Ordering::Relaxed);
        assert!(
            !t.is_ready(),
            "records waiting and no broker answer for a minute"
        );
    }

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_starts_over() {
        let mut backoff = AcceptBackoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(delays[1], ACCEPT_BACKOFF_MIN * 2);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        assert_eq!(delays[9], ACCEPT_BACKOFF_MAX);
        backoff.reset();
        assert_eq!(backoff.next_delay(), ACCEPT_BACKOFF_MIN);
    }

    /// `EMFILE` makes every accept fail at once: the loop waits between attempts (at least the
    /// back-off's delays; a busy loop would make the attempts follow each other at once).
    #[tokio::test]
    async fn accept_errors_wait_instead_of_spinning() {
        let start = tokio::time::Instant::now();
        let mut attempts = Vec::new();
        let mut accept_fn = || {
            attempts.push(start.elapsed());
            let result = match attempts.len() {
                // A peer that went away costs no wait.
                1 => Err(io::Error::from(io::ErrorKind::ConnectionAborted)),
                2..=6 => Err(io::Error::from_raw_os_error(libc::EMFILE)),
                _ => Ok(()),
            };
            std::future::ready(result)
        };
        let mut backoff = AcceptBackoff::default();
        tokio::time::timeout(WAIT, accept(&mut accept_fn, &mut backoff))
            .await
            .expect("accepts after the errors");
        assert_eq!(attempts.len(), 7);
        let mut expected = AcceptBackoff::default();
        for pair in attempts[1..].windows(2) {
            let delay = expected.next_delay();
            assert!(pair[1] - pair[0] >= delay, "{delay:?} between {attempts:?}");
        }
        assert_eq!(
            backoff.next_delay(),
            ACCEPT_BACKOFF_MIN,
            "reset after an accept"
        );
    }

    /// A server on 127.0.0.1 with `limits`, stopped when the returned handle is dropped.
    async fn server(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(serve_with(listener, Arc::new(Telemetry::default()), limits));
        (addr, task)
    }

    /// Reads until the server closes the connection (or resets it), within [`WAIT`].
    async fn read_until_closed(socket: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let read = tokio::time::timeout(WAIT, socket.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "the server kept the connection open for {WAIT:?}"
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get(socket: &mut TcpStream, path: &str) -> String {
        socket
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("send request");
        read_until_closed(socket).await
    }

    #[tokio::test]
    async fn answers_each_path_and_closes() {
        let (addr, _server) = server(Limits::default()).await;
        for (path, status, body) in [
            ("/healthz", "200", "ok\n"),
            ("/readyz", "503", "not ready"),
            ("/nope", "404", "try /metrics"),
            ("/metrics", "200", "walship_events_published_total 0\n"),
        ] {
            let mut socket = TcpStream::connect(addr).await.expect("connect");
            let response = get(&mut socket, path).await;
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status} ")),
                "{path}: {response}"
            );
            let (head, content) = response.split_once("\r\n\r\n").expect("head and body");
            assert!(content.contains(body), "{path}: {response}");
            if path == "/metrics" {
                assert!(head.contains("text/plain; version=0.0.4"), "{head}");
                parse(content);
            }
        }
    }

    /// A client that sends nothing, half a request head, or trickles one forever is
    /// disconnected at the header timeout, without an answer to a request.
    #[tokio::test]
    async fn slow_clients_are_disconnected_at_the_header_timeout() {
        let (addr, _server) = server(Limits {
            header_read_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut half = TcpStream::connect(addr).await.expect("connect");
        half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("send half a request");
        let mut trickle = TcpStream::connect(addr).await.expect("connect");
        let (mut trickle_read, mut trickle_write) = trickle.split();
        let drip = async {
            trickle_write.write_all(b"GET /").await.ok();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            // Stops when the server has closed the connection.
            while trickle_write.write_all(b"a").await.is_ok() {
                tick.tick().await;
            }
        };
        let trickled = tokio::time::timeout(WAIT, async {
            let mut out = Vec::new();
            // Either ends once the server has closed the connection.
            tokio::select! {
                _ = trickle_read.read_to_end(&mut out) => {}
                () = drip => {}
            }
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .expect("the trickling client kept its connection");
        for (client, response) in [
            ("silent", read_until_closed(&mut silent).await),
            ("half", read_until_closed(&mut half).await),
            ("trickle", trickled),
        ] {
            // hyper may say 408 before it closes; it never answers the request.
            assert!(
                response.is_empty() || response.starts_with("HTTP/1.1 408"),
                "{client}: {response}"
            );
        }
    }

    /// The connection deadline holds even when the header timeout is longer.
    #[tokio::test]
    async fn connections_end_at_their_deadline() {
        let (addr, _server) = server(Limits {
            header_read_timeout: Duration::from_secs(60),
            connection_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(read_until_closed(&mut silent).await, "");
    }

    /// With every slot taken, a new connection is not served; it is once a slot frees.
    #[tokio::test]
    async fn connections_beyond_the_limit_wait_for_a_slot() {
        let (addr, _server) = server(Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_secs(60),
            connection_timeout: Duration::from_secs(60),
        })
        .await;
        // Accepted in connection order: these two take the slots.
        let mut first = TcpStream::connect(addr).await.expect("connect");
        let mut second = TcpStream::connect(addr).await.expect("connect");
        let mut waiting = TcpStream::connect(addr).await.expect("connect");
        waiting
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send request");
        let mut byte = [0u8; 1];
        // Showing that something does not happen takes a wait; a served request answers in
        // milliseconds.
        let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut byte)).await;
        assert!(early.is_err(), "a third connection was served: {early:?}");

        // The slot holders are served meanwhile; one finishing frees its slot.
        let response = get(&mut first, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        let response = read_until_closed(&mut waiting).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(response.contains("walship_streaming 0"), "{response}");
        let response = get(&mut second, "/healthz").await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    }
}
