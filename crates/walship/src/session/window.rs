//! The send window: whether the session may hand the sink one more record, and how far the
//! acknowledgements must bring it down before the session looks again. Pure rules, no I/O.
//!
//! ```text
//!  records in flight  0 ──────── low water (max/2) ──────── max_in_flight   full: stop reading
//!  tracked txns       0 ──────────────────── max_pending-1 ─ max_pending     full: no new txn
//! ```
//!
//! Invariant: at most `max_in_flight` records are unacknowledged and at most `max_pending`
//! transactions tracked; a record of a transaction already tracked never waits for the
//! pending bound (its own entry holds it up, so that wait could never end). Waking at a
//! low-water mark rather than at every acknowledgement turns a wake-up per record into one per
//! half window; only when librdkafka's own queue is full below the window does the session
//! wake at the next acknowledgement, since the window alone would not wake it.

/// The bounds of one session's window (`run.max_in_flight`, `run.max_pending_transactions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    max_in_flight: u64,
    max_pending: u64,
}

/// What a session without room waits for: the in-flight count to drop to `in_flight`, and,
/// when set, the tracked transactions to drop to `pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Wake {
    pub(super) in_flight: u64,
    pub(super) pending: Option<u64>,
}

impl Window {
    /// The configured bounds, each at least 2 (a window of one has no low-water mark below it).
    pub(super) fn new(max_in_flight: u64, max_pending: u64) -> Self {
        Window {
            max_in_flight: max_in_flight.max(2),
            max_pending: max_pending.max(2),
        }
    }

    /// Whether one more record may be handed over now, with `in_flight` records unacknowledged
    /// and `pending` transactions tracked. `tracked`: the record's transaction has its entry
    /// already; otherwise the record adds one, so it needs room below the pending bound too.
    pub(super) fn has_room(self, in_flight: u64, pending: u64, tracked: bool) -> bool {
        in_flight < self.max_in_flight && (tracked || pending < self.max_pending)
    }

    /// Where a session that found no room waits until. `queue_full`: librdkafka's own queue
    /// refused the record (it can fill below the window, with a small
    /// `queue.buffering.max.messages`), so the next acknowledgement is worth a look.
    pub(super) fn wake(self, in_flight: u64, queue_full: bool, tracked: bool) -> Wake {
        let half = self.max_in_flight / 2;
        Wake {
            in_flight: if queue_full {
                in_flight.saturating_sub(1).min(half)
            } else {
                half
            },
            // Waiting for the pending bound: wake once the oldest transactions complete.
            pending: (!tracked).then(|| self.max_pending.saturating_sub(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_at_least_two() {
        let w = Window::new(0, 1);
        assert!(w.has_room(1, 1, false));
        assert!(!w.has_room(2, 0, true));
        assert!(!w.has_room(0, 2, false));
        assert_eq!(w.wake(2, false, true).in_flight, 1, "half of two");
    }

    #[test]
    fn room_below_the_in_flight_bound_and_for_a_new_transaction_below_the_pending_bound() {
        let w = Window::new(10, 3);
        assert!(w.has_room(9, 2, false));
        assert!(
            !w.has_room(10, 0, true),
            "the in-flight bound holds for every record"
        );
        assert!(
            !w.has_room(0, 3, false),
            "a new transaction waits for the pending bound"
        );
        assert!(
            w.has_room(0, 3, true),
            "a tracked transaction's record never waits for it"
        );
        assert!(w.has_room(0, 7, true));
    }

    #[test]
    fn a_full_window_wakes_at_half_and_a_full_queue_at_the_next_acknowledgement() {
        let w = Window::new(10, 3);
        assert_eq!(
            w.wake(10, false, true),
            Wake {
                in_flight: 5,
                pending: None
            }
        );
        assert_eq!(
            w.wake(10, false, false),
            Wake {
                in_flight: 5,
                pending: Some(2)
            }
        );
        // librdkafka's queue full below the window: one acknowledgement is enough.
        assert_eq!(w.wake(3, true, true).in_flight, 2);
        // ... but never later than the window's own low-water mark.
        assert_eq!(w.wake(9, true, true).in_flight, 5);
        assert_eq!(w.wake(0, true, true).in_flight, 0);
    }
}
