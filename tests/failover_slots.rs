//! Failover slots (PostgreSQL 17+): walship, given both hosts with
//! `target_session_attrs=read-write`, follows a promoted standby under load with nothing lost and
//! per-key order kept; and it stops, explaining why, on a promoted server it cannot continue on
//! (no synced slot; WAL that ends before what walship had confirmed).
//!
//! Each test starts its own primary and standby (`harness::standby`). On PostgreSQL 15 and 16
//! the tests pass after saying they were skipped: failover slots need 17.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::Client;

use crate::harness::postgres::{connect, pg_bin_major};
use crate::harness::standby::{Pair, set_standby_slots};
use crate::harness::{self, Binary, TIMEOUT, TestDb, broker, consume, topic, until};

/// True (after saying so) when the server binaries are older than 17.
fn skipped(test: &str) -> bool {
    let major = pg_bin_major();
    if major >= 17 {
        return false;
    }
    eprintln!(
        "{test}: skipped: failover slots need PostgreSQL 17 or later and this run's server is \
         {major} (WALSHIP_TEST_PG_BIN=\"$(scripts/postgres.sh 17)\" runs it)"
    );
    true
}

/// walship's configuration for `db` on a pair: both hosts, the primary first.
fn config(db: &TestDb, pair: &Pair, failover_slot: bool) -> String {
    config_with_hosts(db, &[pair.primary.port, pair.standby.port], failover_slot)
}

/// walship's configuration for `db` with `ports` (on 127.0.0.1) as the URL's hosts, in order.
fn config_with_hosts(db: &TestDb, ports: &[u16], failover_slot: bool) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let url = format!(
        "postgres://postgres@{}/{}?target_session_attrs=read-write",
        hosts.join(","),
        db.name
    );
    let toml = harness::config_toml(db, &broker().bootstrap, "");
    let line = format!("url = \"{}\"", db.url);
    assert!(toml.contains(&line));
    toml.replace(
        &line,
        &format!("url = \"{url}\"\nfailover_slot = {failover_slot}"),
    )
}

/// `db` as seen on the promoted standby (same database, slot and topics).
async fn on(cluster: &harness::postgres::Cluster, db: &TestDb) -> TestDb {
    let url = format!("{}/{}", cluster.base_url, db.name);
    TestDb {
        name: db.name.clone(),
        client: connect(&url).await,
        url,
    }
}

/// Writes single-event transactions for each of `keys`, round-robin (`seq` from `start`),
/// pipelined on one connection so commit order per key is the order written, until a write
/// fails (the server went away) or `stop` is set after a round. Returns the rounds acknowledged.
async fn write_until_stopped(
    client: &Client,
    keys: &[String],
    start: u64,
    stop: &AtomicBool,
) -> u64 {
    let Ok(stmt) = client
        .prepare(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             VALUES (gen_random_uuid(), 'order', $1, 'Updated', $2::text::jsonb)",
        )
        .await
    else {
        return 0;
    };
    let mut rounds = 0;
    loop {
        let seq = start + rounds;
        let writes = keys.iter().map(|key| {
            let payload = format!("{{\"aggregate\":\"{key}\",\"seq\":{seq}}}");
            let stmt = &stmt;
            async move { client.execute(stmt, &[key, &payload]).await }
        });
        let results = futures::future::join_all(writes).await;
        if results.iter().any(Result::is_err) {
            return rounds;
        }
        rounds += 1;
        if stop.load(Ordering::Relaxed) {
            return rounds;
        }
    }
}

/// The outbox as the server has it: per key, the `seq`s in commit order, and every event id.
async fn outbox(client: &Client) -> (BTreeMap<String, Vec<u64>>, HashSet<String>) {
    let rows = client
        .query(
            "SELECT id::text, aggregateid, (payload ->> 'seq')::bigint FROM outbox \
             WHERE aggregatetype = 'order' ORDER BY xmin::text::bigint, ctid",
            &[],
        )
        .await
        .expect("read the outbox");
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut ids = HashSet::new();
    for r in rows {
        ids.insert(r.get::<_, String>(0));
        seqs.entry(r.get(1))
            .or_default()
            .push(r.get::<_, i64>(2) as u64);
    }
    for v in seqs.values_mut() {
        v.sort_unstable();
    }
    (seqs, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walship_follows_a_promoted_standby_under_load_and_loses_nothing() {
    if skipped("walship_follows_a_promoted_standby_under_load_and_loses_nothing") {
        return;
    }
    let _heavy = harness::heavy().await;
    let pair = Pair::new(true).await;
    let db = TestDb::new_in(&pair.primary).await;
    let walship = Binary::start(&config(&db, &pair, true));
    db.await_streaming().await;
    let first_sync = pair.await_synced(&db).await;

    // The load: 2 writers × 25 keys, single-event transactions, until the primary dies.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let url = db.url.clone();
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let keys: Vec<String> = (0..25).map(|k| format!("w{w}-k{k}")).collect();
            write_until_stopped(&client, &keys, 0, &stop).await
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let primary_confirmed = db.confirmed_lsn().await;
    let standby_copy = pair.standby_slot(db.slot()).await.expect("synced copy");
    let sync_lag = primary_confirmed
        .0
        .saturating_sub(standby_copy.confirmed.unwrap_or_default().0);
    // The primary dies mid-load, and the standby takes over.
    tokio::task::block_in_place(|| pair.primary.stop_server_mode("immediate"));
    let crashed = tokio::time::Instant::now();
    let mut rounds = 0;
    for w in writers {
        rounds += w.await.expect("writer");
    }
    tokio::task::block_in_place(|| pair.standby.pg_ctl(&["promote", "-w"]));
    let promoted = tokio::time::Instant::now();
    let new = on(&pair.standby, &db).await;
    new.await_streaming().await;
    let promote_to_streaming = promoted.elapsed();
    let crash_to_streaming = crashed.elapsed();

    // What the new primary has is what must arrive: committed on the old primary and
    // replicated before it died. Then more events, written to the new primary.
    let (before, _) = outbox(&new.client).await;
    assert_eq!(before.len(), 50, "every key has events on the new primary");
    for (key, seqs) in &before {
        assert_eq!(
            seqs,
            &(0..seqs.len() as u64).collect::<Vec<_>>(),
            "the standby holds a prefix of {key}'s events"
        );
    }
    let after_keys: Vec<String> = before.keys().cloned().collect();
    for (key, seqs) in &before {
        for seq in seqs.len() as u64..seqs.len() as u64 + 10 {
            new.client
                .execute(
                    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
                     VALUES (gen_random_uuid(), 'order', $1, 'Updated', $2::text::jsonb)",
                    &[key, &format!("{{\"aggregate\":\"{key}\",\"seq\":{seq}}}")],
                )
                .await
                .expect("write to the new primary");
        }
    }
    let (expected, ids) = outbox(&new.client).await;
    assert_eq!(expected.keys().cloned().collect::<Vec<_>>(), after_keys);
    new.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        ids.len(),
        TIMEOUT * 2,
        Duration::from_secs(2),
    );
    let consumed: HashSet<String> = records.iter().map(harness::Consumed::id).collect();
    let lost = ids.difference(&consumed).count();
    let phantoms = consumed.difference(&ids).count();
    // Dedupe by id (first occurrence in offset order), then every key's seqs in order.
    let mut reordered = Vec::new();
    for ((_, key), recs) in harness::by_key(&records) {
        let mut seen = HashSet::new();
        let seqs: Vec<u64> = recs
            .iter()
            .filter(|r| seen.insert(r.id()))
            .map(|r| r.json()["seq"].as_u64().expect("seq"))
            .collect();
        if seqs != expected[&key] {
            reordered.push(key);
        }
    }
    let duplicates = records.len() - consumed.len();
    let log = walship.log_text();
    let skipped_by_resume: u64 = log
        .lines()
        .filter(|l| l.contains("resumed:"))
        .filter_map(|l| l.split(" skipped=").nth(1))
        .filter_map(|n| n.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    let followed = log
        .lines()
        .find(|l| l.contains("followed a failover"))
        .unwrap_or("(no \"followed a failover\" line)")
        .to_owned();
    eprintln!(
        "failover on PostgreSQL {}: {} events ({rounds} rounds of 50 acknowledged by the old \
         primary before it died, {} on the new primary after), {lost} lost, {phantoms} not on \
         the new primary, {} keys reordered, {duplicates} duplicates ({skipped_by_resume} events read \
         again from the synced slot and skipped by the resume lookup); promote -> streaming {:.2} \
         s (crash -> streaming {:.2} s); first sync of the slot {:.2} s; synced copy {sync_lag} \
         bytes behind the primary's confirmed position 3 s into the load\nwalship: {followed}",
        pg_bin_major(),
        ids.len(),
        ids.len() - before.values().map(Vec::len).sum::<usize>(),
        reordered.len(),
        promote_to_streaming.as_secs_f64(),
        crash_to_streaming.as_secs_f64(),
        first_sync.as_secs_f64(),
    );
    // Duplicates may only come from the window the synced slot reads again: committed after
    // its position and before the new timeline began.
    let field = |name: &str| -> pgoutput::Lsn {
        followed
            .split(&format!(" {name}="))
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {followed:?}"))
    };
    let (from, until) = (field("slot_confirmed"), field("switch"));
    let mut seen = HashSet::new();
    let outside: Vec<pgoutput::Lsn> = records
        .iter()
        .filter(|r| !seen.insert(r.id()))
        .map(harness::Consumed::commit_lsn)
        .filter(|lsn| *lsn < from || *lsn > until)
        .collect();
    assert!(
        outside.is_empty(),
        "duplicates outside the re-read window {from}..{until}: {outside:?}"
    );
    if duplicates > 0 {
        // Say where they came from (a resume lookup cut short, a session that ended early).
        let notes: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("resum") || l.contains("streaming"))
            .collect();
        eprintln!("walship's log about the duplicates:\n{}", notes.join("\n"));
    }
    assert_eq!(
        lost, 0,
        "events committed on the new primary missing from Kafka"
    );
    assert_eq!(phantoms, 0, "events in Kafka the new primary does not have");
    assert!(
        (duplicates as f64) < 0.01 * ids.len() as f64,
        "{duplicates} duplicates of {}: the resume lookup should have removed them",
        ids.len()
    );
    assert!(reordered.is_empty(), "keys out of order: {reordered:?}");
    assert!(log.contains("followed a failover"), "{log}");
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_without_the_synced_slot_stops_walship_with_an_explanation() {
    if skipped("a_promoted_standby_without_the_synced_slot_stops_walship_with_an_explanation") {
        return;
    }
    let pair = Pair::new(true).await;
    let db = TestDb::new_in(&pair.primary).await;
    // failover_slot = false: the standby never gets a copy of the slot.
    let walship = Binary::start(&config(&db, &pair, false));
    db.await_streaming().await;
    harness::insert_txn(
        &mut connect(&db.url).await,
        &[harness::Row::new("order", "a", 0)],
    )
    .await;
    db.await_caught_up().await;
    assert_eq!(pair.standby_slot(db.slot()).await, None);
    tokio::task::block_in_place(|| {
        pair.primary.stop_server_mode("immediate");
        pair.standby.pg_ctl(&["promote", "-w"]);
    });
    let (code, log) = walship.wait_exit(TIMEOUT).await;
    assert_ne!(code, 0, "{log}");
    let error = log
        .lines()
        .rev()
        .find(|l| l.contains("ERROR") || l.contains("error"))
        .unwrap_or_default();
    assert!(
        log.contains("does not exist there")
            && log.contains("will not create a new slot")
            && log.contains("sync_replication_slots")
            && log.contains("timeline 2"),
        "{log}"
    );
    eprintln!("walship on a promoted standby without the slot: {error}");
    // Nothing was created in its place.
    let new = on(&pair.standby, &db).await;
    assert_eq!(new.slot_confirmed_lsn(db.slot()).await, pgoutput::Lsn::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_behind_what_walship_confirmed_stops_walship_with_an_explanation() {
    if skipped("a_promoted_standby_behind_what_walship_confirmed_stops_walship_with_an_explanation")
    {
        return;
    }
    // No synchronized_standby_slots: the primary sends walship WAL the standby lacks.
    let pair = Pair::new(false).await;
    let db = TestDb::new_in(&pair.primary).await;
    let walship = Binary::start(&config(&db, &pair, true));
    db.await_streaming().await;
    pair.await_synced(&db).await;
    // Cut the standby off, then let walship publish and confirm more.
    pair.cut_standby();
    let mut client = connect(&db.url).await;
    for seq in 0..50 {
        harness::insert_txn(&mut client, &[harness::Row::new("order", "a", seq)]).await;
    }
    let confirmed = db.await_caught_up().await;
    tokio::task::block_in_place(|| {
        pair.primary.stop_server_mode("immediate");
    });
    tokio::task::block_in_place(|| pair.standby.pg_ctl(&["promote", "-w"]));
    let (code, log) = walship.wait_exit(TIMEOUT).await;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("before the position") && log.contains("synchronized_standby_slots"),
        "{log}"
    );
    eprintln!(
        "walship on a promoted standby that lacks what it confirmed (up to {confirmed}): {}",
        log.lines()
            .find(|l| l.contains("before the position"))
            .unwrap_or_default()
    );
}

/// Active-passive across a failover: A streams, then B takes the slot over and confirms more
/// (A, a standby now, remembers less than the slot holds); the primary dies, B is killed, the
/// standby is promoted. A, the only one left, continues from the synced slot — another
/// process's progress led up to it — with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_continues_after_a_promotion_its_peer_led_up_to_and_loses_nothing() {
    if skipped("a_survivor_continues_after_a_promotion_its_peer_led_up_to_and_loses_nothing") {
        return;
    }
    let _heavy = harness::heavy().await;
    let pair = Pair::new(true).await;
    let db = TestDb::new_in(&pair.primary).await;
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET wal_sender_timeout = '3s'",
            db.name
        ))
        .await
        .expect("set wal_sender_timeout");
    let config = config(&db, &pair, true);
    let a = Binary::start(&config);
    db.await_streaming().await;
    pair.await_synced(&db).await;
    let a_walsender = crate::failover::slot_holder(&db).await.expect("A streams");
    let b = Binary::start(&config);
    harness::until("B to wait as a standby", || {
        b.log_text()
            .contains("standby: another consumer streams the slot")
    })
    .await;
    let keys: Vec<String> = (0..10).map(|k| format!("k{k}")).collect();
    let mut client = connect(&db.url).await;
    for seq in 0..20 {
        for key in &keys {
            harness::insert_txn(&mut client, &[harness::Row::new("order", key, seq)]).await;
        }
    }
    let a_confirmed = db.await_caught_up().await;
    // A is frozen at a quiet moment (nothing in flight) until B has the slot, then thawed: it
    // waits as a standby, remembering timeline 1 and what it confirmed.
    a.signal(libc::SIGSTOP);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while crate::failover::slot_holder(&db)
        .await
        .is_none_or(|pid| pid == a_walsender)
    {
        assert!(tokio::time::Instant::now() < deadline, "B never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.signal(libc::SIGCONT);
    harness::until("A to wait as a standby", || {
        a.log_text()
            .contains("standby: another consumer streams the slot")
    })
    .await;
    // B confirms more than A ever did, and the standby's copy of the slot follows.
    for seq in 20..40 {
        for key in &keys {
            harness::insert_txn(&mut client, &[harness::Row::new("order", key, seq)]).await;
        }
    }
    let b_confirmed = pair.await_synced(&db).await;
    let synced = pair
        .standby_slot(db.slot())
        .await
        .and_then(|s| s.confirmed)
        .unwrap_or_default();
    assert!(
        synced > a_confirmed,
        "the synced slot {synced} is past A's {a_confirmed}"
    );
    // The primary dies, B is killed, the standby is promoted.
    tokio::task::block_in_place(|| pair.primary.stop_server_mode("immediate"));
    let mut b = b;
    b.kill();
    tokio::task::block_in_place(|| pair.standby.pg_ctl(&["promote", "-w"]));
    let new = on(&pair.standby, &db).await;
    new.await_streaming().await;
    let (before, _) = outbox(&new.client).await;
    for (key, seqs) in &before {
        for seq in seqs.len() as u64..seqs.len() as u64 + 10 {
            new.client
                .execute(
                    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
                     VALUES (gen_random_uuid(), 'order', $1, 'Updated', $2::text::jsonb)",
                    &[key, &format!("{{\"aggregate\":\"{key}\",\"seq\":{seq}}}")],
                )
                .await
                .expect("write to the new primary");
        }
    }
    let (_, ids) = outbox(&new.client).await;
    new.await_caught_up().await;
    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        ids.len(),
        TIMEOUT,
        Duration::from_secs(2),
    );
    let consumed: HashSet<String> = records.iter().map(harness::Consumed::id).collect();
    let lost = ids.difference(&consumed).count();
    let late = harness::late_copies(&records);
    let log = a.log_text();
    eprintln!(
        "survivor on PostgreSQL {}: A confirmed {a_confirmed}, B {synced} (synced after {:.1} s); \
         after the promotion A continued: {} events, {lost} lost, {} duplicates, {} late copies\n\
         A: {}",
        pg_bin_major(),
        b_confirmed.as_secs_f64(),
        ids.len(),
        records.len() - consumed.len(),
        late.len(),
        log.lines()
            .find(|l| l.contains("followed a failover"))
            .unwrap_or("(no line)")
    );
    assert_eq!(lost, 0, "events of the new primary missing from Kafka");
    assert!(log.contains("followed a failover"), "{log}");
    assert!(
        log.contains("all of it is in this server's history"),
        "Kafka was checked: {log}"
    );
    assert!(
        late.iter().all(|c| c.seen_before && c.below_published),
        "{late:?}"
    );
    let (code, log) = a.stop().await;
    assert_eq!(code, 0, "{log}");
}

/// Without `synchronized_standby_slots`, the standby is cut off while walship keeps
/// publishing; walship is killed (its successor has no memory of the old timeline), the
/// primary dies and the standby is promoted. A new walship finds in Kafka events the new
/// primary does not have, stops naming them and the way on, and confirms nothing; with
/// `postgres.source_epoch` set as it says, it publishes the new primary's events as a new
/// source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_behind_what_was_published_stops_a_new_process_before_it_confirms_anything() {
    if skipped(
        "a_promotion_behind_what_was_published_stops_a_new_process_before_it_confirms_anything",
    ) {
        return;
    }
    let pair = Pair::new(false).await;
    let db = TestDb::new_in(&pair.primary).await;
    let config = config(&db, &pair, true);
    let mut walship = Binary::start(&config);
    db.await_streaming().await;
    pair.await_synced(&db).await;
    pair.cut_standby();
    let mut client = connect(&db.url).await;
    for seq in 0..50 {
        harness::insert_txn(&mut client, &[harness::Row::new("order", "a", seq)]).await;
    }
    db.await_caught_up().await;
    walship.kill();
    tokio::task::block_in_place(|| pair.primary.stop_server_mode("immediate"));
    tokio::task::block_in_place(|| pair.standby.pg_ctl(&["promote", "-w"]));
    let new = on(&pair.standby, &db).await;
    let slot_before = new.slot_confirmed_lsn(db.slot()).await;
    let fresh = Binary::start(&config);
    let (code, log) = fresh.wait_exit(TIMEOUT).await;
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("Kafka holds events of source")
            && log.contains("50 record(s) read on timeline 1")
            && log.contains("past where timeline 1 ended")
            && log.contains("postgres.source_epoch = 1"),
        "{log}"
    );
    assert_eq!(
        new.slot_confirmed_lsn(db.slot()).await,
        slot_before,
        "confirmed past what Kafka holds beyond the branch"
    );
    eprintln!(
        "a promotion behind what was published: {}",
        log.lines()
            .find(|l| l.contains("Kafka holds events of source"))
            .unwrap_or_default()
    );
    // The way on it names: a new source, whose positions name no published event.
    let epoch = config.replace(
        "failover_slot = true",
        "failover_slot = true\nsource_epoch = 1",
    );
    let walship = Binary::start(&epoch);
    new.await_streaming().await;
    let mut client = connect(&new.url).await;
    for seq in 50..60 {
        harness::insert_txn(&mut client, &[harness::Row::new("order", "b", seq)]).await;
    }
    new.await_caught_up().await;
    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        60,
        TIMEOUT,
        Duration::from_secs(2),
    );
    let of_b: Vec<&harness::Consumed> = records.iter().filter(|r| r.key_str() == "b").collect();
    assert_eq!(of_b.len(), 10, "{of_b:?}");
    assert!(
        of_b.iter().all(|r| r
            .header("walship.source")
            .is_some_and(|s| s.ends_with("/1"))
            && r.header("walship.timeline").as_deref() == Some("2")),
        "{:?}",
        of_b[0].headers
    );
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}

/// Runs `walship check --json` with `config_text`; returns the exit code and each check's
/// (status, message, fix) by name (the last of a repeated name).
async fn check(config_text: &str) -> (i32, BTreeMap<String, (String, String, String)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("walship.toml");
    std::fs::write(&path, config_text).expect("write config");
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_walship"));
        for (k, _) in std::env::vars() {
            if k.starts_with("WALSHIP_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd
            .args(["check", "--json", "--config"])
            .arg(&path)
            .output()
            .expect("run walship check");
        drop(dir);
        out
    })
    .await
    .expect("check");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check prints JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let text = |c: &serde_json::Value, k: &str| c[k].as_str().unwrap_or_default().to_owned();
    let checks = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                text(c, "name"),
                (text(c, "status"), text(c, "message"), text(c, "fix")),
            )
        })
        .collect();
    (out.status.code().unwrap_or(-1), checks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_what_failover_needs_and_passes_once_it_is_set() {
    if skipped("check_says_what_failover_needs_and_passes_once_it_is_set") {
        return;
    }
    let pair = Pair::new(false).await;
    let db = TestDb::new_in(&pair.primary).await;
    // The standby first: check and walship (SQL and replication) must both pick the primary.
    let config = config_with_hosts(&db, &[pair.standby.port, pair.primary.port], true);
    // A slot made before, without failover: walship turns failover on when it starts.
    db.client
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
            db.slot()
        ))
        .await
        .expect("create the slot without failover");
    // check connects to the standby too: the test's database must exist there first.
    pair.await_replayed().await;

    // Before: no synchronized_standby_slots, a slot without failover.
    let (code, checks) = check(&config).await;
    let get = |checks: &BTreeMap<String, (String, String, String)>, name: &str| {
        checks
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("no check {name} in {checks:#?}"))
    };
    assert_ne!(code, 0, "{checks:#?}");
    let (status, _, fix) = get(&checks, "postgres.failover.synchronized_standby_slots");
    assert_eq!(status, "fail", "{checks:#?}");
    assert!(
        fix.contains("synchronized_standby_slots = 'standby1'"),
        "{fix}"
    );
    let (status, message, fix) = get(&checks, "postgres.failover.slot");
    assert_eq!(status, "warn", "{message}");
    assert!(
        message.contains("failover = false") && fix.contains("(FAILOVER true)"),
        "{message} / {fix}"
    );
    let (status, message, _) = get(&checks, "postgres.standby.slot");
    assert_eq!(status, "fail", "{message}");
    assert!(message.contains("is not on standby"), "{message}");
    let (status, message, _) = get(&checks, "postgres.connect");
    assert_eq!(status, "pass", "{message}");
    for setting in [
        "postgres.standby.sync_replication_slots",
        "postgres.standby.hot_standby_feedback",
        "postgres.standby.primary_slot_name",
    ] {
        // The primary does not name the standby's slot yet: that one fails, the rest are set.
        let present = checks.get(setting).map(|(s, _, _)| s.as_str());
        let expected = (setting == "postgres.standby.primary_slot_name").then_some("fail");
        assert_eq!(present, expected, "{setting}: {checks:#?}");
    }

    // Set it, let walship create the slot and the standby sync it: everything passes.
    set_standby_slots(&db.client, "standby1").await;
    let walship = Binary::start(&config);
    db.await_streaming().await;
    let failover: bool = db
        .client
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .expect("read the slot")
        .get(0);
    assert!(failover, "walship turned failover on for the existing slot");
    // The log line follows the change; the log reaches its file a moment later.
    until("walship to log that it turned failover on", || {
        walship.log_text().contains("turned failover on")
    })
    .await;
    pair.await_synced(&db).await;
    let (code, checks) = check(&config).await;
    let failing: Vec<_> = checks
        .iter()
        .filter(|(name, (status, _, _))| {
            (name.contains("failover") || name.contains("standby")) && status != "pass"
        })
        .collect();
    assert!(failing.is_empty(), "{failing:#?}");
    assert_eq!(code, 0, "{checks:#?}");
    let (_, message, _) = get(&checks, "postgres.standby.slot");
    assert!(message.contains("is synced to standby"), "{message}");
    eprintln!("check on a ready pair: {message}");
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_slot_on_a_server_before_17_is_refused_naming_its_version() {
    let major = pg_bin_major();
    if major >= 17 {
        eprintln!(
            "failover_slot_on_a_server_before_17_is_refused_naming_its_version: skipped: this \
             run's server is {major}, which has failover slots"
        );
        return;
    }
    let db = TestDb::new().await;
    let config = harness::config(&db, &broker().bootstrap, "")
        .postgres
        .clone();
    let mut full = harness::config(&db, &broker().bootstrap, "");
    full.postgres = walship::config::PostgresConfig {
        failover_slot: true,
        ..config
    };
    let e = harness::Relay::start(full)
        .exit()
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("postgres.failover_slot = true needs PostgreSQL 17 or later")
            && e.contains(&format!("runs PostgreSQL {major}."))
            && e.contains("postgres.failover_slot = false"),
        "{e}"
    );
    // Nothing was created.
    assert_eq!(db.confirmed_lsn().await, pgoutput::Lsn::ZERO);
}
