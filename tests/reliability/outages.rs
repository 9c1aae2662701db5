//! The broker down, frozen or stalled during load, and one huge transaction: walship recovers,
//! stops when told, keeps the walsender alive and its memory bounded.

use std::time::Duration;

use pgoutput::Lsn;

use super::{deduped_seqs, write_events};
use crate::harness::postgres::{Cluster, connect};
use crate::harness::{
    self, Binary, Broker, Row, TIMEOUT, TestDb, broker, consume, insert_txn, long_tests, topic,
};

/// The broker dies while events are being written and stays down for `outage` with the writer
/// still going, so the outage always falls inside the load (on a fast machine a fixed-size
/// batch can be written and acknowledged before the kill, which proves nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_during_load_recovers_with_bounded_memory() {
    let _heavy = harness::heavy().await;
    let mut db = TestDb::new().await;
    let kafka = Broker::dedicated();
    let outage = if long_tests() {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(5)
    };
    let extra = "[kafka.librdkafka]\n\"topic.metadata.propagation.max.ms\" = \"2000\"\n\"topic.metadata.refresh.interval.ms\" = \"1000\"";
    let mut walship = Binary::start(&harness::config_toml(&db, &kafka.bootstrap, extra));
    db.await_streaming().await;
    let keys: Vec<String> = (0..50).map(|k| format!("k{k}")).collect();
    write_events(&db.client, &keys, 1, 0, false).await;
    let first_round = db.current_lsn().await;
    let url = db.url.clone();
    let writer_keys = keys.clone();
    let stop_writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = stop_writing.clone();
    // One event per key every 20 ms (2,500 events/s) until told to stop; returns how many
    // per key it wrote.
    let writer = tokio::spawn(async move {
        let client = connect(&url).await;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut seq = 1;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            write_events(&client, &writer_keys, 1, seq, false).await;
            seq += 1;
        }
        seq
    });
    // Load flows: the broker has acknowledged the first round, and the writer is running.
    db.await_confirmed(first_round, TIMEOUT).await;
    kafka.stop();
    // A marker committed after the kill can never be acknowledged during the outage: the slot
    // must stay before its commit (walship may still confirm what was acknowledged before the
    // kill, and idle positions before the marker).
    insert_txn(&mut db.client, &[Row::new("order", "marker", 0)]).await;
    let marker_end = db.current_lsn().await;
    let until = tokio::time::Instant::now() + outage;
    let mut max_confirmed = Lsn::ZERO;
    while tokio::time::Instant::now() < until {
        let confirmed = db.confirmed_lsn().await;
        max_confirmed = max_confirmed.max(confirmed);
        assert!(
            confirmed < marker_end,
            "slot confirmed {confirmed} while the broker was down, past the marker event \
             committed after the kill (ends at or before {marker_end}): an unacknowledged event \
             was confirmed\n{}",
            walship.log_text()
        );
        assert!(
            walship.running(),
            "walship must ride out the outage:\n{}",
            walship.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_writing.store(true, std::sync::atomic::Ordering::Relaxed);
    let per_key = writer.await.expect("writer");
    kafka.start();
    db.await_caught_up().await;
    let rss = walship.peak_rss_mib();
    println!("broker outage: walship's peak RSS {rss:.1} MiB");
    assert!(rss < 200.0, "peak RSS {rss:.0} MiB");
    // The restarted in-memory broker only holds what was (re)sent after it came back: per key
    // that must be a gap-free run up to the last event written, and the marker.
    let records = consume(
        &kafka.bootstrap,
        &[&topic(&db, "order")],
        1,
        TIMEOUT,
        Duration::from_secs(2),
    );
    let seqs = deduped_seqs(&records);
    assert_eq!(
        seqs.get("marker").map(Vec::as_slice),
        Some(&[0][..]),
        "the marker written during the outage"
    );
    // Exactly: the slot never reached the marker's commit while the broker was down.
    let marker = records
        .iter()
        .find(|r| r.key_str() == "marker")
        .expect("marker record");
    assert!(
        max_confirmed <= marker.commit_lsn(),
        "slot confirmed {max_confirmed} during the outage, past the marker's commit at {}",
        marker.commit_lsn()
    );
    for key in &keys {
        let seqs = seqs
            .get(key)
            .unwrap_or_else(|| panic!("{key}: nothing delivered after the outage"));
        let first = seqs[0];
        assert_eq!(
            *seqs,
            (first..per_key).collect::<Vec<_>>(),
            "{key}: a gap means a lost event"
        );
    }
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}

/// SIGTERM while an event waits for a frozen broker (its topic check) stops walship without
/// waiting for the broker; the event stays unconfirmed and the next run delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_for_a_frozen_broker_stops_and_leaves_the_event_unconfirmed() {
    let mut db = TestDb::new().await;
    let kafka = Broker::dedicated();
    let config = harness::config_toml(&db, &kafka.bootstrap, "");
    let walship = Binary::start(&config);
    db.await_streaming().await;
    kafka.freeze();
    insert_txn(&mut db.client, &[Row::new("order", "frozen", 0)]).await;
    let end = db.current_lsn().await;
    // The event's topic is new: walship asks the frozen broker about it, and says it waits.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !walship
        .log_text()
        .contains("for the broker (checking that topic")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "walship never said it waits for the broker:\n{}",
            walship.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    walship.signal(libc::SIGTERM);
    let (code, log) = walship.wait_exit(TIMEOUT).await;
    kafka.thaw();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("stopping without waiting for the broker"),
        "walship waited for the broker instead of stopping:\n{log}"
    );
    assert!(
        db.confirmed_lsn().await < end,
        "the unsent event was confirmed"
    );

    let walship = Binary::start(&config);
    db.await_confirmed(end, TIMEOUT).await;
    let records = consume(
        &kafka.bootstrap,
        &[&topic(&db, "order")],
        1,
        TIMEOUT,
        Duration::from_millis(500),
    );
    assert_eq!(harness::seqs(&records), vec![0], "the event, once");
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_broker_stops_reading_but_keeps_the_walsender_alive() {
    let _heavy = harness::heavy().await;
    // A short wal_sender_timeout: without standby status while blocked, the server would drop
    // the connection within 3 s.
    let cluster = Cluster::private(&["wal_sender_timeout=3s"]);
    let db = TestDb::new_in(&cluster).await;
    let kafka = Broker::dedicated();
    let config = harness::config_toml(&db, &kafka.bootstrap, "[run]\nmax_in_flight_events = 2000");
    let mut walship = Binary::start(&config);
    db.await_streaming().await;
    let keys: Vec<String> = (0..10).map(|k| format!("k{k}")).collect();
    write_events(&db.client, &keys, 10, 0, false).await;
    db.await_caught_up().await;
    let walsender = db
        .client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    let walsender: i32 = walsender.get(0);

    kafka.freeze();
    write_events(&db.client, &keys, 3000, 10, false).await;
    // Well past wal_sender_timeout with walship blocked on the frozen broker.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let now = db
        .client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    assert_eq!(
        now.get::<_, Option<i32>>(0),
        Some(walsender),
        "the walsender timed out and was replaced"
    );
    assert!(
        db.sent_lsn().await < db.current_lsn().await,
        "walship stopped reading (backpressure)"
    );
    assert!(walship.running());
    let rss = walship.peak_rss_mib();
    println!("stalled broker: walship's peak RSS {rss:.1} MiB");
    assert!(rss < 100.0, "peak RSS {rss:.0} MiB while blocked");
    kafka.thaw();
    db.await_caught_up().await;
    let records = consume(
        &kafka.bootstrap,
        &[&topic(&db, "order")],
        30_100,
        TIMEOUT,
        Duration::from_secs(1),
    );
    for (key, seqs) in deduped_seqs(&records) {
        assert_eq!(seqs, (0..3010).collect::<Vec<_>>(), "order of {key}");
    }
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_huge_transaction_is_delivered_with_bounded_memory() {
    let _heavy = harness::heavy().await;
    let mut db = TestDb::new().await;
    let rows = if long_tests() { 1_000_000 } else { 100_000 };
    let mut walship = Binary::start(&harness::config_toml(&db, &broker().bootstrap, ""));
    db.await_streaming().await;
    let tx = db.client.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         SELECT 'order', 'k' || (g % 100), 'Bulk', jsonb_build_object('seq', g / 100, 'pad', repeat('x', 100)) \
         FROM generate_series(0, {}) g",
        rows - 1
    ))
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let end = db.current_lsn().await;
    db.await_confirmed(end, TIMEOUT * 3).await;
    let rss = walship.peak_rss_mib();
    println!("{rows}-row transaction: walship's peak RSS {rss:.1} MiB");
    assert!(
        rss < 200.0,
        "peak RSS {rss:.0} MiB for a {rows}-row transaction"
    );
    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        rows,
        TIMEOUT * 2,
        Duration::from_secs(1),
    );
    assert_eq!(records.len(), rows);
    for (key, seqs) in deduped_seqs(&records) {
        assert_eq!(
            seqs,
            (0..(rows as u64 / 100)).collect::<Vec<_>>(),
            "order of {key}"
        );
    }
    assert!(walship.running());
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}
