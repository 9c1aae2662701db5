//! One streaming session: replication stream → decode → extract → produce, on one task.
//!
//! ```text
//!  fill() ─▶ try_next() ─▶ Decoder ─▶ Relations::extract ─▶ TopicRouter ─▶ Sink::send ──▶ broker
//!    ▲                                                                         │ ack (poll thread)
//!    └─ standby status (flush = Progress::safe_lsn) ◀── Progress ◀────────────┘
//! ```
//!
//! Invariants:
//! - Only committed transactions arrive here (protocol v1 without streaming decodes a
//!   transaction when it commits), so rows are produced as they arrive and only the LSN waits
//!   for the commit and the acks.
//! - The position reported to PostgreSQL is always [`Progress::safe_lsn`]: never a position
//!   whose events are not all acknowledged.
//! - When the producer queue is full the loop stops reading (TCP backpressure reaches the
//!   walsender) but keeps sending standby status, so `wal_sender_timeout` never fires. The same
//!   holds while an event waits for the broker (a topic check, a resume lookup), and a stop
//!   request does not wait for such a round trip.
//! - A transactional logical message with a configured prefix is an event like an outbox row:
//!   it takes the next index of its transaction's positions (rows and messages share one
//!   sequence, in WAL order) and goes through the same produce path. A non-transactional one
//!   with such a prefix is a bad row, never an event (it would be published even if its
//!   transaction rolled back).
//! - After an unclean stop, an event is left out only when [`Resume`] read back a record of this
//!   source with its position and outbox id from its topic; such an event is not counted in its
//!   transaction, so the transaction completes on the acks of the events actually sent.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pgoutput::{Begin, Decoder, LogicalMessage, Lsn, Message, PgTimestamp};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use walship_kafka::{
    ID_HEADER, POSITION_HEADER, Position, PositionText, Record, SOURCE_HEADER, SendError, Sink,
    TopicRouter,
};
use walship_postgres::{
    Frame, MessageError, MessageEvent, OutboxRow, PgError, Relations, ReplicationStream, RowError,
};

use crate::error::Error;
use crate::progress::{Progress, TxnOrigin, TxnToken};
use crate::resume::Resume;
use crate::telemetry::Telemetry;

/// Least time between two standby status updates that report a new position.
const MIN_STATUS_GAP: Duration = Duration::from_millis(2);
/// A broker round trip the stream waits for is logged once it takes this long.
const BROKER_WAIT_NOTICE: Duration = Duration::from_secs(5);

/// The transaction currently being decoded.
struct OpenTxn {
    begin: Begin,
    token: Option<TxnToken>,
    sent: u64,
    /// Outbox rows and messages seen so far: the next event's index in its [`Position`].
    rows: u32,
}

/// A row or record bound for the dead-letter topic, and where it came from.
struct DeadLetter<'a> {
    reason: &'a str,
    key: Option<&'a [u8]>,
    value: &'a [u8],
    /// The row's LSN (a rejected record: its transaction's commit LSN).
    lsn: Lsn,
    xid: u32,
    commit_ms: i64,
    /// The event's position (resume looks it up in the dead-letter topic).
    position: Option<Position>,
    id: Option<&'a [u8]>,
    /// A logical message's prefix (header `walship.prefix`); `None` for a row (header
    /// `walship.table`).
    prefix: Option<&'a str>,
}

/// Counters of one session, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionStats {
    /// Outbox events handed to the producer.
    pub events_sent: u64,
    /// Committed transactions seen.
    pub transactions: u64,
}

/// A streaming session's state.
pub struct Session {
    pub(crate) stream: ReplicationStream,
    pub(crate) decoder: Decoder,
    pub(crate) relations: Relations,
    pub(crate) router: TopicRouter,
    pub(crate) sink: Sink<Progress>,
    pub(crate) progress: Arc<Progress>,
    pub(crate) status_interval: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) max_in_flight: u64,
    /// Most transactions tracked (see [`Progress::pending_transactions`]).
    pub(crate) max_pending: u64,
    pub(crate) telemetry: Arc<Telemetry>,
    /// `Some(topic)` with the dead-letter policy for bad rows; `None` to fail on them.
    pub(crate) dead_letter_topic: Option<String>,
    /// Value of the `walship.source` header: who wrote the record.
    pub(crate) source: Arc<str>,
    /// Set after a start that may follow an unclean stop, until the stream passes what an
    /// earlier run can have delivered.
    pub(crate) resume: Option<Resume>,
    /// A management connection, to place a relation the session's outbox scope does not
    /// know (see [`walship_postgres::catalog`]); `None`: such relations stay unplaced.
    pub(crate) catalog: Option<tokio_postgres::Client>,
    /// Prefixes of logical messages that are outbox events (`outbox.message_prefixes`).
    pub(crate) message_prefixes: Vec<String>,
    txn: Option<OpenTxn>,
    last_reported: Lsn,
    last_status_at: Instant,
    stats: SessionStats,
    /// Set once cancellation is seen: finish the open transaction by then.
    stop_deadline: Option<Instant>,
    /// The open transaction could not be finished; stop without sealing it.
    abandoned: bool,
}

impl Session {
    /// Wires a started stream to a sink. Contains no processing logic.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: ReplicationStream,
        relations: Relations,
        router: TopicRouter,
        sink: Sink<Progress>,
        progress: Arc<Progress>,
        status_interval: Duration,
        shutdown_timeout: Duration,
        max_in_flight: u64,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Session {
            stream,
            decoder: Decoder::new(1),
            relations,
            router,
            sink,
            last_reported: progress.safe_lsn(),
            progress,
            status_interval,
            shutdown_timeout,
            max_in_flight: max_in_flight.max(2),
            max_pending: crate::config::DEFAULT_MAX_PENDING_TRANSACTIONS,
            telemetry,
            dead_letter_topic: None,
            source: Arc::from(""),
            resume: None,
            catalog: None,
            message_prefixes: Vec::new(),
            txn: None,
            last_status_at: Instant::now(),
            stats: SessionStats::default(),
            stop_deadline: None,
            abandoned: false,
        }
    }

    /// Streams until `cancel` fires (then drains and confirms) or an error occurs.
    ///
    /// On cancellation the transaction being decoded is finished first (bounded by the shutdown
    /// timeout), so a graceful stop leaves nothing half-sent to be duplicated on restart.
    pub async fn run(mut self, cancel: &CancellationToken) -> Result<SessionStats, Error> {
        loop {
            // Checked once per read buffer, not per message: `is_cancelled` takes a lock.
            let stopping = self.stop_deadline.is_some() || cancel.is_cancelled();
            while let Some(frame) = self.stream.try_next()? {
                self.handle(frame, cancel).await?;
                // `stop_deadline` is set mid-buffer when a wait saw the stop request.
                if self.abandoned
                    || ((stopping || self.stop_deadline.is_some()) && self.txn.is_none())
                {
                    return self.shutdown().await;
                }
            }
            self.check_failure()?;
            self.dead_letter_rejected(cancel).await?;
            if self.abandoned {
                return self.shutdown().await;
            }
            if cancel.is_cancelled() && self.stop_deadline.is_none() {
                if self.txn.is_none() {
                    return self.shutdown().await;
                }
                self.stop_deadline = Some(Instant::now() + self.shutdown_timeout);
            }
            if self.stop_deadline.is_some_and(|d| Instant::now() >= d) {
                return self.shutdown().await;
            }
            if Instant::now() >= self.status_due() {
                self.report(false).await?;
            }
            let due = self.status_due();
            let wake = self.stop_deadline.map_or(due, |d| d.min(due));
            let stopping = self.stop_deadline.is_some();
            let nothing_to_report = self.progress.safe_lsn() <= self.last_reported;
            let progress = Arc::clone(&self.progress);
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if !stopping => {}
                r = self.stream.fill() => r?,
                // Idle and caught up: report a newly safe position promptly, not a whole
                // status interval later.
                _ = progress.wait_for_advance(self.last_reported), if nothing_to_report => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn handle(&mut self, frame: Frame, cancel: &CancellationToken) -> Result<(), Error> {
        match frame {
            Frame::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                // Everything before wal_end has been sent to us and processed; outside a
                // transaction nothing of it is pending here, so an idle or filtered stream can
                // confirm it (after any earlier transactions are acknowledged).
                if self.txn.is_none() {
                    self.progress.complete_empty(wal_end);
                    // Past everything an earlier run can have sent: release the scanner's
                    // connections now rather than at the next transaction.
                    if self.resume.as_ref().is_some_and(|r| !r.covers(wal_end)) {
                        self.end_resume();
                    }
                }
                if reply_requested || self.progress.safe_lsn() > self.last_reported {
                    self.report(reply_requested).await?;
                }
                Ok(())
            }
            Frame::XLogData {
                wal_start, data, ..
            } => {
                let msg = self.decoder.decode(data).map_err(|error| PgError::Decode {
                    lsn: wal_start,
                    error,
                })?;
                self.handle_message(msg, wal_start, cancel).await
            }
        }
    }

    async fn handle_message(
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
                    Err(e) if e.is_bad_row() && self.dead_letter_topic.is_some() => {
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
    fn next_event(&mut self, what: &str, lsn: Lsn) -> Result<(u32, i64, Position), Error> {
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
    async fn handle_logical_message(
        &mut self,
        message: LogicalMessage,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        if !self.message_prefixes.contains(&message.prefix) {
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
            Err(e) if e.is_bad_row() && self.dead_letter_topic.is_some() => {
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
    async fn nontransactional_message(
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
        if self.dead_letter_topic.is_none() {
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
            && !self.abandoned
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
    async fn place_relation(&mut self, oid: u32, lsn: Lsn) -> Result<(), Error> {
        let (Some(client), Some(root)) = (&self.catalog, self.relations.outbox_oid()) else {
            return Ok(());
        };
        let table = self.relations.spec().table.clone();
        let placed = walship_postgres::catalog::place_relation(client, oid, root, &table).await?;
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
    async fn produce(
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
        // The usual headers live on the stack; only extra header columns need a Vec.
        let mut text = PositionText::default();
        let source = Arc::clone(&self.source);
        let mut fixed: [(&str, Option<&[u8]>); 4] = [
            (SOURCE_HEADER, Some(source.as_bytes())),
            (POSITION_HEADER, Some(position.encode(&mut text))),
            ("", None),
            ("", None),
        ];
        let mut n = 2;
        for (name, value) in [(ID_HEADER, row.id), ("type", row.event_type)] {
            if value.is_some() {
                fixed[n] = (name, value);
                n += 1;
            }
        }
        let extended: Vec<(&str, Option<&[u8]>)>;
        let headers: &[(&str, Option<&[u8]>)] = if row.headers.is_empty() {
            &fixed[..n]
        } else {
            extended = fixed[..n]
                .iter()
                .copied()
                .chain(row.headers.iter().map(|(k, v)| (k.as_ref(), *v)))
                .collect();
            &extended
        };
        let record = Record {
            topic: &topic,
            key: row.aggregate_id,
            payload: row.payload.as_deref(),
            headers,
            timestamp_ms: Some(commit_ms),
        };
        self.send(&record, lsn, xid, commit_ms, cancel, None).await
    }

    /// After an unclean stop: whether an earlier run already put the event at `position` into
    /// `topic` (reading the topic back first if this session has not yet). `Some(false)` when
    /// it is to be sent (always outside a resume), `None` when a stop abandoned the session
    /// meanwhile.
    async fn already_delivered(
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
            if let Some(scan) = resume.scan(topic) {
                let what = format!("reading topic {topic:?} back to resume");
                let Some(joined) = self.await_broker(&what, scan, cancel, abandonable).await?
                else {
                    return Ok(None);
                };
                if let Some(resume) = self.resume.as_mut() {
                    resume.store(topic, joined, started);
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

    /// Publishes a row that cannot be delivered as an event to the dead-letter topic, with the
    /// reason, the row's LSN, xid and table, and the event's source, position and id headers
    /// (so a restart after a crash finds it there and does not dead-letter it again). `token`
    /// is set when the row's event was already counted in its transaction (a record the broker
    /// rejected after it was sent).
    async fn dead_letter(
        &mut self,
        dead: DeadLetter<'_>,
        cancel: &CancellationToken,
        token: Option<TxnToken>,
    ) -> Result<(), Error> {
        let Some(topic) = self.dead_letter_topic.clone() else {
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
        let lsn_text = dead.lsn.to_string();
        let xid_text = dead.xid.to_string();
        let (origin_header, origin) = match dead.prefix {
            Some(prefix) => ("walship.prefix", prefix.to_owned()),
            None => ("walship.table", self.relations.spec().table.to_string()),
        };
        let mut text = PositionText::default();
        let source = Arc::clone(&self.source);
        let mut headers: [(&str, Option<&[u8]>); 7] = [
            ("walship.error", Some(dead.reason.as_bytes())),
            ("walship.lsn", Some(lsn_text.as_bytes())),
            ("walship.xid", Some(xid_text.as_bytes())),
            (origin_header, Some(origin.as_bytes())),
            (SOURCE_HEADER, Some(source.as_bytes())),
            ("", None),
            ("", None),
        ];
        let mut n = 5;
        if let Some(position) = dead.position {
            headers[n] = (POSITION_HEADER, Some(position.encode(&mut text)));
            n += 1;
        }
        if let Some(id) = dead.id {
            headers[n] = (ID_HEADER, Some(id));
            n += 1;
        }
        let record = Record {
            topic: &topic,
            key,
            payload: Some(dead.value),
            headers: &headers[..n],
            timestamp_ms: Some(dead.commit_ms),
        };
        tracing::warn!(lsn = %dead.lsn, xid = dead.xid, dead_letter_topic = %topic,
            "dead-lettering outbox row: {}", dead.reason);
        self.telemetry.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.send(&record, dead.lsn, dead.xid, dead.commit_ms, cancel, token)
            .await
    }

    /// Dead-letters the records the broker rejected for good since the last call, with their
    /// transaction's xid, commit LSN and commit time.
    async fn dead_letter_rejected(&mut self, cancel: &CancellationToken) -> Result<(), Error> {
        for (token, rejected) in self.progress.take_rejected() {
            if self.abandoned {
                // Their transactions stay incomplete: read again on the next start.
                break;
            }
            let reason = format!(
                "{}; the record (key and {} bytes of value) was not accepted by topic {:?}",
                rejected.error, rejected.payload_len, rejected.topic
            );
            let origin = self.progress.origin(token).unwrap_or_default();
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

    /// Hands a record to the producer, waiting for room (backpressure) when the in-flight window
    /// or librdkafka's queue is full. With `token` unset the record is a new event of the open
    /// transaction; with `token` set it replaces an already counted event of that transaction.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        record: &Record<'_>,
        lsn: Lsn,
        xid: u32,
        commit_ms: i64,
        cancel: &CancellationToken,
        token: Option<TxnToken>,
    ) -> Result<(), Error> {
        let replaces = token.is_some();
        let mut token = token.or_else(|| self.txn.as_ref().and_then(|t| t.token));
        loop {
            // A new transaction adds an entry to the tracker: only below the pending bound.
            let room = self.progress.in_flight() < self.max_in_flight
                && (token.is_some() || self.progress.pending_transactions() < self.max_pending);
            if room {
                let t = match token {
                    Some(t) => t,
                    None => {
                        let origin = TxnOrigin {
                            xid,
                            commit_lsn: self.txn.as_ref().map_or(lsn, |t| t.begin.final_lsn),
                            commit_time_ms: commit_ms,
                        };
                        let t = self.progress.open(origin);
                        if let Some(txn) = self.txn.as_mut() {
                            txn.token = Some(t);
                        }
                        token = Some(t);
                        t
                    }
                };
                match self.sink.send(record, t as usize) {
                    Ok(()) => {
                        self.progress.note_sent();
                        break;
                    }
                    Err(SendError::QueueFull) => {}
                    Err(SendError::Rejected { topic, error }) => {
                        let class = walship_kafka::sink::classify(&error);
                        self.telemetry.count_error(class);
                        return Err(match class {
                            walship_kafka::ErrorClass::Transient => {
                                Error::Delivery(walship_kafka::DeliveryError {
                                    topic,
                                    partition: -1,
                                    key: None,
                                    payload_len: 0,
                                    position: None,
                                    id: None,
                                    error,
                                })
                            }
                            walship_kafka::ErrorClass::Record => Error::Record {
                                lsn,
                                xid,
                                topic,
                                error: error.to_string(),
                            },
                            walship_kafka::ErrorClass::Fatal => Error::Producer(format!(
                                "record at LSN {lsn} for topic {topic:?}: {error}"
                            )),
                        });
                    }
                }
            }
            // Backpressure: stop reading until half the in-flight window is acknowledged, but
            // keep the walsender informed so it does not time us out.
            self.check_failure()?;
            if cancel.is_cancelled() && self.stop_deadline.is_none() {
                self.stop_deadline = Some(Instant::now() + self.shutdown_timeout);
            }
            if self.stop_deadline.is_some_and(|d| Instant::now() >= d) {
                // Out of time: this event was not sent. Its transaction is never sealed, so the
                // confirmed position stays before it and the whole transaction is read again
                // on the next start.
                self.abandoned = true;
                return Ok(());
            }
            if Instant::now() >= self.status_due() {
                self.report(false).await?;
            }
            // A record the broker refused keeps its transaction pending until its dead letter
            // is sent; waiting for pending room meanwhile would wait for ever.
            if token.is_none() && self.progress.has_rejected() {
                Box::pin(self.dead_letter_rejected(cancel)).await?;
                continue;
            }
            // Waiting for the pending bound: wake once the oldest transactions complete.
            let pending_low = token.is_none().then(|| self.max_pending.saturating_sub(1));
            self.progress
                .wait_for_room(
                    self.max_in_flight / 2,
                    pending_low,
                    Duration::from_millis(100),
                )
                .await;
        }
        if !replaces {
            if let Some(txn) = self.txn.as_mut() {
                txn.sent += 1;
            }
            self.stats.events_sent += 1;
        }
        Ok(())
    }

    /// Makes sure `topic` exists (creating it if configured to) before its first record. False
    /// when a stop abandoned the session meanwhile (see [`Session::await_broker`]).
    async fn ensure_topic(
        &mut self,
        topic: &str,
        cancel: &CancellationToken,
        abandonable: bool,
    ) -> Result<bool, Error> {
        let Some(check) = self.sink.check_topic(topic) else {
            return Ok(true);
        };
        let what = format!("checking that topic {topic:?} exists");
        let Some(checked) = self.await_broker(&what, check, cancel, abandonable).await? else {
            return Ok(false);
        };
        checked?;
        self.sink.topic_exists(topic);
        Ok(true)
    }

    /// Waits for `work` (a broker round trip an event must wait for: a topic check, a resume
    /// lookup) while sending standby status, so `wal_sender_timeout` never fires.
    ///
    /// A stop request does not wait for the broker: when `abandonable` and nothing of the open
    /// transaction was sent yet, the session is abandoned at once; otherwise `work` gets until
    /// the shutdown timeout to finish the transaction. `None` when abandoned (the transaction
    /// stays unsealed, so the confirmed position stays before it and it is read again on the
    /// next start).
    async fn await_broker<T>(
        &mut self,
        what: &str,
        work: impl Future<Output = T>,
        cancel: &CancellationToken,
        abandonable: bool,
    ) -> Result<Option<T>, Error> {
        let nothing_sent = abandonable && self.txn.as_ref().is_none_or(|t| t.sent == 0);
        if nothing_sent && (self.stop_deadline.is_some() || cancel.is_cancelled()) {
            return Ok(self.abandon());
        }
        tokio::pin!(work);
        let notice = tokio::time::sleep(BROKER_WAIT_NOTICE);
        tokio::pin!(notice);
        let mut noticed = false;
        loop {
            let deadline = self.stop_deadline;
            tokio::select! {
                out = &mut work => return Ok(Some(out)),
                () = &mut notice, if !noticed => {
                    noticed = true;
                    tracing::warn!(
                        "waiting {} s for the broker ({what}); the replication stream waits too",
                        BROKER_WAIT_NOTICE.as_secs()
                    );
                }
                _ = cancel.cancelled(), if deadline.is_none() => {
                    if nothing_sent {
                        return Ok(self.abandon());
                    }
                    self.stop_deadline = Some(Instant::now() + self.shutdown_timeout);
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                    if deadline.is_some() => return Ok(self.abandon()),
                _ = tokio::time::sleep(self.status_interval) => self.report(false).await?,
            }
        }
    }

    /// Gives up the open transaction on the way to a stop; see [`Session::await_broker`].
    fn abandon<T>(&mut self) -> Option<T> {
        let lsn = self.txn.as_ref().map(|t| t.begin.final_lsn);
        tracing::info!(
            commit_lsn = ?lsn,
            "stopping without waiting for the broker: the transaction being read stays \
             unconfirmed and is read again on the next start"
        );
        self.abandoned = true;
        None
    }

    /// The stream is past everything an earlier run can have sent: forget its deliveries.
    fn end_resume(&mut self) {
        if let Some(resume) = self.resume.take()
            && resume.skipped() > 0
        {
            tracing::info!(
                skipped = resume.skipped(),
                "resumed: {} events an earlier run had already delivered were not sent again",
                resume.skipped()
            );
        }
    }

    fn check_failure(&self) -> Result<(), Error> {
        if self.progress.has_failed()
            && let Some(f) = self.progress.take_failure()
        {
            return Err(Error::Delivery(f));
        }
        Ok(())
    }

    /// When the next standby status is due: soon after the safe position moved (at most one
    /// every [`MIN_STATUS_GAP`]), else after the configured interval as a heartbeat.
    fn status_due(&self) -> Instant {
        if self.progress.safe_lsn() > self.last_reported {
            self.last_status_at + MIN_STATUS_GAP
        } else {
            self.last_status_at + self.status_interval
        }
    }

    async fn report(&mut self, reply_requested: bool) -> Result<(), Error> {
        let safe = self.progress.safe_lsn();
        self.stream.send_status(safe, reply_requested).await?;
        self.last_reported = safe;
        self.last_status_at = Instant::now();
        self.telemetry.safe_lsn.store(safe.0, Ordering::Relaxed);
        self.telemetry
            .in_flight
            .store(self.progress.in_flight(), Ordering::Relaxed);
        Ok(())
    }

    /// Stops reading, waits for acknowledgements, confirms the final safe position.
    async fn shutdown(mut self) -> Result<SessionStats, Error> {
        let left = self.sink.flush(self.shutdown_timeout).await;
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "shutdown: {left} records not acknowledged within run.shutdown_timeout_ms; they stay \
                 unconfirmed and will be sent again on the next start"
            );
        }
        self.check_failure()?;
        let safe = self.progress.safe_lsn();
        self.stream.send_status(safe, false).await?;
        self.telemetry.safe_lsn.store(safe.0, Ordering::Relaxed);
        self.stream.finish().await?;
        tracing::info!(confirmed_lsn = %safe, events = self.stats.events_sent, "stopped; slot confirmed");
        Ok(self.stats)
    }
}
