//! A real Kafka-protocol broker process (tansu) and an rdkafka consumer for assertions.
//!
//! One broker is shared by the tests of a process (each test uses its own topics);
//! [`Broker::dedicated`] starts a private one for tests that stop it. `WALSHIP_TEST_KAFKA` names
//! an external broker instead (e.g. Apache Kafka or Redpanda) for the shared one.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};

use super::process::{
    a_test_failed, at_exit, free_port, note_failures, spawn_owned, wait_for_port,
};

/// The tansu binary: `WALSHIP_TANSU_BIN`, `tansu` on PATH, or `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WALSHIP_TANSU_BIN") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("tansu"))
        .find(|p| p.exists());
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu"));
    on_path.or(home.filter(|p| p.exists())).expect(
        "the tansu broker is not installed: run scripts/setup.sh (cargo install tansu), or set \
         WALSHIP_TEST_KAFKA to an external broker",
    )
}

/// A broker process (or an external broker).
pub struct Broker {
    pub port: u16,
    pub bootstrap: String,
    child: Mutex<Option<Child>>,
    external: bool,
}

impl Broker {
    fn spawn_at(port: u16) -> Child {
        Self::spawn_advertising(port, "127.0.0.1", "127.0.0.1")
    }

    /// tansu on `listen:port`, telling clients to connect to `advertised:port`.
    fn spawn_advertising(port: u16, listen: &str, advertised: &str) -> Child {
        let url = format!("tcp://{listen}:{port}");
        let advertised_url = format!("tcp://{advertised}:{port}");
        let path = std::env::temp_dir().join(format!(
            "walship-test-tansu-{}-{port}.log",
            std::process::id()
        ));
        note_failures();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("broker log");
        // Forgotten at exit unless a test failed (restarts on the same port share it).
        at_exit(Box::new(move || {
            if !a_test_failed() {
                let _ = std::fs::remove_file(&path);
            }
        }));
        let mut cmd = Command::new(tansu_bin());
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised_url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .env_remove("CLUSTER_ID")
        .env_remove("LISTENER_URL")
        .env_remove("ADVERTISED_LISTENER_URL")
        .env_remove("STORAGE_ENGINE")
        .stdout(Stdio::null())
        .stderr(log);
        let child = spawn_owned(cmd, libc::SIGKILL).expect("start tansu");
        wait_for_port(port, "tansu", Duration::from_secs(30));
        child
    }

    /// A broker process of the caller's own.
    pub fn dedicated() -> Broker {
        let port = free_port();
        let child = Self::spawn_at(port);
        Broker {
            port,
            bootstrap: format!("127.0.0.1:{port}"),
            child: Mutex::new(Some(child)),
            external: false,
        }
    }

    /// A broker process of the caller's own that listens on every address and tells clients
    /// to connect to `advertised` (an address of this host, for clients in a network
    /// namespace: see `harness::netns`).
    pub fn dedicated_advertising(advertised: &str) -> Broker {
        let port = free_port();
        let child = Self::spawn_advertising(port, "0.0.0.0", advertised);
        Broker {
            port,
            bootstrap: format!("{advertised}:{port}"),
            child: Mutex::new(Some(child)),
            external: false,
        }
    }

    /// The broker's process id (None for an external broker).
    pub fn pid(&self) -> Option<i32> {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.id() as i32)
    }

    /// Freezes the broker process (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Resumes a frozen broker (SIGCONT).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        let pid = self.pid().expect("a broker process of our own");
        #[allow(unsafe_code)]
        // SAFETY: signalling our own child process.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({sig}) of the broker");
    }

    /// Kills the broker process (an outage; its in-memory data is gone).
    pub fn stop(&self) {
        assert!(!self.external, "cannot stop an external broker");
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port.
    pub fn start(&self) {
        let child = Self::spawn_at(self.port);
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if !self.external {
            self.stop();
        }
    }
}

/// The broker shared by the tests of this process.
pub fn broker() -> &'static Broker {
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(|| match std::env::var("WALSHIP_TEST_KAFKA") {
        Ok(bootstrap) => Broker {
            port: 0,
            bootstrap,
            child: Mutex::new(None),
            external: true,
        },
        Err(_) => Broker::dedicated(),
    })
}

/// A consumed record.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, Vec<u8>>,
    pub timestamp_ms: Option<i64>,
}

impl Consumed {
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(&self.key).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The `id` header: the outbox row id.
    pub fn id(&self) -> String {
        self.header("id").expect("id header")
    }

    /// The commit LSN of the event's transaction (the start of its commit record), from the
    /// `walship.position` header. A slot that confirms this position or less has not yet
    /// confirmed the event.
    pub fn commit_lsn(&self) -> pgoutput::Lsn {
        let text = self
            .headers
            .get(walship_kafka::POSITION_HEADER)
            .expect("walship.position header");
        let position = walship_kafka::Position::parse(text).expect("walship.position parses");
        pgoutput::Lsn(position.commit_lsn)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.payload.as_deref().expect("payload")).expect("payload is JSON")
    }
}

/// Reads `topics` from the beginning until `expected` records arrived, then keeps reading until
/// the topics stay quiet for `settle` and every partition is read up to its high watermark (so
/// everything the broker holds is seen, duplicates too, however slowly it serves it). Panics
/// after `timeout`.
pub fn consume(
    bootstrap: &str,
    topics: &[&str],
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("walship-test-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    let deadline = std::time::Instant::now() + timeout;
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let partitions = loop {
            // What the broker last said, for the failure message.
            let last = match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
                Ok(md) => {
                    if let Some(t) = md
                        .topics()
                        .iter()
                        .find(|t| t.name() == *topic && t.error().is_none())
                        && !t.partitions().is_empty()
                    {
                        break t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>();
                    }
                    let listed: Vec<_> = md
                        .topics()
                        .iter()
                        .map(|t| (t.name().to_owned(), t.error(), t.partitions().len()))
                        .collect();
                    format!("metadata (topic, error, partitions): {listed:?}")
                }
                Err(e) => format!("metadata request failed: {e}"),
            };
            assert!(
                std::time::Instant::now() < deadline,
                "topic {topic} did not appear within {timeout:?}; last answer: {last}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        for p in partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("add partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    // Per partition: the offset after the last record read.
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut quiet_since = std::time::Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = HashMap::new();
                if let Some(h) = m.headers() {
                    for hdr in h.iter() {
                        headers.insert(
                            hdr.key.to_owned(),
                            hdr.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        );
                    }
                }
                next.insert((m.topic().to_owned(), m.partition()), m.offset() + 1);
                out.push(Consumed {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers,
                    timestamp_ms: m.timestamp().to_millis(),
                });
                quiet_since = std::time::Instant::now();
            }
            Some(Err(e)) => eprintln!("consumer error (retrying): {e}"),
            None => {}
        }
        if out.len() >= expected && quiet_since.elapsed() >= settle {
            let behind = tpl.elements().iter().find_map(|e| {
                let (topic, p) = (e.topic(), e.partition());
                let read = next.get(&(topic.to_owned(), p)).copied().unwrap_or(0);
                match consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                    Ok((_, high)) if read >= high => None,
                    Ok((_, high)) => Some(format!(
                        "{topic}/{p}: read to {read}, high watermark {high}"
                    )),
                    Err(e) => Some(format!("{topic}/{p}: no watermarks: {e}")),
                }
            });
            match behind {
                None => return out,
                // Keep reading; say so if it comes to the timeout.
                Some(b) => assert!(
                    std::time::Instant::now() < deadline,
                    "consumed {} records from {topics:?} within {timeout:?} but not all: {b}",
                    out.len()
                ),
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "consumed {} of {expected} records from {topics:?} within {timeout:?}",
            out.len()
        );
    }
}
