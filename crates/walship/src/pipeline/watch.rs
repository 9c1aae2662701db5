//! What runs beside a pipeline's sessions: the watchdog over slot, publication and table, the
//! heartbeat, and the logs of a pipeline nobody streams or that is catching up.
//!
//! Owns the background loops of one pipeline; each holds at most one management connection
//! ([`super::lazy::Lazy`]) and none can stop the pipeline except the watchdog, with a definite
//! error.
//!
//! Invariant: connection trouble in these loops is never an error of the pipeline: it is
//! retried on the next tick, and the session notices a real outage itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::Instrument;
use walship_postgres::{catalog, management};

use crate::config::settings::SourceSettings;
use crate::error::Error;
use crate::telemetry::Telemetry;

use super::Member;
use super::lazy::Lazy;

/// How often the catch-up line is logged while behind.
const CATCH_UP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Lag above which walship counts as catching up.
const CATCH_UP_LAG_BYTES: u64 = 1 << 20;

/// Without `[cluster]`: how long nobody may stream a pipeline's slot before it is logged (the
/// longest reconnect delay, 30 s, twice).
pub(crate) const UNOWNED_LOG_AFTER: Duration = Duration::from_secs(60);

/// Resolves with a definite error once the slot, the publication or the outbox table is gone
/// (or the slot invalidated). Connection trouble is left to the session to notice. Meanwhile
/// samples the server's WAL position for the lag metric.
pub(super) async fn watch(
    source: &SourceSettings,
    outbox_oid: u32,
    telemetry: &Telemetry,
) -> Error {
    let mut catalog = Lazy::new(source);
    loop {
        tokio::time::sleep(source.watch_interval).await;
        let Ok(c) = catalog.get().await else { continue };
        match catalog::watch(
            c,
            &source.slot,
            &source.publication,
            &source.outbox.table,
            Some(outbox_oid),
        )
        .await
        {
            Ok(watched) => {
                telemetry.note_slot(&watched.slot);
                if let Some(end) = watched.wal_end {
                    telemetry.server_wal_end.store(end.0, Ordering::Relaxed);
                }
            }
            Err(e) if e.is_transient() => catalog.lost(),
            Err(e) => return e.into(),
        }
    }
}

/// [`log_unowned`] for each of `pipelines`, on tasks of their own (abort them when done).
pub(crate) fn watch_unowned(pipelines: &[Member], bound: Duration) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (name, settings, telemetry) in pipelines {
        let span = tracing::info_span!("pipeline", name = %name);
        tasks.spawn(
            log_unowned(Arc::clone(telemetry), settings.source.slot.clone(), bound)
                .instrument(span),
        );
    }
    tasks
}

/// Logs once when nobody has streamed the pipeline's slot for longer than `bound` (as
/// [`Telemetry::unowned_seconds`] tells), and once when somebody does again.
pub(crate) async fn log_unowned(telemetry: Arc<Telemetry>, slot: String, bound: Duration) {
    let mut warned = false;
    let mut ticker = tokio::time::interval(Duration::from_secs(1).max(bound / 10));
    loop {
        ticker.tick().await;
        let unowned = telemetry.unowned_seconds();
        if !warned && unowned > bound.as_secs_f64() {
            warned = true;
            tracing::warn!(
                %slot,
                unowned_s = unowned.round() as u64,
                role = telemetry.role().name(),
                "nobody has streamed this pipeline's slot for {} s: no walship process runs the \
                 pipeline (this one: {}); see walship status and the other processes' logs",
                unowned.round() as u64,
                telemetry.health().line
            );
        } else if warned && unowned < bound.as_secs_f64() / 2.0 {
            warned = false;
            tracing::info!(%slot, "the pipeline's slot is streamed again");
        }
    }
}

/// While behind, logs throughput and lag every [`CATCH_UP_LOG_EVERY`].
pub(super) async fn log_catch_up(telemetry: Arc<Telemetry>) {
    let mut last_events = telemetry.events_published.load(Ordering::Relaxed);
    let mut ticker = tokio::time::interval(CATCH_UP_LOG_EVERY);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let events = telemetry.events_published.load(Ordering::Relaxed);
        let lag = telemetry.lag_bytes();
        if lag > CATCH_UP_LAG_BYTES {
            let rate = (events - last_events) as f64 / CATCH_UP_LOG_EVERY.as_secs_f64();
            tracing::info!(
                events_per_s = rate.round() as u64,
                lag_bytes = lag,
                "catching up"
            );
        }
        last_events = events;
    }
}

/// Writes a non-transactional logical message now and then, so the walsender has WAL to send
/// (and walship a position to confirm) even when this database is quiet.
pub(super) async fn heartbeat(source: SourceSettings, interval: Duration) {
    let mut catalog = Lazy::new(&source);
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let c = match catalog.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("heartbeat: {e}");
                continue;
            }
        };
        if let Err(e) = management::emit_heartbeat(c).await {
            tracing::warn!("heartbeat: {e}");
            catalog.lost();
        }
    }
}
