//! Every event applied once across walship kills, a frozen owner's hand-over, the consumer's own
//! kill -9 restarts and a replay by a new group, compared with the outbox.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use tokio_postgres::Client;
use walship_inbox::POSITION_HEADER;

use crate::failover::slot_holder;
use crate::harness::postgres::connect;
use crate::harness::process::free_port;
use crate::harness::{
    self, Binary, Consumed, TIMEOUT, TestDb, broker, consume, topic, until, until_async,
};
use crate::metrics::{get, value};
use crate::reliability::write_events;

use super::consumer::ConsumerProcess;

/// What a walship process logs while another one streams its slot.
const STANDBY: &str = "standby: another consumer streams the slot";

/// Every record in `topic` (every copy of every event: all of `ids` and whatever else is there),
/// and per partition the offset after its last record.
fn everything(topic: &str, ids: &HashSet<String>) -> (Vec<Consumed>, BTreeMap<i32, i64>) {
    let records = consume(
        &broker().bootstrap,
        &[topic],
        ids.len(),
        TIMEOUT,
        Duration::from_secs(1),
    );
    let mut ends = BTreeMap::new();
    for r in &records {
        let end = ends.entry(r.partition).or_insert(0);
        *end = (*end).max(r.offset + 1);
    }
    (records, ends)
}

/// Sends again, to its partition and after newer events of its key, the oldest record of a key
/// that has a newer one: a late copy, as a frozen owner's producer would send it.
async fn copy_late(topic: &str, records: &[Consumed]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut sorted: Vec<&Consumed> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let original = sorted
        .iter()
        .find(|r| {
            sorted
                .iter()
                .any(|n| n.key == r.key && n.partition == r.partition && n.offset > r.offset)
        })
        .expect("a key with two events");
    let mut headers = OwnedHeaders::new();
    for (k, v) in &original.headers {
        headers = headers.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    let mut record = FutureRecord::to(topic)
        .partition(original.partition)
        .key(&original.key)
        .headers(headers);
    if let Some(p) = &original.payload {
        record = record.payload(p);
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &broker().bootstrap)
        .create()
        .expect("producer");
    producer
        .send(record, Duration::from_secs(30))
        .await
        .expect("write the late copy");
}

/// Waits until the consumer's latest start has read every partition to `ends`; returns its
/// counts (applied, skipped) then.
async fn await_read_to_end(
    consumer: &mut ConsumerProcess,
    ends: &BTreeMap<i32, i64>,
) -> (u64, u64) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        consumer.assert_running();
        if let Some(counts) = consumer.read_to_end(ends) {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "the consumer did not read {ends:?} within {TIMEOUT:?}:\n{}",
            consumer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn applied_count(consumer_db: &Client) -> i64 {
    consumer_db
        .query_one("SELECT count(*) FROM applied", &[])
        .await
        .map_or(0, |r| r.get(0))
}

/// Like [`await_applied`], but returns how many were applied when the time is up.
async fn try_await_applied(
    consumer_db: &Client,
    consumer: &mut ConsumerProcess,
    n: i64,
) -> Result<(), i64> {
    let deadline = Instant::now() + TIMEOUT;
    while applied_count(consumer_db).await < n {
        consumer.assert_running();
        if Instant::now() >= deadline {
            return Err(applied_count(consumer_db).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits until the consumer has applied at least `n` events (the process must stay up).
async fn await_applied(consumer_db: &Client, consumer: &mut ConsumerProcess, n: i64) {
    let deadline = Instant::now() + TIMEOUT;
    while applied_count(consumer_db).await < n {
        consumer.assert_running();
        assert!(
            Instant::now() < deadline,
            "the consumer applied {} of {n} events within {TIMEOUT:?}:\n{}",
            applied_count(consumer_db).await,
            consumer.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event once, in commit order per key: walship killed and resumed, a frozen owner
/// handing over to a standby while a second writer runs at full speed (its late batches land
/// after the new owner's records: the test asserts there are some, and that none was applied),
/// the consumer killed -9 twice under load (it asserts that the restarts skipped records an
/// earlier start had applied; more of each with `WALSHIP_LONG_TESTS=1`), and finally a new
/// consumer group replaying the whole topic into the same database, which applies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_applied_once_across_kills_and_a_frozen_owners_hand_over() {
    let _heavy = harness::heavy().await;
    let started = Instant::now();
    // The long variant (WALSHIP_LONG_TESTS=1) crashes walship and the consumer five times each
    // before the hand-over and the consumer five times after it.
    let rounds = if harness::long_tests() { 5 } else { 1 };
    let db = TestDb::new().await;
    // The frozen owner's walsender ends its stream after 2 s without a status report.
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET wal_sender_timeout = '2s'",
            db.name
        ))
        .await
        .expect("set wal_sender_timeout");
    let consumer_db = TestDb::new().await;
    let config = harness::config_toml(&db, &broker().bootstrap, "");
    let topic = topic(&db, "order");
    // The first owner serves metrics: its in-flight count says when its producer holds records.
    let port = free_port();
    let mut a = Binary::start(&format!(
        "{config}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    ));
    db.await_streaming().await;

    // A writer commits one event for each of 10 keys every 50 ms (in seq order per key) until
    // told to stop: a steady load through every disruption.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (url, writing) = (db.url.clone(), Arc::clone(&writing));
        tokio::spawn(async move {
            let client = connect(&url).await;
            let keys: Vec<String> = (0..10).map(|k| format!("k{k}")).collect();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let (mut ids, mut seq) = (Vec::new(), 0);
            while seq < 20 || writing.load(Ordering::Relaxed) {
                tick.tick().await;
                ids.extend(write_events(&client, &keys, 1, seq, false).await);
                seq += 1;
            }
            ids
        })
    };
    // The topic exists once the first events are acknowledged.
    db.await_caught_up().await;
    let group = format!("{}-inbox", db.name);
    let mut consumer = ConsumerProcess::start(&consumer_db.url, &group, &topic);
    let c = &consumer_db.client;
    await_applied(c, &mut consumer, 100).await;

    for _ in 0..rounds {
        // walship crashes and resumes.
        a.kill();
        a.restart();
        db.await_streaming().await;
        let n = applied_count(c).await;
        await_applied(c, &mut consumer, n + 100).await;

        // The consumer crashes under load (its last offsets uncommitted) and restarts.
        consumer.kill();
        consumer.restart();
        let n = applied_count(c).await;
        await_applied(c, &mut consumer, n + 100).await;
    }

    // A standby waits; the owner is frozen; the standby takes the slot; the old one thaws.
    let b = Binary::start(&config);
    until("the second walship to wait as a standby", || {
        b.log_text().contains(STANDBY)
    })
    .await;
    let walsender = slot_holder(&db).await.expect("the first streams");
    let standby_lines = a.log_text().matches(STANDBY).count();
    // Frozen while its producer holds unacknowledged records: if they are still unsent then,
    // the standby publishes those events again and newer ones of the same keys, and the thawed
    // producer's batches land after them — late copies (whether they are unsent is a matter of
    // timing, so the test also writes one late copy itself, below).
    until(
        "the owner's producer to hold unacknowledged records",
        || value(&get(port, "/metrics").1, "walship_in_flight_events") > 0.0,
    )
    .await;
    a.signal(libc::SIGSTOP);
    until_async("the standby to take the slot", || async {
        slot_holder(&db).await.is_some_and(|pid| pid != walsender)
    })
    .await;
    // The standby publishes what was written meanwhile before the old owner thaws.
    let now = db.current_lsn().await;
    db.await_confirmed(now, TIMEOUT).await;
    a.signal(libc::SIGCONT);
    until("the thawed walship to wait as a standby", || {
        a.log_text().matches(STANDBY).count() > standby_lines
    })
    .await;

    // The consumer crashes again, now reading the new owner's records and the old one's copies.
    for _ in 0..rounds {
        let n = applied_count(c).await;
        await_applied(c, &mut consumer, n + 50).await;
        consumer.kill();
        consumer.restart();
    }

    writing.store(false, Ordering::Relaxed);
    let ids: HashSet<String> = writer.await.expect("writer").into_iter().collect();
    db.await_caught_up().await;
    if let Err(n) = try_await_applied(c, &mut consumer, ids.len() as i64).await {
        // Where are the events the consumer did not apply?
        let applied: HashSet<String> = c
            .query("SELECT id FROM applied", &[])
            .await
            .expect("applied")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let (records, _) = everything(&topic, &ids);
        let missing: Vec<&String> = ids.iter().filter(|i| !applied.contains(*i)).collect();
        for m in missing.iter().take(10) {
            let found: Vec<String> = records
                .iter()
                .filter(|r| r.id() == **m)
                .map(|r| {
                    format!(
                        "p{} o{} pos {:?}",
                        r.partition,
                        r.offset,
                        r.header(POSITION_HEADER)
                    )
                })
                .collect();
            eprintln!("missing {m}: in the topic at {found:?}");
        }
        panic!(
            "the consumer applied {n} of {} events; {} missing",
            ids.len(),
            missing.len()
        );
    }
    // Whether the thawed producer still held batches at the freeze is a matter of timing, so
    // the test also writes one late copy itself: an event already applied, sent again to its
    // partition after newer events of its key, headers and all (what a frozen owner's batch is).
    let (records, _) = everything(&topic, &ids);
    copy_late(&topic, &records).await;
    // Everything in the topic is read, every copy too.
    let (records, ends) = everything(&topic, &ids);
    let live = await_read_to_end(&mut consumer, &ends).await;
    let applied_before_replay = applied_count(c).await;

    // A new consumer group reads the whole topic again into the same database: all copies.
    let mut replay = ConsumerProcess::start(&consumer_db.url, &format!("{group}-replay"), &topic);
    let (replay_applied, replayed) = await_read_to_end(&mut replay, &ends).await;
    assert_eq!(
        replay_applied,
        0,
        "the replay applied events:\n{}",
        replay.log_text()
    );
    assert_eq!(
        replayed,
        records.len() as u64,
        "the replay skipped every record"
    );
    drop(replay);
    consumer.kill();
    assert_eq!(applied_count(c).await, applied_before_replay);

    // The consumer's table against the outbox: the same events, each once, per key in the
    // order they were committed.
    let outbox = db
        .client
        .query(
            "SELECT aggregateid, id::text FROM outbox ORDER BY aggregateid, (payload->>'seq')::int",
            &[],
        )
        .await
        .expect("outbox");
    let applied = c
        .query("SELECT key, id, seq FROM applied ORDER BY key, serial", &[])
        .await
        .expect("applied");
    let per_key = |rows: &[tokio_postgres::Row]| {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in rows {
            map.entry(r.get(0)).or_default().push(r.get(1));
        }
        map
    };
    assert_eq!(outbox.len(), ids.len());
    let duplicates = applied.len()
        - applied
            .iter()
            .map(|r| r.get::<_, String>(1))
            .collect::<HashSet<_>>()
            .len();
    assert_eq!(duplicates, 0, "events applied more than once");
    assert_eq!(
        per_key(&applied),
        per_key(&outbox),
        "the consumer's events differ from the outbox's (per key, in commit order)"
    );
    let marks: i64 = c
        .query_one("SELECT count(*) FROM walship_inbox", &[])
        .await
        .expect("marks")
        .get(0);

    // The frozen owner's late copies are in the topic, and none of them was the record applied.
    let applied_at: HashSet<(i32, i64)> = c
        .query("SELECT kafka_partition, kafka_offset FROM applied", &[])
        .await
        .expect("applied offsets")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let late = harness::late_copies(&records);
    assert!(
        !late.is_empty(),
        "no late copies among {} records (the test wrote one itself)",
        records.len()
    );
    for copy in &late {
        assert!(
            copy.seen_before && copy.below_published,
            "a late record that is not a recognisable copy: {copy:?}"
        );
        assert!(
            !applied_at.contains(&(copy.record.partition, copy.record.offset)),
            "a late copy was applied: {copy:?}"
        );
    }
    // The consumer's kill -9 restarts got records again that an earlier start had applied (its
    // offsets were not committed yet), and skipped them.
    let skipped = consumer.skipped();
    let redelivered = skipped.intersection(&applied_at).count();
    assert!(
        redelivered > 0,
        "no redelivery skipped across {} consumer kills ({} skips in all)",
        2 * rounds,
        skipped.len()
    );
    eprintln!(
        "inbox: {} events applied once each across {rounds} walship kill(s), a frozen owner's \
         hand-over and {} consumer kills; the topic held {} records ({} late copies, none \
         applied); the consumer skipped {} records, {redelivered} of them redeliveries of \
         records it had applied before a kill ({} copies skipped by its last start); the replay \
         skipped {replayed} records; {marks} mark rows; {} s",
        ids.len(),
        2 * rounds,
        records.len(),
        late.len(),
        skipped.len(),
        live.1,
        started.elapsed().as_secs()
    );
    for p in [b, a] {
        let (code, log) = p.stop().await;
        assert_eq!(code, 0, "{log}");
    }
}
