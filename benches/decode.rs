//! Decoder throughput on realistic outbox traffic.
//!
//! `cargo bench -p pgoutput --bench decode`
//!
//! Each benchmark decodes a batch of distinct, pre-encoded messages (as they would arrive from
//! the walsender, each a slice of a shared buffer) and, for row messages, walks every column and
//! touches its bytes — the work walship's outbox extraction does. Every case is reported twice:
//! in the `bytes` group as (decimal) bytes/s and in the `messages` group as messages/s.
//! Goal on one core: >= 1 GB/s and >= 5 million outbox Inserts/s.
//!
//! Measured 2026-11-22 (release, stable 1.95, 2-core VM with another build running; medians):
//!
//! | case | bytes/s | messages/s |
//! | --- | --- | --- |
//! | insert_outbox (5 text columns, ~266 B) | 4.4–5.0 GB/s | 15–18.7 M |
//! | begin | 0.65 GB/s | 32 M |
//! | commit | 0.58 GB/s | 21 M |
//! | update_full (old 'O' + new row) | 5.5 GB/s | 10.9 M |
//! | delete_key | 1.1 GB/s | 23 M |
//! | relation (6 columns, owned names) | 0.55 GB/s | 4.2 M |
//! | logical_message (~200 B content) | 3.0 GB/s | 15.7 M |
//! | transactions_8_inserts (B, 8 I, C) | 4.6 GB/s | 20 M |

// Bench code: a panic is how a broken setup shows.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main};
use pgoutput::{
    Begin, Column, Commit, Decoder, Delete, Encoder, Insert, LogicalMessage, Lsn, Message,
    OldTuple, PgTimestamp, Relation, RelationColumn, TupleData, Update,
};

const BATCH: usize = 1024;

/// A small deterministic generator (no `rand` needed; the same data on every run).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 16
    }

    fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
        let n = options.len() as u64;
        options[(self.next() % n) as usize]
    }
}

/// The five outbox columns of one event, in text format as pgoutput sends them.
fn outbox_row(rng: &mut Lcg, i: usize) -> [String; 5] {
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        rng.next() as u32,
        rng.next() as u16,
        rng.next() & 0xfff,
        rng.next() & 0xfff,
        rng.next() & 0xffff_ffff_ffff
    );
    let aggregate_type = rng.pick(&["order", "customer", "payment", "shipment"]);
    let aggregate_id = format!("{aggregate_type}-{}", 100_000 + rng.next() % 900_000);
    let event_type = rng.pick(&["Created", "Updated", "Paid", "Shipped", "Cancelled"]);
    // ~200 bytes of jsonb text output (`{"key": value, ...}` with jsonb's spacing).
    let payload = format!(
        r#"{{"id": "{aggregate_id}", "sku": "SKU-{:06}", "items": [{{"qty": {}, "price": {}.{:02}}}], "total": {}.{:02}, "currency": "EUR", "customer": "cust-{:08}", "seq": {i}}}"#,
        rng.next() % 1_000_000,
        1 + rng.next() % 9,
        rng.next() % 500,
        rng.next() % 100,
        rng.next() % 5000,
        rng.next() % 100,
        rng.next() % 100_000_000,
    );
    [
        id,
        aggregate_type.to_owned(),
        aggregate_id,
        format!("{aggregate_type}{event_type}"),
        payload,
    ]
}

fn tuple(values: &[String]) -> TupleData {
    let cols: Vec<Column<'_>> = values.iter().map(|v| Column::Text(v.as_bytes())).collect();
    TupleData::encode(&cols).unwrap()
}

/// Encodes `msgs` back to back into one buffer and returns each as a slice of it, as the
/// replication client hands them over.
fn encode_all(msgs: &[Message]) -> (Vec<Bytes>, u64) {
    let mut enc = Encoder::new(1);
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    for m in msgs {
        enc.encode_into(m, &mut buf).unwrap();
        ends.push(buf.len());
    }
    let total = buf.len() as u64;
    let buf = Bytes::from(buf);
    let mut start = 0;
    let slices = ends
        .into_iter()
        .map(|end| {
            let s = buf.slice(start..end);
            start = end;
            s
        })
        .collect();
    (slices, total)
}

fn rows(seed: u64) -> Vec<[String; 5]> {
    let mut rng = Lcg(seed);
    (0..BATCH).map(|i| outbox_row(&mut rng, i)).collect()
}

fn inserts() -> Vec<Message> {
    rows(1)
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Message::Insert(Insert {
                xid: None,
                relation_id: 16_384 + (i % 2) as u32,
                tuple: tuple(r),
            })
        })
        .collect()
}

fn updates() -> Vec<Message> {
    rows(2)
        .iter()
        .zip(rows(3))
        .map(|(old, new)| {
            Message::Update(Update {
                xid: None,
                relation_id: 16_384,
                old: Some(OldTuple::Full(tuple(old))),
                new: tuple(&new),
            })
        })
        .collect()
}

fn deletes() -> Vec<Message> {
    rows(4)
        .iter()
        .map(|r| {
            let key = [
                Column::Text(r[0].as_bytes()),
                Column::Null,
                Column::Null,
                Column::Null,
                Column::Null,
            ];
            Message::Delete(Delete {
                xid: None,
                relation_id: 16_384,
                old: OldTuple::Key(TupleData::encode(&key).unwrap()),
            })
        })
        .collect()
}

fn begins_and_commits() -> (Vec<Message>, Vec<Message>) {
    let mut rng = Lcg(5);
    (0..BATCH)
        .map(|i| {
            let lsn = Lsn(0x16_0000_0000 + (i as u64) * 4096 + rng.next() % 4096);
            let time = PgTimestamp(800_000_000_000_000 + (rng.next() % 1_000_000) as i64);
            let begin = Message::Begin(Begin {
                final_lsn: lsn,
                commit_time: time,
                xid: 1_000 + i as u32,
            });
            let commit = Message::Commit(Commit {
                flags: 0,
                commit_lsn: lsn,
                end_lsn: Lsn(lsn.0 + 48),
                commit_time: time,
            });
            (begin, commit)
        })
        .unzip()
}

fn relations() -> Vec<Message> {
    let col = |name: &str, type_oid, flags| RelationColumn {
        flags,
        name: name.to_owned(),
        type_oid,
        type_modifier: -1,
    };
    (0..BATCH)
        .map(|i| {
            Message::Relation(Relation {
                xid: None,
                id: 16_384 + i as u32,
                namespace: "public".into(),
                name: "outbox".into(),
                replica_identity: b'd',
                columns: vec![
                    col("id", 2950, 1),
                    col("aggregatetype", 25, 0),
                    col("aggregateid", 25, 0),
                    col("type", 25, 0),
                    col("payload", 3802, 0),
                    col("created_at", 1184, 0),
                ],
            })
        })
        .collect()
}

fn logical_messages() -> Vec<Message> {
    rows(6)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let [_, _, _, _, payload] = r;
            Message::Message(LogicalMessage {
                xid: None,
                flags: 1,
                lsn: Lsn(0x16_0000_0000 + i as u64 * 512),
                prefix: "outbox".into(),
                content: Bytes::from(payload),
            })
        })
        .collect()
}

/// What a consumer does with a decoded message: look at every column's bytes.
#[inline]
fn consume(msg: &Message) -> usize {
    let walk = |t: &TupleData| {
        t.iter()
            .map(|c| {
                c.bytes()
                    .map_or(0, |b| b.len() + b.last().map_or(0, |&x| usize::from(x)))
            })
            .sum::<usize>()
    };
    match msg {
        Message::Insert(m) => walk(&m.tuple),
        Message::Update(m) => {
            walk(&m.new)
                + match &m.old {
                    Some(OldTuple::Key(t) | OldTuple::Full(t)) => walk(t),
                    None => 0,
                }
        }
        Message::Delete(m) => match &m.old {
            OldTuple::Key(t) | OldTuple::Full(t) => walk(t),
        },
        Message::Begin(m) => m.xid as usize,
        Message::Commit(m) => m.end_lsn.0 as usize,
        Message::Relation(m) => m.columns.len(),
        Message::Message(m) => m.content.len(),
        _ => 0,
    }
}

fn decode_batch(decoder: &mut Decoder, batch: &[Bytes]) -> usize {
    let mut acc = 0;
    for b in batch {
        let msg = decoder.decode(b.clone()).expect("valid message");
        acc += consume(&msg);
    }
    acc
}

type Case = (&'static str, Vec<Bytes>, u64);

fn cases() -> Vec<Case> {
    let (begins, commits) = begins_and_commits();
    let mut begin_commit = Vec::with_capacity(2 * BATCH);
    for (b, c) in begins.iter().zip(&commits) {
        begin_commit.push(b.clone());
        begin_commit.push(c.clone());
    }
    // A transaction-shaped stream: Begin, 8 outbox Inserts, Commit.
    let ins = inserts();
    let mut txns = Vec::new();
    for (i, chunk) in ins.chunks(8).enumerate() {
        txns.push(begins[i].clone());
        txns.extend(chunk.iter().cloned());
        txns.push(commits[i].clone());
    }
    [
        ("insert_outbox", ins),
        ("begin", begins),
        ("commit", commits),
        ("begin_commit", begin_commit),
        ("update_full", updates()),
        ("delete_key", deletes()),
        ("relation", relations()),
        ("logical_message", logical_messages()),
        ("transactions_8_inserts", txns),
    ]
    .into_iter()
    .map(|(name, msgs)| {
        let (bytes, total) = encode_all(&msgs);
        (name, bytes, total)
    })
    .collect()
}

fn run(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, case: &Case) {
    let (name, batch, _) = case;
    let mut decoder = Decoder::new(1);
    group.bench_function(*name, |b| {
        b.iter(|| black_box(decode_batch(&mut decoder, black_box(batch))))
    });
}

fn bench_decode(c: &mut Criterion) {
    let cases = cases();
    let mut group = c.benchmark_group("bytes");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for case in &cases {
        group.throughput(Throughput::BytesDecimal(case.2));
        run(&mut group, case);
    }
    group.finish();

    let mut group = c.benchmark_group("messages");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for case in &cases {
        group.throughput(Throughput::Elements(case.1.len() as u64));
        run(&mut group, case);
    }
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
