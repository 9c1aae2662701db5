//! The operator's monitoring against real parts: a real Prometheus server scrapes a real walship
//! (streaming events from a real PostgreSQL to the broker) and loads the alert rules of
//! `deploy/prometheus/`; every rule evaluates without error, and every query of the Grafana
//! dashboard in `deploy/grafana/` (its variables substituted) returns at least one series with a
//! finite value. Every metric the rules and the dashboard name is one walship serves.
//!
//! The server runs on PostgreSQL 15 only: what it checks is walship's exposition and the
//! queries over it, not the database (a private cluster with `max_slot_wal_keep_size`, so the
//! safe WAL size has a value to show).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::harness::postgres::{Cluster, connect};
use crate::harness::process::{free_port, spawn_owned, wait_for_port};
use crate::harness::{self, Binary, Row, TIMEOUT, TestDb, broker, insert_rows};
use crate::metrics::get;

/// The repository's `deploy/` directory.
fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(path)
}

/// The Prometheus server binary: `WALSHIP_TEST_PROMETHEUS` (scripts/test.sh sets it), else the
/// copy `scripts/operator-tools.sh prometheus` keeps (fetched on first use), else `prometheus`
/// on the PATH.
fn prometheus_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WALSHIP_TEST_PROMETHEUS") {
        return PathBuf::from(bin);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/operator-tools.sh");
    let fetched = std::process::Command::new(&script)
        .arg("prometheus")
        .stderr(std::process::Stdio::inherit())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("prometheus"));
    fetched
        .or_else(|| {
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .map(|d| d.join("prometheus"))
                .find(|p| p.is_file())
        })
        .expect(
            "no Prometheus server: scripts/operator-tools.sh prometheus failed (see above) and \
             none is on the PATH; set WALSHIP_TEST_PROMETHEUS to a prometheus binary",
        )
}

/// `s` percent-encoded for a query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `path` from the server on `port`; the JSON body. HTTP/1.0, so the answer is never
/// chunked and ends with the connection.
fn api(port: u16, path: &str) -> Value {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect prometheus");
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        !head.contains("Transfer-Encoding: chunked"),
        "chunked answer from {path}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"))
}

/// True once the server answers `/-/ready` with 200: its port opens before its storage is
/// loaded, and until then every API call is answered 503.
fn ready(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    if write!(s, "GET /-/ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut out = Vec::new();
    if s.read_to_end(&mut out).is_err() {
        return false;
    }
    out.starts_with(b"HTTP/1.0 200") || out.starts_with(b"HTTP/1.1 200")
}

/// An instant query's result vector; panics if Prometheus refuses the query.
fn query(port: u16, expr: &str) -> Vec<Value> {
    let answer = api(port, &format!("/api/v1/query?query={}", encode(expr)));
    assert_eq!(answer["status"], "success", "{expr}: {answer}");
    answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// True when `result` holds a series with a finite value.
fn has_finite_series(result: &[Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// Every `expr` of the dashboard's panels, nested rows included.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((
                        p["title"].as_str().unwrap_or("?").to_owned(),
                        expr.to_owned(),
                    ));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The metric names (`walship_*`, `process_*`) a PromQL expression names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        // Only at a character's start: comments may hold any text.
        if word_start
            && expr.is_char_boundary(i)
            && (expr[i..].starts_with("walship_") || expr[i..].starts_with("process_"))
        {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            names.insert(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_the_alert_rules_and_every_dashboard_query_over_a_real_walship() {
    let cluster = tokio::task::block_in_place(|| Cluster::private(&["max_slot_wal_keep_size=1GB"]));
    let db = TestDb::new_in(&cluster).await;
    let port = free_port();
    let config = harness::config_toml(&db, &broker().bootstrap, "").replacen(
        "status_interval_ms = 200\n",
        "status_interval_ms = 200\nwatch_interval_ms = 500\n",
        1,
    ) + &format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let walship = Binary::start(&config);
    db.await_streaming().await;

    // Events keep flowing while Prometheus scrapes, so rates and latencies have values.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (url, writing) = (db.url.clone(), Arc::clone(&writing));
        tokio::spawn(async move {
            let client = connect(&url).await;
            let mut seq = 0;
            while writing.load(Ordering::Relaxed) {
                insert_rows(&client, &[Row::new("order", "mon", seq)]).await;
                seq += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Prometheus: scrape walship every second, evaluate the rules every second.
    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    let rules = deploy("prometheus/walship-alerts.yml");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: walship\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            rules = rules.canonicalize().expect("the rules file").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut cmd = std::process::Command::new(prometheus_bin());
    cmd.arg(format!(
        "--config.file={}",
        dir.path().join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.path().join("data").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
    .stdout(std::process::Stdio::null())
    .stderr(log);
    let mut prometheus = spawn_owned(cmd, libc::SIGKILL).expect("start prometheus");
    let prom_log =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    tokio::task::block_in_place(|| wait_for_port(prom_port, "prometheus", TIMEOUT));
    harness::until("prometheus ready", || ready(prom_port)).await;

    // Scraped twice (at least), and the rules loaded and evaluated without error.
    harness::until("two scrapes of walship", || {
        has_finite_series(&query(
            prom_port,
            "count_over_time(walship_build_info[1m]) >= 2",
        ))
    })
    .await;
    harness::until("every rule evaluated", || {
        let rules = api(prom_port, "/api/v1/rules");
        let all: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        for r in &all {
            assert_ne!(
                r["health"], "err",
                "rule {} failed: {}",
                r["name"], r["lastError"]
            );
        }
        !all.is_empty() && all.iter().all(|r| r["health"] == "ok")
    })
    .await;

    // The names the rules and the dashboard use are walship's.
    let served: BTreeSet<String> = get(port, "/metrics")
        .1
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/walship-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let queries = dashboard_queries(&dashboard);
    let rule_text = std::fs::read_to_string(&rules).unwrap();
    for name in metric_names(&rule_text)
        .into_iter()
        .chain(queries.iter().flat_map(|(_, q)| metric_names(q)))
    {
        assert!(
            served.contains(&name),
            "{name} is named by the rules or the dashboard but walship serves no such metric"
        );
    }

    // Every variable lists this walship, and every panel's query returns a series.
    let pipeline = db.slot().to_owned();
    let instance = format!("127.0.0.1:{port}");
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(definition) = var["definition"].as_str() else {
            continue;
        };
        // label_values(metric, label)
        let (metric, label) = definition
            .trim_start_matches("label_values(")
            .trim_end_matches(')')
            .split_once(", ")
            .unwrap_or_else(|| panic!("{definition}"));
        let values = api(
            prom_port,
            &format!("/api/v1/label/{label}/values?match[]={}", encode(metric)),
        );
        let expected = if label == "pipeline" {
            &pipeline
        } else {
            &instance
        };
        assert!(
            values["data"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x == expected.as_str())),
            "variable {}: {definition} gave {values}",
            var["name"]
        );
    }
    assert!(queries.len() >= 15, "{queries:?}");
    for (title, expr) in &queries {
        let substituted = expr
            .replace("$pipeline", &pipeline)
            .replace("$instance", &instance)
            .replace("$__rate_interval", "10s");
        assert!(!substituted.contains('$'), "{title}: {substituted}");
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let result = query(prom_port, &substituted);
            if has_finite_series(&result) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "panel {title:?}: {substituted} returned no series with a value: {result:?}\n{}",
                prom_log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    writing.store(false, Ordering::Relaxed);
    writer.await.unwrap();
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
}
