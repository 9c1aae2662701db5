//! Stopping: finishing or abandoning the open transaction, holding the stream until the
//! producer is gone, a panic, a freeze.

use super::*;

#[tokio::test]
async fn a_stop_mid_transaction_finishes_the_transaction_first() {
    let mut h = start(settings(), None);
    h.begin(1, 0x200);
    h.insert(("1", "order", Some("A")));
    h.records(1).await;
    h.cancel.cancel();
    h.insert(("2", "order", Some("A")));
    let end = h.commit(0x200);
    let sent = h.records(2).await;
    h.ack(&sent, 0);
    h.ack(&sent, 1);
    let stats = h.end().await.unwrap();
    assert_eq!(stats.events_sent, 2, "the rest of the transaction was sent");
    // Both acknowledged before the end: the whole transaction is confirmed.
    assert_eq!(h.last_status(), end);
    assert!(h.finished());
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stop_holds_the_stream_reporting_status_until_its_records_are_acknowledged() {
    let mut h = start(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        None,
    );
    let end = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let sent = h.records(1).await;
    h.cancel.cancel();
    // The acknowledgement is slow: the walsender keeps hearing from the session meanwhile
    // (three more status reports), and the stream is neither finished nor released.
    let before = h.statuses();
    h.until_status("status while the acknowledgement is awaited", |s| {
        s.statuses.len() >= before + 3
    })
    .await;
    assert!(
        h.wal.ends.lock().unwrap().is_empty(),
        "let go before the ack"
    );
    h.ack(&sent, 0);
    h.end().await.unwrap();
    assert_eq!(h.last_status(), end);
    assert_eq!(h.sink.state.lock().unwrap().purged, 0);
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stop_whose_acknowledgements_never_come_lets_the_stream_go_after_the_timeout_and_the_close()
 {
    let gate = Arc::new(Notify::new());
    let held = Arc::clone(&gate);
    let mut h = start_with(settings(), None, move |s| s.close_gate = Some(held));
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.records(1).await;
    let stopped = tokio::time::Instant::now();
    let before = h.statuses();
    h.cancel.cancel();
    // Status every 50 ms: twelve reports span the 300 ms shutdown timeout and then some of the
    // producer's (slow) destruction. The stream stays meanwhile.
    h.until_status("status through the timeout and the close", |s| {
        s.statuses.len() >= before + 12
    })
    .await;
    assert!(stopped.elapsed() > settings().shutdown_timeout);
    assert!(
        h.wal.ends.lock().unwrap().is_empty(),
        "let go before the close"
    );
    gate.notify_one();
    h.end().await.unwrap();
    assert!(stopped.elapsed() >= settings().shutdown_timeout);
    assert!(
        h.last_status() < first,
        "an unacknowledged transaction was confirmed"
    );
    assert_eq!(h.sink.state.lock().unwrap().purged, 1);
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test]
async fn an_abandoned_session_does_not_wait_for_acknowledgements() {
    let abandon = CancellationToken::new();
    let mut h = start_abandonable(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        abandon.clone(),
    );
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.records(1).await;
    abandon.cancel();
    h.cancel.cancel();
    h.end().await.unwrap();
    assert!(h.last_status() < first);
    assert_eq!(h.sink.state.lock().unwrap().purged, 1);
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test]
async fn an_abandoned_session_waiting_for_room_ends_at_once() {
    let abandon = CancellationToken::new();
    let mut h = start_abandonable(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            max_in_flight: 2,
            ..settings()
        },
        abandon.clone(),
    );
    // Two records fill the window; the third waits for room that never comes (a broker cut off).
    let first = h.txn(
        1,
        0x200,
        &[
            ("1", "order", Some("A")),
            ("2", "order", Some("A")),
            ("3", "order", Some("A")),
        ],
    );
    h.records(2).await;
    abandon.cancel();
    h.cancel.cancel();
    h.end().await.unwrap();
    assert_eq!(
        h.sink.state.lock().unwrap().sent.len(),
        2,
        "sent after the abandon"
    );
    assert!(h.last_status() < first);
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test]
async fn an_abandoned_session_waiting_for_the_broker_mid_transaction_ends_at_once() {
    let gate = Arc::new(Notify::new());
    let abandon = CancellationToken::new();
    let held = Arc::clone(&gate);
    let mut h = start_configured(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        None,
        |s| {
            s.known.insert("outbox.event.order".into());
            s.topic_gate = Some(held);
        },
        |s| s.abandon_on(abandon.clone()),
    );
    // The first event went out; the second needs a topic check the broker does not answer.
    h.begin(1, 0x200);
    h.insert(("1", "order", Some("A")));
    h.insert(("2", "invoice", Some("B")));
    let end = h.commit(0x200);
    h.records(1).await;
    h.until_sink("the topic check", |s| (s.topic_checks > 0).then_some(()))
        .await;
    abandon.cancel();
    h.cancel.cancel();
    h.end().await.unwrap();
    assert_eq!(h.sink.state.lock().unwrap().sent.len(), 1);
    assert!(h.last_status() < end);
    h.ends();
    drop(gate);
}

#[tokio::test]
async fn a_session_that_panics_still_closes_its_sink_before_letting_the_stream_go() {
    let mut h = start_with(settings(), None, |s| s.panic_on_send = true);
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let task = h.task.take().expect("running");
    let joined = tokio::time::timeout(WAIT, task).await.expect("ended");
    assert!(joined.is_err_and(|e| e.is_panic()), "the panic goes on");
    h.ends();
}

#[tokio::test(start_paused = true)]
async fn a_session_that_was_silent_too_long_publishes_nothing_more_of_what_it_read() {
    let mut h = start_with_limit(Some(Duration::from_millis(400)));
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let sent = h.records(1).await;
    h.ack(&sent, 0);
    // Frozen: the runtime does not run the session for longer than the limit allows, while
    // frames it had read wait in its buffer.
    h.txn(2, 0x300, &[("2", "order", Some("B"))]);
    // The clock jumps past the limit before the session runs again, as after a freeze.
    tokio::time::advance(Duration::from_millis(700)).await;
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Silenced { .. }), "{error}");
    assert!(error.is_transient());
    assert!(error.to_string().contains("wal_sender_timeout"), "{error}");
    assert_eq!(h.records(1).await.len(), 1, "published after the freeze");
    assert_eq!(h.ends(), ["sink closed", "stream released"]);
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_the_producer_queue_is_full_abandons_the_open_transaction() {
    let mut h = start_with(settings(), None, |s| s.queue_full = true);
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.until_sink("a refused send", |s| (s.refused > 0).then_some(()))
        .await;
    let stats = h.stop().await.unwrap();
    assert_eq!(stats.events_sent, 0);
    assert!(h.sink.state.lock().unwrap().sent.is_empty());
    assert!(
        h.last_status() < first,
        "the abandoned transaction was confirmed"
    );
    assert!(h.finished());
}

#[tokio::test]
async fn a_stop_during_a_topic_check_does_not_wait_for_the_broker() {
    let gate = Arc::new(Notify::new());
    let held = Arc::clone(&gate);
    let mut h = start_with(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        None,
        move |s| s.topic_gate = Some(held),
    );
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.until_sink("a topic check", |s| (s.topic_checks > 0).then_some(()))
        .await;
    // Nothing of the transaction was sent: the stop abandons it at once, although the
    // shutdown timeout is an hour.
    let stats = h.stop().await.unwrap();
    assert_eq!(stats.events_sent, 0);
    assert!(h.last_status() < first);
    drop(gate);
}

/// With a producer other pipelines share, a session that ends on an error while it holds the
/// stream lets its records' acknowledgements arrive first (reporting status): closing with
/// them in flight would purge the others' records too.
#[tokio::test(start_paused = true)]
async fn an_error_with_a_shared_producer_lets_the_acknowledgements_arrive_before_the_close() {
    let mut h = start_with(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        None,
        |s| s.shares = true,
    );
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let sent = h.records(1).await;
    // A bad row under `fail` ends the session while the first record is in flight.
    h.txn(2, 0x300, &[("2", "order", None)]);
    let before = h.statuses();
    h.until_status("status while the acknowledgement is awaited", |s| {
        s.statuses.len() >= before + 3
    })
    .await;
    assert!(
        h.wal.ends.lock().unwrap().is_empty(),
        "closed with a record in flight"
    );
    h.ack(&sent, 0);
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Row { xid: 2, .. }), "{error}");
    assert_eq!(h.sink.state.lock().unwrap().purged, 0, "nothing purged");
    assert_eq!(h.ends(), ["sink closed", "stream released"]);
}

/// ...but not after a freeze: the slot may be another process's already, and what this one
/// queued must not go out.
#[tokio::test(start_paused = true)]
async fn a_frozen_session_with_a_shared_producer_closes_at_once() {
    let timeout = Duration::from_millis(400) * 4 / 3;
    let mut h = start_configured(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        None,
        |s| s.shares = true,
        |s| s.silence_limit(Some(timeout)),
    );
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.records(1).await;
    h.txn(2, 0x300, &[("2", "order", Some("B"))]);
    tokio::time::advance(Duration::from_millis(700)).await;
    let thawed = tokio::time::Instant::now();
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Silenced { .. }), "{error}");
    assert!(
        thawed.elapsed() < Duration::from_secs(60),
        "waited {:?} for acknowledgements after a freeze",
        thawed.elapsed()
    );
    assert_eq!(h.sink.state.lock().unwrap().purged, 1, "purged at once");
}
