//! The `docker/` files, checked as far as possible without a Docker engine: compose's environment
//! and `walship.toml` as walship reads them, the files' references to each other, and the postgres
//! container's setup with walship's least-privilege role.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use walship::Config;
use walship::init_sql;

use super::SETTLE;
use crate::harness::{self, TIMEOUT, TestDb, broker, consume, seqs, topic};

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
