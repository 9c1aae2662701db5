//! PostgreSQL 17+ failover slots: creating walship's slot as one, what `walship check` verifies on
//! the primary and its standbys, and when a promoted standby is safe to continue from.
//!
//! ```text
//!  primary   synchronized_standby_slots = 'sb1'   logical walsender sends walship only WAL that
//!     │      physical slot sb1                    the standby behind sb1 has flushed
//!     │ WAL                                                           │
//!     ▼                                                               ▼
//!  standby   primary_slot_name = 'sb1', hot_standby_feedback = on, sync_replication_slots = on
//!     │      slotsync worker copies walship's slot (failover = true): synced = true, not temporary
//!     ▼ pg_ctl promote
//!  new primary: timeline N+1 branches from N at the switch point S; walship (several hosts with
//!  target_session_attrs=read-write, see crate::hosts) reconnects and streams from the synced slot
//! ```
//!
//! # What is normal after a promotion, and what is fatal
//!
//! The synced slot's `confirmed_flush_lsn` trails the old primary's: the standby's slotsync worker
//! copies it every 200 ms while it changes and backs off to once every 30 s while it does not, so
//! after a quiet spell the copy can be up to 30 s old (measured: README, "Failover"). Streaming
//! from it sends those events again; they are the unconfirmed window of an ordinary crash, and the
//! resume lookup skips the ones already in Kafka. That is normal.
//!
//! Fatal, each with its explanation, because continuing would leave Kafka with events the new
//! primary does not have or skip events it does have:
//!
//! - the promoted server is on an older timeline than walship streamed from, or on one that does
//!   not descend from it (an old primary started again, a sibling standby);
//! - its timeline branched off *before* the position walship had confirmed (`S < P`): the old
//!   primary sent walship WAL the standby never received (no `synchronized_standby_slots`), so
//!   Kafka holds events that are not in the new primary's history;
//! - the slot is missing there (never synced, or still temporary at the promotion), was not synced
//!   from the old primary (`synced = false`: created on the standby or after the promotion), or
//!   is invalidated.
//!
//! A synced slot *ahead* of what this process confirmed is normal: another walship process
//! (the other half of an active-passive pair, another member of `[cluster]`) streamed the slot
//! and confirmed more before the promotion. The slot only moves behind acknowledged events.
//!
//! What was *published* is the measure, not what one process remembers: events can be in
//! Kafka that no process confirmed (in flight at a crash) or that a process that has since died
//! confirmed. Kafka holds them, each with its position and, after the first promotion, its
//! timeline ([`History::holds`] decides whether a record is in the server's history); the
//! session reads the topics back and stops before its first record when one is not. The
//! process's own memory ([`Streamed`]: the timeline and the highest position it confirmed) adds
//! one quick, certain case: a promotion that branched before what it confirmed itself.
//!
//! Invariant: nothing here creates a slot to replace a missing one (see [`crate::slot`]).

use std::fmt::Write as _;

use pgoutput::Lsn;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use crate::error::{PgError, sql_err};
use crate::ident::quote_ident;
use crate::replication::{ConnectParams, ReplicationStream};

/// The first major version with failover slots (`failover` argument, `synced` column,
/// `sync_replication_slots`, `synchronized_standby_slots`).
pub const MIN_MAJOR: u32 = 17;

/// Who a server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// Where the connection landed (`address:port`; `unix socket`), for messages: with several
    /// hosts in `postgres.url`, which one is the primary.
    pub address: String,
    /// `server_version_num` / 10000.
    pub major: u32,
    /// `server_version` (`17.11`).
    pub version: String,
    /// `pg_is_in_recovery()`: a standby.
    pub in_recovery: bool,
    /// The timeline WAL is written on (from `pg_walfile_name`); `None` on a standby.
    pub timeline: Option<u32>,
}

/// Reads version, role and timeline.
pub async fn server_info(client: &Client) -> Result<ServerInfo, PgError> {
    let row = client
        .query_one(
            // pg_walfile_name names the insert timeline's segment; it refuses to run in recovery.
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
                    pg_is_in_recovery(), \
                    CASE WHEN pg_is_in_recovery() THEN NULL ELSE \
                      ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
                    coalesce(host(inet_server_addr()) || ':' || inet_server_port(), 'unix socket')",
            &[],
        )
        .await
        .map_err(sql_err("reading the server's version and timeline"))?;
    let num: i32 = row.get(0);
    Ok(ServerInfo {
        major: u32::try_from(num / 10000).unwrap_or(0),
        version: row.get(1),
        in_recovery: row.get(2),
        timeline: row
            .get::<_, Option<i32>>(3)
            .and_then(|t| u32::try_from(t).ok()),
        address: row.get(4),
    })
}

/// A replication slot as failover sees it. Columns a version lacks read as `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotSync {
    /// Slot name.
    pub name: String,
    /// `physical` or `logical`.
    pub slot_type: String,
    /// `failover` (17+): synced to standbys that ask for it.
    pub failover: Option<bool>,
    /// `synced` (17+): copied from a primary by a standby's slotsync worker (stays true after
    /// a promotion).
    pub synced: Option<bool>,
    /// A synced slot stays temporary until its first successful sync; a promotion drops it.
    pub temporary: bool,
    /// `conflicting` (16+): invalidated by a recovery conflict.
    pub conflicting: Option<bool>,
    /// `invalidation_reason` (17+).
    pub invalidation_reason: Option<String>,
    /// `wal_status` (`lost` once invalidated).
    pub wal_status: Option<String>,
    /// Where a stream from this slot starts.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Whether a walsender (or the slotsync worker) holds it.
    pub active: bool,
}

impl SlotSync {
    /// Why the slot cannot be streamed from, if it is invalidated.
    pub fn invalidated(&self) -> Option<String> {
        if let Some(reason) = &self.invalidation_reason {
            return Some(format!("invalidation_reason = {reason}"));
        }
        if self.conflicting == Some(true) {
            return Some("conflicting = true".into());
        }
        (self.wal_status.as_deref() == Some("lost")).then(|| "wal_status = lost".into())
    }
}

const SLOT_COLUMNS: &str = "s.slot_name::text, s.slot_type::text, \
    (to_jsonb(s) ->> 'failover')::bool, (to_jsonb(s) ->> 'synced')::bool, s.temporary, \
    (to_jsonb(s) ->> 'conflicting')::bool, to_jsonb(s) ->> 'invalidation_reason', s.wal_status, \
    s.confirmed_flush_lsn, s.active";

fn slot_row(r: &tokio_postgres::Row) -> SlotSync {
    SlotSync {
        name: r.get(0),
        slot_type: r.get(1),
        failover: r.get(2),
        synced: r.get(3),
        temporary: r.get(4),
        conflicting: r.get(5),
        invalidation_reason: r.get(6),
        wal_status: r.get(7),
        confirmed_flush_lsn: r.get::<_, Option<PgLsn>>(8).map(|l| Lsn(u64::from(l))),
        active: r.get(9),
    }
}

/// Reads one slot (`None`: it does not exist).
pub async fn slot(client: &Client, name: &str) -> Result<Option<SlotSync>, PgError> {
    let sql = format!("SELECT {SLOT_COLUMNS} FROM pg_replication_slots s WHERE slot_name = $1");
    let row = client
        .query_opt(&sql, &[&name])
        .await
        .map_err(sql_err(format!("reading replication slot {name:?}")))?;
    Ok(row.as_ref().map(slot_row))
}

/// Reads the physical slots (the standbys' `primary_slot_name`s live here on a primary).
pub async fn physical_slots(client: &Client) -> Result<Vec<SlotSync>, PgError> {
    let sql = format!(
        "SELECT {SLOT_COLUMNS} FROM pg_replication_slots s WHERE slot_type = 'physical' \
         ORDER BY slot_name"
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(sql_err("reading the physical replication slots"))?;
    Ok(rows.iter().map(slot_row).collect())
}

/// The settings failover slots depend on. `None`: the server does not have the setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailoverSettings {
    /// Primary: physical slots whose standbys must have WAL before logical walsenders send it.
    pub synchronized_standby_slots: Option<String>,
    /// Standby: run the slotsync worker.
    pub sync_replication_slots: Option<bool>,
    /// Standby: tell the primary which rows the synced slots still need.
    pub hot_standby_feedback: bool,
    /// Standby: the physical slot it streams through.
    pub primary_slot_name: String,
    /// Standby: the WAL receiver's state (`streaming`), `None` when none runs, `hidden` when
    /// one runs but the role may not see its state (without `pg_read_all_stats`).
    pub wal_receiver: Option<String>,
}

impl FailoverSettings {
    /// The slot names of `synchronized_standby_slots`.
    pub fn standby_slots(&self) -> Vec<String> {
        self.synchronized_standby_slots
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    }
}

/// Reads the settings (any role may read them).
pub async fn settings(client: &Client) -> Result<FailoverSettings, PgError> {
    let row = client
        .query_one(
            "SELECT current_setting('synchronized_standby_slots', true), \
                    current_setting('sync_replication_slots', true), \
                    current_setting('hot_standby_feedback'), \
                    current_setting('primary_slot_name'), \
                    (SELECT coalesce(status, CASE WHEN pid IS NOT NULL THEN 'hidden' END) \
                     FROM pg_stat_wal_receiver LIMIT 1)",
            &[],
        )
        .await
        .map_err(sql_err("reading the failover settings"))?;
    Ok(FailoverSettings {
        synchronized_standby_slots: row.get(0),
        sync_replication_slots: row.get::<_, Option<String>>(1).map(|v| v == "on"),
        hot_standby_feedback: row.get::<_, String>(2) == "on",
        primary_slot_name: row.get(3),
        wal_receiver: row.get(4),
    })
}

/// The SQL that creates walship's slot: with `failover`, the 5th argument (17+) makes it a
/// failover slot.
pub fn create_slot_sql(failover: bool) -> &'static str {
    if failover {
        "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')"
    }
}

/// The replication command that turns failover on for an existing slot (17+).
pub fn alter_slot_command(slot: &str) -> String {
    format!(
        "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
        quote_ident(slot)
    )
}

/// How to run [`alter_slot_command`] by hand.
fn alter_slot_fix(slot: &str) -> String {
    format!(
        "psql \"dbname=<database> replication=database\" -c '{}' (on the primary, while no \
         walship streams from the slot)",
        alter_slot_command(slot)
    )
}

/// `postgres.failover_slot = true` needs a 17+ primary: the error otherwise.
pub fn require_support(info: &ServerInfo, target: &str) -> Result<(), PgError> {
    if info.major >= MIN_MAJOR {
        return Ok(());
    }
    Err(PgError::Setup(format!(
        "postgres.failover_slot = true needs PostgreSQL {MIN_MAJOR} or later (failover slots), \
         but {target} runs PostgreSQL {}: upgrade it, or set postgres.failover_slot = false (a \
         promoted standby then has no slot, and walship stops there with an explanation)",
        info.version
    )))
}

/// Turns failover on for an existing slot (`ALTER_REPLICATION_SLOT … (FAILOVER true)` on a
/// replication connection). The slot must not be in use: a slot still held by a walsender is a
/// transient error (retried), any other refusal a definite one with the command to run.
pub async fn enable(
    params: &ConnectParams,
    password: Option<&[u8]>,
    slot: &str,
) -> Result<(), PgError> {
    match ReplicationStream::command(params, password, "walship", &alter_slot_command(slot)).await {
        Ok(_) => Ok(()),
        Err(e @ PgError::Server { .. }) if e.is_transient() => Err(e),
        Err(PgError::Server { error, .. }) => Err(PgError::Setup(format!(
            "replication slot {slot:?} has failover = false and postgres.failover_slot = true, \
             but PostgreSQL refused to turn failover on ({error}); run {}, or set \
             postgres.failover_slot = false",
            alter_slot_fix(slot)
        ))),
        Err(e) => Err(e),
    }
}

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

/// What walship remembers about where it streamed, carried from one session to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streamed {
    /// The timeline of the last session (0: none yet).
    pub timeline: u32,
    /// The highest position walship confirmed: everything before it reached Kafka.
    pub confirmed: Lsn,
}

/// One line of a timeline history file: `timeline` ended (and its child began) at `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineSwitch {
    /// The parent timeline.
    pub timeline: u32,
    /// Where it ended: the switch point.
    pub end: Lsn,
}

/// A server's timeline and the history that led to it: which positions of which timelines
/// its WAL contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The server's timeline.
    pub timeline: u32,
    /// Where each earlier timeline of its history ended (empty on timeline 1).
    pub switches: Vec<TimelineSwitch>,
}

impl History {
    /// The history of a server on timeline 1 (or of one whose history was not read).
    pub fn first() -> Self {
        History {
            timeline: 1,
            switches: Vec::new(),
        }
    }

    /// True when an event read on `timeline` with commit LSN `commit_lsn` is in this server's
    /// history: read on the server's own timeline, or on an ancestor before it ended. Anything
    /// else (a later timeline, a sibling, an ancestor's WAL past its switch point) was
    /// published from WAL this server does not have, and its position may name another event
    /// here.
    pub fn holds(&self, timeline: u32, commit_lsn: Lsn) -> bool {
        timeline == self.timeline
            || self
                .switches
                .iter()
                .any(|s| s.timeline == timeline && commit_lsn < s.end)
    }

    /// Where the server's own timeline began: the end of its parent (`None` on timeline 1).
    pub fn branch_point(&self) -> Option<Lsn> {
        self.switches
            .iter()
            .filter(|s| s.timeline < self.timeline)
            .max_by_key(|s| s.timeline)
            .map(|s| s.end)
    }
}

/// Parses a timeline history file (`TIMELINE_HISTORY` content): `1\t0/3000158\treason` lines.
pub fn parse_history(text: &str) -> Vec<TimelineSwitch> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let timeline = f.next()?.parse().ok()?;
            let end = f.next()?.parse().ok()?;
            Some(TimelineSwitch { timeline, end })
        })
        .collect()
}

/// Reads timeline `timeline`'s history from the server (`TIMELINE_HISTORY` on a replication
/// connection) and parses it.
pub async fn timeline_history(
    params: &ConnectParams,
    password: Option<&[u8]>,
    timeline: u32,
) -> Result<Vec<TimelineSwitch>, PgError> {
    let rows = ReplicationStream::command(
        params,
        password,
        "walship",
        &format!("TIMELINE_HISTORY {timeline}"),
    )
    .await?;
    let content = rows
        .first()
        .and_then(|r| r.get(1))
        .cloned()
        .flatten()
        .unwrap_or_default();
    // Sent as text; a server that sends the bytea's hex form is decoded too.
    let text = match content.strip_prefix("\\x") {
        Some(hex) => String::from_utf8_lossy(
            &(0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect::<Vec<u8>>(),
        )
        .into_owned(),
        None => content,
    };
    Ok(parse_history(&text))
}

/// How a session's server relates to the one walship streamed from before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// Nothing to compare (first session) or the same timeline.
    Same,
    /// A promotion walship followed: everything this process confirmed is in the new
    /// primary's history (what others published is judged against Kafka by the session).
    Promoted {
        /// The timeline walship streamed from.
        from: u32,
        /// The promoted server's timeline.
        to: u32,
        /// Where `from` ended.
        switch: Lsn,
        /// The synced slot's position: streaming restarts here.
        slot_confirmed: Lsn,
        /// What this process had confirmed: events between the two are sent again (another
        /// process may have confirmed more: then the slot is ahead of it).
        confirmed: Lsn,
    },
}

/// What a session learned about its server, for [`verify_continuity`].
#[derive(Debug, Clone)]
pub struct SessionFacts<'a> {
    /// `host:port` of the server.
    pub server: &'a str,
    /// Its version.
    pub major: u32,
    /// Its timeline now.
    pub timeline: u32,
    /// Its timeline's history (empty on timeline 1).
    pub history: &'a [TimelineSwitch],
    /// walship's slot there.
    pub slot: Option<&'a SlotSync>,
    /// The slot's name.
    pub slot_name: &'a str,
}

/// The rule of this module's doc: whether walship may continue on the server of a new session
/// after streaming `before`. Errors are definite and explain what happened and what to do.
pub fn verify_continuity(before: Streamed, now: &SessionFacts<'_>) -> Result<Continuity, PgError> {
    let (from, to) = (before.timeline, now.timeline);
    if from == 0 || from == to {
        return Ok(Continuity::Same);
    }
    let server = now.server;
    let slot_name = now.slot_name;
    let confirmed = before.confirmed;
    let not_ours = |why: String| {
        PgError::Setup(format!(
            "walship streamed from timeline {from} (confirmed up to {confirmed}) and now reached \
             {server} on timeline {to}, which {why}: it is not the standby that took over from \
             walship's primary (an old primary started again, or a sibling standby), and \
             streaming from it would publish a history Kafka does not have. Point postgres.url \
             at the current primary; fence or rebuild the other server"
        ))
    };
    if to < from {
        return Err(not_ours("is older".into()));
    }
    let Some(switch) = now
        .history
        .iter()
        .find(|s| s.timeline == from)
        .map(|s| s.end)
    else {
        return Err(not_ours(format!("does not descend from timeline {from}")));
    };
    let Some(slot) = now.slot else {
        return Err(PgError::Setup(format!(
            "the primary failed over to {server} (timeline {to}, branched from {from} at \
             {switch}), but replication slot {slot_name:?} does not exist there: it was not \
             synchronized to that standby before the promotion (postgres.failover_slot = false, \
             sync_replication_slots off on the standby, or the slot never finished its first \
             sync). walship will not create a new slot, which would skip every event committed \
             since {confirmed}. Reconcile the outbox with Kafka from {confirmed} on, then create \
             the slot and start walship again; walship check lists the settings that make the \
             slot follow the next failover"
        )));
    };
    if switch < confirmed {
        return Err(PgError::Setup(format!(
            "the primary failed over to {server}, whose timeline {to} branched from timeline \
             {from} at {switch}, before the position {confirmed} walship had confirmed: the old \
             primary sent walship WAL this standby never received, so Kafka holds events (with \
             walship.position between {switch} and {confirmed}) that the new primary does not \
             have, and it may commit different ones at the same positions. Decide what those \
             events mean for their consumers, then start walship again (a new process has no \
             memory of the old position). synchronized_standby_slots on the primary prevents \
             this: walship then only receives WAL the standby has"
        )));
    }
    // Before 17 PostgreSQL has no `synced` column: a slot there was copied by a tool (Patroni's
    // permanent slots, pg_failover_slots) or made by hand, and what Kafka holds is the measure.
    if now.major >= MIN_MAJOR && slot.synced != Some(true) {
        return Err(PgError::Setup(format!(
            "the primary failed over to {server} (timeline {to}), but its replication slot \
             {slot_name:?} was not synchronized from the old primary (synced = false): it was \
             created there, and streaming from it could skip or repeat events. Reconcile the \
             outbox with Kafka from {confirmed} on, drop that slot, create a new one and start \
             walship again (it reads Kafka back first; set postgres.source_epoch if it says to)"
        )));
    }
    if let Some(why) = slot.invalidated() {
        return Err(PgError::Setup(format!(
            "the primary failed over to {server} (timeline {to}), but the synced replication \
             slot {slot_name:?} there is invalidated ({why}), so events after its position may \
             be gone. Reconcile the outbox with Kafka from {confirmed} on, drop the slot and \
             start walship again; keep hot_standby_feedback = on and primary_slot_name set on \
             the standbys"
        )));
    }
    // A slot ahead of `confirmed` was moved by another walship process that streamed it
    // behind the broker's acknowledgements: normal (see the module documentation).
    let slot_confirmed = slot.confirmed_flush_lsn.unwrap_or_default();
    Ok(Continuity::Promoted {
        from,
        to,
        switch,
        slot_confirmed,
        confirmed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    fn synced(confirmed: &str) -> SlotSync {
        SlotSync {
            name: "w".into(),
            slot_type: "logical".into(),
            failover: Some(true),
            synced: Some(true),
            confirmed_flush_lsn: Some(lsn(confirmed)),
            wal_status: Some("reserved".into()),
            ..SlotSync::default()
        }
    }

    fn promoted<'a>(slot: Option<&'a SlotSync>, history: &'a [TimelineSwitch]) -> SessionFacts<'a> {
        SessionFacts {
            server: "pg2:5432",
            major: 17,
            timeline: 2,
            history,
            slot,
            slot_name: "w",
        }
    }

    const BEFORE: Streamed = Streamed {
        timeline: 1,
        confirmed: Lsn(0x0300_0100),
    };

    #[test]
    fn parses_history_files() {
        let h = parse_history(
            "1\t0/1A1EC38\tno recovery target specified\n\n2\t0/3000000\tbefore 2000-01-01\n",
        );
        assert_eq!(
            h,
            [
                TimelineSwitch {
                    timeline: 1,
                    end: lsn("0/1A1EC38")
                },
                TimelineSwitch {
                    timeline: 2,
                    end: lsn("0/3000000")
                }
            ]
        );
        assert!(parse_history("").is_empty());
    }

    #[test]
    fn a_synced_slot_behind_what_walship_confirmed_is_normal() {
        let history = [TimelineSwitch {
            timeline: 1,
            end: lsn("0/3000200"),
        }];
        let slot = synced("0/2F00000");
        assert_eq!(
            verify_continuity(BEFORE, &promoted(Some(&slot), &history)).unwrap(),
            Continuity::Promoted {
                from: 1,
                to: 2,
                switch: lsn("0/3000200"),
                slot_confirmed: lsn("0/2F00000"),
                confirmed: BEFORE.confirmed,
            }
        );
        // The same timeline, or nothing streamed yet: nothing to compare.
        let same = SessionFacts {
            timeline: 1,
            ..promoted(None, &[])
        };
        assert_eq!(verify_continuity(BEFORE, &same).unwrap(), Continuity::Same);
        assert_eq!(
            verify_continuity(Streamed::default(), &promoted(None, &[])).unwrap(),
            Continuity::Same
        );
    }

    #[test]
    fn a_promoted_server_without_the_slot_is_fatal_and_explained() {
        let history = [TimelineSwitch {
            timeline: 1,
            end: lsn("0/3000200"),
        }];
        let e = verify_continuity(BEFORE, &promoted(None, &history)).unwrap_err();
        assert!(!e.is_transient());
        let e = e.to_string();
        assert!(
            e.contains("pg2:5432")
                && e.contains("does not exist there")
                && e.contains("sync_replication_slots")
                && e.contains("will not create a new slot")
                && e.contains("0/3000100"),
            "{e}"
        );
    }

    #[test]
    fn a_switch_point_before_the_confirmed_position_is_fatal() {
        let history = [TimelineSwitch {
            timeline: 1,
            end: lsn("0/3000000"),
        }];
        let slot = synced("0/2F00000");
        let e = verify_continuity(BEFORE, &promoted(Some(&slot), &history))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("before the position 0/3000100")
                && e.contains("synchronized_standby_slots")
                && e.contains("between 0/3000000 and 0/3000100"),
            "{e}"
        );
    }

    #[test]
    fn a_synced_slot_another_process_advanced_is_followed() {
        let history = [TimelineSwitch {
            timeline: 1,
            end: lsn("0/3000400"),
        }];
        // This process confirmed 0/3000100; its peer confirmed up to 0/3000300 before the
        // promotion, and the slot was synced there.
        let ahead = synced("0/3000300");
        assert_eq!(
            verify_continuity(BEFORE, &promoted(Some(&ahead), &history)).unwrap(),
            Continuity::Promoted {
                from: 1,
                to: 2,
                switch: lsn("0/3000400"),
                slot_confirmed: lsn("0/3000300"),
                confirmed: BEFORE.confirmed,
            }
        );
    }

    #[test]
    fn a_history_holds_its_own_timeline_and_its_ancestors_up_to_their_ends() {
        let h = History {
            timeline: 3,
            switches: vec![
                TimelineSwitch {
                    timeline: 1,
                    end: lsn("0/3000000"),
                },
                TimelineSwitch {
                    timeline: 2,
                    end: lsn("0/5000000"),
                },
            ],
        };
        assert!(h.holds(3, lsn("0/1000000")) && h.holds(3, lsn("0/9000000")));
        assert!(h.holds(1, lsn("0/2FFFFFF")));
        assert!(!h.holds(1, lsn("0/3000000")), "past timeline 1's end");
        assert!(h.holds(2, lsn("0/4000000")));
        assert!(!h.holds(2, lsn("0/5000000")));
        assert!(!h.holds(4, lsn("0/1000000")), "a later timeline");
        assert_eq!(h.branch_point(), Some(lsn("0/5000000")));
        assert!(History::first().holds(1, lsn("F/0")));
        assert!(
            !History::first().holds(2, lsn("0/1")),
            "an old primary back"
        );
        assert_eq!(History::first().branch_point(), None);
    }

    #[test]
    fn unsynced_or_invalidated_slots_are_fatal() {
        let history = [TimelineSwitch {
            timeline: 1,
            end: lsn("0/3000200"),
        }];
        let created_there = SlotSync {
            synced: Some(false),
            ..synced("0/3000300")
        };
        let e = verify_continuity(BEFORE, &promoted(Some(&created_there), &history))
            .unwrap_err()
            .to_string();
        assert!(e.contains("synced = false"), "{e}");
        // Before 17 there is no synced column: the position rule still catches a new slot.
        let pg16 = SessionFacts {
            major: 16,
            ..promoted(Some(&created_there), &history)
        };
        // Before 17 a slot on a promoted server was copied by a tool: followed, and Kafka is
        // the measure of what was published.
        assert!(matches!(
            verify_continuity(BEFORE, &pg16).unwrap(),
            Continuity::Promoted { .. }
        ));
        let lost = SlotSync {
            invalidation_reason: Some("rows_removed".into()),
            ..synced("0/2F00000")
        };
        let e = verify_continuity(BEFORE, &promoted(Some(&lost), &history))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalidated (invalidation_reason = rows_removed)"),
            "{e}"
        );
    }

    #[test]
    fn an_older_or_unrelated_timeline_is_fatal() {
        let back = SessionFacts {
            timeline: 1,
            ..promoted(None, &[])
        };
        let e = verify_continuity(
            Streamed {
                timeline: 2,
                ..BEFORE
            },
            &back,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("is older") && e.contains("old primary"), "{e}");
        // Timeline 3 branched from 1, not from the 2 walship streamed on.
        let history = [TimelineSwitch {
            timeline: 1,
            end: lsn("0/2000000"),
        }];
        let sibling = SessionFacts {
            timeline: 3,
            ..promoted(None, &history)
        };
        let e = verify_continuity(
            Streamed {
                timeline: 2,
                ..BEFORE
            },
            &sibling,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not descend from timeline 2"), "{e}");
    }

    fn info(major: u32) -> ServerInfo {
        ServerInfo {
            address: "pg1:5432".into(),
            major,
            version: format!("{major}.1"),
            in_recovery: false,
            timeline: Some(1),
        }
    }

    fn physical(name: &str, active: bool) -> SlotSync {
        SlotSync {
            name: name.into(),
            slot_type: "physical".into(),
            active,
            ..SlotSync::default()
        }
    }

    #[test]
    fn primary_findings_say_what_to_set() {
        let settings = FailoverSettings::default();
        let info17 = info(17);
        let facts = PrimaryFacts {
            server: "pg1:5432",
            info: &info17,
            settings: &settings,
            physical: &[],
            slot: None,
            slot_name: "w",
            hosts: 2,
        };
        // Off, with two hosts: a warning that the slot will not follow.
        let off = primary_findings(false, &facts);
        assert_eq!(off.len(), 1);
        assert_eq!(off[0].level, Level::Warn);
        assert!(
            off[0]
                .fix
                .as_deref()
                .unwrap()
                .contains("postgres.failover_slot = true")
        );
        assert!(
            primary_findings(
                false,
                &PrimaryFacts {
                    hosts: 1,
                    ..facts.clone()
                }
            )
            .is_empty()
        );

        // On, PostgreSQL 16: refused.
        let info16 = info(16);
        let old = primary_findings(
            true,
            &PrimaryFacts {
                info: &info16,
                ..facts.clone()
            },
        );
        assert_eq!(old[0].level, Level::Fail);
        assert!(old[0].message.contains("PostgreSQL 16.1"), "{:?}", old[0]);

        // On, empty synchronized_standby_slots: fail with the physical slots to name.
        let phys = [physical("sb1", true)];
        let f = primary_findings(
            true,
            &PrimaryFacts {
                physical: &phys,
                ..facts.clone()
            },
        );
        let sss = f
            .iter()
            .find(|f| f.name.ends_with("synchronized_standby_slots"))
            .unwrap();
        assert_eq!(sss.level, Level::Fail);
        assert!(
            sss.fix
                .as_deref()
                .unwrap()
                .contains("synchronized_standby_slots = 'sb1'")
        );

        // Naming a missing slot stalls walship; naming an inactive one makes it wait.
        let named = FailoverSettings {
            synchronized_standby_slots: Some("sb1, \"sb2\"".into()),
            ..settings.clone()
        };
        let f = primary_findings(
            true,
            &PrimaryFacts {
                settings: &named,
                physical: &phys,
                ..facts.clone()
            },
        );
        let sss = f
            .iter()
            .find(|f| f.name.ends_with("synchronized_standby_slots"))
            .unwrap();
        assert_eq!(sss.level, Level::Fail);
        assert!(
            sss.message.contains("sb2 (no such physical slot)"),
            "{sss:?}"
        );
        let both = [physical("sb1", true), physical("sb2", false)];
        let f = primary_findings(
            true,
            &PrimaryFacts {
                settings: &named,
                physical: &both,
                ..facts.clone()
            },
        );
        let sss = f
            .iter()
            .find(|f| f.name.ends_with("synchronized_standby_slots"))
            .unwrap();
        assert_eq!(
            (sss.level, sss.message.contains("sb2")),
            (Level::Warn, true)
        );

        // A slot without failover: walship fixes it at start.
        let nf = SlotSync {
            failover: Some(false),
            ..synced("0/1")
        };
        let f = primary_findings(
            true,
            &PrimaryFacts {
                slot: Some(&nf),
                ..facts.clone()
            },
        );
        assert_eq!(f[0].level, Level::Warn);
        assert!(
            f[0].fix
                .as_deref()
                .unwrap()
                .contains("ALTER_REPLICATION_SLOT \"w\" (FAILOVER true)")
        );
    }

    #[test]
    fn standby_findings_say_what_to_set() {
        let good = FailoverSettings {
            synchronized_standby_slots: Some(String::new()),
            sync_replication_slots: Some(true),
            hot_standby_feedback: true,
            primary_slot_name: "sb1".into(),
            wal_receiver: Some("streaming".into()),
        };
        let names = ["sb1".to_owned()];
        let slot = synced("0/100");
        let facts = StandbyFacts {
            server: "pg2:5432",
            settings: &good,
            slot: Some(&slot),
            slot_name: "w",
            primary_confirmed: Some(lsn("0/180")),
            primary_standby_slots: &names,
        };
        let f = standby_findings(&facts);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].level, Level::Pass);
        assert!(f[0].message.contains("128 bytes behind"), "{f:?}");

        // A role without pg_read_all_stats sees the receiver's pid but not its state.
        let hidden = FailoverSettings {
            wal_receiver: Some("hidden".into()),
            ..good.clone()
        };
        let f = standby_findings(&StandbyFacts {
            settings: &hidden,
            ..facts.clone()
        });
        assert!(
            f.iter().any(|f| f.level == Level::Warn
                && f.message.contains("may not see whether it streams")
                && f.fix
                    .as_deref()
                    .is_some_and(|x| x.contains("pg_read_all_stats"))),
            "{f:?}"
        );

        let bad = FailoverSettings {
            synchronized_standby_slots: Some("sb1".into()),
            sync_replication_slots: Some(false),
            hot_standby_feedback: false,
            primary_slot_name: String::new(),
            wal_receiver: None,
        };
        let temporary = SlotSync {
            temporary: true,
            confirmed_flush_lsn: None,
            ..synced("0/1")
        };
        let f = standby_findings(&StandbyFacts {
            settings: &bad,
            slot: Some(&temporary),
            ..facts.clone()
        });
        let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "postgres.standby.sync_replication_slots",
                "postgres.standby.hot_standby_feedback",
                "postgres.standby.primary_slot_name",
                "postgres.standby.synchronized_standby_slots",
                "postgres.standby.streaming",
                "postgres.standby.slot",
            ]
        );
        assert!(
            f[5].message.contains("first sync")
                && f[5]
                    .fix
                    .as_deref()
                    .unwrap()
                    .contains("pg_log_standby_snapshot")
        );
        let f = standby_findings(&StandbyFacts {
            slot: None,
            ..facts.clone()
        });
        assert!(f[0].message.contains("not on standby pg2:5432"), "{f:?}");
        let other = ["sb9".to_owned()];
        let f = standby_findings(&StandbyFacts {
            primary_standby_slots: &other,
            ..facts.clone()
        });
        assert_eq!(f[0].name, "postgres.standby.primary_slot_name");
    }

    #[test]
    fn version_requirement_names_the_server_version() {
        assert!(require_support(&info(17), "pg1:5432").is_ok());
        let e = require_support(&info(16), "pg1:5432")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("PostgreSQL 17 or later")
                && e.contains("pg1:5432 runs PostgreSQL 16.1")
                && e.contains("postgres.failover_slot = false"),
            "{e}"
        );
        assert!(create_slot_sql(true).contains("false, false, true"));
        assert!(!create_slot_sql(false).contains("true"));
    }
}
