//! One session's memory of what earlier runs already delivered, so a restart after a crash
//! does not publish those events twice.
//!
//! Owns: the tail scanner and, per topic, the positions of this source found in the topic at
//! or after the slot's confirmed position. Only events committed before the server's WAL
//! position at session start (`IDENTIFY_SYSTEM`'s `xlogpos`) can have been sent by an earlier
//! run, so only those are looked up; once the stream passes that point the memory is dropped.
//!
//! Invariant (inherited from [`ResumeScanner`]): an event is skipped only if a record of this
//! source carrying its position and its outbox id was read back from its topic. A topic that cannot be read is
//! logged and its events are sent again — a duplicate, never a gap.

use std::collections::HashMap;
use std::time::Duration;

use pgoutput::Lsn;
use walship_kafka::{Delivered, Position, ResumeScanner, SinkSettings};

/// Longest a topic's scan may take (the replication stream waits meanwhile).
const SCAN_TIMEOUT: Duration = Duration::from_secs(20);

/// The scanner (kept for the next topic) and what it found.
pub type ScanOutcome = (
    Option<ResumeScanner>,
    Result<Delivered, rdkafka::error::KafkaError>,
);
/// A running scan.
pub type Scan = tokio::task::JoinHandle<ScanOutcome>;

/// See the module documentation.
pub struct Resume {
    settings: SinkSettings,
    source: String,
    since: Lsn,
    until: Lsn,
    scanner: Option<ResumeScanner>,
    topics: HashMap<String, Delivered>,
    skipped: u64,
}

impl Resume {
    /// `source`: this run's `walship.source` header; `since`: the slot's confirmed position;
    /// `until`: the server's WAL position when the session started.
    pub fn new(settings: SinkSettings, source: String, since: Lsn, until: Lsn) -> Self {
        Resume {
            settings,
            source,
            since,
            until,
            scanner: None,
            topics: HashMap::new(),
            skipped: 0,
        }
    }

    /// False once the stream is past everything an earlier run can have sent.
    pub fn covers(&self, commit_lsn: Lsn) -> bool {
        commit_lsn < self.until
    }

    /// Events skipped so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// True once `topic` has been read back (then [`Resume::delivered`] answers at once).
    pub fn knows(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    /// True if an earlier run already put the event at `position` with outbox id `id` into
    /// `topic`. False for a topic not read back yet: call [`Resume::scan`] first.
    pub fn delivered(&mut self, topic: &str, position: Position, id: Option<&[u8]>) -> bool {
        let hit = self
            .topics
            .get(topic)
            .is_some_and(|d| d.contains(position, id));
        self.skipped += u64::from(hit);
        hit
    }

    /// Starts reading `topic`'s tail back, off the async runtime. The caller keeps the
    /// walsender informed while it waits, then hands the outcome to [`Resume::store`].
    pub fn scan(&mut self, topic: &str) -> Scan {
        let scanner = self.scanner.take();
        let (settings, source) = (self.settings.clone(), self.source.clone());
        let (name, since) = (topic.to_owned(), self.since.0);
        tokio::task::spawn_blocking(move || {
            let scanner = match scanner {
                Some(s) => s,
                None => match ResumeScanner::new(&settings, &source, SCAN_TIMEOUT) {
                    Ok(s) => s,
                    Err(e) => return (None, Err(e)),
                },
            };
            let result = scanner.delivered(&name, since);
            (Some(scanner), result)
        })
    }

    /// Records what a [`Resume::scan`] of `topic` found.
    pub fn store(
        &mut self,
        topic: &str,
        joined: Result<ScanOutcome, tokio::task::JoinError>,
        started: std::time::Instant,
    ) {
        let found = self.outcome(topic, joined, started);
        self.topics.insert(topic.to_owned(), found);
    }

    fn outcome(
        &mut self,
        topic: &str,
        joined: Result<ScanOutcome, tokio::task::JoinError>,
        started: std::time::Instant,
    ) -> Delivered {
        let (scanner, result) = match joined {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("resume scan of topic {topic:?} did not finish: {e}");
                return Delivered::default();
            }
        };
        self.scanner = scanner;
        match result {
            Ok(found) => {
                if !found.is_empty() {
                    tracing::info!(
                        topic,
                        events = found.len(),
                        scanned = found.scanned,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "found events after the confirmed position {} that an earlier run already \
                         delivered; they will not be sent again",
                        self.since
                    );
                }
                found
            }
            Err(e) => {
                tracing::warn!(
                    topic,
                    "cannot read topic {topic:?} back to find events an earlier run delivered \
                     after the confirmed position {}: {e}. Those events are sent again \
                     (duplicates). Grant walship's Kafka principal Read on the topic, or set \
                     run.resume_dedup = false to skip this lookup",
                    self.since
                );
                Delivered::default()
            }
        }
    }
}

impl Drop for Resume {
    fn drop(&mut self) {
        // Closing a consumer waits for its threads: not on the async runtime.
        if let Some(scanner) = self.scanner.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn_blocking(move || drop(scanner));
        }
    }
}
