//! Following a failover: the wiring between `postgres.failover_slot`, the start-up, each session
//! and `walship check`. This module only gathers facts and hands them to the rules in
//! [`walship_postgres::failover`] (which say what is normal and what is fatal, and why).
//!
//! ```text
//!  start-up ── prepare: version ≥ 17, failover on for an existing slot, warnings ──▶ ensure_slot
//!  session  ── before_session: timeline changed since the last session? ──▶ verify_continuity
//!  check    ── check::failover: the primary's settings, then every other host of postgres.url
//! ```
//!
//! Invariant: what walship remembers between sessions ([`Lineage`]: the timeline and the highest
//! position it confirmed) only grows within a timeline, so a promoted server is always compared
//! with everything Kafka may hold.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use pgoutput::Lsn;
use tokio_postgres::Client;
use walship_postgres::failover::{
    self, Continuity, History, Level, PrimaryFacts, SessionFacts, Streamed,
};

use crate::config::Secret;
use crate::config::settings::SourceSettings;
use crate::error::Error;

/// What walship remembers about the server it streamed from, across sessions of one process.
#[derive(Debug, Default)]
pub struct Lineage {
    timeline: AtomicU32,
    confirmed: AtomicU64,
    /// A session was asked to read Kafka back against the server's history and has not
    /// finished doing so: the next session asks again.
    unchecked: AtomicBool,
    /// The last server history read (`TIMELINE_HISTORY` needs a replication connection of its
    /// own: read once per timeline).
    history: std::sync::Mutex<Option<History>>,
}

impl Lineage {
    /// The session's check of what Kafka holds passed (or cannot be made): later sessions on
    /// the same timeline need none.
    pub fn checked(&self) {
        self.unchecked.store(false, Ordering::Relaxed);
    }

    /// Folds in the position the last session confirmed, and returns what to compare with.
    fn update(&self, confirmed: Lsn) -> Streamed {
        let high = self.confirmed.fetch_max(confirmed.0, Ordering::Relaxed);
        Streamed {
            timeline: self.timeline.load(Ordering::Relaxed),
            confirmed: Lsn(high.max(confirmed.0)),
        }
    }
}

pub(crate) fn pw(password: Option<&Secret>) -> Option<&[u8]> {
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

/// What a session knows of its server's history before it streams.
#[derive(Debug, Clone)]
pub(crate) struct ServerHistory {
    /// The server's timeline and where its ancestors ended.
    pub history: History,
    /// `host:port` of the server, for messages.
    pub server: String,
    /// This process streamed another timeline before, or this is its first session on a
    /// timeline after the first: Kafka may hold events the server does not have, so the
    /// session reads its topics back before its first record.
    pub check_published: bool,
}

/// At the start of every session, on its SQL connection, before the stream takes the slot:
/// reads the server's timeline history; if the timeline changed since this process's last
/// session, [`failover::verify_continuity`] decides whether it may continue there; and says
/// whether Kafka must be read back first ([`ServerHistory::check_published`]). With
/// `postgres.failover_slot`, turns failover on for a slot that has it off (the slot must be
/// free, which it is between sessions).
/// `lineage`: what earlier sessions of this process streamed; `safe`: the position the last
/// one confirmed.
pub(crate) async fn before_session(
    source: &SourceSettings,
    client: &Client,
    lineage: &Lineage,
    safe: Lsn,
) -> Result<ServerHistory, Error> {
    let (params, password) = (&source.params, source.password.as_ref());
    let slot_name = source.slot.as_str();
    let before = lineage.update(safe);
    let info = failover::server_info(client).await?;
    let Some(timeline) = info.timeline else {
        // A standby (a one-host URL pointing at one): the session fails on its own.
        return Ok(ServerHistory {
            history: History::first(),
            server: info.address,
            check_published: false,
        });
    };
    let known = lineage
        .history
        .lock()
        .ok()
        .and_then(|h| h.clone())
        .filter(|h| h.timeline == timeline);
    let history = match known {
        Some(history) => history,
        None if timeline > 1 => {
            let history = History {
                timeline,
                switches: failover::timeline_history(params, pw(password), timeline).await?,
            };
            if let Ok(mut h) = lineage.history.lock() {
                *h = Some(history.clone());
            }
            history
        }
        None => History::first(),
    };
    let slot = failover::slot(client, slot_name).await?;
    let mut check_published = false;
    if before.timeline != 0 && before.timeline != timeline {
        let facts = SessionFacts {
            server: &info.address,
            major: info.major,
            timeline,
            history: &history.switches,
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
                "followed a failover: {} is the primary now (timeline {to}, branched from {from} \
                 at {switch}); continuing from the synced slot at {slot_confirmed} (this process \
                 had confirmed {confirmed}) once Kafka is checked for events this server does not \
                 have; the resume lookup skips those already there",
                info.address
            );
        }
        check_published = true;
    } else if before.timeline == 0 && timeline > 1 {
        // The first session of this process on a server that was promoted (or recovered to a
        // point in time) at some time: it may be the first session after the promotion in any
        // process, and a slot created there since (as the errors above tell an operator to)
        // says nothing of what the old primary published. Kafka is read back once per process.
        check_published = true;
    }
    // Until a session has read Kafka back, every session asks again (one that ended early, on
    // a transient error, did not finish).
    let check_published = check_published || lineage.unchecked.load(Ordering::Relaxed);
    lineage.unchecked.store(check_published, Ordering::Relaxed);
    lineage.timeline.store(timeline, Ordering::Relaxed);
    if source.failover_slot
        && let Some(slot) = slot
        && slot.failover == Some(false)
    {
        failover::enable(params, pw(password), &source.slot).await?;
        tracing::info!(
            slot = %source.slot,
            "turned failover on for replication slot {:?} (postgres.failover_slot = true)",
            source.slot
        );
    }
    Ok(ServerHistory {
        history,
        server: info.address,
        check_published,
    })
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
