//! The progress tracker: which WAL position is safe to confirm to PostgreSQL.
//!
//! ```text
//!   commit order ─▶ [txn 7: 0 left, end 0/A0] [txn 8: 2 left, end 0/B0] [txn 9: open, 5 left]
//!                    └─ popped: safe = 0/A0     └─ head: waits for 2 acks
//! ```
//!
//! Invariant: the safe LSN is the end LSN of the longest prefix of transactions (in commit
//! order) whose every event the broker has acknowledged. Acks may arrive in any order (different
//! partitions); the safe LSN only moves when the *head* completes. Transactions without events,
//! and keepalive positions received outside a transaction, complete at once but keep their
//! place: they extend the newest sealed transaction's end instead of adding an entry, so a long
//! run of filtered transactions behind a stalled broker costs no memory.
//!
//! Memory: one entry per transaction with events, from the oldest unacknowledged one to the
//! newest read. [`Progress::pending_transactions`] is what the session bounds
//! (`run.max_pending_transactions`): one stalled partition holds the head back while later
//! transactions are acknowledged, so without the bound entries would grow with the backlog.
//!
//! A delivery the producer gave up on stops progress for good (its transaction can never
//! complete) and is reported through [`Progress::take_failure`]; it is never skipped.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use pgoutput::Lsn;
use tokio::sync::Notify;
use walship_kafka::{DeliveryError, DeliveryListener};

use crate::telemetry::{Telemetry, unix_ms};

#[derive(Debug)]
struct Entry {
    /// End LSN of the transaction (valid once sealed).
    end: Lsn,
    sealed: bool,
    /// Events sent minus events acknowledged. Acks can arrive before the transaction is sealed
    /// with its event count, so this may be negative while open.
    outstanding: i64,
    /// Commit timestamp (ms since the Unix epoch), for lag metrics and dead letters.
    commit_time_ms: i64,
    /// The transaction's xid and commit LSN (`Begin.final_lsn`), for dead letters of records
    /// the broker rejects after they were sent.
    xid: u32,
    commit_lsn: Lsn,
    /// When the session opened the entry (read the transaction's first event); `None` for
    /// positions that never had events.
    read_at: Option<Instant>,
}

/// Where a transaction came from, as [`Progress::origin`] tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxnOrigin {
    /// Transaction id.
    pub xid: u32,
    /// Commit LSN (`Begin.final_lsn`).
    pub commit_lsn: Lsn,
    /// Commit time, Unix ms.
    pub commit_time_ms: i64,
}

#[derive(Debug, Default)]
struct State {
    entries: VecDeque<Entry>,
    /// Token of `entries[0]`.
    base: u64,
    /// Token of the next entry.
    next: u64,
    safe: Lsn,
}

/// Shared between the session (which opens and seals transactions) and the producer's delivery
/// thread (which acknowledges events).
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<State>,
    safe: AtomicU64,
    /// Events handed to the producer (by the session).
    sent_events: AtomicU64,
    /// Events whose outcome the producer reported (acknowledged or failed).
    reported_events: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<DeliveryError>>,
    /// While the session waits for room: wake it once in-flight events drop to this many.
    /// `u64::MAX` when nobody waits. Waking at a low-water mark instead of on every delivery
    /// turns a context switch per record into one per half window.
    wake_at_in_flight: AtomicU64,
    /// Entries now (mirrors `state.entries.len()`, readable without the lock).
    pending: AtomicU64,
    /// While the session waits for room: wake it once pending entries drop to this many.
    wake_at_pending: AtomicU64,
    room: Notify,
    /// Set while the session waits for the safe position to move (to report it promptly).
    want_advance: AtomicBool,
    advanced: Notify,
    telemetry: std::sync::Arc<Telemetry>,
    /// With the dead-letter policy: records the broker can never accept, waiting for the
    /// session to dead-letter them. Their transactions stay incomplete until that is acked.
    dead_letter: AtomicBool,
    rejected: Mutex<Vec<(TxnToken, DeliveryError)>>,
}

/// A token identifying one transaction's entry (passed to the producer with each event).
pub type TxnToken = u64;

impl Progress {
    /// A tracker whose safe position starts at the slot's confirmed position.
    pub fn new(start: Lsn) -> Self {
        Self::with_telemetry(start, std::sync::Arc::default())
    }

    /// Like [`Progress::new`], recording into `telemetry`.
    pub fn with_telemetry(start: Lsn, telemetry: std::sync::Arc<Telemetry>) -> Self {
        let p = Progress {
            wake_at_in_flight: AtomicU64::new(u64::MAX),
            wake_at_pending: AtomicU64::new(u64::MAX),
            telemetry,
            ..Progress::default()
        };
        p.safe.store(start.0, Ordering::Release);
        if let Ok(mut s) = p.state.lock() {
            s.safe = start;
        }
        p
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic while holding it; the state is still consistent
        // (every mutation is a single field update), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The position up to which everything is acknowledged.
    pub fn safe_lsn(&self) -> Lsn {
        Lsn(self.safe.load(Ordering::Acquire))
    }

    /// Records one event handed to the producer.
    pub fn note_sent(&self) {
        self.sent_events.fetch_add(1, Ordering::Relaxed);
    }

    /// Route records the broker rejects for good (too large, invalid) to
    /// [`take_rejected`](Self::take_rejected) instead of failing.
    pub fn enable_dead_letter(&self) {
        self.dead_letter.store(true, Ordering::Release);
    }

    /// True when records the broker rejected for good wait to be dead-lettered.
    pub fn has_rejected(&self) -> bool {
        !self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Records the broker rejected for good, to be dead-lettered under the same token.
    pub fn take_rejected(&self) -> Vec<(TxnToken, DeliveryError)> {
        std::mem::take(&mut *self.rejected.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Events handed to the producer whose outcome is not reported yet.
    pub fn in_flight(&self) -> u64 {
        let reported = self.reported_events.load(Ordering::Acquire);
        self.sent_events
            .load(Ordering::Acquire)
            .saturating_sub(reported)
    }

    /// Transactions tracked: from the oldest not fully acknowledged to the newest opened.
    pub fn pending_transactions(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }

    /// Opens an entry for a transaction that has (or may have) events.
    pub fn open(&self, origin: TxnOrigin) -> TxnToken {
        let mut s = self.lock();
        let token = s.next;
        s.next += 1;
        s.entries.push_back(Entry {
            end: Lsn::ZERO,
            sealed: false,
            outstanding: 0,
            commit_time_ms: origin.commit_time_ms,
            xid: origin.xid,
            commit_lsn: origin.commit_lsn,
            read_at: Some(Instant::now()),
        });
        self.pending
            .store(s.entries.len() as u64, Ordering::Release);
        self.telemetry
            .pending_transactions
            .store(s.entries.len() as u64, Ordering::Relaxed);
        token
    }

    /// The xid, commit LSN and commit time of a transaction still tracked.
    pub fn origin(&self, token: TxnToken) -> Option<TxnOrigin> {
        let s = self.lock();
        let idx = token.checked_sub(s.base)?;
        s.entries.get(idx as usize).map(|e| TxnOrigin {
            xid: e.xid,
            commit_lsn: e.commit_lsn,
            commit_time_ms: e.commit_time_ms,
        })
    }

    /// Seals a transaction: `events` were sent for it and it ends at `end`.
    pub fn seal(&self, token: TxnToken, events: u64, end: Lsn) {
        let mut s = self.lock();
        let Some(idx) = token.checked_sub(s.base) else {
            return;
        };
        if let Some(e) = s.entries.get_mut(idx as usize) {
            e.sealed = true;
            e.end = end;
            e.outstanding += i64::try_from(events).unwrap_or(i64::MAX);
        }
        self.advance(&mut s);
    }

    /// Completes one outstanding event of `token` without a delivery report: a rejected
    /// record whose dead letter an earlier run already published.
    pub fn settle(&self, token: TxnToken) {
        let mut s = self.lock();
        let idx = token.checked_sub(s.base);
        if let Some(e) = idx.and_then(|i| s.entries.get_mut(i as usize)) {
            e.outstanding -= 1;
            if idx == Some(0) {
                self.advance(&mut s);
            }
        }
    }

    /// Records a position with nothing to deliver (a transaction without outbox events, or a
    /// keepalive outside any transaction): complete now, in order.
    pub fn complete_empty(&self, end: Lsn) {
        let mut s = self.lock();
        match s.entries.back_mut() {
            None => {
                if end > s.safe {
                    s.safe = end;
                    self.safe.store(end.0, Ordering::Release);
                }
            }
            Some(tail) if tail.sealed => tail.end = tail.end.max(end),
            Some(_) => {
                // Only reachable if called while a transaction is open; keep order anyway.
                let token = s.next;
                s.next = token + 1;
                s.entries.push_back(Entry {
                    end,
                    sealed: true,
                    outstanding: 0,
                    commit_time_ms: 0,
                    xid: 0,
                    commit_lsn: Lsn::ZERO,
                    read_at: None,
                });
                self.pending
                    .store(s.entries.len() as u64, Ordering::Release);
                self.telemetry
                    .pending_transactions
                    .store(s.entries.len() as u64, Ordering::Relaxed);
            }
        }
    }

    fn advance(&self, s: &mut State) {
        let before = s.entries.len();
        let mut moved = false;
        let mut now_ms = None;
        // The monotonic clock for read -> ack (commit -> ack needs the wall clock: `now_ms`).
        let mut acked_at = None;
        while let Some(head) = s.entries.front() {
            if !(head.sealed && head.outstanding == 0) {
                break;
            }
            let end = head.end;
            let commit_time = head.commit_time_ms;
            if let Some(read_at) = head.read_at {
                let elapsed = acked_at
                    .get_or_insert_with(Instant::now)
                    .duration_since(read_at);
                let us = i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX);
                self.telemetry.read_to_ack.observe_us(us);
            }
            if commit_time != 0 {
                let now = *now_ms.get_or_insert_with(unix_ms);
                self.telemetry.observe_commit_to_ack(commit_time, now);
                self.telemetry
                    .last_acked_commit_ms
                    .fetch_max(commit_time, Ordering::Relaxed);
            }
            s.entries.pop_front();
            s.base += 1;
            if end > s.safe {
                s.safe = end;
                moved = true;
            }
        }
        if let Some(now) = now_ms {
            self.telemetry
                .last_delivery_ms
                .store(now, Ordering::Relaxed);
            self.telemetry.last_ack_ms.store(now, Ordering::Relaxed);
        }
        if s.entries.len() != before {
            let len = s.entries.len() as u64;
            self.pending.store(len, Ordering::Release);
            self.telemetry
                .pending_transactions
                .store(len, Ordering::Relaxed);
            let wake_at = self.wake_at_pending.load(Ordering::Acquire);
            if wake_at != u64::MAX && len <= wake_at {
                self.room.notify_one();
            }
        }
        if moved {
            self.safe.store(s.safe.0, Ordering::Release);
            if self.want_advance.load(Ordering::Acquire) {
                self.advanced.notify_one();
            }
        }
    }

    /// True once a delivery failed; the session must stop and [`take_failure`](Self::take_failure).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The first delivery failure, if any.
    pub fn take_failure(&self) -> Option<DeliveryError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Waits until at most `low_water` events are in flight and, with `pending_low` set, at
    /// most that many transactions are tracked; or a delivery fails, or `timeout` passes. Used
    /// for backpressure: the session stops reading meanwhile.
    pub async fn wait_for_room(
        &self,
        low_water: u64,
        pending_low: Option<u64>,
        timeout: std::time::Duration,
    ) {
        let notified = self.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.wake_at_in_flight.store(low_water, Ordering::Release);
        if let Some(p) = pending_low {
            self.wake_at_pending.store(p, Ordering::Release);
        }
        let full = self.in_flight() > low_water
            || pending_low.is_some_and(|p| self.pending_transactions() > p);
        if full && !self.has_failed() {
            let _ = tokio::time::timeout(timeout, notified).await;
        }
        self.wake_at_in_flight.store(u64::MAX, Ordering::Release);
        self.wake_at_pending.store(u64::MAX, Ordering::Release);
    }

    /// Resolves once every record sent is answered (a failure does not end the wait), or
    /// after `timeout`.
    pub async fn wait_for_answers(&self, timeout: std::time::Duration) {
        let notified = self.room.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.wake_at_in_flight.store(0, Ordering::Release);
        if self.in_flight() > 0 {
            let _ = tokio::time::timeout(timeout, notified).await;
        }
        self.wake_at_in_flight.store(u64::MAX, Ordering::Release);
    }

    /// Resolves once the safe position is beyond `reported` (or a delivery failed).
    pub async fn wait_for_advance(&self, reported: Lsn) {
        let notified = self.advanced.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.want_advance.store(true, Ordering::Release);
        if self.safe_lsn() <= reported && !self.has_failed() {
            notified.await;
        }
        self.want_advance.store(false, Ordering::Release);
    }
}

impl DeliveryListener for Progress {
    fn on_delivery(&self, token: usize, result: Result<usize, DeliveryError>) {
        // `last_delivery_ms` is stamped when transactions complete (in `advance`), every 256th
        // report and on failures: reading the clock per record would cost more than the rest
        // of this call. `last_ack_ms` likewise, for acknowledgements only.
        let acknowledged = result.is_ok();
        if let Err(e) = &result {
            self.telemetry
                .last_delivery_ms
                .store(unix_ms(), Ordering::Relaxed);
            // Records purged because the session's producer is going away were not refused by
            // anyone: the next session reads them again.
            if !e.is_purge() {
                self.telemetry.count_error(e.class());
            }
        }
        match result {
            Ok(bytes) => {
                self.telemetry
                    .events_published
                    .fetch_add(1, Ordering::Relaxed);
                self.telemetry
                    .bytes_published
                    .fetch_add(bytes as u64, Ordering::Relaxed);
                let mut s = self.lock();
                let idx = (token as u64).checked_sub(s.base);
                if let Some(e) = idx.and_then(|i| s.entries.get_mut(i as usize)) {
                    e.outstanding -= 1;
                    if idx == Some(0) {
                        self.advance(&mut s);
                    }
                }
            }
            Err(e)
                if self.dead_letter.load(Ordering::Acquire)
                    && e.class() == walship_kafka::ErrorClass::Record =>
            {
                // The event stays outstanding: its dead-letter record's ack completes it.
                self.rejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((token as u64, e));
                self.room.notify_one();
                self.advanced.notify_one();
            }
            Err(e) => {
                let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
                if f.is_none() && !self.failed.load(Ordering::Acquire) {
                    *f = Some(e);
                }
                self.failed.store(true, Ordering::Release);
                // Wake any waiter: the session must stop and report the failure.
                self.room.notify_one();
                self.advanced.notify_one();
            }
        }
        let reported = self.reported_events.fetch_add(1, Ordering::AcqRel) + 1;
        if reported.is_multiple_of(256) {
            // Also while one long transaction is being acknowledged (nothing completes).
            let now = unix_ms();
            self.telemetry
                .last_delivery_ms
                .store(now, Ordering::Relaxed);
            if acknowledged {
                self.telemetry.last_ack_ms.store(now, Ordering::Relaxed);
            }
        }
        let wake_at = self.wake_at_in_flight.load(Ordering::Acquire);
        if wake_at != u64::MAX
            && self
                .sent_events
                .load(Ordering::Acquire)
                .saturating_sub(reported)
                <= wake_at
        {
            self.room.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
