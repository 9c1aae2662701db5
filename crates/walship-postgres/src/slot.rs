//! The management (SQL) connection: preflight, slot and publication setup, slot state.
//!
//! Invariant: walship never creates a slot to replace one that existed and disappeared or was
//! invalidated. Creating a slot starts streaming at the server's *current* position, so doing
//! that silently would skip every event committed in between. Missing-at-first-start is the only
//! case that creates one, and only when configured to.

use pgoutput::Lsn;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, NoTls};

use crate::catalog::{self, OutboxScope};
use crate::error::{PgError, sql_err};
use crate::replication::ConnectParams;
use crate::tls::SslMode;

/// How often a slot creation that is still waiting for open transactions says so.
const SLOT_CREATION_NOTICE: std::time::Duration = std::time::Duration::from_secs(10);

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    /// Schema (namespace).
    pub schema: String,
    /// Table.
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`). Quoting is not needed: names are
    /// taken literally, as they appear in `pg_class`.
    pub fn parse(s: &str) -> TableName {
        match s.split_once('.') {
            Some((schema, name)) => TableName {
                schema: schema.to_owned(),
                name: name.to_owned(),
            },
            None => TableName {
                schema: "public".to_owned(),
                name: s.to_owned(),
            },
        }
    }

    /// The name quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

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
}

impl SlotState {
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

/// Opens a management connection, with TLS per the connection's `sslmode` (the same OpenSSL
/// settings as the replication connection).
pub async fn connect(params: &ConnectParams, password: Option<&[u8]>) -> Result<Client, PgError> {
    use tokio_postgres::config::{Host, SslMode as PgSslMode};
    let mut config = params.config.pg.clone();
    if let Some(pw) = password {
        config.password(pw);
    }
    if config.get_application_name().is_none() {
        config.application_name("walship");
    }
    let opts = &params.config.tls;
    let target = params.describe();
    let host = params
        .config
        .tls_host()
        .unwrap_or_else(|| "localhost".into());
    // PostgreSQL offers no TLS on Unix sockets; libpq skips it there, whatever sslmode says.
    let unix_only = !config.get_hosts().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| !matches!(h, Host::Tcp(_)));
    let user = config.get_user().unwrap_or("(default user)").to_owned();
    let explain = |source| crate::tls::explain_connect_error(source, &target, &host, &user, opts);
    let client = if opts.mode == SslMode::Disable || unix_only {
        config.ssl_mode(PgSslMode::Disable);
        let (client, connection) = config.connect(NoTls).await.map_err(explain)?;
        drive(connection);
        client
    } else {
        // tokio-postgres knows prefer and require; verification is the connector's business.
        config.ssl_mode(if opts.mode.requires_tls() {
            PgSslMode::Require
        } else {
            PgSslMode::Prefer
        });
        let tls = postgres_native_tls::MakeTlsConnector::new(opts.connector()?);
        let (client, connection) = config.connect(tls).await.map_err(explain)?;
        drive(connection);
        client
    };
    Ok(client)
}

/// Runs a connection's I/O in the background until the client is dropped.
fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("management connection closed: {e}");
        }
    });
}

fn lsn(v: Option<PgLsn>) -> Option<Lsn> {
    v.map(|l| Lsn(u64::from(l)))
}

/// Fails unless `wal_level` is `logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), PgError> {
    let row = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(sql_err("reading wal_level"))?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(PgError::Setup(format!(
            "PostgreSQL wal_level is {level:?} but logical replication needs \"logical\": run \
             ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
        )));
    }
    Ok(())
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
                    wal_status, active_pid, to_jsonb(s) ->> 'invalidation_reason' \
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
    }))
}

/// Where walship remembers the slots it created, so that a slot that disappeared later is
/// recognised as dropped (and refused) instead of being created again as if for the first time.
#[derive(Debug, Clone)]
pub struct SlotHistory {
    /// The table (`schema.walship_slots` by default); `None` disables the memory.
    pub table: Option<TableName>,
}

/// Makes sure the slot exists and is usable; creates it when missing, `create` is set, and the
/// slot history does not show that walship created it before. `failover`: create it as a
/// failover slot (PostgreSQL 17+, see [`crate::failover`]).
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
            if let Some(table) = &history.table
                && let Some((created_at, created_lsn)) = created_before(client, table, slot).await?
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
            let create = client.query_one(crate::failover::create_slot_sql(failover), &params);
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
                         ({source}); grant it with ALTER ROLE {} REPLICATION; or create the slot as a superuser",
                        quote_ident(&user)
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

/// When and at which LSN walship created `slot`, if the slot history records it.
pub async fn created_before(
    client: &Client,
    table: &TableName,
    slot: &str,
) -> Result<Option<(String, String)>, PgError> {
    if !table_exists(client, table).await? {
        return Ok(None);
    }
    let sql = format!(
        "SELECT created_at::text, created_lsn::text FROM {} WHERE slot_name = $1",
        table.quoted()
    );
    let row = client
        .query_opt(&sql, &[&slot])
        .await
        .map_err(sql_err(format!("reading {table}")))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Records a slot walship created. Failing to record is a warning, not an error: walship still
/// works, it just cannot tell a later drop from a first start.
async fn remember_slot(client: &Client, table: &TableName, slot: &str, lsn: Option<PgLsn>) {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {t} (slot_name text PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(), \
         created_lsn pg_lsn); \
         COMMENT ON TABLE {t} IS 'Replication slots walship created; a listed slot that no longer exists was dropped.'",
        t = table.quoted()
    );
    let insert = format!(
        "INSERT INTO {} (slot_name, created_lsn) VALUES ($1, $2) ON CONFLICT (slot_name) DO UPDATE SET \
         created_at = now(), created_lsn = EXCLUDED.created_lsn",
        table.quoted()
    );
    let result = async {
        client.batch_execute(&sql).await?;
        client.execute(&insert, &[&slot, &lsn]).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(
            %table,
            "cannot record the new slot in {table} ({e}); walship will not be able to tell a dropped slot \
             from a first start: grant CREATE on the schema, or set postgres.slot_history_table = \"\""
        );
    }
}

/// Rejects slots walship cannot stream from.
pub fn validate_slot(state: &SlotState) -> Result<(), PgError> {
    let slot = &state.name;
    if state.plugin.as_deref() != Some("pgoutput") {
        return Err(PgError::Setup(format!(
            "replication slot {slot:?} uses output plugin {:?}, walship needs pgoutput: use another \
             slot name, or drop it with SELECT pg_drop_replication_slot('{slot}'); if nothing else uses it",
            state.plugin.as_deref().unwrap_or("(none: physical slot)")
        )));
    }
    if state.wal_status.as_deref() == Some("lost") {
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

/// Checks, while walship runs, that what it streams from still exists: the slot (not
/// invalidated), the publication, and the outbox table in it (by the rule of
/// [`catalog::publication_problem`]; `outbox_oid` is the table's OID at start, to tell a rename
/// from a drop). Returns the first definite problem, else the server's current WAL position (for
/// the lag metric; None if it could not be read).
pub async fn watch(
    client: &Client,
    slot: &str,
    publication: &str,
    table: &TableName,
    outbox_oid: Option<u32>,
) -> Result<Option<Lsn>, PgError> {
    match slot_state(client, slot).await? {
        None => {
            return Err(PgError::Setup(format!(
                "replication slot {slot:?} was dropped while walship was running; it will not be re-created \
                 automatically because that would skip every event committed since. Reconcile the outbox \
                 with Kafka, then remove the slot's row from the slot history table and restart walship"
            )));
        }
        Some(state) => validate_slot(&state)?,
    }
    catalog::published_outbox(client, publication, table, outbox_oid, true).await?;
    match current_wal_lsn(client).await {
        Ok(end) => Ok(Some(end)),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the server's WAL position");
            Ok(None)
        }
    }
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
    if crate::preflight::publication_info(client, publication)
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
    outbox_scope(client, publication, table).await
}

/// Reads the outbox's partition tree and the publication, and fails (with the fix) unless the
/// publication sends the outbox's inserts.
pub async fn outbox_scope(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<OutboxScope, PgError> {
    let (family, info) = catalog::published_outbox(client, publication, table, None, false).await?;
    if family.partitioned && !info.via_partition_root {
        tracing::warn!(
            publication,
            %table,
            "publication {publication:?} publishes the partitioned outbox {table} without \
             publish_via_partition_root, so rows arrive under each partition's name; walship maps \
             them to the outbox, but a partition attached later needs a catalog lookup. Run ALTER \
             PUBLICATION {} SET (publish_via_partition_root = true);",
            quote_ident(publication)
        );
    }
    Ok(OutboxScope { family })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert_eq!(TableName::parse("outbox").to_string(), "public.outbox");
        let t = TableName::parse("app.Out\"box");
        assert_eq!(t.schema, "app");
        assert_eq!(t.quoted(), "\"app\".\"Out\"\"box\"");
    }

    #[test]
    fn lost_slot_is_refused_with_fix() {
        let s = SlotState {
            name: "w".into(),
            plugin: Some("pgoutput".into()),
            database: None,
            confirmed_flush_lsn: Some(Lsn(5)),
            restart_lsn: None,
            wal_status: Some("lost".into()),
            invalidation_reason: None,
            active_pid: None,
        };
        let msg = validate_slot(&s).unwrap_err().to_string();
        assert!(
            msg.contains("invalidated")
                && msg.contains("pg_drop_replication_slot('w')")
                && msg.contains("removed WAL")
                && msg.contains("max_slot_wal_keep_size"),
            "{msg}"
        );
        // PostgreSQL 18 invalidates a slot nobody streamed from for idle_replication_slot_timeout:
        // the WAL was not removed for lack of space, and the setting to change is another.
        let idle = SlotState {
            invalidation_reason: Some("idle_timeout".into()),
            ..s
        };
        let msg = validate_slot(&idle).unwrap_err().to_string();
        assert!(
            msg.contains("invalidation_reason = idle_timeout")
                && msg.contains("idle_replication_slot_timeout")
                && !msg.contains("max_slot_wal_keep_size")
                && msg.contains("pg_drop_replication_slot('w')"),
            "{msg}"
        );
    }
}
