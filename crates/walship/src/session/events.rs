//! The session's event path: pgoutput messages in, records to the sink out.
//!
//! Owns turning each decoded message into what the session does with it — open or seal a
//! transaction, place a relation, extract an outbox row or parse a logical message, route it,
//! skip it when an earlier run already delivered it, and hand the record to the sink.
//!
//! Invariant: every outbox row and every transactional message with a configured prefix takes
//! the next index of its transaction's positions (one sequence, in WAL order) and ends as
//! exactly one of: a record handed to the sink, a dead letter, a skip that [`super::resume::Resume`] proved,
//! or an error that stops the session before its transaction is confirmed.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pgoutput::{Begin, LogicalMessage, Lsn, Message, PgTimestamp};
use tokio_util::sync::CancellationToken;
use walship_kafka::headers::Position;
use walship_kafka::record::{self, PayloadKind, Placement, Record, TraceContext};
use walship_postgres::{MessageError, MessageEvent, OutboxRow, PayloadType, PgError, RowError};

use super::dead_letter::DeadLetter;
use super::seams::{EventSink, WalSource};
use super::{OpenTxn, Session, Stop};
use crate::error::Error;

/// Most one warning about malformed trace contexts per this interval.
const TRACE_WARNING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl<W: WalSource, K: EventSink> Session<W, K> {
    pub(super) async fn handle_message(
        &mut self,
        msg: Message,
        lsn: Lsn,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        match msg {
            Message::Begin(begin) => {
                if self
                    .resume
                    .as_ref()
                    .is_some_and(|r| !r.covers(begin.final_lsn))
                {
                    self.end_resume();
                }
                self.txn = Some(OpenTxn {
                    begin,
                    token: None,
                    sent: 0,
                    rows: 0,
                });
            }
            Message::Commit(commit) => {
                let txn = self
                    .txn
                    .take()
                    .ok_or_else(|| PgError::Protocol(format!("Commit at {lsn} without Begin")))?;
                match txn.token {
                    Some(token) => self.progress.seal(token, txn.sent, commit.end_lsn),
                    None => self.progress.complete_empty(commit.end_lsn),
                }
                self.stats.transactions += 1;
                self.telemetry.transactions.fetch_add(1, Ordering::Relaxed);
            }
            Message::Relation(rel) => {
                if let walship_postgres::Placement::Lookup(oid) = self.relations.update(rel) {
                    self.place_relation(oid, lsn).await?;
                }
            }
            Message::Insert(insert) if self.relations.is_outbox(insert.relation_id) => {
                let (xid, commit_ms, position) = self.next_event("Insert", lsn)?;
                let outcome = match self.relations.extract(insert.relation_id, &insert.tuple) {
                    Err(error) => Err(Error::Row { lsn, xid, error }),
                    Ok(row) => {
                        self.produce(&row, position, lsn, xid, commit_ms, cancel)
                            .await
                    }
                };
                match outcome {
                    Err(e) if e.is_bad_row() && self.settings.dead_letter_topic.is_some() => {
                        // A row the broker cannot take for its size would not fit as JSON either:
                        // then the dead letter carries the key and the reason only.
                        let value = if matches!(e, Error::Record { .. }) {
                            String::new()
                        } else {
                            self.relations.row_json(insert.relation_id, &insert.tuple)
                        };
                        let row = self
                            .relations
                            .extract(insert.relation_id, &insert.tuple)
                            .ok();
                        let key = row.as_ref().map(|r| r.aggregate_id.to_vec());
                        let id = row.as_ref().and_then(|r| r.id.map(<[u8]>::to_vec));
                        let reason = e.to_string();
                        let dead = DeadLetter {
                            reason: &reason,
                            key: key.as_deref(),
                            value: value.as_bytes(),
                            lsn,
                            xid,
                            commit_ms,
                            position: Some(position),
                            id: id.as_deref(),
                            prefix: None,
                        };
                        self.dead_letter(dead, cancel, None).await?;
                    }
                    other => other?,
                }
            }
            Message::Insert(insert) => {
                // Other tables in the publication: not outbox events. Unknown relations are a
                // protocol violation, not something to skip.
                let (xid, commit_lsn) = self
                    .txn
                    .as_ref()
                    .map_or((0, lsn), |t| (t.begin.xid, t.begin.final_lsn));
                self.relations
                    .target(insert.relation_id)
                    .map_err(|mut error| {
                        // The relations cannot know the transaction the row is in; its fix names it.
                        if let RowError::Unplaced { commit_lsn: c, .. } = &mut error {
                            *c = commit_lsn.to_string();
                        }
                        Error::Row { lsn, xid, error }
                    })?;
            }
            // Updates and deletes of outbox rows are ignored by design (insert-then-delete);
            // the rest carries nothing walship publishes.
            Message::Update(_)
            | Message::Delete(_)
            | Message::Truncate(_)
            | Message::Type(_)
            | Message::Origin(_) => {}
            Message::Message(message) => self.handle_logical_message(message, cancel).await?,
            other => {
                return Err(PgError::Protocol(format!(
                    "unexpected {other:?} at {lsn}: walship does not request streaming or two-phase decoding"
                ))
                .into());
            }
        }
        Ok(())
    }

    /// Claims the next event of the open transaction (a row or a message, in WAL order): its
    /// xid, commit time and position. `what` names the message for a protocol error.
    pub(super) fn next_event(
        &mut self,
        what: &str,
        lsn: Lsn,
    ) -> Result<(u32, i64, Position), Error> {
        let Some(txn) = self.txn.as_mut() else {
            return Err(PgError::Protocol(format!("{what} at {lsn} outside a transaction")).into());
        };
        let position = Position {
            commit_lsn: txn.begin.final_lsn.0,
            index: txn.rows,
        };
        txn.rows += 1;
        Ok((txn.begin.xid, txn.begin.commit_time.unix_millis(), position))
    }

    /// A logical decoding message: an outbox event when its prefix is configured and it is
    /// transactional (see the module's invariants); otherwise ignored.
    pub(super) async fn handle_logical_message(
        &mut self,
        message: LogicalMessage,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        if !self.settings.message_prefixes.contains(&message.prefix) {
            // Another application's messages, walship's heartbeat: not events.
            return Ok(());
        }
        let lsn = message.lsn;
        if !message.is_transactional() {
            return self.nontransactional_message(&message, cancel).await;
        }
        let (xid, commit_ms, position) = self.next_event("transactional message", lsn)?;
        let parsed = MessageEvent::parse(self.relations.spec(), &message.content);
        let outcome = match &parsed {
            Err(error) => Err(Error::Message {
                lsn,
                prefix: message.prefix.clone(),
                xid: Some(xid),
                error: error.clone(),
            }),
            Ok(event) => {
                self.produce(&event.row(), position, lsn, xid, commit_ms, cancel)
                    .await
            }
        };
        match outcome {
            Err(e) if e.is_bad_row() && self.settings.dead_letter_topic.is_some() => {
                // The content is the value (key and reason only for one too large for the
                // broker), with the key and id when the content has them.
                let value: &[u8] = if matches!(e, Error::Record { .. }) {
                    b""
                } else {
                    &message.content
                };
                let row = parsed.as_ref().ok().map(MessageEvent::row);
                let reason = e.to_string();
                let dead = DeadLetter {
                    reason: &reason,
                    key: row.as_ref().map(|r| r.aggregate_id),
                    value,
                    lsn,
                    xid,
                    commit_ms,
                    position: Some(position),
                    id: row.as_ref().and_then(|r| r.id),
                    prefix: Some(&message.prefix),
                };
                self.dead_letter(dead, cancel, None).await
            }
            other => other,
        }
    }

    /// A non-transactional message with an outbox prefix: a bad row. With protocol v1 it
    /// arrives outside any transaction (PostgreSQL sends it when it decodes it), so under
    /// the dead-letter policy its dead letter is tracked as a transaction of its own that ends
    /// where the message's WAL record ends.
    pub(super) async fn nontransactional_message(
        &mut self,
        message: &LogicalMessage,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let lsn = message.lsn;
        let error = Error::Message {
            lsn,
            prefix: message.prefix.clone(),
            xid: None,
            error: MessageError::NonTransactional,
        };
        if self.settings.dead_letter_topic.is_none() {
            return Err(error);
        }
        let reason = error.to_string();
        let own_txn = self.txn.is_none();
        if own_txn {
            self.txn = Some(OpenTxn {
                begin: Begin {
                    final_lsn: lsn,
                    commit_time: PgTimestamp::now(),
                    xid: 0,
                },
                token: None,
                sent: 0,
                rows: 0,
            });
        }
        let (xid, commit_ms) = self
            .txn
            .as_ref()
            .map_or((0, 0), |t| (t.begin.xid, t.begin.commit_time.unix_millis()));
        let dead = DeadLetter {
            reason: &reason,
            key: None,
            value: &message.content,
            lsn,
            xid,
            commit_ms,
            // Not an event of any transaction: no position to look up after a crash.
            position: None,
            id: None,
            prefix: Some(&message.prefix),
        };
        self.dead_letter(dead, cancel, None).await?;
        if own_txn
            && self.stop != Stop::Abandoned
            && let Some(txn) = self.txn.take()
        {
            // A message's LSN is the end of its WAL record (what pg_logical_emit_message
            // returns): confirming it passes this message (PostgreSQL skips a
            // non-transactional message whose record starts before the confirmed position)
            // and nothing that follows.
            match txn.token {
                Some(token) => self.progress.seal(token, txn.sent, lsn),
                None => self.progress.complete_empty(lsn),
            }
        }
        Ok(())
    }

    /// Asks the catalog whether relation `oid` is in the outbox's partition tree.
    pub(super) async fn place_relation(&mut self, oid: u32, lsn: Lsn) -> Result<(), Error> {
        let Some(root) = self.relations.outbox_oid() else {
            return Ok(());
        };
        let table = self.relations.spec().table.clone();
        let placed = self.source.place_relation(oid, root, &table).await?;
        match &placed {
            Some((name, true)) => {
                tracing::info!(%lsn, relation = %name, oid, "a partition of the outbox: its rows are events");
            }
            _ => tracing::warn!(
                %lsn,
                oid,
                "relation {oid} has the outbox's columns but is not under the outbox now; its rows \
                 stop walship before they are confirmed"
            ),
        }
        self.relations
            .place(oid, placed.is_some_and(|(_, member)| member));
        Ok(())
    }

    /// Routes and sends one outbox row. A row that can never become a record is an error for
    /// which [`Error::is_bad_row`] holds.
    pub(super) async fn produce(
        &mut self,
        row: &OutboxRow<'_>,
        position: Position,
        lsn: Lsn,
        xid: u32,
        commit_ms: i64,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let topic = self
            .router
            .route(row.aggregate_type)
            .map_err(|error| Error::Route { lsn, xid, error })?
            .clone();
        if !self.ensure_topic(&topic, cancel, true).await? {
            return Ok(());
        }
        match self
            .already_delivered(&topic, position, row.id, row.aggregate_id, cancel, true)
            .await?
        {
            None | Some(true) => return Ok(()),
            Some(false) => {}
        }
        let source = Arc::clone(&self.source_id);
        let timeline = self.timeline_text(Lsn(position.commit_lsn));
        let (trace, problem) = TraceContext::check(row.traceparent, row.tracestate);
        if let Some(problem) = problem {
            // The writer's hint only: the event is published without it. One warning per
            // TRACE_WARNING_INTERVAL at most (a writer that gets it wrong gets it wrong on every
            // event); the counter counts each.
            self.telemetry
                .trace_context_dropped
                .fetch_add(1, Ordering::Relaxed);
            self.trace_dropped_unwarned += 1;
            let now = std::time::Instant::now();
            if self
                .trace_warned
                .is_none_or(|at| now.duration_since(at) >= TRACE_WARNING_INTERVAL)
            {
                let dropped = std::mem::take(&mut self.trace_dropped_unwarned);
                tracing::warn!(
                    %lsn,
                    xid,
                    %position,
                    dropped,
                    "{problem} (the event is published without it; `dropped` counts the malformed \
                     values since the last such warning)"
                );
                self.trace_warned = Some(now);
            }
        }
        // Further columns: headers of their own name unless outbox.additional_placement says
        // otherwise.
        let placed;
        let (columns, envelope, partition) = if self.placements_plain {
            (&row.headers[..], &[][..], None)
        } else {
            placed = self.place(row, lsn, xid)?;
            (&placed.0[..], &placed.1[..], placed.2)
        };
        let payload = row
            .payload
            .as_deref()
            .filter(|p| !(self.settings.tombstone_on_empty_payload && p.is_empty()));
        let event = record::Event {
            key: row.aggregate_id,
            payload,
            commit_ms: row.timestamp_ms.unwrap_or(commit_ms),
            event_type: row.event_type,
            columns,
            envelope,
            partition,
            aggregate_type: row.aggregate_type,
            payload_kind: match row.payload_type {
                PayloadType::Json => PayloadKind::Json,
                PayloadType::Text => PayloadKind::Text,
                PayloadType::Bytea => PayloadKind::Binary,
            },
            trace,
        };
        let stamp = record::Stamp {
            source: &source,
            position: Some(position),
            timeline: &timeline,
            id: row.id,
        };
        let format = Arc::clone(&self.format);
        let mut scratch = std::mem::take(&mut self.scratch);
        let record = Record::shaped(&topic, event, stamp, &format, &mut scratch)
            .map_err(|error| Error::Shape { lsn, xid, error })?;
        let sent = self.send(&record, lsn, xid, commit_ms, cancel, None).await;
        drop(record);
        self.scratch = scratch;
        sent
    }

    /// Splits a row's further columns by `settings.placements`: headers (under their names),
    /// envelope fields, and the partition (a bad row when it is not a number).
    #[allow(clippy::type_complexity)]
    fn place<'r>(
        &self,
        row: &OutboxRow<'r>,
        lsn: Lsn,
        xid: u32,
    ) -> Result<
        (
            Vec<(Arc<str>, Option<&'r [u8]>)>,
            Vec<(Arc<str>, Option<&'r [u8]>)>,
            Option<i32>,
        ),
        Error,
    > {
        let mut headers = Vec::with_capacity(row.headers.len());
        let mut envelope = Vec::new();
        let mut partition = None;
        for (placement, (column, value)) in self.settings.placements.iter().zip(&row.headers) {
            match placement {
                Placement::Header(name) => headers.push((Arc::clone(name), *value)),
                Placement::Envelope(name) => envelope.push((Arc::clone(name), *value)),
                Placement::Partition => {
                    let number = value
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| v.trim().parse::<i32>().ok())
                        .filter(|p| *p >= 0);
                    partition = Some(number.ok_or_else(|| Error::Placement {
                        lsn,
                        xid,
                        column: column.to_string(),
                        value: value.map_or_else(
                            || "NULL".to_owned(),
                            |v| String::from_utf8_lossy(&v[..v.len().min(64)]).into_owned(),
                        ),
                    })?);
                }
            }
        }
        Ok((headers, envelope, partition))
    }

    /// After an unclean stop: whether an earlier run already put the event at `position` into
    /// `topic` (reading the topic back first if this session has not yet). `Some(false)` when
    /// it is to be sent (always outside a resume), `None` when a stop abandoned the session
    /// meanwhile.
    pub(super) async fn already_delivered(
        &mut self,
        topic: &str,
        position: Position,
        id: Option<&[u8]>,
        key: &[u8],
        cancel: &CancellationToken,
        abandonable: bool,
    ) -> Result<Option<bool>, Error> {
        let Some(resume) = self.resume.as_mut() else {
            return Ok(Some(false));
        };
        if !resume.knows(topic) {
            // Read the topic back before deciding whether to send the event.
            let started = std::time::Instant::now();
            if let Some(limit) = resume.begin_scan(topic) {
                let scan = self
                    .sink
                    .read_back(topic, &self.source_id, resume.since(), limit);
                let what = format!("reading topic {topic:?} back to resume");
                let Some(found) = self.await_broker(&what, scan, cancel, abandonable).await? else {
                    return Ok(None);
                };
                if let Ok(found) = &found {
                    self.check_history(topic, found)?;
                }
                if let Some(resume) = self.resume.as_mut() {
                    resume.store(topic, found.map_err(|e| e.message), started.elapsed());
                }
            }
        }
        let skip = self
            .resume
            .as_mut()
            .is_some_and(|r| r.delivered(topic, position, id, key));
        if skip {
            self.telemetry
                .resume_skipped
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(skip))
    }
}
