//! The inbox's two tables and the one statement each decision takes.
//!
//! ```text
//!  marks  (topic, kafka_partition, source) → highest (commit_lsn, event_index) applied
//!  ids    (topic, id)                       → an id seen (records of other producers only)
//! ```
//!
//! Invariant: a mark only moves up, and only inside the transaction that applies the record
//! that moves it. The statement that checks the mark also takes the row's lock, so a second
//! transaction holding the same record (a rebalance's new owner) waits for the first and then
//! sees its mark: it cannot apply the record again.

/// The marks table's columns, in one place for the DDL and the statements.
pub(crate) const MARK_COLUMNS: &str = "topic, kafka_partition, source";

/// `CREATE TABLE IF NOT EXISTS` for both tables, and the ids' index on `received_at` (for
/// deleting old ids) named `ids_index` (unqualified: an index lives in its table's schema).
/// Idempotent.
pub(crate) fn ddl(marks: &str, ids: &str, ids_index: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {marks} (
    topic           text        NOT NULL,
    kafka_partition integer     NOT NULL,
    source          text        NOT NULL,
    commit_lsn      pg_lsn      NOT NULL,
    event_index     bigint      NOT NULL,
    kafka_offset    bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY ({MARK_COLUMNS})
);
CREATE TABLE IF NOT EXISTS {ids} (
    topic           text        NOT NULL,
    id              text        NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, id)
);
CREATE INDEX IF NOT EXISTS {ids_index} ON {ids} (received_at);
"
    )
}

/// Advances the mark to the record's position if it is above it; returns a row if it did
/// (apply the record), none if the record is at or below the mark (a copy: skip it).
/// Parameters: topic, partition, source, commit LSN (`pg_lsn` text), index, offset.
pub(crate) fn advance(marks: &str) -> String {
    format!(
        "INSERT INTO {marks} AS m ({MARK_COLUMNS}, commit_lsn, event_index, kafka_offset) \
         VALUES ($1, $2, $3, $4::pg_lsn, $5, $6) \
         ON CONFLICT ({MARK_COLUMNS}) DO UPDATE \
         SET commit_lsn = excluded.commit_lsn, event_index = excluded.event_index, \
         kafka_offset = excluded.kafka_offset, updated_at = now() \
         WHERE (m.commit_lsn, m.event_index) < (excluded.commit_lsn, excluded.event_index) \
         RETURNING true"
    )
}

/// Records an id; returns a row if it was new. Parameters: topic, id, partition, offset.
pub(crate) fn remember(ids: &str) -> String {
    format!(
        "INSERT INTO {ids} (topic, id, kafka_partition, kafka_offset) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (topic, id) DO NOTHING RETURNING true"
    )
}

/// `schema.name` (or `name`) as quoted identifiers.
pub(crate) fn qualified(schema: Option<&str>, name: &str) -> String {
    match schema {
        Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(name)),
        None => quote_ident(name),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_identifiers() {
        assert_eq!(
            qualified(Some("app"), "walship_inbox"),
            "\"app\".\"walship_inbox\""
        );
        assert_eq!(qualified(None, "in\"box"), "\"in\"\"box\"");
    }

    #[test]
    fn the_mark_only_moves_up_and_only_by_the_row_it_locks() {
        let sql = advance("\"m\"");
        assert!(sql.contains("ON CONFLICT (topic, kafka_partition, source) DO UPDATE"));
        assert!(sql.contains(
            "WHERE (m.commit_lsn, m.event_index) < (excluded.commit_lsn, excluded.event_index)"
        ));
        assert!(
            ddl("\"m\"", "\"i\"", "\"i_r\"")
                .contains("PRIMARY KEY (topic, kafka_partition, source)")
        );
    }
}
