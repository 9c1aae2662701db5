//! Several walship processes share one deployment's pipelines (`[cluster]`): the consumer
//! group spreads them, and a process killed under load has its pipelines moved to the other,
//! with nothing lost and per-key order kept — against real PostgreSQL and broker processes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::failover::slot_holder;
use crate::harness::postgres::connect;
use crate::harness::process::free_port;
use crate::harness::{self, Binary, TIMEOUT, TestDb, broker, consume, topic, until};
use crate::metrics::get;
use crate::pipelines::pipeline;
use crate::reliability::{deduped_seqs, write_events};

const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

/// The pipelines a process streams now.
fn active(port: u16) -> HashSet<String> {
    crate::metrics::active(port, &NAMES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_spread_the_pipelines_and_a_killed_ones_move_losing_nothing() {
    spread_then_kill(Kill::Second).await;
}

/// The first process is the group's leader. tansu 0.6.0 never completes a rebalance after its
/// leader dies: the survivor's membership stays unsettled, and after two session timeouts it
/// runs every pipeline, the slots admitting it once the dead process's walsenders are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_group_leaders_pipelines_move_even_when_the_group_never_settles() {
    spread_then_kill(Kill::First).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kill {
    First,
    Second,
}

async fn spread_then_kill(kill: Kill) {
    let _heavy = harness::heavy().await;
    let dbs = [
        TestDb::new().await,
        TestDb::new().await,
        TestDb::new().await,
    ];
    let group = format!("{}-cluster", dbs[0].slot());
    let file = |port: u16| {
        format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_partitions = 3\n\n[cluster]\ngroup = \"{group}\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n\n{}\n{}\n{}",
            broker().bootstrap,
            pipeline(NAMES[0], &dbs[0]),
            pipeline(NAMES[1], &dbs[1]),
            pipeline(NAMES[2], &dbs[2]),
        )
    };
    let (port_a, port_b) = (free_port(), free_port());
    // `check` reports the coordination topic before anything runs.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("walship.toml");
    std::fs::write(&path, file(port_a)).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walship"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("walship check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("walship check (")
            && text.contains(") [cluster]")
            && text.contains("3 of 3 coordination topics")
            && text.contains("walship run creates them with 1 partition each"),
        "{text}"
    );
    // Alone in the group, the first process runs every pipeline.
    let mut a = Binary::start(&file(port_a));
    until("the first process streams all three", || {
        active(port_a).len() == 3
    })
    .await;
    // The second joins: the group spreads the pipelines, and no pipeline runs in both.
    let mut b = Binary::start(&file(port_b));
    until("the pipelines spread over both processes", || {
        let (on_a, on_b) = (active(port_a), active(port_b));
        !on_b.is_empty() && on_a.len() + on_b.len() == 3 && on_a.is_disjoint(&on_b)
    })
    .await;
    let (code, body) = get(port_a, "/readyz");
    assert_eq!(
        code, 200,
        "pipelines run elsewhere keep a process ready: {body}"
    );
    assert!(body.contains(": elsewhere: "), "{body}");
    // Each process is active for the pipelines it streams, and only for those.
    for (port, on) in [(port_a, active(port_a)), (port_b, active(port_b))] {
        for name in NAMES {
            let (code, body) = get(port, &format!("/active/{name}"));
            let expected = if on.contains(name) { 200 } else { 503 };
            assert_eq!(code, expected, "{name} on :{port}: {body}");
            if code == 503 {
                // Healthy all the same: run by the other process.
                assert_eq!(get(port, &format!("/readyz/{name}")).0, 200, "{name}");
            }
        }
    }
    let (victim_port, survivor_port) = match kill {
        Kill::First => (port_a, port_b),
        Kill::Second => (port_b, port_a),
    };
    let on_victim = active(victim_port);
    let moved: Vec<usize> = (0..3).filter(|&i| on_victim.contains(NAMES[i])).collect();

    // Load on every database; kill -9 one process in the middle of it.
    let writing = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for db in &dbs {
        let (url, writing) = (db.url.clone(), Arc::clone(&writing));
        writers.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let keys: Vec<String> = (0..10).map(|k| format!("k{k}")).collect();
            let (mut ids, mut per_key) = (Vec::new(), 0);
            while per_key < 60 || writing.load(Ordering::Relaxed) {
                ids.extend(write_events(&client, &keys, 10, per_key, false).await);
                per_key += 10;
                // Paced (load, not synchronisation): a move of up to ~25 s stays a few
                // hundred thousand events to consume.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (keys, per_key, ids)
        }));
    }
    let mut holders = Vec::new();
    for &i in &moved {
        let now = dbs[i].current_lsn().await;
        dbs[i].await_confirmed(now, TIMEOUT).await;
        holders.push(slot_holder(&dbs[i]).await.expect("streamed by the victim"));
    }
    let (victim, survivor) = match kill {
        Kill::First => (&mut a, &mut b),
        Kill::Second => (&mut b, &mut a),
    };
    victim.kill();
    let killed = Instant::now();
    let deadline = killed + TIMEOUT;
    loop {
        let mut all = true;
        for (&i, &old) in moved.iter().zip(&holders) {
            all &= slot_holder(&dbs[i]).await.is_some_and(|pid| pid != old);
        }
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed process's pipelines never moved:\n{}",
            survivor.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let moved_after = killed.elapsed();
    until("the survivor streams all three", || {
        active(survivor_port).len() == 3
    })
    .await;
    writing.store(false, Ordering::Relaxed);

    let mut totals = Vec::new();
    for (db, writer) in dbs.iter().zip(writers) {
        let (keys, per_key, ids) = writer.await.expect("writer");
        let expected: BTreeMap<String, u64> = keys.into_iter().map(|k| (k, per_key)).collect();
        let all: HashSet<String> = ids.into_iter().collect();
        let end = db.current_lsn().await;
        db.await_confirmed(end, TIMEOUT).await;
        let records = consume(
            &broker().bootstrap,
            &[&topic(db, "order")],
            all.len(),
            TIMEOUT,
            Duration::from_secs(1),
        );
        let got: HashSet<String> = records.iter().map(harness::Consumed::id).collect();
        assert_eq!(
            all.difference(&got).count(),
            0,
            "events of {} lost",
            db.slot()
        );
        for (key, seqs) in deduped_seqs(&records) {
            assert_eq!(
                seqs,
                (0..expected[&key]).collect::<Vec<_>>(),
                "order of {key} in {}",
                db.slot()
            );
        }
        totals.push((all.len(), records.len() - all.len()));
    }
    let events: usize = totals.iter().map(|t| t.0).sum();
    let duplicates: usize = totals.iter().map(|t| t.1).sum();
    let log = survivor.log_text();
    let fallback = log.contains("the consumer group has not settled");
    eprintln!(
        "cluster move ({} killed): {} pipeline(s) streamed by the other process {} ms after the \
         kill -9 (session timeout 6,000 ms{}); {events} events, 0 lost, {duplicates} duplicates",
        if kill == Kill::First {
            "group leader"
        } else {
            "member"
        },
        moved.len(),
        moved_after.as_millis(),
        if fallback {
            "; the group never settled: every pipeline on the survivor"
        } else {
            ""
        },
    );
    for &i in &moved {
        // Second killed: started by the first, handed over, started again after the kill.
        let starts = log
            .lines()
            .filter(|l| {
                l.contains(&format!("pipeline{{name={}}}", NAMES[i]))
                    && l.contains("assigned to this process: starting")
            })
            .count();
        let expected = if kill == Kill::Second { 2 } else { 1 };
        assert!(
            starts >= expected,
            "{} moved to the survivor:\n{log}",
            NAMES[i]
        );
    }
    assert!(
        (duplicates as f64) < 0.01 * events as f64,
        "{duplicates} duplicates of {events}: the resume lookup should have removed them"
    );
    let survivor = match kill {
        Kill::First => b,
        Kill::Second => a,
    };
    let (code, log) = survivor.stop().await;
    assert_eq!(code, 0, "{log}");
}
