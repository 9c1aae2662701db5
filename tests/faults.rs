//! Broker faults injected with librdkafka's mock cluster (PostgreSQL is real):
//! - bounded memory (G5) when one partition stalls: acknowledged transactions behind a stalled
//!   one cannot be confirmed, so walship stops reading at `run.max_pending_transactions`
//!   instead of tracking them without bound, and delivers everything in order once the
//!   partition recovers;
//! - a record the broker refuses after it was sent is dead-lettered with its transaction's
//!   origin (LSN, xid, commit time) and the event's headers.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::harness::{self, Relay, Row, TIMEOUT, TestDb, by_key, consume, insert_txn, seqs};
use crate::metrics;

const BOUND: u64 = 50;

/// `walship_pending_transactions` now.
fn pending(port: u16) -> f64 {
    metrics::value(
        &metrics::get(port, "/metrics").1,
        "walship_pending_transactions",
    )
}

/// The highest of `samples` readings of a gauge, 25 ms apart: what a bound must hold over a
/// while, not at one instant.
async fn highest(samples: usize, read: impl Fn() -> f64) -> f64 {
    let mut most = 0.0_f64;
    for _ in 0..samples {
        most = most.max(read());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_partition_bounds_what_is_tracked_and_everything_arrives_in_order_after() {
    let db = TestDb::new().await;
    let cluster = MockCluster::new(1).expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let topic = harness::topic(&db, "order");
    cluster.create_topic(&topic, 3, 1).expect("topic");
    let port = harness::process::free_port();
    let config = harness::config(
        &db,
        &bootstrap,
        &format!(
            "[run]\nmax_pending_transactions = {BOUND}\n[metrics]\nlisten = \"127.0.0.1:{port}\""
        ),
    );
    let relay = Relay::start_streaming(config, &db).await;

    // Partition 1 loses its leader: its records wait (message.timeout.ms = 0 retries forever)
    // while the other partitions acknowledge theirs.
    cluster
        .partition_leader(&topic, 1, None)
        .expect("leaderless partition");
    const TXNS: u64 = 1000;
    const KEYS: u64 = 12;
    let mut client = harness::postgres::connect(&db.url).await;
    let mut expected: HashMap<String, u64> = HashMap::new();
    for i in 0..TXNS {
        let key = format!("agg-{}", i % KEYS);
        insert_txn(&mut client, &[Row::new("order", &key, i / KEYS)]).await;
        *expected.entry(key).or_default() += 1;
    }

    // The premise: the stall fills the tracker up to the bound...
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while pending(port) < BOUND as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stall never filled the tracker: pending {}",
            pending(port)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and it stays there: walship stops reading instead of tracking every acknowledged
    // transaction behind the stalled one (without the bound: ~1,000 entries).
    let most = highest(40, || pending(port)).await;
    assert!(
        most <= BOUND as f64,
        "{most} transactions tracked, bound {BOUND}"
    );
    let end = db.current_lsn().await;
    assert!(
        db.confirmed_lsn().await < end,
        "nothing past the stalled transaction is confirmed"
    );

    // The leader returns: everything is delivered, in order per aggregate, and confirmed.
    cluster
        .partition_leader(&topic, 1, Some(1))
        .expect("leader back");
    db.await_confirmed(end, TIMEOUT).await;
    let records = consume(
        &bootstrap,
        &[&topic],
        TXNS as usize,
        TIMEOUT,
        Duration::from_secs(1),
    );
    assert_eq!(records.len(), TXNS as usize);
    for ((_, key), recs) in by_key(&records) {
        let s = seqs(&recs);
        assert_eq!(s.len() as u64, expected[&key], "{key}");
        assert!(s.windows(2).all(|w| w[0] < w[1]), "order of {key}: {s:?}");
    }
    relay.stop().await.expect("clean stop");
}

/// A mock cluster with the test's topic and a dead-letter topic, walship streaming into it
/// under `on_bad_row = "dead-letter"` (plus `extra` config), and the next produce request
/// refused for good: the record is sent, then rejected. Returns the cluster, the topic, the
/// dead-letter topic and walship.
async fn refusing_broker(
    db: &TestDb,
    extra: &str,
) -> (
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    String,
    String,
    Relay,
) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let topic = harness::topic(db, "order");
    let dlq = format!("{}.dlq", db.name);
    cluster.create_topic(&topic, 1, 1).expect("topic");
    cluster.create_topic(&dlq, 1, 1).expect("dead-letter topic");
    let toml = harness::config_toml(db, &bootstrap, extra).replace(
        "[outbox]\n",
        &format!("[outbox]\non_bad_row = \"dead-letter\"\ndead_letter_topic = \"{dlq}\"\n"),
    );
    let config = walship::Config::from_toml(&toml, std::iter::empty(), "test").expect("config");
    let relay = Relay::start_streaming(config, db).await;
    // The next produce request is refused for good: the record was sent, then rejected.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    (cluster, topic, dlq, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_is_dead_lettered_with_its_transactions_origin() {
    let mut db = TestDb::new().await;
    let (cluster, topic, dlq, relay) = refusing_broker(&db, "").await;
    let bootstrap = cluster.bootstrap_servers();
    insert_txn(&mut db.client, &[Row::new("order", "a", 0)]).await;
    let xid: i64 = db
        .client
        .query_one("SELECT max(xmin::text::bigint) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    let dead = consume(&bootstrap, &[&dlq], 1, TIMEOUT, Duration::from_secs(1));
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert!(
        d.header("walship.error")
            .is_some_and(|e| e.contains("not accepted by topic")),
        "{d:?}"
    );
    assert_eq!(
        d.header("walship.lsn"),
        Some(d.commit_lsn().to_string()),
        "the transaction's commit LSN, not 0/0"
    );
    assert_eq!(d.header("walship.xid"), Some(xid.to_string()));
    assert!(d.header("walship.source").is_some() && d.header("id").is_some());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ts = d.timestamp_ms.expect("timestamp");
    assert!(ts > now - 600_000 && ts <= now, "the commit time: {ts}");
    // The next event (sent after the refusal was handled) is delivered.
    insert_txn(&mut db.client, &[Row::new("order", "a", 1)]).await;
    db.await_caught_up().await;
    let good = consume(&bootstrap, &[&topic], 1, TIMEOUT, Duration::from_secs(1));
    assert_eq!(seqs(&good), vec![1], "the next event is delivered");
    relay.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_at_the_pending_bound_is_dead_lettered_instead_of_waiting_for_ever() {
    let mut db = TestDb::new().await;
    let (cluster, topic, dlq, relay) =
        refusing_broker(&db, "[run]\nmax_pending_transactions = 2\n").await;
    let bootstrap = cluster.bootstrap_servers();
    // The refused record's transaction stays pending until its dead letter is sent, and the
    // bound (2) is reached by the transactions read after it.
    for seq in 0..20 {
        insert_txn(&mut db.client, &[Row::new("order", "a", seq)]).await;
    }
    db.await_caught_up().await;
    let dead = consume(&bootstrap, &[&dlq], 1, TIMEOUT, Duration::from_secs(1));
    let good = consume(&bootstrap, &[&topic], 1, TIMEOUT, Duration::from_secs(1));
    assert!(!dead.is_empty());
    assert_eq!(
        dead.len() + good.len(),
        20,
        "every event is delivered or dead-lettered"
    );
    relay.stop().await.expect("clean stop");
}

/// The broker refuses a record, then refuses its dead letter too (a dead-letter topic that
/// takes nothing walship sends): walship stops naming the row and the topic after that second
/// refusal, with the row's transaction unconfirmed — never a loop, never a skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_the_broker_refuses_stops_walship_without_confirming_its_row() {
    let mut db = TestDb::new().await;
    let (cluster, _topic, dlq, relay) = refusing_broker(&db, "").await;
    // The record's refusal is queued by `refusing_broker`; its dead letter is refused next.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let before = db.confirmed_lsn().await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 0)]).await;
    let error = relay.exit().await.expect_err("walship stops");
    let text = error.to_string();
    assert!(
        matches!(error, walship::Error::DeadLetterRefused { .. })
            && text.contains(&format!("topic {dlq:?} refused its dead letter")),
        "{text}"
    );
    let commit: pgoutput::Lsn = db.current_lsn().await;
    let confirmed = db.confirmed_lsn().await;
    assert!(
        confirmed < commit && confirmed >= before,
        "confirmed {confirmed}, the row's transaction ends by {commit}"
    );
}

/// Sixteen pipelines in one process share one producer; one of them routes to a partition
/// that loses its leader. The other fifteen deliver and confirm everything meanwhile, the
/// stalled one keeps no more than its window in flight and confirms nothing past its first
/// unacknowledged event, and once the leader is back every pipeline has every event, in order
/// per aggregate (every copy looked at).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_pipelines_share_a_producer_and_a_stalled_partition_holds_up_only_its_own() {
    const PIPELINES: usize = 16;
    const WINDOW: u64 = 10;
    const TXNS: u64 = 60;
    const KEYS: u64 = 12;
    let _heavy = harness::heavy().await;
    let mut dbs = Vec::new();
    for _ in 0..PIPELINES {
        dbs.push(TestDb::new().await);
    }
    let cluster = MockCluster::new(1).expect("mock cluster");
    let bootstrap = cluster.bootstrap_servers();
    let topics: Vec<String> = dbs.iter().map(|db| harness::topic(db, "order")).collect();
    for topic in &topics {
        cluster.create_topic(topic, 3, 1).expect("topic");
    }
    let port = harness::process::free_port();
    let entries: String = dbs
        .iter()
        .enumerate()
        .map(|(i, db)| crate::pipelines::pipeline(&format!("p{i}"), db))
        .collect();
    let text = format!(
        "[kafka]\nbrokers = \"{bootstrap}\"\ncreate_topics = false\n\n\
         [run]\nmax_in_flight_events = {WINDOW}\n\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n\n{entries}"
    );
    let deployment =
        walship::config::deployment::Deployment::from_toml(&text, std::iter::empty(), "test")
            .expect("deployment");
    harness::init_logging();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(walship::deployment::run_deployment(deployment, async {
        let _ = stopped.await;
    }));
    for db in &dbs {
        db.await_streaming().await;
    }

    // p0's partition 1 loses its leader: its records wait there (message.timeout.ms = 0).
    cluster
        .partition_leader(&topics[0], 1, None)
        .expect("leaderless partition");
    let mut ends = Vec::new();
    for db in &dbs {
        let mut client = harness::postgres::connect(&db.url).await;
        for i in 0..TXNS {
            let key = format!("agg-{}", i % KEYS);
            insert_txn(&mut client, &[Row::new("order", &key, i / KEYS)]).await;
        }
        ends.push(db.current_lsn().await);
    }
    // The fifteen others deliver and confirm everything through the shared producer.
    for (db, end) in dbs.iter().zip(&ends).skip(1) {
        db.await_confirmed(*end, TIMEOUT).await;
    }
    // p0 stalls at its window, with nothing confirmed past its stalled events.
    let in_flight = |port| {
        metrics::value(
            &metrics::get(port, "/metrics").1,
            "walship_in_flight_events{pipeline=\"p0\"}",
        )
    };
    harness::until("p0's window full", || in_flight(port) >= WINDOW as f64).await;
    let most = highest(20, || in_flight(port)).await;
    assert!(
        most <= WINDOW as f64,
        "{most} records in flight, window {WINDOW}"
    );
    assert!(
        dbs[0].confirmed_lsn().await < ends[0],
        "nothing past p0's stalled events is confirmed"
    );

    // The leader returns: p0 catches up; every pipeline has every event, in order.
    cluster
        .partition_leader(&topics[0], 1, Some(1))
        .expect("leader back");
    dbs[0].await_confirmed(ends[0], TIMEOUT).await;
    let all: Vec<&str> = topics.iter().map(String::as_str).collect();
    let records = consume(
        &bootstrap,
        &all,
        PIPELINES * TXNS as usize,
        TIMEOUT,
        Duration::from_secs(1),
    );
    let mut counts: HashMap<String, u64> = HashMap::new();
    for ((topic, key), recs) in by_key(&records) {
        let s = seqs(&recs);
        *counts.entry(topic.clone()).or_default() += s.len() as u64;
        assert!(
            s.windows(2).all(|w| w[0] < w[1]),
            "{topic}: order of {key}: {s:?}"
        );
    }
    for topic in &topics {
        assert_eq!(counts.get(topic), Some(&TXNS), "{topic}");
    }
    stop.send(()).expect("walship runs");
    tokio::time::timeout(TIMEOUT, run)
        .await
        .expect("walship stops in time")
        .expect("walship task")
        .expect("clean stop");
}
