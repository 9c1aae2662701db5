//! The exposition: [`Telemetry`]'s atomics encoded as Prometheus metric families at scrape time.
//!
//! Owns the metric names, types, help texts and labels walship serves: every per-pipeline
//! sample carries a `pipeline` label; the process's own metrics ([`super::process`]) none.
//!
//! Invariant: encoding only reads (relaxed loads); a scrape never blocks or slows the relay.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::process;
use super::state::*;

/// The `/metrics` registry: one collector that reads the pipelines' atomics at each scrape.
///
/// Built once per server; the hot path never touches it.
pub(super) fn registry(pipelines: Pipelines) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(TelemetryCollector(pipelines)));
    registry.register_collector(Box::new(process::ProcessCollector));
    registry
}

/// The Prometheus text exposition (format 0.0.4) of `registry`.
pub(super) fn render(registry: &Registry) -> String {
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
pub(super) struct TelemetryCollector(Pipelines);

/// The labels of one pipeline's sample: `pipeline` and `extra`.
pub(super) fn labels<'a>(
    pipeline: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
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
            Kind::Counter,
            "walship_trace_context_dropped",
            "Malformed W3C traceparent or tracestate values left off published events.",
            |t| get(&t.trace_context_dropped) as f64,
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
pub(super) enum Kind {
    Counter,
    Gauge,
}

/// Writes one sample. Counters and most gauges are whole numbers: written as such (`7`, not
/// `7.0`).
pub(super) fn sample(metric: &mut MetricEncoder<'_>, kind: Kind, v: f64) -> fmt::Result {
    match kind {
        Kind::Counter => metric.encode_counter::<NoLabelSet, _, u64>(&(v as u64), None),
        Kind::Gauge if v.fract() == 0.0 && v >= 0.0 => metric.encode_gauge(&(v as u64)),
        Kind::Gauge => metric.encode_gauge(&v),
    }
}

/// Encodes one family with a sample per pipeline (`name` without `_total` for a counter),
/// labelled `pipeline`.
pub(super) fn family(
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
