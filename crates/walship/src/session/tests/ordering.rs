//! Ordering and confirmation: events leave in WAL order, and the slot moves only behind
//! every acknowledgement of a prefix of transactions.

use super::*;

#[tokio::test]
async fn events_leave_in_wal_order_with_their_positions_and_headers() {
    let mut h = start(settings(), None);
    h.txn(
        1,
        0x200,
        &[("1", "order", Some("A")), ("2", "user", Some("B"))],
    );
    h.txn(2, 0x300, &[("3", "order", Some("A"))]);
    let sent = h.records(3).await;
    assert_eq!(keys(&sent), ["A", "B", "A"]);
    assert_eq!(
        sent.iter().map(|s| s.topic.as_str()).collect::<Vec<_>>(),
        [
            "outbox.event.order",
            "outbox.event.user",
            "outbox.event.order"
        ]
    );
    let positions: Vec<_> = sent
        .iter()
        .map(|s| (s.position().commit_lsn, s.position().index))
        .collect();
    assert_eq!(positions, [(0x200, 0), (0x200, 1), (0x300, 0)]);
    assert_eq!(sent[0].headers["walship.source"], b"7/walship");
    assert_eq!(sent[0].headers["id"], b"1");
    assert_eq!(sent[0].headers["type"], b"created");
    assert_eq!(sent[0].payload.as_deref(), Some(&br#"{"id":"1"}"#[..]));
}

#[tokio::test]
async fn the_slot_moves_only_behind_every_ack_of_a_prefix_of_transactions() {
    let mut h = start(settings(), None);
    let first = h.txn(
        1,
        0x200,
        &[("1", "order", Some("A")), ("2", "order", Some("B"))],
    );
    let second = h.txn(2, 0x300, &[("3", "order", Some("C"))]);
    let sent = h.records(3).await;
    // The later transaction is acknowledged first (another partition): nothing moves.
    h.ack(&sent, 2);
    assert_eq!(h.confirmed_now(second).await, START);
    // Half of the first: still nothing.
    h.ack(&sent, 1);
    assert_eq!(h.confirmed_now(second).await, START);
    // The whole prefix: both transactions, promptly.
    h.ack(&sent, 0);
    h.until_confirmed(second).await;
    assert!(second > first);
    let stats = h.stop().await.unwrap();
    assert_eq!((stats.events_sent, stats.transactions), (3, 2));
    assert!(h.finished(), "a graceful stop ends the stream cleanly");
}

#[tokio::test]
async fn a_keepalive_outside_a_transaction_confirms_its_position_and_inside_one_does_not() {
    let mut h = start(settings(), None);
    // Idle: the server has sent everything before 0x180, none of it an event.
    h.keepalive(Lsn(0x180), false);
    h.until_confirmed(Lsn(0x180)).await;
    // Inside a transaction whose event is not acknowledged, a keepalive confirms nothing.
    h.begin(1, 0x200);
    h.insert(("1", "order", Some("A")));
    let sent = h.records(1).await;
    assert_eq!(h.confirmed_now(Lsn(0x1F0)).await, Lsn(0x180));
    let end = h.commit(0x200);
    assert_eq!(h.confirmed_now(end).await, Lsn(0x180));
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
    // And after it, the keepalive's position again.
    h.keepalive(Lsn(0x400), false);
    h.until_confirmed(Lsn(0x400)).await;
}

#[tokio::test]
async fn a_transaction_without_outbox_rows_is_confirmed_once_the_earlier_ones_are() {
    let mut h = start(settings(), None);
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.begin(2, 0x300);
    let empty = h.commit(0x300);
    let sent = h.records(1).await;
    assert_eq!(h.confirmed_now(empty).await, START);
    h.ack(&sent, 0);
    h.until_confirmed(empty).await;
    assert!(empty > first);
}

#[tokio::test]
async fn the_pending_bound_holds_reading_until_the_oldest_transaction_completes() {
    let mut h = start(
        SessionSettings {
            max_pending: 2,
            ..settings()
        },
        None,
    );
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x300, &[("2", "order", Some("B"))]);
    let third = h.txn(3, 0x400, &[("3", "order", Some("C"))]);
    let sent = h.records(2).await;
    // Two transactions are tracked: the third waits, its record not handed over, while the
    // walsender keeps hearing from the session...
    let statuses = h.wal.state.lock().unwrap().statuses.len();
    h.until_status("standby status while waiting", |s| {
        s.statuses.len() >= statuses + 2
    })
    .await;
    assert_eq!(h.sink.state.lock().unwrap().sent.len(), 2);
    // ...until the oldest completes.
    h.ack(&sent, 0);
    let sent = h.records(3).await;
    assert_eq!(keys(&sent), ["A", "B", "C"]);
    h.ack(&sent, 1);
    h.ack(&sent, 2);
    h.until_confirmed(third).await;
}
