//! The supervisor: preflight once, then stream sessions, reconnecting after transient errors.
//!
//! This module only connects things together and decides when to retry: it takes
//! [`Settings`] resolved once, and the processing logic lives in [`crate::session`].
//!
//! Invariant: every session starts from the slot's confirmed position with a fresh producer, and
//! the previous session's producer is destroyed (its queue purged) before its stream lets the
//! slot go ([`Session::run`]), so a retry — here, or in another process that takes the slot —
//! can duplicate unconfirmed events but can never reorder or skip them. A transient error,
//! at start-up as later, only delays the pipeline: it is retried with backoff.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use walship_postgres::{Relations, ReplicationStream, StartOptions, catalog, management, setup};

use std::sync::atomic::Ordering;

use crate::config::{Config, ConfigError};
use crate::error::Error;
use crate::progress::Progress;
use crate::resume::Resume;
use crate::session::{EventSink, KafkaSink, PgSource, Session};
use crate::settings::{Settings, SourceSettings};
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
/// How often a standby looks whether the slot was released (one small query on one
/// connection): most of a takeover's time after the active process dies.
const STANDBY_POLL: Duration = Duration::from_millis(200);
/// How often a process that lost its claim on a pipeline while cut off from the broker looks
/// for another process waiting for the slot.
const CONTENDER_POLL: Duration = Duration::from_secs(1);
/// How often a standby asks the broker whether it answers, and how long it waits.
const BROKER_PROBE_EVERY: Duration = Duration::from_secs(10);
const BROKER_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Without `[cluster]`: how long nobody may stream a pipeline's slot before it is logged (the
/// longest reconnect delay, 30 s, twice).
pub(crate) const UNOWNED_LOG_AFTER: Duration = Duration::from_secs(60);

/// Runs walship until `shutdown` completes (returns `Ok` after a graceful stop) or a definite
/// error occurs.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (cancel, watcher) = cancel_on(shutdown);
    let result = run_until_cancelled(&config, &cancel).await;
    watcher.abort();
    result
}

/// A token cancelled when `shutdown` completes, and the task that waits for it (abort it when
/// done).
pub(crate) fn cancel_on(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watcher = tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    (cancel, watcher)
}

/// Like [`run`], with cancellation given as a token.
pub async fn run_until_cancelled(config: &Config, cancel: &CancellationToken) -> Result<(), Error> {
    let settings = Settings::resolve(config)?;
    run_settings(&settings, cancel).await
}

/// Like [`run_until_cancelled`], with the configuration already resolved.
pub async fn run_settings(settings: &Settings, cancel: &CancellationToken) -> Result<(), Error> {
    telemetry::process_start_ms();
    let telemetry = Arc::new(Telemetry::default());
    let unowned = tokio::spawn(log_unowned(
        Arc::clone(&telemetry),
        settings.source.slot.clone(),
        UNOWNED_LOG_AFTER,
    ));
    let server = match settings.metrics_listen {
        // A file without [[pipelines]]: its one pipeline is named after its slot.
        Some(addr) => Some(
            metrics_server(
                addr,
                Arc::new([(settings.source.slot.clone(), Arc::clone(&telemetry))]),
            )
            .await?,
        ),
        None => None,
    };
    let result = run_pipeline(settings, cancel, &CancellationToken::new(), &telemetry).await;
    unowned.abort();
    if let Some(server) = server {
        server.abort();
    }
    result
}

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

/// Binds `/metrics`, `/healthz`, `/readyz` and `/active` for `pipelines` and serves them on a
/// task.
pub(crate) async fn metrics_server(
    addr: std::net::SocketAddr,
    pipelines: telemetry::Pipelines,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = telemetry::bind(addr).await.map_err(|e| {
        ConfigError(format!(
            "metrics.listen {addr}: cannot listen ({e}); pick a free address"
        ))
    })?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz and /active");
    Ok(tokio::spawn(telemetry::serve_pipelines(
        listener,
        pipelines,
        telemetry::Limits::default(),
    )))
}

/// One pipeline: the catch-up log line, preflight, then sessions until cancelled or a definite
/// error. `abandon` (with `cancel`) stops it without waiting for acknowledgements.
pub(crate) async fn run_pipeline(
    settings: &Settings,
    cancel: &CancellationToken,
    abandon: &CancellationToken,
    telemetry: &Arc<Telemetry>,
) -> Result<(), Error> {
    let mut background = vec![tokio::spawn(log_catch_up(Arc::clone(telemetry)))];
    let result = supervise(settings, cancel, abandon, telemetry, &mut background).await;
    telemetry.saw_owner();
    for task in background {
        task.abort();
    }
    result
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
        let result = session(settings, cancel, abandon, telemetry, watchdog.as_mut()).await;
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

/// Resolves with a definite error once the slot, the publication or the outbox table is gone
/// (or the slot invalidated). Connection trouble is left to the session to notice. Meanwhile
/// samples the server's WAL position for the lag metric.
async fn watch(source: &SourceSettings, outbox_oid: u32, telemetry: &Telemetry) -> Error {
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

/// A management connection that a background loop (watchdog, standby, contender, owner watch,
/// heartbeat) makes when it first needs it and again after it failed.
struct Lazy<'a> {
    source: &'a SourceSettings,
    /// `application_name` to set after connecting.
    name: Option<String>,
    client: Option<tokio_postgres::Client>,
}

impl<'a> Lazy<'a> {
    fn new(source: &'a SourceSettings) -> Self {
        Lazy {
            source,
            name: None,
            client: None,
        }
    }

    /// One whose connection calls itself `name` (`application_name`).
    fn named(source: &'a SourceSettings, name: String) -> Self {
        Lazy {
            name: Some(name),
            ..Lazy::new(source)
        }
    }

    /// The connection, made now if there is none.
    async fn get(&mut self) -> Result<&tokio_postgres::Client, Error> {
        let client = match self.client.take() {
            Some(client) => client,
            None => {
                let client =
                    management::connect(&self.source.params, self.source.password_bytes()).await?;
                if let Some(name) = &self.name {
                    let name = name.replace('\'', "''");
                    client
                        .batch_execute(&format!("SET application_name = '{name}'"))
                        .await
                        .map_err(|source| walship_postgres::PgError::Sql {
                            context: "naming the connection".into(),
                            source,
                        })?;
                }
                client
            }
        };
        Ok(self.client.insert(client))
    }

    /// Forgets a connection that failed: the next [`Lazy::get`] makes another.
    fn lost(&mut self) {
        self.client = None;
    }
}

/// Waits as a standby while another consumer streams the slot (active-passive: the slot admits
/// one walsender, so it is the lock). Polls the slot every [`STANDBY_POLL`] on one connection;
/// true once it is released (or gone: the next session reports that), false when cancelled.
async fn standby(
    settings: &Settings,
    holder: i32,
    telemetry: &Telemetry,
    cancel: &CancellationToken,
) -> bool {
    let source = &settings.source;
    let since = Instant::now();
    let mut holder = holder;
    telemetry
        .standby_polled_ms
        .store(telemetry::unix_ms(), Ordering::Relaxed);
    telemetry
        .standby_for_pid
        .store(i64::from(holder).max(1), Ordering::Relaxed);
    tracing::info!(
        slot = %source.slot,
        walsender_pid = holder,
        "standby: another consumer streams the slot; this process takes over when it is released"
    );
    let mut catalog = Lazy::named(source, standby_marker(&source.slot));
    // The broker is asked now and then too: a standby that could not publish is not ready.
    let probe = walship_kafka::sink::BrokerProbe::new(&settings.sink).ok();
    let broker = async {
        let Some(probe) = &probe else {
            return std::future::pending().await;
        };
        loop {
            if probe.answers(BROKER_PROBE_TIMEOUT).await {
                telemetry
                    .standby_broker_ms
                    .store(telemetry::unix_ms(), Ordering::Relaxed);
            }
            tokio::time::sleep(BROKER_PROBE_EVERY).await;
        }
    };
    tokio::pin!(broker);
    let released = loop {
        tokio::select! {
            _ = cancel.cancelled() => break false,
            _ = tokio::time::sleep(STANDBY_POLL) => {}
            () = &mut broker => {}
        }
        let Ok(c) = catalog.get().await else { continue };
        let state = catalog::slot_state(c, &source.slot).await;
        if let Ok(found) = &state {
            telemetry
                .standby_polled_ms
                .store(telemetry::unix_ms(), Ordering::Relaxed);
            if let Some(slot) = found {
                telemetry.note_slot(slot);
            }
        }
        match state {
            Ok(Some(state)) => match state.active_pid {
                Some(pid) if pid != holder => {
                    telemetry.saw_owner();
                    tracing::info!(walsender_pid = pid, "standby: the slot changed hands");
                    holder = pid;
                    telemetry
                        .standby_for_pid
                        .store(i64::from(pid).max(1), Ordering::Relaxed);
                }
                Some(_) => telemetry.saw_owner(),
                None => break true,
            },
            Ok(None) => break true,
            Err(_) => catalog.lost(),
        }
    };
    telemetry.standby_for_pid.store(0, Ordering::Relaxed);
    if released {
        tracing::info!(
            slot = %source.slot,
            waited_ms = since.elapsed().as_millis() as u64,
            "the slot was released: taking over"
        );
    }
    released
}

/// What a standby's connection calls itself (`application_name`, at most 63 bytes): how a
/// process that lost its claim on the slot's pipeline sees that another waits for the slot
/// ([`contender`]).
pub(crate) fn standby_marker(slot: &str) -> String {
    let mut marker = format!("walship standby {slot}");
    marker.truncate(63);
    marker
}

/// PIDs of the backends of walship processes waiting for `slot` as standbys
/// ([`standby_marker`] in `pg_stat_activity` of the slot's database), other than `client`'s own.
pub(crate) async fn standbys_waiting(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Vec<i32>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
             AND datname = current_database() AND pid <> pg_backend_pid()",
            &[&standby_marker(slot)],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Resolves once another process waits for the slot as a standby ([`standbys_waiting`]): then
/// a process that lost its claim on the pipeline without being able to hand it over (cut off
/// from the broker) lets the slot go.
pub(crate) async fn contender(source: &SourceSettings) {
    let mut catalog = Lazy::new(source);
    loop {
        tokio::time::sleep(CONTENDER_POLL).await;
        let Ok(c) = catalog.get().await else { continue };
        match standbys_waiting(c, &source.slot).await {
            Ok(pids) if !pids.is_empty() => {
                tracing::info!(
                    slot = %source.slot,
                    standby_pid = pids[0],
                    "another process waits for the slot"
                );
                return;
            }
            Ok(_) => {}
            Err(_) => catalog.lost(),
        }
    }
}

/// Polls the pipeline's slot every `postgres.watch_interval_ms` while another process runs the
/// pipeline, noting when some process streams it ([`Telemetry::saw_owner`]). Never resolves.
pub(crate) async fn watch_owner(source: &SourceSettings, telemetry: &Telemetry) {
    let mut catalog = Lazy::new(source);
    loop {
        if let Ok(c) = catalog.get().await {
            match catalog::slot_state(c, &source.slot).await {
                Ok(Some(state)) => {
                    telemetry.note_slot(&state);
                    if state.active_pid.is_some() {
                        telemetry.saw_owner();
                    }
                }
                Ok(None) => {}
                Err(_) => catalog.lost(),
            }
        }
        tokio::time::sleep(source.watch_interval).await;
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
async fn heartbeat(source: SourceSettings, interval: Duration) {
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
        &telemetry.lineage,
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
        telemetry.lineage.checked();
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
    let sink = KafkaSink::new(settings.sink.clone(), Arc::clone(&progress))?;
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
    let session = Session::new(
        PgSource::new(stream, Some(client)),
        sink,
        Relations::with_scope(
            source.outbox.clone(),
            scope,
            &source.publication,
            &source.slot,
        ),
        settings.router.clone(),
        Arc::clone(&progress),
        settings.session.clone(),
        Arc::clone(telemetry),
        &source.source_id(&system.system_id),
        resume,
    )
    .abandon_on(abandon.clone())
    .silence_limit(wal_sender_timeout)
    .on_server(server.history, &server.server, source.source_epoch);
    let session = match published {
        Some(topics) => session.check_published(topics, start),
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
