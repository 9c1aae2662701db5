//! Test harness: real PostgreSQL, a real broker, walship in-process or as a binary.
//!
//! Tests await conditions (slot positions, consumed records) with timeouts; none sleeps to
//! synchronise.

#![allow(dead_code)]

pub mod kafka;
pub mod postgres;
pub mod process;

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use walship::Config;

pub use kafka::{Broker, Consumed, broker, consume};
pub use postgres::TestDb;

/// Generous: CI machines are small and shared.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// A walship configuration for one test: its own slot, publication and topic prefix.
pub fn config_toml(db: &TestDb, bootstrap: &str, extra: &str) -> String {
    format!(
        r#"
[postgres]
url = "{url}"
slot = "{slot}"
publication = "{slot}_pub"
status_interval_ms = 200

[outbox]
topic = "{slot}.{{aggregatetype}}"

[kafka]
brokers = "{bootstrap}"
topic_partitions = 3

{extra}
"#,
        url = db.url,
        slot = db.slot(),
    )
}

pub fn config(db: &TestDb, bootstrap: &str, extra: &str) -> Config {
    Config::from_toml(
        &config_toml(db, bootstrap, extra),
        std::iter::empty(),
        "test",
    )
    .expect("valid test config")
}

/// The topic of an aggregate type in a test's database.
pub fn topic(db: &TestDb, aggregate_type: &str) -> String {
    format!("{}.{aggregate_type}", db.slot())
}

/// walship running in-process.
pub struct Relay {
    cancel: CancellationToken,
    handle: JoinHandle<Result<(), walship::Error>>,
}

/// Routes walship's logs to the test output (shown for failing tests).
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("WALSHIP_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

impl Relay {
    pub fn start(config: Config) -> Relay {
        init_logging();
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let handle =
            tokio::spawn(async move { walship::run_until_cancelled(&config, &token).await });
        Relay { cancel, handle }
    }

    /// Starts walship and waits until it streams from the test database's slot.
    pub async fn start_streaming(config: Config, db: &TestDb) -> Relay {
        let relay = Relay::start(config);
        db.await_streaming().await;
        relay
    }

    /// Graceful stop (like SIGTERM); returns walship's result.
    pub async fn stop(self) -> Result<(), walship::Error> {
        self.cancel.cancel();
        tokio::time::timeout(TIMEOUT, self.handle)
            .await
            .expect("walship stops in time")
            .expect("walship task")
    }

    /// Simulates a crash: the task is dropped mid-flight, nothing is flushed or confirmed.
    pub fn abort(self) {
        self.handle.abort();
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for walship to exit by itself (with an error).
    pub async fn exit(self) -> Result<(), walship::Error> {
        tokio::time::timeout(TIMEOUT, self.handle)
            .await
            .expect("walship exits in time")
            .expect("walship task")
    }
}

/// One outbox row to write.
#[derive(Debug, Clone)]
pub struct Row {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: serde_json::Value,
}

impl Row {
    pub fn new(aggregate_type: &str, aggregate_id: &str, seq: u64) -> Row {
        Row {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: "Updated".into(),
            payload: serde_json::json!({ "aggregate": aggregate_id, "seq": seq }),
        }
    }
}

/// Inserts `rows` in one transaction, in order; returns their ids.
pub async fn insert_txn(client: &mut Client, rows: &[Row]) -> Vec<uuid::Uuid> {
    let tx = client.transaction().await.expect("begin");
    let ids = insert_rows(&tx, rows).await;
    tx.commit().await.expect("commit");
    ids
}

/// Inserts rows through any client or transaction; returns their ids.
pub async fn insert_rows(
    client: &impl tokio_postgres::GenericClient,
    rows: &[Row],
) -> Vec<uuid::Uuid> {
    let mut ids = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(500) {
        let mut sql = String::from(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ",
        );
        for (i, r) in chunk.iter().enumerate() {
            let id = uuid::Uuid::new_v4();
            ids.push(id);
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "('{id}', '{}', '{}', '{}', '{}')",
                r.aggregate_type,
                r.aggregate_id,
                r.event_type,
                r.payload.to_string().replace('\'', "''")
            ));
        }
        client
            .batch_execute(&sql)
            .await
            .expect("insert outbox rows");
    }
    ids
}

/// Groups consumed records by key, in partition offset order, asserting each key stays in one
/// partition.
pub fn by_key(records: &[Consumed]) -> std::collections::BTreeMap<(String, String), Vec<Consumed>> {
    let mut sorted: Vec<&Consumed> = records.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    let mut map: std::collections::BTreeMap<(String, String), Vec<Consumed>> = Default::default();
    for r in sorted {
        let entry = map.entry((r.topic.clone(), r.key_str())).or_default();
        if let Some(first) = entry.first() {
            assert_eq!(
                first.partition,
                r.partition,
                "key {} of {} appears in two partitions",
                r.key_str(),
                r.topic
            );
        }
        entry.push(r.clone());
    }
    map
}

/// The `seq` field of each record's JSON payload.
pub fn seqs(records: &[Consumed]) -> Vec<u64> {
    records
        .iter()
        .map(|r| r.json()["seq"].as_u64().expect("seq"))
        .collect()
}
