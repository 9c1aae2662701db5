//! The metrics and health endpoints, scraped while walship runs.

use std::io::{Read, Write};
use std::time::Duration;

use crate::harness::{self, Broker, Relay, Row, TIMEOUT, TestDb, broker, insert_txn};

pub(crate) fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        code,
        out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned(),
    )
}

/// The value of the one sample of `series` in a scrape: `series` is a metric name, optionally
/// with some of its labels (`walship_role{role="standby"}`); the sample may carry more labels
/// (every per-pipeline sample has `pipeline`). Panics unless exactly one sample matches.
pub(crate) fn value(metrics: &str, series: &str) -> f64 {
    let (name, wanted) = split_series(series);
    let found: Vec<f64> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (sample, v) = l.rsplit_once(' ')?;
            let (n, labels) = split_series(sample);
            (n == name && wanted.iter().all(|w| labels.contains(w)))
                .then(|| v.parse().ok())
                .flatten()
        })
        .collect();
    match found.as_slice() {
        [v] => *v,
        [] => panic!("metric {series} missing:\n{metrics}"),
        _ => panic!("metric {series} has {} samples:\n{metrics}", found.len()),
    }
}

/// `name{a="1",b="2"}` → (`name`, [`a="1"`, `b="2"`]). Label values in these tests hold no
/// commas.
fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => (series, Vec::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_lag_returns_to_zero() {
    let mut db = TestDb::new().await;
    let port = harness::process::free_port();
    let config = harness::config(
        &db,
        &broker().bootstrap,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""),
    );
    let relay = Relay::start_streaming(config, &db).await;

    let (code, body) = get(port, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    // The server marks the slot active a moment before walship has set up its session.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while get(port, "/readyz").0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never became 200 although walship streams and the broker is up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = get(port, "/metrics").1;
    assert_eq!(value(&before, "walship_events_published_total"), 0.0);
    assert_eq!(
        value(&before, "walship_last_ack_timestamp_seconds"),
        0.0,
        "no acknowledgement yet: the epoch, not now"
    );

    for i in 0..30 {
        insert_txn(&mut db.client, &[Row::new("order", "m", i)]).await;
    }
    let end = db.await_caught_up().await;

    // The endpoint reflects the confirmed state once walship has reported it.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let after = loop {
        let m = get(port, "/metrics").1;
        if value(&m, "walship_events_published_total") >= 30.0
            && value(&m, "walship_lag_bytes") == 0.0
        {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed 30 events and lag 0:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(value(&after, "walship_events_published_total"), 30.0);
    assert!(value(&after, "walship_bytes_published_total") > 30.0 * 10.0);
    assert!(value(&after, "walship_transactions_total") >= 30.0);
    assert_eq!(value(&after, "walship_commit_to_ack_seconds_count"), 30.0);
    assert!(value(&after, "walship_safe_lsn") >= end.0 as f64);
    assert_eq!(value(&after, "walship_in_flight_events"), 0.0);
    assert_eq!(value(&after, "walship_streaming"), 1.0);
    assert_eq!(
        value(&after, "walship_delivery_errors_total{class=\"transient\"}"),
        0.0
    );
    // The single pipeline is named after its slot, on every per-pipeline sample.
    assert_eq!(
        value(
            &after,
            &format!("walship_streaming{{pipeline=\"{}\"}}", db.slot())
        ),
        1.0
    );
    // The acknowledgement timestamps: the newest acknowledged commit is among the ones just
    // written, and the last acknowledgement came after it.
    let acked_commit = value(&after, "walship_last_acked_commit_timestamp_seconds");
    let acked = value(&after, "walship_last_ack_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        acked_commit > now - 600.0 && acked_commit <= acked && acked <= now + 1.0,
        "last acked commit {acked_commit}, last ack {acked}, now {now}"
    );
    // The process's own metrics and the build.
    assert!(value(&after, "process_resident_memory_bytes") > 1e6);
    assert!(value(&after, "process_cpu_seconds_total") > 0.0);
    assert_eq!(
        value(
            &after,
            &format!(
                "walship_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    // The one active process: /active says so.
    assert_eq!(get(port, "/active").0, 200);
    relay.stop().await.expect("graceful stop");
}

/// `walship_lag_bytes` counts the WAL between the server's position and the confirmed one: it
/// covers a backlog that cannot be delivered (the broker is down), and returns to 0 once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_the_backlog_while_the_broker_is_down_and_returns_to_zero() {
    let mut db = TestDb::new().await;
    let kafka = Broker::dedicated();
    let port = harness::process::free_port();
    let mut config = harness::config(
        &db,
        &kafka.bootstrap,
        "[kafka.librdkafka]\n\"topic.metadata.propagation.max.ms\" = \"2000\"\n\"topic.metadata.refresh.interval.ms\" = \"1000\"",
    );
    config.metrics.listen = Some(format!("127.0.0.1:{port}"));
    config.postgres.watch_interval_ms = 200;
    // Nothing was delivered before: no tail to read back from the stopped broker.
    config.run.resume_dedup = false;
    // First start creates the slot; the backlog is written while walship is stopped.
    Relay::start_streaming(config.clone(), &db)
        .await
        .stop()
        .await
        .expect("graceful stop");
    let confirmed = db.confirmed_lsn().await;
    kafka.stop();
    for i in 0..500 {
        insert_txn(&mut db.client, &[Row::new("order", "lag", i)]).await;
    }
    let end = db.current_lsn().await;
    let behind = (end.0 - confirmed.0) as f64;

    let relay = Relay::start_streaming(config, &db).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let m = get(port, "/metrics").1;
        let lag = value(&m, "walship_lag_bytes");
        if lag >= behind && value(&m, "walship_streaming") == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "walship_lag_bytes stayed below the {behind} bytes walship cannot deliver:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        db.confirmed_lsn().await,
        confirmed,
        "nothing can be confirmed yet"
    );

    kafka.start();
    db.await_confirmed(end, TIMEOUT).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let m = get(port, "/metrics").1;
        if value(&m, "walship_lag_bytes") == 0.0
            && value(&m, "walship_events_published_total") >= 500.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lag never returned to 0 after the broker came back:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_writes_logical_messages_that_the_slot_confirms() {
    let db = TestDb::new().await;
    let mut config = harness::config(&db, &broker().bootstrap, "");
    config.postgres.heartbeat_interval_ms = 100;
    let relay = Relay::start_streaming(config, &db).await;
    await_heartbeat(&db).await;
    relay.stop().await.expect("graceful stop");
}

/// Waits until walship (streaming from the test's slot) has written a heartbeat message and
/// its slot has confirmed it: a second slot, created now, records what the server decodes
/// from here on.
pub(crate) async fn await_heartbeat(db: &TestDb) {
    let witness = format!("{}_witness", db.name);
    db.client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&witness],
        )
        .await
        .unwrap();
    let publication = format!("{}_pub", db.name);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let heartbeat_lsn = loop {
        let rows = db
            .client
            .query(
                "SELECT lsn, data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, 'proto_version', '1', \
                 'publication_names', $2, 'messages', 'true')",
                &[&witness, &publication],
            )
            .await
            .unwrap();
        let mut decoder = pgoutput::Decoder::new(1);
        let found = rows.iter().find_map(|r| {
            let data: Vec<u8> = r.get(1);
            match decoder.decode(bytes::Bytes::from(data)) {
                Ok(pgoutput::Message::Message(m))
                    if m.prefix == "walship.heartbeat" && !m.is_transactional() =>
                {
                    Some(m.lsn)
                }
                _ => None,
            }
        });
        if let Some(lsn) = found {
            break lsn;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no heartbeat message was written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    db.await_confirmed(heartbeat_lsn, TIMEOUT).await;
    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&witness])
        .await
        .unwrap();
}

/// The pipelines among `names` a process streams now, by its `walship_role` metric; empty
/// while its endpoint is not up.
pub(crate) fn active(port: u16, names: &[&str]) -> std::collections::HashSet<String> {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        return std::collections::HashSet::new();
    }
    let metrics = get(port, "/metrics").1;
    names
        .iter()
        .filter(|name| {
            metrics.lines().any(|l| {
                l.starts_with(&format!(
                    "walship_role{{pipeline=\"{name}\",role=\"active\"}} 1"
                ))
            })
        })
        .map(|name| (*name).to_owned())
        .collect()
}
