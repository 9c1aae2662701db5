//! The walship-outbox library: events it adds through tokio-postgres and sqlx, as rows and as
//! logical messages, are published exactly when the caller commits, in commit order.

use std::time::Duration;

use serde_json::json;
use sqlx::Connection;
use walship_outbox::{Outbox, OutboxEvent};

use crate::harness::{self, Relay, TIMEOUT, TestDb, broker, by_key, consume, topic};

/// Settle time after the expected count: long enough to see records that should not be there.
const SETTLE: Duration = Duration::from_secs(1);

fn event(aggregate_id: &str, seq: u64) -> OutboxEvent {
    OutboxEvent::new(
        "order",
        aggregate_id,
        "Updated",
        json!({ "aggregate": aggregate_id, "seq": seq }),
    )
}

/// Rows with this id in the outbox table, seen from `observer` (another session).
async fn visible(observer: &tokio_postgres::Client, id: uuid::Uuid) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM outbox WHERE id = $1::text::uuid",
            &[&id.to_string()],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_events_arrive_on_commit_only_in_order_with_both_drivers_and_modes() {
    let mut db = TestDb::new().await;
    let config_toml = harness::config_toml(&db, &broker().bootstrap, "")
        .replace("[outbox]\n", "[outbox]\nmessage_prefixes = [\"outbox\"]\n");
    let config =
        walship::Config::from_toml(&config_toml, std::iter::empty(), "test").expect("config");
    let relay = Relay::start_streaming(config, &db).await;

    let rows = Outbox::new();
    let messages = Outbox::messages("outbox");
    let observer = harness::postgres::connect(&db.url).await;
    let mut sqlx_conn = sqlx::PgConnection::connect(&db.url)
        .await
        .expect("sqlx connect");

    let mut committed = Vec::new(); // (seq, id) in commit order
    let mut never = Vec::new(); // ids of events whose transaction did not commit
    let mut seq = 0;
    for round in 0..6 {
        // tokio-postgres: a row and a message in one transaction, committed by the caller. The
        // row is not visible to another session until then: the library did not commit.
        let tx = db.client.transaction().await.expect("begin");
        for outbox in [&rows, &messages] {
            let e = event("a", seq);
            let id = outbox.add(&tx, &e).await.expect("add");
            assert_eq!(id, e.id, "add returns the event's id");
            committed.push((seq, id));
            seq += 1;
        }
        assert_eq!(
            visible(&observer, committed[committed.len() - 2].1).await,
            0
        );
        tx.commit().await.expect("commit");
        assert_eq!(
            visible(&observer, committed[committed.len() - 2].1).await,
            1
        );

        // sqlx: the same through `&mut Transaction` and `&mut PgConnection` (the transaction's
        // connection), with a payload serialised from a struct.
        let mut tx = sqlx_conn.begin().await.expect("sqlx begin");
        let e = OutboxEvent::serialized(
            "order",
            "a",
            "Updated",
            &json!({ "aggregate": "a", "seq": seq }),
        )
        .expect("serialise");
        let row_id = rows.add(&mut tx, &e).await.expect("sqlx add row");
        committed.push((seq, row_id));
        let e = event("a", seq + 1);
        committed.push((seq + 1, messages.add(&mut *tx, &e).await.expect("add")));
        seq += 2;
        assert_eq!(visible(&observer, row_id).await, 0);
        tx.commit().await.expect("sqlx commit");
        assert_eq!(visible(&observer, row_id).await, 1);

        // Rolled back, and dropped without commit, with each driver: nothing is published.
        let tx = db.client.transaction().await.expect("begin");
        for outbox in [&rows, &messages] {
            never.push(outbox.add(&tx, &event("a", 999)).await.expect("add"));
        }
        if round % 2 == 0 {
            tx.rollback().await.expect("rollback");
        } else {
            drop(tx);
        }
        let mut tx = sqlx_conn.begin().await.expect("sqlx begin");
        for outbox in [&rows, &messages] {
            never.push(outbox.add(&mut tx, &event("a", 999)).await.expect("add"));
        }
        if round % 2 == 0 {
            tx.rollback().await.expect("sqlx rollback");
        } else {
            drop(tx);
        }
    }
    // Tombstones: a null payload, as a row (tokio-postgres) and as a message (sqlx), outside
    // an explicit transaction (each statement commits by itself there).
    let t_row = rows
        .add(&db.client, &OutboxEvent::tombstone("order", "t", "Deleted"))
        .await
        .expect("add tombstone");
    let t_msg = messages
        .add(
            &mut sqlx_conn,
            &OutboxEvent::tombstone("order", "t", "Deleted"),
        )
        .await
        .expect("add tombstone");
    db.await_caught_up().await;

    let expected = committed.len() + 2;
    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        expected,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(
        records.len(),
        expected,
        "committed events once, nothing else"
    );
    let per_key = by_key(&records);
    let a = &per_key[&(topic(&db, "order"), "a".to_owned())];
    let got: Vec<(u64, String)> = harness::seqs(a)
        .into_iter()
        .zip(a.iter().map(|r| r.id()))
        .collect();
    let want: Vec<(u64, String)> = committed
        .iter()
        .map(|(s, id)| (*s, id.to_string()))
        .collect();
    assert_eq!(got, want, "commit order, with the ids add returned");
    assert!(
        a.iter()
            .all(|r| r.header("type").as_deref() == Some("Updated"))
    );
    let t = &per_key[&(topic(&db, "order"), "t".to_owned())];
    let t_ids: Vec<String> = t.iter().map(|r| r.id()).collect();
    assert_eq!(t_ids, [t_row.to_string(), t_msg.to_string()]);
    assert!(t.iter().all(|r| r.payload.is_none()), "tombstones");

    for id in never {
        assert_eq!(visible(&observer, id).await, 0, "uncommitted row {id}");
    }
    sqlx_conn.close().await.expect("sqlx close");
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_with_trace_context_headers_and_bytes_arrive_as_written() {
    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut db = TestDb::new().await;
    db.client
        .batch_execute(
            "ALTER TABLE outbox ADD COLUMN traceparent text, ADD COLUMN tracestate text, \
             ADD COLUMN tenant text",
        )
        .await
        .expect("columns");
    let config_toml = harness::config_toml(&db, &broker().bootstrap, "").replace(
        "[outbox]\n",
        "[outbox]\nmessage_prefixes = [\"outbox\"]\ntraceparent_column = \"traceparent\"\n\
         tracestate_column = \"tracestate\"\nheader_columns = [\"tenant\"]\n",
    );
    let config =
        walship::Config::from_toml(&config_toml, std::iter::empty(), "test").expect("config");
    let relay = Relay::start_streaming(config, &db).await;

    let e = |seq: u64| event("42", seq).with_v7_id();
    let rows = [
        e(0).with_trace_context(TRACEPARENT, Some("rojo=00f067aa0ba902b7".into()))
            .with_header("tenant", Some("acme".into())),
        e(1),
    ];
    let messages = [
        e(2).with_trace_context(TRACEPARENT, None),
        e(3).with_trace_context("garbage", None),
    ];
    let tx = db.client.transaction().await.expect("begin");
    let mut ids = Outbox::new().add_all(&tx, &rows).await.expect("rows");
    ids.extend(
        Outbox::messages("outbox")
            .add_all(&tx, &messages)
            .await
            .expect("messages"),
    );
    tx.commit().await.expect("commit");
    db.client
        .batch_execute(
            "ALTER TABLE outbox ALTER COLUMN payload TYPE bytea USING convert_to(payload::text, 'UTF8')",
        )
        .await
        .expect("to bytea");
    let bytes = OutboxEvent::bytes("order", "42", "Updated", vec![0, 0xff, b'A'])
        .with_trace_context(TRACEPARENT, None);
    ids.push(
        Outbox::new()
            .with_payload_type(walship_outbox::PayloadType::Bytea)
            .add(&db.client, &bytes)
            .await
            .expect("bytes"),
    );
    db.await_caught_up().await;

    let mut records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        5,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(records.len(), 5);
    records.sort_by_key(|r| r.offset);
    let got: Vec<String> = records.iter().map(|r| r.id()).collect();
    let want: Vec<String> = ids.iter().map(ToString::to_string).collect();
    assert_eq!(
        got, want,
        "in the order written, with the ids add_all returned"
    );
    assert!(ids.iter().take(4).all(|id| id.get_version_num() == 7));
    let traces: Vec<Option<String>> = records.iter().map(|r| r.header("traceparent")).collect();
    let tp = Some(TRACEPARENT.to_owned());
    assert_eq!(
        traces,
        [tp.clone(), None, tp.clone(), None, tp],
        "unchanged; the malformed one left off, and walship went on"
    );
    assert_eq!(
        records[0].header("tracestate").as_deref(),
        Some("rojo=00f067aa0ba902b7")
    );
    assert_eq!(records[0].header("tenant").as_deref(), Some("acme"));
    assert_eq!(records[0].json()["seq"], 0);
    assert_eq!(records[4].payload.as_deref(), Some(&[0, 0xff, b'A'][..]));
    relay.stop().await.expect("graceful stop");
}
