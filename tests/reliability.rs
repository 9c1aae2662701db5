//! Reliability: crashes, outages, restarts, stalls, large transactions, definite errors and the
//! bad-row policies — against real PostgreSQL and real broker processes.
//!
//! `WALSHIP_LONG_TESTS=1` runs the long variants (more events, longer outages).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rand::Rng;
use tokio_postgres::Client;

use crate::harness::postgres::{Cluster, connect};
use crate::harness::{
    self, Binary, Broker, Relay, Row, TIMEOUT, TestDb, broker, consume, insert_txn, long_tests,
    topic,
};

/// Writes `per_key` single-event transactions for each of `keys`, interleaved round-robin,
/// pipelined on one connection (so commit order per key is the order written): outbox rows, or
/// with `messages` transactional logical messages with prefix `outbox`. Returns ids.
pub(crate) async fn write_events(
    client: &Client,
    keys: &[String],
    per_key: u64,
    start_seq: u64,
    messages: bool,
) -> Vec<String> {
    let sql = if messages {
        "SELECT pg_logical_emit_message(true, 'outbox', jsonb_build_object('id', $1::text, \
         'aggregatetype', 'order', 'aggregateid', $2::text, 'type', 'Updated', \
         'payload', $3::text::jsonb)::text)::text"
    } else {
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ($1::text::uuid, 'order', $2, 'Updated', $3::text::jsonb)"
    };
    let stmt = client.prepare(sql).await.expect("prepare");
    let mut ids = Vec::new();
    let mut pending = Vec::new();
    for seq in start_seq..start_seq + per_key {
        for key in keys {
            let id = uuid::Uuid::new_v4().to_string();
            let payload = format!("{{\"aggregate\":\"{key}\",\"seq\":{seq}}}");
            ids.push(id.clone());
            let (client, stmt) = (client, &stmt);
            pending.push(async move {
                client
                    .execute(stmt, &[&id, key, &payload])
                    .await
                    .expect("insert")
            });
            if pending.len() == 64 {
                futures::future::join_all(std::mem::take(&mut pending)).await;
            }
        }
    }
    futures::future::join_all(pending).await;
    ids
}

/// Per key, the payload `seq`s in consumed order with repeats removed (first occurrence kept).
pub(crate) fn deduped_seqs(records: &[harness::Consumed]) -> BTreeMap<String, Vec<u64>> {
    let mut out = BTreeMap::new();
    for ((_, key), recs) in harness::by_key(records) {
        let mut seen = HashSet::new();
        let seqs: Vec<u64> = harness::seqs(&recs)
            .into_iter()
            .filter(|s| seen.insert(*s))
            .collect();
        out.insert(key, seqs);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_keeps_order() {
    let (min_per_key, kills) = if long_tests() { (2000, 20) } else { (334, 8) };
    sigkill_during_load(false, min_per_key, kills, 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_outbox_message_and_keeps_order() {
    let (min_per_key, kills) = if long_tests() { (1000, 12) } else { (100, 5) };
    sigkill_during_load(true, min_per_key, kills, 30_000).await;
}

/// SIGKILL ×`kills_wanted` while 4 writers commit at least `min_total` single-event
/// transactions (rows, or logical messages with `messages`): nothing lost, order kept,
/// duplicates < 1%.
async fn sigkill_during_load(
    messages: bool,
    min_per_key: u64,
    kills_wanted: u32,
    min_total: usize,
) {
    let _heavy = harness::heavy().await;
    // Its own cluster: every walsender decodes the whole cluster's WAL, and this load is large
    // enough to slow down the other tests' walsenders on a shared one.
    let cluster = Cluster::private(&[]);
    let db = TestDb::new_in(&cluster).await;
    let (writers, keys_per_writer) = (4_u64, 75_u64);
    // Each writer keeps writing until every kill has happened and it wrote its share of the
    // minimum, so all kills land while the load runs.
    let mut config = harness::config_toml(&db, &broker().bootstrap, "");
    if messages {
        config = config.replace("[outbox]\n", "[outbox]\nmessage_prefixes = [\"outbox\"]\n");
    }
    let mut walship = Binary::start(&config);
    db.await_streaming().await;

    let killing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = db.url.clone();
        let killing = std::sync::Arc::clone(&killing);
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let keys: Vec<String> = (0..keys_per_writer).map(|k| format!("w{w}-k{k}")).collect();
            let mut ids = Vec::new();
            let mut per_key = 0;
            while per_key < min_per_key || killing.load(std::sync::atomic::Ordering::Relaxed) {
                ids.extend(write_events(&client, &keys, 10, per_key, messages).await);
                per_key += 10;
            }
            (keys, per_key, ids)
        }));
    }
    let mut kills = 0;
    while kills < kills_wanted {
        let pause = rand::rng().random_range(100..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        walship.kill();
        kills += 1;
        walship.restart();
    }
    killing.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut all_ids = HashSet::new();
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        let (keys, per_key, ids) = t.await.expect("writer");
        all_ids.extend(ids);
        expected.extend(keys.into_iter().map(|k| (k, per_key)));
    }
    let total = all_ids.len();
    assert_eq!(total as u64, expected.values().sum::<u64>());
    assert!(total >= min_total, "{total}");
    let end = db.current_lsn().await;
    db.await_confirmed(end, TIMEOUT * 2).await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        total,
        TIMEOUT * 2,
        Duration::from_secs(2),
    );
    let ids: HashSet<String> = records.iter().map(harness::Consumed::id).collect();
    assert_eq!(
        ids.len(),
        total,
        "every committed event present (missing {})",
        all_ids.difference(&ids).count()
    );
    for (key, seqs) in deduped_seqs(&records) {
        assert_eq!(
            seqs,
            (0..expected[&key]).collect::<Vec<_>>(),
            "order of {key} after dropping duplicates"
        );
    }
    let positions: HashSet<(i32, i64)> = records.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(
        positions.len(),
        records.len(),
        "the consumer read some offsets twice"
    );
    let duplicates = records.len() - total;
    let log = walship.log_text();
    let found: u64 = log
        .lines()
        .filter(|l| l.contains("an earlier run already delivered"))
        .filter_map(|l| l.split(" events=").nth(1))
        .filter_map(|n| n.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    eprintln!(
        "{kills} kills during the load, {total} events, {duplicates} duplicates; restarts found \
         {found} events already in Kafka and did not send them again"
    );
    // A resume lookup that timed out or ran out of budget sends events again by design: say so
    // if it comes to that (a starved machine), rather than leave a bare count.
    let lookups_cut_short: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && (l.contains("resume") || l.contains("sent again")))
        .collect();
    assert!(
        (duplicates as f64) < 0.01 * total as f64,
        "{duplicates} duplicates is 1% or more of {total}; resume warnings:\n{}",
        lookups_cut_short.join("\n")
    );
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_during_load_loses_nothing() {
    postgres_goes_down_during_load("fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_during_load_loses_nothing() {
    postgres_goes_down_during_load("immediate").await;
}

/// Writes 10,000 events, then 500 more, stops the server with `pg_ctl stop -m <mode>` and starts
/// it again, writes 1,000 more, and checks that every event arrived in order per key.
///
/// `fast` waits for each walsender to see its consumer confirm what it was sent, so the restart
/// tests reconnecting and what was committed meanwhile. `immediate` is a crash, and the broker
/// is frozen before the 500 are written, so walship is certainly cut off holding events it
/// cannot confirm; the slot comes back at its last checkpointed position, so events are read
/// again (duplicates allowed, nothing lost).
async fn postgres_goes_down_during_load(mode: &str) {
    let _heavy = harness::heavy().await;
    let cluster = Cluster::private(&[]);
    let db = TestDb::new_in(&cluster).await;
    let kafka = Broker::dedicated();
    let relay = Relay::start_streaming(harness::config(&db, &kafka.bootstrap, ""), &db).await;
    let keys: Vec<String> = (0..20).map(|k| format!("k{k}")).collect();
    let mut ids = write_events(&db.client, &keys, 500, 0, false).await;
    let crash = mode == "immediate";
    if crash {
        kafka.freeze();
    }
    ids.extend(write_events(&db.client, &keys, 25, 500, false).await);
    let written = db.current_lsn().await;
    let confirmed_at_stop = db.confirmed_lsn().await;
    let c = &cluster;
    tokio::task::block_in_place(|| {
        c.stop_server_mode(mode);
        c.start_server();
    });
    if crash {
        assert!(
            confirmed_at_stop < written,
            "with the broker frozen, walship cannot have confirmed the last events \
             ({confirmed_at_stop} of {written})"
        );
        kafka.thaw();
    }
    let client = connect(&db.url).await;
    ids.extend(write_events(&client, &keys, 50, 525, false).await);
    let end = Lsn(u64::from(
        client
            .query_one("SELECT pg_current_wal_lsn()", &[])
            .await
            .unwrap()
            .get::<_, tokio_postgres::types::PgLsn>(0),
    ));
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let row = client
            .query_one(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap();
        if Lsn(u64::from(row.get::<_, tokio_postgres::types::PgLsn>(0))) >= end {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "walship did not catch up after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = consume(
        &kafka.bootstrap,
        &[&topic(&db, "order")],
        ids.len(),
        TIMEOUT,
        Duration::from_secs(1),
    );
    let got: HashSet<String> = records.iter().map(harness::Consumed::id).collect();
    assert!(
        ids.iter().all(|id| got.contains(id)),
        "an event committed around the restart is missing"
    );
    for (key, seqs) in deduped_seqs(&records) {
        assert_eq!(seqs, (0..575).collect::<Vec<_>>(), "order of {key}");
    }
    relay
        .stop()
        .await
        .expect("walship recovered and stops cleanly");
}

use pgoutput::Lsn;

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

// --- definite errors: each provoked, its message checked ----------------------------------------

async fn exits_with(walship: Binary, needles: &[&str]) -> String {
    let (code, log) = walship.wait_exit(TIMEOUT).await;
    assert_eq!(code, 1, "{log}");
    for n in needles {
        assert!(log.contains(n), "log lacks {n:?}:\n{log}");
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_slot_is_fatal_and_explained() {
    let cluster = Cluster::private(&[
        "max_slot_wal_keep_size=1MB",
        "max_wal_size=32MB",
        "min_wal_size=32MB",
    ]);
    let mut db = TestDb::new_in(&cluster).await;
    let config = harness::config_toml(&db, &broker().bootstrap, "");
    let walship = Binary::start(&config);
    db.await_streaming().await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 0)]).await;
    db.await_caught_up().await;
    let (code, _) = walship.stop().await;
    assert_eq!(code, 0);
    // Move WAL far past the slot with nobody reading it, then checkpoint: the slot is lost.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        db.client
            .batch_execute("INSERT INTO other_table (note) SELECT repeat('w', 500) FROM generate_series(1, 3000); SELECT pg_switch_wal(); CHECKPOINT;")
            .await
            .unwrap();
        let row = db
            .client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap();
        if row.get::<_, Option<String>>(0).as_deref() == Some("lost") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never became lost"
        );
    }
    let walship = Binary::start(&config);
    exits_with(
        walship,
        &[
            "invalidated",
            "wal_status = lost",
            &format!("pg_drop_replication_slot('{}')", db.name),
        ],
    )
    .await;
}

/// PostgreSQL 18 also invalidates a slot nobody streamed from for longer than
/// `idle_replication_slot_timeout` (at a checkpoint), with its WAL still there: walship names
/// that cause and setting, not removed WAL and `max_slot_wal_keep_size` (the only cause it knew
/// before 17 made `invalidation_reason` readable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_invalidated_slot_is_fatal_and_explained() {
    if harness::postgres::pg_bin_major() < 18 {
        eprintln!("skipped: idle_replication_slot_timeout is new in PostgreSQL 18");
        return;
    }
    let cluster = Cluster::private(&["idle_replication_slot_timeout=1s"]);
    let mut db = TestDb::new_in(&cluster).await;
    let config = harness::config_toml(&db, &broker().bootstrap, "");
    let walship = Binary::start(&config);
    db.await_streaming().await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 0)]).await;
    db.await_caught_up().await;
    let (code, _) = walship.stop().await;
    assert_eq!(code, 0);
    // Idle for more than a second, a checkpoint invalidates the slot.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        db.client.batch_execute("CHECKPOINT").await.unwrap();
        let row = db
            .client
            .query_one(
                "SELECT wal_status, invalidation_reason FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap();
        if row.get::<_, Option<String>>(0).as_deref() == Some("lost") {
            assert_eq!(
                row.get::<_, Option<String>>(1).as_deref(),
                Some("idle_timeout")
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never became lost"
        );
    }
    let walship = Binary::start(&config);
    let log = exits_with(
        walship,
        &[
            "invalidated",
            "wal_status = lost, invalidation_reason = idle_timeout",
            "idle_replication_slot_timeout",
            &format!("pg_drop_replication_slot('{}')", db.name),
        ],
    )
    .await;
    assert!(!log.contains("max_slot_wal_keep_size"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_slot_is_not_recreated_silently() {
    let db = TestDb::new().await;
    let config = harness::config_toml(&db, &broker().bootstrap, "");
    let walship = Binary::start(&config);
    db.await_streaming().await;
    let (code, _) = walship.stop().await;
    assert_eq!(code, 0);
    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.name])
        .await
        .unwrap();
    // The preflight says so too, with the fix.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.toml"), &config).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_walship"))
        .args(["check", "--config"])
        .arg(dir.path().join("w.toml"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{out}");
    assert!(
        out.contains("dropped since") && out.contains("DELETE FROM"),
        "{out}"
    );
    let walship = Binary::start(&config);
    exits_with(
        walship,
        &["has been dropped", "walship_slots", "DELETE FROM"],
    )
    .await;
    let slot = db
        .client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    assert!(slot.is_none(), "no new slot was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_publication_and_table_while_running_are_fatal_and_explained() {
    for what in ["publication", "table"] {
        let db = TestDb::new().await;
        let walship = Binary::start(&harness::config_toml(&db, &broker().bootstrap, "").replace(
            "status_interval_ms = 200",
            "status_interval_ms = 200\nwatch_interval_ms = 200",
        ));
        db.await_streaming().await;
        if what == "publication" {
            db.client
                .batch_execute(&format!("DROP PUBLICATION {}_pub", db.name))
                .await
                .unwrap();
            exits_with(
                walship,
                &[
                    &format!("{}_pub", db.name),
                    "was dropped",
                    "CREATE PUBLICATION",
                ],
            )
            .await;
        } else {
            db.client.batch_execute("DROP TABLE outbox").await.unwrap();
            exits_with(walship, &["public.outbox", "was dropped"]).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_fatal_and_explained() {
    let cluster = Cluster::private(&["wal_level=replica"]);
    let db = TestDb::new_in(&cluster).await;
    let walship = Binary::start(&harness::config_toml(&db, &broker().bootstrap, ""));
    exits_with(
        walship,
        &[
            "wal_level",
            "\"replica\"",
            "ALTER SYSTEM SET wal_level = logical",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_replication_privilege_is_fatal_and_explained() {
    let db = TestDb::new().await;
    let role = format!("{}_norep", db.name);
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; CREATE PUBLICATION {db}_pub FOR TABLE outbox WITH (publish = 'insert');",
            db = db.name
        ))
        .await
        .unwrap();
    let config = harness::config_toml(&db, &broker().bootstrap, "")
        .replace("postgres://postgres@", &format!("postgres://{role}@"));
    let walship = Binary::start(&config);
    exits_with(
        walship,
        &[
            &db.name,
            "REPLICATION",
            &format!("ALTER ROLE \"{role}\" REPLICATION"),
        ],
    )
    .await;
}

// --- bad rows ------------------------------------------------------------------------------

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
