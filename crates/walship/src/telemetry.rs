//! Metrics and health: process-lifetime counters, the commit→ack histogram, and the HTTP
//! endpoints `/metrics` (Prometheus text format 0.0.4), `/healthz` (the process runs),
//! `/readyz` (every pipeline is healthy: active, standby or run elsewhere) and `/active` (this
//! process streams a pipeline's slot).
//!
//! Invariant: recording is a few relaxed atomic operations on the hot path, never a lock or an
//! allocation; all formatting happens when a scraper asks. The values survive reconnects: a new
//! session reuses the same [`Telemetry`]. Every per-pipeline sample carries a `pipeline` label;
//! the process's own metrics (`process_*`, `walship_build_info`: [`process`]) carry none.
//! "Is it healthy" (`/readyz`) and "is it the active one" (`/active`, `walship_role`) are
//! separate questions, as Patroni's `/health` and `/primary` are: a healthy standby is ready,
//! so a rolling update or a node drain is never held up by the process that waits to take over.
//!
//! ```text
//!  session, progress, run ──(relaxed atomics)──▶ Telemetry
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
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

pub mod process;

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
    /// Events handed to the producer and not yet reported (updated by the session).
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
    /// Commit time (Unix ms) of the newest fully acknowledged transaction with events (0: none
    /// yet).
    pub last_acked_commit_ms: AtomicI64,
    /// Unix ms of the last acknowledgement from the broker (0: none yet): when a transaction's
    /// last event was acknowledged, and at least every 256th acknowledged record.
    pub last_ack_ms: AtomicI64,
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
    /// PID of the walsender of another consumer holding the slot while this process waits to
    /// take over (active-passive); 0 when not waiting.
    pub standby_for_pid: AtomicI64,
    /// Unix ms when a standby last looked at the slot successfully (or began waiting): a standby
    /// that cannot reach PostgreSQL could not take over, so it is not healthy.
    pub standby_polled_ms: AtomicI64,
    /// Unix ms when the broker last answered this pipeline's probe while this process waits as
    /// a standby (0: not yet): a standby whose broker is unreachable could not take over.
    pub standby_broker_ms: AtomicI64,
    /// With `[cluster]`: the process is a member of the group and reaches its coordinator.
    /// Until it is (joining, cut off), a pipeline run `elsewhere` is not a healthy state.
    pub in_group: AtomicBool,
    /// The slot's `wal_status` as this process last read it ([`SLOT_WAL_STATUSES`] index + 1;
    /// 0: not read yet): the watchdog, a standby's polls and `[cluster]`'s owner polls read it.
    pub slot_wal_status: std::sync::atomic::AtomicU8,
    /// The slot's `safe_wal_size` as last read, when [`Telemetry::slot_safe_wal_known`].
    pub slot_safe_wal_bytes: AtomicI64,
    /// False while `safe_wal_size` was not read, or is unlimited (`max_slot_wal_keep_size =
    /// -1`) or lost.
    pub slot_safe_wal_known: AtomicBool,
    /// True while `[cluster]` has this pipeline assigned to another process.
    pub elsewhere: AtomicBool,
    /// Unix ms when this process last saw the pipeline's slot streamed, by itself or by another
    /// process (0: not since it started); see [`Telemetry::unowned_seconds`].
    pub owner_seen_ms: AtomicI64,
    /// The timeline and highest confirmed position of earlier sessions (failover checks).
    pub lineage: crate::failover::Lineage,
    /// Unix ms of the last delivery report (any outcome).
    pub last_delivery_ms: AtomicI64,
    /// Why the pipeline stopped for good (a definite error), when it did: the process keeps
    /// serving its other pipelines.
    pub stopped: std::sync::Mutex<Option<String>>,
    /// Commit → acknowledgement of the transaction's last event.
    pub commit_to_ack: Latency,
    /// walship reading the transaction's first event → acknowledgement of its last: the share
    /// of commit → ack spent in walship and the broker (the rest is PostgreSQL: the WAL flush,
    /// decoding, the walsender's send).
    pub read_to_ack: Latency,
}

/// A latency histogram over [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    /// Records one observation of `us` microseconds (negative counts as 0).
    pub fn observe_us(&self, us: i64) {
        let us = us.max(0) as u64;
        let secs = us as f64 / 1e6;
        let idx = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[idx].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Per-bucket counts (not cumulative), the count including `+Inf`, and the sum in seconds.
    pub(crate) fn snapshot(&self) -> ([(f64, u64); LATENCY_BUCKETS.len()], u64, f64) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let buckets = std::array::from_fn(|i| (LATENCY_BUCKETS[i], get(&self.buckets[i])));
        let count = buckets.iter().map(|&(_, n)| n).sum::<u64>()
            + get(&self.buckets[LATENCY_BUCKETS.len()]);
        (buckets, count, get(&self.sum_us) as f64 / 1e6)
    }
}

/// When this process started (Unix ms): the first call fixes it ([`crate::run`] and
/// [`crate::deployment`] call it before anything starts).
pub fn process_start_ms() -> i64 {
    static STARTED: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *STARTED.get_or_init(unix_ms)
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
        self.commit_to_ack.observe_us((now_ms - commit_ms) * 1000);
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

    /// Notes that the slot is streamed now (by this process or another).
    pub fn saw_owner(&self) {
        self.owner_seen_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// How long, as far as this process saw, nobody has streamed the pipeline's slot: 0 while
    /// this process streams it, else the seconds since it or another process was last seen
    /// streaming it (counted from the process's start when never). The pipeline's owner is the
    /// process whose walsender holds its slot.
    pub fn unowned_seconds(&self) -> f64 {
        self.unowned_seconds_at(unix_ms(), process_start_ms())
    }

    /// [`Telemetry::unowned_seconds`] at `now_ms` for a process started at `started_ms`.
    pub(crate) fn unowned_seconds_at(&self, now_ms: i64, started_ms: i64) -> f64 {
        if self.streaming.load(Ordering::Relaxed) {
            return 0.0;
        }
        let seen = self.owner_seen_ms.load(Ordering::Relaxed).max(started_ms);
        (now_ms - seen).max(0) as f64 / 1000.0
    }

    /// Notes the slot as the catalog has it now: its `wal_status` and `safe_wal_size`.
    pub fn note_slot(&self, slot: &walship_postgres::SlotState) {
        let status = slot
            .wal_status
            .as_deref()
            .and_then(|s| SLOT_WAL_STATUSES.iter().position(|&k| k == s))
            .map_or(0, |i| i as u8 + 1);
        self.slot_wal_status.store(status, Ordering::Relaxed);
        if let Some(bytes) = slot.safe_wal_size {
            self.slot_safe_wal_bytes.store(bytes, Ordering::Relaxed);
        }
        self.slot_safe_wal_known
            .store(slot.safe_wal_size.is_some(), Ordering::Relaxed);
    }

    /// What this process does for its slot now.
    pub fn role(&self) -> Role {
        if self.stopped.lock().is_ok_and(|s| s.is_some()) {
            return Role::Stopped;
        }
        if self.streaming.load(Ordering::Relaxed) {
            Role::Active
        } else if self.elsewhere.load(Ordering::Relaxed) {
            Role::Elsewhere
        } else if self.standby_for_pid.load(Ordering::Relaxed) != 0 {
            Role::Standby
        } else {
            Role::Starting
        }
    }

    /// Whether the pipeline is healthy here, with one line saying what it does (`/readyz`).
    ///
    /// Healthy: active (streaming, and the broker answered within [`BROKER_SILENCE`] or nothing
    /// waits for it), standby (another consumer holds the slot, and this process could look at
    /// it and reach the broker within [`STANDBY_SILENCE`]), or elsewhere (`[cluster]` runs it in
    /// another process, and this one is a member of the group that reaches its coordinator).
    /// Not healthy: starting or reconnecting, stopped by a definite error, the broker silent
    /// while records wait, a standby that cannot reach PostgreSQL.
    pub fn health(&self) -> Health {
        self.health_at(unix_ms())
    }

    /// [`Telemetry::health`] at `now_ms`.
    pub(crate) fn health_at(&self, now_ms: i64) -> Health {
        if let Some(why) = self.stopped.lock().ok().and_then(|s| s.clone()) {
            return Health::unhealthy(format!("stopped: {why}"));
        }
        let silent_for = |since: &AtomicI64| (now_ms - since.load(Ordering::Relaxed)).max(0);
        match self.role() {
            Role::Active => {
                let waiting = self.in_flight.load(Ordering::Relaxed);
                let silent = silent_for(&self.last_delivery_ms);
                if waiting > 0 && silent > BROKER_SILENCE.as_millis() as i64 {
                    Health::unhealthy(format!(
                        "not ready: streaming, but the broker has answered nothing for {} s \
                         while {waiting} records wait for it",
                        silent / 1000
                    ))
                } else {
                    Health::healthy("active: streams the slot".to_owned())
                }
            }
            Role::Standby => {
                let pid = self.standby_for_pid.load(Ordering::Relaxed);
                let silent = silent_for(&self.standby_polled_ms);
                let broker = self.standby_broker_ms.load(Ordering::Relaxed);
                if silent > STANDBY_SILENCE.as_millis() as i64 {
                    Health::unhealthy(format!(
                        "not ready: standby, but it has not been able to look at the slot for \
                         {} s (PostgreSQL unreachable?), so it could not take over",
                        silent / 1000
                    ))
                } else if broker == 0 || now_ms - broker > STANDBY_SILENCE.as_millis() as i64 {
                    Health::unhealthy(if broker == 0 {
                        "not ready: standby, but the broker has not answered it yet, so it could \
                         not take over"
                            .to_owned()
                    } else {
                        format!(
                            "not ready: standby, but the broker has not answered it for {} s \
                             (unreachable, or the Kafka settings are wrong), so it could not \
                             take over",
                            (now_ms - broker) / 1000
                        )
                    })
                } else {
                    Health::healthy(format!(
                        "standby: the slot is streamed by another consumer (walsender PID \
                         {pid}); this process takes over when it is released"
                    ))
                }
            }
            Role::Elsewhere if self.in_group.load(Ordering::Relaxed) => Health::healthy(
                "elsewhere: another process of the cluster runs this pipeline".to_owned(),
            ),
            Role::Elsewhere => Health::unhealthy(
                "not ready: not in the cluster's group (joining it, or cut off from the broker); \
                 the group gives this process nothing meanwhile"
                    .to_owned(),
            ),
            Role::Starting => Health::unhealthy(
                "not ready: starting or reconnecting; not streaming and not a standby yet"
                    .to_owned(),
            ),
            // Returned above, with the error.
            Role::Stopped => Health::unhealthy("stopped".to_owned()),
        }
    }

    /// Healthy (see [`Telemetry::health`]).
    pub fn is_ready(&self) -> bool {
        self.health().healthy
    }
}

/// Longest the broker may stay silent while records wait before an active pipeline counts as
/// unhealthy.
pub const BROKER_SILENCE: Duration = Duration::from_secs(30);
/// Longest a standby may go without looking at the slot before it counts as unhealthy (it polls
/// every 200 ms while PostgreSQL answers).
pub const STANDBY_SILENCE: Duration = Duration::from_secs(30);

/// A pipeline's health in this process: healthy or not, and a line saying what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Ready (`/readyz` 200).
    pub healthy: bool,
    /// What it does, or why it is not healthy; starts with the role (`active:`, `standby:`,
    /// `elsewhere:`) or with `not ready:` / `stopped:`.
    pub line: String,
}

impl Health {
    fn healthy(line: String) -> Self {
        Health {
            healthy: true,
            line,
        }
    }

    fn unhealthy(line: String) -> Self {
        Health {
            healthy: false,
            line,
        }
    }
}

/// The values of `pg_replication_slots.wal_status`, in the order of increasing danger.
pub const SLOT_WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// What a process does for its slot (metric `walship_role`, `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Streams the slot.
    Active,
    /// Another consumer holds the slot; this process takes over once it is released.
    Standby,
    /// Neither yet: starting, or reconnecting after an error.
    Starting,
    /// `[cluster]` assigned the pipeline to another process.
    Elsewhere,
    /// Stopped by a definite error (a process with several pipelines keeps serving the others).
    Stopped,
}

impl Role {
    /// The `role` label value.
    pub fn name(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Starting => "starting",
            Role::Elsewhere => "elsewhere",
            Role::Stopped => "stopped",
        }
    }
}

/// The telemetry of each pipeline a process serves, by name: a `[[pipelines]]` entry's name, or
/// for a file without `[[pipelines]]` its slot's name (`postgres.slot`).
pub type Pipelines = Arc<[(String, Arc<Telemetry>)]>;

/// The `/metrics` registry: one collector that reads the pipelines' atomics at each scrape.
///
/// Built once per server; the hot path never touches it.
fn registry(pipelines: Pipelines) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(TelemetryCollector(pipelines)));
    registry.register_collector(Box::new(process::ProcessCollector));
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
struct TelemetryCollector(Pipelines);

/// The labels of one pipeline's sample: `pipeline` and `extra`.
fn labels<'a>(pipeline: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    std::iter::once(("pipeline", pipeline))
        .chain(extra.iter().copied())
        .collect()
}

impl Collector for TelemetryCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let all = &*self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let e = &mut encoder;
        family(
            e,
            all,
            Kind::Counter,
            "walship_events_published",
            "Outbox events acknowledged by Kafka.",
            |t| get(&t.events_published) as f64,
        )?;
        family(
            e,
            all,
            Kind::Counter,
            "walship_bytes_published",
            "Key and value bytes acknowledged by Kafka.",
            |t| get(&t.bytes_published) as f64,
        )?;
        family(
            e,
            all,
            Kind::Counter,
            "walship_transactions",
            "Committed transactions decoded, with or without outbox events (again after a reconnect).",
            |t| get(&t.transactions) as f64,
        )?;
        family(
            e,
            all,
            Kind::Gauge,
            "walship_in_flight_events",
            "Events handed to the producer and not yet acknowledged.",
            |t| get(&t.in_flight) as f64,
        )?;
        family(
            e,
            all,
            Kind::Gauge,
            "walship_pending_transactions",
            "Transactions tracked from the oldest not yet acknowledged (bounded by run.max_pending_transactions).",
            |t| get(&t.pending_transactions) as f64,
        )?;
        family(
            e,
            all,
            Kind::Gauge,
            "walship_safe_lsn",
            "WAL position confirmed to PostgreSQL (as a number).",
            |t| get(&t.safe_lsn) as f64,
        )?;
        family(
            e,
            all,
            Kind::Gauge,
            "walship_lag_bytes",
            "Bytes of WAL between the server's position (sampled at session start and every postgres.watch_interval_ms) and the confirmed position.",
            |t| t.lag_bytes() as f64,
        )?;
        family(
            e,
            all,
            Kind::Gauge,
            "walship_last_acked_commit_timestamp_seconds",
            "Commit time (Unix seconds) of the newest transaction whose events Kafka has all acknowledged; 0 before the first.",
            |t| t.last_acked_commit_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        )?;
        family(
            e,
            all,
            Kind::Gauge,
            "walship_last_ack_timestamp_seconds",
            "When Kafka last acknowledged a record of this pipeline (Unix seconds); 0 before the first.",
            |t| t.last_ack_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        )?;
        family(
            e,
            all,
            Kind::Counter,
            "walship_reconnects",
            "Sessions restarted after a transient error.",
            |t| get(&t.reconnects) as f64,
        )?;
        family(
            e,
            all,
            Kind::Counter,
            "walship_dead_lettered",
            "Outbox rows published to the dead-letter topic.",
            |t| get(&t.dead_lettered) as f64,
        )?;
        family(
            e,
            all,
            Kind::Counter,
            "walship_resume_skipped",
            "Events not sent again after a restart because an earlier run had delivered them.",
            |t| get(&t.resume_skipped) as f64,
        )?;
        family(
            e,
            all,
            Kind::Gauge,
            "walship_streaming",
            "1 while streaming from the slot.",
            |t| f64::from(u8::from(t.streaming.load(Ordering::Relaxed))),
        )?;
        family(
            e,
            all,
            Kind::Gauge,
            "walship_unowned_seconds",
            "Seconds nobody has streamed the pipeline's slot, as this process saw it (0 while some process streams it; polled every postgres.watch_interval_ms while another process runs it). Alert on the minimum over processes.",
            Telemetry::unowned_seconds,
        )?;
        let mut role = encoder.encode_descriptor(
            "walship_role",
            "1 for this process's role: active (streams the slot), standby (another consumer \
             holds the slot; takes over when it is released), starting (neither yet), elsewhere \
             (with [cluster]: another process runs the pipeline) or stopped (by a definite error).",
            None,
            MetricType::Gauge,
        )?;
        for (pipeline, t) in all {
            let current = t.role();
            for name in [
                Role::Active,
                Role::Standby,
                Role::Starting,
                Role::Elsewhere,
                Role::Stopped,
            ]
            .map(Role::name)
            {
                role.encode_family(&labels(pipeline, &[("role", name)]))?
                    .encode_gauge(&u64::from(current.name() == name))?;
            }
        }
        let mut wal = encoder.encode_descriptor(
            "walship_slot_wal_status",
            "1 for the slot's wal_status as this process last read it (reserved, extended, unreserved: removed at the next checkpoint unless the slot catches up, lost); all 0 before it was read.",
            None,
            MetricType::Gauge,
        )?;
        for (pipeline, t) in all {
            let current = t.slot_wal_status.load(Ordering::Relaxed);
            for (i, name) in SLOT_WAL_STATUSES.iter().enumerate() {
                wal.encode_family(&labels(pipeline, &[("status", name)]))?
                    .encode_gauge(&u64::from(usize::from(current) == i + 1))?;
            }
        }
        let mut safe = encoder.encode_descriptor(
            "walship_slot_safe_wal_size_bytes",
            "The slot's safe_wal_size as this process last read it: bytes of WAL that can still be written before the slot is in danger of invalidation (no sample while unlimited by max_slot_wal_keep_size, or not read yet).",
            None,
            MetricType::Gauge,
        )?;
        for (pipeline, t) in all {
            if t.slot_safe_wal_known.load(Ordering::Relaxed) {
                let bytes = t.slot_safe_wal_bytes.load(Ordering::Relaxed);
                safe.encode_family(&labels(pipeline, &[]))?
                    .encode_gauge(&bytes)?;
            }
        }
        let mut errors = encoder.encode_descriptor(
            "walship_delivery_errors",
            "Failed deliveries by class.",
            None,
            MetricType::Counter,
        )?;
        for (pipeline, t) in all {
            for (class, v) in [
                ("transient", &t.errors_transient),
                ("record", &t.errors_record),
                ("fatal", &t.errors_fatal),
            ] {
                errors
                    .encode_family(&labels(pipeline, &[("class", class)]))?
                    .encode_counter::<NoLabelSet, _, u64>(&get(v), None)?;
            }
        }
        for (name, help, of) in [
            (
                "walship_commit_to_ack_seconds",
                "Time from a transaction's commit to the acknowledgement of its last event.",
                (|t| &t.commit_to_ack) as fn(&Telemetry) -> &Latency,
            ),
            (
                "walship_read_to_ack_seconds",
                "Time from walship reading a transaction's first event to the acknowledgement of its last (walship's and the broker's share of commit to ack).",
                |t| &t.read_to_ack,
            ),
        ] {
            let mut histogram =
                encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (pipeline, t) in all {
                // Per-bucket counts: the encoder makes them cumulative and adds `+Inf` (= count).
                let (buckets, count, sum) = of(t).snapshot();
                histogram
                    .encode_family(&labels(pipeline, &[]))?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

/// Counter or gauge.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// Writes one sample. Counters and most gauges are whole numbers: written as such (`7`, not
/// `7.0`).
fn sample(metric: &mut MetricEncoder<'_>, kind: Kind, v: f64) -> fmt::Result {
    match kind {
        Kind::Counter => metric.encode_counter::<NoLabelSet, _, u64>(&(v as u64), None),
        Kind::Gauge if v.fract() == 0.0 && v >= 0.0 => metric.encode_gauge(&(v as u64)),
        Kind::Gauge => metric.encode_gauge(&v),
    }
}

/// Encodes one family with a sample per pipeline (`name` without `_total` for a counter),
/// labelled `pipeline`.
fn family(
    encoder: &mut DescriptorEncoder<'_>,
    pipelines: &[(String, Arc<Telemetry>)],
    kind: Kind,
    name: &str,
    help: &str,
    value: impl Fn(&Telemetry) -> f64,
) -> fmt::Result {
    let metric_type = match kind {
        Kind::Counter => MetricType::Counter,
        Kind::Gauge => MetricType::Gauge,
    };
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (pipeline, t) in pipelines {
        let set = labels(pipeline, &[]);
        sample(&mut metric.encode_family(&set)?, kind, value(t))?;
    }
    Ok(())
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
fn status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `/readyz` for some pipelines: 200 when every one is healthy ([`Telemetry::health`]: a
/// standby and a pipeline run elsewhere are); a `name: what it does` line each.
fn readyz<'a>(
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
fn active<'a>(
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

#[cfg(test)]
mod tests;
