//! Unit tests of the metrics exposition and the health server.

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::encode::*;
use super::http::*;
use super::state::*;
use hyper::StatusCode;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Bound on every wait for something that should happen.
const WAIT: Duration = Duration::from_secs(10);

/// The name a single pipeline is served under in these tests (its slot's, in a real process).
const ONE: &str = "walship";

fn scrape(t: &Arc<Telemetry>) -> String {
    render(&registry(Arc::new([(ONE.to_owned(), Arc::clone(t))])))
}

/// `name{pipeline="walship"}`, or with more labels after it.
fn one(name: &str, more: &str) -> String {
    format!("{name}{{pipeline=\"{ONE}\"{more}}}")
}

/// One family of a parsed exposition: its type, help and samples (`name{labels}` → value).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    help: String,
    samples: BTreeMap<String, f64>,
}

/// Parses the Prometheus text format (0.0.4) strictly enough to catch a malformed line, a
/// sample outside any declared family, or a family declared twice.
fn parse(text: &str) -> BTreeMap<String, Family> {
    let mut families = BTreeMap::<String, Family>::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(
                !families.contains_key(name),
                "{name} declared twice:\n{text}"
            );
            current = name.to_owned();
            families.entry(current.clone()).or_default().help = help.to_owned();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert_eq!(name, current, "TYPE after another family's HELP");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                kind != "counter" || name.ends_with("_total"),
                "a counter without _total: {line}"
            );
            families.get_mut(name).expect("HELP before TYPE").kind = kind.to_owned();
        } else {
            let (series, value) = line.rsplit_once(' ').expect("sample: series value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            let name = series.split('{').next().expect("name");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                assert!(
                    labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                    "{line}"
                );
            }
            let family = &families[&current];
            let own = match family.kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name == format!("{current}{s}")),
                _ => name == current,
            };
            assert!(own, "{name} is not a sample of {current}:\n{text}");
            families
                .get_mut(&current)
                .expect("family")
                .samples
                .insert(series.to_owned(), value);
        }
    }
    families
}

#[test]
fn exposition_parses_and_carries_every_value() {
    let t = Arc::new(Telemetry::default());
    t.events_published.store(30, Ordering::Relaxed);
    t.bytes_published.store(4567, Ordering::Relaxed);
    t.transactions.store(31, Ordering::Relaxed);
    t.in_flight.store(2, Ordering::Relaxed);
    t.pending_transactions.store(7, Ordering::Relaxed);
    t.safe_lsn.store(123_456_789, Ordering::Relaxed);
    t.server_wal_end.store(123_456_800, Ordering::Relaxed);
    t.errors_transient.store(1, Ordering::Relaxed);
    t.errors_record.store(2, Ordering::Relaxed);
    t.errors_fatal.store(3, Ordering::Relaxed);
    t.reconnects.store(4, Ordering::Relaxed);
    t.dead_lettered.store(5, Ordering::Relaxed);
    t.resume_skipped.store(6, Ordering::Relaxed);
    t.trace_context_dropped.store(7, Ordering::Relaxed);
    t.streaming.store(true, Ordering::Relaxed);
    t.last_acked_commit_ms
        .store(1_796_565_204_250, Ordering::Relaxed);
    t.last_ack_ms.store(1_796_565_205_500, Ordering::Relaxed);
    let text = scrape(&t);
    let families = parse(&text);
    let value = |family: &str, series: &str| families[family].samples[series];
    for (name, kind, v) in [
        ("walship_events_published_total", "counter", 30.0),
        ("walship_bytes_published_total", "counter", 4567.0),
        ("walship_transactions_total", "counter", 31.0),
        ("walship_in_flight_events", "gauge", 2.0),
        ("walship_pending_transactions", "gauge", 7.0),
        ("walship_safe_lsn", "gauge", 123_456_789.0),
        ("walship_lag_bytes", "gauge", 11.0),
        (
            "walship_last_acked_commit_timestamp_seconds",
            "gauge",
            1_796_565_204.25,
        ),
        (
            "walship_last_ack_timestamp_seconds",
            "gauge",
            1_796_565_205.5,
        ),
        ("walship_reconnects_total", "counter", 4.0),
        ("walship_dead_lettered_total", "counter", 5.0),
        ("walship_resume_skipped_total", "counter", 6.0),
        ("walship_trace_context_dropped_total", "counter", 7.0),
        ("walship_streaming", "gauge", 1.0),
    ] {
        assert_eq!(families[name].kind, kind, "{name}");
        assert_eq!(value(name, &one(name, "")), v, "{name}");
    }
    let errors = "walship_delivery_errors_total";
    assert_eq!(families[errors].kind, "counter");
    for (class, v) in [("transient", 1.0), ("record", 2.0), ("fatal", 3.0)] {
        assert_eq!(
            value(errors, &one(errors, &format!(",class=\"{class}\""))),
            v
        );
    }
    assert_eq!(families["walship_commit_to_ack_seconds"].kind, "histogram");
    assert_eq!(families["walship_role"].kind, "gauge");
    for (role, v) in [
        ("active", 1.0),
        ("standby", 0.0),
        ("starting", 0.0),
        ("elsewhere", 0.0),
        ("stopped", 0.0),
    ] {
        assert_eq!(
            value(
                "walship_role",
                &one("walship_role", &format!(",role=\"{role}\""))
            ),
            v
        );
    }
    // Every per-pipeline sample names its pipeline; the process's own metrics do not.
    for (name, family) in &families {
        for series in family.samples.keys() {
            let per_pipeline = name.starts_with("walship_") && name != "walship_build_info";
            assert_eq!(
                series.contains("pipeline=\"walship\""),
                per_pipeline,
                "{series}"
            );
        }
    }
    let info = &families["walship_build_info"];
    let (series, v) = info.samples.iter().next().expect("one build_info sample");
    assert_eq!(*v, 1.0);
    assert!(
        series.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && series.contains("git_commit=\"")
            && series.contains("rustc=\""),
        "{series}"
    );
    // Written by every Prometheus client library under these names.
    for (name, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("process_threads", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
    ] {
        assert_eq!(families[name].kind, kind, "{name}");
        // A test process may not have used a whole clock tick of CPU yet.
        let least = if kind == "counter" { 0.0 } else { 1.0 };
        assert!(families[name].samples[name] >= least, "{name}:\n{text}");
    }
    // The same families, in the same order, with the same help.
    let declared: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .collect();
    assert_eq!(
        declared,
        [
            "walship_events_published_total Outbox events acknowledged by Kafka.",
            "walship_bytes_published_total Key and value bytes acknowledged by Kafka.",
            "walship_transactions_total Committed transactions decoded, with or without outbox events (again after a reconnect).",
            "walship_in_flight_events Events handed to the producer and not yet acknowledged.",
            "walship_pending_transactions Transactions tracked from the oldest not yet acknowledged (bounded by run.max_pending_transactions).",
            "walship_safe_lsn WAL position confirmed to PostgreSQL (as a number).",
            "walship_lag_bytes Bytes of WAL between the server's position (sampled at session start and every postgres.watch_interval_ms) and the confirmed position.",
            "walship_last_acked_commit_timestamp_seconds Commit time (Unix seconds) of the newest transaction whose events Kafka has all acknowledged; 0 before the first.",
            "walship_last_ack_timestamp_seconds When Kafka last acknowledged a record of this pipeline (Unix seconds); 0 before the first.",
            "walship_reconnects_total Sessions restarted after a transient error.",
            "walship_dead_lettered_total Outbox rows published to the dead-letter topic.",
            "walship_resume_skipped_total Events not sent again after a restart because an earlier run had delivered them.",
            "walship_trace_context_dropped_total Malformed W3C traceparent or tracestate values left off published events.",
            "walship_streaming 1 while streaming from the slot.",
            "walship_unowned_seconds Seconds nobody has streamed the pipeline's slot, as this process saw it (0 while some process streams it; polled every postgres.watch_interval_ms while another process runs it). Alert on the minimum over processes.",
            "walship_role 1 for this process's role: active (streams the slot), standby (another consumer holds the slot; takes over when it is released), starting (neither yet), elsewhere (with [cluster]: another process runs the pipeline) or stopped (by a definite error).",
            "walship_slot_wal_status 1 for the slot's wal_status as this process last read it (reserved, extended, unreserved: removed at the next checkpoint unless the slot catches up, lost); all 0 before it was read.",
            "walship_slot_safe_wal_size_bytes The slot's safe_wal_size as this process last read it: bytes of WAL that can still be written before the slot is in danger of invalidation (no sample while unlimited by max_slot_wal_keep_size, or not read yet).",
            "walship_delivery_errors_total Failed deliveries by class.",
            "walship_commit_to_ack_seconds Time from a transaction's commit to the acknowledgement of its last event.",
            "walship_read_to_ack_seconds Time from walship reading a transaction's first event to the acknowledgement of its last (walship's and the broker's share of commit to ack).",
            "walship_build_info 1, labelled with walship's version, the git commit it was built from and the rustc that built it.",
            "process_cpu_seconds_total Total user and system CPU time spent in seconds.",
            "process_resident_memory_bytes Resident memory size in bytes.",
            "process_virtual_memory_bytes Virtual memory size in bytes.",
            "process_start_time_seconds Start time of the process since unix epoch in seconds.",
            "process_threads Number of OS threads in the process.",
            "process_open_fds Number of open file descriptors.",
            "process_max_fds Maximum number of open file descriptors.",
        ]
    );
}

#[test]
fn a_slot_nobody_streams_counts_as_unowned_until_some_process_is_seen_streaming_it() {
    let t = Telemetry::default();
    let now = 1_000_000_000;
    // Never seen streamed: counted from the process's start.
    assert_eq!(t.unowned_seconds_at(now, now - 5_000), 5.0);
    t.owner_seen_ms.store(now - 90_000, Ordering::Relaxed);
    assert_eq!(t.unowned_seconds_at(now, now - 200_000), 90.0);
    t.streaming.store(true, Ordering::Relaxed);
    assert_eq!(
        t.unowned_seconds_at(now, now - 200_000),
        0.0,
        "streamed here"
    );
    t.streaming.store(false, Ordering::Relaxed);
    t.saw_owner();
    assert!(t.unowned_seconds() < 1.0);
    let text = scrape(&Arc::new(t));
    assert!(
        parse(&text)["walship_unowned_seconds"].samples[&one("walship_unowned_seconds", "")] < 1.0,
        "{text}"
    );
}

/// The slot's WAL retention as last read: one status at 1, and the safe size only while the
/// server limits it.
#[test]
fn the_slot_wal_status_and_safe_size_are_those_last_read() {
    let t = Arc::new(Telemetry::default());
    let text = scrape(&t);
    let families = parse(&text);
    assert!(
        families["walship_slot_wal_status"]
            .samples
            .values()
            .all(|&v| v == 0.0),
        "not read yet: {text}"
    );
    assert!(
        families["walship_slot_safe_wal_size_bytes"]
            .samples
            .is_empty()
    );
    let mut slot = walship_postgres::SlotState {
        name: "w".into(),
        plugin: Some("pgoutput".into()),
        database: Some("app".into()),
        confirmed_flush_lsn: None,
        restart_lsn: None,
        wal_status: Some("unreserved".into()),
        invalidation_reason: None,
        active_pid: None,
        safe_wal_size: Some(-4096),
    };
    t.note_slot(&slot);
    let text = scrape(&t);
    let families = parse(&text);
    let status = &families["walship_slot_wal_status"].samples;
    assert_eq!(
        status[&one("walship_slot_wal_status", ",status=\"unreserved\"")],
        1.0
    );
    assert_eq!(status.values().sum::<f64>(), 1.0, "{text}");
    assert_eq!(
        families["walship_slot_safe_wal_size_bytes"].samples
            [&one("walship_slot_safe_wal_size_bytes", "")],
        -4096.0
    );
    // Unlimited again: no safe size to report.
    slot.wal_status = Some("reserved".into());
    slot.safe_wal_size = None;
    t.note_slot(&slot);
    let families = parse(&scrape(&t));
    assert!(
        families["walship_slot_safe_wal_size_bytes"]
            .samples
            .is_empty()
    );
    assert_eq!(
        families["walship_slot_wal_status"].samples
            [&one("walship_slot_wal_status", ",status=\"reserved\"")],
        1.0
    );
}

/// A pipeline stopped by a definite error says so in its role, whatever else it was.
#[test]
fn a_stopped_pipeline_has_the_stopped_role() {
    let t = Arc::new(Telemetry::default());
    t.standby_for_pid.store(7, Ordering::Relaxed);
    *t.stopped.lock().unwrap() = Some("replication slot \"w\" has been invalidated".into());
    assert_eq!(t.role(), Role::Stopped);
    let health = t.health();
    assert!(!health.healthy && health.line.starts_with("stopped: replication slot"));
    assert!(
        scrape(&t).contains(&format!("{} 1", one("walship_role", ",role=\"stopped\""))),
        "{}",
        scrape(&t)
    );
}

/// Before the first acknowledgement the timestamps say 0 (the epoch), never "just now": an
/// alert on their age fires for a pipeline that never delivered.
#[test]
fn acknowledgement_timestamps_are_zero_before_the_first() {
    let text = scrape(&Arc::new(Telemetry::default()));
    let families = parse(&text);
    for name in [
        "walship_last_acked_commit_timestamp_seconds",
        "walship_last_ack_timestamp_seconds",
    ] {
        assert_eq!(families[name].samples[&one(name, "")], 0.0, "{text}");
    }
}

/// A standby that can look at the slot is healthy (ready) but not active; one that has not
/// reached PostgreSQL for [`STANDBY_SILENCE`] is not healthy: it could not take over.
#[test]
fn a_process_waiting_for_the_slot_is_a_ready_standby_while_it_can_look_at_the_slot() {
    let t = Telemetry::default();
    assert_eq!(t.role(), Role::Starting);
    assert!(!t.is_ready(), "starting");
    let now = unix_ms();
    t.standby_for_pid.store(4242, Ordering::Relaxed);
    t.standby_polled_ms.store(now - 1_000, Ordering::Relaxed);
    assert_eq!(t.role(), Role::Standby);
    // Not before the broker has answered it: it could not publish after taking over.
    let health = t.health_at(now);
    assert!(!health.healthy, "{health:?}");
    assert!(
        health.line.contains("broker has not answered it yet"),
        "{health:?}"
    );
    t.standby_broker_ms.store(now - 2_000, Ordering::Relaxed);
    let health = t.health_at(now);
    assert!(health.healthy, "{health:?}");
    assert!(
        health.line.starts_with("standby: ") && health.line.contains("4242"),
        "{health:?}"
    );
    let silent = now + STANDBY_SILENCE.as_millis() as i64;
    let health = t.health_at(silent);
    assert!(!health.healthy, "{health:?}");
    assert!(health.line.starts_with("not ready: standby"), "{health:?}");
    // PostgreSQL answers, the broker has not for longer than the silence allowed.
    t.standby_polled_ms.store(silent - 1_000, Ordering::Relaxed);
    let health = t.health_at(silent);
    assert!(
        !health.healthy && health.line.contains("broker has not answered it for"),
        "{health:?}"
    );
    let text = scrape(&Arc::new(t));
    assert!(
        text.contains(&format!("{} 1", one("walship_role", ",role=\"standby\""))),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} 0", one("walship_role", ",role=\"active\""))),
        "{text}"
    );
}

#[test]
fn histogram_is_cumulative() {
    let t = Arc::new(Telemetry::default());
    t.observe_commit_to_ack(1000, 1003); // 3 ms
    t.observe_commit_to_ack(1000, 1500); // 500 ms
    t.observe_commit_to_ack(1000, 200_000); // beyond the last bucket
    let text = scrape(&t);
    let histogram = &parse(&text)["walship_commit_to_ack_seconds"];
    let bucket = |le: &str| {
        histogram.samples[&one(
            "walship_commit_to_ack_seconds_bucket",
            &format!(",le=\"{le}\""),
        )]
    };
    assert_eq!(bucket("0.002"), 0.0, "{text}");
    assert_eq!(bucket("0.005"), 1.0, "{text}");
    assert_eq!(bucket("0.5"), 2.0, "{text}");
    assert_eq!(bucket("60"), 2.0, "{text}");
    assert_eq!(bucket("+Inf"), 3.0, "{text}");
    assert_eq!(
        histogram.samples[&one("walship_commit_to_ack_seconds_count", "")],
        3.0
    );
    assert_eq!(
        histogram.samples[&one("walship_commit_to_ack_seconds_sum", "")],
        199.503
    );
    // Every bound of LATENCY_BUCKETS, written as before (`1`, not `1.0`), then +Inf.
    let les: Vec<String> = histogram
        .samples
        .keys()
        .filter_map(|s| {
            s.strip_prefix("walship_commit_to_ack_seconds_bucket{pipeline=\"walship\",le=\"")
        })
        .map(|s| s.trim_end_matches("\"}").to_owned())
        .collect();
    let mut expected: Vec<String> = LATENCY_BUCKETS.iter().map(f64::to_string).collect();
    expected.push("+Inf".to_owned());
    let (mut les, mut expected) = (les, expected);
    les.sort();
    expected.sort();
    assert_eq!(les, expected);
}

#[test]
fn lag_and_readiness() {
    let t = Telemetry::default();
    t.server_wal_end.store(500, Ordering::Relaxed);
    t.safe_lsn.store(200, Ordering::Relaxed);
    assert_eq!(t.lag_bytes(), 300);
    assert!(!t.is_ready(), "not streaming");
    t.streaming.store(true, Ordering::Relaxed);
    assert!(t.is_ready());
    assert_eq!(t.health().line, "active: streams the slot");
    t.in_flight.store(5, Ordering::Relaxed);
    t.last_delivery_ms
        .store(unix_ms() - 60_000, Ordering::Relaxed);
    let health = t.health();
    assert!(
        !health.healthy,
        "records waiting and no broker answer for a minute"
    );
    assert!(
        health
            .line
            .starts_with("not ready: streaming, but the broker")
            && health.line.contains("5 records"),
        "{health:?}"
    );
    t.in_flight.store(0, Ordering::Relaxed);
    assert!(t.is_ready(), "nothing waits for the broker");
}

#[test]
fn accept_backoff_doubles_to_its_cap_and_starts_over() {
    let mut backoff = AcceptBackoff::default();
    let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
    assert_eq!(delays[0], ACCEPT_BACKOFF_MIN);
    assert_eq!(delays[1], ACCEPT_BACKOFF_MIN * 2);
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    assert_eq!(delays[9], ACCEPT_BACKOFF_MAX);
    backoff.reset();
    assert_eq!(backoff.next_delay(), ACCEPT_BACKOFF_MIN);
}

/// `EMFILE` makes every accept fail at once: the loop waits between attempts (at least the
/// back-off's delays; a busy loop would make the attempts follow each other at once).
#[tokio::test]
async fn accept_errors_wait_instead_of_spinning() {
    let start = tokio::time::Instant::now();
    let mut attempts = Vec::new();
    let mut accept_fn = || {
        attempts.push(start.elapsed());
        let result = match attempts.len() {
            // A peer that went away costs no wait.
            1 => Err(io::Error::from(io::ErrorKind::ConnectionAborted)),
            2..=6 => Err(io::Error::from_raw_os_error(libc::EMFILE)),
            _ => Ok(()),
        };
        std::future::ready(result)
    };
    let mut backoff = AcceptBackoff::default();
    tokio::time::timeout(WAIT, accept(&mut accept_fn, &mut backoff))
        .await
        .expect("accepts after the errors");
    assert_eq!(attempts.len(), 7);
    let mut expected = AcceptBackoff::default();
    for pair in attempts[1..].windows(2) {
        let delay = expected.next_delay();
        assert!(pair[1] - pair[0] >= delay, "{delay:?} between {attempts:?}");
    }
    assert_eq!(
        backoff.next_delay(),
        ACCEPT_BACKOFF_MIN,
        "reset after an accept"
    );
}

/// A server on 127.0.0.1 with `limits`, stopped when the returned handle is dropped.
async fn server(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(serve_with(
        listener,
        ONE.to_owned(),
        Arc::new(Telemetry::default()),
        limits,
    ));
    (addr, task)
}

/// Reads until the server closes the connection (or resets it), within [`WAIT`].
async fn read_until_closed(socket: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, socket.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {WAIT:?}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

async fn get(socket: &mut TcpStream, path: &str) -> String {
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("send request");
    read_until_closed(socket).await
}

#[tokio::test]
async fn answers_each_path_and_closes() {
    let (addr, _server) = server(Limits::default()).await;
    for (path, status, body) in [
        ("/healthz", "200", "ok\n"),
        ("/readyz", "503", "walship: not ready: starting"),
        ("/readyz/walship", "503", "walship: not ready: starting"),
        ("/active", "503", "walship: starting\n"),
        ("/active/walship", "503", "walship: starting\n"),
        ("/readyz/other", "404", "try /metrics"),
        ("/nope", "404", "try /metrics"),
        (
            "/metrics",
            "200",
            "walship_events_published_total{pipeline=\"walship\"} 0\n",
        ),
    ] {
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        let response = get(&mut socket, path).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status} ")),
            "{path}: {response}"
        );
        let (head, content) = response.split_once("\r\n\r\n").expect("head and body");
        assert!(content.contains(body), "{path}: {response}");
        if path == "/metrics" {
            assert!(head.contains("text/plain; version=0.0.4"), "{head}");
            parse(content);
        }
    }
}

/// A client that sends nothing, half a request head, or trickles one forever is
/// disconnected at the header timeout, without an answer to a request.
#[tokio::test]
async fn slow_clients_are_disconnected_at_the_header_timeout() {
    let (addr, _server) = server(Limits {
        header_read_timeout: Duration::from_millis(200),
        ..Limits::default()
    })
    .await;
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut half = TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send half a request");
    let mut trickle = TcpStream::connect(addr).await.expect("connect");
    let (mut trickle_read, mut trickle_write) = trickle.split();
    let drip = async {
        trickle_write.write_all(b"GET /").await.ok();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        // Stops when the server has closed the connection.
        while trickle_write.write_all(b"a").await.is_ok() {
            tick.tick().await;
        }
    };
    let trickled = tokio::time::timeout(WAIT, async {
        let mut out = Vec::new();
        // Either ends once the server has closed the connection.
        tokio::select! {
            _ = trickle_read.read_to_end(&mut out) => {}
            () = drip => {}
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("the trickling client kept its connection");
    for (client, response) in [
        ("silent", read_until_closed(&mut silent).await),
        ("half", read_until_closed(&mut half).await),
        ("trickle", trickled),
    ] {
        // hyper may say 408 before it closes; it never answers the request.
        assert!(
            response.is_empty() || response.starts_with("HTTP/1.1 408"),
            "{client}: {response}"
        );
    }
}

/// The connection deadline holds even when the header timeout is longer.
#[tokio::test]
async fn connections_end_at_their_deadline() {
    let (addr, _server) = server(Limits {
        header_read_timeout: Duration::from_secs(60),
        connection_timeout: Duration::from_millis(200),
        ..Limits::default()
    })
    .await;
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(read_until_closed(&mut silent).await, "");
}

/// With every slot taken, a new connection is not served; it is once a slot frees.
#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_slot() {
    let (addr, _server) = server(Limits {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(60),
        connection_timeout: Duration::from_secs(60),
    })
    .await;
    // Accepted in connection order: these two take the slots.
    let mut first = TcpStream::connect(addr).await.expect("connect");
    let mut second = TcpStream::connect(addr).await.expect("connect");
    let mut waiting = TcpStream::connect(addr).await.expect("connect");
    waiting
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send request");
    let mut byte = [0u8; 1];
    // Showing that something does not happen takes a wait; a served request answers in
    // milliseconds.
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut byte)).await;
    assert!(early.is_err(), "a third connection was served: {early:?}");

    // The slot holders are served meanwhile; one finishing frees its slot.
    let response = get(&mut first, "/healthz").await;
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    let response = read_until_closed(&mut waiting).await;
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert!(
        response.contains("walship_streaming{pipeline=\"walship\"} 0"),
        "{response}"
    );
    let response = get(&mut second, "/healthz").await;
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
}

#[test]
fn with_several_pipelines_every_sample_names_its_pipeline_and_readiness_needs_all() {
    let (a, b) = (
        Arc::new(Telemetry::default()),
        Arc::new(Telemetry::default()),
    );
    a.events_published.store(3, Ordering::Relaxed);
    a.streaming.store(true, Ordering::Relaxed);
    a.last_delivery_ms.store(unix_ms(), Ordering::Relaxed);
    *b.stopped.lock().unwrap() = Some("replication slot \"b\" was invalidated".into());
    let pipelines: Pipelines = Arc::new([
        ("orders".to_owned(), Arc::clone(&a)),
        ("billing".to_owned(), Arc::clone(&b)),
    ]);
    let text = render(&registry(Arc::clone(&pipelines)));
    let families = parse(&text);
    let events = &families["walship_events_published_total"].samples;
    assert_eq!(
        events["walship_events_published_total{pipeline=\"orders\"}"],
        3.0
    );
    assert_eq!(
        events["walship_events_published_total{pipeline=\"billing\"}"],
        0.0
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("walship_") && !l.starts_with("walship_build_info"))
    {
        assert!(
            line.contains("pipeline=\""),
            "a sample without its pipeline: {line}"
        );
    }
    let role = &families["walship_role"].samples;
    assert_eq!(
        role["walship_role{pipeline=\"orders\",role=\"active\"}"],
        1.0
    );
    let (status, body, _) = readyz(pipelines.iter());
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        "orders: active: streams the slot\n\
         billing: stopped: replication slot \"b\" was invalidated\n"
    );
    let (status, body, _) = readyz(pipelines.iter().take(1));
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "orders: active: streams the slot\n")
    );
    let (status, body, _) = active(pipelines.iter());
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "orders: active\nbilling: stopped\n")
    );
    let (status, _, _) = active(pipelines.iter().skip(1));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

/// With `[cluster]`, a pipeline another process runs is listed as elsewhere: it is healthy here
/// (`/readyz` and `/readyz/<name>` 200) but not active (`/active/<name>` 503), and the role
/// metric says so.
#[test]
fn a_pipeline_run_elsewhere_is_healthy_here_but_not_active() {
    let here = Arc::new(Telemetry::default());
    here.streaming.store(true, Ordering::Relaxed);
    let away = Arc::new(Telemetry::default());
    away.elsewhere.store(true, Ordering::Relaxed);
    // Not before the process is in the group (joining, or cut off from the broker).
    assert!(!away.is_ready(), "{:?}", away.health());
    assert!(away.health().line.contains("not in the cluster's group"));
    away.in_group.store(true, Ordering::Relaxed);
    let pipelines: Pipelines = Arc::new([
        ("orders".to_owned(), Arc::clone(&here)),
        ("billing".to_owned(), Arc::clone(&away)),
    ]);
    let (status, body, _) = readyz(pipelines.iter());
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        "orders: active: streams the slot\n\
         billing: elsewhere: another process of the cluster runs this pipeline\n"
    );
    let (status, _, _) = readyz(pipelines.iter().skip(1));
    assert_eq!(status, StatusCode::OK);
    let (status, body, _) = active(pipelines.iter().skip(1));
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "billing: elsewhere\n")
    );
    let text = render(&registry(Arc::clone(&pipelines)));
    let role = &parse(&text)["walship_role"].samples;
    assert_eq!(
        role["walship_role{pipeline=\"billing\",role=\"elsewhere\"}"],
        1.0
    );
    assert_eq!(
        role["walship_role{pipeline=\"billing\",role=\"starting\"}"],
        0.0
    );
    // Streaming wins: a pipeline that still finishes its session after a move is active.
    away.streaming.store(true, Ordering::Relaxed);
    assert_eq!(away.role(), Role::Active);
}
