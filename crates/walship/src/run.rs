//! The supervisor: preflight once, then stream sessions, reconnecting after transient errors.
//!
//! This module only connects things together and decides when to retry; the processing logic
//! lives in [`crate::pipeline`].
//!
//! Invariant: every session starts from the slot's confirmed position with a fresh producer, and
//! the previous producer is dropped first (which purges its queue), so a retry can duplicate unconfirmed events but
//! can never reorder or skip them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use walship_kafka::{Sink, TopicRouter};
use walship_postgres::replication::ConnectParams;
use walship_postgres::{Relations, ReplicationStream, slot};

use std::sync::atomic::Ordering;

use crate::config::{Config, ConfigError, Secret};
use crate::error::Error;
use crate::pipeline::Session;
use crate::progress::Progress;
use crate::telemetry::{self, Telemetry};

/// Reconnect delays: exponential from `BACKOFF_MIN`, capped at `BACKOFF_MAX`, with full jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that streamed this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// How often the catch-up line is logged while behind.
const CATCH_UP_LOG_EVERY: Duration = Duration::from_secs(10);
/// Lag above which walship counts as catching up.
const CATCH_UP_LAG_BYTES: u64 = 1 << 20;

/// Runs walship until `shutdown` completes (returns `Ok` after a graceful stop) or a definite
/// error occurs.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watcher = tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    let result = run_until_cancelled(&config, &cancel).await;
    watcher.abort();
    result
}

/// Like [`run`], with cancellation given as a token.
pub async fn run_until_cancelled(config: &Config, cancel: &CancellationToken) -> Result<(), Error> {
    let telemetry = Arc::new(Telemetry::default());
    let mut background = Vec::new();
    if let Some(addr) = &config.metrics.listen {
        let addr = addr
            .parse()
            .map_err(|e| ConfigError(format!("metrics.listen {addr:?}: {e}")))?;
        let listener = telemetry::bind(addr).await.map_err(|e| {
            ConfigError(format!(
                "metrics.listen {addr}: cannot listen ({e}); pick a free address"
            ))
        })?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        background.push(tokio::spawn(telemetry::serve(
            listener,
            Arc::clone(&telemetry),
        )));
    }
    background.push(tokio::spawn(log_catch_up(Arc::clone(&telemetry))));
    let result = supervise(config, cancel, &telemetry, &mut background).await;
    for task in background {
        task.abort();
    }
    result
}

/// Preflight once, then sessions until cancelled or a definite error.
async fn supervise(
    config: &Config,
    cancel: &CancellationToken,
    telemetry: &Arc<Telemetry>,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), Error> {
    let password = config.postgres_password()?;
    let params = config.connect_params()?;
    let settings = config.sink_settings()?;
    // One router for the run: its clones in each session share the count of distinct topics,
    // so a reconnect does not reset `outbox.max_topics`.
    let router = config.topic_router()?;
    // Fail fast on a wrong setup: these are definite problems an operator must fix.
    let (start_lsn, outbox_oid) = preflight(config, &params, password.as_ref()).await?;
    tracing::info!(
        slot = %config.postgres.slot,
        publication = %config.postgres.publication,
        table = %config.outbox.table,
        confirmed_lsn = %start_lsn,
        postgres = %params.describe(),
        brokers = %config.kafka.brokers,
        "walship starting"
    );
    if config.postgres.heartbeat_interval_ms > 0 {
        let interval = Duration::from_millis(config.postgres.heartbeat_interval_ms);
        background.push(tokio::spawn(heartbeat(
            params.clone(),
            password.clone(),
            interval,
        )));
    }
    let watchdog = watch(
        config,
        params.clone(),
        password.clone(),
        outbox_oid,
        telemetry,
    );
    tokio::pin!(watchdog);
    let mut attempt: u32 = 0;
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = session(config, &params, password.as_ref(), &settings, &router, cancel, telemetry) => r,
            e = &mut watchdog => Err(e),
        };
        telemetry.streaming.store(false, Ordering::Relaxed);
        // The session's producer is gone: what it held is read again by the next session.
        telemetry.in_flight.store(0, Ordering::Relaxed);
        telemetry.pending_transactions.store(0, Ordering::Relaxed);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() && !cancel.is_cancelled() => {
                if started.elapsed() >= HEALTHY_AFTER {
                    attempt = 0;
                }
                let delay = backoff(attempt);
                attempt = attempt.saturating_add(1);
                telemetry.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, attempt, "transient error; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) if e.is_transient() => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Resolves with a definite error once the slot, the publication or the outbox table is gone
/// (or the slot invalidated). Connection trouble is left to the session to notice. Meanwhile
/// samples the server's WAL position for the lag metric.
async fn watch(
    config: &Config,
    params: ConnectParams,
    password: Option<Secret>,
    outbox_oid: u32,
    telemetry: &Telemetry,
) -> Error {
    let every = Duration::from_millis(config.postgres.watch_interval_ms.max(100));
    let table = config.outbox_spec().table;
    let mut client = None;
    loop {
        tokio::time::sleep(every).await;
        if client.is_none() {
            client = slot::connect(&params, password.as_ref().map(|p| p.expose().as_bytes()))
                .await
                .ok();
        }
        let Some(c) = &client else { continue };
        match slot::watch(
            c,
            &config.postgres.slot,
            &config.postgres.publication,
            &table,
            Some(outbox_oid),
        )
        .await
        {
            Ok(Some(end)) => telemetry.server_wal_end.store(end.0, Ordering::Relaxed),
            Ok(None) => {}
            Err(e) if e.is_transient() => client = None,
            Err(e) => return e.into(),
        }
    }
}

/// While behind, logs throughput and lag every [`CATCH_UP_LOG_EVERY`].
async fn log_catch_up(telemetry: Arc<Telemetry>) {
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
async fn heartbeat(params: ConnectParams, password: Option<Secret>, interval: Duration) {
    let mut client = None;
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        if client.is_none() {
            match slot::connect(&params, password.as_ref().map(|p| p.expose().as_bytes())).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::warn!("heartbeat: {e}");
                    continue;
                }
            }
        }
        if let Some(c) = &client
            && let Err(e) = c
                .execute(
                    "SELECT pg_logical_emit_message(false, 'walship.heartbeat', '')",
                    &[],
                )
                .await
        {
            tracing::warn!("heartbeat: {e}");
            client = None;
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    let jittered = rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64);
    Duration::from_millis(jittered)
}

/// Checks and prepares the database; returns the slot's confirmed position and the outbox
/// table's OID (the watchdog tells a renamed outbox from a dropped one by it).
async fn preflight(
    config: &Config,
    params: &ConnectParams,
    password: Option<&Secret>,
) -> Result<(pgoutput::Lsn, u32), Error> {
    let client = slot::connect(params, password.map(|p| p.expose().as_bytes())).await?;
    slot::check_wal_level(&client).await?;
    let spec = config.outbox_spec();
    let scope = slot::ensure_publication(
        &client,
        &config.postgres.publication,
        &spec.table,
        config.postgres.create_publication,
    )
    .await?;
    crate::failover::prepare(config, params, &client).await?;
    let state = slot::ensure_slot(
        &client,
        &config.postgres.slot,
        config.postgres.create_slot,
        &config.slot_history(),
        config.postgres.failover_slot,
    )
    .await?;
    Ok((
        state.confirmed_flush_lsn.unwrap_or_default(),
        scope.family.root,
    ))
}

/// One streaming session from the slot's confirmed position.
async fn session(
    config: &Config,
    params: &ConnectParams,
    password: Option<&Secret>,
    settings: &walship_kafka::SinkSettings,
    router: &TopicRouter,
    cancel: &CancellationToken,
    telemetry: &Arc<Telemetry>,
) -> Result<(), Error> {
    let pw = password.map(|p| p.expose().as_bytes());
    // Read the confirmed position first: it seeds the tracker so the first status update never
    // reports less than what is already confirmed. A slot that vanished since preflight is a
    // definite error (never re-created silently).
    let client = slot::connect(params, pw).await?;
    crate::failover::before_session(config, params, password, &client, telemetry).await?;
    let state = slot::slot_state(&client, &config.postgres.slot).await?.ok_or_else(|| {
        walship_postgres::PgError::Setup(format!(
            "replication slot {:?} disappeared while walship was running; it will not be re-created \
             automatically because that would skip every event committed since it was dropped. \
             Reconcile the outbox with Kafka, then restart walship to create a new slot",
            config.postgres.slot
        ))
    })?;
    slot::validate_slot(&state)?;
    // Which relations are the outbox (its partitions too), as the catalog has them now; the
    // connection stays open for the rare relation only the catalog can place.
    let spec = config.outbox_spec();
    let scope = slot::outbox_scope(&client, &config.postgres.publication, &spec.table).await?;
    let start = state.confirmed_flush_lsn.unwrap_or_default();

    let progress = Arc::new(Progress::with_telemetry(start, Arc::clone(telemetry)));
    let mut sink = Sink::new(settings.clone(), Arc::clone(&progress)).map_err(|e| {
        // librdkafka echoes rejected property values; never let a secret through.
        let mut text = e.to_string();
        for secret in settings
            .secret_properties
            .values()
            .filter(|v| !v.is_empty())
        {
            text = text.replace(secret.as_str(), "***");
        }
        Error::Producer(text)
    })?;
    let producer_gone = sink.destroyed();
    let publication = format!("\"{}\"", config.postgres.publication.replace('"', "\"\""));
    let options = [
        ("proto_version", "1"),
        ("publication_names", publication.as_str()),
        ("messages", "true"),
    ];
    // The URL's application_name, as on the SQL connections (pg_stat_replication shows it).
    let application_name = params.config.pg.get_application_name().unwrap_or("walship");
    let stream = ReplicationStream::start(
        params,
        pw,
        application_name,
        &config.postgres.slot,
        pgoutput::Lsn::ZERO,
        &options,
    )
    .await?;
    let system = stream.system().clone();
    tracing::info!(from = %start, server_wal = %system.xlogpos, read_batching = stream.reads_batched(), "streaming");
    let mut session = Session::new(
        stream,
        Relations::with_scope(
            spec,
            scope,
            &config.postgres.publication,
            &config.postgres.slot,
        ),
        router.clone(),
        sink,
        Arc::clone(&progress),
        config.status_interval(),
        config.shutdown_timeout(),
        config.run.max_in_flight_events,
        Arc::clone(telemetry),
    );
    session.catalog = Some(client);
    session.message_prefixes = config.outbox.message_prefixes.clone();
    session.max_pending = config.run.max_pending_transactions.max(2);
    session.source = Arc::from(format!("{}/{}", system.system_id, config.postgres.slot));
    // Events committed before the server's current WAL position may have reached Kafka in an
    // earlier run that stopped before confirming them.
    if config.run.resume_dedup && start < system.xlogpos {
        session.resume = Some(crate::resume::Resume::new(
            settings.clone(),
            session.source.to_string(),
            start,
            system.xlogpos,
        ));
    }
    if config.outbox.on_bad_row == crate::config::BadRowPolicy::DeadLetter {
        session.dead_letter_topic = Some(config.outbox.dead_letter_topic.clone());
        progress.enable_dead_letter();
    }
    // Readiness measures the broker's silence from here, not from an earlier session.
    telemetry
        .last_delivery_ms
        .store(telemetry::unix_ms(), Ordering::Relaxed);
    telemetry.streaming.store(true, Ordering::Relaxed);
    telemetry.safe_lsn.store(start.0, Ordering::Relaxed);
    telemetry
        .server_wal_end
        .store(system.xlogpos.0, Ordering::Relaxed);
    let result = session.run(cancel).await.map(|_| ());
    // The session's producer is destroyed on the blocking pool: the next session starts only
    // once its queue is purged, so its records can never overtake the next session's.
    producer_gone.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_MAX, "{d:?}");
            assert!(d >= BACKOFF_MIN / 2, "{d:?}");
        }
        assert!(backoff(20) >= BACKOFF_MAX / 2);
    }
}
