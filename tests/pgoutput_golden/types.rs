//! Type messages for user types, unchanged TOAST columns, the Origin message, and columns in the
//! types' binary format.

use std::time::SystemTime;

use pgoutput::{Column, Lsn, Message, PgTimestamp};

use super::{
    BOOL, FLOAT8, Golden, INT4, INT8, JSONB, TEXT, UUID, cols, decode, next, oid, relation_column,
    take_txn,
};
use crate::harness::TestDb;

/// Type messages for user types, unchanged TOAST columns ('u'), and the Origin message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_golden_types_toast_and_origin() {
    let db = TestDb::new().await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy'); \
         CREATE TABLE golden_t (id int4 PRIMARY KEY, m mood, big text, n int8); \
         ALTER TABLE golden_t ALTER COLUMN big SET STORAGE EXTERNAL",
    )
    .await
    .unwrap();
    let g = Golden::create(&db, "golden_t", false).await;
    let table = oid(&db, "golden_t").await;
    let mood: u32 = c
        .query_one("SELECT 'mood'::regtype::oid", &[])
        .await
        .unwrap()
        .get(0);
    let since = SystemTime::now();

    // 5000 bytes stored out of line, uncompressed (STORAGE EXTERNAL).
    c.batch_execute("INSERT INTO golden_t VALUES (1, 'happy', repeat('z', 5000), -2)")
        .await
        .unwrap();
    c.batch_execute("UPDATE golden_t SET n = 7").await.unwrap();
    let origin = format!("{}_origin", db.name);
    c.execute("SELECT pg_replication_origin_create($1)", &[&origin])
        .await
        .unwrap();
    c.execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .unwrap();
    c.batch_execute(
        "BEGIN; \
         SELECT pg_replication_origin_xact_setup('1/2345', '2001-01-01 00:00:00+00'); \
         INSERT INTO golden_t VALUES (2, 'sad', 'small', NULL); \
         COMMIT; \
         SELECT pg_replication_origin_session_reset()",
    )
    .await
    .unwrap();

    let msgs = decode(1, &g.peek(&db, &["proto_version", "1"]).await);
    let mut it = msgs.iter();

    let t = take_txn(&mut it, since);
    let [Message::Type(ty), Message::Relation(r), Message::Insert(i)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    assert_eq!(
        (ty.xid, ty.id, ty.namespace.as_str(), ty.name.as_str()),
        (None, mood, "public", "mood")
    );
    assert_eq!(r.id, table);
    assert_eq!(
        r.columns,
        [
            relation_column("id", INT4, true),
            relation_column("m", mood, false),
            relation_column("big", TEXT, false),
            relation_column("n", INT8, false),
        ]
    );
    let big = vec![b'z'; 5000];
    assert_eq!(
        cols(&i.tuple),
        [
            Column::Text(b"1"),
            Column::Text(b"happy"),
            Column::Text(&big),
            Column::Text(b"-2")
        ]
    );

    // The TOASTed column did not change: it is not sent.
    let t = take_txn(&mut it, since);
    let [Message::Update(u)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    assert_eq!(u.old, None);
    assert_eq!(
        cols(&u.new),
        [
            Column::Text(b"1"),
            Column::Text(b"happy"),
            Column::UnchangedToast,
            Column::Text(b"7")
        ]
    );

    // A transaction replayed from another node: Origin follows Begin, and the commit time is
    // the origin's.
    let (_, begin) = next!(it, Begin);
    let origin_time = PgTimestamp(366 * 86_400 * 1_000_000); // 2001-01-01 (2000 is a leap year)
    assert_eq!(begin.commit_time, origin_time);
    let (_, o) = next!(it, Origin);
    assert_eq!(o.commit_lsn, "1/2345".parse::<Lsn>().unwrap());
    assert_eq!(o.name, origin);
    let mut rest: Vec<&Message> = Vec::new();
    for (_, m) in it.by_ref() {
        rest.push(m);
    }
    let [.., Message::Insert(i), Message::Commit(commit)] = &rest[..] else {
        panic!("{rest:?}")
    };
    assert_eq!(commit.commit_time, origin_time);
    assert_eq!(
        cols(&i.tuple),
        [
            Column::Text(b"2"),
            Column::Text(b"sad"),
            Column::Text(b"small"),
            Column::Null
        ]
    );
    g.drop(&db).await;
    c.execute("SELECT pg_replication_origin_drop($1)", &[&origin])
        .await
        .unwrap();
}

/// `binary 'true'`: columns in the types' binary send format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_golden_binary_columns() {
    let db = TestDb::new().await;
    let c = &db.client;
    c.batch_execute(
        "CREATE TABLE golden_bin (i int4 PRIMARY KEY, b int8, f float8, t text, u uuid, \
                                  j jsonb, flag bool, z int4)",
    )
    .await
    .unwrap();
    let g = Golden::create(&db, "golden_bin", false).await;
    let since = SystemTime::now();
    c.batch_execute(
        "INSERT INTO golden_bin VALUES (-5, 1234567890123, 1.5, 'héllo', \
         '00112233-4455-6677-8899-aabbccddeeff', '{\"k\": [1, 2]}', true, NULL)",
    )
    .await
    .unwrap();

    let binary = decode(
        1,
        &g.peek(&db, &["proto_version", "1", "binary", "true"]).await,
    );
    let mut it = binary.iter();
    let t = take_txn(&mut it, since);
    let [Message::Relation(r), Message::Insert(i)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    assert_eq!(
        r.columns.iter().map(|c| c.type_oid).collect::<Vec<_>>(),
        [INT4, INT8, FLOAT8, TEXT, UUID, JSONB, BOOL, INT4]
    );
    let uuid: [u8; 16] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff,
    ];
    let jsonb: Vec<u8> = [&[1u8][..], br#"{"k": [1, 2]}"#].concat(); // version 1, then text
    assert_eq!(
        cols(&i.tuple),
        [
            Column::Binary(&(-5i32).to_be_bytes()),
            Column::Binary(&1_234_567_890_123i64.to_be_bytes()),
            Column::Binary(&1.5f64.to_bits().to_be_bytes()),
            Column::Binary("héllo".as_bytes()),
            Column::Binary(&uuid),
            Column::Binary(&jsonb),
            Column::Binary(&[1]),
            Column::Null,
        ]
    );
    assert!(it.next().is_none());

    // The same slot read in text format.
    let text = decode(1, &g.peek(&db, &["proto_version", "1"]).await);
    let mut it = text.iter();
    let t = take_txn(&mut it, since);
    let [Message::Relation(_), Message::Insert(i)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    assert_eq!(
        cols(&i.tuple),
        [
            Column::Text(b"-5"),
            Column::Text(b"1234567890123"),
            Column::Text(b"1.5"),
            Column::Text("héllo".as_bytes()),
            Column::Text(b"00112233-4455-6677-8899-aabbccddeeff"),
            Column::Text(br#"{"k": [1, 2]}"#),
            Column::Text(b"t"),
            Column::Null,
        ]
    );
    g.drop(&db).await;
}
