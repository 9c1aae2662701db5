//! What start-up creates: the publication and the replication slot, and the slot history that
//! tells a dropped slot from a first start; with `postgres.failover_slot`, the slot as a
//! PostgreSQL 17+ failover slot (created as one, or turned into one with
//! `ALTER_REPLICATION_SLOT`).
//!
//! ```text
//!  ensure_publication: outbox table exists? ─▶ publication exists, or create it (if configured)
//!                      ─▶ catalog::outbox_scope (fails unless it sends the outbox's inserts)
//!  ensure_slot: slot exists? ─no─▶ slot history says walship created it? ─yes─▶ refuse (dropped)
//!                                  └─no─▶ create it (if configured) and record it in the history
//!                                         (failover = true with postgres.failover_slot, 17+)
//!               ─▶ catalog::validate_slot (pgoutput, not lost)
//!  enable: an existing slot with failover = false ─▶ ALTER_REPLICATION_SLOT (FAILOVER true)
//! ```
//!
//! Invariant: walship never creates a slot to replace one that existed and disappeared or was
//! invalidated. Creating a slot starts streaming at the server's *current* position, so doing
//! that silently would skip every event committed in between. Missing-at-first-start is the only
//! case that creates one, and only when configured to. Likewise a publication is created only
//! when missing and configured to; an existing one is never altered.

use tokio_postgres::Client;
use tokio_postgres::types::PgLsn;

use crate::catalog::failover::{MIN_MAJOR, ServerInfo};
use crate::catalog::{
    self, OutboxScope, SlotState, Unprotected, history_access, history_table_ddl, lsn, slot_state,
    validate_slot,
};
use crate::error::{PgError, sql_err};
use crate::ident::{TableName, quote_ident};
use crate::replication::{ConnectParams, ReplicationStream};

/// How often a slot creation that is still waiting for open transactions says so.
const SLOT_CREATION_NOTICE: std::time::Duration = std::time::Duration::from_secs(10);

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
pub(crate) fn alter_slot_fix(slot: &str) -> String {
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

/// Where walship remembers the slots it created, so that a slot that disappeared later is
/// recognised as dropped (and refused) instead of being created again as if for the first time.
#[derive(Debug, Clone)]
pub struct SlotHistory {
    /// The table (`schema.walship_slots` by default); `None` disables the memory.
    pub table: Option<TableName>,
}

/// A slot walship created, as the slot history records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The history table that records it.
    pub table: TableName,
    /// When walship created it (`created_at`, as text).
    pub at: String,
    /// The slot's consistent point when created (`created_lsn`, as text).
    pub lsn: String,
}

impl SlotHistory {
    /// When and at which LSN walship created `slot`, if the history is kept and records it. A
    /// missing slot with a record was dropped: start-up refuses to create it again, and `check`
    /// says so.
    pub async fn created(
        &self,
        client: &Client,
        slot: &str,
    ) -> Result<Option<CreatedSlot>, PgError> {
        let Some(table) = &self.table else {
            return Ok(None);
        };
        Ok(created_before(client, table, slot)
            .await?
            .map(|(at, lsn)| CreatedSlot {
                table: table.clone(),
                at,
                lsn,
            }))
    }
}

/// Makes sure the slot exists and is usable; creates it when missing, `create` is set, and the
/// slot history does not show that walship created it before.
pub async fn ensure_slot(
    client: &Client,
    slot: &str,
    create: bool,
    history: &SlotHistory,
    failover: bool,
) -> Result<SlotState, PgError> {
    let state = match slot_state(client, slot).await? {
        Some(s) => s,
        None => {
            if let Some(CreatedSlot {
                table,
                at: created_at,
                lsn: created_lsn,
            }) = history.created(client, slot).await?
            {
                return Err(PgError::Setup(format!(
                    "replication slot {slot:?} does not exist, but walship created it on {created_at} at LSN \
                     {created_lsn} (recorded in {table}): it has been dropped since, and creating a new one \
                     would silently skip every event committed in between. Reconcile the outbox table with \
                     Kafka, then run DELETE FROM {} WHERE slot_name = '{slot}'; and start walship again",
                    table.quoted()
                )));
            }
            if !create {
                return Err(PgError::Setup(format!(
                    "replication slot {slot:?} does not exist and postgres.create_slot is false: create it \
                     with SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); or set \
                     postgres.create_slot = true"
                )));
            }
            tracing::info!(slot, "creating logical replication slot (pgoutput)");
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
            let create = client.query_one(create_slot_sql(failover), &params);
            tokio::pin!(create);
            let started = std::time::Instant::now();
            let created = loop {
                tokio::select! {
                    created = &mut create => break created,
                    () = tokio::time::sleep(SLOT_CREATION_NOTICE) => tracing::warn!(
                        slot,
                        waited_s = started.elapsed().as_secs(),
                        "still creating replication slot {slot:?}: PostgreSQL waits for the \
                         transactions holding an xid (prepared ones included) to end; find them \
                         in pg_stat_activity (backend_xid) and pg_prepared_xacts"
                    ),
                }
            };
            let row = match created {
                Ok(row) => row,
                Err(source) if source.code().is_some_and(|c| c.code() == "42501") => {
                    let user: String =
                        match client.query_one("SELECT current_user::text", &[]).await {
                            Ok(r) => r.get(0),
                            Err(_) => "<user>".into(),
                        };
                    return Err(PgError::Setup(format!(
                        "cannot create replication slot {slot:?}: user {user:?} lacks the REPLICATION attribute \
                         ({source}); grant it with ALTER ROLE {u} REPLICATION; (on Amazon RDS or Aurora: \
                         GRANT rds_replication TO {u};) or create the slot as a superuser",
                        u = quote_ident(&user)
                    )));
                }
                Err(source) => {
                    return Err(PgError::Sql {
                        context: format!("creating replication slot {slot:?}"),
                        source,
                    });
                }
            };
            let created_lsn: Option<PgLsn> = row.get(0);
            tracing::info!(
                slot,
                consistent_point = %lsn(created_lsn).map_or_else(|| "unknown".to_owned(), |l| l.to_string()),
                "created logical replication slot (pgoutput): transactions committing after \
                 the consistent point are published, earlier ones never are"
            );
            if let Some(table) = &history.table {
                remember_slot(client, table, slot, created_lsn).await;
            }
            slot_state(client, slot).await?.ok_or_else(|| {
                PgError::Setup(format!(
                    "replication slot {slot:?} vanished right after creation"
                ))
            })?
        }
    };
    validate_slot(&state)?;
    Ok(state)
}

/// When and at which LSN walship created `slot`, if `table` records it.
async fn created_before(
    client: &Client,
    table: &TableName,
    slot: &str,
) -> Result<Option<(String, String)>, PgError> {
    if !table_exists(client, table).await? {
        return Ok(None);
    }
    let sql = format!(
        "SELECT created_at::text, COALESCE(created_lsn::text, 'unknown') FROM {} \
         WHERE slot_name = $1",
        table.quoted()
    );
    let row = client
        .query_opt(&sql, &[&slot])
        .await
        .map_err(sql_err(format!("reading {table}")))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// When the slot history does not protect `slot` (G6: a dropped slot is never re-created
/// silently): the history is kept but cannot be written, or holds no record of the slot (it
/// was created by hand, or while the history could not be written). `None` when protected, or
/// when the history is off (`postgres.slot_history_table = ""`, the operator's choice).
pub async fn unprotected_slot(
    client: &Client,
    history: &SlotHistory,
    slot: &str,
) -> Result<Option<Unprotected>, PgError> {
    let Some(table) = &history.table else {
        return Ok(None);
    };
    let role: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .map_err(sql_err("reading the current user"))?
        .get(0);
    if let Some(problem) = history_access(client, table).await?.problem(table, &role) {
        return Ok(Some(problem));
    }
    if history.created(client, slot).await?.is_some() {
        return Ok(None);
    }
    Ok(Some(Unprotected {
        message: format!(
            "replication slot {slot:?} is not recorded in the slot history table {table} (it was \
             created by hand, or while walship could not write the table), so G6's protection is \
             off for it: if it were dropped, walship would create a new one and silently skip \
             every event committed in between"
        ),
        fix: format!(
            "INSERT INTO {} (slot_name) VALUES ('{}') ON CONFLICT DO NOTHING;",
            table.quoted(),
            slot.replace('\'', "''")
        ),
    }))
}

/// Records a slot walship created, creating the table first when it is missing (a table made
/// by an administrator is used as it is: walship then needs only SELECT, INSERT and UPDATE on
/// it). Failing to record is a warning, not an error: walship still works, but cannot tell a
/// later drop from a first start; every start says so again ([`unprotected_slot`]).
async fn remember_slot(client: &Client, table: &TableName, slot: &str, lsn: Option<PgLsn>) {
    let create = format!(
        "{}; COMMENT ON TABLE {} IS 'Replication slots walship created; a listed slot that no \
         longer exists was dropped.'",
        history_table_ddl(table),
        table.quoted()
    );
    let insert = format!(
        "INSERT INTO {} (slot_name, created_lsn) VALUES ($1, $2) ON CONFLICT (slot_name) DO UPDATE SET \
         created_at = now(), created_lsn = EXCLUDED.created_lsn",
        table.quoted()
    );
    let result = async {
        // CREATE TABLE IF NOT EXISTS checks the schema's CREATE privilege even when the table
        // exists, so only a missing table is created.
        if !table_exists(client, table).await.unwrap_or(false) {
            client.batch_execute(&create).await?;
        }
        client.execute(&insert, &[&slot, &lsn]).await
    }
    .await;
    if let Err(e) = result {
        let role = client
            .query_one("SELECT current_user::text", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|_| "<walship's user>".into());
        let fix = match history_access(client, table)
            .await
            .map(|a| a.problem(table, &role))
        {
            Ok(Some(problem)) => problem.fix,
            _ => format!(
                "make {table} writable for {role}, or set postgres.slot_history_table = \"\""
            ),
        };
        tracing::warn!(
            %table,
            "cannot record the new slot {slot:?} in {table} ({e}): G6's protection against \
             re-creating a dropped slot is off for it, so if it were dropped walship would \
             create a new one and silently skip every event committed in between; fix: {fix}"
        );
    }
}

async fn table_exists(client: &Client, table: &TableName) -> Result<bool, PgError> {
    let row = client
        .query_opt(
            "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(sql_err(format!("looking up table {table}")))?;
    Ok(row.is_some())
}

/// Makes sure the publication exists and publishes the outbox's inserts; creates it when
/// missing and `create` is set (inserts only, partitions under the parent's name: see
/// [`catalog::create_publication_sql`]). Returns what the stream needs to recognise the outbox.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    table: &TableName,
    create: bool,
) -> Result<OutboxScope, PgError> {
    if catalog::outbox_family(client, table).await?.is_none() {
        return Err(PgError::Setup(format!(
            "outbox table {table} does not exist: create it (walship init-sql prints a definition) or \
             set outbox.table to the right schema.table"
        )));
    }
    if catalog::publication_info(client, publication)
        .await?
        .is_none()
    {
        let sql = catalog::create_publication_sql(publication, table);
        if !create {
            return Err(PgError::Setup(format!(
                "publication {publication:?} does not exist and postgres.create_publication is false: \
                 run {sql};"
            )));
        }
        client
            .batch_execute(&sql)
            .await
            .map_err(sql_err(format!("creating publication {publication:?}")))?;
        tracing::info!(publication, %table, "created publication");
    }
    catalog::outbox_scope(client, publication, table).await
}

#[cfg(test)]
mod tests;
