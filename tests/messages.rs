//! Logical decoding messages as an outbox: `pg_logical_emit_message(true, prefix, content)`
//! with a prefix in `outbox.message_prefixes` is an event with the guarantees of a row.

use std::time::Duration;

use pgoutput::Lsn;
use serde_json::{Value, json};
use tokio_postgres::types::PgLsn;

use crate::harness::{
    self, Binary, Consumed, Relay, Row, TIMEOUT, TestDb, broker, by_key, consume, insert_rows,
    insert_txn, topic,
};

/// Settle time after the expected count: long enough to see records that should not be there.
const SETTLE: Duration = Duration::from_secs(1);

/// A test config with message mode on for prefix `outbox`, and `extra` in `[outbox]`.
fn config_toml(db: &TestDb, extra: &str) -> String {
    harness::config_toml(db, &broker().bootstrap, "").replace(
        "[outbox]\n",
        &format!("[outbox]\nmessage_prefixes = [\"outbox\"]\n{extra}"),
    )
}

/// The content of an event message (Debezium's field names), with a fresh id.
fn event(aggregate_type: &str, aggregate_id: &str, seq: u64) -> Value {
    json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "aggregatetype": aggregate_type,
        "aggregateid": aggregate_id,
        "type": "Updated",
        "payload": { "aggregate": aggregate_id, "seq": seq },
    })
}

/// Emits a logical message; returns the LSN `pg_logical_emit_message` returns (the end of its
/// WAL record).
async fn emit(
    client: &impl tokio_postgres::GenericClient,
    transactional: bool,
    prefix: &str,
    content: &str,
) -> Lsn {
    let row = client
        .query_one(
            "SELECT pg_logical_emit_message($1, $2, $3)",
            &[&transactional, &prefix, &content],
        )
        .await
        .expect("pg_logical_emit_message");
    Lsn(u64::from(row.get::<_, PgLsn>(0)))
}

/// The LSN in walship's `outbox message at LSN X/Y` error.
fn error_lsn(log: &str) -> Lsn {
    let at = log
        .find("outbox message at LSN ")
        .unwrap_or_else(|| panic!("no message error in the log:\n{log}"));
    let text = log[at + "outbox message at LSN ".len()..]
        .split_whitespace()
        .next()
        .expect("an LSN");
    text.parse().unwrap_or_else(|_| panic!("LSN {text:?}"))
}

async fn exits_with(walship: Binary, needles: &[&str]) -> String {
    let (code, log) = walship.wait_exit(TIMEOUT).await;
    assert_eq!(code, 1, "walship should exit 1:\n{log}");
    for n in needles {
        assert!(log.contains(n), "log lacks {n:?}:\n{log}");
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_alone_arrive_in_order_and_other_prefixes_are_ignored() {
    let mut db = TestDb::new().await;
    let config = walship::Config::from_toml(&config_toml(&db, ""), std::iter::empty(), "test")
        .expect("config");
    let relay = Relay::start_streaming(config, &db).await;

    // 3 aggregates, 60 events in transactions of 1..=4 messages; between them messages of
    // other prefixes (transactional and not) with contents that would be valid events, and
    // walship's heartbeat prefix.
    let mut ids = Vec::new();
    let mut seq = 0;
    let mut size = 1;
    while seq < 60 {
        let tx = db.client.transaction().await.expect("begin");
        for _ in 0..size.min(60 - seq) {
            let content = event("order", &format!("agg-{}", seq % 3), seq);
            ids.push(content["id"].as_str().unwrap().to_owned());
            emit(&tx, true, "outbox", &content.to_string()).await;
            seq += 1;
        }
        let foreign = event("order", "foreign", 1000).to_string();
        emit(&tx, true, "billing", &foreign).await;
        emit(&tx, false, "outbox.other", &foreign).await;
        emit(&tx, false, "walship.heartbeat", "").await;
        tx.commit().await.expect("commit");
        size = size % 4 + 1;
    }
    // A tombstone: payload null.
    let mut tombstone = event("order", "agg-0", 0);
    tombstone["payload"] = Value::Null;
    emit(&db.client, true, "outbox", &tombstone.to_string()).await;
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        61,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(
        records.len(),
        61,
        "every event once, nothing of other prefixes"
    );
    assert!(records.iter().all(|r| r.key_str() != "foreign"));
    let per_key = by_key(&records);
    assert_eq!(per_key.len(), 3);
    for ((_, key), recs) in &per_key {
        let (events, last) = recs.split_at(recs.len() - usize::from(key == "agg-0"));
        let seqs = harness::seqs(events);
        let n: u64 = key.trim_start_matches("agg-").parse().unwrap();
        let expected: Vec<u64> = (0..60).filter(|s| s % 3 == n).collect();
        assert_eq!(seqs, expected, "key {key}: commit order");
        let positions: Vec<walship_kafka::Position> = recs
            .iter()
            .map(|r| {
                walship_kafka::Position::parse(&r.headers[walship_kafka::POSITION_HEADER])
                    .expect("position header")
            })
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        if let [t] = last {
            assert_eq!(t.payload, None, "a null payload is a tombstone");
        }
    }
    let got: Vec<String> = records
        .iter()
        .filter(|r| r.payload.is_some())
        .map(Consumed::id)
        .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    ids.sort();
    assert_eq!(got_sorted, ids, "the id field is the id header");
    assert!(
        records
            .iter()
            .all(|r| r.header("type").as_deref() == Some("Updated"))
    );
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_rows_of_a_transaction_keep_wal_order_and_rollbacks_publish_nothing() {
    let mut db = TestDb::new().await;
    let config = walship::Config::from_toml(&config_toml(&db, ""), std::iter::empty(), "test")
        .expect("config");
    let relay = Relay::start_streaming(config, &db).await;

    // Rows and messages of one aggregate alternate inside transactions.
    let mut seq = 0;
    for _ in 0..5 {
        let tx = db.client.transaction().await.expect("begin");
        for _ in 0..2 {
            insert_rows(&tx, &[Row::new("order", "a", seq)]).await;
            emit(
                &tx,
                true,
                "outbox",
                &event("order", "a", seq + 1).to_string(),
            )
            .await;
            seq += 2;
        }
        tx.commit().await.expect("commit");
        // A rolled-back transaction with both kinds: nothing of it is published.
        let tx = db.client.transaction().await.expect("begin");
        emit(&tx, true, "outbox", &event("order", "a", 999).to_string()).await;
        insert_rows(&tx, &[Row::new("order", "a", 999)]).await;
        emit(&tx, true, "outbox", &event("order", "a", 999).to_string()).await;
        tx.rollback().await.expect("rollback");
    }
    // After the last rollback: proof that the stream passed it.
    insert_txn(&mut db.client, &[Row::new("order", "a", seq)]).await;
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        21,
        TIMEOUT,
        SETTLE,
    );
    let per_key = by_key(&records);
    let a = &per_key[&(topic(&db, "order"), "a".to_owned())];
    assert_eq!(
        harness::seqs(a),
        (0..=20).collect::<Vec<u64>>(),
        "rows and messages in WAL order, rolled-back ones absent"
    );
    // One index sequence per transaction over rows and messages.
    let positions: Vec<String> = a[..4]
        .iter()
        .map(|r| r.header(walship_kafka::POSITION_HEADER).unwrap())
        .collect();
    let commit = positions[0].split(':').next().unwrap().to_owned();
    assert_eq!(
        positions,
        (0..4).map(|i| format!("{commit}:{i}")).collect::<Vec<_>>()
    );
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_stop_walship_under_fail_before_they_are_confirmed() {
    // Malformed content in a transaction, and a non-transactional message with the prefix.
    for transactional in [true, false] {
        let db = TestDb::new().await;
        let walship = Binary::start(&config_toml(&db, ""));
        db.await_streaming().await;
        emit(
            &db.client,
            true,
            "outbox",
            &event("order", "a", 0).to_string(),
        )
        .await;
        let good_end = db.current_lsn().await;
        db.await_confirmed(good_end, TIMEOUT).await;
        let (content, reason) = if transactional {
            ("{\"aggregateid\": ", "not JSON")
        } else {
            ("{}", "transactional = false")
        };
        let bad_end = emit(&db.client, transactional, "outbox", content).await;
        let log = exits_with(
            walship,
            &[
                "outbox message at LSN",
                "prefix \"outbox\"",
                reason,
                "outbox.on_bad_row",
            ],
        )
        .await;
        // A message's LSN is the end of its WAL record: what pg_logical_emit_message returned.
        let lsn = error_lsn(&log);
        assert_eq!(lsn, bad_end, "the error names the message's LSN:\n{log}");
        if !transactional {
            assert!(log.contains("pg_logical_emit_message(true"), "{log}");
        }
        assert!(
            db.confirmed_lsn().await <= lsn,
            "confirmed past the bad message:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_with_their_content_and_walship_continues() {
    let db = TestDb::new().await;
    let dlq = format!("{}.dlq", db.name);
    let config = config_toml(
        &db,
        &format!("on_bad_row = \"dead-letter\"\ndead_letter_topic = \"{dlq}\"\n"),
    );
    let walship = Binary::start(&config);
    db.await_streaming().await;
    emit(
        &db.client,
        true,
        "outbox",
        &event("order", "a", 0).to_string(),
    )
    .await;
    emit(&db.client, true, "outbox", "not json").await;
    let no_key = json!({"id": "u1", "aggregatetype": "order", "payload": {"seq": 1}}).to_string();
    emit(&db.client, true, "outbox", &no_key).await;
    let nontx = event("order", "a", 2).to_string();
    emit(&db.client, false, "outbox", &nontx).await;
    emit(
        &db.client,
        true,
        "outbox",
        &event("order", "a", 3).to_string(),
    )
    .await;
    db.await_caught_up().await;

    let good = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        2,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(harness::seqs(&good), vec![0, 3]);
    let mut dead = consume(&broker().bootstrap, &[&dlq], 3, TIMEOUT, SETTLE);
    assert_eq!(dead.len(), 3, "{dead:?}");
    dead.sort_by_key(|r| r.header("walship.lsn").unwrap().parse::<Lsn>().unwrap());
    let values: Vec<String> = dead
        .iter()
        .map(|r| String::from_utf8(r.payload.clone().unwrap()).unwrap())
        .collect();
    assert_eq!(
        values,
        ["not json", no_key.as_str(), nontx.as_str()],
        "the content is the value"
    );
    let reasons: Vec<String> = dead
        .iter()
        .map(|r| r.header("walship.error").expect("reason header"))
        .collect();
    assert!(reasons[0].contains("not JSON"), "{reasons:?}");
    assert!(reasons[1].contains("\"aggregateid\""), "{reasons:?}");
    assert!(reasons[2].contains("transactional = false"), "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.contains("prefix \"outbox\"")),
        "{reasons:?}"
    );
    assert!(
        dead.iter()
            .all(|r| r.header("walship.prefix").as_deref() == Some("outbox")
                && r.header("walship.table").is_none())
    );
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}

/// A bad message larger than a record may be (2 MB, not JSON) under `dead-letter`: its dead
/// letter arrives with the content cut to fit `message.max.bytes` and the original size in a
/// header, and walship goes on with the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_bad_message_is_dead_lettered_cut_to_fit_and_walship_continues() {
    let db = TestDb::new().await;
    let dlq = format!("{}.dlq", db.name);
    let config = config_toml(
        &db,
        &format!("on_bad_row = \"dead-letter\"\ndead_letter_topic = \"{dlq}\"\n"),
    );
    let walship = Binary::start(&config);
    db.await_streaming().await;
    let big = "x".repeat(2 << 20);
    emit(&db.client, true, "outbox", &big).await;
    emit(
        &db.client,
        true,
        "outbox",
        &event("order", "a", 1).to_string(),
    )
    .await;
    db.await_caught_up().await;
    let good = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        1,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(harness::seqs(&good), vec![1], "the next event arrived");
    let dead = consume(&broker().bootstrap, &[&dlq], 1, TIMEOUT, SETTLE);
    assert_eq!(dead.len(), 1, "{dead:?}");
    let value = dead[0].payload.clone().unwrap_or_default();
    assert!(
        !value.is_empty() && value.len() < 1_000_000 && value.iter().all(|&b| b == b'x'),
        "cut, not emptied: {} bytes",
        value.len()
    );
    assert_eq!(
        dead[0].header("walship.truncated").as_deref(),
        Some(big.len().to_string().as_str())
    );
    assert!(
        dead[0]
            .header("walship.error")
            .unwrap_or_default()
            .contains("not JSON"),
        "{:?}",
        dead[0].headers
    );
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("the dead letter's value is cut from"), "{log}");
}
