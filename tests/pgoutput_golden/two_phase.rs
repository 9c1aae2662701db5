//! Two-phase commit with protocol v3: Begin Prepare/Prepare, Commit Prepared, Rollback Prepared,
//! and Stream Prepare for a large prepared transaction.

use std::time::SystemTime;

use pgoutput::{Column, Lsn, Message};

use super::{Golden, assert_recent, cols, current_xid, decode, next, oid};
use crate::harness::TestDb;

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
