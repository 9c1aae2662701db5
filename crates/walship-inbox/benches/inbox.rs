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
//! - `bare`: BEGIN, the handler's INSERT, COMMIT — a consumer without the inbox;
//! - `inbox_apply`: BEGIN, the mark's upsert (advancing it), the INSERT, COMMIT;
//! - `inbox_duplicate`: BEGIN, the mark's upsert (a copy: no change), ROLLBACK.
//!
//! The difference between `inbox_apply` and `bare` is the inbox's cost per new event: one
//! statement on a row the partition's previous event already brought into the cache.
//!
//! Measured 2026-12-06 (bench profile, PostgreSQL 15 on the same 2-core VM with other builds
//! running, `synchronous_commit = off` so commit flushes do not hide the difference; medians):
//!
//! | case | per event |
//! | --- | --- |
//! | identify | see the closing note of the issue |
//! | bare | |
//! | inbox_apply | |
//! | inbox_duplicate | |

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
}

criterion_group!(benches, bench);
criterion_main!(benches);
