//! The publication and the outbox: whether the publication sends every outbox row, and the
//! partition-root rule.
//!
//! Invariant: one rule, [`PublicationInfo::coverage`], decides whether a publication sends the
//! outbox's rows and whether they arrive under the partitions' names; start-up
//! ([`published_outbox`], [`outbox_scope`]), the watchdog, `walship check` and `walship status`
//! all read it, each in its own words. A publication that lists some partitions only does not
//! publish the outbox: rows in the others would never arrive.

use tokio_postgres::Client;

use super::outbox::{OutboxFamily, OutboxScope, outbox_family, relation_name};
use crate::error::{PgError, sql_err};
use crate::ident::{TableName, quote_ident};

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

/// What a publication does with the outbox's rows, as [`PublicationInfo::coverage`] decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coverage {
    /// It sends every row of the outbox ([`PublicationInfo::publishes_outbox`]); when the
    /// outbox's partition tree is unknown, it lists the table by name.
    pub outbox: bool,
    /// It publishes inserts (outbox rows are inserts; updates and deletes are ignored).
    pub inserts: bool,
    /// The outbox is partitioned and the publication lacks `publish_via_partition_root`, so rows
    /// arrive under each partition's name instead of the outbox's (walship maps them, with a
    /// catalog lookup for partitions attached later).
    pub partition_names: bool,
}

impl PublicationInfo {
    /// The rule every caller applies: does this publication send the outbox's rows, its
    /// inserts, and under which names. `family`: the outbox's partition tree, `None` when it
    /// could not be read (then only the table's own name counts).
    pub fn coverage(&self, table: &TableName, family: Option<&OutboxFamily>) -> Coverage {
        Coverage {
            outbox: family.map_or_else(|| self.includes(table), |f| self.publishes_outbox(f)),
            inserts: self.publishes_insert,
            partition_names: family.is_some_and(|f| f.partitioned) && !self.via_partition_root,
        }
    }

    /// True when `table` is among the published tables.
    fn includes(&self, table: &TableName) -> bool {
        self.tables.iter().any(|t| t == table)
    }

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
    let coverage = info.coverage(table, Some(family));
    if !coverage.outbox {
        let via_root = if coverage.partition_names {
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
    if !coverage.inserts {
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
///
/// The table and the publication are read by separate statements, so DDL committing between
/// them (a rename, with the publication now listing the new name) can pair a table read before
/// it with a publication read after it. A problem is therefore read twice: the second read
/// starts after the first ended, so it sees any DDL that raced the first one whole, and only a
/// problem it confirms is reported (with its own, consistent explanation).
pub async fn published_outbox(
    client: &Client,
    publication: &str,
    table: &TableName,
    outbox_oid: Option<u32>,
    while_running: bool,
) -> Result<(OutboxFamily, PublicationInfo), PgError> {
    match read_published(client, publication, table, outbox_oid, while_running).await? {
        Ok(found) => Ok(found),
        Err(_) => read_published(client, publication, table, outbox_oid, while_running)
            .await?
            .map_err(PgError::Setup),
    }
}

/// One read of the outbox's partition tree and the publication: what they are, or
/// [`publication_problem`]'s explanation of why the outbox's rows would not arrive.
async fn read_published(
    client: &Client,
    publication: &str,
    table: &TableName,
    outbox_oid: Option<u32>,
    while_running: bool,
) -> Result<Result<(OutboxFamily, PublicationInfo), String>, PgError> {
    let family = outbox_family(client, table).await?;
    let renamed_to = match (&family, outbox_oid) {
        (None, Some(oid)) => relation_name(client, oid).await?,
        _ => None,
    };
    let info = publication_info(client, publication).await?;
    if let Some(problem) = publication_problem(
        publication,
        table,
        family.as_ref(),
        info.as_ref(),
        renamed_to.as_ref(),
        while_running,
    ) {
        return Ok(Err(problem));
    }
    Ok(family.zip(info).ok_or_else(|| {
        format!(
            "outbox table {table} or publication {publication:?} vanished while walship read them"
        )
    }))
}

/// Reads the outbox's partition tree and the publication, and fails (with the fix) unless the
/// publication sends the outbox's inserts.
pub async fn outbox_scope(
    client: &Client,
    publication: &str,
    table: &TableName,
) -> Result<OutboxScope, PgError> {
    let (family, info) = published_outbox(client, publication, table, None, false).await?;
    if info.coverage(table, Some(&family)).partition_names {
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
mod tests;
