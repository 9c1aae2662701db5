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
//! - **The producer is silent before the slot is released** (kept by `shutdown`): on every
//!   way out the sink is closed while the session still holds the stream, so the next owner of
//!   the slot starts after this session's producer can send nothing more (bar bytes already in
//!   a socket, see [`EventSink::close`]).
//! - **A session that was frozen produces nothing more.** Before each record it looks how long
//!   it has not reported status; past three quarters of the server's `wal_sender_timeout` the
//!   walsender may have ended the stream and another process may own the slot, so it stops
//!   ([`Error::Silenced`]) instead of publishing what it had read before the freeze.
//!
//! # Layout
//!
//! This file holds the session's state, its constructor and the streaming loop (read, decode,
//! report status, note a stop). The rest, each a part of the same `impl`:
//!
//! - `events` — each pgoutput message: open or seal a transaction, place a relation, extract,
//!   route, skip what resume proved delivered, produce.
//! - `send` — handing a record to the sink under backpressure; waiting for the broker.
//! - `window` — the send window's rules (room in flight, the low-water mark), pure.
//! - `dead_letter` — what a dead letter says, and sending it in its event's place.
//! - `published` — the read-back after a promotion, judged against the server's history.
//! - `shutdown` — the ways out: acknowledgements, closing the sink, ending the stream.
//! - [`seams`], [`progress`], [`resume`] — public: the two traits, the tracker, the memory.

mod dead_letter;
mod events;
pub mod progress;
mod published;
pub mod resume;
pub mod seams;
mod send;
mod shutdown;
#[cfg(test)]
mod tests;
mod window;

use std::sync::Arc;
use std::time::Duration;

use pgoutput::{Begin, Decoder, Lsn};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use walship_kafka::TopicRouter;
use walship_postgres::failover::History;
use walship_postgres::{Frame, PgError, Relations};

pub use seams::{EventSink, KafkaSink, PgSource, WalSource};

use crate::config::settings::SessionSettings;
use crate::error::Error;
use crate::failover::Lineage;
use crate::telemetry::Telemetry;
use progress::{Progress, TxnToken};
use resume::Resume;
use std::sync::atomic::Ordering;
use window::Window;

/// Least time between two standby status updates that report a new position.
const MIN_STATUS_GAP: Duration = Duration::from_millis(2);

/// The transaction currently being decoded.
struct OpenTxn {
    begin: Begin,
    token: Option<TxnToken>,
    sent: u64,
    /// Outbox rows and messages seen so far: the next event's index in its [`walship_kafka::Position`].
    rows: u32,
}

/// Where the session is on its way to a stop. Set only by [`Session::note_stop`],
/// [`Session::abandoning`] and [`Session::give_up`], and read by every wait.
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

/// What [`Session::new`] wires together.
pub struct SessionParts<W: WalSource, K: EventSink> {
    /// A started replication stream (and its catalog).
    pub source: W,
    /// Where records go; it reports acknowledgements to `progress`.
    pub sink: K,
    /// The relation cache, knowing the outbox.
    pub relations: Relations,
    /// Each event's topic.
    pub router: TopicRouter,
    /// The tracker the sink reports to; its safe position is the session's start.
    pub progress: Arc<Progress>,
    /// The session's behaviour.
    pub settings: SessionSettings,
    /// Where the session's metrics go.
    pub telemetry: Arc<Telemetry>,
    /// The value of the `walship.source` header (`<system id>/<slot>`).
    pub source_id: String,
    /// Set when the session starts behind what an earlier run may have delivered.
    pub resume: Option<Resume>,
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
    /// The send window's bounds, from `settings`.
    window: Window,
    settings: SessionSettings,
    telemetry: Arc<Telemetry>,
    /// Value of the `walship.source` header: who wrote the record.
    source_id: Arc<str>,
    /// How event records are shaped (`settings.format`, shared so a record can borrow it
    /// while the session sends).
    format: Arc<walship_kafka::record::Format>,
    /// The last CloudEvent's rendered attributes: reused to keep their allocations.
    scratch: walship_kafka::record::Scratch,
    /// Every further column is a header of its own name (no `outbox.additional_placement`
    /// beyond that): rows' headers are used as they are.
    placements_plain: bool,
    /// When the last warning about a malformed trace context was logged.
    trace_warned: Option<std::time::Instant>,
    /// Malformed trace contexts dropped since that warning.
    trace_dropped_unwarned: u64,
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
    /// Wires a started source to a sink. Contains no processing logic.
    pub fn new(parts: SessionParts<W, K>) -> Self {
        let SessionParts {
            source,
            sink,
            relations,
            router,
            progress,
            settings,
            telemetry,
            source_id,
            resume,
        } = parts;
        if settings.dead_letter_topic.is_some() {
            progress.enable_dead_letter();
        }
        let format = Arc::new(settings.format.clone());
        let placements_plain = settings.placements.is_empty();
        Session {
            source,
            sink,
            decoder: Decoder::new(1),
            relations,
            router,
            last_reported: progress.safe_lsn(),
            progress,
            window: Window::new(settings.max_in_flight, settings.max_pending),
            settings,
            telemetry,
            source_id: Arc::from(source_id),
            format,
            scratch: walship_kafka::record::Scratch::default(),
            placements_plain,
            trace_warned: None,
            trace_dropped_unwarned: 0,
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
            // Out of time for the rest of the open transaction: it stays unsealed.
            if self.abandoning(cancel) || (self.stop != Stop::Streaming && self.txn.is_none()) {
                return Ok(());
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

    /// Turns a stop request into [`Stop::Finishing`] with the shutdown timeout as deadline, or
    /// into [`Stop::Abandoned`] when the stop is to be immediate.
    pub(super) fn note_stop(&mut self, cancel: &CancellationToken) {
        if self.stop != Stop::Abandoned && self.abandon.is_cancelled() {
            self.stop = Stop::Abandoned;
        } else if self.stop == Stop::Streaming && cancel.is_cancelled() {
            self.stop = Stop::Finishing {
                deadline: Instant::now() + self.settings.shutdown_timeout,
            };
        }
    }

    /// Whether the session stops at once, leaving the open transaction unsealed (so the
    /// confirmed position stays before it and it is read again on the next start): it was told
    /// to ([`Session::abandon_on`]), or a requested stop ran out of time. Notes a stop request
    /// first ([`Session::note_stop`]); a wait for the broker gives up through
    /// [`Session::give_up`] instead, which says so in the log.
    pub(super) fn abandoning(&mut self, cancel: &CancellationToken) -> bool {
        self.note_stop(cancel);
        if self.stop_deadline().is_some_and(|d| Instant::now() >= d) {
            self.stop = Stop::Abandoned;
        }
        self.stop == Stop::Abandoned
    }

    /// An error when the session has not reported status for longer than its silence limit: it
    /// was frozen (or starved of CPU), the walsender may have ended the stream meanwhile and
    /// another process may stream the slot now, so nothing more it read may be published.
    pub(super) fn check_silence(&self) -> Result<(), Error> {
        if let Some(limit) = self.silence_limit {
            let silent = self.last_status_at.elapsed();
            if silent > limit {
                return Err(Error::Silenced { silent, limit });
            }
        }
        Ok(())
    }

    /// The deadline of a requested stop, if one is under way.
    pub(super) fn stop_deadline(&self) -> Option<Instant> {
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

    /// The stream is past everything an earlier run can have sent: forget its deliveries.
    pub(super) fn end_resume(&mut self) {
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

    pub(super) fn check_failure(&self) -> Result<(), Error> {
        if self.progress.has_failed()
            && let Some(f) = self.progress.take_failure()
        {
            return Err(Error::Delivery(f));
        }
        Ok(())
    }

    /// When the next standby status is due: soon after the safe position moved (at most one
    /// every [`MIN_STATUS_GAP`]), else after the configured interval as a heartbeat.
    pub(super) fn status_due(&self) -> Instant {
        if self.progress.safe_lsn() > self.last_reported {
            self.last_status_at + MIN_STATUS_GAP
        } else {
            self.last_status_at + self.settings.status_interval
        }
    }

    pub(super) async fn report(&mut self, reply_requested: bool) -> Result<(), Error> {
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
}
