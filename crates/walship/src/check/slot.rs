//! The replication slot in `walship check`: it exists or can be created, decodes with
//! pgoutput, belongs to this database, keeps its WAL, is not taken by another consumer, and is
//! not far behind; a missing slot that the slot history says walship created is reported as
//! dropped.
//!
//! Invariant: the conditions are the catalog's (`walship_postgres::catalog`: the plugin, the
//! WAL retention, the slot history), the same start-up refuses by; this module only words them
//! as checks with their fixes.

use pgoutput::Lsn;
use tokio_postgres::Client;
use walship_postgres::SlotState;
use walship_postgres::catalog::{self, WalRetention};
use walship_postgres::setup::CreatedSlot;

use super::report::Check;
use crate::command::human_bytes;
use crate::config::Config;
use crate::config::settings::SourceParts;

/// Slot lag above which `check` warns.
const LAG_WARN_BYTES: u64 = 1 << 30;

/// The slot as the server has it now: a missing slot that walship created before was dropped
/// (run refuses to re-create it); anything else goes through [`slot_checks`], with the server's
/// current WAL position for the lag.
pub(super) async fn server_slot_checks(
    config: &Config,
    source: &SourceParts,
    client: &Client,
    state: Option<&SlotState>,
    database: &str,
) -> Vec<Check> {
    let slot = config.postgres.slot.as_str();
    if state.is_none()
        && let Some(created) = source.history.created(client, slot).await.ok().flatten()
    {
        return vec![dropped_slot(slot, &created)];
    }
    let current = catalog::current_wal_lsn(client).await.ok();
    slot_checks(slot, config.postgres.create_slot, state, database, current)
}

/// A slot walship created that no longer exists.
fn dropped_slot(slot: &str, created: &CreatedSlot) -> Check {
    let CreatedSlot { table, at, lsn } = created;
    Check::fail(
        "postgres.slot",
        format!(
            "slot {slot:?} does not exist, but walship created it on {at} at LSN {lsn} (recorded \
             in {table}): it was dropped since, and walship will not create a new one because that \
             would skip the events committed in between"
        ),
        format!(
            "reconcile the outbox table with Kafka, then DELETE FROM {} WHERE slot_name = '{slot}';",
            table.quoted()
        ),
    )
}

/// The slot: exists or can be created; pgoutput; this database; WAL kept; not taken; lag.
pub fn slot_checks(
    slot: &str,
    create: bool,
    state: Option<&SlotState>,
    database: &str,
    current_wal_lsn: Option<Lsn>,
) -> Vec<Check> {
    const NAME: &str = "postgres.slot";
    let Some(state) = state else {
        return vec![if create {
            Check::pass(
                NAME,
                format!(
                    "slot {slot:?} does not exist yet; walship creates it (pgoutput) on its first \
                     start and captures transactions committed from then on"
                ),
            )
        } else {
            Check::fail(
                NAME,
                format!(
                    "replication slot {slot:?} does not exist and postgres.create_slot is false"
                ),
                format!(
                    "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); or set \
                     postgres.create_slot = true"
                ),
            )
        }];
    };
    let lsn_text = |l: Option<Lsn>| l.map_or_else(|| "unknown".to_owned(), |l| l.to_string());
    let mut checks = Vec::new();
    if !state.uses_pgoutput() {
        checks.push(Check::fail(
            NAME,
            format!(
                "slot {slot:?} uses output plugin {:?}; walship needs pgoutput",
                state.plugin_name()
            ),
            format!(
                "set postgres.slot to another name, or drop this slot if nothing uses it: SELECT \
                 pg_drop_replication_slot('{slot}');"
            ),
        ));
    } else if state.database.as_deref() != Some(database) {
        checks.push(Check::fail(
            NAME,
            format!(
                "slot {slot:?} belongs to database {}, but postgres.url connects to {database}",
                state.database.as_deref().unwrap_or("(none)")
            ),
            "set postgres.slot to a slot of this database (or a new name), or point postgres.url \
             at the slot's database",
        ));
    } else {
        checks.push(Check::pass(
            NAME,
            format!("slot {slot:?} exists (pgoutput, database {database})"),
        ));
    }

    const WAL: &str = "postgres.slot.wal_status";
    match state.retention() {
        WalRetention::Lost => checks.push(Check::fail(
            WAL,
            format!(
                "slot {slot:?} is invalidated ({}, confirmed_flush_lsn {}): {}, so events \
                 committed after the confirmed position may never reach Kafka",
                state.lost_description(),
                lsn_text(state.confirmed_flush_lsn),
                state.invalidation_cause().0
            ),
            format!(
                "reconcile the outbox table with Kafka (re-publish events after the confirmed \
                 position), then SELECT pg_drop_replication_slot('{slot}'); and start walship to \
                 create a new slot; {}",
                state.invalidation_cause().1
            ),
        )),
        WalRetention::AtRisk => checks.push(Check::warn(
            WAL,
            format!(
                "slot {slot:?} is at risk (wal_status = unreserved): the WAL it needs is beyond \
                 max_wal_size and will be removed at the next checkpoint unless walship catches up"
            ),
            "start walship (or let it catch up) now; raise max_slot_wal_keep_size",
        )),
        WalRetention::Kept => checks.push(Check::pass(
            WAL,
            format!(
                "wal_status = {}",
                state.wal_status.as_deref().unwrap_or("unknown")
            ),
        )),
    }

    const ACTIVE: &str = "postgres.slot.consumer";
    match state.active_pid {
        Some(pid) => checks.push(Check::warn(
            ACTIVE,
            format!(
                "slot {slot:?} is in use by walsender pid {pid}: another walship (or another \
                 consumer) is streaming from it, and a second walship would retry until it \
                 disconnects"
            ),
            format!(
                "if that is this walship, nothing to do; otherwise stop the other consumer \
                 (SELECT application_name, client_addr FROM pg_stat_replication WHERE pid = {pid}; \
                 then SELECT pg_terminate_backend({pid});)"
            ),
        )),
        None => checks.push(Check::pass(ACTIVE, "no other consumer is using the slot")),
    }

    const LAG: &str = "postgres.slot.lag";
    match (current_wal_lsn, state.confirmed_flush_lsn) {
        (Some(current), Some(confirmed)) => {
            let lag = catalog::lag_bytes(current, confirmed);
            let message = format!(
                "confirmed_flush_lsn {confirmed} is {} behind pg_current_wal_lsn() {current}",
                human_bytes(lag)
            );
            if lag > LAG_WARN_BYTES {
                checks.push(Check::warn(
                    LAG,
                    message,
                    "start walship if it is not running; if it is, look at its logs for broker \
                     problems (the slot holds this much WAL on the server)",
                ));
            } else {
                checks.push(Check::pass(LAG, message));
            }
        }
        _ => checks.push(Check::skip(LAG, "the slot has no confirmed position")),
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::report::Status;

    #[test]
    fn slot_lost_fails_unreserved_and_active_warn() {
        let mut s = SlotState {
            name: "w".into(),
            plugin: Some("pgoutput".into()),
            database: Some("app".into()),
            confirmed_flush_lsn: Some(Lsn(100)),
            restart_lsn: Some(Lsn(50)),
            wal_status: Some("lost".into()),
            invalidation_reason: None,
            active_pid: None,
            safe_wal_size: None,
        };
        let c = slot_checks("w", true, Some(&s), "app", Some(Lsn(300)));
        let by = |c: &[Check], n: &str| c.iter().find(|c| c.name == n).unwrap().clone();
        let lost = by(&c, "postgres.slot.wal_status");
        assert_eq!(lost.status, Status::Fail);
        assert!(lost.fix.unwrap().contains("pg_drop_replication_slot('w')"));
        // 18's idle_replication_slot_timeout: the cause and the setting named, not the WAL size.
        s.invalidation_reason = Some("idle_timeout".into());
        let c = slot_checks("w", true, Some(&s), "app", Some(Lsn(300)));
        let idle = by(&c, "postgres.slot.wal_status");
        assert!(
            idle.message.contains("invalidation_reason = idle_timeout"),
            "{idle:?}"
        );
        let fix = idle.fix.unwrap();
        assert!(
            fix.contains("idle_replication_slot_timeout")
                && !fix.contains("max_slot_wal_keep_size")
        );
        s.invalidation_reason = None;
        assert!(by(&c, "postgres.slot.lag").message.contains("200 bytes"));
        s.wal_status = Some("unreserved".into());
        s.active_pid = Some(42);
        let c = slot_checks("w", true, Some(&s), "app", Some(Lsn(100)));
        assert_eq!(by(&c, "postgres.slot.wal_status").status, Status::Warn);
        let active = by(&c, "postgres.slot.consumer");
        assert_eq!(active.status, Status::Warn);
        assert!(active.message.contains("42"));
        assert_eq!(by(&c, "postgres.slot").status, Status::Pass);
        let c = slot_checks("w", true, Some(&s), "other", None);
        assert_eq!(by(&c, "postgres.slot").status, Status::Fail);
        let c = slot_checks("w", false, None, "app", None);
        assert_eq!(c[0].status, Status::Fail);
        assert!(
            c[0].fix
                .as_deref()
                .unwrap()
                .contains("pg_create_logical_replication_slot")
        );
    }
}
