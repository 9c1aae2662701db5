//! The SQL kit (`sql/`, `walship init-sql`) end to end with walship, and the `docker/` files
//! checked as far as possible without a Docker engine.
//!
//! The kit goes into schema `kit` of each test database (the harness's own `public.outbox` stays
//! untouched), and walship is pointed at `kit.outbox` and the kit's publication.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tokio_postgres::GenericClient;
use walship::Config;
use walship::init_sql::{self, InitSqlArgs};

use crate::harness::{self, Relay, TIMEOUT, TestDb, broker, consume, seqs, topic};

/// Settle time after the expected count: long enough to see duplicates that are in the broker.
const SETTLE: Duration = Duration::from_secs(1);

/// The kit for schema `kit` with the default publication.
fn kit(partitioned: bool) -> String {
    init_sql::render(&InitSqlArgs {
        schema: "kit".into(),
        partitioned,
        publication: init_sql::DEFAULT_PUBLICATION.into(),
        ..InitSqlArgs::default()
    })
    .expect("the kit renders for schema kit")
}

/// walship on `kit.outbox` through the kit's publication, which it must not create itself.
fn kit_config(db: &TestDb) -> Config {
    let env = [
        ("WALSHIP_OUTBOX__TABLE", "kit.outbox"),
        (
            "WALSHIP_POSTGRES__PUBLICATION",
            init_sql::DEFAULT_PUBLICATION,
        ),
        ("WALSHIP_POSTGRES__CREATE_PUBLICATION", "false"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    Config::from_toml(
        &harness::config_toml(db, &broker().bootstrap, ""),
        env,
        "sql kit test config",
    )
    .expect("valid kit config")
}

/// Calls `kit.outbox_emit` with a `{"seq": seq}` payload; returns the event id.
async fn emit(
    client: &impl GenericClient,
    aggregate_id: &str,
    seq: u64,
    delete_after: bool,
) -> String {
    let payload = serde_json::json!({ "seq": seq }).to_string();
    client
        .query_one(
            "SELECT kit.outbox_emit('order', $1, 'Updated', $2::text::jsonb, delete_after => $3)::text",
            &[&aggregate_id, &payload, &delete_after],
        )
        .await
        .expect("kit.outbox_emit")
        .get(0)
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_emit_events_are_delivered_also_when_deleted_at_once() {
    let mut db = TestDb::new().await;
    db.client
        .batch_execute(&kit(false))
        .await
        .expect("apply kit");
    let relay = Relay::start_streaming(kit_config(&db), &db).await;

    let mut ids = Vec::new();
    {
        // The business change and its event in one transaction.
        let tx = db.client.transaction().await.unwrap();
        tx.batch_execute("INSERT INTO other_table (note) VALUES ('order A paid')")
            .await
            .unwrap();
        ids.push(emit(&tx, "A", 0, false).await);
        tx.commit().await.unwrap();
    }
    {
        let tx = db.client.transaction().await.unwrap();
        emit(&tx, "A", 99, false).await;
        tx.rollback().await.unwrap();
    }
    ids.push(emit(&db.client, "A", 1, true).await);
    {
        let tx = db.client.transaction().await.unwrap();
        ids.push(emit(&tx, "A", 2, true).await);
        tx.commit().await.unwrap();
    }
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        3,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(
        seqs(&records),
        vec![0, 1, 2],
        "rolled-back 99 absent; 1 and 2 delivered although deleted at once"
    );
    let headers: Vec<(String, String)> = records
        .iter()
        .map(|r| (r.header("id").expect("id"), r.header("type").expect("type")))
        .collect();
    let expected: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.clone(), "Updated".into()))
        .collect();
    assert_eq!(headers, expected, "id header = outbox_emit's return value");
    assert!(records.iter().all(|r| r.key_str() == "A"));
    assert_eq!(
        count(&db, "SELECT count(*) FROM kit.outbox").await,
        1,
        "only the event written without delete_after stays in the table"
    );
    relay.stop().await.expect("graceful stop");
}

/// Calls `kit.outbox_emit_message` with a `{"seq": seq}` payload and `prefix`; returns the id.
async fn emit_message(
    client: &impl GenericClient,
    aggregate_id: &str,
    seq: u64,
    prefix: &str,
) -> String {
    let payload = serde_json::json!({ "seq": seq }).to_string();
    client
        .query_one(
            "SELECT kit.outbox_emit_message('order', $1, 'Updated', $2::text::jsonb, prefix => $3)::text",
            &[&aggregate_id, &payload, &prefix],
        )
        .await
        .expect("kit.outbox_emit_message")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_emit_message_events_are_delivered_in_order_with_rows() {
    let mut db = TestDb::new().await;
    db.client
        .batch_execute(&kit(false))
        .await
        .expect("apply kit");
    // Message mode from the environment, as a TOML array.
    let config = Config::from_toml(
        &harness::config_toml(&db, &broker().bootstrap, ""),
        [
            ("WALSHIP_OUTBOX__TABLE", "kit.outbox"),
            (
                "WALSHIP_POSTGRES__PUBLICATION",
                init_sql::DEFAULT_PUBLICATION,
            ),
            ("WALSHIP_POSTGRES__CREATE_PUBLICATION", "false"),
            ("WALSHIP_OUTBOX__MESSAGE_PREFIXES", "[\"outbox\"]"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
        "sql kit message test config",
    )
    .expect("valid kit config");
    let relay = Relay::start_streaming(config, &db).await;

    let mut ids = Vec::new();
    {
        // A row, then a message, then another prefix (not an event), in one transaction.
        let tx = db.client.transaction().await.unwrap();
        ids.push(emit(&tx, "A", 0, false).await);
        ids.push(emit_message(&tx, "A", 1, "outbox").await);
        emit_message(&tx, "A", 50, "elsewhere").await;
        tx.commit().await.unwrap();
    }
    {
        let tx = db.client.transaction().await.unwrap();
        emit_message(&tx, "A", 99, "outbox").await;
        tx.rollback().await.unwrap();
    }
    ids.push(emit_message(&db.client, "A", 2, "outbox").await);
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        3,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(
        seqs(&records),
        vec![0, 1, 2],
        "row and message in WAL order; rolled back and other prefix absent"
    );
    let got: Vec<String> = records
        .iter()
        .map(|r| r.header("id").expect("id"))
        .collect();
    assert_eq!(got, ids, "id header = the functions' return values");
    assert!(
        records
            .iter()
            .all(|r| r.key_str() == "A" && r.header("type").as_deref() == Some("Updated"))
    );
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_outbox_is_published_as_its_parent_table() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(&kit(true))
        .await
        .expect("apply kit");
    let via_root: bool = db
        .client
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&init_sql::DEFAULT_PUBLICATION],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        via_root,
        "publish_via_partition_root is what makes this work"
    );
    let relay = Relay::start_streaming(kit_config(&db), &db).await;

    let kept = emit(&db.client, "P", 0, false).await;
    emit(&db.client, "P", 1, true).await;
    // No daily partition a year ahead: the row lands in the default partition.
    db.client
        .batch_execute(
            "INSERT INTO kit.outbox (aggregatetype, aggregateid, type, payload, created_at) \
             VALUES ('order', 'P', 'Updated', '{\"seq\": 2}', now() + interval '1 year')",
        )
        .await
        .unwrap();
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        3,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(seqs(&records), vec![0, 1, 2]);

    // The rows really are in partitions, not in a plain table that happens to be called outbox.
    let row = db
        .client
        .query_one(
            "SELECT tableoid::regclass::text, \
                    'kit.outbox_p' || to_char(created_at AT TIME ZONE 'UTC', 'YYYYMMDD') \
             FROM kit.outbox WHERE id = $1::text::uuid",
            &[&kept],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        row.get::<_, String>(1),
        "daily partition"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM kit.outbox_default").await,
        1
    );
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_only_partitions_entirely_older_than_the_cutoff() {
    let mut db = TestDb::new().await;
    db.client
        .batch_execute(&kit(true))
        .await
        .expect("apply kit");

    // One transaction, so now() and the UTC date are the same for every statement.
    let tx = db.client.transaction().await.unwrap();
    let names = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter().map(|r| r.get::<_, String>(0)).collect()
    };
    let day_names = "SELECT format('kit.outbox_p%s', to_char((now() AT TIME ZONE 'UTC')::date + d, 'YYYYMMDD')) \
                     FROM unnest($1::int[]) d";
    let children = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_inherits i \
                    JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
                    WHERE i.inhparent = 'kit.outbox'::regclass";
    let past: Vec<i32> = (-10..=-4).collect();

    let created = names(
        tx.query(
            "SELECT kit.outbox_create_partitions((now() AT TIME ZONE 'UTC')::date - 10, 7)",
            &[],
        )
        .await
        .unwrap(),
    );
    assert_eq!(created, names(tx.query(day_names, &[&past]).await.unwrap()));
    let again = tx
        .query(
            "SELECT kit.outbox_create_partitions((now() AT TIME ZONE 'UTC')::date - 10, 7)",
            &[],
        )
        .await
        .unwrap();
    assert!(again.is_empty(), "existing partitions are left alone");
    tx.batch_execute(
        "INSERT INTO kit.outbox (aggregatetype, aggregateid, type, payload, created_at) VALUES \
         ('order', 'old', 'Updated', NULL, now() - interval '8 days'), \
         ('order', 'new', 'Updated', NULL, now())",
    )
    .await
    .unwrap();
    let before: BTreeSet<String> = names(tx.query(children, &[]).await.unwrap())
        .into_iter()
        .collect();

    let dropped = names(
        tx.query(
            "SELECT kit.outbox_drop_partitions_older_than(interval '5 days')",
            &[],
        )
        .await
        .unwrap(),
    );
    // Day -6 ends at the start of day -5, at or before now() - 5 days: dropped. Day -5 ends at
    // the start of day -4, after the cutoff: kept whole, although it began before it.
    let expected_dropped = names(
        tx.query(day_names, &[&(-10..=-6).collect::<Vec<i32>>()])
            .await
            .unwrap(),
    );
    assert_eq!(dropped, expected_dropped, "oldest first");
    let after: BTreeSet<String> = names(tx.query(children, &[]).await.unwrap())
        .into_iter()
        .collect();
    let dropped_set: BTreeSet<String> = dropped.iter().cloned().collect();
    assert_eq!(
        after,
        before.difference(&dropped_set).cloned().collect(),
        "nothing else dropped"
    );
    let must_remain: Vec<String> =
        names(tx.query(day_names, &[&vec![-5, -4, 0, 1]]).await.unwrap())
            .into_iter()
            .chain(["kit.outbox_default".to_owned()])
            .collect();
    for name in must_remain {
        assert!(after.contains(&name), "{name} must remain: {after:?}");
    }
    let rows: Vec<String> = names(
        tx.query("SELECT aggregateid FROM kit.outbox ORDER BY 1", &[])
            .await
            .unwrap(),
    );
    assert_eq!(rows, vec!["new"], "the old row went with its partition");
    assert!(
        tx.query(
            "SELECT kit.outbox_drop_partitions_older_than(interval '5 days')",
            &[]
        )
        .await
        .unwrap()
        .is_empty()
    );
    tx.commit().await.unwrap();

    let err = db
        .client
        .query(
            "SELECT kit.outbox_drop_partitions_older_than(interval '-1 day')",
            &[],
        )
        .await
        .expect_err("a negative age would drop current partitions");
    let msg = err.as_db_error().expect("database error").message();
    assert!(msg.contains("max_age must be zero or more"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_over_rows_in_the_default_partition_fails_with_a_working_fix() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(&kit(true))
        .await
        .expect("apply kit");
    db.client
        .batch_execute(
            "INSERT INTO kit.outbox (aggregatetype, aggregateid, type, payload, created_at) \
             VALUES ('order', 'late', 'Updated', NULL, now() - interval '40 days')",
        )
        .await
        .unwrap();
    let day = "((now() - interval '40 days') AT TIME ZONE 'UTC')::date";
    let err = db
        .client
        .query(
            &format!("SELECT kit.outbox_create_partitions({day}, 1)"),
            &[],
        )
        .await
        .expect_err("the default partition holds a row of that day");
    let db_err = err.as_db_error().expect("database error");
    assert!(
        db_err
            .message()
            .contains("outbox_default holds rows of that day"),
        "{}",
        db_err.message()
    );
    let hint = db_err.hint().expect("a hint with the fix");
    let fix = &hint[hint.find("BEGIN;").expect("the fix is SQL")..];
    db.client
        .batch_execute(fix)
        .await
        .unwrap_or_else(|e| panic!("the hint's SQL works: {e}\n{fix}"));

    let row = db
        .client
        .query_one(
            &format!(
                "SELECT tableoid::regclass::text, 'kit.outbox_p' || to_char({day}, 'YYYYMMDD') \
                 FROM kit.outbox WHERE aggregateid = 'late'"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), row.get::<_, String>(1));
    assert_eq!(
        count(&db, "SELECT count(*) FROM kit.outbox_default").await,
        0
    );
}

/// psql from PATH, else next to the test server's binaries.
fn psql_bin() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("psql"))
        .find(|p| p.exists())
        .unwrap_or_else(|| harness::postgres::pg_bin_dir().join("psql"))
}

/// Runs `sql` with psql as a user would (`-v ON_ERROR_STOP=1 -f -`).
fn psql(url: &str, sql: &[u8]) -> Output {
    let mut child = Command::new(psql_bin())
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql (install postgresql-client; scripts/setup.sh does)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(sql)
        .expect("write SQL to psql");
    child.wait_with_output().expect("psql output")
}

fn init_sql_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walship"))
        .arg("init-sql")
        .args(args)
        .env_remove("WALSHIP_LOG_FORMAT")
        .output()
        .expect("run walship init-sql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_sql_output_applies_cleanly_with_psql_twice() {
    let db = TestDb::new().await;
    for args in [
        &["--schema", "kit"][..],
        &[
            "--schema",
            "kit_part",
            "--partitioned",
            "--publication",
            "kit_part_pub",
        ][..],
        // Quoting: case, spaces, both quote characters, a dollar sign.
        &["--schema", "Odd \"Kit\" o'$", "--publication", "Odd 'pub'"][..],
    ] {
        let out = init_sql_cli(args);
        assert!(
            out.status.success(),
            "walship init-sql {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for run in 1..=2 {
            let applied = psql(&db.url, &out.stdout);
            assert!(
                applied.status.success(),
                "run {run} of init-sql {args:?} output with psql failed: {}",
                String::from_utf8_lossy(&applied.stderr)
            );
        }
    }
    let published: Vec<(String, String)> = db
        .client
        .query(
            "SELECT pubname::text, schemaname::text FROM pg_publication_tables \
             WHERE tablename = 'outbox' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        published,
        vec![
            ("Odd 'pub'".to_owned(), "Odd \"Kit\" o'$".to_owned()),
            ("kit_part_pub".to_owned(), "kit_part".to_owned()),
            ("walship_outbox".to_owned(), "kit".to_owned()),
        ]
    );
    let emitted = db
        .client
        .query_one(
            "SELECT \"Odd \"\"Kit\"\" o'$\".outbox_emit('a', 'b', 'c', NULL) IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(emitted.get::<_, bool>(0));

    let out = init_sql_cli(&["--schema", "a.b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--schema \"a.b\" contains '.'"), "{err}");
}

// ---- docker/ ----

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docker")
}

fn docker_file(name: &str) -> String {
    let path = docker_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// One service's section of docker/compose.yaml: its lines, indentation kept. The file is
/// written in block style, so indentation is its structure; there is no YAML parser here.
fn compose_service(compose: &str, service: &str) -> Vec<String> {
    let header = format!("  {service}:");
    let mut lines = compose.lines().skip_while(|l| *l != header);
    assert!(
        lines.next().is_some(),
        "service {service} in docker/compose.yaml"
    );
    lines
        .take_while(|l| l.is_empty() || l.starts_with("    ") || l.trim_start().starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The `environment:` map of a service, values as compose resolves them with nothing set in
/// the environment (`${VAR:-default}` → default).
fn compose_env(compose: &str, service: &str) -> BTreeMap<String, String> {
    let lines = compose_service(compose, service);
    let mut env = BTreeMap::new();
    let mut inside = false;
    for line in lines {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line == "    environment:" {
            inside = true;
            continue;
        }
        if inside && line.starts_with("      ") {
            let (key, value) = line
                .trim()
                .split_once(": ")
                .unwrap_or_else(|| panic!("KEY: value in {service}'s environment: {line:?}"));
            let value = value.trim_matches('"');
            let value = match value.strip_prefix("${").and_then(|v| v.strip_suffix('}')) {
                Some(var) => {
                    var.split_once(":-")
                        .unwrap_or_else(|| panic!("{key}: ${{{var}}} needs a :-default"))
                        .1
                }
                None => value,
            };
            env.insert(key.to_owned(), value.to_owned());
        } else {
            inside = false;
        }
    }
    assert!(!env.is_empty(), "{service} has an environment in compose");
    env
}

/// Variables walship reads besides `WALSHIP_<SECTION>__<KEY>` overrides (cli.rs).
const WALSHIP_PROCESS_ENV: &[&str] = &["WALSHIP_CONFIG", "WALSHIP_LOG", "WALSHIP_LOG_FORMAT"];

#[test]
fn docker_walship_toml_parses_with_the_compose_environment() {
    let compose = docker_file("compose.yaml");
    let env = compose_env(&compose, "walship");
    let config = Config::from_toml(
        &docker_file("walship.toml"),
        env.clone(),
        "docker/walship.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.kafka.brokers, "kafka:9092");
    let password_env = config
        .postgres
        .password_env
        .as_deref()
        .expect("the password comes from the environment");
    assert!(
        env.contains_key(password_env),
        "compose sets {password_env} for walship"
    );
    assert_eq!(
        compose_env(&compose, "postgres").get(password_env),
        env.get(password_env),
        "the role script and walship use the same password"
    );
    // What sql/outbox.sql (mounted into the postgres container) creates.
    assert_eq!(config.outbox.table, "public.outbox");
    assert_eq!(config.postgres.publication, init_sql::DEFAULT_PUBLICATION);
    assert!(
        !config.postgres.create_publication,
        "the walship role cannot create it"
    );
}

#[test]
fn docker_compose_walship_environment_is_understood_by_walship() {
    let compose = docker_file("compose.yaml");
    let toml = docker_file("walship.toml");
    let config = Config::from_toml(&toml, std::iter::empty(), "docker/walship.toml").unwrap();
    for (key, value) in compose_env(&compose, "walship") {
        if WALSHIP_PROCESS_ENV.contains(&key.as_str())
            || config.postgres.password_env.as_deref() == Some(key.as_str())
        {
            continue;
        }
        assert!(
            key.starts_with("WALSHIP_") && key.contains("__"),
            "{key} in compose's walship environment is not read by walship"
        );
        // Unknown sections and keys are configuration errors (deny_unknown_fields).
        Config::from_toml(&toml, [(key.clone(), value)], "docker/walship.toml")
            .unwrap_or_else(|e| panic!("{key}: {e}"));
    }
}

#[test]
fn docker_files_reference_each_other_consistently() {
    let compose = docker_file("compose.yaml");
    let dockerfile = docker_file("Dockerfile");
    // The image's default command reads the config where compose mounts walship.toml.
    let cmd = dockerfile
        .lines()
        .find(|l| l.starts_with("CMD "))
        .expect("CMD in docker/Dockerfile");
    let config_path = cmd
        .split('"')
        .find(|s| s.ends_with(".toml"))
        .expect("--config path in CMD");
    let walship = compose_service(&compose, "walship").join("\n");
    assert!(
        walship.contains(&format!("./walship.toml:{config_path}:ro")),
        "compose mounts walship.toml at {config_path}"
    );
    assert!(walship.contains("dockerfile: docker/Dockerfile"));
    assert!(
        dockerfile.contains("\nUSER ") && !dockerfile.contains("\nUSER root"),
        "the runtime image runs as a non-root user"
    );
    let postgres = compose_service(&compose, "postgres").join("\n");
    assert!(postgres.contains("command: postgres -c wal_level=logical"));
    // Every host path compose mounts exists.
    for line in compose.lines() {
        let item = line.trim_start().trim_start_matches("- ");
        if let Some((host, _)) = item.split_once(':')
            && (host.starts_with("./") || host.starts_with("../"))
        {
            assert!(
                docker_dir().join(host).exists(),
                "compose mounts {host}, which does not exist"
            );
        }
    }
    assert!(postgres.contains("../sql/outbox.sql:/docker-entrypoint-initdb.d/10-outbox.sql"));
    // A stop may take the shutdown timeout twice (finishing the transaction, then the acks):
    // compose's grace period is longer, with a margin, or SIGKILL cuts the drain short.
    let grace: u64 = walship
        .lines()
        .find_map(|l| l.trim().strip_prefix("stop_grace_period: "))
        .and_then(|v| v.strip_suffix('s'))
        .and_then(|v| v.parse().ok())
        .expect("stop_grace_period in seconds");
    let config = Config::from_toml(&docker_file("walship.toml"), std::iter::empty(), "docker")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        grace * 1000 > 2 * config.run.shutdown_timeout_ms + 10_000,
        "stop_grace_period {grace}s against run.shutdown_timeout_ms {}",
        config.run.shutdown_timeout_ms
    );
}

/// The postgres container's setup (sql/outbox.sql, then docker/initdb/20-walship-role.sh) gives
/// walship's least-privilege role all it needs, the slot history included, with
/// docker/walship.toml and compose's environment (only the addresses, slot and topic changed to
/// this test's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_setup_streams_with_the_least_privilege_role() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(init_sql::OUTBOX_SQL)
        .await
        .expect("sql/outbox.sql as the postgres container runs it");

    let pg: tokio_postgres::Config = db.url.parse().expect("test database URL");
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        other => panic!("TCP host expected in {}: {other:?}", db.url),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let compose = docker_file("compose.yaml");
    let postgres_env = compose_env(&compose, "postgres");
    // Roles are cluster-wide and the cluster is shared by all tests.
    let role = format!("walship_{}", db.name);
    let mut script = Command::new("bash");
    script
        .arg(docker_dir().join("initdb/20-walship-role.sh"))
        .envs(&postgres_env)
        .env("POSTGRES_USER", pg.get_user().unwrap_or("postgres"))
        .env("POSTGRES_DB", &db.name)
        .env("WALSHIP_PG_USER", &role)
        .env("PGHOST", &host)
        .env("PGPORT", port.to_string());
    if let Some(pw) = pg.get_password() {
        script.env("PGPASSWORD", String::from_utf8_lossy(pw).into_owned());
    }
    let out = script.output().expect("run the role script");
    assert!(
        out.status.success(),
        "docker/initdb/20-walship-role.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let attrs = db
        .client
        .query_one(
            "SELECT rolreplication, rolsuper FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .unwrap();
    assert_eq!(
        (attrs.get::<_, bool>(0), attrs.get::<_, bool>(1)),
        (true, false)
    );

    let mut walship = Command::new(env!("CARGO_BIN_EXE_walship"));
    for (k, _) in std::env::vars() {
        if k.starts_with("WALSHIP_") {
            walship.env_remove(k);
        }
    }
    walship
        .args(["run", "--config"])
        .arg(docker_dir().join("walship.toml"))
        .envs(compose_env(&compose, "walship"))
        .env(
            "WALSHIP_POSTGRES__URL",
            format!("postgres://{role}@{host}:{port}/{}", db.name),
        )
        .env("WALSHIP_KAFKA__BROKERS", &broker().bootstrap)
        .env("WALSHIP_POSTGRES__SLOT", db.slot())
        .env(
            "WALSHIP_OUTBOX__TOPIC",
            format!("{}.{{aggregatetype}}", db.slot()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Dies with the test process if an assertion below fails first.
    let child = harness::process::spawn_owned(walship, libc::SIGTERM).expect("start walship");
    db.await_streaming().await;

    db.client
        .batch_execute("SELECT outbox_emit('order', 'D', 'Updated', '{\"seq\": 0}', true)")
        .await
        .unwrap();
    db.await_caught_up().await;
    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        1,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(seqs(&records), vec![0]);

    let pid = i32::try_from(child.id()).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: sending a signal to our own child process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{log}");
    // The role keeps the slot history: no protection is off, and the slot is recorded.
    assert!(!log.contains("G6"), "{log}");
    let recorded: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM public.walship_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1, "{log}");
    // Roles outlive the test database (matters with WALSHIP_TEST_PG_URL's external server).
    db.client
        .batch_execute(&format!("DROP OWNED BY \"{role}\"; DROP ROLE \"{role}\""))
        .await
        .expect("drop the test role");
}
