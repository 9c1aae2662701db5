//! Row changes under REPLICA IDENTITY DEFAULT and FULL, TRUNCATE, and logical decoding messages
//! (protocol v1, text).

use std::collections::BTreeSet;
use std::time::SystemTime;

use pgoutput::{Column, Lsn, Message, OldTuple, Relation, RelationColumn};

use super::{
    Golden, INT8, JSONB, TEXT, TIMESTAMPTZ, UUID, cols, current_xid, decode, next, oid,
    relation_column, take_txn, xid_of,
};
use crate::harness::TestDb;

/// Inserts, updates and deletes with REPLICA IDENTITY DEFAULT and FULL (protocol v1, text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_golden_row_changes_and_replica_identity() {
    let db = TestDb::new().await;
    let g = Golden::create(&db, "outbox, other_table", false).await;
    let (outbox, other) = (oid(&db, "outbox").await, oid(&db, "other_table").await);
    let c = &db.client;
    let since = SystemTime::now();

    c.batch_execute("BEGIN").await.unwrap();
    let xid1 = xid_of(
        &db,
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, created_at) \
         VALUES ('6f1c2d3e-0000-4000-8000-00000000abcd', 'order', 'o-1', 'OrderCreated', \
                 '{\"total\": 12.5, \"items\": [1, 2]}', '2024-01-02 03:04:05.678+00') \
         RETURNING pg_current_xact_id()::text",
    )
    .await;
    c.batch_execute(
        "INSERT INTO other_table (note) VALUES ('first'); \
         INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'o-2', 'X', NULL); \
         COMMIT",
    )
    .await
    .unwrap();
    let xid2 = xid_of(
        &db,
        "UPDATE other_table SET note = 'second' WHERE id = 1 RETURNING pg_current_xact_id()::text",
    )
    .await;
    let xid3 = xid_of(
        &db,
        "UPDATE other_table SET id = 2 WHERE id = 1 RETURNING pg_current_xact_id()::text",
    )
    .await;
    c.batch_execute("ALTER TABLE other_table REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let xid4 = xid_of(
        &db,
        "UPDATE other_table SET note = 'third' RETURNING pg_current_xact_id()::text",
    )
    .await;
    let xid5 = xid_of(
        &db,
        "DELETE FROM other_table RETURNING pg_current_xact_id()::text",
    )
    .await;
    // Separate statements: a multi-statement simple query is one transaction, and the ALTER's
    // invalidation would then only take effect after the INSERT.
    c.batch_execute("ALTER TABLE other_table REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO other_table (id, note) VALUES (3, 'x')")
        .await
        .unwrap();
    let xid7 = xid_of(
        &db,
        "DELETE FROM other_table RETURNING pg_current_xact_id()::text",
    )
    .await;

    // Text output of timestamptz depends on the decoding session's TimeZone.
    c.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let msgs = decode(1, &g.peek(&db, &["proto_version", "1"]).await);
    let mut it = msgs.iter();

    // 1: two inserts into outbox and one into other_table; each relation described once.
    let t = take_txn(&mut it, since);
    assert_eq!(t.xid, xid1);
    let [
        Message::Relation(r_outbox),
        Message::Insert(i1),
        Message::Relation(r_other),
        Message::Insert(i2),
        Message::Insert(i3),
    ] = &t.body[..]
    else {
        panic!("unexpected first transaction {:?}", t.body)
    };
    assert_eq!(
        *r_outbox,
        Relation {
            xid: None,
            id: outbox,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: b'd',
            columns: vec![
                relation_column("id", UUID, true),
                relation_column("aggregatetype", TEXT, false),
                relation_column("aggregateid", TEXT, false),
                relation_column("type", TEXT, false),
                relation_column("payload", JSONB, false),
                relation_column("created_at", TIMESTAMPTZ, false),
            ],
        }
    );
    assert_eq!(
        (r_other.id, r_other.name.as_str(), r_other.replica_identity),
        (other, "other_table", b'd')
    );
    assert_eq!(
        r_other.columns,
        [
            relation_column("id", INT8, true),
            relation_column("note", TEXT, false)
        ]
    );
    assert!(r_other.columns[0].is_key() && !r_other.columns[1].is_key());
    assert_eq!((i1.xid, i1.relation_id), (None, outbox));
    assert_eq!(
        cols(&i1.tuple),
        [
            Column::Text(b"6f1c2d3e-0000-4000-8000-00000000abcd"),
            Column::Text(b"order"),
            Column::Text(b"o-1"),
            Column::Text(b"OrderCreated"),
            // jsonb's text output normalises spacing.
            Column::Text(br#"{"items": [1, 2], "total": 12.5}"#),
            Column::Text(b"2024-01-02 03:04:05.678+00"),
        ]
    );
    assert_eq!(i2.relation_id, other);
    assert_eq!(
        cols(&i2.tuple),
        [Column::Text(b"1"), Column::Text(b"first")]
    );
    let c3 = cols(&i3.tuple);
    assert_eq!(i3.relation_id, outbox);
    assert_eq!(c3.len(), 6);
    assert_eq!(c3[0].bytes().map(<[u8]>::len), Some(36), "generated uuid");
    assert_eq!(c3[4], Column::Null, "NULL payload");

    // 2: non-key update under REPLICA IDENTITY DEFAULT: no old tuple.
    let t = take_txn(&mut it, since);
    assert_eq!(t.xid, xid2);
    let [Message::Update(u)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    assert_eq!((u.relation_id, &u.old), (other, &None));
    assert_eq!(cols(&u.new), [Column::Text(b"1"), Column::Text(b"second")]);

    // 3: key update: 'K' old tuple with the key columns only (the rest NULL).
    let t = take_txn(&mut it, since);
    assert_eq!(t.xid, xid3);
    let [Message::Update(u)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    let Some(OldTuple::Key(old)) = &u.old else {
        panic!("expected a key old tuple: {u:?}")
    };
    assert_eq!(cols(old), [Column::Text(b"1"), Column::Null]);
    assert_eq!(cols(&u.new), [Column::Text(b"2"), Column::Text(b"second")]);

    // 4: REPLICA IDENTITY FULL: the relation is described again, and the old row is 'O'.
    let t = take_txn(&mut it, since);
    assert_eq!(t.xid, xid4);
    let [Message::Relation(r), Message::Update(u)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    assert_eq!((r.id, r.replica_identity), (other, b'f'));
    assert!(
        r.columns.iter().all(RelationColumn::is_key),
        "FULL: every column is key"
    );
    let Some(OldTuple::Full(old)) = &u.old else {
        panic!("expected a full old tuple: {u:?}")
    };
    assert_eq!(cols(old), [Column::Text(b"2"), Column::Text(b"second")]);
    assert_eq!(cols(&u.new), [Column::Text(b"2"), Column::Text(b"third")]);

    // 5: delete under FULL: the whole old row.
    let t = take_txn(&mut it, since);
    assert_eq!(t.xid, xid5);
    let [Message::Delete(d)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    assert_eq!(d.relation_id, other);
    let OldTuple::Full(old) = &d.old else {
        panic!("expected a full old tuple: {d:?}")
    };
    assert_eq!(cols(old), [Column::Text(b"2"), Column::Text(b"third")]);

    // 6: back to DEFAULT: described again; a plain insert.
    let t = take_txn(&mut it, since);
    let [Message::Relation(r), Message::Insert(i)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    assert_eq!((r.id, r.replica_identity), (other, b'd'));
    assert_eq!(cols(&i.tuple), [Column::Text(b"3"), Column::Text(b"x")]);

    // 7: delete under DEFAULT: 'K' with the key only.
    let t = take_txn(&mut it, since);
    assert_eq!(t.xid, xid7);
    let [Message::Delete(d)] = &t.body[..] else {
        panic!("{:?}", t.body)
    };
    let OldTuple::Key(old) = &d.old else {
        panic!("expected a key old tuple: {d:?}")
    };
    assert_eq!(cols(old), [Column::Text(b"3"), Column::Null]);

    assert!(it.next().is_none(), "DDL-only transactions send nothing");
    // Row LSNs never go backwards.
    assert!(msgs.windows(2).all(|w| w[0].0 <= w[1].0));
    g.drop(&db).await;
}

/// TRUNCATE and logical decoding messages (transactional and not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_golden_truncate_and_logical_messages() {
    let db = TestDb::new().await;
    let g = Golden::create(&db, "outbox, other_table", false).await;
    let (outbox, other) = (oid(&db, "outbox").await, oid(&db, "other_table").await);
    let c = &db.client;
    let since = SystemTime::now();

    let dbr = &db;
    let emit = |transactional: bool, prefix: &'static str, content: &'static [u8]| async move {
        let lsn: String = dbr
            .client
            .query_one(
                "SELECT pg_logical_emit_message($1::bool, $2::text, $3::bytea)::text",
                &[&transactional, &prefix, &content],
            )
            .await
            .unwrap()
            .get(0);
        lsn.parse::<Lsn>().unwrap()
    };
    let plain_lsn = emit(false, "walship-golden", b"not in a transaction").await;
    c.batch_execute("BEGIN").await.unwrap();
    let tx_xid = current_xid(&db).await;
    let tx_lsn = emit(true, "walship-golden", b"\x00\xffbinary").await;
    c.batch_execute("INSERT INTO other_table (note) VALUES ('with message'); COMMIT")
        .await
        .unwrap();
    c.batch_execute("TRUNCATE outbox, other_table RESTART IDENTITY CASCADE")
        .await
        .unwrap();
    c.batch_execute("TRUNCATE outbox").await.unwrap();

    let msgs = decode(
        1,
        &g.peek(&db, &["proto_version", "1", "messages", "true"])
            .await,
    );
    let mut it = msgs.iter();

    // A non-transactional message comes alone, not inside Begin/Commit.
    let (row_lsn, m) = next!(it, Message);
    assert_eq!(m.xid, None);
    assert_eq!(m.flags, 0);
    assert!(!m.is_transactional());
    assert_eq!(m.prefix, "walship-golden");
    assert_eq!(&m.content[..], b"not in a transaction");
    // pg_logical_emit_message returns the LSN pgoutput sends (its Lsn text parses as ours).
    assert_eq!((m.lsn, row_lsn), (plain_lsn, plain_lsn));

    let t = take_txn(&mut it, since);
    assert_eq!(t.xid, tx_xid);
    let [
        Message::Message(m),
        Message::Relation(r),
        Message::Insert(i),
    ] = &t.body[..]
    else {
        panic!("{:?}", t.body)
    };
    assert!(m.is_transactional());
    assert_eq!((m.flags, m.lsn, m.xid), (1, tx_lsn, None));
    assert_eq!(&m.content[..], b"\x00\xffbinary");
    assert_eq!(r.id, other);
    assert_eq!(
        cols(&i.tuple),
        [Column::Text(b"1"), Column::Text(b"with message")]
    );

    // TRUNCATE invalidates the relations, so they may be described again before it.
    let t = take_txn(&mut it, since);
    let (rels, rest): (Vec<&Message>, Vec<&Message>) = t
        .body
        .iter()
        .copied()
        .partition(|m| matches!(m, Message::Relation(_)));
    for r in rels {
        let Message::Relation(r) = r else {
            unreachable!()
        };
        assert!([outbox, other].contains(&r.id), "unexpected relation {r:?}");
    }
    let [Message::Truncate(tr)] = &rest[..] else {
        panic!("{rest:?}")
    };
    assert_eq!(tr.xid, None);
    // Bit 1 CASCADE, bit 2 RESTART IDENTITY.
    assert_eq!(tr.options, 0b11);
    assert_eq!(
        tr.relation_ids.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([outbox, other])
    );

    let t = take_txn(&mut it, since);
    let truncates: Vec<_> = t
        .body
        .iter()
        .filter_map(|m| match m {
            Message::Truncate(tr) => Some(tr),
            Message::Relation(r) if r.id == outbox => None,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let [tr] = &truncates[..] else {
        panic!("{truncates:?}")
    };
    assert_eq!((tr.options, &tr.relation_ids[..]), (0, &[outbox][..]));
    assert!(it.next().is_none());

    // Without `messages 'true'` pgoutput leaves logical messages out.
    let msgs = decode(1, &g.peek(&db, &["proto_version", "1"]).await);
    assert!(msgs.iter().all(|(_, m)| !matches!(m, Message::Message(_))));
    g.drop(&db).await;
}
