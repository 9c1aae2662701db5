//! The inbox (`walship-inbox`): a consumer applies every event exactly once, in commit order per
//! key, whatever walship and the consumer go through — walship killed and resumed, a hand-over
//! from a frozen (SIGSTOP) owner whose late batches land after its successor's, the consumer
//! itself killed -9 between its database commit and its offset commit, and a replay of the whole
//! topic by a new consumer group.
//!
//! The consumer runs as a separate process (this test binary started again on
//! [`consumer::consumer_process`]), so its kill -9 is real. It applies events to a database of its own;
//! the checks compare that database with the producer's outbox table.
//!
//! PostgreSQL 15 only (`scripts/test.sh`): the inbox's SQL (`pg_lsn`, `ON CONFLICT`) is the same
//! on every supported version, and the walship behaviour it relies on is tested across versions
//! by the reliability and handover suites.

mod consumer;
mod hand_over;

use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use tokio_postgres::Client;
use walship_inbox::{Admission, Error, Inbox, POSITION_HEADER, SOURCE_HEADER, Unmarked};

use crate::harness::postgres::connect;
use crate::harness::{TestDb, until_async};

/// A record as walship writes it (or, without `source`, as another producer might).
fn record(partition: i32, offset: i64, headers: &[(&str, &str)]) -> OwnedMessage {
    let mut owned = OwnedHeaders::new();
    for (key, value) in headers {
        owned = owned.insert(Header {
            key,
            value: Some(*value),
        });
    }
    OwnedMessage::new(
        Some(b"{}".to_vec()),
        Some(b"k".to_vec()),
        "orders".into(),
        Timestamp::NotAvailable,
        partition,
        offset,
        Some(owned),
    )
}

fn walship_record(partition: i32, offset: i64, source: &str, position: &str) -> OwnedMessage {
    record(
        partition,
        offset,
        &[
            ("id", &format!("e-{offset}")),
            (SOURCE_HEADER, source),
            (POSITION_HEADER, position),
        ],
    )
}

/// Admits `m` in a transaction of its own and commits it.
async fn admit(inbox: &Inbox, client: &mut Client, m: &OwnedMessage) -> Result<Admission, Error> {
    let tx = client.transaction().await.expect("begin");
    let admission = inbox.admit(&tx, m).await;
    if admission.is_ok() {
        tx.commit().await.expect("commit");
    }
    admission
}

/// The mark against a real PostgreSQL: it rises per topic, partition and source, in the
/// stream's order (commit LSN, then index — across the 32-bit halves of the LSN); a copy at or
/// below it is a duplicate; a rolled-back transaction leaves it where it was; records of other
/// producers follow the configured choice; a malformed position is an error, not a skip.
#[tokio::test]
async fn the_mark_admits_each_position_once_per_partition_and_source() {
    let db = TestDb::new().await;
    let mut client = connect(&db.url).await;
    let inbox = Inbox::new();
    inbox.create_tables(&client).await.expect("create tables");
    inbox.create_tables(&client).await.expect("idempotent");
    let (s1, s2) = ("7305/orders", "7305/orders-after-promotion");
    use Admission::{Apply, Duplicate};
    for (partition, offset, source, position, expected) in [
        (0, 0, s1, "0/16B3F2:0", Apply),
        (0, 1, s1, "0/16B3F2:1", Apply),
        (0, 2, s1, "0/16B3F2:1", Duplicate), // a resume's copy
        (0, 3, s1, "0/16B3F2:0", Duplicate), // a late copy below the mark
        (0, 4, s1, "0/FFFFFFFF:0", Apply),
        (0, 5, s1, "1/0:0", Apply), // the LSN's high half: ordered as a pg_lsn, not as text
        (0, 6, s1, "0/FFFFFFFF:9", Duplicate),
        (1, 0, s1, "0/16B3F2:0", Apply), // another partition has its own mark
        (0, 7, s2, "0/1:0", Apply),      // so has another source
        (0, 8, s1, "1/0:0", Duplicate),
    ] {
        let m = walship_record(partition, offset, source, position);
        assert_eq!(
            admit(&inbox, &mut client, &m).await.expect("admit"),
            expected,
            "partition {partition} offset {offset} {source} {position}"
        );
    }
    // The statements prepared on the connection decide alike.
    let prepared = inbox.prepare(&client).await.expect("prepare");
    for (offset, position, expected) in [
        (0, "1/0:0", Apply),
        (1, "1/0:0", Duplicate),
        (2, "0/5:0", Duplicate),
        (3, "2/0:0", Apply),
    ] {
        let m = walship_record(3, offset, s1, position);
        let tx = client.transaction().await.expect("begin");
        assert_eq!(prepared.admit(&tx, &m).await.expect("admit"), expected);
        tx.commit().await.expect("commit");
    }
    // A transaction that rolls back (the handler failed) leaves the mark where it was.
    let m = walship_record(0, 9, s1, "1/0:1");
    let tx = client.transaction().await.expect("begin");
    assert_eq!(inbox.admit(&tx, &m).await.expect("admit"), Apply);
    tx.rollback().await.expect("rollback");
    assert_eq!(admit(&inbox, &mut client, &m).await.expect("admit"), Apply);
    let row = client
        .query_one(
            "SELECT commit_lsn::text, event_index, kafka_offset FROM walship_inbox \
             WHERE topic = 'orders' AND kafka_partition = 0 AND source = $1",
            &[&s1],
        )
        .await
        .expect("mark");
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        ("1/0".into(), 1, 9)
    );

    // A malformed position: an error naming the record and the header; nothing changes.
    let bad = walship_record(0, 10, s1, "1/0");
    let err = admit(&inbox, &mut client, &bad).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("topic orders partition 0 offset 10")
            && text.contains("walship.position")
            && text.contains("\"1/0\""),
        "{text}"
    );
    assert!(!err.is_transient());
    // Forms a lenient parser reads but pg_lsn does not: refused before the database, naming
    // the header.
    for position in ["+1/0:2", "000000001/0:2"] {
        let err = admit(&inbox, &mut client, &walship_record(0, 10, s1, position))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::MalformedHeader { header, .. } if header == POSITION_HEADER),
            "{err}"
        );
    }

    // Records of other producers.
    let foreign = |offset, id: &str| record(2, offset, &[("event-id", id)]);
    let err = admit(&inbox, &mut client, &foreign(0, "a"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Unmarked { .. }) && err.to_string().contains("Unmarked::ById"),
        "{err}"
    );
    let by_id = inbox.clone().with_unmarked(Unmarked::ById {
        header: "event-id".into(),
    });
    for (offset, id, expected) in [(0, "a", Apply), (1, "b", Apply), (2, "a", Duplicate)] {
        assert_eq!(
            admit(&by_id, &mut client, &foreign(offset, id))
                .await
                .expect("by id"),
            expected
        );
    }
    let err = admit(&by_id, &mut client, &record(2, 3, &[]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no \"event-id\" header"), "{err}");
    let pass = inbox.clone().with_unmarked(Unmarked::PassThrough);
    for _ in 0..2 {
        assert_eq!(
            admit(&pass, &mut client, &foreign(0, "a"))
                .await
                .expect("pass"),
            Apply
        );
    }
    // walship's records are still deduplicated whatever the choice for foreign ones.
    let copy = walship_record(0, 11, s1, "1/0:1");
    assert_eq!(
        admit(&pass, &mut client, &copy).await.expect("pass"),
        Duplicate
    );

    // No table: the error says how to create it.
    let missing = Inbox::new().with_table(None, "no_such_inbox");
    let err = admit(&missing, &mut client, &copy).await.unwrap_err();
    assert!(err.to_string().contains("create_tables"), "{err}");
}

/// Two transactions holding the same record (a rebalance's old and new owner): the second
/// waits on the mark's row until the first commits, then sees it — one applies, one skips.
#[tokio::test]
async fn a_second_holder_of_a_record_waits_for_the_first_and_skips_it() {
    let db = TestDb::new().await;
    let inbox = Inbox::new();
    inbox
        .create_tables(&db.client)
        .await
        .expect("create tables");
    let m = walship_record(0, 0, "s", "0/10:0");
    let mut first = connect(&db.url).await;
    let tx = first.transaction().await.expect("begin");
    assert_eq!(inbox.admit(&tx, &m).await.expect("admit"), Admission::Apply);
    let (url, inbox2, m2) = (db.url.clone(), inbox.clone(), m.clone());
    let second = tokio::spawn(async move {
        let mut client = connect(&url).await;
        let tx = client.transaction().await.expect("begin");
        let admission = inbox2.admit(&tx, &m2).await.expect("admit");
        tx.commit().await.expect("commit");
        admission
    });
    until_async(
        "the second holder to wait on the mark's row lock",
        || async {
            db.client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%walship_inbox%'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .get::<_, i64>(0)
                == 1
        },
    )
    .await;
    assert!(!second.is_finished());
    tx.commit().await.expect("commit");
    assert_eq!(second.await.expect("second"), Admission::Duplicate);
}
