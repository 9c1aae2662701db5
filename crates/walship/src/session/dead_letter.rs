//! Dead letters: rows, messages and records that can never be events, parked with the reason.
//!
//! Owns deciding what a dead letter says (the original key and value, the reason, LSN, xid,
//! origin, and the event's source, position and id; [`walship_kafka::record`] shapes the
//! record) and sending it through the same sink and accounting as events.
//!
//! Invariant: a dead letter takes the place of the event it stands for in its transaction, so
//! the transaction is confirmed only once the dead letter is acknowledged; and one that an
//! earlier run already wrote (found by its position and id) is not written again. A dead
//! letter always fits: its value is cut to what the producer accepts (`message.max.bytes`
//! less the key, the headers and [`walship_kafka::record::RECORD_OVERHEAD`]), marked with
//! [`TRUNCATED_HEADER`]; one the producer or the broker refuses anyway is sent once more
//! without a value, and one refused even then stops the session ([`Error::DeadLetterRefused`])
//! before its transaction is confirmed — never a loop, never a skip.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pgoutput::Lsn;
use tokio_util::sync::CancellationToken;
use walship_kafka::headers::{Position, TRUNCATED_HEADER};
use walship_kafka::record::{self, Record};

use super::progress::TxnToken;
use super::seams::{EventSink, WalSource};
use super::{Session, Stop};
use crate::error::Error;

/// A row or record bound for the dead-letter topic, and where it came from.
pub(super) struct DeadLetter<'a> {
    pub(super) reason: &'a str,
    pub(super) key: Option<&'a [u8]>,
    pub(super) value: &'a [u8],
    /// The row's LSN (a rejected record: its transaction's commit LSN).
    pub(super) lsn: Lsn,
    pub(super) xid: u32,
    pub(super) commit_ms: i64,
    /// The event's position (resume looks it up in the dead-letter topic).
    pub(super) position: Option<Position>,
    pub(super) id: Option<&'a [u8]>,
    /// A logical message's prefix (header `walship.prefix`); `None` for a row (header
    /// `walship.table`).
    pub(super) prefix: Option<&'a str>,
}

impl<W: WalSource, K: EventSink> Session<W, K> {
    /// Publishes a row that cannot be delivered as an event to the dead-letter topic, with the
    /// reason, the row's LSN, xid and table, and the event's source, position and id headers
    /// (so a restart after a crash finds it there and does not dead-letter it again). `token`
    /// is set when the row's event was already counted in its transaction (a record the broker
    /// rejected after it was sent).
    pub(super) async fn dead_letter(
        &mut self,
        dead: DeadLetter<'_>,
        cancel: &CancellationToken,
        token: Option<TxnToken>,
    ) -> Result<(), Error> {
        let Some(topic) = self.settings.dead_letter_topic.clone() else {
            return Ok(());
        };
        // A rejected record (`token` set) belongs to a transaction whose other events may be
        // acknowledged already: finish it within the shutdown timeout rather than abandon it.
        if !self.ensure_topic(&topic, cancel, token.is_none()).await? {
            return Ok(());
        }
        let key = dead.key.unwrap_or_default();
        if let Some(position) = dead.position {
            match self
                .already_delivered(&topic, position, dead.id, key, cancel, token.is_none())
                .await?
            {
                None => return Ok(()),
                Some(true) => {
                    tracing::info!(lsn = %dead.lsn, xid = dead.xid, dead_letter_topic = %topic,
                        "an earlier run already dead-lettered this row; not sent again");
                    // A rejected record's event is complete: its dead letter is in Kafka.
                    if let Some(token) = token {
                        self.progress.settle(token);
                    }
                    return Ok(());
                }
                Some(false) => {}
            }
        }
        let table;
        let origin = match dead.prefix {
            Some(prefix) => record::Origin::Prefix(prefix),
            None => {
                table = self.relations.spec().table.to_string();
                record::Origin::Table(&table)
            }
        };
        let source = Arc::clone(&self.source_id);
        let timeline = self.timeline_text(dead.lsn);
        let letter = record::DeadLetter {
            key,
            value: dead.value,
            commit_ms: dead.commit_ms,
            reason: dead.reason,
            lsn: dead.lsn.0,
            xid: dead.xid,
            origin,
        };
        let stamp = record::Stamp {
            source: &source,
            position: dead.position,
            timeline: &timeline,
            id: dead.id,
        };
        let mut record = Record::dead_letter(&topic, letter, stamp);
        if let Some(cut) = record.fit(self.settings.max_record_bytes) {
            let (full, room) = (cut.full, cut.kept);
            tracing::warn!(lsn = %dead.lsn, xid = dead.xid, dead_letter_topic = %topic,
                "the dead letter's value is cut from {full} to {room} bytes to fit message.max.bytes ({}); header {TRUNCATED_HEADER} keeps the original size",
                self.settings.max_record_bytes);
        }
        tracing::warn!(lsn = %dead.lsn, xid = dead.xid, dead_letter_topic = %topic,
            "dead-lettering outbox row: {}", dead.reason);
        self.telemetry.dead_lettered.fetch_add(1, Ordering::Relaxed);
        // The producer may refuse it at once (larger than it accepts, whatever the estimate):
        // then once more without a value, and never again.
        loop {
            match self
                .send(&record, dead.lsn, dead.xid, dead.commit_ms, cancel, token)
                .await
            {
                Err(Error::Record { error, .. }) if record.payload != Some(b"") => {
                    tracing::warn!(lsn = %dead.lsn, xid = dead.xid, dead_letter_topic = %topic,
                        "the producer refused the dead letter ({error}); sending it without its value");
                    record.payload = Some(b"");
                }
                Err(Error::Record { error, .. }) => {
                    return Err(Error::DeadLetterRefused {
                        lsn: dead.lsn,
                        xid: dead.xid,
                        topic: topic.clone(),
                        error,
                    });
                }
                other => return other,
            }
        }
    }

    /// Dead-letters the records the broker rejected for good since the last call, with their
    /// transaction's xid, commit LSN and commit time.
    pub(super) async fn dead_letter_rejected(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        for (token, rejected) in self.progress.take_rejected() {
            if self.stop == Stop::Abandoned {
                // Their transactions stay incomplete: read again on the next start.
                break;
            }
            let origin = self.progress.origin(token).unwrap_or_default();
            if self.settings.dead_letter_topic.as_deref() == Some(rejected.topic.as_str())
                && rejected.payload_len == 0
            {
                // A dead letter without a value, refused by the broker: the last attempt.
                return Err(Error::DeadLetterRefused {
                    lsn: origin.commit_lsn,
                    xid: origin.xid,
                    topic: rejected.topic.clone(),
                    error: rejected.error.to_string(),
                });
            }
            let reason = format!(
                "{}; the record (key and {} bytes of value) was not accepted by topic {:?}",
                rejected.error, rejected.payload_len, rejected.topic
            );
            let key = rejected.key.clone();
            let id = rejected.id.clone();
            let dead = DeadLetter {
                reason: &reason,
                key: key.as_deref(),
                value: b"",
                lsn: origin.commit_lsn,
                xid: origin.xid,
                commit_ms: origin.commit_time_ms,
                position: rejected.position,
                id: id.as_deref(),
                prefix: None,
            };
            self.dead_letter(dead, cancel, Some(token)).await?;
        }
        Ok(())
    }
}
