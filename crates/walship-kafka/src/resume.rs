//! Resuming without duplicates: which events did an earlier run already put in a topic?
//!
//! Every record walship produces names its writer and its place in the stream in two headers
//! (their format is [`crate::headers`]): [`SOURCE_HEADER`] (the PostgreSQL system identifier and the slot) and [`POSITION_HEADER`]
//! (the commit LSN of the event's transaction and the event's index in it). After a crash the
//! slot's confirmed position is behind what reached Kafka, so PostgreSQL sends those events
//! again. Before the first send to a topic in a new session, [`ResumeScanner::delivered`] reads
//! the topic's tail back until it is behind the confirmed position and collects the positions
//! this source already wrote there; the pipeline skips exactly those.
//!
//! Invariant: an event is reported as delivered only if a record of this source carrying its
//! position *and its outbox id* was read from the topic (the id guards against positions that
//! repeat on a diverged timeline or a cloned cluster with the same identifier). Whatever cannot
//! be read (no permission, a scan cut short by its limits, records not yet replicated) is not
//! reported, so its event is sent again: the worst case is the old at-least-once duplicate,
//! never a gap.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::headers::{ID_HEADER, POSITION_HEADER, Position, SOURCE_HEADER, TIMELINE_HEADER};
use crate::sink::SinkSettings;

/// Records read back per partition in the first pass; each further pass reads four times more.
const FIRST_PASS: i64 = 1024;
/// Records read back per partition at most: a longer tail is not searched (its events would be
/// sent again).
const MAX_PER_PARTITION: i64 = 1 << 20;

/// A record of this source read back: its outbox `id` header and the timeline it names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    id: Option<Box<[u8]>>,
    timeline: Option<u32>,
}

/// What a read-back saw of one timeline: every record of this source at or after the LSN asked
/// for that names it, however many positions the limit let [`Delivered`] keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineSpan {
    /// Records read.
    pub records: u64,
    /// The lowest and the highest of their positions.
    pub first: Position,
    /// See `first`.
    pub last: Position,
}

/// The positions one source already wrote to one topic, at or after some LSN.
///
/// Holds at most the limit given to [`ResumeScanner::delivered`]: beyond it the newest
/// positions are dropped (their events are sent again), never the oldest, so what is held is
/// always a prefix of the stream from the confirmed position.
#[derive(Debug, Default)]
pub struct Delivered {
    /// Position → the record's `id` header and its timeline ([`crate::headers::TIMELINE_HEADER`]).
    positions: BTreeMap<Position, Found>,
    /// Per timeline named, every record read (not bounded by the limit: the newest positions,
    /// which a limit drops first, are the ones a promotion can have left behind).
    spans: BTreeMap<u32, TimelineSpan>,
    /// Records read.
    pub scanned: u64,
    /// False when some partition could not be searched back far enough (time or size limit):
    /// events missing from the set may still be in the topic and will be duplicated.
    pub complete: bool,
}

impl Delivered {
    /// True if a record of this source with `position` and this outbox `id` is in the topic.
    pub fn contains(&self, position: Position, id: Option<&[u8]>) -> bool {
        self.positions
            .get(&position)
            .is_some_and(|found| found.id.as_deref() == id)
    }

    /// What was read of each timeline the records name (records without the header are not
    /// counted: their timeline is unknown).
    pub fn timelines(&self) -> impl Iterator<Item = (u32, TimelineSpan)> + '_ {
        self.spans.iter().map(|(t, s)| (*t, *s))
    }

    /// Counts a record of `timeline` at `position` in [`Delivered::timelines`].
    fn note_timeline(&mut self, timeline: Option<u32>, position: Position) {
        let Some(timeline) = timeline else { return };
        self.spans
            .entry(timeline)
            .and_modify(|s| {
                s.records += 1;
                s.first = s.first.min(position);
                s.last = s.last.max(position);
            })
            .or_insert(TimelineSpan {
                records: 1,
                first: position,
                last: position,
            });
    }

    /// How many positions are held.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// The newest position held: no event after it can be found.
    pub fn last(&self) -> Option<Position> {
        self.positions.last_key_value().map(|(p, _)| *p)
    }

    /// Releases the positions before `position` (the stream has passed them).
    pub fn forget_before(&mut self, position: Position) {
        while self
            .positions
            .first_key_value()
            .is_some_and(|(p, _)| *p < position)
        {
            self.positions.pop_first();
        }
    }

    /// Records a found position, keeping at most `limit` (the oldest): false when it or a newer
    /// one had to be dropped.
    fn insert(&mut self, position: Position, record: Found, limit: usize) -> bool {
        self.note_timeline(record.timeline, position);
        self.positions.insert(position, record);
        if self.positions.len() > limit {
            self.positions.pop_last();
            return false;
        }
        true
    }

    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

impl FromIterator<(Position, Option<Box<[u8]>>)> for Delivered {
    /// A complete set of found positions without timelines (tests, and callers that know them
    /// otherwise).
    fn from_iter<I: IntoIterator<Item = (Position, Option<Box<[u8]>>)>>(iter: I) -> Self {
        iter.into_iter().map(|(p, id)| (p, id, None)).collect()
    }
}

impl FromIterator<(Position, Option<Box<[u8]>>, Option<u32>)> for Delivered {
    /// A complete set of found positions with the timelines their records name.
    fn from_iter<I: IntoIterator<Item = (Position, Option<Box<[u8]>>, Option<u32>)>>(
        iter: I,
    ) -> Self {
        let mut d = Delivered {
            complete: true,
            ..Delivered::default()
        };
        for (position, id, timeline) in iter {
            d.insert(position, Found { id, timeline }, usize::MAX);
        }
        d
    }
}

/// Logs librdkafka at debug level, except what says the scan cannot work.
struct ScanContext;

impl ClientContext for ScanContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // The scan is best effort (what it cannot read is sent again): only errors warrant a
        // warning.
        if (level as i32) <= (RDKafkaLogLevel::Error as i32) {
            tracing::warn!(target: "librdkafka", "resume scan: {fac}: {message}");
        } else {
            tracing::debug!(target: "librdkafka", "resume scan: {fac}: {message}");
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", "resume scan: {error}: {reason}");
    }
}

impl ConsumerContext for ScanContext {}

/// Reads topic tails for one source. Blocking: run it off the async runtime.
pub struct ResumeScanner {
    consumer: BaseConsumer<ScanContext>,
    source: Vec<u8>,
    timeout: Duration,
}

/// Per-partition state of a backward search.
struct Tail {
    low: i64,
    high: i64,
    /// Start of what has been read so far (the next pass reads the records before it).
    from: i64,
    done: bool,
}

impl ResumeScanner {
    /// A consumer with the producer's connection and security settings. `source` is the value of
    /// [`SOURCE_HEADER`] this run writes; `timeout` bounds each topic's scan.
    pub fn new(
        settings: &SinkSettings,
        source: &str,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        let mut config = settings.connection_config();
        config
            // librdkafka wants a group for assign(); it is never joined (no subscribe) and
            // nothing is committed. Start at the oldest record if retention removed the
            // requested one.
            .set("group.id", format!("{}-resume", settings.client_id))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "50")
            .set_log_level(RDKafkaLogLevel::Debug);
        // A consumer checks what a producer does not: `receive.message.max.bytes` must exceed
        // its fetch size, which grows with `message.max.bytes`. Keep the producer's limits
        // valid here too.
        let get = |key: &str| config.get(key).and_then(|v| v.parse::<u64>().ok());
        let fetch = get("fetch.max.bytes")
            .unwrap_or(52_428_800)
            .max(get("message.max.bytes").unwrap_or(0));
        let receive = get("receive.message.max.bytes")
            .unwrap_or(100_000_000)
            .max(fetch + 512)
            .min(2_147_483_647);
        config.set("receive.message.max.bytes", receive.to_string());
        let consumer = settings.create(&config, ScanContext)?;
        Ok(ResumeScanner {
            consumer,
            source: source.as_bytes().to_vec(),
            timeout,
        })
    }

    /// The positions at or after `since` (a commit LSN) that this source wrote to `topic`, at
    /// most `limit` of them (the oldest; see [`Delivered`]).
    ///
    /// Reads each partition backwards in growing passes until it meets a record of this source
    /// from before `since`, the start of the partition, or the size limit.
    pub fn delivered(
        &self,
        topic: &str,
        since: u64,
        limit: usize,
    ) -> Result<Delivered, KafkaError> {
        let deadline = Instant::now() + self.timeout;
        let metadata = self.consumer.fetch_metadata(Some(topic), self.timeout)?;
        let mut partitions = Vec::new();
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            if let Some(e) = t.error() {
                let code = RDKafkaErrorCode::from(e);
                if code == RDKafkaErrorCode::UnknownTopicOrPartition {
                    return Ok(Delivered {
                        complete: true,
                        ..Delivered::default()
                    });
                }
                return Err(KafkaError::MetadataFetch(code));
            }
            partitions.extend(t.partitions().iter().map(|p| p.id()));
        }
        let marks = self.watermarks(topic, &partitions, deadline)?;
        let mut tails: HashMap<i32, Tail> = partitions
            .iter()
            .zip(marks)
            .map(|(&p, (low, high))| {
                let tail = Tail {
                    low,
                    high,
                    from: high,
                    done: high <= low,
                };
                (p, tail)
            })
            .collect();
        let mut found = Delivered {
            complete: true,
            ..Delivered::default()
        };
        let mut width = FIRST_PASS;
        while tails.values().any(|t| !t.done) {
            self.pass(topic, since, limit, width, &mut tails, &mut found, deadline)?;
            width = width.saturating_mul(4);
        }
        let _ = self.consumer.unassign();
        Ok(found)
    }

    /// `(low, high)` of each partition.
    fn watermarks(
        &self,
        topic: &str,
        partitions: &[i32],
        deadline: Instant,
    ) -> Result<Vec<(i64, i64)>, KafkaError> {
        partitions
            .iter()
            .map(|&p| {
                self.consumer
                    .fetch_watermarks(topic, p, remaining(deadline)?)
            })
            .collect()
    }

    /// Reads `[from - width, from)` of every partition not yet done.
    #[allow(clippy::too_many_arguments)]
    fn pass(
        &self,
        topic: &str,
        since: u64,
        limit: usize,
        width: i64,
        tails: &mut HashMap<i32, Tail>,
        found: &mut Delivered,
        deadline: Instant,
    ) -> Result<(), KafkaError> {
        // Range of this pass per partition: [start, end). The first pass reads to the end the
        // fetch itself reports (end-of-partition), not to the listed offset, which can lag.
        let mut ranges: HashMap<i32, (i64, i64)> = HashMap::new();
        let mut assignment = TopicPartitionList::new();
        for (&p, t) in tails.iter_mut().filter(|(_, t)| !t.done) {
            if t.high - t.from >= MAX_PER_PARTITION {
                t.done = true;
                found.complete = false;
                tracing::warn!(
                    topic,
                    partition = p,
                    "resume scan: stopped after {MAX_PER_PARTITION} records without reaching the \
                     confirmed position; events beyond it may be sent twice"
                );
                continue;
            }
            // Never read more than the limit, whatever the pass width.
            let width = width.min(MAX_PER_PARTITION - (t.high - t.from));
            let start = (t.from - width).max(t.low);
            let end = if t.from == t.high { i64::MAX } else { t.from };
            ranges.insert(p, (start, end));
            assignment.add_partition_offset(topic, p, Offset::Offset(start))?;
        }
        if ranges.is_empty() {
            return Ok(());
        }
        self.consumer.assign(&assignment)?;
        let mut open: HashSet<i32> = ranges.keys().copied().collect();
        let mut reached_older: HashSet<i32> = HashSet::new();
        // The lowest offset actually read in each range. A fetch need not start where it was
        // asked: tansu answers one that starts inside a record batch from a later batch, and a
        // message fetched for an earlier pass can still arrive. What lies between the range's
        // start and the first record read is left to the next pass.
        let mut first_read: HashMap<i32, i64> = HashMap::new();
        while !open.is_empty() {
            let Ok(wait) = remaining(deadline) else {
                // Out of time: what was found stands; the rest is sent again.
                found.complete = false;
                tracing::warn!(
                    topic,
                    "resume scan: timed out after {:?}; events not found may be sent twice",
                    self.timeout
                );
                for t in tails.values_mut() {
                    t.done = true;
                }
                return Ok(());
            };
            let Some(message) = self.consumer.poll(wait.min(Duration::from_millis(200))) else {
                continue;
            };
            let message = match message {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(p)) => {
                    // Nothing more to read in this partition, whatever the pass (retention or
                    // control records can leave no record at or past the range's end).
                    open.remove(&p);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let p = message.partition();
            let Some(&(start, end)) = ranges.get(&p) else {
                continue;
            };
            if !open.contains(&p) || message.offset() < start {
                continue;
            }
            if message.offset() >= end {
                open.remove(&p);
                continue;
            }
            first_read.entry(p).or_insert(message.offset());
            found.scanned += 1;
            if let Some((position, record)) = self.position_of(&message) {
                if position.commit_lsn >= since {
                    if found.len() >= limit && found.last().is_some_and(|l| position > l) {
                        // Beyond what may be held: counted for its timeline only.
                        found.note_timeline(record.timeline, position);
                        found.complete = false;
                    } else if !found.insert(position, record, limit) {
                        found.complete = false;
                    }
                } else {
                    reached_older.insert(p);
                }
            }
            if message.offset() + 1 >= end {
                open.remove(&p);
            }
        }
        for (p, (start, end)) in ranges {
            if let Some(t) = tails.get_mut(&p) {
                // Read from the first record read on; a range of which nothing was read is
                // read again, whole, by the next (wider) pass.
                let unread_from = if end == i64::MAX { t.high } else { end };
                t.from = first_read
                    .get(&p)
                    .copied()
                    .unwrap_or(unread_from)
                    .max(start);
                t.done = start <= t.low || reached_older.contains(&p);
            }
        }
        Ok(())
    }

    /// The position, outbox id and timeline of a record written by this source, `None` for
    /// anyone else's. walship writes these headers first, so the first of each name counts.
    fn position_of<M: Message>(&self, message: &M) -> Option<(Position, Found)> {
        let headers = message.headers()?;
        let (mut source, mut position, mut id, mut timeline) = (None, None, None, None);
        for h in headers.iter() {
            match h.key {
                SOURCE_HEADER if source.is_none() => source = Some(h.value),
                POSITION_HEADER if position.is_none() => position = Some(h.value),
                ID_HEADER if id.is_none() => id = Some(h.value),
                TIMELINE_HEADER if timeline.is_none() => timeline = Some(h.value),
                _ => {}
            }
        }
        if source? != Some(self.source.as_slice()) {
            return None;
        }
        let position = Position::parse(position??)?;
        Some((
            position,
            Found {
                id: id.flatten().map(Box::from),
                timeline: crate::headers::parse_timeline(timeline.flatten()),
            },
        ))
    }
}

fn remaining(deadline: Instant) -> Result<Duration, KafkaError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or(KafkaError::MetadataFetch(
            RDKafkaErrorCode::OperationTimedOut,
        ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::PositionText;

    #[test]
    fn the_scanner_accepts_the_producers_message_size_limits() {
        let mut settings = crate::sink::tests::settings("127.0.0.1:9");
        for (k, v) in [
            ("message.max.bytes", "104857600"),
            ("receive.message.max.bytes", "104857600"),
        ] {
            settings.librdkafka.insert(k.into(), v.into());
        }
        // The producer takes these; a consumer with them as given refuses to start.
        settings
            .client_config()
            .create::<rdkafka::producer::BaseProducer>()
            .expect("producer");
        ResumeScanner::new(&settings, "src", Duration::from_secs(1)).expect("scanner");
    }

    /// A scanner against librdkafka's in-process mock cluster (the e2e tests use a real broker).
    fn mock() -> (
        rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        SinkSettings,
    ) {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let settings = crate::sink::tests::settings(&cluster.bootstrap_servers());
        (cluster, settings)
    }

    fn produce(settings: &SinkSettings, topic: &str, records: &[(i32, &str, Position)]) {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let producer: BaseProducer = settings.client_config().create().unwrap();
        for &(partition, source, position) in records {
            let mut text = PositionText::default();
            let row_id = id(position.commit_lsn);
            let headers = rdkafka::message::OwnedHeaders::new()
                .insert(rdkafka::message::Header {
                    key: SOURCE_HEADER,
                    value: Some(source),
                })
                .insert(rdkafka::message::Header {
                    key: POSITION_HEADER,
                    value: Some(position.encode(&mut text)),
                })
                .insert(rdkafka::message::Header {
                    key: ID_HEADER,
                    value: Some(&row_id),
                });
            let mut record = BaseRecord::to(topic)
                .partition(partition)
                .key("k")
                .payload("v")
                .headers(headers);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => panic!("{e}"),
                }
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    fn id(lsn: u64) -> Vec<u8> {
        format!("row-{lsn}").into_bytes()
    }

    fn at(lsn: u64) -> Position {
        Position {
            commit_lsn: lsn,
            index: 0,
        }
    }

    #[test]
    fn scan_reads_back_past_the_first_pass_and_only_counts_its_own_source() {
        let (cluster, settings) = mock();
        cluster.create_topic("t", 2, 1).unwrap();
        // 6,000 events of this source over two partitions, with another source's records
        // (at positions this source never used) mixed in.
        let mut records = Vec::new();
        // Events never delivered (a crash lost them in flight) leave gaps.
        let missing = |i: u64| i % 97 == 13;
        for i in 0..6000_u64 {
            if !missing(i) {
                records.push(((i % 2) as i32, "me/slot", at(i * 10)));
            }
            if i % 3 == 0 {
                records.push(((i % 2) as i32, "other/slot", at(i * 10 + 5)));
            }
        }
        produce(&settings, "t", &records);
        let scanner = ResumeScanner::new(&settings, "me/slot", Duration::from_secs(30)).unwrap();
        // Everything from event 1,000 on: 2,500 records of ours per partition, more than one pass.
        let found = scanner.delivered("t", 10_000, usize::MAX).unwrap();
        assert!(found.complete);
        let delivered: Vec<u64> = (1000..6000).filter(|&i| !missing(i)).collect();
        assert_eq!(found.len(), delivered.len());
        assert!(
            delivered
                .iter()
                .all(|&i| found.contains(at(i * 10), Some(&id(i * 10))))
        );
        assert!(
            (1000..6000)
                .filter(|&i| missing(i))
                .all(|i| !found.contains(at(i * 10), Some(&id(i * 10)))),
            "an event that is not in the topic is never reported"
        );
        assert!(
            !found.contains(at(990 * 10), Some(&id(990 * 10))),
            "before `since`"
        );
        assert!(
            !found.contains(at(3000 * 10 + 5), Some(&id(3000 * 10 + 5))),
            "another source's position"
        );
        // The same position with another outbox id (a diverged timeline) is not this event.
        assert!(!found.contains(at(2000 * 10), Some(b"other-row")));
        assert!(!found.contains(at(2000 * 10), None));
        assert!(found.scanned > 2 * FIRST_PASS as u64, "{}", found.scanned);
    }

    #[test]
    fn scan_of_a_missing_or_empty_topic_finds_nothing() {
        let (cluster, settings) = mock();
        cluster.create_topic("empty", 3, 1).unwrap();
        let scanner = ResumeScanner::new(&settings, "me/slot", Duration::from_secs(30)).unwrap();
        let found = scanner.delivered("empty", 0, usize::MAX).unwrap();
        assert!(found.is_empty() && found.complete);
        let found = scanner.delivered("missing", 0, usize::MAX).unwrap();
        assert!(found.is_empty() && found.complete);
    }

    #[test]
    fn scan_holds_at_most_the_limit_and_keeps_the_oldest_positions() {
        let (cluster, settings) = mock();
        cluster.create_topic("t", 2, 1).unwrap();
        let records: Vec<_> = (0..3000_u64)
            .map(|i| ((i % 2) as i32, "me/slot", at(i * 10)))
            .collect();
        produce(&settings, "t", &records);
        let scanner = ResumeScanner::new(&settings, "me/slot", Duration::from_secs(30)).unwrap();
        let mut found = scanner.delivered("t", 0, 500).unwrap();
        assert_eq!(found.len(), 500);
        assert!(!found.complete, "a scan cut by the limit is not complete");
        // A prefix of the stream: positions 0..500, not the tail the scan read first.
        assert!((0..500).all(|i| found.contains(at(i * 10), Some(&id(i * 10)))));
        assert_eq!(found.last(), Some(at(499 * 10)));
        found.forget_before(at(100 * 10));
        assert_eq!(found.len(), 400);
        assert!(!found.contains(at(99 * 10), Some(&id(99 * 10))));
        assert!(found.contains(at(100 * 10), Some(&id(100 * 10))));
    }
}
