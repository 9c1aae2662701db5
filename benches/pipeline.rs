//! walship's per-event work outside the decoder, and the produce → ack → progress path.
//!
//! `cargo bench -p walship --bench pipeline`
//!
//! - `extract_route`: a pgoutput Insert of the default outbox table (5 columns, ~200-byte jsonb
//!   payload) → decode → outbox extraction → topic routing → the record's headers: everything
//!   walship does per event before handing it to librdkafka. `extract_route/record_<format>`
//!   goes on to build the whole record as the session does (`Record::shaped`, the trace
//!   context check): `plain` (the default), `plain_traced` (with a `traceparent` column),
//!   `plain_envelope` (a field placed in an envelope), `cloudevents_binary` and
//!   `cloudevents_structured` — the cost of each format per event.
//! - `produce_ack`: records handed to librdkafka's in-process mock cluster (`rdkafka::mocking`,
//!   3 partitions, acks=all, idempotent) in single-event transactions, until the progress
//!   tracker's safe LSN reaches the last one: producer queueing, the mock broker's acks, the
//!   delivery callbacks and the tracker — the whole ack path without PostgreSQL.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgoutput::{Decoder, Lsn, Message, Relation, RelationColumn};
use rdkafka::mocking::MockCluster;
use walship::session::progress::Progress;
use walship_kafka::record::cloudevents::Mode;
use walship_kafka::record::{self, CloudEvents, Format, PayloadKind, Scratch, TraceContext};
use walship_kafka::{Position, Record, SendError, Sink, SinkSettings, TopicRouter};
use walship_postgres::{OutboxSpec, Relations, TableName};

fn outbox_relation() -> Relation {
    let col = |name: &str, oid: u32| RelationColumn {
        flags: 0,
        name: name.into(),
        type_oid: oid,
        type_modifier: -1,
    };
    Relation {
        xid: None,
        id: 16_385,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns: vec![
            col("id", 2950),
            col("aggregatetype", 25),
            col("aggregateid", 25),
            col("type", 25),
            col("payload", 3802),
        ],
    }
}

fn insert_bytes(i: usize) -> Bytes {
    let id = format!("{:08x}-1111-4222-a333-{:012x}", i, i * 7919);
    let kind = if i.is_multiple_of(3) {
        "customer"
    } else {
        "order"
    };
    let agg = format!("agg-{}", i % 5000);
    let payload = format!(
        r#"{{"order": {i}, "status": "paid", "amount": 1234, "currency": "EUR", "note": "{}"}}"#,
        "x".repeat(120)
    );
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16_385);
    b.put_u8(b'N');
    b.put_u16(5);
    for v in [id.as_str(), kind, &agg, "OrderPaid", &payload] {
        b.put_u8(b't');
        b.put_i32(v.len() as i32);
        b.put_slice(v.as_bytes());
    }
    b.freeze()
}

fn extract_route(c: &mut Criterion) {
    let messages: Vec<Bytes> = (0..1024).map(insert_bytes).collect();
    let bytes: usize = messages.iter().map(Bytes::len).sum();
    let mut relations = Relations::new(OutboxSpec::debezium(TableName::parse("public.outbox")));
    relations.update(outbox_relation());
    let mut router = TopicRouter::new("outbox.event.{aggregatetype}").unwrap();
    let mut decoder = Decoder::new(1);
    let mut group = c.benchmark_group("extract_route");
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.bench_function("insert_to_record", |b| {
        b.iter(|| {
            for m in &messages {
                let Ok(Message::Insert(insert)) = decoder.decode(m.clone()) else {
                    unreachable!()
                };
                let row = relations
                    .extract(insert.relation_id, &insert.tuple)
                    .unwrap();
                let topic = router.route(row.aggregate_type).unwrap();
                let headers = [("id", row.id), ("type", row.event_type)];
                black_box((topic, row.aggregate_id, row.payload.as_deref(), &headers));
            }
        })
    });
    let traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let placed: Vec<(Arc<str>, Option<&[u8]>)> = vec![(Arc::from("schemaVersion"), Some(b"3"))];
    for (name, format, traced, enveloped) in [
        ("record_plain", Format::Plain, false, false),
        ("record_plain_traced", Format::Plain, true, false),
        ("record_plain_envelope", Format::Plain, false, true),
        (
            "record_cloudevents_binary",
            Format::CloudEvents(CloudEvents::new(Mode::Binary)),
            false,
            false,
        ),
        (
            "record_cloudevents_structured",
            Format::CloudEvents(CloudEvents::new(Mode::Structured)),
            false,
            false,
        ),
    ] {
        let mut scratch = Scratch::default();
        group.bench_function(name, |b| {
            b.iter(|| {
                for (i, m) in messages.iter().enumerate() {
                    let Ok(Message::Insert(insert)) = decoder.decode(m.clone()) else {
                        unreachable!()
                    };
                    let row = relations
                        .extract(insert.relation_id, &insert.tuple)
                        .unwrap();
                    let topic = router.route(row.aggregate_type).unwrap();
                    let (trace, _) = TraceContext::check(traced.then_some(&traceparent[..]), None);
                    let event = record::Event {
                        key: row.aggregate_id,
                        payload: row.payload.as_deref(),
                        commit_ms: 1_796_571_301_005,
                        event_type: row.event_type,
                        columns: &row.headers,
                        aggregate_type: row.aggregate_type,
                        payload_kind: PayloadKind::Json,
                        trace,
                        envelope: if enveloped { &placed } else { &[] },
                        partition: None,
                    };
                    let stamp = record::Stamp {
                        source: "7345/walship",
                        position: Some(Position {
                            commit_lsn: 0x16_B374_D848,
                            index: i as u32,
                        }),
                        timeline: "1",
                        id: row.id,
                    };
                    let record =
                        Record::shaped(topic, event, stamp, &format, &mut scratch).unwrap();
                    black_box(record.headers().count());
                }
            })
        });
    }
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("insert_to_record_bytes", |b| {
        b.iter(|| {
            for m in &messages {
                let Ok(Message::Insert(insert)) = decoder.decode(m.clone()) else {
                    unreachable!()
                };
                black_box(
                    relations
                        .extract(insert.relation_id, &insert.tuple)
                        .unwrap(),
                );
            }
        })
    });
    group.finish();
}

fn produce_ack(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("bench", 3, 1).unwrap();
    let settings = SinkSettings {
        brokers: cluster.bootstrap_servers(),
        client_id: "bench".into(),
        create_topics: false,
        topic_partitions: 3,
        topic_replication_factor: 1,
        librdkafka: Default::default(),
        secret_properties: Default::default(),
        share_producer: true,
    };
    let payload = vec![b'x'; 180];
    const EVENTS: u64 = 20_000;
    let mut group = c.benchmark_group("produce_ack");
    group.throughput(Throughput::Elements(EVENTS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("single_event_transactions", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let progress = Arc::new(Progress::new(Lsn(0)));
                let sink = Sink::new(settings.clone(), progress.clone()).unwrap();
                let start = Instant::now();
                runtime.block_on(async {
                    for i in 0..EVENTS {
                        let key = format!("agg-{}", i % 5000);
                        let token = progress.open(walship::session::progress::TxnOrigin::default());
                        let record = Record::new("bench", key.as_bytes(), Some(&payload), None);
                        loop {
                            if progress.in_flight() < 2000 {
                                match sink.send(&record, token as usize) {
                                    Ok(()) => break,
                                    Err(SendError::QueueFull) => {}
                                    Err(e) => panic!("{e}"),
                                }
                            }
                            progress
                                .wait_for_room(1000, None, Duration::from_millis(100))
                                .await;
                        }
                        progress.note_sent();
                        progress.seal(token, 1, Lsn(i + 1));
                    }
                    while progress.safe_lsn() < Lsn(EVENTS) {
                        progress.wait_for_advance(progress.safe_lsn()).await;
                    }
                });
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, extract_route, produce_ack);
criterion_main!(benches);
