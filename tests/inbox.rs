//! The inbox (`walship-inbox`): a consumer applies every event exactly once, in commit order per
//! key, whatever walship and the consumer go through — walship killed and resumed, a hand-over
//! from a frozen (SIGSTOP) owner whose late batches land after its successor's, the consumer
//! itself killed -9 between its database commit and its offset commit, and a replay of the whole
//! topic by a new consumer group.
//!
//! The consumer runs as a separate process (this test binary started again on
//! [`consumer_process`]), so its kill -9 is real. It applies events to a database of its own;
//! the checks compare that database with the producer's outbox table.
//!
//! PostgreSQL 15 only (`scripts/test.sh`): the inbox's SQL (`pg_lsn`, `ON CONFLICT`) is the same
//! on every supported version, and the walship behaviour it relies on is tested across versions
//! by the reliability and handover suites.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use tokio_postgres::{Client, Transaction};
use walship_inbox::{Admission, Error, Handler, Inbox, POSITION_HEADER, SOURCE_HEADER, Unmarked};

use crate::failover::slot_holder;
use crate::harness::postgres::connect;
use crate::harness::process::free_port;
use crate::harness::{
    self, Binary, Consumed, TIMEOUT, TestDb, broker, consume, process, topic, until, until_async,
};
use crate::metrics::{get, value};
use crate::reliability::write_events;

/// A record as walship writes it (or, without `source`, as another producer might).
fn record(partition: i32, offset: i64, headers: &[(&str, &str)]) -> OwnedMessage {
    let mut owned = OwnedHeaders::new();
    for (key, value) in headers {
        owned = owned.insert(Header {
            key,
            value: Some(*value),
        });
    }
    OwnedMessage::new(
        Some(b"{}".to_vec()),
        Some(b"k".to_vec()),
        "orders".into(),
        Timestamp::NotAvailable,
        partition,
        offset,
        Some(owned),
    )
}

fn walship_record(partition: i32, offset: i64, source: &str, position: &str) -> OwnedMessage {
    record(
        partition,
        offset,
        &[
            ("id", &format!("e-{offset}")),
            (SOURCE_HEADER, source),
            (POSITION_HEADER, position),
        ],
    )
}

/// Admits `m` in a transaction of its own and commits it.
async fn admit(inbox: &Inbox, client: &mut Client, m: &OwnedMessage) -> Result<Admission, Error> {
    let tx = client.transaction().await.expect("begin");
    let admission = inbox.admit(&tx, m).await;
    if admission.is_ok() {
        tx.commit().await.expect("commit");
    }
    admission
}

/// The mark against a real PostgreSQL: it rises per topic, partition and source, in the
/// stream's order (commit LSN, then index — across the 32-bit halves of the LSN); a copy at or
/// below it is a duplicate; a rolled-back transaction leaves it where it was; records of other
/// producers follow the configured choice; a malformed position is an error, not a skip.
#[tokio::test]
async fn the_mark_admits_each_position_once_per_partition_and_source() {
    let db = TestDb::new().await;
    let mut client = connect(&db.url).await;
    let inbox = Inbox::new();
    inbox.create_tables(&client).await.expect("create tables");
    inbox.create_tables(&client).await.expect("idempotent");
    let (s1, s2) = ("7305/orders", "7305/orders-after-promotion");
    use Admission::{Apply, Duplicate};
    for (partition, offset, source, position, expected) in [
        (0, 0, s1, "0/16B3F2:0", Apply),
        (0, 1, s1, "0/16B3F2:1", Apply),
        (0, 2, s1, "0/16B3F2:1", Duplicate), // a resume's copy
        (0, 3, s1, "0/16B3F2:0", Duplicate), // a late copy below the mark
        (0, 4, s1, "0/FFFFFFFF:0", Apply),
        (0, 5, s1, "1/0:0", Apply), // the LSN's high half: ordered as a pg_lsn, not as text
        (0, 6, s1, "0/FFFFFFFF:9", Duplicate),
        (1, 0, s1, "0/16B3F2:0", Apply), // another partition has its own mark
        (0, 7, s2, "0/1:0", Apply),      // so has another source
        (0, 8, s1, "1/0:0", Duplicate),
    ] {
        let m = walship_record(partition, offset, source, position);
        assert_eq!(
            admit(&inbox, &mut client, &m).await.expect("admit"),
            expected,
            "partition {partition} offset {offset} {source} {position}"
        );
    }
    // The statements prepared on the connection decide alike.
    let prepared = inbox.prepare(&client).await.expect("prepare");
    for (offset, position, expected) in [
        (0, "1/0:0", Apply),
        (1, "1/0:0", Duplicate),
        (2, "0/5:0", Duplicate),
        (3, "2/0:0", Apply),
    ] {
        let m = walship_record(3, offset, s1, position);
        let tx = client.transaction().await.expect("begin");
        assert_eq!(prepared.admit(&tx, &m).await.expect("admit"), expected);
        tx.commit().await.expect("commit");
    }
    // A transaction that rolls back (the handler failed) leaves the mark where it was.
    let m = walship_record(0, 9, s1, "1/0:1");
    let tx = client.transaction().await.expect("begin");
    assert_eq!(inbox.admit(&tx, &m).await.expect("admit"), Apply);
    tx.rollback().await.expect("rollback");
    assert_eq!(admit(&inbox, &mut client, &m).await.expect("admit"), Apply);
    let row = client
        .query_one(
            "SELECT commit_lsn::text, event_index, kafka_offset FROM walship_inbox \
             WHERE topic = 'orders' AND kafka_partition = 0 AND source = $1",
            &[&s1],
        )
        .await
        .expect("mark");
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        ("1/0".into(), 1, 9)
    );

    // A malformed position: an error naming the record and the header; nothing changes.
    let bad = walship_record(0, 10, s1, "1/0");
    let err = admit(&inbox, &mut client, &bad).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("topic orders partition 0 offset 10")
            && text.contains("walship.position")
            && text.contains("\"1/0\""),
        "{text}"
    );
    assert!(!err.is_transient());
    // Forms a lenient parser reads but pg_lsn does not: refused before the database, naming
    // the header.
    for position in ["+1/0:2", "000000001/0:2"] {
        let err = admit(&inbox, &mut client, &walship_record(0, 10, s1, position))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::MalformedHeader { header, .. } if header == POSITION_HEADER),
            "{err}"
        );
    }

    // Records of other producers.
    let foreign = |offset, id: &str| record(2, offset, &[("event-id", id)]);
    let err = admit(&inbox, &mut client, &foreign(0, "a"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unmarked { .. }) && err.to_string().contains("Unmarked::ById"),
        "{err}"
    );
    let by_id = inbox.clone().with_unmarked(Unmarked::ById {
        header: "event-id".into(),
    });
    for (offset, id, expected) in [(0, "a", Apply), (1, "b", Apply), (2, "a", Duplicate)] {
        assert_eq!(
            admit(&by_id, &mut client, &foreign(offset, id))
                .await
                .expect("by id"),
            expected
        );
    }
    let err = admit(&by_id, &mut client, &record(2, 3, &[]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no \"event-id\" header"), "{err}");
    let pass = inbox.clone().with_unmarked(Unmarked::PassThrough);
    for _ in 0..2 {
        assert_eq!(
            admit(&pass, &mut client, &foreign(0, "a"))
                .await
                .expect("pass"),
            Apply
        );
    }
    // walship's records are still deduplicated whatever the choice for foreign ones.
    let copy = walship_record(0, 11, s1, "1/0:1");
    assert_eq!(
        admit(&pass, &mut client, &copy).await.expect("pass"),
        Duplicate
    );

    // No table: the error says how to create it.
    let missing = Inbox::new().with_table(None, "no_such_inbox");
    let err = admit(&missing, &mut client, &copy).await.unwrap_err();
    assert!(err.to_string().contains("create_tables"), "{err}");
}

/// Two transactions holding the same record (a rebalance's old and new owner): the second
/// waits on the mark's row until the first commits, then sees it — one applies, one skips.
#[tokio::test]
async fn a_second_holder_of_a_record_waits_for_the_first_and_skips_it() {
    let db = TestDb::new().await;
    let inbox = Inbox::new();
    inbox
        .create_tables(&db.client)
        .await
        .expect("create tables");
    let m = walship_record(0, 0, "s", "0/10:0");
    let mut first = connect(&db.url).await;
    let tx = first.transaction().await.expect("begin");
    assert_eq!(inbox.admit(&tx, &m).await.expect("admit"), Admission::Apply);
    let (url, inbox2, m2) = (db.url.clone(), inbox.clone(), m.clone());
    let second = tokio::spawn(async move {
        let mut client = connect(&url).await;
        let tx = client.transaction().await.expect("begin");
        let admission = inbox2.admit(&tx, &m2).await.expect("admit");
        tx.commit().await.expect("commit");
        admission
    });
    until_async(
        "the second holder to wait on the mark's row lock",
        || async {
            db.client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%walship_inbox%'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .get::<_, i64>(0)
                == 1
        },
    )
    .await;
    assert!(!second.is_finished());
    tx.commit().await.expect("commit");
    assert_eq!(second.await.expect("second"), Admission::Duplicate);
}

// ---------------------------------------------------------------------------------------------
// The consumer process.

const ENV_DB: &str = "WALSHIP_INBOX_TEST_CONSUMER_DB";
const ENV_BOOTSTRAP: &str = "WALSHIP_INBOX_TEST_BOOTSTRAP";
const ENV_GROUP: &str = "WALSHIP_INBOX_TEST_GROUP";
const ENV_TOPIC: &str = "WALSHIP_INBOX_TEST_TOPIC";

/// The consumer's work: one row per event, with the key and the `seq` the writer put in it.
struct Apply;

impl Handler for Apply {
    type Error = tokio_postgres::Error;

    async fn handle<M: Message + Sync>(
        &mut self,
        tx: &Transaction<'_>,
        record: &M,
    ) -> Result<(), tokio_postgres::Error> {
        let payload: serde_json::Value =
            serde_json::from_slice(record.payload().unwrap_or_default()).expect("JSON payload");
        let id = record
            .headers()
            .and_then(|h| {
                use rdkafka::message::Headers;
                h.iter().find(|h| h.key == "id").and_then(|h| h.value)
            })
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("id header");
        tx.execute(
            "INSERT INTO applied (id, key, seq, topic, kafka_partition, kafka_offset) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &id,
                &String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned(),
                &payload["seq"].as_i64().expect("seq"),
                &record.topic(),
                &record.partition(),
                &record.offset(),
            ],
        )
        .await?;
        Ok(())
    }
}

/// The consumer process's body: runs only when [`Consumer::start`] starts this binary on it.
#[test]
#[ignore = "the inbox tests' consumer process; they start it themselves"]
fn consumer_process() {
    let Ok(url) = std::env::var(ENV_DB) else {
        return;
    };
    let env = |name| std::env::var(name).expect(name);
    let (bootstrap, group, topic) = (env(ENV_BOOTSTRAP), env(ENV_GROUP), env(ENV_TOPIC));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut client = connect(&url).await;
        let inbox = Inbox::new();
        inbox.create_tables(&client).await.expect("create tables");
        // The statements prepared on this connection: the suite's other tests use one-shot ones.
        let inbox = inbox.prepare(&client).await.expect("prepare");
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS applied (
                     serial bigserial PRIMARY KEY, id text NOT NULL, key text NOT NULL,
                     seq bigint NOT NULL, topic text NOT NULL, kafka_partition int NOT NULL,
                     kafka_offset bigint NOT NULL)",
            )
            .await
            .expect("applied table");
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .set("log_level", "3");
        walship_inbox::configure(&mut config);
        let consumer: StreamConsumer = config.create().expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        println!("consumer started");
        let (mut applied, mut skipped) = (0u64, 0u64);
        // Per partition, the offset after the last record processed.
        let mut next = BTreeMap::new();
        loop {
            match consumer.recv().await {
                Ok(m) => {
                    match inbox.process(&mut client, &consumer, &m, &mut Apply).await {
                        Ok(Admission::Apply) => applied += 1,
                        Ok(Admission::Duplicate) => {
                            skipped += 1;
                            // Which record: the test tells redeliveries from late copies.
                            println!("skip {} {}", m.partition(), m.offset());
                        }
                        Err(e) => panic!("processing failed: {e}"),
                    }
                    next.insert(m.partition(), m.offset() + 1);
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    let at = next.get(&p).copied().unwrap_or(0);
                    println!("eof partition {p} next {at}: applied {applied}, skipped {skipped}");
                }
                Err(e) => println!("consumer error (retrying): {e}"),
            }
        }
    });
}

/// The consumer process, with its output in a file.
struct ConsumerProcess {
    child: std::process::Child,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ConsumerProcess {
    fn start(db_url: &str, group: &str, topic: &str) -> ConsumerProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = vec![
            (ENV_DB, db_url.to_owned()),
            (ENV_BOOTSTRAP, broker().bootstrap.clone()),
            (ENV_GROUP, group.to_owned()),
            (ENV_TOPIC, topic.to_owned()),
        ];
        let log = dir.path().join("consumer.log");
        let child = Self::spawn(&env, &log);
        ConsumerProcess {
            child,
            env,
            log,
            _dir: dir,
        }
    }

    fn spawn(env: &[(&'static str, String)], log: &std::path::Path) -> std::process::Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([
            "inbox::consumer_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
        process::spawn_owned(cmd, libc::SIGKILL).expect("start the consumer process")
    }

    /// kill -9, and wait for it to be gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.child = Self::spawn(&self.env, &self.log);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every record (partition, offset) any of its starts skipped as a copy.
    fn skipped(&self) -> HashSet<(i32, i64)> {
        self.log_text()
            .lines()
            .filter_map(|l| {
                let (p, o) = l.strip_prefix("skip ")?.split_once(' ')?;
                Some((p.parse().ok()?, o.parse().ok()?))
            })
            .collect()
    }

    /// Panics with its log if the process ended (it never ends by itself).
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "the consumer process ended ({status}):\n{}",
                self.log_text()
            );
        }
    }

    /// The process's counts (applied, skipped) once its latest start has read every partition
    /// to its end in `ends` (partition → the offset after its last record); `None` before.
    fn read_to_end(&self, ends: &BTreeMap<i32, i64>) -> Option<(u64, u64)> {
        let log = self.log_text();
        let latest = log.rsplit("consumer started").next().unwrap_or_default();
        let mut at = BTreeMap::new();
        let mut counts = (0, 0);
        for line in latest.lines() {
            let Some(rest) = line.strip_prefix("eof partition ") else {
                continue;
            };
            let nums: Vec<u64> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
            if let [p, next, applied, skipped] = nums[..] {
                at.insert(p as i32, next as i64);
                counts = (applied, skipped);
            }
        }
        ends.iter()
            .all(|(p, end)| at.get(p) == Some(end))
            .then_some(counts)
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

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
