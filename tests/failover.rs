//! Active-passive: two walship processes with the same configuration, one streaming and one
//! waiting as a standby (the slot admits one walsender, so it is the lock), and the standby
//! taking over when the active one is killed — against real PostgreSQL and broker processes.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::postgres::connect;
use crate::harness::process::free_port;
use crate::harness::{self, Binary, TIMEOUT, TestDb, broker, consume, topic, until};
use crate::metrics::{get, value};
use crate::reliability::{deduped_seqs, write_events};

/// The PID of the walsender streaming the test's slot, if any.
pub(crate) async fn slot_holder(db: &TestDb) -> Option<i32> {
    db.client
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .expect("read slot")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_walship_is_killed_and_loses_nothing() {
    let _heavy = harness::heavy().await;
    let db = TestDb::new().await;
    let base = harness::config_toml(&db, &broker().bootstrap, "");
    let with_metrics = |port: u16| format!("{base}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let (port_a, port_b) = (free_port(), free_port());
    let mut active = Binary::start(&with_metrics(port_a));
    db.await_streaming().await;
    let first_holder = slot_holder(&db).await.expect("the first walship streams");

    // The second one, same configuration: a standby that says so.
    let standby = Binary::start(&with_metrics(port_b));
    until("the standby's log line", || {
        standby
            .log_text()
            .contains("standby: another consumer streams the slot")
    })
    .await;
    // A healthy standby — it can look at the slot and the broker answers it — is ready (a
    // rolling update or a drain waits for it), but not active.
    until("the standby's /readyz", || {
        std::net::TcpStream::connect(("127.0.0.1", port_b)).is_ok()
            && get(port_b, "/readyz").0 == 200
    })
    .await;
    let (code, body) = get(port_b, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with(&format!("{}: standby: ", db.slot())),
        "{body}"
    );
    let (code, body) = get(port_b, "/active");
    assert_eq!(
        (code, body.as_str()),
        (503, format!("{}: standby\n", db.slot()).as_str())
    );
    assert_eq!(get(port_a, "/active").0, 200, "the first one is active");
    assert_eq!(get(port_a, "/readyz").0, 200);
    let metrics = get(port_b, "/metrics").1;
    assert_eq!(
        value(&metrics, "walship_role{role=\"standby\"}"),
        1.0,
        "{metrics}"
    );
    assert_eq!(value(&metrics, "walship_streaming"), 0.0);
    let metrics = get(port_a, "/metrics").1;
    assert_eq!(
        value(&metrics, "walship_role{role=\"active\"}"),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        slot_holder(&db).await,
        Some(first_holder),
        "the standby never took the slot"
    );

    // Load on 2 writers; kill the active walship in the middle of it.
    let writing = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (url, writing) = (db.url.clone(), Arc::clone(&writing));
        writers.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let keys: Vec<String> = (0..25).map(|k| format!("w{w}-k{k}")).collect();
            let (mut ids, mut per_key) = (Vec::new(), 0);
            while per_key < 100 || writing.load(Ordering::Relaxed) {
                ids.extend(write_events(&client, &keys, 10, per_key, false).await);
                per_key += 10;
            }
            (keys, per_key, ids)
        }));
    }
    // Some of the load is streamed (and confirmed) by the active one first.
    let moving = db.current_lsn().await;
    db.await_confirmed(moving, TIMEOUT).await;
    active.kill();
    let killed = Instant::now();
    let mut took_over = None;
    let deadline = killed + TIMEOUT;
    while took_over.is_none() {
        assert!(
            Instant::now() < deadline,
            "the standby never took over:\n{}",
            standby.log_text()
        );
        if slot_holder(&db)
            .await
            .is_some_and(|pid| pid != first_holder)
        {
            took_over = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let takeover = took_over.unwrap_or_default();
    until("the new active /active", || get(port_b, "/active").0 == 200).await;
    assert_eq!(get(port_b, "/readyz").0, 200);
    let ready = killed.elapsed();
    writing.store(false, Ordering::Relaxed);

    let (mut all, mut expected) = (HashSet::new(), BTreeMap::new());
    for w in writers {
        let (keys, per_key, ids) = w.await.expect("writer");
        all.extend(ids);
        expected.extend(keys.into_iter().map(|k| (k, per_key)));
    }
    let total = all.len();
    let end = db.current_lsn().await;
    db.await_confirmed(end, TIMEOUT).await;
    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        total,
        TIMEOUT,
        Duration::from_secs(2),
    );
    let ids: HashSet<String> = records.iter().map(harness::Consumed::id).collect();
    assert_eq!(ids.len(), total, "missing {}", all.difference(&ids).count());
    for (key, seqs) in deduped_seqs(&records) {
        assert_eq!(
            seqs,
            (0..expected[&key]).collect::<Vec<_>>(),
            "order of {key}"
        );
    }
    let duplicates = records.len() - total;
    eprintln!(
        "takeover: the standby streamed {} ms after the kill -9 (ready {} ms); {total} events, \
         0 lost, {duplicates} duplicates",
        takeover.as_millis(),
        ready.as_millis()
    );
    assert!(
        standby
            .log_text()
            .contains("the slot was released: taking over"),
        "{}",
        standby.log_text()
    );
    assert!(
        (duplicates as f64) < 0.01 * total as f64,
        "{duplicates} duplicates of {total}: the resume lookup should have removed them"
    );
    let (code, log) = standby.stop().await;
    assert_eq!(code, 0, "{log}");
}
