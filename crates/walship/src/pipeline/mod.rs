//! One pipeline in this process: preflight once, then stream sessions, reconnecting after
//! transient errors, waiting as a standby while another process holds the slot.
//!
//! Owns the life of one pipeline between "this process should run it" and "stopped": the
//! preflight (publication, slot, failover settings), each session's start (the position, the
//! topics to read back after a promotion, the producer, the stream), the reconnect backoff,
//! and how its end is reported ([`failure`], [`note_stopped`]). What it waits on beside the
//! session lives in [`standby`] (another process streams the slot) and [`watch`] (the
//! watchdog, heartbeats, the unowned and catch-up logs); [`lazy`] is their management
//! connection. The processing logic lives in [`crate::session`].
//!
//! Invariant: every session starts from the slot's confirmed position with a fresh producer, and
//! the previous session's producer is destroyed (its queue purged) before its stream lets the
//! slot go ([`Session::run`]), so a retry — here, or in another process that takes the slot —
//! can duplicate unconfirmed events but can never reorder or skip them. A transient error,
//! at start-up as later, only delays the pipeline: it is retried with backoff.

pub(crate) mod lazy;
pub(crate) mod membership;
pub(crate) mod standby;
pub(crate) mod watch;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use walship_postgres::{Relations, ReplicationStream, StartOptions, catalog, management, setup};

use crate::config::settings::{Settings, SourceSettings};
use crate::error::Error;
use crate::failover::Lineage;
use crate::session::progress::Progress;
use crate::session::resume::Resume;
use crate::session::{EventSink, KafkaSink, PgSource, Session, SessionParts};
use crate::telemetry::{self, Telemetry};

use standby::standby;
use watch::{UNOWNED_LOG_AFTER, heartbeat, log_catch_up, watch, watch_unowned};

/// Reconnect delays: exponential from `BACKOFF_MIN`, capped at `BACKOFF_MAX`, with full jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(200);

const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A session that streamed this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// One pipeline of a deployment: its name, settings and telemetry.
pub type Member = (String, Settings, Arc<Telemetry>);

/// `name: error` for a pipeline task that ended with one.
pub(crate) fn failure(
    joined: Result<(String, Result<(), Error>), tokio::task::JoinError>,
) -> Option<String> {
    match joined {
        Ok((_, Ok(()))) => None,
        Ok((name, Err(e))) => Some(format!("{name}: {e}")),
        Err(e) => Some(format!("a pipeline task ended abnormally: {e}")),
    }
}

/// Logs a pipeline's definite error and shows it on `/readyz` (the process keeps serving its
/// other pipelines).
pub(crate) fn note_stopped(telemetry: &Telemetry, result: &Result<(), Error>) {
    if let Err(e) = result {
        tracing::error!("pipeline stopped: {e}");
        if let Ok(mut stopped) = telemetry.stopped.lock() {
            *stopped = Some(e.to_string());
        }
    }
}

/// One pipeline: the catch-up log line, preflight, then sessions until cancelled or a definite
/// error. `abandon` (with `cancel`) stops it without waiting for acknowledgements. `telemetry`
/// and `lineage` outlive the call: a pipeline this process runs again (`[cluster]`) keeps its
/// counters and what it knows of the server's timelines.
pub(crate) async fn run_pipeline(
    settings: &Settings,
    cancel: &CancellationToken,
    abandon: &CancellationToken,
    telemetry: &Arc<Telemetry>,
    lineage: &Arc<Lineage>,
) -> Result<(), Error> {
    let mut background = vec![tokio::spawn(log_catch_up(Arc::clone(telemetry)))];
    let result = supervise(
        settings,
        cancel,
        abandon,
        telemetry,
        lineage,
        &mut background,
    )
    .await;
    telemetry.saw_owner();
    for task in background {
        task.abort();
    }
    result
}

/// Runs every pipeline on a task of its own until each has ended; returns those that stopped
/// with a definite error (`name: error`).
pub(crate) async fn run_all(pipelines: Vec<Member>, cancel: &CancellationToken) -> Vec<String> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut watchers = watch_unowned(&pipelines, UNOWNED_LOG_AFTER);
    for (name, settings, telemetry) in pipelines {
        let cancel = cancel.clone();
        let span = tracing::info_span!("pipeline", name = %name);
        tasks.spawn(
            async move {
                let lineage = Arc::new(Lineage::default());
                let result = run_pipeline(
                    &settings,
                    &cancel,
                    &CancellationToken::new(),
                    &telemetry,
                    &lineage,
                )
                .await;
                note_stopped(&telemetry, &result);
                (name, result)
            }
            .instrument(span),
        );
    }
    let mut failed = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        failed.extend(failure(joined));
    }
    watchers.abort_all();
    failed
}

/// Waits out a reconnect delay after `error`; false when cancelled meanwhile.
async fn back_off(
    error: &Error,
    attempt: &mut u32,
    telemetry: &Telemetry,
    cancel: &CancellationToken,
    what: &str,
) -> bool {
    let delay = backoff(*attempt);
    *attempt = attempt.saturating_add(1);
    telemetry.reconnects.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, attempt = *attempt, "{what}");
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Preflight (retried while its errors are transient), then sessions until cancelled or a
/// definite error.
async fn supervise(
    settings: &Settings,
    cancel: &CancellationToken,
    abandon: &CancellationToken,
    telemetry: &Arc<Telemetry>,
    lineage: &Arc<Lineage>,
    background: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), Error> {
    let source = &settings.source;
    // A definite problem (a wrong setup an operator must fix) stops the pipeline at once; a
    // transient one (the database down or starting, no read-write host yet, too many
    // connections) only delays it.
    let mut attempt: u32 = 0;
    let (start_lsn, outbox_oid) = loop {
        match preflight(source).await {
            Ok(found) => break found,
            Err(e) if e.is_transient() => {
                if !back_off(
                    &e,
                    &mut attempt,
                    telemetry,
                    cancel,
                    "cannot start yet; retrying",
                )
                .await
                {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(
        slot = %source.slot,
        publication = %source.publication,
        table = %source.outbox.table,
        confirmed_lsn = %start_lsn,
        postgres = %source.params.describe(),
        brokers = %settings.sink.brokers,
        "walship starting"
    );
    if let Some(interval) = source.heartbeat {
        background.push(tokio::spawn(heartbeat(source.clone(), interval)));
    }
    let watchdog = watch(source, outbox_oid, telemetry);
    tokio::pin!(watchdog);
    attempt = 0;
    loop {
        let started = Instant::now();
        let result = session(
            settings,
            cancel,
            abandon,
            telemetry,
            lineage,
            watchdog.as_mut(),
        )
        .await;
        if telemetry.streaming.swap(false, Ordering::Relaxed) {
            telemetry.saw_owner();
        }
        // The session's producer is gone: what it held is read again by the next session.
        telemetry.in_flight.store(0, Ordering::Relaxed);
        telemetry.pending_transactions.store(0, Ordering::Relaxed);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if !cancel.is_cancelled() && e.slot_holder().is_some() => {
                let holder = e.slot_holder().unwrap_or_default();
                if !standby(settings, holder, telemetry, cancel).await {
                    return Ok(());
                }
                attempt = 0;
            }
            Err(e) if e.is_transient() && !cancel.is_cancelled() => {
                if started.elapsed() >= HEALTHY_AFTER {
                    attempt = 0;
                }
                if !back_off(
                    &e,
                    &mut attempt,
                    telemetry,
                    cancel,
                    "transient error; reconnecting",
                )
                .await
                {
                    return Ok(());
                }
            }
            Err(e) if e.is_transient() => return Ok(()),
            Err(e) => return Err(e),
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
async fn preflight(source: &SourceSettings) -> Result<(pgoutput::Lsn, u32), Error> {
    let client = management::connect(&source.params, source.password_bytes()).await?;
    catalog::check_wal_level(&client).await?;
    let scope = setup::ensure_publication(
        &client,
        &source.publication,
        &source.outbox.table,
        source.create_publication,
    )
    .await?;
    crate::failover::prepare(source, &client).await?;
    let state = setup::ensure_slot(
        &client,
        &source.slot,
        source.create_slot,
        &source.history,
        source.failover_slot,
    )
    .await?;
    // A walship that may create its slot relies on the slot history never to re-create a
    // dropped one (G6): say at every start when that protection is off, not only once.
    if source.create_slot {
        match setup::unprotected_slot(&client, &source.history, &source.slot).await {
            Ok(Some(off)) => {
                tracing::warn!(slot = %source.slot, "{}; fix: {}", off.message, off.fix)
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                slot = %source.slot,
                "cannot tell whether the slot history protects the slot: {e}"
            ),
        }
    }
    Ok((
        state.confirmed_flush_lsn.unwrap_or_default(),
        scope.family.root,
    ))
}

/// One streaming session from the slot's confirmed position. When `watchdog` reports a
/// problem, the session is stopped as on a shutdown (its producer silent before the stream is
/// let go) and the watchdog's error is returned.
async fn session(
    settings: &Settings,
    cancel: &CancellationToken,
    abandon: &CancellationToken,
    telemetry: &Arc<Telemetry>,
    lineage: &Arc<Lineage>,
    watchdog: std::pin::Pin<&mut impl Future<Output = Error>>,
) -> Result<(), Error> {
    let source = &settings.source;
    // Read the confirmed position first: it seeds the tracker so the first status update never
    // reports less than what is already confirmed. A slot that vanished since preflight is a
    // definite error (never re-created silently).
    let client = management::connect(&source.params, source.password_bytes()).await?;
    let server = crate::failover::before_session(
        source,
        &client,
        lineage,
        pgoutput::Lsn(telemetry.safe_lsn.load(Ordering::Relaxed)),
    )
    .await?;
    let state = catalog::slot_state(&client, &source.slot).await?.ok_or_else(|| {
        walship_postgres::PgError::Setup(format!(
            "replication slot {:?} disappeared while walship was running; it will not be re-created \
             automatically because that would skip every event committed since it was dropped. \
             Reconcile the outbox with Kafka, then restart walship to create a new slot",
            source.slot
        ))
    })?;
    catalog::validate_slot(&state)?;
    if let Some(pid) = state.active_pid {
        return Err(Error::SlotInUse {
            slot: source.slot.clone(),
            pid,
        });
    }
    // Which relations are the outbox (its partitions too), as the catalog has them now; the
    // connection stays open for the rare relation only the catalog can place.
    let scope = catalog::outbox_scope(&client, &source.publication, &source.outbox.table).await?;
    let wal_sender_timeout = catalog::wal_sender_timeout(&client).await?;
    let start = state.confirmed_flush_lsn.unwrap_or_default();
    // After a promotion: the topics that may hold this source's events, read back before the
    // first record (listed now, while the slot is not held yet).
    let published = if !server.check_published {
        None
    } else if !settings.session.resume_dedup {
        lineage.checked();
        tracing::warn!(
            server = %server.server,
            "after a promotion walship reads its topics back to make sure Kafka holds nothing \
             this server lacks, but run.resume_dedup = false: not checked"
        );
        None
    } else {
        let all = walship_kafka::sink::list_topics(&settings.sink)
            .await
            .map_err(|e| Error::PublishedUnread {
                what: format!("listing the topics on {}", settings.sink.brokers),
                error: e.to_string(),
                denied: false,
            })?;
        let dead_letter = settings.session.dead_letter_topic.as_deref();
        // Kafka's internal topics (`__consumer_offsets`, …) never hold events.
        Some(
            all.into_iter()
                .filter(|t| {
                    !t.starts_with("__")
                        && (settings.router.could_route_to(t) || Some(t.as_str()) == dead_letter)
                })
                .collect::<Vec<_>>(),
        )
    };

    let progress = Arc::new(Progress::with_telemetry(start, Arc::clone(telemetry)));
    let sink = KafkaSink::new(
        &settings.producers,
        settings.sink.clone(),
        Arc::clone(&progress),
    )?;
    let options = StartOptions::new(&source.publication);
    // The URL's application_name, as on the SQL connections (pg_stat_replication shows it).
    let application_name = source
        .params
        .config
        .pg
        .get_application_name()
        .unwrap_or("walship");
    let stream = ReplicationStream::start(
        &source.params,
        source.password_bytes(),
        application_name,
        &source.slot,
        pgoutput::Lsn::ZERO,
        &options.pairs(),
    )
    .await;
    let stream = match stream {
        Ok(stream) => stream,
        Err(e) => {
            // Nothing was sent; the producer is still destroyed before the next one starts.
            sink.close().await;
            return Err(e.into());
        }
    };
    let system = stream.system().clone();
    tracing::info!(from = %start, server_wal = %system.xlogpos, read_batching = stream.reads_batched(), "streaming");
    // Events committed before the server's current WAL position may have reached Kafka in an
    // earlier run that stopped before confirming them.
    let resume = (settings.session.resume_dedup && start < system.xlogpos)
        .then(|| Resume::new(start, system.xlogpos));
    let session = Session::new(SessionParts {
        source: PgSource::new(stream, Some(client)),
        sink,
        relations: Relations::with_scope(
            source.outbox.clone(),
            scope,
            &source.publication,
            &source.slot,
        ),
        router: settings.router.clone(),
        progress: Arc::clone(&progress),
        settings: settings.session.clone(),
        telemetry: Arc::clone(telemetry),
        source_id: source.source_id(&system.system_id),
        resume,
    })
    .abandon_on(abandon.clone())
    .silence_limit(wal_sender_timeout)
    .on_server(server.history, &server.server, source.source_epoch);
    let session = match published {
        Some(topics) => session.check_published(topics, start, Arc::clone(lineage)),
        None => session,
    };
    // Readiness measures the broker's silence from here, not from an earlier session.
    telemetry
        .last_delivery_ms
        .store(telemetry::unix_ms(), Ordering::Relaxed);
    telemetry.streaming.store(true, Ordering::Relaxed);
    telemetry.safe_lsn.store(start.0, Ordering::Relaxed);
    telemetry
        .server_wal_end
        .store(system.xlogpos.0, Ordering::Relaxed);
    let stop = cancel.child_token();
    let run = session.run(&stop);
    tokio::pin!(run);
    tokio::select! {
        result = &mut run => result.map(|_| ()),
        error = watchdog => {
            // Stopped like a shutdown, so its producer is silent before the slot is let go.
            stop.cancel();
            let _ = run.await;
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests;
