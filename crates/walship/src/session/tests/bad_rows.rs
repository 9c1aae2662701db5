//! Bad rows, refused records and failed deliveries: the bad-row policy and dead letters.

use super::*;

#[tokio::test]
async fn a_bad_row_under_fail_stops_the_session_before_its_transaction_is_confirmed() {
    let mut h = start(settings(), None);
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x300, &[("2", "order", None)]);
    let sent = h.records(1).await;
    h.ack(&sent, 0);
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Row { xid: 2, .. }), "{error}");
    assert!(error.to_string().contains("aggregateid"), "{error}");
    // The first transaction may be confirmed; never the bad one.
    assert!(h.last_status() <= first);
}

#[tokio::test]
async fn a_bad_row_is_dead_lettered_in_its_place_and_confirmed_behind_its_dead_letter() {
    let mut h = start(
        SessionSettings {
            dead_letter_topic: Some("outbox.dead-letter".into()),
            ..settings()
        },
        None,
    );
    let end = h.txn(1, 0x200, &[("1", "order", Some("A")), ("2", "order", None)]);
    let sent = h.records(2).await;
    assert_eq!(sent[1].topic, "outbox.dead-letter");
    let reason = String::from_utf8(sent[1].headers["walship.error"].clone()).unwrap();
    assert!(reason.contains("aggregateid"), "{reason}");
    assert_eq!(sent[1].headers["walship.table"], b"public.outbox");
    // The value is the whole row, as JSON, so nothing of it is lost.
    let value = String::from_utf8(sent[1].payload.clone().unwrap_or_default()).unwrap();
    assert!(
        value.contains(r#""id":"2""#) && value.contains(r#""aggregateid":null"#),
        "{value}"
    );
    assert_eq!(
        sent[1].position(),
        Position {
            commit_lsn: 0x200,
            index: 1
        }
    );
    h.ack(&sent, 0);
    assert_eq!(
        h.confirmed_now(end).await,
        START,
        "the dead letter is not acknowledged yet"
    );
    h.ack(&sent, 1);
    h.until_confirmed(end).await;
}

fn dead_lettering() -> SessionSettings {
    SessionSettings {
        dead_letter_topic: Some("outbox.dead-letter".into()),
        ..settings()
    }
}

#[tokio::test]
async fn an_oversized_bad_row_is_dead_lettered_cut_to_fit_with_its_size() {
    let mut h = start(
        SessionSettings {
            max_record_bytes: 4_000,
            ..dead_lettering()
        },
        None,
    );
    let big = "x".repeat(10_000);
    let end = h.txn(1, 0x200, &[(&big, "order", None)]);
    let sent = h.records(1).await;
    let dead = &sent[0];
    assert_eq!(dead.topic, "outbox.dead-letter");
    let value = dead.payload.clone().unwrap_or_default();
    let headers: usize = dead.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(!value.is_empty() && value.len() < 10_000, "{}", value.len());
    assert!(
        value.len() + headers + dead.key.len() <= 4_000,
        "{} + {headers} does not fit",
        value.len()
    );
    let full: usize = String::from_utf8(dead.headers["walship.truncated"].clone())
        .unwrap()
        .parse()
        .unwrap();
    assert!(full > 10_000, "the original JSON's size: {full}");
    assert!(value.starts_with(b"{"), "the value is the row's JSON, cut");
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
}

#[tokio::test]
async fn a_dead_letter_the_producer_refuses_is_sent_once_without_its_value_then_stops() {
    let mut h = start_with(dead_lettering(), None, |s| {
        s.refuse_dead_letters = Some(too_large());
    });
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x300, &[("2", "order", None)]);
    let sent = h.records(1).await;
    h.ack(&sent, 0);
    let error = h.end().await.unwrap_err();
    assert!(
        matches!(error, Error::DeadLetterRefused { xid: 2, .. }),
        "{error}"
    );
    assert!(!error.is_transient());
    assert!(error.to_string().contains("outbox.dead-letter"), "{error}");
    assert_eq!(
        h.sink.state.lock().unwrap().refused,
        2,
        "once with its value, once without"
    );
    assert!(h.last_status() <= first, "confirmed past the row");
    h.ends();
}

#[tokio::test]
async fn a_dead_letter_the_broker_refuses_twice_stops_without_confirming_its_row() {
    let mut h = start(dead_lettering(), None);
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x300, &[("2", "order", None)]);
    let sent = h.records(2).await;
    h.ack(&sent, 0);
    assert!(!sent[1].payload.as_ref().is_none_or(Vec::is_empty));
    h.fail(
        &sent,
        1,
        Refusal::new(ErrorClass::Record, "invalid timestamp"),
    );
    // Sent again in its place, without its value.
    let sent = h.records(3).await;
    assert_eq!(sent[2].topic, "outbox.dead-letter");
    assert_eq!(sent[2].payload.as_deref(), Some(&b""[..]));
    assert_eq!(sent[2].token, sent[1].token);
    h.fail(
        &sent,
        2,
        Refusal::new(ErrorClass::Record, "invalid timestamp"),
    );
    let error = h.end().await.unwrap_err();
    assert!(
        matches!(error, Error::DeadLetterRefused { xid: 2, .. }),
        "{error}"
    );
    assert_eq!(h.records(3).await.len(), 3, "no third attempt");
    assert!(h.last_status() <= first, "confirmed past the row");
    h.ends();
}

#[tokio::test]
async fn a_record_the_broker_refuses_is_dead_lettered_and_its_transaction_waits_for_it() {
    let mut h = start(
        SessionSettings {
            dead_letter_topic: Some("outbox.dead-letter".into()),
            ..settings()
        },
        None,
    );
    let end = h.txn(
        1,
        0x200,
        &[("1", "order", Some("A")), ("2", "order", Some("B"))],
    );
    let sent = h.records(2).await;
    h.ack(&sent, 0);
    h.fail(&sent, 1, too_large());
    let sent = h.records(3).await;
    let dead = &sent[2];
    assert_eq!(dead.topic, "outbox.dead-letter");
    assert_eq!(dead.key, b"B");
    assert_eq!(
        dead.token, sent[1].token,
        "the dead letter takes the refused record's place"
    );
    assert_eq!(dead.position(), sent[1].position());
    assert_eq!(h.confirmed_now(end).await, START);
    h.ack(&sent, 2);
    h.until_confirmed(end).await;
}

#[tokio::test]
async fn a_failed_delivery_stops_the_session_without_confirming_its_transaction() {
    let mut h = start(settings(), None);
    let end = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let sent = h.records(1).await;
    h.fail(
        &sent,
        0,
        Refusal::new(ErrorClass::Transient, "message timed out"),
    );
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Delivery(_)), "{error}");
    assert!(
        error.is_transient(),
        "a timed-out delivery is retried by reconnecting"
    );
    assert!(h.last_status() < end);
}

#[tokio::test]
async fn a_nontransactional_message_with_an_outbox_prefix_is_a_bad_row() {
    let mut h = start(settings(), None);
    h.push(Message::Message(LogicalMessage {
        xid: None,
        flags: 0,
        lsn: Lsn(0x180),
        prefix: "outbox".into(),
        content: Bytes::from_static(br#"{"aggregatetype":"order","aggregateid":"A"}"#),
    }));
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Message { xid: None, .. }), "{error}");
    assert!(h.last_status() < Lsn(0x180));
}
