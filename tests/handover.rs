//! Hand-overs between owners: when a pipeline's slot passes from one walship process to
//! another, the old producer is silent first — a graceful stop holds the slot (reporting
//! status) until its records are acknowledged, and a process that was frozen publishes nothing
//! more of what it had read. Every check looks at every copy of every event in the log.
//!
//! PostgreSQL 15 only (`scripts/test.sh`): what is tested is walship's own hand-over, which no
//! server version changes; `wal_sender_timeout` is set per database.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::failover::slot_holder;
use crate::harness::postgres::connect;
use crate::harness::process::free_port;
use crate::harness::{
    self, Binary, Broker, Consumed, TIMEOUT, TestDb, broker, consume, late_copies, topic, until,
};
use crate::metrics::{get, value};
use crate::reliability::write_events;

/// A database whose walsenders end a stream after `timeout` without a status report.
async fn db_with_wal_sender_timeout(timeout: &str) -> TestDb {
    let db = TestDb::new().await;
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET wal_sender_timeout = '{timeout}'",
            db.name
        ))
        .await
        .expect("set wal_sender_timeout");
    db
}

/// Starts `config` twice: the first streams, the second waits as a standby. Returns both and
/// the first one's walsender PID.
async fn pair(config: &str, db: &TestDb) -> (Binary, Binary, i32) {
    let a = Binary::start(config);
    db.await_streaming().await;
    let walsender = slot_holder(db).await.expect("the first streams");
    let b = Binary::start(config);
    until("the second to wait as a standby", || {
        b.log_text()
            .contains("standby: another consumer streams the slot")
    })
    .await;
    (a, b, walsender)
}

/// Everything in `db`'s topic, once the slot has confirmed the server's position.
async fn consume_all(db: &TestDb, bootstrap: &str, ids: &HashSet<String>) -> Vec<Consumed> {
    db.await_caught_up().await;
    let records = consume(
        bootstrap,
        &[&topic(db, "order")],
        ids.len(),
        TIMEOUT,
        Duration::from_secs(2),
    );
    let got: HashSet<String> = records.iter().map(Consumed::id).collect();
    assert_eq!(
        ids.difference(&got).count(),
        0,
        "events lost of {}",
        ids.len()
    );
    records
}

/// A graceful stop while the broker does not answer: the stopping process keeps the slot,
/// reporting status, for longer than the walsender would wait for a silent client; once the
/// broker answers it confirms and lets go, and the standby continues. No copy of any event
/// lands after a newer event of its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_holds_the_slot_until_its_records_are_acknowledged() {
    let _heavy = harness::heavy().await;
    let broker = Broker::dedicated();
    let db = db_with_wal_sender_timeout("2s").await;
    let config = harness::config_toml(
        &db,
        &broker.bootstrap,
        "[run]\nshutdown_timeout_ms = 60000\n",
    );
    // The first process (the one stopped) serves metrics: its in-flight count says when its
    // producer holds the records.
    let port = free_port();
    let with_metrics = format!("{config}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let a = Binary::start(&with_metrics);
    db.await_streaming().await;
    let walsender = slot_holder(&db).await.expect("the first streams");
    let b = Binary::start(&config);
    until("the second to wait as a standby", || {
        b.log_text()
            .contains("standby: another consumer streams the slot")
    })
    .await;
    let client = connect(&db.url).await;
    let keys: Vec<String> = (0..20).map(|k| format!("k{k}")).collect();
    let mut ids: HashSet<String> = write_events(&client, &keys, 25, 0, false)
        .await
        .into_iter()
        .collect();
    db.await_caught_up().await;

    // The broker stops answering; events keep coming and reach the active process's producer.
    broker.freeze();
    ids.extend(write_events(&client, &keys, 25, 25, false).await);
    until("the stopping process's producer to hold records", || {
        value(&get(port, "/metrics").1, "walship_in_flight_events") > 0.0
    })
    .await;
    a.signal(libc::SIGTERM);
    let stopped = Instant::now();
    // Three times the walsender's timeout: it keeps the stopping process's stream all along.
    while stopped.elapsed() < Duration::from_secs(6) {
        assert_eq!(
            slot_holder(&db).await,
            Some(walsender),
            "the slot changed hands {} ms into the stop, while the stopping process's records \
             were unacknowledged:\n{}",
            stopped.elapsed().as_millis(),
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.thaw();
    let (code, log) = a.wait_exit(TIMEOUT).await;
    assert_eq!(code, 0, "{log}");
    let stop_took = stopped.elapsed();
    assert!(log.contains("stopped; slot confirmed"), "{log}");

    // The standby continues from what the stopped process confirmed.
    until("the standby to take over", || {
        b.log_text().contains("the slot was released: taking over")
    })
    .await;
    ids.extend(write_events(&client, &keys, 25, 50, false).await);
    let records = consume_all(&db, &broker.bootstrap, &ids).await;
    let late = late_copies(&records);
    eprintln!(
        "graceful stop with the broker frozen: held the slot {} ms (wal_sender_timeout 2 s); {} \
         events, {} records, {} late copies",
        stop_took.as_millis(),
        ids.len(),
        records.len(),
        late.len()
    );
    assert!(
        late.is_empty(),
        "late copies: {:?}",
        &late[..late.len().min(5)]
    );
    let (code, log) = b.stop().await;
    assert_eq!(code, 0, "{log}");
}

/// The active process is frozen (SIGSTOP) under full-speed load for longer than the
/// walsender's timeout: the standby takes the slot and streams on. Thawed, the frozen process
/// publishes nothing more of what it had read (only batches its producer had queued can still
/// go out, at the instant it resumes): nothing is lost, and every copy that lands after a newer
/// event of its key is a copy of an event already in the log, at or below a position published
/// before it — what a consumer keeping the highest position per source recognises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_loses_nothing_and_its_late_copies_are_recognisable() {
    let _heavy = harness::heavy().await;
    let db = db_with_wal_sender_timeout("3s").await;
    let config = harness::config_toml(&db, &broker().bootstrap, "");
    let (a, b, walsender) = pair(&config, &db).await;
    let writing = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (url, writing) = (db.url.clone(), Arc::clone(&writing));
        writers.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let keys: Vec<String> = (0..25).map(|k| format!("w{w}-k{k}")).collect();
            let (mut ids, mut seq) = (Vec::new(), 0);
            while seq < 100 || writing.load(Ordering::Relaxed) {
                ids.extend(write_events(&client, &keys, 10, seq, false).await);
                seq += 10;
            }
            ids
        }));
    }
    let some = db.current_lsn().await;
    db.await_confirmed(some, TIMEOUT).await;
    a.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let read_before = db.current_lsn().await;
    let deadline = Instant::now() + TIMEOUT;
    while slot_holder(&db).await.is_none_or(|pid| pid == walsender) {
        assert!(Instant::now() < deadline, "the standby never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took_over = frozen.elapsed();
    // The new owner publishes (and confirms) everything the frozen one could have read.
    db.await_confirmed(read_before, TIMEOUT).await;
    let thawed_after = frozen.elapsed();
    a.signal(libc::SIGCONT);
    until("the thawed process to wait as a standby again", || {
        a.log_text()
            .matches("standby: another consumer streams the slot")
            .count()
            >= 1
    })
    .await;
    writing.store(false, Ordering::Relaxed);
    let mut ids = HashSet::new();
    for w in writers {
        ids.extend(w.await.expect("writer"));
    }
    let records = consume_all(&db, &broker().bootstrap, &ids).await;
    let late = late_copies(&records);
    let log = a.log_text();
    eprintln!(
        "frozen owner: standby streamed {} ms after SIGSTOP (wal_sender_timeout 3 s), thawed after \
         {} ms; {} events, {} records, {} late copies (all copies of earlier records at or below \
         a published position); the thawed process: {}",
        took_over.as_millis(),
        thawed_after.as_millis(),
        ids.len(),
        records.len(),
        late.len(),
        log.lines()
            .find(|l| l.contains("did not report to PostgreSQL") || l.contains("reconnecting"))
            .unwrap_or("(no line)")
    );
    for copy in &late {
        assert!(
            copy.seen_before && copy.below_published,
            "a late record that is not a recognisable copy: {copy:?}"
        );
    }
    for p in [b, a] {
        let (code, log) = p.stop().await;
        assert_eq!(code, 0, "{log}");
    }
}
