//! The partitioned kit: published as its parent table, retention drops only partitions entirely
//! older than the cutoff, and the fix for rows in the default partition works.

use std::collections::BTreeSet;

use walship::init_sql;

use super::{SETTLE, count, emit, kit, kit_config};
use crate::harness::{Relay, TIMEOUT, TestDb, broker, consume, seqs, topic};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_outbox_is_published_as_its_parent_table() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(&kit(true))
        .await
        .expect("apply kit");
    let via_root: bool = db
        .client
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&init_sql::DEFAULT_PUBLICATION],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        via_root,
        "publish_via_partition_root is what makes this work"
    );
    let relay = Relay::start_streaming(kit_config(&db), &db).await;

    let kept = emit(&db.client, "P", 0, false).await;
    emit(&db.client, "P", 1, true).await;
    // No daily partition a year ahead: the row lands in the default partition.
    db.client
        .batch_execute(
            "INSERT INTO kit.outbox (aggregatetype, aggregateid, type, payload, created_at) \
             VALUES ('order', 'P', 'Updated', '{\"seq\": 2}', now() + interval '1 year')",
        )
        .await
        .unwrap();
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        3,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(seqs(&records), vec![0, 1, 2]);

    // The rows really are in partitions, not in a plain table that happens to be called outbox.
    let row = db
        .client
        .query_one(
            "SELECT tableoid::regclass::text, \
                    'kit.outbox_p' || to_char(created_at AT TIME ZONE 'UTC', 'YYYYMMDD') \
             FROM kit.outbox WHERE id = $1::text::uuid",
            &[&kept],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        row.get::<_, String>(1),
        "daily partition"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM kit.outbox_default").await,
        1
    );
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_only_partitions_entirely_older_than_the_cutoff() {
    let mut db = TestDb::new().await;
    db.client
        .batch_execute(&kit(true))
        .await
        .expect("apply kit");

    // One transaction, so now() and the UTC date are the same for every statement.
    let tx = db.client.transaction().await.unwrap();
    let names = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter().map(|r| r.get::<_, String>(0)).collect()
    };
    let day_names = "SELECT format('kit.outbox_p%s', to_char((now() AT TIME ZONE 'UTC')::date + d, 'YYYYMMDD')) \
                     FROM unnest($1::int[]) d";
    let children = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_inherits i \
                    JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                    WHERE i.inhparent = 'kit.outbox'::regclass";
    let past: Vec<i32> = (-10..=-4).collect();

    let created = names(
        tx.query(
            "SELECT kit.outbox_create_partitions((now() AT TIME ZONE 'UTC')::date - 10, 7)",
            &[],
        )
        .await
        .unwrap(),
    );
    assert_eq!(created, names(tx.query(day_names, &[&past]).await.unwrap()));
    let again = tx
        .query(
            "SELECT kit.outbox_create_partitions((now() AT TIME ZONE 'UTC')::date - 10, 7)",
            &[],
        )
        .await
        .unwrap();
    assert!(again.is_empty(), "existing partitions are left alone");
    tx.batch_execute(
        "INSERT INTO kit.outbox (aggregatetype, aggregateid, type, payload, created_at) VALUES \
         ('order', 'old', 'Updated', NULL, now() - interval '8 days'), \
         ('order', 'new', 'Updated', NULL, now())",
    )
    .await
    .unwrap();
    let before: BTreeSet<String> = names(tx.query(children, &[]).await.unwrap())
        .into_iter()
        .collect();

    let dropped = names(
        tx.query(
            "SELECT kit.outbox_drop_partitions_older_than(interval '5 days')",
            &[],
        )
        .await
        .unwrap(),
    );
    // Day -6 ends at the start of day -5, at or before now() - 5 days: dropped. Day -5 ends at
    // the start of day -4, after the cutoff: kept whole, although it began before it.
    let expected_dropped = names(
        tx.query(day_names, &[&(-10..=-6).collect::<Vec<i32>>()])
            .await
            .unwrap(),
    );
    assert_eq!(dropped, expected_dropped, "oldest first");
    let after: BTreeSet<String> = names(tx.query(children, &[]).await.unwrap())
        .into_iter()
        .collect();
    let dropped_set: BTreeSet<String> = dropped.iter().cloned().collect();
    assert_eq!(
        after,
        before.difference(&dropped_set).cloned().collect(),
        "nothing else dropped"
    );
    let must_remain: Vec<String> =
        names(tx.query(day_names, &[&vec![-5, -4, 0, 1]]).await.unwrap())
            .into_iter()
            .chain(["kit.outbox_default".to_owned()])
            .collect();
    for name in must_remain {
        assert!(after.contains(&name), "{name} must remain: {after:?}");
    }
    let rows: Vec<String> = names(
        tx.query("SELECT aggregateid FROM kit.outbox ORDER BY 1", &[])
            .await
            .unwrap(),
    );
    assert_eq!(rows, vec!["new"], "the old row went with its partition");
    assert!(
        tx.query(
            "SELECT kit.outbox_drop_partitions_older_than(interval '5 days')",
            &[]
        )
        .await
        .unwrap()
        .is_empty()
    );
    tx.commit().await.unwrap();

    let err = db
        .client
        .query(
            "SELECT kit.outbox_drop_partitions_older_than(interval '-1 day')",
            &[],
        )
        .await
        .expect_err("a negative age would drop current partitions");
    let msg = err.as_db_error().expect("database error").message();
    assert!(msg.contains("max_age must be zero or more"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_over_rows_in_the_default_partition_fails_with_a_working_fix() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(&kit(true))
        .await
        .expect("apply kit");
    db.client
        .batch_execute(
            "INSERT INTO kit.outbox (aggregatetype, aggregateid, type, payload, created_at) \
             VALUES ('order', 'late', 'Updated', NULL, now() - interval '40 days')",
        )
        .await
        .unwrap();
    let day = "((now() - interval '40 days') AT TIME ZONE 'UTC')::date";
    let err = db
        .client
        .query(
            &format!("SELECT kit.outbox_create_partitions({day}, 1)"),
            &[],
        )
        .await
        .expect_err("the default partition holds a row of that day");
    let db_err = err.as_db_error().expect("database error");
    assert!(
        db_err
            .message()
            .contains("outbox_default holds rows of that day"),
        "{}",
        db_err.message()
    );
    let hint = db_err.hint().expect("a hint with the fix");
    let fix = &hint[hint.find("BEGIN;").expect("the fix is SQL")..];
    db.client
        .batch_execute(fix)
        .await
        .unwrap_or_else(|e| panic!("the hint's SQL works: {e}\n{fix}"));

    let row = db
        .client
        .query_one(
            &format!(
                "SELECT tableoid::regclass::text, 'kit.outbox_p' || to_char({day}, 'YYYYMMDD') \
                 FROM kit.outbox WHERE aggregateid = 'late'"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), row.get::<_, String>(1));
    assert_eq!(
        count(&db, "SELECT count(*) FROM kit.outbox_default").await,
        0
    );
}
