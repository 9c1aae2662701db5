//! Golden tests of the `pgoutput` decoder against bytes from a real PostgreSQL server.
//!
//! No replication connection is needed: each test creates a publication and a logical slot in
//! its own database, runs real SQL, then reads the raw pgoutput messages with
//! `pg_logical_slot_peek_binary_changes` (which runs the same output plugin a walsender would)
//! and decodes every row's `data` in order with one `pgoutput::Decoder` per capture. Peeking does
//! not consume, so one slot can be read with several option sets (text and binary, streamed and
//! not) and the captures compared. Values are asserted field by field against what the SQL did.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use pgoutput::{
    Column, Decoder, Lsn, Message, OldTuple, PgTimestamp, Relation, RelationColumn, StreamAbort,
    StreamStart, TupleData,
};
use tokio_postgres::types::PgLsn;

use crate::harness::TestDb;

/// A publication and a logical slot (pgoutput) for one test database.
struct Golden {
    slot: String,
    publication: String,
}

impl Golden {
    /// Publishes `tables` and creates the slot (before any change the test wants to see).
    async fn create(db: &TestDb, tables: &str, two_phase: bool) -> Golden {
        // Slot names are cluster-wide: the database name makes them unique.
        let g = Golden {
            slot: format!("{}_golden", db.name),
            publication: format!("{}_golden_pub", db.name),
        };
        db.client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {tables}",
                g.publication
            ))
            .await
            .unwrap();
        db.client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, $2)",
                &[&g.slot, &two_phase],
            )
            .await
            .unwrap();
        g
    }

    /// Every message currently in the slot, as (row LSN, raw pgoutput bytes), without consuming.
    async fn peek(&self, db: &TestDb, options: &[&str]) -> Vec<(Lsn, Bytes)> {
        let mut opts = vec!["publication_names", self.publication.as_str()];
        opts.extend_from_slice(options);
        db.client
            .query(
                "SELECT lsn, data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, VARIADIC $2::text[])",
                &[&self.slot, &opts],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let lsn: PgLsn = r.get(0);
                let data: Vec<u8> = r.get(1);
                (Lsn(u64::from(lsn)), Bytes::from(data))
            })
            .collect()
    }

    async fn drop(self, db: &TestDb) {
        db.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
            .await
            .unwrap();
    }
}

/// Decodes one capture in order with one decoder; every message must decode.
fn decode(version: u32, raw: &[(Lsn, Bytes)]) -> Vec<(Lsn, Message)> {
    let mut decoder = Decoder::new(version);
    let msgs = raw
        .iter()
        .map(|(lsn, data)| {
            let msg = decoder
                .decode(data.clone())
                .unwrap_or_else(|e| panic!("{e} in {data:?}"));
            (*lsn, msg)
        })
        .collect();
    assert!(!decoder.in_stream(), "capture ended inside a stream");
    msgs
}

fn cols(t: &TupleData) -> Vec<Column<'_>> {
    t.iter().collect()
}

async fn oid(db: &TestDb, name: &str) -> u32 {
    db.client
        .query_one("SELECT $1::text::regclass::oid", &[&name])
        .await
        .unwrap()
        .get(0)
}

/// Runs `sql` (ending in `RETURNING pg_current_xact_id()::text` or a SELECT of it) and returns the
/// 32-bit xid pgoutput sends.
async fn xid_of(db: &TestDb, sql: &str) -> u32 {
    let xid: String = db.client.query_one(sql, &[]).await.unwrap().get(0);
    let xid: u64 = xid.parse().unwrap();
    // pg_current_xact_id() is the 64-bit xid (epoch << 32 | xid); the wire carries the low half.
    u32::try_from(xid & 0xFFFF_FFFF).unwrap()
}

async fn current_xid(db: &TestDb) -> u32 {
    xid_of(db, "SELECT pg_current_xact_id()::text").await
}

fn assert_recent(t: PgTimestamp, since: SystemTime) {
    let t = t.to_system_time().expect("timestamp after 1970");
    let slack = Duration::from_secs(5);
    assert!(
        t + slack >= since && t <= SystemTime::now() + slack,
        "commit time {t:?} not within the test run (started {since:?})"
    );
}

/// Takes the next message, which must be of the given variant, and returns (row LSN, payload).
macro_rules! next {
    ($it:expr, $variant:ident) => {
        match $it.next() {
            Some((lsn, Message::$variant(m))) => (*lsn, m),
            other => panic!("expected {}, got {other:?}", stringify!($variant)),
        }
    };
}

/// Takes Begin … Commit around `body` messages and checks the transaction's fields.
struct Txn<'a> {
    xid: u32,
    body: Vec<&'a Message>,
}

fn take_txn<'a>(it: &mut impl Iterator<Item = &'a (Lsn, Message)>, since: SystemTime) -> Txn<'a> {
    let (_, begin) = next!(it, Begin);
    let mut body = Vec::new();
    loop {
        match it.next() {
            Some((row_lsn, Message::Commit(c))) => {
                assert_eq!(c.flags, 0);
                assert_eq!(
                    c.commit_lsn, begin.final_lsn,
                    "Begin.final_lsn is the commit LSN"
                );
                assert!(c.end_lsn > c.commit_lsn);
                // The SQL interface reports a Commit at the transaction's end LSN.
                assert_eq!(*row_lsn, c.end_lsn);
                assert_eq!(c.commit_time, begin.commit_time);
                assert_recent(c.commit_time, since);
                return Txn {
                    xid: begin.xid,
                    body,
                };
            }
            Some((_, m)) => body.push(m),
            None => panic!("transaction {} has no Commit", begin.xid),
        }
    }
}

fn relation_column(name: &str, type_oid: u32, key: bool) -> RelationColumn {
    RelationColumn {
        flags: u8::from(key),
        name: name.to_owned(),
        type_oid,
        type_modifier: -1,
    }
}

const UUID: u32 = 2950;
const TEXT: u32 = 25;
const JSONB: u32 = 3802;
const TIMESTAMPTZ: u32 = 1184;
const INT8: u32 = 20;
const INT4: u32 = 23;
const FLOAT8: u32 = 701;
const BOOL: u32 = 16;

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

/// Inserts of a streamed block, split by the transaction id prefix they carry.
fn streamed_notes(msgs: &[(Lsn, Message)], xid: Option<u32>) -> Vec<&[u8]> {
    msgs.iter()
        .filter_map(|(_, m)| match m {
            Message::Insert(i) if i.xid == xid => cols(&i.tuple)[1].bytes(),
            _ => None,
        })
        .collect()
}

/// A large transaction streamed in blocks with protocol v2 (`streaming 'on'`), with a
/// rolled-back subtransaction, and a large rolled-back transaction (Stream Abort); on 16+ the
/// same with protocol v4 and `streaming 'parallel'` (Stream Abort with its LSN and time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_golden_streamed_transactions() {
    let db = TestDb::new().await;
    let major = db.server_major().await;
    // Up to 17, decoding streams a large transaction once it passes logical_decoding_work_mem
    // whatever became of it, and a top-level abort then ends it with a Stream Abort. 18 first
    // checks whether the transaction has already aborted and, if so, throws its changes away:
    // nothing of it is streamed and no Stream Abort is sent. Peeking decodes after the ROLLBACK,
    // so from 18 on the rolled-back transaction leaves no trace at all. (A walsender decoding
    // while the transaction is still open streams it and sends the Stream Abort on every
    // version.) The rolled-back subtransaction of the committed transaction is streamed, and
    // its Stream Abort sent, on every version.
    let aborted_streamed = major < 18;
    let g = Golden::create(&db, "other_table", false).await;
    let other = oid(&db, "other_table").await;
    let c = &db.client;
    let since = SystemTime::now();

    // ~250 kB of changes, then ~125 kB in a subtransaction that rolls back, then one more row.
    c.batch_execute("BEGIN").await.unwrap();
    let big = current_xid(&db).await;
    c.batch_execute(
        "INSERT INTO other_table (note) SELECT 'x' || repeat('.', 200) || g FROM generate_series(1, 1000) g; \
         SAVEPOINT s; \
         INSERT INTO other_table (note) SELECT 'y' || repeat('.', 200) || g FROM generate_series(1, 500) g; \
         ROLLBACK TO SAVEPOINT s; \
         INSERT INTO other_table (note) VALUES ('kept'); \
         COMMIT",
    )
    .await
    .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let aborted = current_xid(&db).await;
    c.batch_execute(
        "INSERT INTO other_table (note) SELECT 'z' || repeat('.', 200) || g FROM generate_series(1, 1000) g; \
         ROLLBACK",
    )
    .await
    .unwrap();
    // An abort does not flush WAL; this commit does, so the decoder sees the abort record.
    c.batch_execute("INSERT INTO other_table (note) VALUES ('after')")
        .await
        .unwrap();

    // Decoding streams a transaction once it holds more than this in memory.
    c.batch_execute("SET logical_decoding_work_mem = '64kB'")
        .await
        .unwrap();
    let raw = g
        .peek(&db, &["proto_version", "2", "streaming", "on"])
        .await;
    let msgs = decode(2, &raw);

    // Split into stream blocks and the rest, checking the block structure on the way.
    let mut blocks: Vec<(StreamStart, Vec<&Message>)> = Vec::new();
    let mut outside: Vec<&(Lsn, Message)> = Vec::new();
    let mut it = msgs.iter();
    while let Some(item) = it.next() {
        let Message::StreamStart(start) = &item.1 else {
            outside.push(item);
            continue;
        };
        let mut body = Vec::new();
        loop {
            match it.next().map(|(_, m)| m) {
                Some(Message::StreamStop) => break,
                Some(m) => body.push(m),
                None => panic!("stream block without Stream Stop"),
            }
        }
        blocks.push((*start, body));
    }
    // Row and relation messages inside a block carry the (sub)transaction id; outside none.
    let in_blocks: Vec<(Lsn, Message)> = blocks
        .iter()
        .flat_map(|(_, body)| body.iter().map(|m| (Lsn(0), (*m).clone())))
        .collect();
    for (_, m) in &in_blocks {
        let xid = match m {
            Message::Insert(i) => i.xid,
            Message::Relation(r) => r.xid,
            other => panic!("unexpected {other:?} in a stream block"),
        };
        assert!(xid.is_some(), "{m:?} without xid in a stream block");
    }

    let big_blocks: Vec<_> = blocks.iter().filter(|(s, _)| s.xid == big).collect();
    let aborted_blocks: Vec<_> = blocks.iter().filter(|(s, _)| s.xid == aborted).collect();
    assert_eq!(big_blocks.len() + aborted_blocks.len(), blocks.len());
    if !aborted_streamed {
        assert!(
            aborted_blocks.is_empty(),
            "PostgreSQL {major} streamed a transaction that had aborted before decoding"
        );
    }
    let groups = if aborted_streamed {
        vec![&big_blocks, &aborted_blocks]
    } else {
        vec![&big_blocks]
    };
    for group in groups {
        assert!(
            group.len() >= 2,
            "expected several blocks, got {}",
            group.len()
        );
        let first: Vec<u8> = group.iter().map(|(s, _)| s.first_segment).collect();
        assert_eq!(first[0], 1, "first block has first_segment = 1");
        assert!(first[1..].iter().all(|&f| f == 0));
    }
    // Every 'x' row, in order, under the top-level xid; the kept row under a subtransaction.
    let x_rows = streamed_notes(&in_blocks, Some(big));
    assert_eq!(x_rows.len(), 1000);
    for (n, note) in x_rows.iter().enumerate() {
        assert_eq!(*note, format!("x{}{}", ".".repeat(200), n + 1).as_bytes());
    }
    let z_rows = streamed_notes(&in_blocks, Some(aborted));
    assert_eq!(aborted_streamed, !z_rows.is_empty());
    assert!(z_rows.iter().all(|n| n.starts_with(b"z")));

    // Outside the blocks: the subtransaction abort, the commit, the top-level abort (up to 17),
    // and the small transaction decoded normally.
    let kinds: Vec<u8> = outside.iter().map(|(_, m)| m.message_type()).collect();
    // (The relation was described inside the committed stream, so it is not described again.)
    let expected: &[u8] = if aborted_streamed {
        b"AcABIC"
    } else {
        b"AcBIC"
    };
    assert_eq!(kinds, expected, "{outside:?}");
    let Message::StreamAbort(sub_abort) = &outside[0].1 else {
        unreachable!()
    };
    assert_eq!(sub_abort.xid, big);
    assert_ne!(sub_abort.subxid, big);
    assert_eq!(sub_abort.abort, None, "v2 Stream Abort has no LSN/time");
    let y_rows = streamed_notes(&in_blocks, Some(sub_abort.subxid));
    assert!(y_rows.iter().all(|n| n.starts_with(b"y")));
    let kept: Vec<_> = in_blocks
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Insert(i) if cols(&i.tuple)[1] == Column::Text(b"kept") => Some(i.xid),
            _ => None,
        })
        .collect();
    let [Some(kept_xid)] = kept[..] else {
        panic!("kept row: {kept:?}")
    };
    assert!(kept_xid != big && kept_xid != sub_abort.subxid);

    let (commit_row, Message::StreamCommit(sc)) = outside[1] else {
        unreachable!()
    };
    assert_eq!((sc.xid, sc.flags), (big, 0));
    assert!(sc.end_lsn > sc.commit_lsn);
    assert_eq!(*commit_row, sc.end_lsn);
    assert_recent(sc.commit_time, since);
    if aborted_streamed {
        assert_eq!(
            outside[2].1,
            Message::StreamAbort(StreamAbort {
                xid: aborted,
                subxid: aborted,
                abort: None
            })
        );
    }
    let after_at = if aborted_streamed { 4 } else { 3 };
    let Message::Insert(after) = &outside[after_at].1 else {
        unreachable!()
    };
    assert_eq!(after.xid, None);
    assert_eq!(after.relation_id, other);
    assert_eq!(cols(&after.tuple)[1], Column::Text(b"after"));

    // The same slot without streaming (protocol v1): the committed transaction arrives whole
    // at commit time, without the rolled-back rows; the aborted one not at all.
    let v1 = decode(1, &g.peek(&db, &["proto_version", "1"]).await);
    let mut it = v1.iter();
    let t = take_txn(&mut it, since);
    assert_eq!(t.xid, big);
    let notes: Vec<&[u8]> = t
        .body
        .iter()
        .filter_map(|m| match m {
            Message::Insert(i) => cols(&i.tuple)[1].bytes(),
            Message::Relation(_) => None,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(notes.len(), 1001);
    assert_eq!(&notes[..1000], &x_rows[..]);
    assert_eq!(notes[1000], b"kept");
    let commit = v1
        .iter()
        .find_map(|(_, m)| match m {
            Message::Commit(c) => Some(c),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (commit.commit_lsn, commit.end_lsn, commit.commit_time),
        (sc.commit_lsn, sc.end_lsn, sc.commit_time),
        "Stream Commit and Commit describe the same commit"
    );
    let t = take_txn(&mut it, since);
    assert!(matches!(t.body[..], [Message::Insert(_)]));
    assert!(it.next().is_none());

    // Protocol v4 (16+) with `streaming 'parallel'`: the same messages, except that every
    // Stream Abort carries the abort's LSN and time.
    if major >= 16 {
        let v4 = decode(
            4,
            &g.peek(&db, &["proto_version", "4", "streaming", "parallel"])
                .await,
        );
        let mut aborts = Vec::new();
        let stripped: Vec<(Lsn, Message)> = v4
            .iter()
            .map(|(lsn, m)| match m {
                Message::StreamAbort(a) => {
                    aborts.push(*a);
                    let abort = None;
                    (*lsn, Message::StreamAbort(StreamAbort { abort, ..*a }))
                }
                other => (*lsn, other.clone()),
            })
            .collect();
        assert_eq!(
            stripped, msgs,
            "v4 parallel differs from v2 beyond Stream Abort"
        );
        assert_eq!(aborts.len(), if aborted_streamed { 2 } else { 1 });
        let (lsn, time) = aborts[0]
            .abort
            .expect("v4 parallel Stream Abort has LSN and time");
        assert_eq!((aborts[0].xid, aborts[0].subxid), (big, sub_abort.subxid));
        assert!(
            lsn > Lsn(0) && lsn < sc.commit_lsn,
            "subtransaction abort at {lsn}"
        );
        assert_recent(time, since);
        assert!(time <= sc.commit_time);
        if aborted_streamed {
            let (lsn, time) = aborts[1]
                .abort
                .expect("v4 parallel Stream Abort has LSN and time");
            assert_eq!((aborts[1].xid, aborts[1].subxid), (aborted, aborted));
            assert!(lsn > sc.end_lsn, "abort at {lsn} before the earlier commit");
            assert_recent(time, since);
            assert!(time >= sc.commit_time);
        }
    }
    g.drop(&db).await;
}

/// Two-phase commit with protocol v3: Begin Prepare/Prepare, then Commit Prepared or Rollback
/// Prepared; with streaming as well, a large prepared transaction ends in Stream Prepare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgoutput_golden_two_phase() {
    let db = TestDb::new().await;
    // PostgreSQL 15 takes two_phase at slot creation (4th argument).
    let g = Golden::create(&db, "outbox, other_table", true).await;
    let outbox = oid(&db, "outbox").await;
    let c = &db.client;
    let since = SystemTime::now();
    let gids: Vec<String> = ["commit", "rollback", "big"]
        .iter()
        .map(|s| format!("{}_{s}", db.name))
        .collect();

    // Each PREPARE is resolved right away: a pending prepared transaction would hold up slot
    // creation in every other test of this cluster.
    c.batch_execute("BEGIN").await.unwrap();
    let xid_commit = current_xid(&db).await;
    c.batch_execute(&format!(
        "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
         VALUES ('order', 'o-2pc', 'Prepared', '{{}}'); \
         PREPARE TRANSACTION '{}'",
        gids[0]
    ))
    .await
    .unwrap();
    c.batch_execute(&format!("COMMIT PREPARED '{}'", gids[0]))
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let xid_rollback = current_xid(&db).await;
    c.batch_execute(&format!(
        "INSERT INTO other_table (note) VALUES ('never'); PREPARE TRANSACTION '{}'",
        gids[1]
    ))
    .await
    .unwrap();
    let opts = ["proto_version", "3", "two_phase", "on"];
    // Captured while the transaction is still prepared: once it is rolled back, decoding skips
    // its changes (PostgreSQL checks whether a prepared transaction's xid aborted).
    let while_prepared = g.peek(&db, &opts).await;
    c.batch_execute(&format!("ROLLBACK PREPARED '{}'", gids[1]))
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let xid_big = current_xid(&db).await;
    c.batch_execute(&format!(
        "INSERT INTO other_table (note) SELECT repeat('.', 200) || g FROM generate_series(1, 1000) g; \
         PREPARE TRANSACTION '{}'",
        gids[2]
    ))
    .await
    .unwrap();
    c.batch_execute(&format!("COMMIT PREPARED '{}'", gids[2]))
        .await
        .unwrap();

    let msgs = decode(3, &g.peek(&db, &opts).await);
    // Relations are described where first used; they are checked elsewhere.
    let msgs: Vec<&(Lsn, Message)> = msgs
        .iter()
        .filter(|(_, m)| !matches!(m, Message::Relation(_)))
        .collect();
    let mut it = msgs.iter().copied();

    // 1: prepared, then committed.
    let (_, bp) = next!(it, BeginPrepare);
    assert_eq!((bp.xid, bp.gid.as_str()), (xid_commit, gids[0].as_str()));
    assert_recent(bp.prepare_time, since);
    let (_, ins) = next!(it, Insert);
    assert_eq!((ins.xid, ins.relation_id), (None, outbox));
    assert_eq!(cols(&ins.tuple)[2], Column::Text(b"o-2pc"));
    let (row_lsn, p) = next!(it, Prepare);
    assert_eq!(p.flags, 0);
    assert_eq!(
        (p.prepare_lsn, p.end_lsn, p.prepare_time, p.xid, &p.gid),
        (bp.prepare_lsn, bp.end_lsn, bp.prepare_time, bp.xid, &bp.gid)
    );
    assert!(p.end_lsn > p.prepare_lsn);
    assert_eq!(row_lsn, p.end_lsn);
    let (row_lsn, cp) = next!(it, CommitPrepared);
    assert_eq!((cp.flags, cp.xid, &cp.gid), (0, xid_commit, &gids[0]));
    assert!(cp.commit_lsn >= p.end_lsn && cp.end_lsn > cp.commit_lsn);
    assert_eq!(row_lsn, cp.end_lsn);
    assert!(cp.commit_time >= p.prepare_time);

    // 2: prepared, then rolled back. Decoded after the rollback, its changes are skipped.
    let (_, bp) = next!(it, BeginPrepare);
    assert_eq!((bp.xid, bp.gid.as_str()), (xid_rollback, gids[1].as_str()));
    let (_, p) = next!(it, Prepare);
    assert_eq!((p.prepare_lsn, p.xid), (bp.prepare_lsn, xid_rollback));
    let (_, rp) = next!(it, RollbackPrepared);
    assert_eq!((rp.flags, rp.xid, &rp.gid), (0, xid_rollback, &gids[1]));
    assert_eq!(rp.prepare_end_lsn, p.end_lsn);
    assert_eq!(rp.prepare_time, p.prepare_time);
    assert!(rp.rollback_end_lsn > rp.prepare_end_lsn);
    assert!(rp.rollback_time >= rp.prepare_time);

    // Decoded while still prepared, the same transaction came with its change.
    let before = decode(3, &while_prepared);
    let before: Vec<&Message> = before
        .iter()
        .map(|(_, m)| m)
        .filter(|m| !matches!(m, Message::Relation(_)))
        .collect();
    let [
        ..,
        Message::CommitPrepared(_),
        Message::BeginPrepare(bp2),
        Message::Insert(never),
        Message::Prepare(p2),
    ] = &before[..]
    else {
        panic!("{before:?}")
    };
    assert_eq!((bp2, p2), (bp, p));
    assert_eq!(cols(&never.tuple)[1], Column::Text(b"never"));

    // 3: a large prepared transaction, not streamed here.
    let (_, bp) = next!(it, BeginPrepare);
    assert_eq!((bp.xid, bp.gid.as_str()), (xid_big, gids[2].as_str()));
    for n in 1..=1000 {
        let (_, ins) = next!(it, Insert);
        assert_eq!(
            cols(&ins.tuple)[1],
            Column::Text(format!("{}{n}", ".".repeat(200)).as_bytes())
        );
    }
    let (_, big_prepare) = next!(it, Prepare);
    let (_, big_commit) = next!(it, CommitPrepared);
    assert_eq!((big_commit.xid, &big_commit.gid), (xid_big, &gids[2]));
    assert!(it.next().is_none());

    // With streaming too: the large one is streamed and ends in Stream Prepare, which carries
    // exactly what Prepare did.
    c.batch_execute("SET logical_decoding_work_mem = '64kB'")
        .await
        .unwrap();
    let streamed = decode(
        3,
        &g.peek(
            &db,
            &["proto_version", "3", "two_phase", "on", "streaming", "on"],
        )
        .await,
    );
    let tail: Vec<&Message> = streamed
        .iter()
        .map(|(_, m)| m)
        .skip_while(|m| !matches!(m, Message::StreamStart(_)))
        .collect();
    let Some(Message::StreamStart(first)) = tail.first() else {
        panic!("nothing streamed: {streamed:?}")
    };
    assert_eq!((first.xid, first.first_segment), (xid_big, 1));
    let inserts = tail
        .iter()
        .filter(|m| matches!(m, Message::Insert(i) if i.xid == Some(xid_big)))
        .count();
    assert_eq!(inserts, 1000);
    let [
        ..,
        Message::StreamStop,
        Message::StreamPrepare(sp),
        Message::CommitPrepared(cp),
    ] = &tail[..]
    else {
        panic!(
            "unexpected end of stream: {:?}",
            &tail[tail.len().saturating_sub(3)..]
        )
    };
    assert_eq!(sp, big_prepare);
    assert_eq!(cp, big_commit);
    g.drop(&db).await;
}
