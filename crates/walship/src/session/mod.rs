//! One streaming session: WAL source → decode → extract → route → event sink, on one task.
//!
//! Owns one session's state — the open transaction, the stop state, when status was last
//! reported — and the loop that drives it. The I/O sits behind the two seams of [`seams`]: a
//! [`WalSource`] (frames in, standby status out; [`PgSource`] in production) and an
//! [`EventSink`] (records out, acknowledgements reported to [`Progress`]; [`KafkaSink`] in
//! production), so the whole session runs in unit tests against in-memory fakes. What one
//! session owns beside its loop lives here too: the [`progress`] tracker (which position is
//! safe to confirm) and the [`resume`] memory (what an earlier run already delivered).
//!
//! ```text
//!  WalSource::fill/try_next ─▶ Decoder ─▶ events: Relations::extract ─▶ TopicRouter ─▶ EventSink::send ─▶ broker
//!        ▲                                        └─ dead_letter (bad rows, rejected records) ──┘   │ ack
//!        └─ WalSource::send_status(Progress::safe_lsn) ◀──────────── Progress ◀───────────────────┘
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
//! - **The producer is silent before the slot is released.** On every way out — a stop, an
//!   error, a lost stream — the sink is closed (its queue purged, the producer destroyed) while
//!   the session still holds the stream, reporting status so the walsender keeps it; only then
//!   is the stream ended or dropped. So the next owner of the slot starts after this session's
//!   producer can send nothing more (bar bytes already in a socket, see [`EventSink::close`]).
//! - **A session that was frozen produces nothing more.** Before each record it looks how long
//!   it has not reported status; past three quarters of the server's `wal_sender_timeout` the
//!   walsender may have ended the stream and another process may own the slot, so it stops
//!   ([`Error::Silenced`]) instead of publishing what it had read before the freeze.

mod dead_letter;
mod events;
pub mod progress;
pub mod resume;
pub mod seams;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use pgoutput::{Begin, Decoder, Lsn};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use walship_kafka::{Record, SendError, TopicRouter};
use walship_postgres::failover::History;
use walship_postgres::{Frame, PgError, Relations};

pub use seams::{EventSink, KafkaSink, PgSource, WalSource};

use crate::config::settings::SessionSettings;
use crate::error::Error;
use crate::failover::Lineage;
use crate::telemetry::Telemetry;
use progress::{Progress, TxnOrigin, TxnToken};
use resume::Resume;
use std::sync::atomic::Ordering;

/// Least time between two standby status updates that report a new position.
const MIN_STATUS_GAP: Duration = Duration::from_millis(2);
/// A broker round trip the stream waits for is logged once it takes this long.
const BROKER_WAIT_NOTICE: Duration = Duration::from_secs(5);
/// Longest the check after a promotion reads topics back ([`Session::check_published`]).
const PUBLISHED_CHECK_BUDGET: Duration = Duration::from_secs(60);

/// The transaction currently being decoded.
struct OpenTxn {
    begin: Begin,
    token: Option<TxnToken>,
    sent: u64,
    /// Outbox rows and messages seen so far: the next event's index in its [`walship_kafka::Position`].
    rows: u32,
}

/// Where the session is on its way to a stop. Set in one place ([`Session::note_stop`],
/// [`Session::give_up`]) and read by every wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// No stop requested.
    Streaming,
    /// A stop was requested: finish the open transaction by `deadline`, then shut down.
    Finishing { deadline: Instant },
    /// The open transaction could not be finished: shut down without sealing it, so the
    /// confirmed position stays before it and it is read again on the next start.
    Abandoned,
}

/// Counters of one session, for logs and tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionStats {
    /// Outbox events handed to the producer.
    pub events_sent: u64,
    /// Committed transactions seen.
    pub transactions: u64,
}

/// A streaming session: see the module documentation.
pub struct Session<W: WalSource, K: EventSink> {
    // The sink before the source: should a session be dropped without running its way out (its
    // future dropped), the producer's destruction starts before the stream is closed.
    sink: K,
    source: W,
    decoder: Decoder,
    relations: Relations,
    router: TopicRouter,
    progress: Arc<Progress>,
    settings: SessionSettings,
    telemetry: Arc<Telemetry>,
    /// Value of the `walship.source` header: who wrote the record.
    source_id: Arc<str>,
    /// Set after a start that may follow an unclean stop, until the stream passes what an
    /// earlier run can have delivered.
    resume: Option<Resume>,
    txn: Option<OpenTxn>,
    last_reported: Lsn,
    last_status_at: Instant,
    stats: SessionStats,
    stop: Stop,
    /// Fires when the session must stop without waiting for acknowledgements (its process lost
    /// its claim on the pipeline); see [`Session::abandon_on`].
    abandon: CancellationToken,
    /// Silence after which the walsender may have ended the stream; see
    /// [`Session::silence_limit`].
    silence_limit: Option<Duration>,
    /// The server's history: records this source has in Kafka must lie in it.
    history: History,
    /// `host:port` of the server, for messages.
    server: Arc<str>,
    /// The server's timeline as [`walship_kafka::TIMELINE_HEADER`] text.
    timeline_text: Arc<str>,
    /// Each ancestor timeline's end and text, oldest first ([`Session::timeline_text`]).
    timeline_texts: Vec<(Lsn, Arc<str>)>,
    /// Topics to read back before the first record, and from which position; see
    /// [`Session::check_published`].
    published_check: Option<(Vec<String>, Lsn, Arc<Lineage>)>,
    /// `postgres.source_epoch`, for the way on that [`Error::Fork`] names.
    source_epoch: u32,
}

impl<W: WalSource, K: EventSink> Session<W, K> {
    /// Wires a started source to a sink. Contains no processing logic. `source_id` is the value
    /// of the `walship.source` header (`<system id>/<slot>`); `resume` is set when the session
    /// starts behind what an earlier run may have delivered.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: W,
        sink: K,
        relations: Relations,
        router: TopicRouter,
        progress: Arc<Progress>,
        settings: SessionSettings,
        telemetry: Arc<Telemetry>,
        source_id: &str,
        resume: Option<Resume>,
    ) -> Self {
        if settings.dead_letter_topic.is_some() {
            progress.enable_dead_letter();
        }
        Session {
            source,
            sink,
            decoder: Decoder::new(1),
            relations,
            router,
            last_reported: progress.safe_lsn(),
            progress,
            settings: SessionSettings {
                max_in_flight: settings.max_in_flight.max(2),
                max_pending: settings.max_pending.max(2),
                ..settings
            },
            telemetry,
            source_id: Arc::from(source_id),
            resume,
            txn: None,
            last_status_at: Instant::now(),
            stats: SessionStats::default(),
            stop: Stop::Streaming,
            abandon: CancellationToken::new(),
            silence_limit: None,
            history: History::first(),
            server: Arc::from("the server"),
            timeline_text: Arc::from("1"),
            timeline_texts: Vec::new(),
            published_check: None,
            source_epoch: 0,
        }
    }

    /// The server's history (its timeline and its ancestors' ends), `host:port` for messages,
    /// and `postgres.source_epoch`. Every record names the timeline that holds its commit, and
    /// every read-back checks what it finds against the history ([`Error::Fork`]).
    pub fn on_server(mut self, history: History, server: &str, source_epoch: u32) -> Self {
        self.timeline_text = Arc::from(history.timeline.to_string());
        let mut ancestors: Vec<_> = history
            .switches
            .iter()
            .filter(|s| s.timeline < history.timeline)
            .map(|s| (s.end, Arc::from(s.timeline.to_string())))
            .collect();
        ancestors.sort_by_key(|(end, _)| *end);
        self.timeline_texts = ancestors;
        self.history = history;
        self.server = Arc::from(server);
        self.source_epoch = source_epoch;
        self
    }

    /// Before its first record, reads `topics` back (what this source wrote there at or after
    /// `since`) and stops with [`Error::Fork`] if any of it is outside the server's history:
    /// after a promotion, before anything new can take a published event's position.
    /// Once the check has passed, `lineage` is told ([`Lineage::checked`]).
    pub fn check_published(
        mut self,
        topics: Vec<String>,
        since: Lsn,
        lineage: Arc<Lineage>,
    ) -> Self {
        self.published_check = Some((topics, since, lineage));
        self
    }

    /// Stops at once when `abandon` fires (cancel the run's token too): the open transaction
    /// stays unconfirmed, acknowledgements are not waited for, and the producer's queue is
    /// purged before the slot is released. For a process that lost its claim on the pipeline
    /// while another waits for the slot.
    pub fn abandon_on(mut self, abandon: CancellationToken) -> Self {
        self.abandon = abandon;
        self
    }

    /// The server's `wal_sender_timeout` (`None` or zero: the walsender never times out). A
    /// session that has not reported status for three quarters of it stops before its next
    /// record: it was frozen or starved, and the walsender may have ended the stream.
    pub fn silence_limit(mut self, wal_sender_timeout: Option<Duration>) -> Self {
        self.silence_limit = wal_sender_timeout
            .filter(|t| !t.is_zero())
            .map(|t| t * 3 / 4);
        self
    }

    /// Streams until `cancel` fires (then drains and confirms) or an error occurs.
    ///
    /// On cancellation the transaction being decoded is finished first (bounded by the shutdown
    /// timeout), so a graceful stop leaves nothing half-sent to be duplicated on restart. Every
    /// way out closes the sink before the stream (see the module documentation).
    pub async fn run(mut self, cancel: &CancellationToken) -> Result<SessionStats, Error> {
        use futures::FutureExt;
        let streamed = std::panic::AssertUnwindSafe(self.stream(cancel))
            .catch_unwind()
            .await;
        match streamed {
            Ok(Ok(())) => self.shutdown().await,
            Ok(Err(e)) => self.close_after(e).await,
            Err(panic) => {
                // A bug; even then the producer is gone before the stream lets the slot go.
                let _ = self
                    .close_after(Error::Producer("the session panicked".into()))
                    .await;
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// The streaming loop: `Ok` when it is time to shut down.
    async fn stream(&mut self, cancel: &CancellationToken) -> Result<(), Error> {
        self.read_published(cancel).await?;
        if self.stop == Stop::Abandoned {
            return Ok(());
        }
        loop {
            // Checked once per read buffer, not per message: `is_cancelled` takes a lock.
            self.note_stop(cancel);
            while let Some(frame) = self.source.try_next()? {
                self.handle(frame, cancel).await?;
                // A wait inside `handle` can have seen the stop request mid-buffer.
                if self.stop == Stop::Abandoned
                    || (self.stop != Stop::Streaming && self.txn.is_none())
                {
                    return Ok(());
                }
            }
            self.check_failure()?;
            self.dead_letter_rejected(cancel).await?;
            self.note_stop(cancel);
            match self.stop {
                Stop::Abandoned => return Ok(()),
                Stop::Finishing { .. } if self.txn.is_none() => return Ok(()),
                // Out of time for the rest of the open transaction: it stays unsealed.
                Stop::Finishing { deadline } if Instant::now() >= deadline => {
                    return Ok(());
                }
                _ => {}
            }
            if Instant::now() >= self.status_due() {
                self.report(false).await?;
            }
            let due = self.status_due();
            let (wake, stopping) = match self.stop {
                Stop::Finishing { deadline } => (deadline.min(due), true),
                _ => (due, false),
            };
            let nothing_to_report = self.progress.safe_lsn() <= self.last_reported;
            let progress = Arc::clone(&self.progress);
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if !stopping => {}
                r = self.source.fill() => r?,
                // Idle and caught up: report a newly safe position promptly, not a whole
                // status interval later.
                _ = progress.wait_for_advance(self.last_reported), if nothing_to_report => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// The check [`Session::check_published`] asks for, if any: each topic read back, its
    /// findings judged against the history and kept for the resume lookup.
    ///
    /// Records a promotion can have left behind are the newest of this source in their
    /// partitions (nothing of it was published after them), and a read-back reads each
    /// partition from its end: what a scan cut short by its limits or by
    /// [`PUBLISHED_CHECK_BUDGET`] did not read is older. Such topics are named in a warning;
    /// they do not hold the pipeline back for ever.
    async fn read_published(&mut self, cancel: &CancellationToken) -> Result<(), Error> {
        let Some((topics, since, lineage)) = self.published_check.take() else {
            return Ok(());
        };
        let until = std::time::Instant::now() + PUBLISHED_CHECK_BUDGET;
        let mut partly = Vec::new();
        for topic in &topics {
            if std::time::Instant::now() >= until {
                partly.push(topic.as_str());
                continue;
            }
            let started = std::time::Instant::now();
            // The resume lookup keeps what it may hold of this read; the check itself needs
            // only the timelines, which are counted whatever the limit.
            let for_resume = match self.resume.as_mut() {
                Some(r) if r.since() == since && !r.knows(topic) => r.begin_scan(topic),
                _ => None,
            };
            let scan = self
                .sink
                .read_back(topic, &self.source_id, since, for_resume.unwrap_or(1));
            let what = format!("reading topic {topic:?} back to check the promotion");
            let Some(found) = self.await_broker(&what, scan, cancel, true).await? else {
                return Ok(());
            };
            let found = found.map_err(|e| Error::PublishedUnread {
                what: format!("reading topic {topic:?} back"),
                error: e.message,
                denied: e.denied,
            })?;
            self.check_history(topic, &found)?;
            if !found.complete {
                partly.push(topic.as_str());
            }
            if let (Some(_), Some(resume)) = (for_resume, self.resume.as_mut()) {
                resume.store(topic, Ok(found), started.elapsed());
            }
        }
        lineage.checked();
        if !partly.is_empty() {
            tracing::warn!(
                topics = partly.len(),
                "after a promotion, {} of {} topics were read back only in part (the newest \
                 records of each partition first, within {} s in all): {}{}; records this server \
                 lacks would be the newest of this source, so these were looked for first, but \
                 older records there were not judged",
                partly.len(),
                topics.len(),
                PUBLISHED_CHECK_BUDGET.as_secs(),
                partly
                    .iter()
                    .take(10)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", "),
                if partly.len() > 10 { ", …" } else { "" }
            );
        }
        tracing::info!(
            topics = topics.len(),
            server = %self.server,
            timeline = self.history.timeline,
            "checked what Kafka holds of this source since {since}: all of it is in this \
             server's history"
        );
        Ok(())
    }

    /// [`Error::Fork`] when `found` (records of this source read back from `topic`) holds a
    /// record outside the server's history. Records without a timeline (written by an earlier
    /// version) cannot be judged and pass.
    fn check_history(&self, topic: &str, found: &walship_kafka::Delivered) -> Result<(), Error> {
        let history = &self.history;
        for (timeline, span) in found.timelines() {
            if history.holds(timeline, Lsn(span.last.commit_lsn)) {
                continue;
            }
            let ended = history
                .switches
                .iter()
                .find(|s| s.timeline == timeline && timeline != history.timeline)
                .map(|s| s.end);
            return Err(Error::Fork {
                walship_source: self.source_id.to_string(),
                server: self.server.to_string(),
                timeline: history.timeline,
                branch: history.branch_point(),
                topic: topic.to_owned(),
                records: span.records,
                first: span.first,
                last: span.last,
                record_timeline: timeline,
                ended,
                published_before: self.stats.events_sent,
                next_epoch: self.source_epoch + 1,
            });
        }
        Ok(())
    }

    /// The [`walship_kafka::TIMELINE_HEADER`] value for an event committed at `commit_lsn`:
    /// the timeline whose WAL holds it — an ancestor's for what a promoted server reads again
    /// from before it branched.
    fn timeline_text(&self, commit_lsn: Lsn) -> Arc<str> {
        self.timeline_texts
            .iter()
            .find(|(end, _)| commit_lsn < *end)
            .map_or_else(|| Arc::clone(&self.timeline_text), |(_, t)| Arc::clone(t))
    }

    /// Turns a stop request into [`Stop::Finishing`] with the shutdown timeout as deadline, or
    /// into [`Stop::Abandoned`] when the stop is to be immediate.
    fn note_stop(&mut self, cancel: &CancellationToken) {
        if self.stop != Stop::Abandoned && self.abandon.is_cancelled() {
            self.stop = Stop::Abandoned;
        } else if self.stop == Stop::Streaming && cancel.is_cancelled() {
            self.stop = Stop::Finishing {
                deadline: Instant::now() + self.settings.shutdown_timeout,
            };
        }
    }

    /// An error when the session has not reported status for longer than its silence limit: it
    /// was frozen (or starved of CPU), the walsender may have ended the stream meanwhile and
    /// another process may stream the slot now, so nothing more it read may be published.
    fn check_silence(&self) -> Result<(), Error> {
        if let Some(limit) = self.silence_limit {
            let silent = self.last_status_at.elapsed();
            if silent > limit {
                return Err(Error::Silenced { silent, limit });
            }
        }
        Ok(())
    }

    /// The deadline of a requested stop, if one is under way.
    fn stop_deadline(&self) -> Option<Instant> {
        match self.stop {
            Stop::Finishing { deadline } => Some(deadline),
            _ => None,
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
            let mut queue_full = false;
            // A new transaction adds an entry to the tracker: only below the pending bound.
            let room = self.progress.in_flight() < self.settings.max_in_flight
                && (token.is_some()
                    || self.progress.pending_transactions() < self.settings.max_pending);
            if room {
                self.check_silence()?;
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
                    Err(SendError::QueueFull) => queue_full = true,
                    Err(SendError::Rejected { topic, error }) => {
                        self.telemetry.count_error(error.class);
                        return Err(match error.class {
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
            self.note_stop(cancel);
            if self.stop == Stop::Abandoned {
                // Told to stop at once: this event was not sent, its transaction stays unsealed.
                return Ok(());
            }
            if self.stop_deadline().is_some_and(|d| Instant::now() >= d) {
                // Out of time: this event was not sent. Its transaction is never sealed, so the
                // confirmed position stays before it and the whole transaction is read again
                // on the next start.
                self.stop = Stop::Abandoned;
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
            let pending_low = token
                .is_none()
                .then(|| self.settings.max_pending.saturating_sub(1));
            // librdkafka's own queue can fill below the in-flight window (a small
            // `queue.buffering.max.messages`): then wait for the next acknowledgement.
            let in_flight = self.progress.in_flight();
            let low_water = if queue_full {
                in_flight
                    .saturating_sub(1)
                    .min(self.settings.max_in_flight / 2)
            } else {
                self.settings.max_in_flight / 2
            };
            let (progress, abandon) = (Arc::clone(&self.progress), self.abandon.clone());
            tokio::select! {
                () = progress.wait_for_room(low_water, pending_low, Duration::from_millis(100)) => {}
                () = abandon.cancelled() => continue,
            }
            if queue_full && in_flight == 0 {
                // A full queue holding nothing of this session's: nothing will wake us, so
                // look again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
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
        self.note_stop(cancel);
        if nothing_sent && self.stop != Stop::Streaming {
            return Ok(self.give_up());
        }
        tokio::pin!(work);
        let notice = tokio::time::sleep(BROKER_WAIT_NOTICE);
        tokio::pin!(notice);
        let mut noticed = false;
        loop {
            self.note_stop(cancel);
            if self.stop == Stop::Abandoned {
                return Ok(self.give_up());
            }
            let deadline = self.stop_deadline();
            let streaming = self.stop == Stop::Streaming;
            let abandon = self.abandon.clone();
            tokio::select! {
                out = &mut work => return Ok(Some(out)),
                () = &mut notice, if !noticed => {
                    noticed = true;
                    tracing::warn!(
                        "waiting {} s for the broker ({what}); the replication stream waits too",
                        BROKER_WAIT_NOTICE.as_secs()
                    );
                }
                _ = cancel.cancelled(), if streaming => {
                    if nothing_sent {
                        return Ok(self.give_up());
                    }
                    self.note_stop(cancel);
                }
                () = abandon.cancelled() => return Ok(self.give_up()),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                    if deadline.is_some() => return Ok(self.give_up()),
                _ = tokio::time::sleep(self.settings.status_interval) => self.report(false).await?,
            }
        }
    }

    /// Gives up the open transaction on the way to a stop; see [`Session::await_broker`].
    fn give_up<T>(&mut self) -> Option<T> {
        let lsn = self.txn.as_ref().map(|t| t.begin.final_lsn);
        tracing::info!(
            commit_lsn = ?lsn,
            "stopping without waiting for the broker: the transaction being read stays \
             unconfirmed and is read again on the next start"
        );
        self.stop = Stop::Abandoned;
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
            self.last_status_at + self.settings.status_interval
        }
    }

    async fn report(&mut self, reply_requested: bool) -> Result<(), Error> {
        let safe = self.progress.safe_lsn();
        self.source.send_status(safe, reply_requested).await?;
        self.last_reported = safe;
        self.last_status_at = Instant::now();
        self.telemetry.safe_lsn.store(safe.0, Ordering::Relaxed);
        self.telemetry
            .in_flight
            .store(self.progress.in_flight(), Ordering::Relaxed);
        Ok(())
    }

    /// Stops reading, waits for acknowledgements while holding the stream, closes the sink,
    /// then confirms the final safe position and ends the stream.
    async fn shutdown(mut self) -> Result<SessionStats, Error> {
        if let Err(e) = self.await_acks().await {
            return self.close_after(e).await;
        }
        let left = self.progress.in_flight();
        if left > 0 {
            tracing::warn!(
                in_flight = left,
                "shutdown: {left} records not acknowledged within run.shutdown_timeout_ms; they are \
                 purged, stay unconfirmed and will be sent again by the slot's next owner"
            );
        }
        // Failures are read before the close: the purge reports every record it drops as failed.
        if let Err(e) = self.check_failure() {
            return self.close_after(e).await;
        }
        let (mut source, closed) = self.close_sink().await;
        let Closed {
            progress,
            telemetry,
            stats,
        } = closed?;
        let safe = progress.safe_lsn();
        source.send_status(safe, false).await?;
        telemetry.safe_lsn.store(safe.0, Ordering::Relaxed);
        source.finish().await?;
        tracing::info!(confirmed_lsn = %safe, events = stats.events_sent, "stopped; slot confirmed");
        Ok(stats)
    }

    /// How often status is reported while the session holds the stream without reading it
    /// (waiting for acknowledgements, closing the sink): the status interval, and at least
    /// twice per silence limit, so the walsender never times the stream out meanwhile.
    fn hold_interval(&self) -> Duration {
        self.silence_limit
            .map_or(self.settings.status_interval, |l| {
                self.settings.status_interval.min(l / 2)
            })
    }

    /// Waits until every record handed to the sink is acknowledged (or failed), up to the
    /// shutdown timeout, reporting status meanwhile so the walsender keeps the stream (and the
    /// slot) this session's: the next owner cannot start while these records are in flight. An
    /// abandoned session does not wait.
    async fn await_acks(&mut self) -> Result<(), Error> {
        if self.abandon.is_cancelled() {
            return Ok(());
        }
        let until = Instant::now() + self.settings.shutdown_timeout;
        loop {
            self.check_failure()?;
            if self.progress.in_flight() == 0 || Instant::now() >= until {
                return Ok(());
            }
            let due = self
                .status_due()
                .min(self.last_status_at + self.hold_interval());
            if Instant::now() >= due {
                self.report(false).await?;
            }
            let wake = self
                .status_due()
                .min(self.last_status_at + self.hold_interval())
                .min(until);
            let (progress, abandon) = (Arc::clone(&self.progress), self.abandon.clone());
            tokio::select! {
                () = progress.wait_for_room(0, None, Duration::from_secs(3600)) => {}
                () = tokio::time::sleep_until(wake) => {}
                () = abandon.cancelled() => return Ok(()),
            }
        }
    }

    /// The way out after `error`: closes the sink while still holding the stream (status keeps
    /// flowing where the stream still works), then drops the stream, releasing the slot.
    async fn close_after(self, error: Error) -> Result<SessionStats, Error> {
        // A failed status report here only means the stream is gone already.
        let (source, _) = self.close_sink().await;
        drop(source);
        Err(error)
    }

    /// Closes the sink (purge, destroy, await) while holding the stream and reporting status
    /// ([`hold_stream_while`]); returns the stream, still open, and what the session leaves.
    async fn close_sink(self) -> (W, Result<Closed, Error>) {
        let interval = self.hold_interval();
        let Session {
            mut source,
            sink,
            progress,
            telemetry,
            stats,
            ..
        } = self;
        let held = hold_stream_while(&mut source, &progress, interval, sink.close()).await;
        let closed = held.map(|()| Closed {
            progress,
            telemetry,
            stats,
        });
        (source, closed)
    }
}

/// What a session leaves once its sink is closed.
struct Closed {
    progress: Arc<Progress>,
    telemetry: Arc<Telemetry>,
    stats: SessionStats,
}

/// Awaits `work` while reporting the safe position every `interval`, so the walsender keeps the
/// stream (and the slot) this session's meanwhile. `work` is awaited to its end even when a
/// report fails (the first failure is returned afterwards): what it waits for must be over
/// before the stream can be let go.
async fn hold_stream_while<W: WalSource, T>(
    source: &mut W,
    progress: &Progress,
    interval: Duration,
    work: impl Future<Output = T>,
) -> Result<T, Error> {
    tokio::pin!(work);
    let mut failed = None;
    loop {
        tokio::select! {
            out = &mut work => return failed.map_or(Ok(out), Err),
            () = tokio::time::sleep(interval) => {
                if failed.is_none()
                    && let Err(e) = source.send_status(progress.safe_lsn(), false).await
                {
                    failed = Some(e.into());
                }
            }
        }
    }
}
