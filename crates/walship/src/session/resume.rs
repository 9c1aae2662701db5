//! One session's memory of what earlier runs already delivered, so a restart after a crash
//! does not publish those events twice.
//!
//! Owns: per topic, the positions of this source found in the topic at
//! or after the slot's confirmed position. Only events committed before the server's WAL
//! position at session start (`IDENTIFY_SYSTEM`'s `xlogpos`) can have been sent by an earlier
//! run, so only those are looked up; once the stream passes that point the memory is dropped.
//!
//! Invariants:
//! - (inherited from the sink's read-back, `walship_kafka::ResumeScanner`) an event is skipped only if a record of this source
//!   carrying its position and its outbox id was read back from its topic. A topic that cannot
//!   be read is logged and its events are sent again — a duplicate, never a gap.
//! - Only a contiguous run is skipped: once an event of a key was not found in its topic (a
//!   scan cut short, a record lost in flight), every later event of that key in that topic is
//!   sent too, so the topic never reads e1, e2, e1 — a newer event is never left as the last
//!   word before an older one sent again.
//! - Memory is bounded: at most [`MAX_POSITIONS`] found positions are held per session (the
//!   oldest; newer events are sent again), released as the stream passes them, and at most
//!   [`MAX_GAP_KEYS`] keys per topic remember a gap (beyond that, the whole topic counts as
//!   having one).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pgoutput::Lsn;
use walship_kafka::{Delivered, Position};

/// Scan time after which a session starts no further scans: with many topics, a restart must
/// not hold the stream for `topics × ` the per-topic scan timeout (the scan running when it is
/// reached may still take up to that timeout). Topics first met after it are not read back.
const SESSION_SCAN_BUDGET: Duration = Duration::from_secs(60);

/// Found positions held per session at most, over all topics (a few dozen bytes each).
pub const MAX_POSITIONS: usize = 1 << 18;
/// Keys per topic remembered as having a gap; beyond it every later event of the topic is sent.
pub const MAX_GAP_KEYS: usize = 1 << 16;

/// What one topic holds of this source, and which keys can no longer be skipped.
#[derive(Default)]
struct TopicMemory {
    found: Delivered,
    /// Keys with an event that was not found: their later events are all sent.
    gaps: HashSet<Box<[u8]>>,
    /// Every later event of the topic is sent (past the newest found position, or too many
    /// keys with gaps to remember).
    gap_all: bool,
}

/// See the module documentation.
pub struct Resume {
    since: Lsn,
    until: Lsn,
    topics: HashMap<String, TopicMemory>,
    skipped: u64,
    /// Time spent scanning so far, and how much is allowed.
    spent: Duration,
    budget: Duration,
    budget_warned: bool,
}

impl Resume {
    /// `since`: the slot's confirmed position; `until`: the server's WAL position when the
    /// session started.
    pub fn new(since: Lsn, until: Lsn) -> Self {
        Resume {
            since,
            until,
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

    /// True if the event at `position` with outbox id `id` and Kafka key `key` is to be
    /// skipped: an earlier run already put it into `topic`, and every earlier event of the key
    /// this session met was found there too. False for a topic not read back yet: call
    /// [`Resume::begin_scan`] and [`Resume::store`] first. Events must be asked about in stream
    /// order.
    pub fn delivered(
        &mut self,
        topic: &str,
        position: Position,
        id: Option<&[u8]>,
        key: &[u8],
    ) -> bool {
        let Some(t) = self.topics.get_mut(topic) else {
            return false;
        };
        // The stream has passed what comes before: no later event can be at those positions.
        t.found.forget_before(position);
        if t.gap_all || t.gaps.contains(key) {
            return false;
        }
        // Without an id the position alone would decide, which a diverged timeline or a cloned
        // cluster can repeat: such an event (a dead letter of a row without one) is sent again.
        let hit = id.is_some() && t.found.contains(position, id);
        if hit {
            self.skipped += 1;
        } else if t.found.last().is_none_or(|last| position > last) {
            // Past the newest found position: nothing later can be found either.
            t.gap_all = true;
        } else if t.gaps.len() >= MAX_GAP_KEYS {
            t.gap_all = true;
        } else {
            t.gaps.insert(Box::from(key));
        }
        hit
    }

    /// Positions held now, over all topics.
    pub fn held(&self) -> usize {
        self.topics.values().map(|t| t.found.len()).sum()
    }

    /// The slot's confirmed position: read-backs look for positions at or after it.
    pub fn since(&self) -> Lsn {
        self.since
    }

    /// Whether `topic` may be read back now, and how many positions its read-back may return.
    /// The caller reads it back (keeping the walsender informed meanwhile) and hands the outcome
    /// to [`Resume::store`].
    ///
    /// None once the session's read-backs have used up their time budget: the topic is then
    /// taken as holding nothing of this source (its events are sent again — duplicates, never a
    /// gap).
    pub fn begin_scan(&mut self, topic: &str) -> Option<usize> {
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
            self.topics.insert(topic.to_owned(), TopicMemory::default());
            return None;
        }
        Some(MAX_POSITIONS.saturating_sub(self.held()).max(1))
    }

    /// Records what a read-back of `topic` found, and the time it took.
    pub fn store(&mut self, topic: &str, result: Result<Delivered, String>, took: Duration) {
        self.spent += took;
        let found = self.outcome(topic, result, took);
        self.topics.insert(
            topic.to_owned(),
            TopicMemory {
                found,
                ..TopicMemory::default()
            },
        );
    }

    fn outcome(
        &mut self,
        topic: &str,
        result: Result<Delivered, String>,
        took: Duration,
    ) -> Delivered {
        match result {
            Ok(found) => {
                if !found.is_empty() {
                    tracing::info!(
                        topic,
                        events = found.len(),
                        scanned = found.scanned,
                        elapsed_ms = took.as_millis() as u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(budget: Duration) -> Resume {
        let mut r = Resume::new(Lsn(100), Lsn(200));
        r.budget = budget;
        r
    }

    #[test]
    fn scans_stop_once_the_session_budget_is_spent() {
        let mut r = resume(Duration::from_secs(5));
        r.spent = Duration::from_secs(3);
        // Time of failed scans counts too.
        r.store(
            "a",
            Err("broker transport failure".into()),
            Duration::from_secs(3),
        );
        assert!(r.spent >= Duration::from_secs(6), "{:?}", r.spent);
        assert!(r.knows("a"));
        // Over budget: no scan is started (none could be without a runtime), and the topic
        // counts as read back with nothing found, so its events are sent again.
        assert!(r.begin_scan("c").is_none());
        assert!(r.knows("c"));
        let position = Position {
            commit_lsn: 150,
            index: 0,
        };
        assert!(!r.delivered("c", position, Some(b"id"), b"k"));
        assert!(r.begin_scan("d").is_none());
        assert_eq!(r.skipped(), 0);
    }

    fn at(lsn: u64) -> Position {
        Position {
            commit_lsn: lsn,
            index: 0,
        }
    }

    fn found(r: &mut Resume, topic: &str, positions: &[u64]) {
        let found = positions
            .iter()
            .map(|&l| (at(l), Some(Box::from(format!("id{l}").as_bytes()))))
            .collect();
        r.topics.insert(
            topic.to_owned(),
            TopicMemory {
                found,
                ..TopicMemory::default()
            },
        );
    }

    fn ask(r: &mut Resume, topic: &str, lsn: u64, key: &str) -> bool {
        r.delivered(
            topic,
            at(lsn),
            Some(format!("id{lsn}").as_bytes()),
            key.as_bytes(),
        )
    }

    #[test]
    fn once_an_event_of_a_key_is_missing_its_later_events_are_sent_too() {
        let mut r = resume(Duration::from_secs(5));
        // The topic holds e2 and e3 of key A and e4 of key B, but not e1 of key A.
        found(&mut r, "t", &[120, 130, 140]);
        assert!(!ask(&mut r, "t", 110, "A"), "e1 is not in the topic");
        assert!(
            !ask(&mut r, "t", 120, "A"),
            "e2 was found, but skipping it would leave e1 after e2"
        );
        assert!(!ask(&mut r, "t", 130, "A"));
        assert!(ask(&mut r, "t", 140, "B"), "key B has no gap");
        assert_eq!(r.skipped(), 1);
    }

    #[test]
    fn past_the_newest_found_position_nothing_is_skipped_and_memory_is_released() {
        let mut r = resume(Duration::from_secs(5));
        found(&mut r, "t", &[110, 120, 130]);
        assert!(ask(&mut r, "t", 110, "A"));
        assert!(ask(&mut r, "t", 120, "B"));
        assert_eq!(r.held(), 2, "positions the stream passed are released");
        assert!(!ask(&mut r, "t", 125, "C"), "lost in flight");
        assert!(
            ask(&mut r, "t", 130, "A"),
            "key A's run is still contiguous"
        );
        assert!(
            !ask(&mut r, "t", 140, "B"),
            "past the newest found position"
        );
        // Even a position that was found earlier counts as gone once past the end.
        assert!(!ask(&mut r, "t", 130, "D"));
        assert_eq!(r.skipped(), 3);
    }

    #[test]
    fn too_many_keys_with_gaps_turn_the_whole_topic_to_sending() {
        let mut r = resume(Duration::from_secs(5));
        let last = 10 * (MAX_GAP_KEYS as u64 + 10);
        found(&mut r, "t", &[last]);
        for i in 0..MAX_GAP_KEYS as u64 + 1 {
            assert!(!ask(&mut r, "t", 10 + i, &format!("k{i}")));
        }
        assert!(r.topics["t"].gaps.len() <= MAX_GAP_KEYS);
        assert!(
            !ask(&mut r, "t", last, "fresh"),
            "the whole topic has a gap now"
        );
    }
}
