//! Replication slots as the catalog has them: a slot's state, and whether walship can stream
//! from it.
//!
//! Invariant: read-only, and one rule for every reader. A slot walship can stream from uses
//! pgoutput ([`SlotState::uses_pgoutput`]) and is not lost ([`WalRetention`]); start-up and
//! the watchdog refuse any other ([`validate_slot`]), `walship check` reports the same
//! conditions with their fixes, and `walship status` calls a lost slot unhealthy. A lost slot
//! is never a reason to create a new one: that would skip every event committed since its
//! confirmed position.

use pgoutput::Lsn;
use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use crate::error::{PgError, sql_err};

/// The output plugin walship streams with.
pub const PLUGIN: &str = "pgoutput";

/// What `pg_replication_slots` says about a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// Slot name.
    pub name: String,
    /// Output plugin (`pgoutput` for walship's slots).
    pub plugin: Option<String>,
    /// Database the slot belongs to.
    pub database: Option<String>,
    /// Position up to which the consumer has confirmed; streaming resumes here.
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Oldest WAL the slot still needs.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Why PostgreSQL invalidated the slot (`wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`, and from 18 `idle_timeout`); `None` while it is valid, and always
    /// on PostgreSQL 15 and 16, which do not have the column.
    pub invalidation_reason: Option<String>,
    /// PID of the walsender using the slot, if any.
    pub active_pid: Option<i32>,
    /// `safe_wal_size`: bytes that can still be written before the slot is in danger of being
    /// invalidated; `None` when unlimited (`max_slot_wal_keep_size = -1`) or the slot is lost.
    pub safe_wal_size: Option<i64>,
}

impl SlotState {
    /// True when the slot decodes with pgoutput, the only plugin walship reads.
    pub fn uses_pgoutput(&self) -> bool {
        self.plugin.as_deref() == Some(PLUGIN)
    }

    /// The output plugin for a message; a physical slot has none.
    pub fn plugin_name(&self) -> &str {
        self.plugin.as_deref().unwrap_or("(none: physical slot)")
    }

    /// Whether PostgreSQL still keeps the WAL the slot needs.
    pub fn retention(&self) -> WalRetention {
        WalRetention::of(self.wal_status.as_deref())
    }

    /// True when the slot is invalidated (`wal_status = lost`).
    pub fn is_lost(&self) -> bool {
        self.retention() == WalRetention::Lost
    }

    /// Why a lost slot was lost and how to keep it from happening again, as two phrases for an
    /// error message: ("PostgreSQL removed WAL it still needed", "raise max_slot_wal_keep_size
    /// …"). Before PostgreSQL 17 the server does not say why; removed WAL was then the only
    /// cause on a primary.
    pub fn invalidation_cause(&self) -> (String, String) {
        match self.invalidation_reason.as_deref() {
            None | Some("wal_removed") => (
                "PostgreSQL removed WAL it still needed".into(),
                "raise max_slot_wal_keep_size so it does not happen again".into(),
            ),
            Some("idle_timeout") => (
                "nothing streamed from it for longer than idle_replication_slot_timeout, so \
                 PostgreSQL stopped keeping its WAL"
                    .into(),
                "set idle_replication_slot_timeout above the longest time walship may be stopped, \
                 or to 0 (off) so it does not happen again"
                    .into(),
            ),
            Some("rows_removed") => (
                "catalog rows it still needed were removed (a slot on a standby without \
                 hot_standby_feedback and a physical slot on the primary)"
                    .into(),
                "use hot_standby_feedback = on and primary_slot_name on the standby so it does \
                 not happen again"
                    .into(),
            ),
            Some("wal_level_insufficient") => (
                "wal_level on the primary was lowered below logical".into(),
                "keep wal_level = logical on the primary so it does not happen again".into(),
            ),
            Some(other) => (
                format!("PostgreSQL invalidated it (invalidation_reason = {other})"),
                "find out why before relying on a new slot".into(),
            ),
        }
    }

    /// `wal_status = lost` and, where the server gives it (17+), `invalidation_reason = …`.
    fn lost_status(&self) -> String {
        match &self.invalidation_reason {
            Some(reason) => format!("wal_status = lost, invalidation_reason = {reason}"),
            None => "wal_status = lost".into(),
        }
    }

    /// The start of every message about a lost slot: its status and positions.
    pub fn lost_description(&self) -> String {
        format!(
            "{}, restart_lsn {}",
            self.lost_status(),
            self.restart_lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "unknown".into())
        )
    }
}

/// How PostgreSQL keeps the WAL a slot needs: the one reading of
/// `pg_replication_slots.wal_status` that start-up, the watchdog, `check` and `status` share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalRetention {
    /// `reserved` or `extended` (or not reported): the WAL is kept.
    Kept,
    /// `unreserved`: the WAL the slot needs is beyond `max_wal_size` and is removed at the next
    /// checkpoint unless the slot catches up.
    AtRisk,
    /// `lost`: the slot is invalidated; events after its confirmed position may be gone.
    Lost,
}

impl WalRetention {
    /// Reads a `wal_status` value.
    pub fn of(wal_status: Option<&str>) -> WalRetention {
        match wal_status {
            Some("lost") => WalRetention::Lost,
            Some("unreserved") => WalRetention::AtRisk,
            _ => WalRetention::Kept,
        }
    }
}

/// A server LSN as walship's [`Lsn`].
pub(crate) fn lsn(v: Option<PgLsn>) -> Option<Lsn> {
    v.map(|l| Lsn(u64::from(l)))
}

/// The server's current WAL insert position.
pub async fn current_wal_lsn(client: &Client) -> Result<Lsn, PgError> {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()", &[])
        .await
        .map_err(sql_err("reading pg_current_wal_lsn()"))?;
    Ok(lsn(row.get(0)).unwrap_or_default())
}

/// Reads a slot's state, or `None` if it does not exist.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, PgError> {
    let row = client
        .query_opt(
            // invalidation_reason exists from PostgreSQL 17 on: read through to_jsonb, it is
            // NULL on 15 and 16 instead of an error.
            "SELECT slot_name::text, plugin::text, database::text, confirmed_flush_lsn, restart_lsn, \
                    wal_status, active_pid, to_jsonb(s) ->> 'invalidation_reason', safe_wal_size \
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql_err(format!("reading replication slot {slot:?}")))?;
    Ok(row.map(|r| SlotState {
        name: r.get(0),
        plugin: r.get(1),
        database: r.get(2),
        confirmed_flush_lsn: lsn(r.get(3)),
        restart_lsn: lsn(r.get(4)),
        wal_status: r.get(5),
        invalidation_reason: r.get(7),
        active_pid: r.get(6),
        safe_wal_size: r.get(8),
    }))
}

/// Rejects slots walship cannot stream from (start-up and the watchdog): another plugin than
/// pgoutput, or lost.
pub fn validate_slot(state: &SlotState) -> Result<(), PgError> {
    let slot = &state.name;
    if !state.uses_pgoutput() {
        return Err(PgError::Setup(format!(
            "replication slot {slot:?} uses output plugin {:?}, walship needs pgoutput: use another \
             slot name, or drop it with SELECT pg_drop_replication_slot('{slot}'); if nothing else uses it",
            state.plugin_name()
        )));
    }
    if state.is_lost() {
        let (cause, prevent) = state.invalidation_cause();
        return Err(PgError::Setup(format!(
            "replication slot {slot:?} has been invalidated ({}): {cause}, so events committed \
             after its confirmed position {} may be gone. walship will not re-create it silently. \
             Reconcile the outbox table with Kafka, then drop the slot (SELECT \
             pg_drop_replication_slot('{slot}');) and start walship again to create a new one; \
             {prevent}",
            state.lost_description(),
            state
                .confirmed_flush_lsn
                .map(|l| l.to_string())
                .unwrap_or_else(|| "unknown".into()),
        )));
    }
    Ok(())
}

/// Slot columns that [`SlotState`] does not carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotExtra {
    /// `safe_wal_size`: bytes that can still be written before the slot is in danger of being
    /// invalidated; `None` when unlimited (`max_slot_wal_keep_size = -1`) or the slot is lost.
    pub safe_wal_size: Option<i64>,
}

/// Reads the extra slot columns; `None` when the slot does not exist.
pub async fn slot_extra(client: &Client, slot: &str) -> Result<Option<SlotExtra>, PgError> {
    let row = client
        .query_opt(
            "SELECT safe_wal_size FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(sql_err(format!("reading replication slot {slot:?}")))?;
    Ok(row.map(|r| SlotExtra {
        safe_wal_size: r.get(0),
    }))
}

/// Bytes of WAL between `from` and `to` (0 when `from` is ahead).
pub fn lag_bytes(to: Lsn, from: Lsn) -> u64 {
    to.0.saturating_sub(from.0)
}

#[cfg(test)]
mod tests;
