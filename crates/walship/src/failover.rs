//! Following a failover: the wiring between `postgres.failover_slot`, the start-up, each session
//! and `walship check`. This module only gathers facts and hands them to the rules in
//! [`walship_postgres::failover`] (which say what is normal and what is fatal, and why).
//!
//! ```text
//!  start-up ── prepare: version ≥ 17, failover on for an existing slot, warnings ──▶ ensure_slot
//!  session  ── before_session: timeline changed since the last session? ──▶ verify_continuity
//!  check    ── checks: the primary's settings, then every other host of postgres.url
//! ```
//!
//! Invariant: what walship remembers between sessions ([`Lineage`]: the timeline and the highest
//! position it confirmed) only grows within a timeline, so a promoted server is always compared
//! with everything Kafka may hold.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use pgoutput::Lsn;
use tokio_postgres::Client;
use walship_postgres::failover::{
    self, Continuity, Finding, Level, PrimaryFacts, SessionFacts, StandbyFacts, Streamed,
};
use walship_postgres::replication::ConnectParams;
use walship_postgres::{ConnectConfig, hosts, management};

use crate::check::{Check, Status};
use crate::config::{Config, Secret};
use crate::error::Error;
use crate::settings::SourceSettings;
use crate::telemetry::Telemetry;

/// How long `check` waits for each other host of `postgres.url`.
const STANDBY_TIMEOUT: Duration = Duration::from_secs(10);

/// What walship remembers about the server it streamed from, across sessions of one process.
#[derive(Debug, Default)]
pub struct Lineage {
    timeline: AtomicU32,
    confirmed: AtomicU64,
}

impl Lineage {
    /// Folds in the position the last session confirmed, and returns what to compare with.
    fn update(&self, confirmed: Lsn) -> Streamed {
        let high = self.confirmed.fetch_max(confirmed.0, Ordering::Relaxed);
        Streamed {
            timeline: self.timeline.load(Ordering::Relaxed),
            confirmed: Lsn(high.max(confirmed.0)),
        }
    }
}

fn pw(password: Option<&Secret>) -> Option<&[u8]> {
    password.map(|p| p.expose().as_bytes())
}

/// At start-up, before the slot is ensured (which creates a missing one with failover on): with
/// `postgres.failover_slot`, refuses a server older than 17 and warns about what a failover
/// would lack.
pub(crate) async fn prepare(source: &SourceSettings, client: &Client) -> Result<(), Error> {
    let params = &source.params;
    let slot_name = source.slot.as_str();
    let info = failover::server_info(client).await?;
    let hosts = params.endpoints().len();
    if !source.failover_slot {
        if hosts > 1 {
            tracing::warn!(
                "postgres.url lists {hosts} hosts to follow a failover, but postgres.failover_slot \
                 is false: a promoted standby will have no slot {slot_name:?}, and walship stops \
                 there (set postgres.failover_slot = true on PostgreSQL 17+)"
            );
        }
        return Ok(());
    }
    failover::require_support(&info, &info.address)?;
    let settings = failover::settings(client).await?;
    let physical = failover::physical_slots(client).await?;
    let facts = PrimaryFacts {
        server: &info.address,
        info: &info,
        settings: &settings,
        physical: &physical,
        slot: None,
        slot_name,
        hosts,
    };
    for f in failover::primary_findings(true, &facts) {
        if f.level != Level::Pass {
            tracing::warn!(
                check = %f.name,
                "{} (fix: {}); walship streams anyway, `walship check` lists every failover setting",
                f.message,
                f.fix.unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// At the start of every session, on its SQL connection, before the stream takes the slot: if
/// the server's timeline changed since the last session, walship followed a promotion, and
/// [`failover::verify_continuity`] decides whether it may continue there. With
/// `postgres.failover_slot`, turns failover on for a slot that has it off (the slot must be free,
/// which it is between sessions).
pub(crate) async fn before_session(
    source: &SourceSettings,
    client: &Client,
    telemetry: &Telemetry,
) -> Result<(), Error> {
    let (params, password) = (&source.params, source.password.as_ref());
    let lineage = &telemetry.lineage;
    let before = lineage.update(Lsn(telemetry.safe_lsn.load(Ordering::Relaxed)));
    let info = failover::server_info(client).await?;
    let Some(timeline) = info.timeline else {
        // A standby (a one-host URL pointing at one): the session fails on its own.
        return Ok(());
    };
    if before.timeline != 0 && before.timeline != timeline {
        let slot_name = source.slot.as_str();
        let history = failover::timeline_history(params, pw(password), timeline).await?;
        let slot = failover::slot(client, slot_name).await?;
        let facts = SessionFacts {
            server: &info.address,
            major: info.major,
            timeline,
            history: &history,
            slot: slot.as_ref(),
            slot_name,
        };
        if let Continuity::Promoted {
            from,
            to,
            switch,
            slot_confirmed,
            confirmed,
        } = failover::verify_continuity(before, &facts)?
        {
            tracing::warn!(
                server = %info.address,
                from_timeline = from,
                timeline = to,
                %switch,
                %slot_confirmed,
                %confirmed,
                resend_bytes = confirmed.0.saturating_sub(slot_confirmed.0),
                "followed a failover: {} is the primary now (timeline {to}, branched from {from} \
                 at {switch}); continuing from the synced slot at {slot_confirmed}, the WAL up to \
                 walship's confirmed {confirmed} is read again and the resume lookup skips the \
                 events already in Kafka",
                info.address
            );
        }
    }
    lineage.timeline.store(timeline, Ordering::Relaxed);
    if source.failover_slot
        && let Some(slot) = failover::slot(client, &source.slot).await?
        && slot.failover == Some(false)
    {
        failover::enable(params, pw(password), &source.slot).await?;
        tracing::info!(
            slot = %source.slot,
            "turned failover on for replication slot {:?} (postgres.failover_slot = true)",
            source.slot
        );
    }
    Ok(())
}

/// `walship check`'s failover lines: the primary (on `client`), then every other host of
/// `postgres.url`, each with what to set.
pub async fn checks(config: &Config, client: &Client) -> Vec<Check> {
    let mut out = Vec::new();
    let slot_name = config.postgres.slot.as_str();
    let want = config.postgres.failover_slot;
    let Ok(connect) = config.connect_config() else {
        return out;
    };
    let endpoints = hosts::endpoints(&connect);
    let primary = async {
        let info = failover::server_info(client).await?;
        let settings = failover::settings(client).await?;
        let physical = failover::physical_slots(client).await?;
        let slot = failover::slot(client, slot_name).await?;
        Ok::<_, walship_postgres::PgError>((info, settings, physical, slot))
    };
    let (info, settings, physical, slot) = match primary.await {
        Ok(facts) => facts,
        Err(e) => {
            out.push(Check {
                name: "postgres.failover_slot".into(),
                status: if want { Status::Fail } else { Status::Warn },
                message: format!(
                    "could not read the failover settings: {}",
                    walship_postgres::error::error_chain(&e)
                ),
                fix: Some(
                    "let the configured user read pg_settings and pg_replication_slots".into(),
                ),
            });
            return out;
        }
    };
    let facts = PrimaryFacts {
        server: &info.address,
        info: &info,
        settings: &settings,
        physical: &physical,
        slot: slot.as_ref(),
        slot_name,
        hosts: endpoints.len(),
    };
    out.extend(
        failover::primary_findings(want, &facts)
            .into_iter()
            .map(check),
    );
    if !want || info.major < failover::MIN_MAJOR {
        return out;
    }
    if endpoints.len() == 1 {
        out.push(check(Finding {
            name: "postgres.standby".into(),
            level: Level::Warn,
            message: format!(
                "postgres.url names one host ({}): walship follows a promotion only if that name \
                 moves to the new primary, and this check cannot see the standbys",
                endpoints[0]
            ),
            fix: Some(
                "list the standbys after the primary, e.g. postgres://walship@pg1:5432,\
                 pg2:5432/app?target_session_attrs=read-write"
                    .into(),
            ),
        }));
        return out;
    }
    let password = config.postgres_password().ok().flatten();
    let named = settings.standby_slots();
    let mut primaries = Vec::new();
    for endpoint in &endpoints {
        let mut one = ConnectConfig {
            pg: hosts::only(&connect, endpoint),
            tls: connect.tls.clone(),
            session_target: hosts::SessionTarget::Any,
        };
        if one.get_connect_timeout().is_none() {
            one.connect_timeout(STANDBY_TIMEOUT);
        }
        let params = ConnectParams {
            config: one,
            read_batching: walship_postgres::ReadBatching::Off,
        };
        let host = endpoint.to_string();
        let standby = async {
            let c = management::connect(&params, pw(password.as_ref())).await?;
            let _ = c.batch_execute("SET statement_timeout = '15s'").await;
            let info = failover::server_info(&c).await?;
            let settings = failover::settings(&c).await?;
            let slot = failover::slot(&c, slot_name).await?;
            Ok::<_, walship_postgres::PgError>((info, settings, slot))
        };
        match tokio::time::timeout(STANDBY_TIMEOUT * 2, standby).await {
            Err(_) => out.push(unreachable(&host, "no answer".into())),
            Ok(Err(e)) => out.push(unreachable(&host, walship_postgres::error::error_chain(&e))),
            Ok(Ok((info, _, _))) if !info.in_recovery => primaries.push(host),
            Ok(Ok((_, standby_settings, standby_slot))) => {
                let facts = StandbyFacts {
                    server: &host,
                    settings: &standby_settings,
                    slot: standby_slot.as_ref(),
                    slot_name,
                    primary_confirmed: slot.as_ref().and_then(|s| s.confirmed_flush_lsn),
                    primary_standby_slots: &named,
                };
                out.extend(failover::standby_findings(&facts).into_iter().map(check));
            }
        }
    }
    if primaries.len() > 1 {
        out.push(check(Finding {
            name: "postgres.standby".into(),
            level: Level::Fail,
            message: format!(
                "{} hosts of postgres.url accept writes ({}): after a failover the old primary \
                 must not come back as a primary, or walship may follow it",
                primaries.len(),
                primaries.join(", ")
            ),
            fix: Some(
                "make the old primary a standby of the new one (pg_rewind, standby.signal) or \
                 take it out of postgres.url"
                    .into(),
            ),
        }));
    }
    out
}

fn unreachable(host: &str, why: String) -> Check {
    check(Finding {
        name: "postgres.standby".into(),
        level: Level::Warn,
        message: format!("cannot check {host} of postgres.url: {why}"),
        fix: Some(
            "make sure it is running and accepts walship's user and database (as the primary \
             does), or take it out of postgres.url"
                .into(),
        ),
    })
}

fn check(f: Finding) -> Check {
    Check {
        name: f.name,
        status: match f.level {
            Level::Pass => Status::Pass,
            Level::Warn => Status::Warn,
            Level::Fail => Status::Fail,
        },
        message: f.message,
        fix: f.fix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineage_keeps_the_highest_confirmed_position() {
        let l = Lineage::default();
        assert_eq!(
            l.update(Lsn(100)),
            Streamed {
                timeline: 0,
                confirmed: Lsn(100)
            }
        );
        l.timeline.store(1, Ordering::Relaxed);
        // A session that started from a synced slot behind it does not lower it.
        assert_eq!(
            l.update(Lsn(40)),
            Streamed {
                timeline: 1,
                confirmed: Lsn(100)
            }
        );
        assert_eq!(l.update(Lsn(150)).confirmed, Lsn(150));
    }
}
