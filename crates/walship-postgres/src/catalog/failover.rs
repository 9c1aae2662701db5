//! What failover slots (PostgreSQL 17+) need read from the catalog: who a server is (version,
//! role, timeline), the replication slots with the columns failover adds (`failover`, `synced`,
//! `conflicting`, `invalidation_reason`), and the settings slot synchronization depends on.
//! `walship check`, start-up and each session after a promotion read these; the verdicts on them
//! are the failover module's.
//!
//! Invariant: read-only, and a column or setting that a server's version lacks reads as `None`
//! (slot columns through `to_jsonb`, settings with `missing_ok`), never as an error, so the same
//! reads work on every supported version.

use pgoutput::Lsn;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use crate::error::{PgError, sql_err};

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
