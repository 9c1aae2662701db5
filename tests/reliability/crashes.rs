//! SIGKILL of walship at random moments, and PostgreSQL restarted or crashed, during load:
//! nothing lost, order per key kept.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use pgoutput::Lsn;
use rand::Rng;

use super::{deduped_seqs, write_events};
use crate::harness::postgres::{Cluster, connect};
use crate::harness::{
    self, Binary, Broker, Relay, TIMEOUT, TestDb, broker, consume, long_tests, topic,
};

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
