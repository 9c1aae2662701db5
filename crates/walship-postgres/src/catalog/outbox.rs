//! The outbox table as the catalog has it: its OID and partition tree (the family), its
//! columns, and where a relation OID stands now.
//!
//! Invariant: read-only, and the outbox is known by OID. [`OutboxFamily`] holds the table and
//! every partition under it, at any depth, by OID; a relation is the outbox only when its OID
//! is in the family or the catalog places it under the outbox's root ([`place_relation`]), never
//! because a name looks alike.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::error::{PgError, sql_err};
use crate::ident::{TableName, quote_ident};

/// The outbox table and, when it is partitioned, every partition under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxFamily {
    /// The configured name.
    pub table: TableName,
    /// OID of the configured table.
    pub root: u32,
    /// `relkind = 'p'`.
    pub partitioned: bool,
    /// The root and its partitions (any depth): OID → current name.
    pub members: HashMap<u32, TableName>,
    /// The partitions that hold rows (not themselves partitioned); empty when unpartitioned.
    pub leaves: Vec<TableName>,
}

impl OutboxFamily {
    /// True when `oid` is the outbox or one of its partitions.
    pub fn contains(&self, oid: u32) -> bool {
        self.members.contains_key(&oid)
    }

    /// True when `name` is the outbox or one of its partitions.
    pub fn contains_name(&self, name: &TableName) -> bool {
        self.members.values().any(|t| t == name)
    }

    /// A family of one unpartitioned table (tests, and servers that cannot be asked).
    pub fn single(table: TableName, root: u32) -> Self {
        OutboxFamily {
            members: HashMap::from([(root, table.clone())]),
            leaves: Vec::new(),
            table,
            root,
            partitioned: false,
        }
    }
}

/// Reads the outbox table and its partitions; `None` when no table has the configured name.
pub async fn outbox_family(
    client: &Client,
    table: &TableName,
) -> Result<Option<OutboxFamily>, PgError> {
    let Some(root) = client
        .query_opt(
            "SELECT c.oid, c.relkind::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(sql_err(format!("looking up table {table}")))?
    else {
        return Ok(None);
    };
    let oid: u32 = root.get(0);
    let relkind: String = root.get(1);
    // pg_inherits, walked down from the root, rather than pg_partition_tree: the watchdog runs
    // this every few seconds, and pg_partition_tree locks every partition (waiting behind DDL).
    let rows = client
        .query(
            "WITH RECURSIVE tree(oid) AS ( \
                 SELECT $1::oid \
                 UNION ALL SELECT i.inhrelid FROM pg_inherits i JOIN tree t ON i.inhparent = t.oid) \
             SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text FROM tree \
             JOIN pg_class c ON c.oid = tree.oid JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[&oid],
        )
        .await
        .map_err(sql_err(format!("listing the partitions of {table}")))?;
    let mut members = HashMap::new();
    let mut leaves = Vec::new();
    for r in rows {
        let member: u32 = r.get(0);
        let name = TableName {
            schema: r.get(1),
            name: r.get(2),
        };
        if member != oid && r.get::<_, String>(3) != "p" {
            leaves.push(name.clone());
        }
        members.insert(member, name);
    }
    Ok(Some(OutboxFamily {
        table: table.clone(),
        root: oid,
        partitioned: relkind == "p",
        members,
        leaves,
    }))
}

/// Where a relation OID stands now: its name and whether it is in the partition tree under
/// `root` (the outbox's OID when the session started) or under the table now named `table`
/// (an outbox replaced since). `None` when no relation has that OID any more.
pub async fn place_relation(
    client: &Client,
    oid: u32,
    root: u32,
    table: &TableName,
) -> Result<Option<(TableName, bool)>, PgError> {
    let quoted = table.quoted();
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text, \
                    EXISTS (SELECT 1 FROM pg_partition_ancestors(c.oid) a \
                            WHERE a.relid::oid IN ($2::oid, to_regclass($3::text)::oid)) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::oid",
            &[&oid, &root, &quoted],
        )
        .await
        .map_err(sql_err(format!("looking up relation OID {oid}")))?;
    Ok(row.map(|r| {
        (
            TableName {
                schema: r.get(0),
                name: r.get(1),
            },
            r.get(2),
        )
    }))
}

/// The current name of relation `oid`, if it still exists.
pub async fn relation_name(client: &Client, oid: u32) -> Result<Option<TableName>, PgError> {
    let row = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::oid",
            &[&oid],
        )
        .await
        .map_err(sql_err(format!("looking up relation OID {oid}")))?;
    Ok(row.map(|r| TableName {
        schema: r.get(0),
        name: r.get(1),
    }))
}

/// What the stream needs to know to tell outbox rows from other tables' rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxScope {
    /// The outbox and its partitions as the catalog had them when the session started.
    pub family: OutboxFamily,
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

impl TableInfo {
    /// True for a table or a partitioned table: the relations logical replication publishes,
    /// and so the only ones that can be the outbox ([`outbox_family`] reads no other).
    pub fn is_table(&self) -> bool {
        matches!(self.relkind.as_str(), "r" | "p")
    }

    /// True for a partitioned table.
    pub fn is_partitioned(&self) -> bool {
        self.relkind == "p"
    }
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
