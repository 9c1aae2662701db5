//! `walship check`'s failover lines (`postgres.failover_slot`): the primary's settings, then
//! every other host of `postgres.url`, each with what to set.
//!
//! Owns only the gathering and the rendering as checks; the rules (what a failover needs, what
//! is normal and what is fatal) are [`walship_postgres::failover`]'s. Like every check it
//! changes nothing.

use std::time::Duration;

use tokio_postgres::Client;
use walship_postgres::failover::{self, Finding, Level, PrimaryFacts, StandbyFacts};
use walship_postgres::replication::ConnectParams;
use walship_postgres::{ConnectConfig, hosts, management};

use super::report::{Check, Status};
use crate::config::Config;
use crate::config::settings::SourceParts;
use crate::failover::pw;

/// How long `check` waits for each other host of `postgres.url`.
const STANDBY_TIMEOUT: Duration = Duration::from_secs(10);

/// `walship check`'s failover lines: the primary (on `client`), then every other host of
/// `postgres.url`, each with what to set.
pub(super) async fn checks(config: &Config, source: &SourceParts, client: &Client) -> Vec<Check> {
    let mut out = Vec::new();
    let slot_name = config.postgres.slot.as_str();
    let want = config.postgres.failover_slot;
    let Ok(connect) = &source.connect else {
        return out;
    };
    let endpoints = hosts::endpoints(connect);
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
    let password = source.password.as_ref().ok().and_then(Option::as_ref);
    let named = settings.standby_slots();
    let mut primaries = Vec::new();
    for endpoint in &endpoints {
        let mut one = ConnectConfig {
            pg: hosts::only(connect, endpoint),
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
            let c = management::connect(&params, pw(password)).await?;
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
