//! The core relay contract: delivery, order, rollbacks, outages, restarts, idle slots.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use pgoutput::Lsn;

use crate::harness::{
    self, Broker, Relay, Row, TIMEOUT, TestDb, broker, by_key, consume, insert_txn, seqs, topic,
};

/// Settle time after the expected count: long enough to see duplicates that are in the broker.
const SETTLE: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_arrive_in_commit_order_per_aggregate() {
    let _heavy = harness::heavy().await;
    let db = TestDb::new().await;
    let relay = Relay::start_streaming(harness::config(&db, &broker().bootstrap, ""), &db).await;

    // 4 concurrent writers, each owning 25 of the 100 aggregates, so commit order per aggregate
    // is each writer's program order while transactions of different writers interleave.
    const WRITERS: usize = 4;
    const TOTAL: usize = 10_000;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let url = db.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = harness::postgres::connect(&url).await;
            let mut next_seq: BTreeMap<String, u64> = BTreeMap::new();
            let mut written = 0;
            let mut txn_size = 1 + w;
            let mut ids = Vec::new();
            while written < TOTAL / WRITERS {
                let n = txn_size.min(TOTAL / WRITERS - written);
                let rows: Vec<Row> = (0..n)
                    .map(|i| {
                        let agg = w * 25 + (written + i * 7) % 25;
                        let kind = if agg % 2 == 0 { "order" } else { "customer" };
                        let id = format!("agg-{agg}");
                        let seq = next_seq.entry(id.clone()).or_default();
                        let row = Row::new(kind, &id, *seq);
                        *seq += 1;
                        row
                    })
                    .collect();
                ids.extend(insert_txn(&mut client, &rows).await);
                written += n;
                txn_size = txn_size % 20 + 1; // transactions of 1..=20 rows
            }
            (next_seq, ids)
        }));
    }
    let mut expected_per_key = BTreeMap::new();
    let mut all_ids = HashSet::new();
    for t in tasks {
        let (seqs, ids) = t.await.expect("writer");
        expected_per_key.extend(seqs);
        all_ids.extend(ids.into_iter().map(|u| u.to_string()));
    }
    db.await_caught_up().await;

    let (orders, customers) = (topic(&db, "order"), topic(&db, "customer"));
    let records = consume(
        &broker().bootstrap,
        &[&orders, &customers],
        TOTAL,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(
        records.len(),
        TOTAL,
        "every event exactly once (no restarts happened)"
    );
    let ids: HashSet<String> = records.iter().map(harness::Consumed::id).collect();
    assert_eq!(ids, all_ids, "the id header carries the outbox row id");
    assert!(
        records
            .iter()
            .all(|r| r.header("type").as_deref() == Some("Updated"))
    );

    let grouped = by_key(&records);
    assert_eq!(grouped.len(), 100);
    for ((topic, key), recs) in &grouped {
        let n = expected_per_key[key];
        assert_eq!(
            seqs(recs),
            (0..n).collect::<Vec<_>>(),
            "order of {key} in {topic}"
        );
        let kind = if key
            .trim_start_matches("agg-")
            .parse::<u32>()
            .expect("agg number")
            % 2
            == 0
        {
            "order"
        } else {
            "customer"
        };
        assert!(topic.ends_with(kind), "{key} routed to {topic}");
    }
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_nothing_and_insert_then_delete_publishes_once() {
    let mut db = TestDb::new().await;
    let relay = Relay::start_streaming(harness::config(&db, &broker().bootstrap, ""), &db).await;

    insert_txn(&mut db.client, &[Row::new("order", "A", 0)]).await;
    {
        let tx = db.client.transaction().await.unwrap();
        harness::insert_rows(&tx, &[Row::new("order", "A", 99)]).await;
        tx.rollback().await.unwrap();
    }
    {
        // The insert-then-delete pattern: the table stays empty, the event is published.
        let tx = db.client.transaction().await.unwrap();
        harness::insert_rows(&tx, &[Row::new("order", "A", 1)]).await;
        tx.batch_execute("DELETE FROM outbox WHERE payload->>'seq' = '1'")
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    insert_txn(&mut db.client, &[Row::new("order", "A", 2)]).await;
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        3,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(
        seqs(&records),
        vec![0, 1, 2],
        "rolled-back row 99 absent; deleted row 1 present once"
    );
    let count: i64 = db
        .client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_holds_the_slot_and_delivers_after_recovery() {
    let mut db = TestDb::new().await;
    let broker = Broker::dedicated();
    // tansu keeps topics in memory, so a restarted broker has lost them; a short metadata
    // propagation wait lets walship notice and re-create them quickly (a real Kafka keeps them).
    let relay = Relay::start_streaming(
        harness::config(
            &db,
            &broker.bootstrap,
            "[kafka.librdkafka]\n\"topic.metadata.propagation.max.ms\" = \"2000\"\n\"topic.metadata.refresh.interval.ms\" = \"1000\"",
        ),
        &db,
    )
    .await;
    let orders = topic(&db, "order");

    let rows: Vec<Row> = (0..10).map(|i| Row::new("order", "K", i)).collect();
    insert_txn(&mut db.client, &rows).await;
    let first_end = db.current_lsn().await;
    db.await_confirmed(first_end, TIMEOUT).await;
    assert_eq!(
        consume(&broker.bootstrap, &[&orders], 10, TIMEOUT, Duration::ZERO).len(),
        10
    );

    broker.stop();
    let rows: Vec<Row> = (10..60).map(|i| Row::new("order", "K", i)).collect();
    let (first, rest) = rows.split_at(5);
    insert_txn(&mut db.client, first).await;
    // At or after the end of the first transaction's commit record.
    let first_outage_end = db.current_lsn().await;
    for chunk in rest.chunks(5) {
        insert_txn(&mut db.client, chunk).await;
    }
    let second_end = db.current_lsn().await;
    // Wait until the walsender has handed the new transactions to walship ...
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while db.sent_lsn().await < second_end {
        assert!(
            tokio::time::Instant::now() < deadline,
            "walsender did not send the outage batch"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... then watch the slot for a while: with no broker, no transaction of the outage batch
    // may be confirmed (a negative property needs an observation window). The slot may still
    // move before the batch's first commit: an idle relay follows the server's WAL, which
    // other databases of the cluster write.
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut max_confirmed = Lsn::ZERO;
    while tokio::time::Instant::now() < watch_until {
        let confirmed = db.confirmed_lsn().await;
        max_confirmed = max_confirmed.max(confirmed);
        assert!(
            confirmed < first_outage_end,
            "slot confirmed {confirmed} during the outage, at or past the end of the outage \
             batch's first transaction ({first_outage_end})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    broker.start();
    db.await_confirmed(second_end, TIMEOUT).await;
    // The restarted in-memory broker lost the first batch; everything of the second is there,
    // in order (duplicates allowed: the outage interrupted unconfirmed sends).
    let records = consume(&broker.bootstrap, &[&orders], 50, TIMEOUT, SETTLE);
    let mut seen = HashSet::new();
    let deduped: Vec<u64> = seqs(&records)
        .into_iter()
        .filter(|s| seen.insert(*s))
        .collect();
    assert_eq!(deduped, (10..60).collect::<Vec<_>>());
    // Exactly: the slot never reached the outage batch's first commit while the broker was down.
    let first_commit = records
        .iter()
        .map(|r| r.commit_lsn())
        .min()
        .expect("records");
    assert!(
        max_confirmed <= first_commit,
        "slot confirmed {max_confirmed} during the outage, past the first outage commit at \
         {first_commit}"
    );
    assert!(!relay.is_finished(), "walship recovered by itself");
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_while_down_arrive_and_graceful_restart_has_no_duplicates() {
    let mut db = TestDb::new().await;
    let config = harness::config(&db, &broker().bootstrap, "");
    let relay = Relay::start_streaming(config.clone(), &db).await;
    for i in 0..100 {
        insert_txn(
            &mut db.client,
            &[Row::new("order", &format!("k{}", i % 7), i)],
        )
        .await;
    }
    db.await_caught_up().await;
    relay.stop().await.expect("graceful stop");

    for i in 100..200 {
        insert_txn(
            &mut db.client,
            &[Row::new("order", &format!("k{}", i % 7), i)],
        )
        .await;
    }
    let end = db.current_lsn().await;
    let relay = Relay::start(config);
    db.await_confirmed(end, TIMEOUT).await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        200,
        TIMEOUT,
        SETTLE,
    );
    let mut all = seqs(&records);
    assert_eq!(all.len(), 200, "no duplicates after a graceful stop");
    all.sort_unstable();
    assert_eq!(all, (0..200).collect::<Vec<_>>());
    for ((_, key), recs) in by_key(&records) {
        let s = seqs(&recs);
        assert!(s.windows(2).all(|w| w[0] < w[1]), "order of {key}: {s:?}");
    }
    relay.stop().await.expect("graceful stop");
}

/// The URL's `application_name` names the replication connection too, so an operator finds
/// walship's walsender in `pg_stat_replication` under the name they chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connection_uses_the_urls_application_name() {
    let db = TestDb::new().await;
    let mut config = harness::config(&db, &broker().bootstrap, "");
    config.postgres.url = format!("{}?application_name=orders-relay", db.url);
    let relay = Relay::start_streaming(config, &db).await;
    let name: Option<String> = db
        .client
        .query_one(
            "SELECT r.application_name FROM pg_replication_slots s \
             JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1",
            &[&db.name],
        )
        .await
        .expect("walsender of the slot")
        .get(0);
    assert_eq!(name.as_deref(), Some("orders-relay"));
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_follows_server_wal_while_other_tables_are_written() {
    let db = TestDb::new().await;
    let relay = Relay::start_streaming(harness::config(&db, &broker().bootstrap, ""), &db).await;
    let start = db.confirmed_lsn().await;
    for i in 0..200 {
        db.client
            .execute(
                "INSERT INTO other_table (note) VALUES ($1)",
                &[&format!("n{i}")],
            )
            .await
            .unwrap();
    }
    let target = db.current_lsn().await;
    assert!(target > start);
    db.await_confirmed(target, TIMEOUT).await;
    relay.stop().await.expect("graceful stop");
}

/// PostgreSQL can only create a logical slot once the transactions holding an xid when creation
/// began have ended (its consistent point). walship is not streaming before that, and an event
/// committed as soon as it streams is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_creation_waits_for_open_transactions_and_then_misses_nothing() {
    let mut db = TestDb::new().await;
    let holder = harness::postgres::connect(&db.url).await;
    holder
        .batch_execute("BEGIN")
        .await
        .expect("begin the open transaction");
    let xid: String = holder
        .query_one("SELECT txid_current()::text", &[])
        .await
        .expect("the open transaction takes an xid")
        .get(0);

    let relay = Relay::start(harness::config(&db, &broker().bootstrap, ""));
    // Slot creation has begun and waits for exactly that transaction.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while db
        .client
        .query_opt(
            "SELECT 1 FROM pg_locks l JOIN pg_replication_slots s ON s.active_pid = l.pid \
             WHERE s.slot_name = $1 AND l.locktype = 'transactionid' AND NOT l.granted \
             AND l.transactionid::text = $2",
            &[&db.slot(), &xid],
        )
        .await
        .expect("read locks")
        .is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "walship's slot creation never waited for transaction {xid}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(2), db.await_streaming())
            .await
            .is_err(),
        "streaming although the slot cannot be consistent while transaction {xid} is open"
    );

    holder
        .batch_execute("COMMIT")
        .await
        .expect("commit the open transaction");
    db.await_streaming().await;
    insert_txn(&mut db.client, &[Row::new("order", "k", 0)]).await;
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        1,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(seqs(&records), vec![0]);
    relay.stop().await.expect("graceful stop");
}
