//! Tests of the progress tracker: the safe position and its order, timings and counts,
//! the pending bound, failures, and dead letters of rejected records.

use super::*;
use walship_kafka::{ErrorClass, Refusal};

fn ack(p: &Progress, token: TxnToken) {
    p.on_delivery(token as usize, Ok(1));
}

/// A delivery report failing with `error`.
fn failure(error: Refusal) -> DeliveryError {
    DeliveryError {
        position: None,
        id: None,
        topic: "t".into(),
        partition: 0,
        key: None,
        payload_len: 0,
        error,
    }
}

#[test]
fn safe_lsn_is_end_of_longest_acknowledged_prefix() {
    let p = Progress::new(Lsn(10));
    let a = p.open(TxnOrigin::default());
    p.seal(a, 2, Lsn(100));
    let b = p.open(TxnOrigin::default());
    p.seal(b, 1, Lsn(200));
    ack(&p, b);
    assert_eq!(
        p.safe_lsn(),
        Lsn(10),
        "b acked but a is not: nothing is safe"
    );
    ack(&p, a);
    assert_eq!(p.safe_lsn(), Lsn(10), "a has one more event outstanding");
    ack(&p, a);
    assert_eq!(p.safe_lsn(), Lsn(200), "a and b complete");
    assert_eq!(p.pending_transactions(), 0);
}

#[test]
fn each_acknowledged_transaction_is_timed_from_commit_and_from_read() {
    let telemetry = std::sync::Arc::new(Telemetry::default());
    let p = Progress::with_telemetry(Lsn(0), std::sync::Arc::clone(&telemetry));
    let origin = TxnOrigin {
        commit_time_ms: unix_ms() - 1000,
        ..TxnOrigin::default()
    };
    let a = p.open(origin);
    p.seal(a, 1, Lsn(100));
    p.complete_empty(Lsn(150));
    let b = p.open(origin);
    p.seal(b, 1, Lsn(200));
    ack(&p, a);
    let (_, commit_count, commit_sum) = telemetry.commit_to_ack.snapshot();
    let (_, read_count, read_sum) = telemetry.read_to_ack.snapshot();
    assert_eq!((commit_count, read_count), (1, 1), "a alone is complete");
    assert!(commit_sum >= 1.0, "committed a second before: {commit_sum}");
    assert!(read_sum < commit_sum, "read after its commit: {read_sum}");
    ack(&p, b);
    assert_eq!(telemetry.read_to_ack.snapshot().1, 2);
    assert_eq!(p.safe_lsn(), Lsn(200));
}

#[test]
fn acks_within_one_long_transaction_show_the_broker_answers() {
    let telemetry = std::sync::Arc::new(Telemetry::default());
    let p = Progress::with_telemetry(Lsn(0), std::sync::Arc::clone(&telemetry));
    let a = p.open(TxnOrigin::default());
    for _ in 0..300 {
        p.note_sent();
    }
    for _ in 0..255 {
        ack(&p, a);
    }
    assert_eq!(telemetry.last_delivery_ms.load(Ordering::Relaxed), 0);
    assert_eq!(telemetry.last_ack_ms.load(Ordering::Relaxed), 0);
    ack(&p, a);
    assert!(
        telemetry.last_delivery_ms.load(Ordering::Relaxed) > 0,
        "256 acks of a transaction still being read count as the broker answering"
    );
    assert!(
        telemetry.last_ack_ms.load(Ordering::Relaxed) > 0,
        "and as acknowledgements (walship_last_ack_timestamp_seconds)"
    );
    assert_eq!(p.safe_lsn(), Lsn(0), "the transaction is not complete");
}

#[test]
fn delivery_failures_are_counted_by_class() {
    let telemetry = std::sync::Arc::new(Telemetry::default());
    let p = Progress::with_telemetry(Lsn(0), std::sync::Arc::clone(&telemetry));
    let a = p.open(TxnOrigin::default());
    p.note_sent();
    p.on_delivery(
        a as usize,
        Err(failure(Refusal::new(
            ErrorClass::Record,
            "message size too large",
        ))),
    );
    assert_eq!(telemetry.errors_record.load(Ordering::Relaxed), 1);
    assert_eq!(telemetry.errors_transient.load(Ordering::Relaxed), 0);
    // Dropping a session's producer purges what it holds: not a refusal.
    let b = p.open(TxnOrigin::default());
    p.note_sent();
    p.on_delivery(
        b as usize,
        Err(failure(Refusal {
            purged: true,
            ..Refusal::new(ErrorClass::Transient, "purged in flight")
        })),
    );
    assert_eq!(telemetry.errors_transient.load(Ordering::Relaxed), 0);
}

#[test]
fn acks_before_seal_do_not_complete_an_open_transaction() {
    let p = Progress::new(Lsn(0));
    let a = p.open(TxnOrigin::default());
    ack(&p, a);
    ack(&p, a);
    assert_eq!(p.safe_lsn(), Lsn(0));
    p.seal(a, 3, Lsn(50));
    assert_eq!(p.safe_lsn(), Lsn(0), "one event still outstanding");
    ack(&p, a);
    assert_eq!(p.safe_lsn(), Lsn(50));
}

#[test]
fn empty_transactions_keep_their_place_without_entries() {
    let p = Progress::new(Lsn(0));
    p.complete_empty(Lsn(5));
    assert_eq!(p.safe_lsn(), Lsn(5), "nothing in flight: confirm at once");
    let a = p.open(TxnOrigin::default());
    p.seal(a, 1, Lsn(10));
    for end in 11..1000 {
        p.complete_empty(Lsn(end));
    }
    assert_eq!(
        p.pending_transactions(),
        1,
        "filtered transactions merge into the tail"
    );
    assert_eq!(
        p.safe_lsn(),
        Lsn(5),
        "must not pass the unacknowledged transaction"
    );
    ack(&p, a);
    assert_eq!(p.safe_lsn(), Lsn(999));
}

#[test]
fn never_moves_backwards() {
    let p = Progress::new(Lsn(100));
    p.complete_empty(Lsn(50));
    assert_eq!(p.safe_lsn(), Lsn(100));
}

#[test]
fn failed_delivery_stops_progress_and_is_reported_once() {
    let p = Progress::new(Lsn(0));
    let a = p.open(TxnOrigin::default());
    p.seal(a, 1, Lsn(10));
    let b = p.open(TxnOrigin::default());
    p.seal(b, 1, Lsn(20));
    p.on_delivery(
        a as usize,
        Err(failure(Refusal::new(
            ErrorClass::Record,
            "message size too large",
        ))),
    );
    ack(&p, b);
    assert!(p.has_failed());
    assert_eq!(
        p.safe_lsn(),
        Lsn(0),
        "the failed event's transaction never completes"
    );
    assert!(p.take_failure().is_some());
    assert!(p.take_failure().is_none());
}

#[test]
fn a_stalled_head_keeps_later_acknowledged_transactions_pending_until_it_completes() {
    let p = Progress::new(Lsn(0));
    let head = p.open(TxnOrigin::default());
    p.seal(head, 1, Lsn(10));
    for i in 0..50 {
        let t = p.open(TxnOrigin::default());
        p.seal(t, 1, Lsn(20 + i));
        ack(&p, t);
    }
    // Every later transaction is acknowledged, yet none can be confirmed before the head:
    // this is what `run.max_pending_transactions` bounds.
    assert_eq!(p.pending_transactions(), 51);
    assert_eq!(p.safe_lsn(), Lsn(0));
    ack(&p, head);
    assert_eq!(p.pending_transactions(), 0);
    assert_eq!(p.safe_lsn(), Lsn(69));
}

#[tokio::test]
async fn waiting_for_pending_room_wakes_when_the_head_completes() {
    let p = std::sync::Arc::new(Progress::new(Lsn(0)));
    let head = p.open(TxnOrigin::default());
    p.seal(head, 1, Lsn(10));
    for i in 0..9 {
        let t = p.open(TxnOrigin::default());
        p.seal(t, 1, Lsn(20 + i));
        ack(&p, t);
    }
    let waiter = {
        let p = std::sync::Arc::clone(&p);
        tokio::spawn(async move {
            p.wait_for_room(1000, Some(5), std::time::Duration::from_secs(60))
                .await;
        })
    };
    // Let the waiter register (it returns at once only if there is room already).
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "10 pending > 5: no room yet");
    ack(&p, head);
    tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .expect("woken when the head completed, long before the 60 s timeout")
        .expect("waiter");
}

#[test]
fn origin_and_settle_serve_dead_letters_of_rejected_records() {
    let p = Progress::new(Lsn(0));
    let origin = TxnOrigin {
        xid: 77,
        commit_lsn: Lsn(0x1234),
        commit_time_ms: 1_700_000_000_000,
    };
    let t = p.open(origin);
    p.seal(t, 2, Lsn(0x1300));
    assert_eq!(p.origin(t), Some(origin));
    ack(&p, t);
    p.settle(t);
    assert_eq!(p.safe_lsn(), Lsn(0x1300));
    assert_eq!(p.origin(t), None, "completed transactions are forgotten");
}
