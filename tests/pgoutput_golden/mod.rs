//! Golden tests of the `pgoutput` decoder against bytes from a real PostgreSQL server.
//!
//! No replication connection is needed: each test creates a publication and a logical slot in
//! its own database, runs real SQL, then reads the raw pgoutput messages with
//! `pg_logical_slot_peek_binary_changes` (which runs the same output plugin a walsender would)
//! and decodes every row's `data` in order with one `pgoutput::Decoder` per capture. Peeking does
//! not consume, so one slot can be read with several option sets (text and binary, streamed and
//! not) and the captures compared. Values are asserted field by field against what the SQL did.

mod row_changes;
mod streaming;
mod two_phase;
mod types;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use pgoutput::{Column, Decoder, Lsn, Message, PgTimestamp, RelationColumn, TupleData};
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
// A `macro_rules!` is scoped to the text after it; this import lets the submodules import it.
use next;

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
