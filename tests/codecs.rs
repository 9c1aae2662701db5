//! Compression: every codec walship documents (`kafka.librdkafka."compression.type"`: none,
//! gzip, snappy, lz4, zstd) delivers events through a real broker, in order, and the records
//! travel compressed.
//!
//! Compression is proven from the consumer's side: the payloads are highly compressible, and
//! librdkafka's statistics count the bytes the consumer received from the broker. Without
//! compression it receives at least the payloads' size; with a codec, a small fraction of it.
//! The broker stores and serves the batches as the producer compressed them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};

use crate::harness::{self, Relay, Row, TIMEOUT, TestDb, broker, insert_txn, topic};

/// Events per codec, and the size of each one's compressible padding.
const EVENTS: u64 = 200;
const PAD: usize = 4000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncompressed_records_arrive_whole() {
    delivers_with("none").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_records_arrive_compressed() {
    delivers_with("gzip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snappy_records_arrive_compressed() {
    delivers_with("snappy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lz4_records_arrive_compressed() {
    delivers_with("lz4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_records_arrive_compressed() {
    delivers_with("zstd").await;
}

/// Runs walship with `codec`, writes [`EVENTS`] events of one key, and checks that they all
/// arrive in commit order and that the consumer received far fewer bytes than the payloads
/// hold (or, for `none`, at least as many).
async fn delivers_with(codec: &str) {
    let mut db = TestDb::new().await;
    let config = harness::config(
        &db,
        &broker().bootstrap,
        &format!("[kafka.librdkafka]\n\"compression.type\" = \"{codec}\"\n\"linger.ms\" = \"50\""),
    );
    let relay = Relay::start_streaming(config, &db).await;
    let pad = "walship ".repeat(PAD / 8);
    let mut payload_bytes = 0;
    for seq in 0..EVENTS {
        let mut row = Row::new("order", "codec", seq);
        row.payload = serde_json::json!({ "seq": seq, "pad": pad });
        payload_bytes += row.payload.to_string().len() as u64;
        insert_txn(&mut db.client, &[row]).await;
    }
    db.await_caught_up().await;
    relay.stop().await.expect("graceful stop");

    let (seqs, received) = consume_counting(&topic(&db, "order"), EVENTS as usize);
    assert_eq!(
        seqs,
        (0..EVENTS).collect::<Vec<_>>(),
        "{codec}: every event once, in commit order"
    );
    eprintln!(
        "{codec}: {EVENTS} events, {payload_bytes} payload bytes, the consumer received {received} bytes"
    );
    if codec == "none" {
        assert!(
            received >= payload_bytes,
            "uncompressed: the consumer received {received} bytes for {payload_bytes} bytes of payload"
        );
    } else {
        assert!(
            received < payload_bytes / 4,
            "{codec}: the consumer received {received} bytes for {payload_bytes} bytes of \
             compressible payload; the records did not travel compressed"
        );
    }
}

/// Keeps the newest statistics librdkafka reports.
#[derive(Default, Clone)]
struct Stats(Arc<Mutex<Option<Statistics>>>);

impl ClientContext for Stats {
    fn stats(&self, statistics: Statistics) {
        *self.0.lock().unwrap() = Some(statistics);
    }
}

impl ConsumerContext for Stats {}

/// Reads `topic` from the beginning until `expected` records arrived; returns the `seq` of each
/// record in partition order and the bytes the consumer received from the brokers (as the
/// first statistics report after the last record counts them).
fn consume_counting(topic: &str, expected: usize) -> (Vec<u64>, u64) {
    let stats = Stats::default();
    let consumer: BaseConsumer<Stats> = ClientConfig::new()
        .set("bootstrap.servers", &broker().bootstrap)
        .set("group.id", format!("walship-test-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("statistics.interval.ms", "100")
        .set("log_level", "3")
        .create_with_context(stats.clone())
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("add partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut seqs = Vec::new();
    while seqs.len() < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "consumed {} of {expected} records from {topic}",
            seqs.len()
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let value: serde_json::Value =
                serde_json::from_slice(m.payload().expect("payload")).expect("JSON payload");
            seqs.push(value["seq"].as_u64().expect("seq"));
        }
    }
    // Statistics taken after the last record was received count every byte of it.
    *stats.0.lock().unwrap() = None;
    let received = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no statistics from the consumer"
        );
        consumer.poll(Duration::from_millis(50));
        if let Some(s) = stats.0.lock().unwrap().as_ref() {
            break s.brokers.values().map(|b| b.rxbytes).sum::<u64>();
        }
    };
    (seqs, received)
}
