//! Reliability: crashes, outages, restarts, stalls, large transactions, definite errors and the
//! bad-row policies — against real PostgreSQL and real broker processes.
//!
//! `WALSHIP_LONG_TESTS=1` runs the long variants (more events, longer outages).

mod bad_rows;
mod crashes;
mod fatal_errors;
mod outages;

use std::collections::{BTreeMap, HashSet};

use tokio_postgres::Client;

use crate::harness::{self, Binary, TIMEOUT};

/// Writes `per_key` single-event transactions for each of `keys`, interleaved round-robin,
/// pipelined on one connection (so commit order per key is the order written): outbox rows, or
/// with `messages` transactional logical messages with prefix `outbox`. Returns ids.
pub(crate) async fn write_events(
    client: &Client,
    keys: &[String],
    per_key: u64,
    start_seq: u64,
    messages: bool,
) -> Vec<String> {
    let sql = if messages {
        "SELECT pg_logical_emit_message(true, 'outbox', jsonb_build_object('id', $1::text, \
         'aggregatetype', 'order', 'aggregateid', $2::text, 'type', 'Updated', \
         'payload', $3::text::jsonb)::text)::text"
    } else {
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ($1::text::uuid, 'order', $2, 'Updated', $3::text::jsonb)"
    };
    let stmt = client.prepare(sql).await.expect("prepare");
    let mut ids = Vec::new();
    let mut pending = Vec::new();
    for seq in start_seq..start_seq + per_key {
        for key in keys {
            let id = uuid::Uuid::new_v4().to_string();
            let payload = format!("{{\"aggregate\":\"{key}\",\"seq\":{seq}}}");
            ids.push(id.clone());
            let (client, stmt) = (client, &stmt);
            pending.push(async move {
                client
                    .execute(stmt, &[&id, key, &payload])
                    .await
                    .expect("insert")
            });
            if pending.len() == 64 {
                futures::future::join_all(std::mem::take(&mut pending)).await;
            }
        }
    }
    futures::future::join_all(pending).await;
    ids
}

/// Per key, the payload `seq`s in consumed order with repeats removed (first occurrence kept).
pub(crate) fn deduped_seqs(records: &[harness::Consumed]) -> BTreeMap<String, Vec<u64>> {
    let mut out = BTreeMap::new();
    for ((_, key), recs) in harness::by_key(records) {
        let mut seen = HashSet::new();
        let seqs: Vec<u64> = harness::seqs(&recs)
            .into_iter()
            .filter(|s| seen.insert(*s))
            .collect();
        out.insert(key, seqs);
    }
    out
}

async fn exits_with(walship: Binary, needles: &[&str]) -> String {
    let (code, log) = walship.wait_exit(TIMEOUT).await;
    assert_eq!(code, 1, "{log}");
    for n in needles {
        assert!(log.contains(n), "log lacks {n:?}:\n{log}");
    }
    log
}
