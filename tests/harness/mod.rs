//! Test harness: real PostgreSQL, a real broker, walship in-process or as a binary.
//!
//! Tests await conditions (slot positions, consumed records) with timeouts; none sleeps to
//! synchronise.

#![allow(dead_code)]

pub mod kafka;
pub mod netns;
pub mod postgres;
pub mod process;
pub mod standby;

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

/// A copy of an event that arrived after a newer event of its key: what a consumer applying
/// events in log order sees as e6, then e5 again.
#[derive(Debug, Clone)]
pub struct LateCopy {
    pub record: Consumed,
    /// The newest `seq` of the key before it.
    pub after_seq: u64,
    /// An earlier record of the partition is the same event (same position and id): a copy,
    /// not an event of its own.
    pub seen_before: bool,
    /// An earlier record of the partition, of the same `walship.source`, has a position at or
    /// above its own: a consumer keeping the highest position per source recognises it.
    pub below_published: bool,
}

/// Every late copy in `records` — looking at every copy of every event in log order, not only
/// the first.
pub fn late_copies(records: &[Consumed]) -> Vec<LateCopy> {
    use std::collections::{HashMap, HashSet};
    let mut sorted: Vec<&Consumed> = records.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    let mut newest: HashMap<(String, String), u64> = HashMap::new();
    let mut seen: HashSet<(String, i32, String, String)> = HashSet::new();
    let mut highest: HashMap<(String, i32, String), walship_kafka::Position> = HashMap::new();
    let mut late = Vec::new();
    for r in sorted {
        let seq = r.json()["seq"].as_u64().expect("seq");
        let position_text = r.header(walship_kafka::POSITION_HEADER).expect("position");
        let position =
            walship_kafka::Position::parse(position_text.as_bytes()).expect("position parses");
        let source = r.header(walship_kafka::SOURCE_HEADER).expect("source");
        let event = (r.topic.clone(), r.partition, position_text, r.id());
        let partition_source = (r.topic.clone(), r.partition, source);
        let key = (r.topic.clone(), r.key_str());
        match newest.get(&key) {
            Some(&after) if seq < after => late.push(LateCopy {
                record: r.clone(),
                after_seq: after,
                seen_before: seen.contains(&event),
                below_published: highest
                    .get(&partition_source)
                    .is_some_and(|h| *h >= position),
            }),
            _ => {
                newest.insert(key, seq);
            }
        }
        seen.insert(event);
        let high = highest.entry(partition_source).or_insert(position);
        *high = (*high).max(position);
    }
    late
}

/// The `seq` field of each record's JSON payload.
pub fn seqs(records: &[Consumed]) -> Vec<u64> {
    records
        .iter()
        .map(|r| r.json()["seq"].as_u64().expect("seq"))
        .collect()
}

/// The walship binary, run with a config file; its log goes to a file in a private directory.
pub struct Binary {
    child: std::process::Child,
    pub dir: tempfile::TempDir,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    starts: u32,
}

impl Binary {
    /// Writes `config_toml` and starts `walship run`.
    pub fn start(config_toml: &str) -> Binary {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("walship.toml");
        std::fs::write(&config, config_toml).expect("write config");
        let log = dir.path().join("walship.log");
        let child = Self::spawn(&config, &log);
        Binary {
            child,
            dir,
            config,
            log,
            starts: 1,
        }
    }

    /// Like [`Binary::start`], inside network namespace `netns`.
    pub fn start_in(netns: &netns::Netns, config_toml: &str) -> Binary {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("walship.toml");
        std::fs::write(&config, config_toml).expect("write config");
        let log = dir.path().join("walship.log");
        let mut cmd = netns.command(std::path::Path::new(env!("CARGO_BIN_EXE_walship")));
        Self::prepare(&mut cmd, &config, &log);
        let child = process::spawn_owned(cmd, libc::SIGKILL).expect("start walship");
        Binary {
            child,
            dir,
            config,
            log,
            starts: 1,
        }
    }

    fn spawn(config: &std::path::Path, log: &std::path::Path) -> std::process::Child {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walship"));
        Self::prepare(&mut cmd, config, log);
        process::spawn_owned(cmd, libc::SIGKILL).expect("start walship")
    }

    /// `run --config`, the log to `log`, no `WALSHIP_*` of the test's environment.
    fn prepare(cmd: &mut std::process::Command, config: &std::path::Path, log: &std::path::Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        for (k, _) in std::env::vars() {
            if k.starts_with("WALSHIP_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["run", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(log);
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Crash: SIGKILL, wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same configuration again (after `kill` or an exit).
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.config, &self.log);
        self.starts += 1;
    }

    /// Sends a signal (SIGTERM, SIGSTOP, SIGCONT, …).
    pub fn signal(&self, sig: i32) {
        #[allow(unsafe_code)]
        // SAFETY: signalling our own child process.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig})");
    }

    /// Peak resident set size so far (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// Waits for the process to exit by itself; returns its exit code and log.
    pub async fn wait_exit(mut self, timeout: Duration) -> (i32, String) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status.code().unwrap_or(-1), self.log_text());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "walship did not exit within {timeout:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Graceful stop; returns the exit code.
    pub async fn stop(self) -> (i32, String) {
        self.signal(libc::SIGTERM);
        self.wait_exit(TIMEOUT).await
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when the long variants of the reliability tests are requested (`WALSHIP_LONG_TESTS=1`).
pub fn long_tests() -> bool {
    std::env::var("WALSHIP_LONG_TESTS").is_ok_and(|v| v == "1")
}

/// Held by the load-heavy tests (crash, outage, stall, drain-sized) so they never overlap each
/// other: on a 2-core machine two of them at once would measure CPU starvation instead of
/// walship (the crash test's duplicate bound in particular).
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Like [`until`], with a condition that awaits (a query).
pub async fn until_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut ready: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !ready().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `ready` holds, looking every 20 ms; fails naming `what` after [`TIMEOUT`].
pub async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
