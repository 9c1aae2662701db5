//! Which relations are the outbox: a partitioned outbox (with or without
//! `publish_via_partition_root`, partitions attached while walship runs) and a renamed one.
//! walship never confirms past a row of the outbox or of any of its partitions.

use std::time::Duration;

use crate::harness::{self, Relay, Row, TIMEOUT, TestDb, broker, by_key, consume, seqs, topic};

const SETTLE: Duration = Duration::from_secs(1);

/// Replaces the test database's outbox with one range-partitioned by `created_at`, with a
/// default partition (as a user of sql/outbox_partitioned.sql has it).
async fn partitioned_outbox(db: &TestDb) {
    db.client
        .batch_execute(
            "DROP TABLE outbox;
             CREATE TABLE outbox (
                 id            uuid        NOT NULL DEFAULT gen_random_uuid(),
                 aggregatetype text        NOT NULL,
                 aggregateid   text        NOT NULL,
                 type          text        NOT NULL,
                 payload       jsonb,
                 created_at    timestamptz NOT NULL DEFAULT now()
             ) PARTITION BY RANGE (created_at);
             CREATE TABLE outbox_default PARTITION OF outbox DEFAULT;",
        )
        .await
        .expect("partitioned outbox");
}

/// Inserts `n` events (aggregates a0..a3, sequence numbers from `first`) into `table`, one
/// transaction each, with `created_at` given as an SQL expression.
async fn write(db: &TestDb, table: &str, created_at: &str, first: u64, n: u64) {
    for i in first..first + n {
        let row = Row::new("order", &format!("a{}", i % 4), i / 4);
        db.client
            .batch_execute(&format!(
                "INSERT INTO {table} (aggregatetype, aggregateid, type, payload, created_at) \
                 VALUES ('{}', '{}', '{}', '{}', {created_at})",
                row.aggregate_type, row.aggregate_id, row.event_type, row.payload
            ))
            .await
            .expect("insert");
    }
}

/// Consumes the `order` topic and checks that exactly `n` events arrived, each aggregate's in
/// order.
fn assert_all_arrived_in_order(db: &TestDb, n: usize) {
    let t = topic(db, "order");
    let records = consume(&broker().bootstrap, &[&t], n, TIMEOUT, SETTLE);
    assert_eq!(records.len(), n, "every outbox row is published once");
    for (key, recs) in by_key(&records) {
        let s = seqs(&recs);
        assert!(s.windows(2).all(|w| w[0] < w[1]), "order of {key:?}: {s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_outbox_is_published_whole_through_the_publication_walship_creates() {
    let db = TestDb::new().await;
    partitioned_outbox(&db).await;
    let relay = Relay::start_streaming(harness::config(&db, &broker().bootstrap, ""), &db).await;
    write(&db, "outbox", "now()", 0, 200).await;
    assert_all_arrived_in_order(&db, 200);
    db.await_caught_up().await;
    relay.stop().await.expect("clean stop");
    let via_root: bool = db
        .client
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&format!("{}_pub", db.name)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        via_root,
        "the publication publishes partitions as the outbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_published_under_partition_names_are_the_outbox_also_for_partitions_attached_later() {
    let db = TestDb::new().await;
    partitioned_outbox(&db).await;
    // An existing publication without publish_via_partition_root: pgoutput sends each row as a
    // row of its partition.
    db.client
        .batch_execute(&format!(
            "CREATE PUBLICATION {}_pub FOR TABLE outbox WITH (publish = 'insert')",
            db.name
        ))
        .await
        .unwrap();
    let relay = Relay::start_streaming(harness::config(&db, &broker().bootstrap, ""), &db).await;
    write(&db, "outbox", "now()", 0, 40).await;
    // A partition attached while walship streams: unknown when the session started.
    db.client
        .batch_execute(
            "CREATE TABLE outbox_2100 PARTITION OF outbox \
             FOR VALUES FROM ('2100-01-01') TO ('2101-01-01')",
        )
        .await
        .unwrap();
    write(&db, "outbox", "'2100-06-01'", 40, 40).await;
    assert_all_arrived_in_order(&db, 80);
    db.await_caught_up().await;
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_attached_later_in_a_publication_of_several_tables_is_placed_by_the_catalog() {
    let db = TestDb::new().await;
    partitioned_outbox(&db).await;
    // The publication also sends another table: a relation it describes is not the outbox by
    // default, so walship must ask the catalog about the new partition.
    db.client
        .batch_execute(&format!(
            "CREATE PUBLICATION {}_pub FOR TABLE outbox, other_table WITH (publish = 'insert')",
            db.name
        ))
        .await
        .unwrap();
    let relay = Relay::start_streaming(harness::config(&db, &broker().bootstrap, ""), &db).await;
    write(&db, "outbox", "now()", 0, 20).await;
    db.client
        .batch_execute(
            "CREATE TABLE outbox_2100 PARTITION OF outbox \
             FOR VALUES FROM ('2100-01-01') TO ('2101-01-01');
             INSERT INTO other_table (note) VALUES ('not an event');",
        )
        .await
        .unwrap();
    write(&db, "outbox", "'2100-06-01'", 20, 20).await;
    db.client
        .batch_execute("INSERT INTO other_table (note) VALUES ('still not an event')")
        .await
        .unwrap();
    assert_all_arrived_in_order(&db, 40);
    db.await_caught_up().await;
    assert!(!relay.is_finished(), "other tables' rows are not errors");
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_outbox_stops_walship_with_the_rename_named_and_loses_none_of_its_rows() {
    let db = TestDb::new().await;
    let mut config = harness::config(&db, &broker().bootstrap, "");
    config.postgres.watch_interval_ms = 200;
    let relay = Relay::start_streaming(config.clone(), &db).await;
    write(&db, "outbox", "now()", 0, 10).await;
    // Renamed and written under the new name in one transaction: the rows are the outbox's.
    db.client
        .batch_execute(&format!(
            "BEGIN; ALTER TABLE outbox RENAME TO outbox_renamed; {} COMMIT;",
            (10..20)
                .map(|i| format!(
                    "INSERT INTO outbox_renamed (aggregatetype, aggregateid, type, payload) \
                     VALUES ('order', 'a{}', 'Updated', '{{\"seq\": {}}}');",
                    i % 4,
                    i / 4
                ))
                .collect::<String>()
        ))
        .await
        .unwrap();
    // The watchdog stops walship within watch_interval_ms of the rename's commit, whether or not
    // walship has published the rows before it by then: how far it got is timing (its checks tick
    // from walship's start, not from when streaming began; a start slowed by load put a check
    // 50 ms after streaming began and walship stopped before publishing a row). What holds
    // either way: the slot is not confirmed past a row walship has not published.
    let err = relay
        .exit()
        .await
        .expect_err("the watchdog stops walship")
        .to_string();
    assert!(
        err.contains("renamed to public.outbox_renamed")
            && err.contains("outbox.table = \"public.outbox_renamed\""),
        "{err}"
    );
    // Whatever the watchdog interrupted, the rows written under the new name were never
    // confirmed without being published: walship with the new name delivers every one.
    let config = walship::Config::from_toml(
        &harness::config_toml(&db, &broker().bootstrap, ""),
        [(
            "WALSHIP_OUTBOX__TABLE".to_owned(),
            "public.outbox_renamed".to_owned(),
        )],
        "test",
    )
    .expect("config");
    let relay = Relay::start_streaming(config, &db).await;
    db.await_caught_up().await;
    relay.stop().await.expect("clean stop");
    let t = topic(&db, "order");
    let records = consume(&broker().bootstrap, &[&t], 20, TIMEOUT, SETTLE);
    // At least once: a record the first run sent before the watchdog stopped it may be there
    // twice; every event is there, each aggregate's first copies in commit order.
    let mut seen = std::collections::HashSet::new();
    let mut firsts = Vec::new();
    let mut sorted = records.clone();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        if seen.insert(r.id()) {
            firsts.push(r);
        }
    }
    assert_eq!(firsts.len(), 20, "every outbox row is published");
    for (key, recs) in by_key(&firsts) {
        let s = seqs(&recs);
        assert!(s.windows(2).all(|w| w[0] < w[1]), "order of {key:?}: {s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_partition_detached_before_walship_read_them_stop_it_unconfirmed() {
    let db = TestDb::new().await;
    partitioned_outbox(&db).await;
    db.client
        .batch_execute(&format!(
            "CREATE TABLE outbox_2100 PARTITION OF outbox FOR VALUES FROM ('2100-01-01') TO ('2101-01-01');
             CREATE PUBLICATION {}_pub FOR TABLE outbox WITH (publish = 'insert')",
            db.name
        ))
        .await
        .unwrap();
    // The slot exists; then rows land in a partition that is detached before walship reads
    // them. Now it looks like any other table, but its rows were the outbox's.
    let relay = Relay::start_streaming(harness::config(&db, &broker().bootstrap, ""), &db).await;
    relay.stop().await.expect("clean stop");
    write(&db, "outbox", "'2100-06-01'", 0, 5).await;
    let end = db.current_lsn().await;
    db.client
        .batch_execute("ALTER TABLE outbox DETACH PARTITION outbox_2100")
        .await
        .unwrap();
    let relay = Relay::start(harness::config(&db, &broker().bootstrap, ""));
    let err = relay
        .exit()
        .await
        .expect_err("walship stops before the rows")
        .to_string();
    assert!(
        err.contains("public.outbox_2100") && err.contains("has the outbox's columns"),
        "{err}"
    );
    assert!(
        db.confirmed_lsn().await < end,
        "nothing past the detached partition's rows is confirmed"
    );
}
