//! Resume after an unclean stop: what the topics hold is skipped, the rest is sent.

use super::*;

#[tokio::test]
async fn resume_skips_what_the_topic_holds_and_the_transaction_completes_on_the_rest() {
    let resume = Resume::new(START, Lsn(0x1000));
    let mut h = start_with(settings(), Some(resume), |s| {
        s.found.insert(
            "outbox.event.order".into(),
            vec![(at(0x200, 0), "1"), (at(0x200, 1), "2")],
        );
    });
    let end = h.txn(
        1,
        0x200,
        &[
            ("1", "order", Some("A")),
            ("2", "order", Some("A")),
            ("3", "order", Some("A")),
        ],
    );
    let sent = h.records(1).await;
    assert_eq!(
        sent[0].headers["id"], b"3",
        "events 1 and 2 were already delivered"
    );
    assert_eq!(sent[0].position(), at(0x200, 2));
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
    assert_eq!(
        h.sink.state.lock().unwrap().read_backs,
        ["outbox.event.order"]
    );
}

#[tokio::test]
async fn resume_sends_again_from_the_first_event_of_a_key_it_did_not_find() {
    let resume = Resume::new(START, Lsn(0x1000));
    let mut h = start_with(settings(), Some(resume), |s| {
        // The topic holds event 2 of key A but not event 1 (lost in flight), and event 3 of B.
        s.found.insert(
            "outbox.event.order".into(),
            vec![(at(0x200, 1), "2"), (at(0x200, 2), "3")],
        );
    });
    let end = h.txn(
        1,
        0x200,
        &[
            ("1", "order", Some("A")),
            ("2", "order", Some("A")),
            ("3", "order", Some("B")),
        ],
    );
    // A's event 2 is sent again so it cannot be the last word before event 1; B's is skipped.
    let sent = h.records(2).await;
    assert_eq!(keys(&sent), ["A", "A"]);
    assert_eq!(sent[1].headers["id"], b"2");
    h.ack(&sent, 0);
    h.ack(&sent, 1);
    h.until_confirmed(end).await;
    assert_eq!(h.sink.state.lock().unwrap().sent.len(), 2);
}

#[tokio::test]
async fn resume_ends_once_the_stream_passes_what_an_earlier_run_can_have_sent() {
    let resume = Resume::new(START, Lsn(0x300));
    let mut h = start_with(settings(), Some(resume), |s| {
        s.found
            .insert("outbox.event.order".into(), vec![(at(0x400, 0), "9")]);
    });
    // Committed after the server's position at start: never looked up, never skipped.
    let end = h.txn(1, 0x400, &[("9", "order", Some("A"))]);
    let sent = h.records(1).await;
    assert!(h.sink.state.lock().unwrap().read_backs.is_empty());
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
}
