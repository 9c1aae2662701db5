//! Large transactions streamed in blocks: protocol v2 with `streaming 'on'`, rolled-back
//! subtransactions and Stream Abort; on 16+ protocol v4 with `streaming 'parallel'`.

use std::time::SystemTime;

use pgoutput::{Column, Lsn, Message, StreamAbort, StreamStart};

use super::{Golden, assert_recent, cols, current_xid, decode, oid, take_txn};
use crate::harness::TestDb;

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
