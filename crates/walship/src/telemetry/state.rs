//! The per-pipeline record: process-lifetime counters and gauges, the commit→ack histogram, and
//! what they say about health and role.
//!
//! Owns [`Telemetry`] (one per pipeline, shared by its sessions, its progress tracker and the
//! producer's delivery thread) and the rules that turn its values into [`Health`] and [`Role`].
//!
//! Invariant: recording is a few relaxed atomic operations on the hot path, never a lock or an
//! allocation; the values survive reconnects (a new session reuses the same [`Telemetry`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// Malformed W3C trace context values dropped from events (the events were published).
    pub trace_context_dropped: AtomicU64,
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
