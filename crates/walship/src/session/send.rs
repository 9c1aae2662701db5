//! The send path: handing a record to the sink under backpressure, and waiting for the broker
//! without letting the walsender time the stream out.
//!
//! Owns the loop around [`EventSink::send`] (room in the [`Window`](super::window::Window),
//! a full librdkafka queue, a refusal turned into the session's error) and every wait an event
//! makes for the broker (a topic check, a resume lookup), with what a stop request does to
//! them.
//!
//! Invariant: while it waits, the session keeps reporting status, so `wal_sender_timeout`
//! never fires; a stop request never waits for a broker round trip (an event not sent yet is
//! abandoned, unsealed, and read again on the next start); and a record the sink refused is
//! never counted as sent.

use std::sync::Arc;
use std::time::Duration;

use pgoutput::Lsn;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use walship_kafka::{DeliveryError, ErrorClass, Record, Refusal, SendError};

use super::progress::{TxnOrigin, TxnToken};
use super::seams::{EventSink, WalSource};
use super::{Session, Stop};
use crate::error::Error;

/// A broker round trip the stream waits for is logged once it takes this long.
const BROKER_WAIT_NOTICE: Duration = Duration::from_secs(5);

impl<W: WalSource, K: EventSink> Session<W, K> {
    /// Hands a record to the producer, waiting for room (backpressure) when the in-flight window
    /// or librdkafka's queue is full. With `token` unset the record is a new event of the open
    /// transaction; with `token` set it replaces an already counted event of that transaction.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send(
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
            let room = self.window.has_room(
                self.progress.in_flight(),
                self.progress.pending_transactions(),
                token.is_some(),
            );
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
                        return Err(refused(topic, error, lsn, xid));
                    }
                }
            }
            // Backpressure: stop reading until half the in-flight window is acknowledged, but
            // keep the walsender informed so it does not time us out.
            self.check_failure()?;
            if self.abandoning(cancel) {
                // Told to stop at once, or out of time: this event was not sent. Its
                // transaction is never sealed, so the confirmed position stays before it and
                // the whole transaction is read again on the next start.
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
            let in_flight = self.progress.in_flight();
            let wake = self.window.wake(in_flight, queue_full, token.is_some());
            let (progress, abandon) = (Arc::clone(&self.progress), self.abandon.clone());
            tokio::select! {
                () = progress.wait_for_room(wake.in_flight, wake.pending, Duration::from_millis(100)) => {}
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
    pub(super) async fn ensure_topic(
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
    pub(super) async fn await_broker<T>(
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
    pub(super) fn give_up<T>(&mut self) -> Option<T> {
        let lsn = self.txn.as_ref().map(|t| t.begin.final_lsn);
        tracing::info!(
            commit_lsn = ?lsn,
            "stopping without waiting for the broker: the transaction being read stays \
             unconfirmed and is read again on the next start"
        );
        self.stop = Stop::Abandoned;
        None
    }
}

/// The session's error for a record the sink refused at once: transient (reconnect and
/// resume), a bad row (the bad-row policy decides), or definite.
fn refused(topic: String, error: Refusal, lsn: Lsn, xid: u32) -> Error {
    match error.class {
        ErrorClass::Transient => Error::Delivery(DeliveryError {
            topic,
            partition: -1,
            key: None,
            payload_len: 0,
            position: None,
            id: None,
            error,
        }),
        ErrorClass::Record => Error::Record {
            lsn,
            xid,
            topic,
            error: error.to_string(),
        },
        ErrorClass::Fatal => {
            Error::Producer(format!("record at LSN {lsn} for topic {topic:?}: {error}"))
        }
    }
}
