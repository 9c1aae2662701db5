//! The bad-row policies: `fail` stops before the row and names it, `dead_letter` publishes it
//! with the reason and continues, and rows past the topic's limits.

use std::time::Duration;

use super::exits_with;
use crate::harness::{self, Binary, Row, TIMEOUT, TestDb, broker, consume, insert_txn, topic};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_row_policy_fail_stops_before_the_row_and_names_it() {
    let mut db = TestDb::new().await;
    let walship = Binary::start(&harness::config_toml(&db, &broker().bootstrap, ""));
    db.await_streaming().await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 0)]).await;
    let good_end = db.current_lsn().await;
    db.await_confirmed(good_end, TIMEOUT).await;
    insert_txn(&mut db.client, &[Row::new("bad type!", "a", 1)]).await;
    let bad_end = db.current_lsn().await;
    let log = exits_with(walship, &["bad type!", "outbox.on_bad_row", "at LSN"]).await;
    assert!(
        db.confirmed_lsn().await < bad_end,
        "confirmed past the bad row:\n{log}"
    );

    // A configured column the table lacks: named with the table and the key to fix.
    let walship = Binary::start(
        &harness::config_toml(&db, &broker().bootstrap, "")
            .replace("[outbox]\n", "[outbox]\ntype_column = \"kind\"\n"),
    );
    exits_with(
        walship,
        &["\"kind\"", "public.outbox", "outbox.type_column"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_limits_dead_letter_or_stop_on_rows_past_them() {
    let mut db = TestDb::new().await;
    let dlq = format!("{}.dlq", db.name);
    // "order" and "customer" are allowed; "invoice" goes to the dead-letter topic.
    let limits = "allowed_aggregate_types = [\"order\", \"customer\"]\nmax_topics = 2\n";
    let config = harness::config_toml(&db, &broker().bootstrap, "").replace(
        "[outbox]\n",
        &format!("[outbox]\n{limits}on_bad_row = \"dead-letter\"\ndead_letter_topic = \"{dlq}\"\n"),
    );
    let walship = Binary::start(&config);
    db.await_streaming().await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 0)]).await;
    insert_txn(&mut db.client, &[Row::new("invoice", "a", 1)]).await;
    insert_txn(
        &mut db.client,
        &[Row::new("customer", "b", 2), Row::new("order", "a", 3)],
    )
    .await;
    db.await_caught_up().await;
    let orders = consume(
        &broker().bootstrap,
        &[&topic(&db, "order"), &topic(&db, "customer")],
        3,
        TIMEOUT,
        Duration::from_secs(1),
    );
    let mut seqs = harness::seqs(&orders);
    seqs.sort_unstable();
    assert_eq!(seqs, vec![0, 2, 3]);
    let dead = consume(
        &broker().bootstrap,
        &[&dlq],
        1,
        TIMEOUT,
        Duration::from_secs(1),
    );
    assert_eq!(dead.len(), 1);
    let reason = dead[0].header("walship.error").expect("reason header");
    assert!(
        reason.contains("\"invoice\"")
            && reason.contains(&topic(&db, "invoice"))
            && reason.contains("outbox.allowed_aggregate_types"),
        "{reason}"
    );
    assert_eq!(dead[0].json()["aggregatetype"], "invoice");
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");

    // Under "fail", a row past the bound stops walship before confirming it, naming the value,
    // the topic and the key to change. A fresh process counts from 0: with a bound of 1 the
    // first row's topic (order) is served and customer's is refused.
    let config = harness::config_toml(&db, &broker().bootstrap, "")
        .replace("[outbox]\n", "[outbox]\nmax_topics = 1\n");
    let walship = Binary::start(&config);
    insert_txn(&mut db.client, &[Row::new("order", "a", 4)]).await;
    let good_end = db.current_lsn().await;
    db.await_confirmed(good_end, TIMEOUT).await;
    insert_txn(&mut db.client, &[Row::new("customer", "b", 5)]).await;
    let bad_end = db.current_lsn().await;
    let log = exits_with(
        walship,
        &[
            "\"customer\"",
            &topic(&db, "customer"),
            "outbox.max_topics = 1",
            "at LSN",
        ],
    )
    .await;
    assert!(
        db.confirmed_lsn().await < bad_end,
        "confirmed past the refused row:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_row_policy_dead_letter_publishes_the_row_with_the_reason_and_continues() {
    let mut db = TestDb::new().await;
    let dlq = format!("{}.dlq", db.name);
    let config = harness::config_toml(
        &db,
        &broker().bootstrap,
        "[kafka.librdkafka]\n\"message.max.bytes\" = \"20000\"",
    )
    .replace(
        "[outbox]\n",
        &format!("[outbox]\non_bad_row = \"dead-letter\"\ndead_letter_topic = \"{dlq}\"\n"),
    );
    let walship = Binary::start(&config);
    db.await_streaming().await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 0)]).await;
    insert_txn(&mut db.client, &[Row::new("bad type!", "a", 1)]).await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 2)]).await;
    let mut big = Row::new("order", "a", 3);
    big.payload = serde_json::json!({ "seq": 3, "pad": "x".repeat(50_000) });
    insert_txn(&mut db.client, &[big]).await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 4)]).await;
    db.await_caught_up().await;

    let good = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        3,
        TIMEOUT,
        Duration::from_secs(1),
    );
    assert_eq!(harness::seqs(&good), vec![0, 2, 4]);
    let dead = consume(
        &broker().bootstrap,
        &[&dlq],
        2,
        TIMEOUT,
        Duration::from_secs(1),
    );
    assert_eq!(dead.len(), 2);
    let reasons: Vec<String> = dead
        .iter()
        .map(|r| r.header("walship.error").expect("reason header"))
        .collect();
    assert!(reasons[0].contains("bad type!"), "{reasons:?}");
    assert!(
        reasons[1].contains("too large") || reasons[1].contains("MessageSizeTooLarge"),
        "{reasons:?}"
    );
    assert!(dead.iter().all(|r| r.header("walship.lsn").is_some()
        && r.header("walship.table").as_deref() == Some("public.outbox")));
    assert_eq!(
        dead[0].json()["aggregatetype"],
        "bad type!",
        "the row's columns are the value"
    );
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}
