//! The kit's `outbox_emit` and `outbox_emit_message`: events are delivered, also when deleted at
//! once, and logical messages in order with rows.

use tokio_postgres::GenericClient;
use walship::Config;
use walship::init_sql;

use super::{SETTLE, count, emit, kit, kit_config};
use crate::harness::{self, Relay, TIMEOUT, TestDb, broker, consume, seqs, topic};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_emit_events_are_delivered_also_when_deleted_at_once() {
    let mut db = TestDb::new().await;
    db.client
        .batch_execute(&kit(false))
        .await
        .expect("apply kit");
    let relay = Relay::start_streaming(kit_config(&db), &db).await;

    let mut ids = Vec::new();
    {
        // The business change and its event in one transaction.
        let tx = db.client.transaction().await.unwrap();
        tx.batch_execute("INSERT INTO other_table (note) VALUES ('order A paid')")
            .await
            .unwrap();
        ids.push(emit(&tx, "A", 0, false).await);
        tx.commit().await.unwrap();
    }
    {
        let tx = db.client.transaction().await.unwrap();
        emit(&tx, "A", 99, false).await;
        tx.rollback().await.unwrap();
    }
    ids.push(emit(&db.client, "A", 1, true).await);
    {
        let tx = db.client.transaction().await.unwrap();
        ids.push(emit(&tx, "A", 2, true).await);
        tx.commit().await.unwrap();
    }
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        3,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(
        seqs(&records),
        vec![0, 1, 2],
        "rolled-back 99 absent; 1 and 2 delivered although deleted at once"
    );
    let headers: Vec<(String, String)> = records
        .iter()
        .map(|r| (r.header("id").expect("id"), r.header("type").expect("type")))
        .collect();
    let expected: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.clone(), "Updated".into()))
        .collect();
    assert_eq!(headers, expected, "id header = outbox_emit's return value");
    assert!(records.iter().all(|r| r.key_str() == "A"));
    assert_eq!(
        count(&db, "SELECT count(*) FROM kit.outbox").await,
        1,
        "only the event written without delete_after stays in the table"
    );
    relay.stop().await.expect("graceful stop");
}

/// Calls `kit.outbox_emit_message` with a `{"seq": seq}` payload and `prefix`; returns the id.
async fn emit_message(
    client: &impl GenericClient,
    aggregate_id: &str,
    seq: u64,
    prefix: &str,
) -> String {
    let payload = serde_json::json!({ "seq": seq }).to_string();
    client
        .query_one(
            "SELECT kit.outbox_emit_message('order', $1, 'Updated', $2::text::jsonb, prefix => $3)::text",
            &[&aggregate_id, &payload, &prefix],
        )
        .await
        .expect("kit.outbox_emit_message")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_emit_message_events_are_delivered_in_order_with_rows() {
    let mut db = TestDb::new().await;
    db.client
        .batch_execute(&kit(false))
        .await
        .expect("apply kit");
    // Message mode from the environment, as a TOML array.
    let config = Config::from_toml(
        &harness::config_toml(&db, &broker().bootstrap, ""),
        [
            ("WALSHIP_OUTBOX__TABLE", "kit.outbox"),
            (
                "WALSHIP_POSTGRES__PUBLICATION",
                init_sql::DEFAULT_PUBLICATION,
            ),
            ("WALSHIP_POSTGRES__CREATE_PUBLICATION", "false"),
            ("WALSHIP_OUTBOX__MESSAGE_PREFIXES", "[\"outbox\"]"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
        "sql kit message test config",
    )
    .expect("valid kit config");
    let relay = Relay::start_streaming(config, &db).await;

    let mut ids = Vec::new();
    {
        // A row, then a message, then another prefix (not an event), in one transaction.
        let tx = db.client.transaction().await.unwrap();
        ids.push(emit(&tx, "A", 0, false).await);
        ids.push(emit_message(&tx, "A", 1, "outbox").await);
        emit_message(&tx, "A", 50, "elsewhere").await;
        tx.commit().await.unwrap();
    }
    {
        let tx = db.client.transaction().await.unwrap();
        emit_message(&tx, "A", 99, "outbox").await;
        tx.rollback().await.unwrap();
    }
    ids.push(emit_message(&db.client, "A", 2, "outbox").await);
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        3,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(
        seqs(&records),
        vec![0, 1, 2],
        "row and message in WAL order; rolled back and other prefix absent"
    );
    let got: Vec<String> = records
        .iter()
        .map(|r| r.header("id").expect("id"))
        .collect();
    assert_eq!(got, ids, "id header = the functions' return values");
    assert!(
        records
            .iter()
            .all(|r| r.key_str() == "A" && r.header("type").as_deref() == Some("Updated"))
    );
    relay.stop().await.expect("graceful stop");
}
