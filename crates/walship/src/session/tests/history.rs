//! Published events and the server's history: the check after a promotion, timelines.

use super::*;

/// Timeline 2, which branched from 1 at 0x300.
fn promoted() -> walship_postgres::failover::History {
    walship_postgres::failover::History {
        timeline: 2,
        switches: vec![walship_postgres::failover::TimelineSwitch {
            timeline: 1,
            end: Lsn(0x300),
        }],
    }
}

#[tokio::test]
async fn after_a_promotion_records_beyond_the_branch_stop_the_session_before_its_first_record() {
    let mut h = start_configured(
        settings(),
        None,
        |s| {
            s.found_on.insert(
                "outbox.event.order".into(),
                vec![
                    (at(0x200, 0), "1", 1),
                    (at(0x300, 0), "2", 1),
                    (at(0x380, 0), "3", 1),
                ],
            );
        },
        |s| {
            s.on_server(promoted(), "pg2:5432", 0).check_published(
                vec!["outbox.event.order".into()],
                START,
                Arc::default(),
            )
        },
    );
    h.txn(1, 0x400, &[("9", "order", Some("A"))]);
    let error = h.end().await.unwrap_err();
    let Error::Fork {
        records,
        first,
        last,
        record_timeline,
        ended,
        next_epoch,
        ..
    } = &error
    else {
        panic!("{error}");
    };
    // Every record of timeline 1 since the slot's position is named, the newest past its end.
    assert_eq!((*records, *first, *last), (3, at(0x200, 0), at(0x380, 0)));
    assert_eq!(
        (*record_timeline, *ended, *next_epoch),
        (1, Some(Lsn(0x300)), 1)
    );
    assert!(!error.is_transient());
    let text = error.to_string();
    assert!(
        text.contains("pg2:5432")
            && text.contains("0/200:0 to 0/380:0")
            && text.contains("past where timeline 1 ended (0/300)")
            && text.contains("which began at 0/300")
            && text.contains("Nothing was published or confirmed")
            && text.contains("postgres.source_epoch = 1"),
        "{text}"
    );
    assert!(
        h.sink.state.lock().unwrap().sent.is_empty(),
        "published on a fork"
    );
    assert!(h.last_status() < Lsn(0x400));
    h.ends();
}

#[tokio::test]
async fn after_a_promotion_records_within_the_history_let_the_session_go_on_naming_its_timeline() {
    let mut h = start_configured(
        settings(),
        Some(Resume::new(START, Lsn(0x1000))),
        |s| {
            s.found_on.insert(
                "outbox.event.order".into(),
                vec![(at(0x200, 0), "1", 1), (at(0x400, 0), "2", 2)],
            );
        },
        |s| {
            s.on_server(promoted(), "pg2:5432", 0).check_published(
                vec!["outbox.event.order".into()],
                START,
                Arc::default(),
            )
        },
    );
    let end = h.txn(
        1,
        0x400,
        &[("2", "order", Some("A")), ("3", "order", Some("A"))],
    );
    // Event 2 was published on this timeline by an earlier session: the check's read-back
    // serves the resume lookup too, without a second read.
    let sent = h.records(1).await;
    assert_eq!(sent[0].headers["id"], b"3");
    assert_eq!(sent[0].headers["walship.timeline"], b"2");
    assert_eq!(
        h.sink.state.lock().unwrap().read_backs,
        ["outbox.event.order"]
    );
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
}

#[tokio::test]
async fn a_resume_lookup_that_finds_a_later_timeline_stops_an_old_primary() {
    let resume = Resume::new(START, Lsn(0x1000));
    let mut h = start_with(settings(), Some(resume), |s| {
        s.found_on
            .insert("outbox.event.order".into(), vec![(at(0x200, 0), "1", 2)]);
    });
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let error = h.end().await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::Fork {
                record_timeline: 2,
                timeline: 1,
                ..
            }
        ),
        "{error}"
    );
    assert!(h.sink.state.lock().unwrap().sent.is_empty());
    h.ends();
}

#[tokio::test]
async fn every_record_names_the_timeline_whose_wal_holds_its_commit() {
    let mut h = start_configured(
        settings(),
        None,
        |_| {},
        |s| s.on_server(promoted(), "pg2", 0),
    );
    // Read again from before the branch point (0x300): timeline 1's; after it: 2's.
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x400, &[("2", "order", Some("A"))]);
    let sent = h.records(2).await;
    assert_eq!(sent[0].headers["walship.timeline"], b"1");
    assert_eq!(sent[1].headers["walship.timeline"], b"2");
    let mut first = start(settings(), None);
    first.txn(1, 0x200, &[("1", "order", Some("A"))]);
    assert_eq!(first.records(1).await[0].headers["walship.timeline"], b"1");
}

#[tokio::test]
async fn records_of_earlier_versions_without_a_timeline_are_not_judged() {
    let mut h = start_configured(
        settings(),
        Some(Resume::new(START, Lsn(0x1000))),
        |s| {
            // Past the branch point, without a timeline header: unknown, not a fork.
            s.found
                .insert("outbox.event.order".into(), vec![(at(0x380, 0), "7")]);
        },
        |s| {
            s.on_server(promoted(), "pg2:5432", 0).check_published(
                vec!["outbox.event.order".into()],
                START,
                Arc::default(),
            )
        },
    );
    let end = h.txn(1, 0x400, &[("8", "order", Some("A"))]);
    let sent = h.records(1).await;
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
}
