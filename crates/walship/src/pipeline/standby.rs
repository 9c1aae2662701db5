//! Waiting for the slot: a standby polls until the process that streams it lets it go, and a
//! process cut off from the broker looks for a contender to hand it to.
//!
//! Owns the standby's loop (poll the slot, probe the broker, show readiness), the marker a
//! waiting process sets as its `application_name` so others can count it, and the owner watch
//! of a process that does not stream.
//!
//! Invariant: a standby never opens a stream while the slot is held; it only polls, so the slot
//! stays the lock between processes.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use walship_postgres::catalog;

use crate::config::settings::{Settings, SourceSettings};
use crate::telemetry::{self, Telemetry};

use super::lazy::Lazy;

/// How often a standby looks whether the slot was released (one small query on one
/// connection): most of a takeover's time after the active process dies.
const STANDBY_POLL: Duration = Duration::from_millis(200);

/// How often a process that lost its claim on a pipeline while cut off from the broker looks
/// for another process waiting for the slot.
const CONTENDER_POLL: Duration = Duration::from_secs(1);

/// How often a standby asks the broker whether it answers, and how long it waits.
const BROKER_PROBE_EVERY: Duration = Duration::from_secs(10);
const BROKER_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits as a standby while another consumer streams the slot (active-passive: the slot admits
/// one walsender, so it is the lock). Polls the slot every [`STANDBY_POLL`] on one connection;
/// true once it is released (or gone: the next session reports that), false when cancelled.
pub(super) async fn standby(
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
