//! The consumer process the hand-over test starts, kills -9 and restarts: this test binary run
//! again on [`consumer_process`], applying every record through the inbox to a table of its own
//! and logging what it skipped.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use tokio_postgres::Transaction;
use walship_inbox::{Admission, Handler, Inbox};

use crate::harness::postgres::connect;
use crate::harness::{broker, process};

const ENV_DB: &str = "WALSHIP_INBOX_TEST_CONSUMER_DB";

const ENV_BOOTSTRAP: &str = "WALSHIP_INBOX_TEST_BOOTSTRAP";

const ENV_GROUP: &str = "WALSHIP_INBOX_TEST_GROUP";

const ENV_TOPIC: &str = "WALSHIP_INBOX_TEST_TOPIC";

/// The consumer's work: one row per event, with the key and the `seq` the writer put in it.
struct Apply;

impl Handler for Apply {
    type Error = tokio_postgres::Error;

    async fn handle<M: Message + Sync>(
        &mut self,
        tx: &Transaction<'_>,
        record: &M,
    ) -> Result<(), tokio_postgres::Error> {
        let payload: serde_json::Value =
            serde_json::from_slice(record.payload().unwrap_or_default()).expect("JSON payload");
        let id = record
            .headers()
            .and_then(|h| {
                use rdkafka::message::Headers;
                h.iter().find(|h| h.key == "id").and_then(|h| h.value)
            })
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("id header");
        tx.execute(
            "INSERT INTO applied (id, key, seq, topic, kafka_partition, kafka_offset) \
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &id,
                &String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned(),
                &payload["seq"].as_i64().expect("seq"),
                &record.topic(),
                &record.partition(),
                &record.offset(),
            ],
        )
        .await?;
        Ok(())
    }
}

/// The consumer process's body: runs only when [`Consumer::start`] starts this binary on it.
#[test]
#[ignore = "the inbox tests' consumer process; they start it themselves"]
fn consumer_process() {
    let Ok(url) = std::env::var(ENV_DB) else {
        return;
    };
    let env = |name| std::env::var(name).expect(name);
    let (bootstrap, group, topic) = (env(ENV_BOOTSTRAP), env(ENV_GROUP), env(ENV_TOPIC));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut client = connect(&url).await;
        let inbox = Inbox::new();
        inbox.create_tables(&client).await.expect("create tables");
        // The statements prepared on this connection: the suite's other tests use one-shot ones.
        let inbox = inbox.prepare(&client).await.expect("prepare");
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS applied (
                     serial bigserial PRIMARY KEY, id text NOT NULL, key text NOT NULL,
                     seq bigint NOT NULL, topic text NOT NULL, kafka_partition int NOT NULL,
                     kafka_offset bigint NOT NULL)",
            )
            .await
            .expect("applied table");
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .set("log_level", "3");
        walship_inbox::configure(&mut config);
        let consumer: StreamConsumer = config.create().expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        println!("consumer started");
        let (mut applied, mut skipped) = (0u64, 0u64);
        // Per partition, the offset after the last record processed.
        let mut next = BTreeMap::new();
        loop {
            match consumer.recv().await {
                Ok(m) => {
                    match inbox.process(&mut client, &consumer, &m, &mut Apply).await {
                        Ok(Admission::Apply) => applied += 1,
                        Ok(Admission::Duplicate) => {
                            skipped += 1;
                            // Which record: the test tells redeliveries from late copies.
                            println!("skip {} {}", m.partition(), m.offset());
                        }
                        Err(e) => panic!("processing failed: {e}"),
                    }
                    next.insert(m.partition(), m.offset() + 1);
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    let at = next.get(&p).copied().unwrap_or(0);
                    println!("eof partition {p} next {at}: applied {applied}, skipped {skipped}");
                }
                Err(e) => println!("consumer error (retrying): {e}"),
            }
        }
    });
}

/// The consumer process, with its output in a file.
pub(super) struct ConsumerProcess {
    child: std::process::Child,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ConsumerProcess {
    pub(super) fn start(db_url: &str, group: &str, topic: &str) -> ConsumerProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = vec![
            (ENV_DB, db_url.to_owned()),
            (ENV_BOOTSTRAP, broker().bootstrap.clone()),
            (ENV_GROUP, group.to_owned()),
            (ENV_TOPIC, topic.to_owned()),
        ];
        let log = dir.path().join("consumer.log");
        let child = Self::spawn(&env, &log);
        ConsumerProcess {
            child,
            env,
            log,
            _dir: dir,
        }
    }

    fn spawn(env: &[(&'static str, String)], log: &std::path::Path) -> std::process::Child {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
        cmd.args([
            "inbox::consumer::consumer_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdout(out.try_clone().expect("log"))
        .stderr(out);
        process::spawn_owned(cmd, libc::SIGKILL).expect("start the consumer process")
    }

    /// kill -9, and wait for it to be gone.
    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(super) fn restart(&mut self) {
        self.child = Self::spawn(&self.env, &self.log);
    }

    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every record (partition, offset) any of its starts skipped as a copy.
    pub(super) fn skipped(&self) -> HashSet<(i32, i64)> {
        self.log_text()
            .lines()
            .filter_map(|l| {
                let (p, o) = l.strip_prefix("skip ")?.split_once(' ')?;
                Some((p.parse().ok()?, o.parse().ok()?))
            })
            .collect()
    }

    /// Panics with its log if the process ended (it never ends by itself).
    pub(super) fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "the consumer process ended ({status}):\n{}",
                self.log_text()
            );
        }
    }

    /// The process's counts (applied, skipped) once its latest start has read every partition
    /// to its end in `ends` (partition → the offset after its last record); `None` before.
    pub(super) fn read_to_end(&self, ends: &BTreeMap<i32, i64>) -> Option<(u64, u64)> {
        let log = self.log_text();
        let latest = log.rsplit("consumer started").next().unwrap_or_default();
        let mut at = BTreeMap::new();
        let mut counts = (0, 0);
        for line in latest.lines() {
            let Some(rest) = line.strip_prefix("eof partition ") else {
                continue;
            };
            let nums: Vec<u64> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
            if let [p, next, applied, skipped] = nums[..] {
                at.insert(p as i32, next as i64);
                counts = (applied, skipped);
            }
        }
        ends.iter()
            .all(|(p, end)| at.get(p) == Some(end))
            .then_some(counts)
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
