//! Read-only catalog queries behind `walship check` and `walship status`.
//!
//! Invariant: nothing here changes the database. Every function reads the catalog (or the outbox
//! table, for a bounded sample of aggregate types) and returns plain data; deciding what is wrong
//! and how to fix it is the caller's job, so the decisions can be unit-tested without a server.

use pgoutput::Lsn;
use tokio_postgres::Client;

use crate::error::{PgError, sql_err};
use crate::slot::{TableName, quote_ident};

/// Server settings that logical replication depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSettings {
    /// `wal_level` (`minimal`, `replica`, `logical`).
    pub wal_level: String,
    /// `max_replication_slots`.
    pub max_replication_slots: i64,
    /// `max_wal_senders`.
    pub max_wal_senders: i64,
    /// `server_version` (human form, e.g. `16.4`).
    pub server_version: String,
}

/// Reads the settings from `pg_settings`.
pub async fn server_settings(client: &Client) -> Result<ServerSettings, PgError> {
    let rows = client
        .query(
            "SELECT name::text, setting::text FROM pg_settings \
             WHERE name IN ('wal_level', 'max_replication_slots', 'max_wal_senders', 'server_version')",
            &[],
        )
        .await
        .map_err(sql_err("reading pg_settings"))?;
    let mut s = ServerSettings::default();
    for row in rows {
        let name: String = row.get(0);
        let value: String = row.get(1);
        match name.as_str() {
            "wal_level" => s.wal_level = value,
            "max_replication_slots" => s.max_replication_slots = value.parse().unwrap_or(0),
            "max_wal_senders" => s.max_wal_senders = value.parse().unwrap_or(0),
            "server_version" => s.server_version = value,
            _ => {}
        }
    }
    Ok(s)
}

/// How many replication slots exist and how many WAL senders run, cluster-wide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationUsage {
    /// Rows of `pg_replication_slots` (every database, physical and logical).
    pub slots: i64,
    /// Running walsender processes.
    pub wal_senders: i64,
}

/// Counts used slots and WAL senders.
pub async fn replication_usage(client: &Client) -> Result<ReplicationUsage, PgError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots), \
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')",
            &[],
        )
        .await
        .map_err(sql_err("counting replication slots and WAL senders"))?;
    Ok(ReplicationUsage {
        slots: row.get(0),
        wal_senders: row.get(1),
    })
}

/// The connected role's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    /// `current_user`.
    pub name: String,
    /// `rolreplication`.
    pub replication: bool,
    /// `rolsuper`.
    pub superuser: bool,
    /// `CREATE` privilege on the current database (needed for `CREATE PUBLICATION`).
    pub can_create_in_database: bool,
    /// `current_database()`.
    pub database: String,
}

/// Reads the connected role's attributes.
pub async fn role_info(client: &Client) -> Result<RoleInfo, PgError> {
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolreplication, r.rolsuper, \
                    has_database_privilege(current_database(), 'CREATE'), current_database()::text \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(sql_err("reading the attributes of the connected role"))?;
    Ok(RoleInfo {
        name: row.get(0),
        replication: row.get(1),
        superuser: row.get(2),
        can_create_in_database: row.get(3),
        database: row.get(4),
    })
}

/// A table (or other relation) in `pg_class`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// `pg_class.oid`.
    pub oid: u32,
    /// `relkind`: `r` table, `p` partitioned table, `v` view, …
    pub relkind: String,
    /// Owner role.
    pub owner: String,
    /// The connected role is the owner or a member of the owning role.
    pub owned_by_current_user: bool,
    /// The connected role may `SELECT` from it.
    pub can_select: bool,
}

/// Looks a relation up by schema and name; `None` when it does not exist.
pub async fn table_info(client: &Client, table: &TableName) -> Result<Option<TableInfo>, PgError> {
    let row = client
        .query_opt(
            "SELECT c.oid, c.relkind::text, pg_get_userbyid(c.relowner)::text, \
                    pg_has_role(current_user, c.relowner, 'USAGE'), \
                    has_table_privilege(c.oid, 'SELECT') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(sql_err(format!("looking up table {table}")))?;
    Ok(row.map(|r| TableInfo {
        oid: r.get(0),
        relkind: r.get(1),
        owner: r.get(2),
        owned_by_current_user: r.get(3),
        can_select: r.get(4),
    }))
}

/// A column of a table, with its type resolved through domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// The declared type as SQL prints it (`character varying(200)`, `my_domain`).
    pub declared_type: String,
    /// The base type's `typname` (`text`, `varchar`, `jsonb`, `_int4`, …).
    pub base_type: String,
    /// `typtype` of the base type (`b` base, `e` enum, `c` composite, `r` range, …).
    pub typtype: String,
    /// `typcategory` of the base type (`S` string, `N` numeric, `A` array, `U` user, …).
    pub category: String,
    /// Declared `NOT NULL`.
    pub not_null: bool,
}

/// The live columns of a relation, in order.
pub async fn table_columns(client: &Client, oid: u32) -> Result<Vec<ColumnInfo>, PgError> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), b.typname::text, \
                    b.typtype::text, b.typcategory::text, a.attnotnull \
             FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(sql_err("reading the outbox table's columns"))?;
    Ok(rows
        .into_iter()
        .map(|r| ColumnInfo {
            name: r.get(0),
            declared_type: r.get(1),
            base_type: r.get(2),
            typtype: r.get(3),
            category: r.get(4),
            not_null: r.get(5),
        })
        .collect())
}

/// A publication and the tables it publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationInfo {
    /// Publication name.
    pub name: String,
    /// `FOR ALL TABLES`.
    pub all_tables: bool,
    /// Publishes inserts.
    pub publishes_insert: bool,
    /// `publish_via_partition_root`.
    pub via_partition_root: bool,
    /// `pg_publication_tables` rows, in name order.
    pub tables: Vec<TableName>,
}

impl PublicationInfo {
    /// True when `table` is among the published tables.
    pub fn includes(&self, table: &TableName) -> bool {
        self.tables.iter().any(|t| t == table)
    }
}

/// Reads a publication; `None` when it does not exist.
pub async fn publication_info(
    client: &Client,
    publication: &str,
) -> Result<Option<PublicationInfo>, PgError> {
    let Some(row) = client
        .query_opt(
            "SELECT puballtables, pubinsert, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(sql_err(format!("reading publication {publication:?}")))?
    else {
        return Ok(None);
    };
    let tables = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
             WHERE pubname = $1 ORDER BY 1, 2",
            &[&publication],
        )
        .await
        .map_err(sql_err(format!(
            "reading tables of publication {publication:?}"
        )))?
        .into_iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect();
    Ok(Some(PublicationInfo {
        name: publication.to_owned(),
        all_tables: row.get(0),
        publishes_insert: row.get(1),
        via_partition_root: row.get(2),
        tables,
    }))
}

/// Up to `limit` distinct non-NULL values of `column` in `table`, as text, sorted.
///
/// A full scan on a big table without an index on the column; callers bound it with a statement
/// timeout. Outbox tables are usually small (rows are deleted after insert or partitioned away).
pub async fn distinct_values(
    client: &Client,
    table: &TableName,
    column: &str,
    limit: i64,
) -> Result<Vec<String>, PgError> {
    let col = quote_ident(column);
    let sql = format!(
        "SELECT v FROM (SELECT DISTINCT {col}::text AS v FROM {} WHERE {col} IS NOT NULL LIMIT $1) d \
         ORDER BY v",
        table.quoted()
    );
    let rows = client
        .query(&sql, &[&limit])
        .await
        .map_err(sql_err(format!(
            "reading distinct {column} values of {table}"
        )))?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Slot columns that [`crate::slot::SlotState`] does not carry.
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
mod tests {
    use super::*;

    #[test]
    fn lag_never_underflows() {
        assert_eq!(lag_bytes(Lsn(100), Lsn(40)), 60);
        assert_eq!(lag_bytes(Lsn(40), Lsn(100)), 0);
    }

    #[test]
    fn publication_includes_by_schema_and_name() {
        let p = PublicationInfo {
            name: "p".into(),
            all_tables: false,
            publishes_insert: true,
            via_partition_root: false,
            tables: vec![TableName::parse("app.outbox")],
        };
        assert!(p.includes(&TableName::parse("app.outbox")));
        assert!(!p.includes(&TableName::parse("outbox")));
    }
}
