//! The inbox's cost per event in the consumer: the mark's check and update in the event's
//! transaction, against the same transaction with the handler alone.
//!
//! ```sh
//! WALSHIP_BENCH_PG_URL='postgres://postgres@127.0.0.1:5432/bench' cargo bench -p walship-inbox --bench inbox
//! ```
//!
//! Without `WALSHIP_BENCH_PG_URL` only `identify` (reading the headers, no database) runs.
//! Each database case is one event's whole transaction on one connection over loopback:
//!
//! - `bare`: BEGIN, the handler's INSERT (tokio-postgres prepares it, then runs it), COMMIT —
//!   a consumer without the inbox;
//! - `inbox_apply`: the same with `Inbox::admit` first (its one-shot statement advancing the
//!   mark: parsed and planned on every record);
//! - `prepared_apply`: the same with `Prepared::admit` (`Inbox::prepare`: the statement prepared
//!   once on the connection);
//! - `inbox_duplicate`: BEGIN, `Inbox::admit` of a copy (no change), ROLLBACK.
//!
//! After criterion's runs, the first three run again interleaved event by event (3,000 each),
//! so that the load of a shared machine weighs on each alike; their medians are the figures
//! to quote. `identify` is reading the headers alone.
//!
//! Measured 2026-12-06 (bench profile, PostgreSQL 15 over loopback on the same 2-core VM with
//! other engineers' builds running, `synchronous_commit = off` so commit flushes do not hide
//! the difference):
//!
//! | case | interleaved median (p90) per event | criterion (median) |
//! | --- | --- | --- |
//! | identify | | 82 ns |
//! | bare | 95.6 µs (100.5 µs) | 118 µs |
//! | inbox_apply | 149.8 µs (165.0 µs): +54 µs | 201 µs |
//! | prepared_apply | 122.2 µs (134.0 µs): +27 µs | 159 µs |
//! | inbox_duplicate | | 95 µs |
//!
//! So the inbox costs one statement per record: about 27 µs with `Inbox::prepare`, 54 µs
//! without, next to the ~96 µs of a one-insert transaction; with `synchronous_commit = on`
//! each transaction's WAL flush comes on top of both alike.

// Bench code: a panic is how a broken setup shows.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use tokio_postgres::{Client, NoTls};
use walship_inbox::{Admission, Inbox, POSITION_HEADER, Position, SOURCE_HEADER, identify};

/// Event `n` of one source in one partition, as walship writes it.
fn record(n: u64) -> OwnedMessage {
    let position = Position {
        commit_lsn: 0x1_0000_0000 + n * 256,
        index: 0,
    }
    .to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "id",
            value: Some("0b9d5c7e-4f8e-4a59-9c1c-6c2b8d3e1f00"),
        })
        .insert(Header {
            key: SOURCE_HEADER,
            value: Some("7305521111111111111/orders"),
        })
        .insert(Header {
            key: POSITION_HEADER,
            value: Some(&position),
        });
    OwnedMessage::new(
        Some(br#"{"aggregate":"order-42","seq":1}"#.to_vec()),
        Some(b"order-42".to_vec()),
        "outbox.event.order".into(),
        Timestamp::NotAvailable,
        1,
        i64::try_from(n).unwrap(),
        Some(headers),
    )
}

async fn handler(tx: &tokio_postgres::Transaction<'_>, m: &OwnedMessage) {
    use rdkafka::Message;
    let payload = std::str::from_utf8(m.payload().unwrap()).unwrap();
    tx.execute(
        "INSERT INTO bench_applied (kafka_offset, payload) VALUES ($1, $2)",
        &[&m.offset(), &payload],
    )
    .await
    .unwrap();
}

fn bench(c: &mut Criterion) {
    let m = record(1);
    c.bench_function("identify", |b| {
        b.iter(|| black_box(identify(black_box(&m), Some("id")).unwrap()));
    });

    let Ok(url) = std::env::var("WALSHIP_BENCH_PG_URL") else {
        eprintln!("WALSHIP_BENCH_PG_URL is not set: the database cases are skipped");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let inbox = Inbox::new().with_table(None, "bench_inbox");
    let mut client: Client = rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "DROP TABLE IF EXISTS bench_inbox, bench_inbox_ids, bench_applied;
                 CREATE TABLE bench_applied (kafka_offset bigint, payload text);
                 SET synchronous_commit = off;",
            )
            .await
            .unwrap();
        inbox.create_tables(&client).await.unwrap();
        client
    });
    let mut group = c.benchmark_group("per_event");
    group.measurement_time(Duration::from_secs(5));
    let mut n = 0u64;
    group.bench_function("bare", |b| {
        b.iter_batched(
            || {
                n += 1;
                record(n)
            },
            |m| {
                rt.block_on(async {
                    let tx = client.transaction().await.unwrap();
                    handler(&tx, &m).await;
                    tx.commit().await.unwrap();
                });
            },
            BatchSize::SmallInput,
        );
    });
    group.bench_function("inbox_apply", |b| {
        b.iter_batched(
            || {
                n += 1;
                record(n)
            },
            |m| {
                rt.block_on(async {
                    let tx = client.transaction().await.unwrap();
                    assert_eq!(inbox.admit(&tx, &m).await.unwrap(), Admission::Apply);
                    handler(&tx, &m).await;
                    tx.commit().await.unwrap();
                });
            },
            BatchSize::SmallInput,
        );
    });
    // The statements prepared once on the connection (`Inbox::prepare`).
    let prepared = rt.block_on(inbox.prepare(&client)).unwrap();
    group.bench_function("prepared_apply", |b| {
        b.iter_batched(
            || {
                n += 1;
                record(n)
            },
            |m| {
                rt.block_on(async {
                    let tx = client.transaction().await.unwrap();
                    assert_eq!(prepared.admit(&tx, &m).await.unwrap(), Admission::Apply);
                    handler(&tx, &m).await;
                    tx.commit().await.unwrap();
                });
            },
            BatchSize::SmallInput,
        );
    });
    let copy = record(1);
    group.bench_function("inbox_duplicate", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tx = client.transaction().await.unwrap();
                assert_eq!(inbox.admit(&tx, &copy).await.unwrap(), Admission::Duplicate);
                tx.rollback().await.unwrap();
            });
        });
    });
    group.finish();

    // The same three cases interleaved event by event, so that the load of a shared machine
    // weighs on each alike (criterion runs them one after the other): medians per event.
    let mut times: [Vec<Duration>; 3] = Default::default();
    for _ in 0..3000 {
        for (case, times) in times.iter_mut().enumerate() {
            n += 1;
            let m = record(n);
            let started = std::time::Instant::now();
            rt.block_on(async {
                let tx = client.transaction().await.unwrap();
                match case {
                    0 => {}
                    1 => assert_eq!(inbox.admit(&tx, &m).await.unwrap(), Admission::Apply),
                    _ => assert_eq!(prepared.admit(&tx, &m).await.unwrap(), Admission::Apply),
                }
                handler(&tx, &m).await;
                tx.commit().await.unwrap();
            });
            times.push(started.elapsed());
        }
    }
    for (name, t) in ["bare", "inbox_apply", "prepared_apply"]
        .iter()
        .zip(&mut times)
    {
        t.sort();
        eprintln!(
            "interleaved {name}: median {:?}, p90 {:?}",
            t[t.len() / 2],
            t[t.len() * 9 / 10]
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
