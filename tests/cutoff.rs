//! A process cut off from the broker but not from PostgreSQL, under `[cluster]`: it runs in a
//! network namespace of the test's own, and a blackhole route makes the broker's packets vanish
//! (a partition: no refusal, no reset). It takes nothing new, and the pipeline it held moves to
//! the process that can publish once that one waits for the slot — nothing lost, no late copy.
//!
//! PostgreSQL 15 only (`scripts/test.sh`): the behaviour is walship's and the broker's. Needs
//! root and iproute2 (`ip netns`), which the CI machine has; elsewhere the test says it was
//! skipped and why.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::netns::Netns;
use crate::harness::postgres::{Cluster, connect};
use crate::harness::{self, Binary, Broker, Consumed, TIMEOUT, TestDb, consume, topic};
use crate::pipelines::pipeline;
use crate::reliability::write_events;

/// Where the walsender streaming `db`'s slot is connected from (`None`: nobody streams it).
async fn streamed_from(db: &TestDb) -> Option<String> {
    db.client
        .query_opt(
            "SELECT host(r.client_addr) FROM pg_replication_slots s \
             JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1",
            &[&db.slot()],
        )
        .await
        .expect("read the slot's walsender")
        .and_then(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_cut_off_from_the_broker_hands_its_pipeline_over_and_takes_nothing_new() {
    let netns = match Netns::create() {
        Ok(n) => n,
        Err(why) => {
            eprintln!(
                "a_process_cut_off_from_the_broker_…: skipped: cannot make a network namespace \
                 here ({why}); it needs root and iproute2"
            );
            return;
        }
    };
    let _heavy = harness::heavy().await;
    let broker = Broker::dedicated_advertising(&netns.broker_addr);
    let cluster = Cluster::private_with(&["listen_addresses=*"], |data| {
        use std::io::Write;
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("pg_hba.conf"))
            .expect("pg_hba.conf");
        writeln!(hba, "host all all 10.0.0.0/8 trust").expect("write pg_hba.conf");
    });
    let dbs = [
        TestDb::new_in(&cluster).await,
        TestDb::new_in(&cluster).await,
    ];
    // Both processes reach PostgreSQL through the host's namespace-facing address.
    let entry = |name: &str, db: &TestDb| pipeline(name, db).replace("127.0.0.1", &netns.db_addr);
    let group = format!("{}-cutoff", dbs[0].slot());
    let file = format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_partitions = 3\n\n[cluster]\ngroup = \"{group}\"\n\n{}\n{}",
        broker.bootstrap,
        entry("p0", &dbs[0]),
        entry("p1", &dbs[1]),
    );
    let ns_addr = netns.ns_addr.clone();
    let cut_off = Binary::start_in(&netns, &file);
    let deadline = Instant::now() + TIMEOUT;
    for db in &dbs {
        while streamed_from(db).await.as_deref() != Some(ns_addr.as_str()) {
            assert!(
                Instant::now() < deadline,
                "the namespaced process never streamed both:\n{}",
                cut_off.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let other = Binary::start(&file);
    // The group spreads them: one each.
    let deadline = Instant::now() + TIMEOUT;
    let held = loop {
        let (a, b) = (streamed_from(&dbs[0]).await, streamed_from(&dbs[1]).await);
        match (a.as_deref(), b.as_deref()) {
            (Some(x), Some(y)) if x != y => break if x == ns_addr { 0 } else { 1 },
            _ => {}
        }
        assert!(Instant::now() < deadline, "the pipelines never spread");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (held_db, other_db) = (&dbs[held], &dbs[1 - held]);

    // Load on the pipeline the namespaced process holds; then the broker vanishes for it.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (url, writing) = (held_db.url.clone(), Arc::clone(&writing));
        tokio::spawn(async move {
            let client = connect(&url).await;
            let keys: Vec<String> = (0..10).map(|k| format!("k{k}")).collect();
            let (mut ids, mut seq) = (Vec::new(), 0);
            while seq < 50 || writing.load(Ordering::Relaxed) {
                ids.extend(write_events(&client, &keys, 5, seq, false).await);
                seq += 5;
                // Paced (load, not synchronisation).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        })
    };
    let some = held_db.current_lsn().await;
    held_db.await_confirmed(some, TIMEOUT).await;
    netns.cut();
    let cut = Instant::now();
    let deadline = cut + TIMEOUT;
    while streamed_from(held_db)
        .await
        .is_none_or(|from| from == ns_addr)
    {
        assert!(
            Instant::now() < deadline,
            "the pipeline never moved:\ncut off: {}\nother: {}",
            cut_off.log_text(),
            other.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved_after = cut.elapsed();
    writing.store(false, Ordering::Relaxed);
    let ids: HashSet<String> = writer.await.expect("writer").into_iter().collect();
    held_db.await_caught_up().await;
    let records = consume(
        &broker.bootstrap,
        &[&topic(held_db, "order")],
        ids.len(),
        TIMEOUT,
        Duration::from_secs(2),
    );
    let got: HashSet<String> = records.iter().map(Consumed::id).collect();
    let lost = ids.difference(&got).count();
    let late = harness::late_copies(&records);
    let log = cut_off.log_text();
    eprintln!(
        "cut off from the broker: the pipeline streamed from the other process {} ms after the \
         cut (session timeout 6 s, bound 17 s); {} events, {lost} lost, {} duplicates, {} late \
         copies",
        moved_after.as_millis(),
        ids.len(),
        records.len() - got.len(),
        late.len()
    );
    assert_eq!(lost, 0);
    assert!(late.is_empty(), "{late:?}");
    assert!(log.contains("cut off from the group coordinator"), "{log}");
    assert!(
        log.contains("another process waits for this pipeline's slot"),
        "{log}"
    );
    assert!(
        !log.contains("running every pipeline"),
        "a cut-off process fell back on running every pipeline:\n{log}"
    );
    // It took nothing new: the other pipeline never left the process that can publish.
    assert_ne!(
        streamed_from(other_db).await.as_deref(),
        Some(ns_addr.as_str())
    );
    let (code, log) = other.stop().await;
    assert_eq!(code, 0, "{log}");
    drop(cut_off);
}
