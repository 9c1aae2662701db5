//! The outbox table in `walship check`: it exists and is a table, its configured columns exist
//! with usable types (and the key and topic columns cannot be NULL), and the publication sends
//! its rows — or can be created to.
//!
//! Invariant: whether the publication sends the outbox's rows, and under which names, is the
//! catalog's rule ([`PublicationInfo::coverage`], the one start-up and the watchdog apply); the
//! decisions here are pure functions over what the catalog said.

use walship_postgres::catalog::{
    self, ColumnInfo, OutboxFamily, PublicationInfo, RoleInfo, TableInfo,
};
use walship_postgres::{OutboxSpec, TableName, quote_ident};

use super::report::Check;

pub(super) fn table_missing(table: &TableName, database: &str) -> Check {
    Check::fail(
        "outbox.table",
        format!("outbox table {table} does not exist in database {database}"),
        "create it (walship init-sql prints a definition) or set outbox.table to the right \
         schema.table",
    )
}

pub(super) fn table_wrong_kind(table: &TableName, info: &TableInfo) -> Check {
    let kind = match info.relkind.as_str() {
        "v" => "a view",
        "m" => "a materialized view",
        "f" => "a foreign table",
        "S" => "a sequence",
        "i" | "I" => "an index",
        _ => "not a table",
    };
    Check::fail(
        "outbox.table",
        format!("{table} is {kind}; logical replication only publishes tables"),
        "set outbox.table to the table the application inserts events into",
    )
}

/// Which configured column plays which role.
struct ColumnRole<'a> {
    key: String,
    column: &'a str,
    kind: ColumnKind,
    /// A NULL in it stops walship.
    required: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    /// Becomes a key, topic part or header: its text output is used.
    Text,
    /// Becomes the record value.
    Payload,
    /// Becomes the record timestamp.
    Time,
}

/// One check per configured column: exists, has a usable type, and (for the key and the topic)
/// cannot be NULL.
pub(super) fn column_checks(spec: &OutboxSpec, columns: &[ColumnInfo]) -> Vec<Check> {
    let mut roles = vec![
        ColumnRole {
            key: "id_column".into(),
            column: &spec.id,
            kind: ColumnKind::Text,
            required: false,
        },
        ColumnRole {
            key: "aggregate_type_column".into(),
            column: &spec.aggregate_type,
            kind: ColumnKind::Text,
            required: true,
        },
        ColumnRole {
            key: "aggregate_id_column".into(),
            column: &spec.aggregate_id,
            kind: ColumnKind::Text,
            required: true,
        },
        ColumnRole {
            key: "type_column".into(),
            column: &spec.event_type,
            kind: ColumnKind::Text,
            required: false,
        },
        ColumnRole {
            key: "payload_column".into(),
            column: &spec.payload,
            kind: ColumnKind::Payload,
            required: false,
        },
    ];
    for (key, column, kind) in [
        ("traceparent_column", &spec.traceparent, ColumnKind::Text),
        ("tracestate_column", &spec.tracestate, ColumnKind::Text),
        ("timestamp_column", &spec.timestamp, ColumnKind::Time),
    ] {
        roles.push(ColumnRole {
            key: key.into(),
            column,
            kind,
            required: false,
        });
    }
    for h in &spec.header_columns {
        // A column placed twice (a header and an envelope field, say) is checked once.
        if roles.iter().any(|r| r.column == h) {
            continue;
        }
        roles.push(ColumnRole {
            key: "header_columns or outbox.additional_placement".into(),
            column: h,
            kind: ColumnKind::Text,
            required: false,
        });
    }
    roles
        .iter()
        .filter(|r| !r.column.is_empty())
        .map(|r| column_check(&spec.table, r, columns))
        .collect()
}

fn column_check(table: &TableName, role: &ColumnRole<'_>, columns: &[ColumnInfo]) -> Check {
    let name = format!("outbox.column.{}", role.column);
    let Some(col) = columns.iter().find(|c| c.name == role.column) else {
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        return Check::fail(
            &name,
            format!(
                "column {:?} (outbox.{}) is not in {table}; its columns are: {}",
                role.column,
                role.key,
                names.join(", ")
            ),
            format!(
                "set outbox.{} to one of those columns, or add it: ALTER TABLE {} ADD COLUMN {} …;",
                role.key,
                table.quoted(),
                quote_ident(role.column)
            ),
        );
    };
    let mut notes = Vec::new();
    let mut fixes = Vec::new();
    match role.kind {
        ColumnKind::Payload => {
            if !matches!(
                col.base_type.as_str(),
                "json" | "jsonb" | "text" | "varchar" | "bytea"
            ) {
                notes.push(format!(
                    "has type {}; walship sends its text output as the record value",
                    col.declared_type
                ));
                fixes.push("use jsonb, json, text, varchar or bytea for the payload".to_owned());
            }
        }
        ColumnKind::Time => {
            if !matches!(
                col.base_type.as_str(),
                "timestamptz" | "timestamp" | "int8" | "int4"
            ) {
                notes.push(format!(
                    "has type {}; walship reads a timestamptz, a timestamp (as UTC) or an integer \
                     of milliseconds since the Unix epoch, and any other value stops it (a bad row)",
                    col.declared_type
                ));
                fixes.push("use timestamptz".to_owned());
            }
        }
        ColumnKind::Text => {
            if col.base_type == "bpchar" {
                notes.push(format!(
                    "has type {}: values are blank-padded and the padding becomes part of the \
                     key, topic or header",
                    col.declared_type
                ));
                fixes.push("use text or varchar".to_owned());
            } else if !(col.category == "S"
                || col.typtype == "e"
                || matches!(col.base_type.as_str(), "uuid" | "int2" | "int4" | "int8"))
            {
                notes.push(format!(
                    "has type {}, an unusual type for outbox.{}; walship uses its text output",
                    col.declared_type, role.key
                ));
                fixes.push("use text, varchar, uuid or an integer type".to_owned());
            }
        }
    }
    if role.required && !col.not_null {
        notes.push(
            "is nullable, and a row with NULL here stops walship (the event cannot be keyed or \
             routed)"
                .to_owned(),
        );
        fixes.push(format!(
            "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL;",
            table.quoted(),
            quote_ident(role.column)
        ));
    }
    if notes.is_empty() {
        Check::pass(
            &name,
            format!(
                "{:?} (outbox.{}) is {}",
                role.column, role.key, col.declared_type
            ),
        )
    } else {
        Check::warn(
            &name,
            format!(
                "{:?} (outbox.{}) in {table} {}",
                role.column,
                role.key,
                notes.join("; it ")
            ),
            fixes.join("; "),
        )
    }
}

/// The publication exists (or can be created) and publishes the table's inserts.
pub(super) fn publication_checks(
    publication: &str,
    create: bool,
    table: &TableName,
    table_info: Option<&TableInfo>,
    family: Option<&OutboxFamily>,
    info: Option<&PublicationInfo>,
    role: &RoleInfo,
) -> Vec<Check> {
    const NAME: &str = "postgres.publication";
    let create_sql = format!("{};", catalog::create_publication_sql(publication, table));
    let Some(info) = info else {
        if !create {
            return vec![Check::fail(
                NAME,
                format!(
                    "publication {publication:?} does not exist and postgres.create_publication \
                     is false"
                ),
                format!("run {create_sql} or set postgres.create_publication = true"),
            )];
        }
        let Some(t) = table_info else {
            return vec![Check::skip(
                NAME,
                format!(
                    "publication {publication:?} does not exist; walship creates it once the \
                     outbox table exists"
                ),
            )];
        };
        let mut missing = Vec::new();
        if !role.superuser && !t.owned_by_current_user {
            missing.push(format!(
                "it does not own {table} (owner: {}) and is not a superuser",
                t.owner
            ));
        }
        if !role.superuser && !role.can_create_in_database {
            missing.push(format!(
                "it lacks the CREATE privilege on database {}",
                role.database
            ));
        }
        if missing.is_empty() {
            return vec![Check::pass(
                NAME,
                format!(
                    "publication {publication:?} does not exist yet; walship will create it as {} \
                     ({create_sql})",
                    role.name
                ),
            )];
        }
        return vec![Check::fail(
            NAME,
            format!(
                "publication {publication:?} does not exist and user {} cannot create it: {}",
                role.name,
                missing.join(", and ")
            ),
            format!(
                "as the table owner or a superuser run {create_sql} and set \
                 postgres.create_publication = false"
            ),
        )];
    };
    // The stream's own rule: the outbox's partitions count, and so does the partition-root
    // option.
    let coverage = info.coverage(table, family);
    let mut checks = Vec::new();
    if coverage.outbox {
        checks.push(Check::pass(
            NAME,
            format!(
                "publication {publication:?} includes {table}{}",
                if info.all_tables {
                    " (FOR ALL TABLES)"
                } else {
                    ""
                }
            ),
        ));
        if coverage.partition_names {
            checks.push(Check::warn(
                "postgres.publication.partition_root",
                format!(
                    "publication {publication:?} publishes the partitioned outbox {table} without \
                     publish_via_partition_root: rows arrive under each partition's name (walship \
                     maps them to the outbox, with a catalog lookup for partitions attached later)"
                ),
                format!(
                    "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
                    quote_ident(publication)
                ),
            ));
        }
    } else {
        let fix = if coverage.partition_names {
            format!(
                "ALTER PUBLICATION {p} ADD TABLE {t}; ALTER PUBLICATION {p} SET \
                 (publish_via_partition_root = true); so events carry the parent table's name",
                p = quote_ident(publication),
                t = table.quoted()
            )
        } else {
            format!(
                "ALTER PUBLICATION {} ADD TABLE {};",
                quote_ident(publication),
                table.quoted()
            )
        };
        checks.push(Check::fail(
            NAME,
            format!(
                "publication {publication:?} does not include the outbox table {table} (it \
                 publishes: {}), so no event would ever arrive",
                info.tables_text()
            ),
            fix,
        ));
    }
    if !coverage.inserts {
        checks.push(Check::fail(
            "postgres.publication.inserts",
            format!(
                "publication {publication:?} does not publish inserts, so no outbox row would \
                 arrive"
            ),
            format!(
                "ALTER PUBLICATION {} SET (publish = 'insert');",
                quote_ident(publication)
            ),
        ));
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::fixtures::{config, role};
    use crate::check::report::Status;

    fn col(name: &str, base: &str, not_null: bool) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            declared_type: base.into(),
            base_type: base.into(),
            typtype: "b".into(),
            category: match base {
                "text" | "varchar" | "bpchar" => "S".into(),
                "int4" | "int8" | "float8" => "N".into(),
                _ => "U".into(),
            },
            not_null,
        }
    }

    #[test]
    fn columns_missing_odd_and_nullable() {
        let c = config("");
        let spec = c.outbox_spec();
        let cols = vec![
            col("id", "uuid", true),
            col("aggregatetype", "bpchar", true),
            col("aggregateid", "text", false),
            col("type", "float8", true),
            col("payload", "xml", false),
        ];
        let checks = column_checks(&spec, &cols);
        let by = |n: &str| checks.iter().find(|c| c.name == n).unwrap().clone();
        assert_eq!(by("outbox.column.id").status, Status::Pass);
        assert_eq!(by("outbox.column.aggregatetype").status, Status::Warn);
        let agg = by("outbox.column.aggregateid");
        assert_eq!(agg.status, Status::Warn);
        assert!(agg.fix.unwrap().contains("SET NOT NULL"));
        assert_eq!(by("outbox.column.type").status, Status::Warn);
        assert_eq!(by("outbox.column.payload").status, Status::Warn);

        let checks = column_checks(&spec, &cols[..4]);
        let p = checks
            .iter()
            .find(|c| c.name == "outbox.column.payload")
            .unwrap();
        assert_eq!(p.status, Status::Fail);
        assert!(p.message.contains("outbox.payload_column"), "{p:?}");
    }

    #[test]
    fn trace_time_and_placed_columns_are_checked_once_each() {
        let c = config(
            "[outbox]\ntraceparent_column = \"tp\"\ntimestamp_column = \"at\"\n\
             additional_placement = [\"shard:partition\", \"shard:header:s\"]\n",
        );
        let spec = c.outbox_spec();
        let cols = vec![
            col("id", "uuid", true),
            col("aggregatetype", "text", true),
            col("aggregateid", "text", true),
            col("type", "text", true),
            col("payload", "jsonb", false),
            col("at", "text", false),
            col("shard", "int4", false),
        ];
        let checks = column_checks(&spec, &cols);
        let by = |n: &str| {
            checks
                .iter()
                .filter(|c| c.name == n)
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(by("outbox.column.tp")[0].status, Status::Fail, "missing");
        assert_eq!(
            by("outbox.column.at")[0].status,
            Status::Warn,
            "text is no time"
        );
        assert_eq!(by("outbox.column.shard").len(), 1);
        assert_eq!(by("outbox.column.shard")[0].status, Status::Pass);
    }

    #[test]
    fn missing_publication_without_create_gives_create_statement() {
        let t = TableName::parse("outbox");
        let c = publication_checks("pub", false, &t, None, None, None, &role(true, false));
        assert_eq!(c[0].status, Status::Fail);
        assert!(
            c[0].fix
                .as_deref()
                .unwrap()
                .contains("CREATE PUBLICATION \"pub\" FOR TABLE \"public\".\"outbox\""),
            "{c:?}"
        );
        let info = TableInfo {
            oid: 1,
            relkind: "r".into(),
            owner: "postgres".into(),
            owned_by_current_user: false,
            can_select: true,
        };
        let c = publication_checks("pub", true, &t, Some(&info), None, None, &role(true, false));
        assert_eq!(c[0].status, Status::Fail, "non-owner cannot create: {c:?}");
        assert!(c[0].message.contains("owner: postgres"), "{c:?}");
    }

    #[test]
    fn publication_without_table_or_inserts_fails_twice() {
        let t = TableName::parse("outbox");
        let info = PublicationInfo {
            name: "pub".into(),
            all_tables: false,
            publishes_insert: false,
            via_partition_root: false,
            tables: vec![TableName::parse("other")],
        };
        let c = publication_checks("pub", true, &t, None, None, Some(&info), &role(false, true));
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.status == Status::Fail));
        assert!(c[0].fix.as_deref().unwrap().contains("ADD TABLE"));
        assert!(c[1].fix.as_deref().unwrap().contains("publish = 'insert'"));
    }
}
