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

/// Creates `topic` with one partition and writes `records` into it as they are (key, value and
/// headers): a topic crafted to hold some of an earlier run's records and not others.
async fn craft_topic(topic: &str, records: &[&Consumed]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &broker().bootstrap);
    let admin: AdminClient<DefaultClientContext> = config.create().expect("admin");
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    let producer: FutureProducer = config.create().expect("producer");
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = FutureRecord::to(topic).key(&r.key).headers(headers);
        if let Some(p) = &r.payload {
            record = record.payload(p);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .expect("produce");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_found_after_a_missing_one_of_its_key_is_sent_again_so_order_holds() {
    let db = TestDb::new().await;
    let kafka = &broker().bootstrap;
    run_to_end(harness::config(&db, kafka, ""), &db).await;
    save_slot(&db).await;
    // e1, e2, e3 of one aggregate, one transaction each, delivered and confirmed.
    let mut client = harness::postgres::connect(&db.url).await;
    for seq in 1..=3 {
        insert_txn(&mut client, &[Row::new("order", "agg", seq)]).await;
    }
    run_to_end(harness::config(&db, kafka, ""), &db).await;
    let delivered = consume(kafka, &[&harness::topic(&db, "order")], 3, TIMEOUT, SETTLE);
    assert_eq!(seq_list(&delivered), vec![1, 2, 3]);

    // A topic that holds e2 (as walship wrote it) but not e1: a scan cut short, or a record
    // lost in flight, looks like this.
    let crafted = format!("{}_crafted", db.slot());
    let crafted_topic = format!("{crafted}.order");
    let e2 = delivered.iter().find(|r| r.json()["seq"] == 2).expect("e2");
    craft_topic(&crafted_topic, &[e2]).await;

    // The slot is rewound to before e1, and walship now writes to the crafted topic.
    rewind_slot(&db).await;
    let config = Config::from_toml(
        &harness::config_toml(&db, kafka, ""),
        [(
            "WALSHIP_OUTBOX__TOPIC".to_owned(),
            format!("{crafted}.{{aggregatetype}}"),
        )],
        "test",
    )
    .expect("config");
    run_to_end(config, &db).await;
    let records = consume(kafka, &[&crafted_topic], 3, TIMEOUT, SETTLE);
    // Skipping e2 because it was found would leave e1 as the aggregate's last word before e3
    // and, had the stream stopped there, after e2: e2, e1. e1 was missing, so e2 and e3 are
    // sent again after it.
    assert_eq!(
        seq_list(&records),
        vec![2, 1, 2, 3],
        "the topic ends with the aggregate's events in commit order"
    );
    drop_saved(&db).await;
}

/// The `seq` of each record, in offset order.
fn seq_list(records: &[Consumed]) -> Vec<u64> {
    let mut sorted: Vec<&Consumed> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    sorted
        .iter()
        .map(|r| r.json()["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_their_origin_and_are_not_dead_lettered_again_after_a_restart() {
    let db = TestDb::new().await;
    let kafka = &broker().bootstrap;
    let dlq = format!("{}.dlq", db.name);
    let toml = harness::config_toml(
        &db,
        kafka,
        "[kafka.librdkafka]\n\"message.max.bytes\" = \"20000\"",
    )
    .replace(
        "[outbox]\n",
        &format!("[outbox]\non_bad_row = \"dead-letter\"\ndead_letter_topic = \"{dlq}\"\n"),
    );
    let config = || Config::from_toml(&toml, std::iter::empty(), "test").expect("config");
    run_to_end(config(), &db).await;
    save_slot(&db).await;
    let mut client = harness::postgres::connect(&db.url).await;
    insert_txn(&mut client, &[Row::new("order", "a", 0)]).await;
    // Refused by walship (an illegal topic name) and by the broker (too large).
    insert_txn(&mut client, &[Row::new("bad type!", "a", 1)]).await;
    let mut big = Row::new("order", "a", 2);
    big.payload = serde_json::json!({ "seq": 2, "pad": "x".repeat(50_000) });
    insert_txn(&mut client, &[big]).await;
    run_to_end(config(), &db).await;
    let dead = consume(kafka, &[&dlq], 2, TIMEOUT, SETTLE);
    assert_eq!(dead.len(), 2);
    for r in &dead {
        let lsn = r.header("walship.lsn").expect("walship.lsn");
        let xid = r.header("walship.xid").expect("walship.xid");
        assert!(
            lsn != "0/0" && xid != "0",
            "real origin: lsn {lsn}, xid {xid}"
        );
        assert!(r.header("walship.source").is_some(), "{:?}", r.headers);
        assert!(r.commit_lsn().0 > 0, "walship.position names the event");
    }
    // Both are refused before they are sent (walship's topic check, librdkafka's size check):
    // the row's own LSN, inside its transaction.
    for r in &dead {
        let lsn: pgoutput::Lsn = r
            .header("walship.lsn")
            .and_then(|l| l.parse().ok())
            .expect("walship.lsn parses");
        assert!(
            lsn <= r.commit_lsn(),
            "{lsn} after the commit {}",
            r.commit_lsn()
        );
    }

    // As after a crash: the slot is behind both rows again. They are not dead-lettered twice.
    rewind_slot(&db).await;
    run_to_end(config(), &db).await;
    let again = consume(kafka, &[&dlq], 2, TIMEOUT, SETTLE);
    assert_eq!(again.len(), 2, "each row is dead-lettered once");
    drop_saved(&db).await;
}

/// The read-back finds every record of this source after the confirmed position, also where a
/// fetch does not start at the offset asked for. tansu answers a fetch that starts inside a
/// record batch from a later batch, so a scan that took each pass's requested start as read
/// never read the records between it and the first one it got, and a restart sent them again
/// (the duplicates after a failover, up to 5.7 %). Records written by an idempotent producer
/// in small batches, several passes' width of them: every one must be found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_back_finds_every_record_also_when_fetches_start_past_the_offset_asked() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use walship_kafka::{ID_HEADER, POSITION_HEADER, Position, PositionText, SOURCE_HEADER};

    let topic = format!("readback-{}", std::process::id());
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &broker().bootstrap);
    let admin: AdminClient<DefaultClientContext> = config.create().expect("admin");
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    // Small batches, as walship writes them under load: pass boundaries fall inside them.
    config
        .set("enable.idempotence", "true")
        .set("linger.ms", "2")
        .set("batch.num.messages", "40");
    let producer: FutureProducer = config.create().expect("producer");
    const N: u64 = 6_000;
    let source = "7000000000000000001/readback";
    let sends = (0..N).map(|i| {
        let producer = producer.clone();
        let topic = topic.clone();
        async move {
            let mut buf: PositionText = [0; 32];
            let position = Position {
                commit_lsn: 1_000 + i,
                index: 0,
            }
            .encode(&mut buf)
            .to_vec();
            let id = format!("id-{i}");
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: SOURCE_HEADER,
                    value: Some(source),
                })
                .insert(Header {
                    key: POSITION_HEADER,
                    value: Some(&position),
                })
                .insert(Header {
                    key: ID_HEADER,
                    value: Some(&id),
                });
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key("k")
                        .payload("{}")
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .expect("produce");
        }
    });
    futures::future::join_all(sends).await;
    let settings = walship_kafka::SinkSettings {
        brokers: broker().bootstrap.clone(),
        client_id: "readback".into(),
        create_topics: false,
        topic_partitions: 1,
        topic_replication_factor: 1,
        librdkafka: BTreeMap::new(),
        secret_properties: BTreeMap::new(),
        share_producer: true,
    };
    let found = tokio::task::spawn_blocking(move || {
        let scanner = walship_kafka::ResumeScanner::new(&settings, source, Duration::from_secs(60))
            .expect("scanner");
        // From the 100th record on: the scan passes 1,024 then 4,096 records back from the end.
        scanner.delivered(&topic, 1_100, usize::MAX)
    })
    .await
    .expect("scan task")
    .expect("scan");
    let missing: Vec<u64> = (100..N)
        .filter(|i| {
            !found.contains(
                Position {
                    commit_lsn: 1_000 + i,
                    index: 0,
                },
                Some(format!("id-{i}").as_bytes()),
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} records not found, first {:?}",
        missing.len(),
        N - 100,
        &missing[..missing.len().min(10)]
    );
    assert_eq!(found.len() as u64, N - 100);
}
