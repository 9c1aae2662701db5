//! What `walship check` says about failover slots: one [`Finding`] for each thing to verify on
//! the primary ([`primary_findings`]) and on each standby ([`standby_findings`]), worded for the
//! operator.
//!
//! Invariant: findings judge facts already read (see `crate::catalog::failover`) and do no I/O;
//! every finding that is not a pass names what to set, and where, in its `fix`.

use std::fmt::Write as _;

use pgoutput::Lsn;

use crate::catalog::failover::{FailoverSettings, MIN_MAJOR, ServerInfo, SlotSync};
use crate::setup::{alter_slot_command, alter_slot_fix};

/// How serious a finding is (maps onto `walship check`'s statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// As failover needs it.
    Pass,
    /// Works, but deserves a look.
    Warn,
    /// A failover would lose the slot, or events, or stall walship.
    Fail,
}

/// One result of the failover checks: what was found, and what to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Stable identifier (`postgres.failover.slot`, `postgres.standby.sync_replication_slots`).
    pub name: String,
    /// How serious.
    pub level: Level,
    /// What was found, and where.
    pub message: String,
    /// What to set (for warnings and failures).
    pub fix: Option<String>,
}

impl Finding {
    fn pass(name: &str, message: impl Into<String>) -> Finding {
        Finding {
            name: name.into(),
            level: Level::Pass,
            message: message.into(),
            fix: None,
        }
    }

    fn warn(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            name: name.into(),
            level: Level::Warn,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            name: name.into(),
            level: Level::Fail,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What the primary said, for [`primary_findings`].
#[derive(Debug, Clone)]
pub struct PrimaryFacts<'a> {
    /// `host:port` of the primary.
    pub server: &'a str,
    /// Its version.
    pub info: &'a ServerInfo,
    /// Its settings.
    pub settings: &'a FailoverSettings,
    /// Its physical slots.
    pub physical: &'a [SlotSync],
    /// walship's slot there.
    pub slot: Option<&'a SlotSync>,
    /// walship's slot name.
    pub slot_name: &'a str,
    /// How many hosts `postgres.url` lists.
    pub hosts: usize,
}

/// The primary's side of failover: the version, walship's slot, `synchronized_standby_slots`.
/// `want` is `postgres.failover_slot`.
pub fn primary_findings(want: bool, f: &PrimaryFacts<'_>) -> Vec<Finding> {
    const SETTING: &str = "postgres.failover_slot";
    const SLOT: &str = "postgres.failover.slot";
    const STANDBY_SLOTS: &str = "postgres.failover.synchronized_standby_slots";
    let slot_name = f.slot_name;
    let mut out = Vec::new();
    if !want {
        if f.hosts > 1 {
            out.push(Finding::warn(
                SETTING,
                format!(
                    "postgres.url lists {} hosts to follow a failover, but postgres.failover_slot \
                     is false: a promoted standby will have no slot {slot_name:?}, and walship \
                     stops there",
                    f.hosts
                ),
                if f.info.major >= MIN_MAJOR {
                    "set postgres.failover_slot = true, and the primary and standby settings \
                     this check lists then"
                        .to_owned()
                } else {
                    format!(
                        "failover slots need PostgreSQL {MIN_MAJOR} or later (this server runs \
                         {}); until then, name the primary alone",
                        f.info.version
                    )
                },
            ));
        }
        return out;
    }
    if f.info.major < MIN_MAJOR {
        out.push(Finding::fail(
            SETTING,
            format!(
                "postgres.failover_slot = true, but {} runs PostgreSQL {}; failover slots need \
                 {MIN_MAJOR} or later, and walship refuses to start",
                f.server, f.info.version
            ),
            "upgrade to PostgreSQL 17 or later, or set postgres.failover_slot = false",
        ));
        return out;
    }
    out.push(match f.slot {
        None => Finding::pass(
            SLOT,
            format!(
                "slot {slot_name:?} does not exist yet; walship creates it with failover = true"
            ),
        ),
        Some(s) if s.failover == Some(true) => {
            Finding::pass(SLOT, format!("slot {slot_name:?} has failover = true"))
        }
        Some(_) => Finding::warn(
            SLOT,
            format!(
                "slot {slot_name:?} has failover = false, so standbys do not sync it; walship \
                 turns failover on when it starts"
            ),
            format!("start walship, or run {}", alter_slot_fix(slot_name)),
        ),
    });
    let named = f.settings.standby_slots();
    let physical: Vec<&str> = f.physical.iter().map(|s| s.name.as_str()).collect();
    let candidates = if physical.is_empty() {
        "<the standby's primary_slot_name>".to_owned()
    } else {
        physical.join(",")
    };
    let set_it = format!(
        "on the primary only: ALTER SYSTEM SET synchronized_standby_slots = '{candidates}'; \
         SELECT pg_reload_conf(); (the physical slots of the standbys that may be promoted; \
         leave it empty on the standbys)"
    );
    if named.is_empty() {
        out.push(Finding::fail(
            STANDBY_SLOTS,
            "synchronized_standby_slots is empty on the primary: walship may receive (and \
             publish) changes no standby has yet, so after a failover Kafka could hold events \
             the new primary does not have, and walship stops there",
            set_it,
        ));
        return out;
    }
    let mut problems = Vec::new();
    let mut inactive = Vec::new();
    for name in &named {
        match f.physical.iter().find(|s| &s.name == name) {
            None => problems.push(format!("{name} (no such physical slot)")),
            Some(s) if s.invalidated().is_some() => {
                problems.push(format!("{name} ({})", s.invalidated().unwrap_or_default()))
            }
            Some(s) if !s.active => inactive.push(name.as_str()),
            Some(_) => {}
        }
    }
    if !problems.is_empty() {
        out.push(Finding::fail(
            STANDBY_SLOTS,
            format!(
                "synchronized_standby_slots names {}: logical walsenders wait for those standbys \
                 forever, so walship's stream stalls",
                problems.join(", ")
            ),
            format!(
                "create the standby's physical slot (SELECT pg_create_physical_replication_slot(\
                 '<name>');) and set primary_slot_name to it on the standby, or {set_it}"
            ),
        ));
    } else if !inactive.is_empty() {
        out.push(Finding::warn(
            STANDBY_SLOTS,
            format!(
                "synchronized_standby_slots names {}, which no standby streams from now: \
                 walship's stream waits until it does",
                inactive.join(", ")
            ),
            "start the standby (its primary_slot_name), or take its slot out of \
             synchronized_standby_slots while it is away",
        ));
    } else {
        out.push(Finding::pass(
            STANDBY_SLOTS,
            format!(
                "synchronized_standby_slots = '{}': walship only receives WAL those standbys have",
                named.join(",")
            ),
        ));
    }
    out
}

/// What a standby said, for [`standby_findings`].
#[derive(Debug, Clone)]
pub struct StandbyFacts<'a> {
    /// `host:port` of the standby.
    pub server: &'a str,
    /// Its settings.
    pub settings: &'a FailoverSettings,
    /// walship's slot there.
    pub slot: Option<&'a SlotSync>,
    /// walship's slot name.
    pub slot_name: &'a str,
    /// The slot's confirmed position on the primary, to say how far the copy trails.
    pub primary_confirmed: Option<Lsn>,
    /// The primary's `synchronized_standby_slots` names.
    pub primary_standby_slots: &'a [String],
}

/// A standby's side of failover: the settings the slotsync worker needs and walship's slot there.
pub fn standby_findings(f: &StandbyFacts<'_>) -> Vec<Finding> {
    let server = f.server;
    let slot_name = f.slot_name;
    let s = f.settings;
    let on_standby = |setting: &str| {
        format!(
            "on {server}: ALTER SYSTEM SET {setting}; then SELECT pg_reload_conf(); (or restart)"
        )
    };
    let mut out = Vec::new();
    if s.sync_replication_slots != Some(true) {
        out.push(Finding::fail(
            "postgres.standby.sync_replication_slots",
            format!(
                "standby {server} has sync_replication_slots = off: it does not copy walship's \
                 slot, so after promoting it walship has no slot there"
            ),
            on_standby("sync_replication_slots = on"),
        ));
    }
    if !s.hot_standby_feedback {
        out.push(Finding::fail(
            "postgres.standby.hot_standby_feedback",
            format!(
                "standby {server} has hot_standby_feedback = off: the primary may remove catalog \
                 rows the synced slot needs, which invalidates it there"
            ),
            on_standby("hot_standby_feedback = on"),
        ));
    }
    if s.primary_slot_name.is_empty() {
        out.push(Finding::fail(
            "postgres.standby.primary_slot_name",
            format!(
                "standby {server} streams without a physical slot (primary_slot_name is empty): \
                 slot synchronization needs one"
            ),
            format!(
                "on the primary: SELECT pg_create_physical_replication_slot('<name>'); {}; and \
                 name it in the primary's synchronized_standby_slots",
                on_standby("primary_slot_name = '<name>'")
            ),
        ));
    } else if !f
        .primary_standby_slots
        .iter()
        .any(|n| n == &s.primary_slot_name)
    {
        out.push(Finding::fail(
            "postgres.standby.primary_slot_name",
            format!(
                "standby {server} streams through slot {:?}, which the primary's \
                 synchronized_standby_slots does not name: walship may receive changes this \
                 standby does not have yet",
                s.primary_slot_name
            ),
            format!(
                "add {:?} to synchronized_standby_slots on the primary and reload",
                s.primary_slot_name
            ),
        ));
    }
    if !s.standby_slots().is_empty() {
        out.push(Finding::fail(
            "postgres.standby.synchronized_standby_slots",
            format!(
                "standby {server} has synchronized_standby_slots = '{}': once promoted, its \
                 logical walsenders wait for those slots, which do not exist there, and walship \
                 stalls",
                s.standby_slots().join(",")
            ),
            on_standby("synchronized_standby_slots = ''"),
        ));
    }
    if s.wal_receiver.as_deref() == Some("hidden") {
        out.push(Finding::warn(
            "postgres.standby.streaming",
            format!(
                "standby {server} runs a WAL receiver, but this role may not see whether it \
                 streams"
            ),
            "GRANT pg_read_all_stats TO walship's role, or check pg_stat_wal_receiver there as a \
             superuser",
        ));
    } else if s.wal_receiver.as_deref() != Some("streaming") {
        out.push(Finding::warn(
            "postgres.standby.streaming",
            format!(
                "standby {server} is not streaming from the primary (WAL receiver: {})",
                s.wal_receiver.as_deref().unwrap_or("not running")
            ),
            "check primary_conninfo and the standby's log",
        ));
    }
    const SLOT: &str = "postgres.standby.slot";
    let unsynced_fix = format!(
        "the standby's log says why (\"could not synchronize replication slot\"): \
         primary_conninfo must include dbname=; if it waits for the catalog xmin, run SELECT \
         pg_log_standby_snapshot(); on the primary and let walship confirm (write an event), \
         once or twice; the slot must have failover = true on the primary ({})",
        alter_slot_command(slot_name)
    );
    out.push(match f.slot {
        None => Finding::fail(
            SLOT,
            format!(
                "slot {slot_name:?} is not on standby {server}: promoting it now would leave \
                 walship without its slot"
            ),
            unsynced_fix,
        ),
        Some(slot) if slot.synced != Some(true) => Finding::fail(
            SLOT,
            format!(
                "slot {slot_name:?} on standby {server} was not synced from the primary \
                 (synced = false): it is not walship's slot"
            ),
            format!(
                "drop it on the standby (SELECT pg_drop_replication_slot('{slot_name}');) so the \
                 primary's can be synced"
            ),
        ),
        Some(slot) if slot.invalidated().is_some() => Finding::fail(
            SLOT,
            format!(
                "slot {slot_name:?} on standby {server} is invalidated ({}): walship cannot \
                 continue from it after a promotion",
                slot.invalidated().unwrap_or_default()
            ),
            "keep hot_standby_feedback = on and primary_slot_name set on the standby; the \
             slotsync worker drops and re-creates an invalidated synced slot by itself",
        ),
        Some(slot) if slot.temporary || slot.confirmed_flush_lsn.is_none() => Finding::fail(
            SLOT,
            format!(
                "slot {slot_name:?} on standby {server} is still waiting for its first sync \
                 (temporary): a promotion now drops it"
            ),
            unsynced_fix,
        ),
        Some(slot) => {
            let mut msg = format!("slot {slot_name:?} is synced to standby {server}");
            if let (Some(here), Some(there)) = (slot.confirmed_flush_lsn, f.primary_confirmed) {
                let _ = write!(
                    msg,
                    " (confirmed {here}, {} bytes behind the primary's {there}; after a \
                     promotion those are sent again and the resume lookup skips them)",
                    there.0.saturating_sub(here.0)
                );
            }
            Finding::pass(SLOT, msg)
        }
    });
    out
}

#[cfg(test)]
mod tests;
