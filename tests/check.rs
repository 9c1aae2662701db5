//! `walship check` and `walship status` through the binary: a good setup passes, a broken one
//! reports every problem with its fix in one run, and status reports the slot's position and lag.

use std::collections::BTreeSet;
use std::process::Command;

use pgoutput::Lsn;
use serde_json::Value;

use crate::harness::{self, Relay, Row, TestDb, broker, insert_txn};

/// The binary without inherited `WALSHIP_*` variables.
pub(crate) fn walship() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_walship"));
    for (k, _) in std::env::vars() {
        if k.starts_with("WALSHIP_") {
            c.env_remove(k);
        }
    }
    c
}

pub(crate) struct Output {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Output {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }
}

/// Runs `walship <command> --config <file with text> [--json]` off the async workers.
pub(crate) async fn run(command: &str, config_text: &str, json: bool) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walship.toml");
    std::fs::write(&path, config_text).unwrap();
    let command = command.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut cmd = walship();
        cmd.arg(&command).arg("--config").arg(&path);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        drop(dir);
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

/// The checks of a JSON report, by name.
pub(crate) fn checks(report: &Value) -> Vec<(String, String, Option<String>, String)> {
    report["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
                c["fix"].as_str().map(str::to_owned),
                c["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn with_status<'a>(
    all: &'a [(String, String, Option<String>, String)],
    status: &str,
) -> BTreeSet<&'a str> {
    all.iter()
        .filter(|c| c.1 == status)
        .map(|c| c.0.as_str())
        .collect()
}

pub(crate) fn find<'a>(
    all: &'a [(String, String, Option<String>, String)],
    name: &str,
) -> &'a (String, String, Option<String>, String) {
    all.iter()
        .find(|c| c.0 == name)
        .unwrap_or_else(|| panic!("check {name} in {all:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_good_setup() {
    let mut db = TestDb::new().await;
    insert_txn(&mut db.client, &[Row::new("order", "a-1", 0)]).await;
    let config = harness::config_toml(&db, &broker().bootstrap, "");

    let human = run("check", &config, false).await;
    println!("{}", human.stdout);
    assert_eq!(human.code, 0, "{}\n{}", human.stdout, human.stderr);
    for line in [
        "✓ postgres.connect",
        "✓ postgres.wal_level",
        "✓ postgres.role",
        "✓ outbox.table",
        "✓ postgres.publication",
        "✓ postgres.slot",
        "✓ kafka.broker",
        "✓ kafka.topics",
        "walship can start",
    ] {
        assert!(human.stdout.contains(line), "{line:?} in\n{}", human.stdout);
    }

    let out = run("check", &config, true).await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let report = out.json();
    assert_eq!(report["ok"], true);
    let all = checks(&report);
    let not_passed: Vec<_> = all.iter().filter(|c| c.1 != "pass").collect();
    assert!(
        not_passed.is_empty(),
        "a good setup passes every check: {not_passed:#?}"
    );
    let names: BTreeSet<&str> = all.iter().map(|c| c.0.as_str()).collect();
    for name in [
        "postgres.connect",
        "postgres.wal_level",
        "postgres.replication_slots",
        "postgres.wal_senders",
        "postgres.role",
        "outbox.table",
        "outbox.column.id",
        "outbox.column.aggregatetype",
        "outbox.column.aggregateid",
        "outbox.column.type",
        "outbox.column.payload",
        "postgres.publication",
        "postgres.slot",
        "kafka.broker",
        "kafka.topics",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
    // The topic of the aggregate type found in the outbox is named.
    let topics = find(&all, "kafka.topics");
    assert!(
        topics.3.contains(&harness::topic(&db, "order")),
        "{topics:?}"
    );
    // Checking changed nothing: no slot, no publication.
    let slot = db
        .client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .unwrap();
    assert!(slot.is_none(), "check must not create the slot");
    let publication = db
        .client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&format!("{}_pub", db.slot())],
        )
        .await
        .unwrap();
    assert!(
        publication.is_none(),
        "check must not create the publication"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_problem_of_a_misconfigured_setup_in_one_run() {
    let mut db = TestDb::new().await;
    // A login role without REPLICATION (trust auth: no password), allowed to read the outbox so
    // the aggregate types (and so the topics) can be checked.
    let role = format!("nrep_{}", db.name);
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT SELECT ON outbox TO {role};"
        ))
        .await
        .unwrap();
    insert_txn(
        &mut db.client,
        &[Row::new("order", "a-1", 0), Row::new("bad type", "a-2", 0)],
    )
    .await;
    let url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(url, db.url, "the test URL names the postgres user");
    let config = harness::config_toml(&db, &broker().bootstrap, "")
        .replace(&db.url, &url)
        // No publication, and walship may not create it.
        .replace(
            "status_interval_ms = 200",
            "status_interval_ms = 200\ncreate_publication = false",
        )
        // The aggregate type's topic does not exist, and walship may not create it.
        .replace(
            "topic_partitions = 3",
            "topic_partitions = 3\ncreate_topics = false",
        );

    let out = run("check", &config, true).await;
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let report = out.json();
    assert_eq!(report["ok"], false);
    let all = checks(&report);
    let failed = with_status(&all, "fail");
    assert_eq!(
        failed,
        BTreeSet::from([
            "postgres.role",
            "postgres.publication",
            "kafka.topics",
            "kafka.topics.names"
        ]),
        "every problem, and only those: {all:#?}"
    );
    for c in all.iter().filter(|c| c.1 == "fail") {
        assert!(
            c.2.as_deref().is_some_and(|f| !f.is_empty()),
            "{} has a fix: {c:?}",
            c.0
        );
    }
    let role_check = find(&all, "postgres.role");
    assert!(role_check.3.contains(&role), "{role_check:?}");
    assert!(
        role_check
            .2
            .as_deref()
            .unwrap()
            .contains(&format!("ALTER ROLE \"{role}\" WITH REPLICATION")),
        "{role_check:?}"
    );
    let publication = find(&all, "postgres.publication");
    assert!(
        publication.2.as_deref().unwrap().contains(&format!(
            "CREATE PUBLICATION \"{}_pub\" FOR TABLE \"public\".\"outbox\"",
            db.slot()
        )),
        "{publication:?}"
    );
    let topics = find(&all, "kafka.topics");
    assert!(
        topics.3.contains(&harness::topic(&db, "order"))
            && topics.3.contains("kafka.create_topics is false"),
        "{topics:?}"
    );
    assert!(
        topics
            .2
            .as_deref()
            .unwrap()
            .contains("create_topics = true"),
        "{topics:?}"
    );
    assert!(
        find(&all, "kafka.topics.names").3.contains("\"bad type\""),
        "{all:#?}"
    );
    // The server itself is fine.
    assert_eq!(find(&all, "postgres.wal_level").1, "pass");
    assert_eq!(find(&all, "postgres.connect").1, "pass");

    // The human form lists the same problems, each followed by its fix.
    let human = run("check", &config, false).await;
    println!("{}", human.stdout);
    assert_eq!(human.code, 1);
    for name in &failed {
        let line = human
            .stdout
            .lines()
            .position(|l| l.starts_with(&format!("✗ {name} ")))
            .unwrap_or_else(|| panic!("✗ {name} in\n{}", human.stdout));
        let next = human.stdout.lines().nth(line + 1).unwrap_or_default();
        assert!(
            next.trim_start().starts_with("fix: "),
            "fix below {name}:\n{}",
            human.stdout
        );
    }
    assert!(human.stdout.contains("4 failed"), "{}", human.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_unreachable_database_and_broker_together_without_the_password() {
    let pg_port = harness::process::free_port();
    let kafka_port = harness::process::free_port();
    let config = format!(
        "[postgres]\nurl = \"postgres://walship:hunter2@127.0.0.1:{pg_port}/app?connect_timeout=5\"\n\
         [kafka]\nbrokers = \"127.0.0.1:{kafka_port}\"\n"
    );
    let out = run("check", &config, true).await;
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        !out.stdout.contains("hunter2") && !out.stderr.contains("hunter2"),
        "the password is never printed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    let all = checks(&out.json());
    let pg = find(&all, "postgres.connect");
    assert_eq!(pg.1, "fail");
    assert!(pg.3.contains(&format!("127.0.0.1:{pg_port}")), "{pg:?}");
    let kafka = find(&all, "kafka.broker");
    assert_eq!(kafka.1, "fail");
    assert!(
        kafka.3.contains(&format!("127.0.0.1:{kafka_port}")),
        "{kafka:?}"
    );
    assert!(
        kafka.2.as_deref().unwrap().contains("kafka.brokers"),
        "{kafka:?}"
    );
    // What depends on them is skipped, not failed twice.
    for name in ["postgres.wal_level", "postgres.role", "kafka.topics"] {
        assert_eq!(find(&all, name).1, "skip", "{name}");
    }
}

#[test]
fn check_never_prints_a_kafka_secret_from_a_misspelled_property() {
    let pg_port = harness::process::free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walship.toml");
    std::fs::write(
        &path,
        format!(
            "[postgres]\nurl = \"postgres://walship@127.0.0.1:{pg_port}/app?connect_timeout=5\"\n\
             [kafka]\nbrokers = \"127.0.0.1:1\"\n\
             [kafka.secret_env]\n\"sasl.pasword\" = \"CHECK_TEST_KAFKA_SECRET\"\n"
        ),
    )
    .unwrap();
    let out = walship()
        .env("CHECK_TEST_KAFKA_SECRET", "hunter3-secret")
        .args(["check", "--json", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("hunter3") && !stderr.contains("hunter3"),
        "{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let all = checks(&report);
    let kafka = find(&all, "kafka.broker");
    assert_eq!(kafka.1, "fail");
    assert!(
        kafka.3.contains("sasl.pasword"),
        "names the property: {kafka:?}"
    );
}

#[test]
fn check_and_status_exit_2_for_an_invalid_config() {
    for command in ["check", "status"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walship.toml");
        std::fs::write(
            &path,
            "[postgres]\nurl = \"postgres://a@127.0.0.1/x\"\n[kafka]\n",
        )
        .unwrap();
        let out = walship()
            .arg(command)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert!(err.contains("missing field `brokers`"), "{command}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_wal_level_replica_and_no_free_slots_or_senders_together() {
    // A private cluster: the shared one must keep wal_level = logical and is never restarted.
    let cluster = harness::postgres::Cluster::private(&[
        "wal_level=replica",
        "max_replication_slots=0",
        "max_wal_senders=0",
    ]);
    let url = format!("{}/postgres", cluster.base_url);
    let client = harness::postgres::connect(&url).await;
    client
        .batch_execute(harness::postgres::OUTBOX_DDL)
        .await
        .unwrap();
    let config = format!(
        "[postgres]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\n",
        url,
        broker().bootstrap
    );
    let out = run("check", &config, true).await;
    println!("{}", out.stdout);
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let all = checks(&out.json());
    let failed = with_status(&all, "fail");
    assert_eq!(
        failed,
        BTreeSet::from([
            "postgres.wal_level",
            "postgres.replication_slots",
            "postgres.wal_senders"
        ]),
        "{all:#?}"
    );
    let wal = find(&all, "postgres.wal_level");
    assert!(wal.3.contains("\"replica\""), "{wal:?}");
    let fix = wal.2.as_deref().unwrap();
    assert!(
        fix.contains("ALTER SYSTEM SET wal_level = logical") && fix.contains("restart"),
        "{wal:?}"
    );
    let slots = find(&all, "postgres.replication_slots");
    assert!(
        slots.3.contains("max_replication_slots = 0")
            && slots
                .2
                .as_deref()
                .unwrap()
                .contains("max_replication_slots"),
        "{slots:?}"
    );
    let senders = find(&all, "postgres.wal_senders");
    assert!(senders.3.contains("max_wal_senders = 0"), "{senders:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_slot_position_and_its_lag_after_catching_up() {
    let mut db = TestDb::new().await;
    let text = harness::config_toml(&db, &broker().bootstrap, "");

    // Before walship ever ran: no slot, exit 1, still a parseable status.
    let before = run("status", &text, true).await;
    assert_eq!(before.code, 1, "{}\n{}", before.stdout, before.stderr);
    let v = before.json();
    assert_eq!(v["slot"], db.slot());
    assert_eq!(v["exists"], false);
    assert!(v["confirmed_flush_lsn"].is_null() && v["lag_bytes"].is_null());

    let relay = Relay::start_streaming(harness::config(&db, &broker().bootstrap, ""), &db).await;
    for i in 0..20 {
        insert_txn(&mut db.client, &[Row::new("order", "st", i)]).await;
    }
    let end = db.await_caught_up().await;

    // Lag is measured against the whole cluster's WAL, which other tests also write, so it need
    // not be 0 even now: check it is the distance between the two positions reported.
    let out = run("status", &text, true).await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let v = out.json();
    assert_eq!(v["exists"], true);
    assert_eq!(v["plugin"], "pgoutput");
    assert_eq!(v["database"], db.name.as_str());
    assert_eq!(v["active"], true);
    assert!(v["active_pid"].as_i64().is_some_and(|p| p > 0), "{v:#}");
    let confirmed: Lsn = v["confirmed_flush_lsn"].as_str().unwrap().parse().unwrap();
    assert!(confirmed >= end, "{confirmed} >= {end}");
    let current: Lsn = v["current_wal_lsn"].as_str().unwrap().parse().unwrap();
    assert!(current >= confirmed, "{v:#}");
    assert_eq!(v["lag_bytes"], current.0 - confirmed.0, "{v:#}");
    let restart: Lsn = v["restart_lsn"].as_str().unwrap().parse().unwrap();
    assert!(restart <= confirmed);
    assert!(v["retained_wal_bytes"].as_u64().is_some(), "{v:#}");
    assert!(
        matches!(v["wal_status"].as_str(), Some("reserved" | "extended")),
        "{v:#}"
    );
    // The test cluster keeps WAL without limit.
    assert!(v["safe_wal_size"].is_null(), "{v:#}");
    assert_eq!(v["publication"], format!("{}_pub", db.slot()));
    assert_eq!(v["publication_exists"], true);
    assert_eq!(
        v["publication_tables"],
        serde_json::json!(["public.outbox"])
    );

    println!("{v:#}");
    // The human form shows the same.
    let human = run("status", &text, false).await;
    println!("{}", human.stdout);
    assert_eq!(human.code, 0, "{}", human.stderr);
    for needle in [
        "confirmed_flush_lsn",
        "restart_lsn",
        "wal_status",
        "safe_wal_size",
        "public.outbox",
        &format!("owner                walsender PID {}", v["active_pid"]),
    ] {
        assert!(
            human.stdout.contains(needle),
            "{needle:?} in\n{}",
            human.stdout
        );
    }

    // While walship streams, check still passes and names the active consumer.
    let out = run("check", &text, true).await;
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let all = checks(&out.json());
    assert_eq!(find(&all, "postgres.slot").1, "pass");
    assert_eq!(find(&all, "postgres.slot.wal_status").1, "pass");
    let consumer = find(&all, "postgres.slot.consumer");
    assert_eq!(consumer.1, "warn", "{consumer:?}");
    assert!(
        consumer.3.contains(&v["active_pid"].to_string()),
        "{consumer:?}"
    );
    assert_eq!(find(&all, "postgres.slot.lag").1, "pass");
    assert_eq!(find(&all, "postgres.publication").1, "pass");

    relay.stop().await.unwrap();
}
