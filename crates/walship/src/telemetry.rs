//! Metrics and health: process-lifetime counters, the commit→ack histogram, and the HTTP
//! endpoints `/metrics` (Prometheus text format), `/healthz` and `/readyz`.
//!
//! Invariant: recording is a few relaxed atomic operations on the hot path, never a lock or an
//! allocation; all formatting happens when a scraper asks. The values survive reconnects: a new
//! session reuses the same [`Telemetry`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

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

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        metric(
            "walship_events_published_total",
            "counter",
            "Outbox events acknowledged by Kafka.",
            get(&self.events_published),
        );
        metric(
            "walship_bytes_published_total",
            "counter",
            "Key and value bytes acknowledged by Kafka.",
            get(&self.bytes_published),
        );
        metric(
            "walship_transactions_total",
            "counter",
            "Committed transactions decoded, with or without outbox events (again after a reconnect).",
            get(&self.transactions),
        );
        metric(
            "walship_in_flight_events",
            "gauge",
            "Events handed to the producer and not yet acknowledged.",
            get(&self.in_flight),
        );
        metric(
            "walship_pending_transactions",
            "gauge",
            "Transactions tracked from the oldest not yet acknowledged (bounded by run.max_pending_transactions).",
            get(&self.pending_transactions),
        );
        metric(
            "walship_safe_lsn",
            "gauge",
            "WAL position confirmed to PostgreSQL (as a number).",
            get(&self.safe_lsn),
        );
        metric(
            "walship_lag_bytes",
            "gauge",
            "Bytes of WAL between the server's position (sampled at session start and every postgres.watch_interval_ms) and the confirmed position.",
            self.lag_bytes() as f64,
        );
        let last = self.last_acked_commit_ms.load(Ordering::Relaxed);
        let since = if last == 0 {
            0.0
        } else {
            (unix_ms() - last).max(0) as f64 / 1000.0
        };
        metric(
            "walship_seconds_since_last_acked_commit",
            "gauge",
            "Seconds since the commit time of the newest acknowledged transaction with events (0 before the first).",
            since,
        );
        metric(
            "walship_reconnects_total",
            "counter",
            "Sessions restarted after a transient error.",
            get(&self.reconnects),
        );
        metric(
            "walship_dead_lettered_total",
            "counter",
            "Outbox rows published to the dead-letter topic.",
            get(&self.dead_lettered),
        );
        metric(
            "walship_resume_skipped_total",
            "counter",
            "Events not sent again after a restart because an earlier run had delivered them.",
            get(&self.resume_skipped),
        );
        metric(
            "walship_streaming",
            "gauge",
            "1 while streaming from the slot.",
            f64::from(u8::from(self.streaming.load(Ordering::Relaxed))),
        );
        let _ = writeln!(
            out,
            "# HELP walship_delivery_errors_total Failed deliveries by class.\n# TYPE walship_delivery_errors_total counter"
        );
        for (class, v) in [
            ("transient", &self.errors_transient),
            ("record", &self.errors_record),
            ("fatal", &self.errors_fatal),
        ] {
            let _ = writeln!(
                out,
                "walship_delivery_errors_total{{class=\"{class}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP walship_commit_to_ack_seconds Time from a transaction's commit to the acknowledgement of its last event.\n\
             # TYPE walship_commit_to_ack_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "walship_commit_to_ack_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.latency_buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "walship_commit_to_ack_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            out,
            "walship_commit_to_ack_seconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "walship_commit_to_ack_seconds_count {cumulative}");
        out
    }
}

/// Binds the metrics/health listener (so a bad address fails at start-up).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(listener: TcpListener, telemetry: Arc<Telemetry>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let telemetry = Arc::clone(&telemetry);
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut len = 0;
            // Read the request head (we ignore headers and bodies).
            while len < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    socket.read(&mut buf[len..]),
                )
                .await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") || buf[..len].contains(&b'\n') {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let (status, body, kind) = match path {
                "/metrics" => ("200 OK", telemetry.render(), "text/plain; version=0.0.4"),
                "/healthz" => ("200 OK", "ok\n".to_owned(), "text/plain"),
                "/readyz" if telemetry.is_ready() => ("200 OK", "ready\n".to_owned(), "text/plain"),
                "/readyz" => (
                    "503 Service Unavailable",
                    "not ready: not streaming or the broker is not answering\n".to_owned(),
                    "text/plain",
                ),
                _ => (
                    "404 Not Found",
                    "try /metrics, /healthz or /readyz\n".to_owned(),
                    "text/plain",
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let t = Telemetry::default();
        t.observe_commit_to_ack(1000, 1003); // 3 ms
        t.observe_commit_to_ack(1000, 1500); // 500 ms
        t.observe_commit_to_ack(1000, 200_000); // beyond the last bucket
        let text = t.render();
        assert!(
            text.contains("walship_commit_to_ack_seconds_bucket{le=\"0.002\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("walship_commit_to_ack_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("walship_commit_to_ack_seconds_bucket{le=\"0.5\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("walship_commit_to_ack_seconds_bucket{le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("walship_commit_to_ack_seconds_count 3"),
            "{text}"
        );
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
}
