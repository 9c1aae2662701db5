//! The PostgreSQL catalog as walship reads it, and the rules it applies to what it reads: which
//! relations are the outbox, whether the publication sends them, whether the slot can be
//! streamed from. Start-up, the watchdog, the stream, `check` and `status` share these rules.
//!
//! ```text
//!  outbox.table ─▶ OutboxFamily (root oid + every partition, any depth)           [outbox]
//!  publication ──▶ PublicationInfo ─▶ coverage(family): outbox? inserts? partition names?
//!                        │             (start-up, watchdog, check, status)      [publication]
//!                        └─▶ OutboxScope (the stream: which Relation messages are the outbox)
//!  slot ─────────▶ SlotState ─▶ uses_pgoutput, retention (kept / at risk / lost)    [slot]
//!                        └─▶ validate_slot (start-up, watchdog); check and status read the same
//!  server ───────▶ ServerSettings, ReplicationUsage, RoleInfo, wal_level rule      [server]
//!  privileges ───▶ slot history access (G6), who may emit logical messages     [privilege]
//!  failover ─────▶ ServerInfo, SlotSync, FailoverSettings (17+ failover slots)   [failover]
//! ```
//!
//! Invariants:
//! - Nothing here changes the database; each rule lives in one function that every caller
//!   applies, and callers only word the verdict (an error at start-up, a check line, a status
//!   field).
//! - A relation pgoutput sends is treated as "not the outbox" only when the catalog says so.
//!   The outbox is identified by its OID and its partitions' OIDs, not just by name, so rows of
//!   a partitioned outbox arrive as events whether the publication publishes them under the
//!   root's name (`publish_via_partition_root = true`) or under each partition's, a partition
//!   attached while walship runs is still the outbox, and a renamed outbox is recognised (and
//!   reported) instead of being mistaken for another table. A relation the catalog cannot place
//!   (dropped since, in a publication that also publishes other tables) is an error when a row of
//!   it arrives: walship stops before confirming it.
//! - A missing, lost or foreign-plugin slot is a definite error, never a reason to create one.

// A module of its own in the public path: its `slot` and `settings` read what failover slots
// need, and would be ambiguous among the catalog's other reads.
pub mod failover;
mod outbox;
mod privilege;
mod publication;
mod server;
mod slot;

use pgoutput::Lsn;
use tokio_postgres::Client;

pub use outbox::{
    ColumnInfo, OutboxFamily, OutboxScope, TableInfo, distinct_values, outbox_family,
    place_relation, relation_name, table_columns, table_info,
};
pub use privilege::{
    EmitAccess, HistoryAccess, Unprotected, emit_access, emit_grants, heartbeat_grant,
    history_access, history_grant, history_table_ddl,
};
pub use publication::{
    Coverage, PublicationInfo, create_publication_sql, outbox_scope, publication_info,
    publication_problem, published_outbox,
};
pub use server::{
    ReplicationRight, ReplicationUsage, RoleInfo, ServerSettings, check_wal_level,
    is_logical_wal_level, replication_usage, role_info, server_settings, wal_sender_timeout,
};
pub(crate) use slot::lsn;
pub use slot::{
    PLUGIN, SlotExtra, SlotState, WalRetention, current_wal_lsn, lag_bytes, slot_extra, slot_state,
    validate_slot,
};

use crate::error::PgError;
use crate::ident::TableName;

/// What the watchdog saw: the slot, and the server's current WAL position (for the lag metric;
/// `None` if it could not be read).
#[derive(Debug, Clone)]
pub struct Watched {
    /// The slot as the catalog has it.
    pub slot: SlotState,
    /// `pg_current_wal_lsn()`.
    pub wal_end: Option<Lsn>,
}

/// The watchdog's check, while walship runs, that what it streams from still exists: the slot (not
/// invalidated), the publication, and the outbox table in it (by the rule of
/// [`publication_problem`]; `outbox_oid` is the table's OID at start, to tell a rename
/// from a drop). Returns the first definite problem, else what it saw.
pub async fn watch(
    client: &Client,
    slot: &str,
    publication: &str,
    table: &TableName,
    outbox_oid: Option<u32>,
) -> Result<Watched, PgError> {
    let state = match slot_state(client, slot).await? {
        None => {
            return Err(PgError::Setup(format!(
                "replication slot {slot:?} was dropped while walship was running; it will not be re-created \
                 automatically because that would skip every event committed since. Reconcile the outbox \
                 with Kafka, then remove the slot's row from the slot history table and restart walship"
            )));
        }
        Some(state) => {
            validate_slot(&state)?;
            state
        }
    };
    published_outbox(client, publication, table, outbox_oid, true).await?;
    let wal_end = match current_wal_lsn(client).await {
        Ok(end) => Some(end),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the server's WAL position");
            None
        }
    };
    Ok(Watched {
        slot: state,
        wal_end,
    })
}
