//! Every pipeline has exactly one owner — the process whose walsender holds its slot — after
//! any change: a database that is down when its pipeline starts only delays it (one process,
//! and `[cluster]`), and processes whose files list different pipelines (a rolling deploy that
//! adds one) agree on which process runs which, each pipeline streamed by exactly one of those
//! that know it, within two session timeouts and 5 s. Against real PostgreSQL and tansu.
//!
//! PostgreSQL 15 only (`scripts/test.sh`): ownership is decided by walship and the broker; the
//! server only provides the slot, which behaves alike on every version.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crate::harness::postgres::Cluster;
use crate::harness::process::free_port;
use crate::harness::{self, Binary, TIMEOUT, TestDb, broker, consume, topic, until};
use crate::metrics::{active, get, value};
use crate::pipelines::pipeline;
use crate::reliability::write_events;

/// The PID of the walsender streaming `db`'s slot; `None` also while the slot does not exist.
async fn holder(db: &TestDb) -> Option<i32> {
    db.client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .expect("read slot")
        .and_then(|r| r.get(0))
}

/// A file of `pipelines` (name, database) with metrics on `port`, under `[cluster]` `group`
/// when given.
fn file(port: u16, group: Option<&str>, pipelines: &[(&str, &TestDb)]) -> String {
    let mut text = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_partitions = 3\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n",
        broker().bootstrap
    );
    if let Some(group) = group {
        text.push_str(&format!("[cluster]\ngroup = \"{group}\"\n\n"));
    }
    for (name, db) in pipelines {
        text.push_str(&pipeline(name, db));
        text.push('\n');
    }
    text
}

/// Writes 10 events for each of 5 keys into `db` and checks every one arrives.
async fn delivers(db: &TestDb) {
    let keys: Vec<String> = (0..5).map(|k| format!("k{k}")).collect();
    let ids: HashSet<String> = write_events(&db.client, &keys, 10, 0, false)
        .await
        .into_iter()
        .collect();
    db.await_caught_up().await;
    let records = consume(
        &broker().bootstrap,
        &[&topic(db, "order")],
        ids.len(),
        TIMEOUT,
        Duration::from_secs(1),
    );
    let got: HashSet<String> = records.iter().map(harness::Consumed::id).collect();
    assert_eq!(
        ids.difference(&got).count(),
        0,
        "events of {} lost",
        db.slot()
    );
    assert!(harness::late_copies(&records).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_down_when_its_pipeline_starts_only_delays_it() {
    database_down_at_start(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_down_when_its_pipeline_starts_only_delays_it_under_cluster() {
    let group = format!("down-{}", std::process::id());
    database_down_at_start(Some(&group)).await;
}

async fn database_down_at_start(group: Option<&str>) {
    let up = TestDb::new().await;
    let cluster = Cluster::private(&[]);
    let down = TestDb::new_in(&cluster).await;
    tokio::task::block_in_place(|| cluster.stop_server());
    let port = free_port();
    let walship = Binary::start(&file(port, group, &[("up", &up), ("down", &down)]));
    up.await_streaming().await;
    until("a retry of the pipeline whose database is down", || {
        walship
            .log_text()
            .lines()
            .any(|l| l.contains("pipeline{name=down}") && l.contains("cannot start yet; retrying"))
    })
    .await;
    let metrics = get(port, "/metrics").1;
    assert_eq!(
        value(&metrics, "walship_unowned_seconds{pipeline=\"up\"}"),
        0.0
    );
    assert!(
        value(&metrics, "walship_unowned_seconds{pipeline=\"down\"}") > 0.0,
        "{metrics}"
    );
    if group.is_some() {
        // Past the move bound (2 x 6 s + 5 s) the process says so, once.
        until("the unowned pipeline to be logged", || {
            walship.log_text().lines().any(|l| {
                l.contains("pipeline{name=down}")
                    && l.contains("nobody has streamed this pipeline's slot")
            })
        })
        .await;
    }
    tokio::task::block_in_place(|| cluster.start_server());
    let down = TestDb {
        client: crate::harness::postgres::connect(&down.url).await,
        ..down
    };
    down.await_streaming().await;
    delivers(&down).await;
    delivers(&up).await;
    let metrics = get(port, "/metrics").1;
    assert_eq!(
        value(&metrics, "walship_unowned_seconds{pipeline=\"down\"}"),
        0.0,
        "{metrics}"
    );
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}

/// A rolling deploy: process A runs a file with r1 and r2; process B's file adds r0, which
/// sorts first. Each pipeline gets exactly one owner within the bound: r0 the only process
/// that knows it, r1 and r2 one process each; every pipeline's events arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_whose_files_differ_run_every_pipeline_exactly_once() {
    let _heavy = harness::heavy().await;
    let dbs: BTreeMap<&str, TestDb> = [
        ("r0", TestDb::new().await),
        ("r1", TestDb::new().await),
        ("r2", TestDb::new().await),
    ]
    .into_iter()
    .collect();
    let group = format!("{}-rolling", dbs["r0"].slot());
    let (port_a, port_b) = (free_port(), free_port());
    let a = Binary::start(&file(
        port_a,
        Some(&group),
        &[("r1", &dbs["r1"]), ("r2", &dbs["r2"])],
    ));
    until("A streams r1 and r2", || {
        active(port_a, &["r1", "r2"]).len() == 2
    })
    .await;
    let b = Binary::start(&file(
        port_b,
        Some(&group),
        &[("r0", &dbs["r0"]), ("r1", &dbs["r1"]), ("r2", &dbs["r2"])],
    ));
    let joined = Instant::now();
    let all = ["r0", "r1", "r2"];
    let mut spread = None;
    let deadline = joined + TIMEOUT;
    while spread.is_none() {
        let (on_a, on_b) = (active(port_a, &all), active(port_b, &all));
        let mut owned = true;
        for db in dbs.values() {
            owned &= holder(db).await.is_some();
        }
        if owned && on_b.contains("r0") && on_a.is_disjoint(&on_b) && on_a.len() + on_b.len() == 3 {
            spread = Some((joined.elapsed(), on_a, on_b));
        }
        assert!(
            Instant::now() < deadline,
            "not every pipeline found one owner:\nA: {}\nB: {}",
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (took, on_a, on_b) = spread.unwrap_or_default();
    eprintln!(
        "rolling deploy: every pipeline had one owner {} ms after the second process started \
         (A: {on_a:?}, B: {on_b:?}; bound 2 x 6 s + 5 s)",
        took.as_millis()
    );
    assert!(
        took <= Duration::from_secs(17),
        "{} ms, beyond 2 x cluster.session_timeout_ms + 5 s",
        took.as_millis()
    );
    for db in dbs.values() {
        delivers(db).await;
    }
    for p in [b, a] {
        let (code, log) = p.stop().await;
        assert_eq!(code, 0, "{log}");
    }
}
