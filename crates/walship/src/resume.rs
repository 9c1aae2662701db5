//! One session's memory of what earlier runs already delivered, so a restart after a crash
//! does not publish those events twice.
//!
//! Owns: the tail scanner and, per topic, the positions of this source found in the topic at
//! or after the slot's confirmed position. Only events committed before the server's WAL
//! position at session start (`IDENTIFY_SYSTEM`'s `xlogpos`) can have been sent by an earlier
//! run, so only those are looked up; once the stream passes that point the memory is dropped.
//!
//! Invariant (inherited from [`ResumeScanner`]): an event is skipped only if a record of this
//! source carrying its position and its outbox id was read back from its topic. A topic that
//! cannot be read is logged and its events are sent again — a duplicate, never a gap.

use std::collections::HashMap;
use std::time::Duration;

use pgoutput::Lsn;
use walship_kafka::{Delivered, Position, ResumeScanner, SinkSettings};

/// Longest a topic's scan may take (the replication stream waits meanwhile).
const SCAN_TIMEOUT: Duration = Duration::from_secs(20);
/// Scan time after which a session starts no further scans: with many topics, a restart must
/// not hold the stream for `topics × SCAN_TIMEOUT` (the scan running when it is reached may
/// still take up to `SCAN_TIMEOUT`). Topics first met after it are not read back.
const SESSION_SCAN_BUDGET: Duration = Duration::from_secs(60);

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
    /// Time spent scanning so far, and how much is allowed.
    spent: Duration,
    budget: Duration,
    budget_warned: bool,
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
            spent: Duration::ZERO,
            budget: SESSION_SCAN_BUDGET,
            budget_warned: false,
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
    ///
    /// None once the session's scans have used up their time budget: the topic is then taken
    /// as holding nothing of this source (its events are sent again — duplicates, never a gap).
    pub fn scan(&mut self, topic: &str) -> Option<Scan> {
        if self.spent >= self.budget {
            if !self.budget_warned {
                self.budget_warned = true;
                tracing::warn!(
                    "resume lookups of this session took {} s (limit {} s): topics met from now on \
                     are not read back, so events of theirs that an earlier run delivered after \
                     the confirmed position {} are sent again (consumers dedupe on the id or \
                     walship.position header)",
                    self.spent.as_secs(),
                    self.budget.as_secs(),
                    self.since
                );
            }
            tracing::debug!(topic, "not read back: resume lookup budget spent");
            self.topics.insert(topic.to_owned(), Delivered::default());
            return None;
        }
        let scanner = self.scanner.take();
        let (settings, source) = (self.settings.clone(), self.source.clone());
        let (name, since) = (topic.to_owned(), self.since.0);
        Some(tokio::task::spawn_blocking(move || {
            let scanner = match scanner {
                Some(s) => s,
                None => match ResumeScanner::new(&settings, &source, SCAN_TIMEOUT) {
                    Ok(s) => s,
                    Err(e) => return (None, Err(e)),
                },
            };
            let result = scanner.delivered(&name, since);
            (Some(scanner), result)
        }))
    }

    /// Records what a [`Resume::scan`] of `topic` found.
    pub fn store(
        &mut self,
        topic: &str,
        joined: Result<ScanOutcome, tokio::task::JoinError>,
        started: std::time::Instant,
    ) {
        self.spent += started.elapsed();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Instant;

    fn resume(budget: Duration) -> Resume {
        let settings = SinkSettings {
            brokers: "127.0.0.1:9".into(),
            client_id: "walship".into(),
            create_topics: true,
            topic_partitions: 1,
            topic_replication_factor: 1,
            librdkafka: BTreeMap::new(),
            secret_properties: BTreeMap::new(),
        };
        let mut r = Resume::new(settings, "1/slot".into(), Lsn(100), Lsn(200));
        r.budget = budget;
        r
    }

    #[test]
    fn scans_stop_once_the_session_budget_is_spent() {
        let mut r = resume(Duration::from_secs(5));
        r.spent = Duration::from_secs(3);
        // Time of failed scans counts too.
        let failed = Ok((
            None,
            Err(rdkafka::error::KafkaError::MetadataFetch(
                rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure,
            )),
        ));
        let started = Instant::now()
            .checked_sub(Duration::from_secs(3))
            .expect("monotonic clock older than 3 s");
        r.store("a", failed, started);
        assert!(r.spent >= Duration::from_secs(6), "{:?}", r.spent);
        assert!(r.knows("a"));
        // Over budget: no scan is started (none could be without a runtime), and the topic
        // counts as read back with nothing found, so its events are sent again.
        assert!(r.scan("c").is_none());
        assert!(r.knows("c"));
        let position = Position {
            commit_lsn: 150,
            index: 0,
        };
        assert!(!r.delivered("c", position, Some(b"id")));
        assert!(r.scan("d").is_none());
        assert_eq!(r.skipped(), 0);
    }
}
