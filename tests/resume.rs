//! Resuming after an unclean stop: events an earlier run already delivered are not published
//! again, and nothing that is not in Kafka is ever taken for delivered.
//!
//! An unclean stop is reproduced exactly by rewinding the slot: a copy made before the events
//! were delivered replaces the slot afterwards, so PostgreSQL sends those events again, just
//! as it does after a crash between the broker's acknowledgement and the slot's confirmation.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use walship::Config;

use crate::harness::{self, Consumed, Relay, Row, TIMEOUT, TestDb, broker, consume, insert_txn};

const SETTLE: Duration = Duration::from_secs(1);

/// Waits until no walsender holds `slot`.
async fn await_released(db: &TestDb, slot: &str) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let row = db
            .client
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("read slot");
        if row.get::<_, Option<i32>>(0).is_none() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot {slot} still active"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Saves the slot's current position as `<slot>_saved`.
async fn save_slot(db: &TestDb) {
    await_released(db, db.slot()).await;
    db.client
        .execute(
            "SELECT pg_copy_logical_replication_slot($1::text::name, ($1::text || '_saved')::name)",
            &[&db.slot()],
        )
        .await
        .expect("copy slot");
}

/// Puts the slot back to the saved position (the saved copy stays for another rewind).
async fn rewind_slot(db: &TestDb) {
    await_released(db, db.slot()).await;
    db.client
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot('{s}'); \
             SELECT pg_copy_logical_replication_slot('{s}_saved', '{s}');",
            s = db.slot()
        ))
        .await
        .expect("rewind slot");
}

/// Drops the saved copy (an unused slot would hold WAL for the rest of the run).
async fn drop_saved(db: &TestDb) {
    let saved = format!("{}_saved", db.slot());
    await_released(db, &saved).await;
    db.client
        .execute("SELECT pg_drop_replication_slot($1::text::name)", &[&saved])
        .await
        .expect("drop saved slot");
}

/// Writes `txns` transactions of `per_txn` rows over two aggregate types; returns the ids.
async fn write(db: &TestDb, txns: usize, per_txn: usize, first_seq: u64) -> Vec<String> {
    let mut client = harness::postgres::connect(&db.url).await;
    let mut ids = Vec::new();
    for t in 0..txns {
        let rows: Vec<Row> = (0..per_txn)
            .map(|i| {
                let kind = if i % 2 == 0 { "order" } else { "customer" };
                Row::new(kind, &format!("agg-{}", (t + i) % 7), first_seq + t as u64)
            })
            .collect();
        ids.extend(
            insert_txn(&mut client, &rows)
                .await
                .into_iter()
                .map(|u| u.to_string()),
        );
    }
    ids
}

/// Runs walship until the slot confirms everything written so far, then stops it gracefully.
async fn run_to_end(config: Config, db: &TestDb) {
    let relay = Relay::start_streaming(config, db).await;
    db.await_caught_up().await;
    relay.stop().await.expect("clean stop");
}

/// Everything in the test's two topics.
fn read_all(db: &TestDb, expected: usize) -> Vec<Consumed> {
    let topics = [harness::topic(db, "order"), harness::topic(db, "customer")];
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consume(&broker().bootstrap, &topics, expected, TIMEOUT, SETTLE)
}

/// Creates the slot, saves its position, then writes `txns` × `per_txn` events and lets walship
/// deliver and confirm them: everything after the saved position is "unconfirmed" once the slot
/// is rewound. Returns the events' ids.
async fn delivered_after_saved_position(db: &TestDb, txns: usize, per_txn: usize) -> Vec<String> {
    let kafka = &broker().bootstrap;
    run_to_end(harness::config(db, kafka, ""), db).await;
    save_slot(db).await;
    let ids = write(db, txns, per_txn, 0).await;
    run_to_end(harness::config(db, kafka, ""), db).await;
    ids
}

/// How many records carry each outbox id.
fn copies(records: &[Consumed]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in records {
        *out.entry(r.id()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewound_slot_does_not_publish_delivered_events_again() {
    let db = TestDb::new().await;
    let kafka = &broker().bootstrap;
    let first = delivered_after_saved_position(&db, 40, 5).await;
    assert_eq!(read_all(&db, 200).len(), 200);

    // Control: without the lookup a rewound slot publishes every event again, so the rewind
    // below really makes walship meet events that are already in Kafka.
    rewind_slot(&db).await;
    run_to_end(
        harness::config(&db, kafka, "[run]\nresume_dedup = false"),
        &db,
    )
    .await;
    let twice = copies(&read_all(&db, 400));
    assert!(
        first.iter().all(|id| twice.get(id) == Some(&2)),
        "without resume_dedup each event is published twice"
    );

    // With the lookup (the default) nothing already delivered is sent again, and the events
    // committed after them, which are not in Kafka yet, are all sent, in order.
    rewind_slot(&db).await;
    let later = write(&db, 20, 5, 1000).await;
    let port = harness::process::free_port();
    let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"");
    let relay = Relay::start_streaming(harness::config(&db, kafka, &metrics), &db).await;
    db.await_caught_up().await;
    let scraped = crate::metrics::get(port, "/metrics").1;
    relay.stop().await.expect("clean stop");
    assert_eq!(
        crate::metrics::value(&scraped, "walship_resume_skipped_total"),
        200.0,
        "every event of the rewound range was found and counted"
    );
    let records = read_all(&db, 500);
    assert_eq!(records.len(), 500, "only the 100 new events were added");
    let copies = copies(&records);
    assert!(first.iter().all(|id| copies.get(id) == Some(&2)));
    assert!(later.iter().all(|id| copies.get(id) == Some(&1)));
    // Positions name each event: the same event has the same position in both copies, and per
    // key positions increase with commit order.
    let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &records {
        by_id
            .entry(r.id())
            .or_default()
            .push(r.header("walship.position").expect("position header"));
    }
    assert!(by_id.values().all(|p| p.iter().all(|x| *x == p[0])));
    let later: std::collections::HashSet<&String> = later.iter().collect();
    for (key, recs) in harness::by_key(&records) {
        let seqs: Vec<u64> = recs
            .iter()
            .filter(|r| later.contains(&r.id()))
            .map(|r| r.json()["seq"].as_u64().unwrap())
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "order of {key:?}: {seqs:?}"
        );
    }
    drop_saved(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sources_records_are_never_taken_for_delivered() {
    let db = TestDb::new().await;
    let kafka = &broker().bootstrap;
    let ids = delivered_after_saved_position(&db, 10, 4).await;

    // A second slot at the same position reads the same events at the same positions and
    // writes them to the same topics. Its source differs, so it must publish all of them.
    let other = format!("{}_saved", db.slot());
    let config = Config::from_toml(
        &harness::config_toml(&db, kafka, ""),
        [("WALSHIP_POSTGRES__SLOT".to_owned(), other.clone())],
        "test",
    )
    .expect("config");
    let relay = Relay::start(config);
    let end = db.current_lsn().await;
    db.await_slot_confirmed(&other, end, TIMEOUT).await;
    relay.stop().await.expect("clean stop");
    let records = read_all(&db, 80);
    assert_eq!(records.len(), 80);
    let copies = copies(&records);
    assert!(ids.iter().all(|id| copies.get(id) == Some(&2)));
    let sources: std::collections::HashSet<String> = records
        .iter()
        .filter_map(|r| r.header("walship.source"))
        .collect();
    assert_eq!(sources.len(), 2, "{sources:?}");
    drop_saved(&db).await;
}
