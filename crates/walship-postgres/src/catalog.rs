//! Which relations are the outbox: the one rule start-up, the watchdog, the stream, `check` and
//! `status` share.
//!
//! ```text
//!  outbox.table ─▶ OutboxFamily (root oid + every partition, any depth)
//!  publication ─▶ PublicationInfo ──▶ publishes_outbox(family)  (start-up, watchdog, check)
//!                                 └─▶ OutboxScope (the stream: which Relation messages are the outbox)
//! ```
//!
//! Invariant: a relation pgoutput sends is treated as "not the outbox" only when the catalog
//! says so. The outbox is identified by its OID and its partitions' OIDs, not just by name, so
//! rows of a partitioned outbox arrive as events whether the publication publishes them under
//! the root's name (`publish_via_partition_root = true`) or under each partition's, a partition
//! attached while walship runs is still the outbox, and a renamed outbox is recognised (and
//! reported) instead of being mistaken for another table. A relation the catalog cannot place
//! (dropped since, in a publication that also publishes other tables) is an error when a row of
//! it arrives: walship stops before confirming it.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::error::{PgError, sql_err};
pub use crate::preflight::PublicationInfo;
use crate::slot::{TableName, quote_ident};

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

impl PublicationInfo {
    /// True when the publication sends every row of the outbox: it lists the table itself, or
    /// (without `publish_via_partition_root`, when `pg_publication_tables` lists partitions
    /// instead of the parent) every partition that holds rows. A publication of some
    /// partitions only does not publish the outbox: rows in the others would never arrive.
    pub fn publishes_outbox(&self, family: &OutboxFamily) -> bool {
        if self.all_tables || self.tables.contains(&family.table) {
            return true;
        }
        let root = family.members.get(&family.root);
        if root.is_some_and(|r| self.tables.contains(r)) {
            return true;
        }
        // A partitioned outbox without partitions cannot hold a row yet: nothing to miss.
        family.partitioned && family.leaves.iter().all(|l| self.tables.contains(l))
    }

    /// The published tables for a message: `a.t1, b.t2`, or `no tables`.
    pub fn tables_text(&self) -> String {
        if self.tables.is_empty() {
            return "no tables".to_owned();
        }
        self.tables
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The statement that creates walship's publication for `table`. Partition rows are published
/// under the parent's name and identity (`publish_via_partition_root`), whatever partition a
/// row lands in; the option is harmless for an unpartitioned table.
pub fn create_publication_sql(publication: &str, table: &TableName) -> String {
    format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert', publish_via_partition_root = true)",
        quote_ident(publication),
        table.quoted()
    )
}

/// Why the outbox's rows would not reach walship through `publication`, with the fix; `None`
/// when they do. `renamed_to`: the current name of the table walship started with, when no
/// table has the configured name any more (only known while running: then a missing table or
/// publication was dropped).
pub fn publication_problem(
    publication: &str,
    table: &TableName,
    family: Option<&OutboxFamily>,
    info: Option<&PublicationInfo>,
    renamed_to: Option<&TableName>,
    while_running: bool,
) -> Option<String> {
    let gone = if while_running {
        "was dropped while walship was running"
    } else {
        "does not exist"
    };
    let Some(family) = family else {
        return Some(match renamed_to {
            Some(new) => format!(
                "the outbox table {table} was renamed to {new}: set outbox.table = \"{new}\" (or rename it \
                 back with ALTER TABLE {} RENAME TO {}) and restart walship; rows written under either \
                 name are published, none is skipped",
                new.quoted(),
                quote_ident(&table.name)
            ),
            None => format!(
                "the outbox table {table} {gone}: create it (walship init-sql prints the DDL) or set \
                 outbox.table to the right schema.table, add it to publication {publication:?}, and restart walship"
            ),
        });
    };
    let Some(info) = info else {
        return Some(format!(
            "publication {publication:?} {gone}: re-create it with {}; and restart walship. Events \
             committed meanwhile are decoded only if the publication exists when the walsender reaches them",
            create_publication_sql(publication, table)
        ));
    };
    if !info.publishes_outbox(family) {
        let via_root = if family.partitioned && !info.via_partition_root {
            format!(
                " ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
                quote_ident(publication)
            )
        } else {
            String::new()
        };
        return Some(format!(
            "publication {publication:?} does not include the outbox table {table} (it publishes: {}), so no \
             event would arrive: run ALTER PUBLICATION {} ADD TABLE {};{via_root}",
            info.tables_text(),
            quote_ident(publication),
            table.quoted()
        ));
    }
    if !info.publishes_insert {
        return Some(format!(
            "publication {publication:?} does not publish inserts, so no outbox row would arrive: run \
             ALTER PUBLICATION {} SET (publish = 'insert');",
            quote_ident(publication)
        ));
    }
    None
}

/// Reads the outbox's partition tree and the publication, and fails with
/// [`publication_problem`]'s explanation unless the publication sends the outbox's inserts.
/// `outbox_oid`: the table's OID when walship started (tells a rename from a drop).
pub async fn published_outbox(
    client: &Client,
    publication: &str,
    table: &TableName,
    outbox_oid: Option<u32>,
    while_running: bool,
) -> Result<(OutboxFamily, PublicationInfo), PgError> {
    let family = outbox_family(client, table).await?;
    let renamed_to = match (&family, outbox_oid) {
        (None, Some(oid)) => relation_name(client, oid).await?,
        _ => None,
    };
    let info = crate::preflight::publication_info(client, publication).await?;
    if let Some(problem) = publication_problem(
        publication,
        table,
        family.as_ref(),
        info.as_ref(),
        renamed_to.as_ref(),
        while_running,
    ) {
        return Err(PgError::Setup(problem));
    }
    family.zip(info).ok_or_else(|| {
        PgError::Setup(format!(
            "outbox table {table} or publication {publication:?} vanished while walship read them"
        ))
    })
}

/// What the stream needs to know to tell outbox rows from other tables' rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxScope {
    /// The outbox and its partitions as the catalog had them when the session started.
    pub family: OutboxFamily,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family() -> OutboxFamily {
        OutboxFamily {
            table: TableName::parse("outbox"),
            root: 10,
            partitioned: true,
            members: HashMap::from([
                (10, TableName::parse("outbox")),
                (11, TableName::parse("outbox_default")),
                (12, TableName::parse("outbox_p20260101")),
            ]),
            leaves: vec![
                TableName::parse("outbox_default"),
                TableName::parse("outbox_p20260101"),
            ],
        }
    }

    fn publication(tables: &[&str], via_root: bool) -> PublicationInfo {
        PublicationInfo {
            name: "p".into(),
            all_tables: false,
            publishes_insert: true,
            via_partition_root: via_root,
            tables: tables.iter().map(|t| TableName::parse(t)).collect(),
        }
    }

    #[test]
    fn partitions_listed_instead_of_the_parent_still_publish_the_outbox() {
        let f = family();
        // FOR TABLE outbox without publish_via_partition_root lists the leaves.
        let leaves = publication(&["outbox_default", "outbox_p20260101"], false);
        assert!(leaves.publishes_outbox(&f));
        assert_eq!(
            publication_problem("p", &f.table, Some(&f), Some(&leaves), None, false),
            None
        );
        let root = publication(&["outbox"], true);
        assert!(root.publishes_outbox(&f));
        let mixed = publication(&["orders", "outbox"], true);
        assert!(mixed.publishes_outbox(&f));
        // Some partitions only: rows in the others would never arrive.
        let some = publication(&["outbox_p20260101"], false);
        assert!(!some.publishes_outbox(&f));
        assert!(
            publication_problem("p", &f.table, Some(&f), Some(&some), None, false)
                .is_some_and(|m| m.contains("ADD TABLE \"public\".\"outbox\""))
        );
    }

    #[test]
    fn a_publication_without_the_outbox_names_both_fixes_for_a_partitioned_table() {
        let f = family();
        let other = publication(&["orders"], false);
        let msg = publication_problem("p", &f.table, Some(&f), Some(&other), None, false)
            .expect("not published");
        assert!(
            msg.contains("ADD TABLE \"public\".\"outbox\"")
                && msg.contains("publish_via_partition_root = true")
                && msg.contains("public.orders"),
            "{msg}"
        );
    }

    #[test]
    fn a_renamed_outbox_is_reported_as_renamed_not_dropped() {
        let t = TableName::parse("outbox");
        let msg = publication_problem(
            "p",
            &t,
            None,
            None,
            Some(&TableName::parse("outbox_old")),
            true,
        )
        .expect("problem");
        assert!(
            msg.contains("renamed to public.outbox_old")
                && msg.contains("outbox.table = \"public.outbox_old\""),
            "{msg}"
        );
        assert!(!msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn created_publications_publish_partitions_under_the_parent() {
        let sql = create_publication_sql("walship_outbox", &TableName::parse("app.outbox"));
        assert!(
            sql.contains("publish_via_partition_root = true") && sql.contains("\"app\".\"outbox\""),
            "{sql}"
        );
    }
}
