//! Several pipelines in one walship process (`[[pipelines]]`): three databases, one of them on
//! a server that is stopped and restarted mid-load — against real PostgreSQL and broker
//! processes.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::harness::postgres::{Cluster, connect};
use crate::harness::process::free_port;
use crate::harness::{self, Binary, TIMEOUT, TestDb, broker, consume, topic, until};
use crate::metrics::{get, value};
use crate::reliability::{deduped_seqs, write_events};

/// One `[[pipelines]]` entry for `db`, named `name`.
pub(crate) fn pipeline(name: &str, db: &TestDb) -> String {
    format!(
        "[[pipelines]]\nname = \"{name}\"\n\
         postgres = {{ url = \"{url}\", slot = \"{slot}\", publication = \"{slot}_pub\", status_interval_ms = 200 }}\n\
         outbox = {{ topic = \"{slot}.{{aggregatetype}}\" }}\n",
        url = db.url,
        slot = db.slot(),
    )
}

/// Consumes `db`'s topic until every id of `ids` is there; checks per-key order `0..per_key`.
fn assert_delivered(db: &TestDb, ids: &[String], per_key: u64) {
    let records = consume(
        &broker().bootstrap,
        &[&topic(db, "order")],
        ids.len(),
        TIMEOUT,
        Duration::from_secs(1),
    );
    let got: HashSet<String> = records.iter().map(harness::Consumed::id).collect();
    let missing = ids.iter().filter(|id| !got.contains(*id)).count();
    assert_eq!(missing, 0, "{missing} events of {} missing", db.slot());
    for (key, seqs) in deduped_seqs(&records) {
        assert_eq!(
            seqs,
            (0..per_key).collect::<Vec<_>>(),
            "order of {key} in {}",
            db.slot()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_databases_one_process_a_server_restart_affects_only_its_pipeline() {
    let _heavy = harness::heavy().await;
    let (a, b) = (TestDb::new().await, TestDb::new().await);
    let cluster = Cluster::private(&[]);
    let c = TestDb::new_in(&cluster).await;
    let port = free_port();
    let config = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_partitions = 3\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n{}\n{}\n{}",
        broker().bootstrap,
        pipeline("alpha", &a),
        pipeline("beta", &b),
        pipeline("gamma", &c),
    );
    let walship = Binary::start(&config);
    for db in [&a, &b, &c] {
        db.await_streaming().await;
    }
    let keys: Vec<String> = (0..10).map(|k| format!("k{k}")).collect();
    let mut ids = [Vec::new(), Vec::new(), Vec::new()];
    for (i, db) in [&a, &b, &c].into_iter().enumerate() {
        ids[i].extend(write_events(&db.client, &keys, 50, 0, false).await);
    }
    until("every pipeline ready", || get(port, "/readyz").0 == 200).await;

    // gamma's server goes down; alpha and beta keep streaming meanwhile.
    tokio::task::block_in_place(|| cluster.stop_server());
    for (i, db) in [&a, &b].into_iter().enumerate() {
        ids[i].extend(write_events(&db.client, &keys, 50, 50, false).await);
    }
    for (i, db) in [&a, &b].into_iter().enumerate() {
        let end = db.current_lsn().await;
        db.await_confirmed(end, TIMEOUT).await;
        assert_delivered(db, &ids[i], 100);
    }
    until("gamma not ready", || get(port, "/readyz/gamma").0 == 503).await;
    assert_eq!(get(port, "/readyz/alpha").0, 200, "alpha is not affected");
    let (code, body) = get(port, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("alpha: active: ") && body.contains("gamma: not ready: "),
        "{body}"
    );
    assert_eq!(
        get(port, "/active").0,
        200,
        "the process streams alpha and beta"
    );
    assert_eq!(get(port, "/active/gamma").0, 503);
    let metrics = get(port, "/metrics").1;
    assert_eq!(
        value(&metrics, "walship_streaming{pipeline=\"alpha\"}"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        value(&metrics, "walship_streaming{pipeline=\"gamma\"}"),
        0.0,
        "{metrics}"
    );

    // Back up: gamma resumes from its slot and catches up; nothing lost, order kept.
    tokio::task::block_in_place(|| cluster.start_server());
    let client = connect(&c.url).await;
    ids[2].extend(write_events(&client, &keys, 50, 50, false).await);
    let end = pgoutput::Lsn(u64::from(
        client
            .query_one("SELECT pg_current_wal_lsn()", &[])
            .await
            .unwrap()
            .get::<_, tokio_postgres::types::PgLsn>(0),
    ));
    until("gamma ready again", || get(port, "/readyz/gamma").0 == 200).await;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let confirmed: tokio_postgres::types::PgLsn = client
            .query_one(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&c.slot()],
            )
            .await
            .unwrap()
            .get(0);
        if pgoutput::Lsn(u64::from(confirmed)) >= end {
            break;
        }
        assert!(Instant::now() < deadline, "gamma did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_delivered(&c, &ids[2], 100);
    let log = walship.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("pipeline{name=gamma}") && l.contains("reconnecting")),
        "gamma's reconnect is logged under its name:\n{log}"
    );
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}
