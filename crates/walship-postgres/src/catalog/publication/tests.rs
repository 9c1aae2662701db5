use std::collections::HashMap;

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

#[test]
fn publication_includes_by_schema_and_name() {
    let p = publication(&["app.outbox"], false);
    assert!(p.includes(&TableName::parse("app.outbox")));
    assert!(!p.includes(&TableName::parse("outbox")));
}

#[test]
fn coverage_names_partitions_only_for_a_partitioned_outbox_without_the_root_option() {
    let f = family();
    let leaves = publication(&["outbox_default", "outbox_p20260101"], false);
    let c = leaves.coverage(&f.table, Some(&f));
    assert!(c.outbox && c.inserts && c.partition_names, "{c:?}");
    let root = publication(&["outbox"], true);
    assert!(!root.coverage(&f.table, Some(&f)).partition_names);
    let single = OutboxFamily::single(TableName::parse("outbox"), 10);
    let plain = publication(&["outbox"], false);
    assert!(!plain.coverage(&single.table, Some(&single)).partition_names);
    // The partition tree unknown: the table's own name decides.
    assert!(plain.coverage(&single.table, None).outbox);
    assert!(!leaves.coverage(&f.table, None).outbox);
}
