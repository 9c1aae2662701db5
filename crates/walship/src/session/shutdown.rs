//! The ways out of a session: a graceful stop, and a stop after an error.
//!
//! Owns waiting for the last acknowledgements, closing the sink and ending (or dropping) the
//! stream, in that order.
//!
//! Invariant: **the producer is silent before the slot is released.** On every way out the
//! sink is closed (its queue purged, the producer destroyed) while the session still holds the
//! stream, reporting status at least twice per silence limit so the walsender keeps it; only
//! then is the stream ended or dropped. A graceful stop confirms the final safe position
//! before it ends the stream.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::progress::Progress;
use super::seams::{EventSink, WalSource};
use super::{Session, SessionStats};
use crate::error::Error;
use crate::telemetry::Telemetry;

impl<W: WalSource, K: EventSink> Session<W, K> {
    /// Stops reading, waits for acknowledgements while holding the stream, closes the sink,
    /// then confirms the final safe position and ends the stream.
    pub(super) async fn shutdown(mut self) -> Result<SessionStats, Error> {
        // Acknowledgements were awaited here already: an error closes at once.
        if let Err(e) = self.await_acks().await {
            return self.close_now(e).await;
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
            return self.close_now(e).await;
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
    /// slot) this session's: the next owner cannot start while these records are in flight. A session
    /// told to abandon ([`Session::abandon_on`]'s token) does not wait; one whose stop only ran
    /// out of time still waits here, so a stop can take twice `run.shutdown_timeout_ms`.
    async fn await_acks(&mut self) -> Result<(), Error> {
        if self.abandon.is_cancelled() {
            return Ok(());
        }
        let until = Instant::now() + self.settings.shutdown_timeout;
        self.hold_for_answers(until, true).await
    }

    /// Waits, up to the shutdown timeout, for the records in flight to be answered (what was
    /// handed to the producer is on its way; a failure does not stop the others), reporting
    /// status so the walsender keeps the stream: the first report that fails ends the wait (the
    /// slot may be free), as do a stop that must be immediate and the timeout.
    async fn let_acks_arrive(&mut self) {
        let until = Instant::now() + self.settings.shutdown_timeout;
        if self.report(false).await.is_ok() {
            let _ = self.hold_for_answers(until, false).await;
        }
    }

    /// Holds the stream until nothing handed to the sink is unanswered, or until `until`, or
    /// until told to abandon, reporting status when due and at least every
    /// [`Session::hold_interval`]. A failed report ends the wait with its error; so does a
    /// failed delivery when `stop_on_failure` (else the other records are still let through).
    async fn hold_for_answers(
        &mut self,
        until: Instant,
        stop_on_failure: bool,
    ) -> Result<(), Error> {
        loop {
            if stop_on_failure {
                self.check_failure()?;
            }
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
                // Woken by a failed delivery too (`Progress` notifies on failures).
                () = progress.wait_for_answers(Duration::from_secs(3600)) => {}
                () = tokio::time::sleep_until(wake) => {}
                () = abandon.cancelled() => return Ok(()),
            }
        }
    }

    /// The way out after `error`: closes the sink while still holding the stream (status keeps
    /// flowing where the stream still works), then drops the stream, releasing the slot.
    pub(super) async fn close_after(mut self, error: Error) -> Result<SessionStats, Error> {
        // With a producer other pipelines share, records the broker is about to acknowledge
        // are let through first: closing the sink with records in flight purges the producer
        // for all, and the others would start again for nothing. Only while this session
        // provably holds the stream (so no other process can own the slot yet): not after a
        // stream or server error, not after a freeze, not when told to let go at once.
        if self.sink.shares_producer()
            && self.progress.in_flight() > 0
            && !matches!(error, Error::Silenced { .. } | Error::Postgres(_))
            && !self.abandon.is_cancelled()
            && self.check_silence().is_ok()
        {
            self.let_acks_arrive().await;
        }
        self.close_now(error).await
    }

    /// Closes the sink and drops the stream, without waiting for anything in flight.
    async fn close_now(self, error: Error) -> Result<SessionStats, Error> {
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
