//! The binary: configuration errors exit non-zero naming the problem; SIGTERM drains.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{self, Row, TIMEOUT, TestDb, broker, consume, insert_txn, topic};

fn walship() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_walship"));
    for (k, _) in std::env::vars() {
        if k.starts_with("WALSHIP_") {
            c.env_remove(k);
        }
    }
    c
}

fn run_with_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walship.toml");
    std::fs::write(&path, text).unwrap();
    let out = walship()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--version` says what `walship_build_info` says: the version, the commit, the compiler.
#[test]
fn version_names_the_git_commit_and_the_compiler() {
    let out = walship().arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    assert!(
        text.starts_with(&format!("walship {} (git ", env!("CARGO_PKG_VERSION")))
            && text.contains(", rustc 1."),
        "{text}"
    );
    // Built from this checkout (cargo rebuilds the binary when HEAD moves).
    if let Some(commit) = commit {
        assert!(text.contains(&format!("(git {commit},")), "{text}");
    }
}

#[test]
fn missing_required_key_exits_2_naming_it() {
    let (code, err) = run_with_config("[postgres]\nurl = \"postgres://a@127.0.0.1/x\"\n[kafka]\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing field `brokers`"), "{err}");
}

#[test]
fn unknown_key_exits_2_naming_it() {
    let (code, err) = run_with_config(
        "[postgres]\nurl = \"postgres://a@127.0.0.1/x\"\nslott = \"x\"\n[kafka]\nbrokers = \"127.0.0.1:1\"\n",
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown field `slott`"), "{err}");
}

#[test]
fn missing_config_file_exits_2_naming_it() {
    let out = walship()
        .args(["run", "--config", "/nonexistent/walship.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/walship.toml"), "{err}");
}

/// A database that cannot be reached at start is a transient problem: walship retries with
/// backoff, saying why and naming the server, until it answers or walship is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_retried_naming_it_until_stopped() {
    let port = harness::process::free_port();
    let walship = harness::Binary::start(&format!(
        "[postgres]\nurl = \"postgres://walship@127.0.0.1:{port}/app?connect_timeout=5\"\n[kafka]\nbrokers = \"127.0.0.1:1\"\n"
    ));
    let server = format!("127.0.0.1:{port}");
    harness::until("two attempts, each naming the server", || {
        let log = walship.log_text();
        log.matches("cannot start yet; retrying").count() >= 2 && log.contains(&server)
    })
    .await;
    let (code, log) = walship.stop().await;
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("password"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_confirms_and_exits_0() {
    let mut db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("walship.toml");
    std::fs::write(&path, harness::config_toml(&db, &broker().bootstrap, "")).unwrap();
    let mut cmd = walship();
    cmd.args(["run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped());
    // Killed with the test process if the test fails before it stops walship itself.
    let child = harness::process::spawn_owned(cmd, libc::SIGKILL).expect("start walship");
    db.await_streaming().await;

    for i in 0..50 {
        insert_txn(&mut db.client, &[Row::new("order", "sig", i)]).await;
    }
    let end = db.await_caught_up().await;
    assert_eq!(
        consume(
            &broker().bootstrap,
            &[&topic(&db, "order")],
            50,
            TIMEOUT,
            Duration::ZERO
        )
        .len(),
        50
    );

    let pid = i32::try_from(child.id()).unwrap();
    // run.cpu_scheduling defaults to batch: every thread, librdkafka's included, runs under it.
    let policies = thread_policies(pid);
    assert!(
        policies.len() >= 3,
        "walship and librdkafka threads: {policies:?}"
    );
    assert!(
        policies.iter().all(|(_, p)| *p == libc::SCHED_BATCH),
        "every thread SCHED_BATCH ({}): {policies:?}",
        libc::SCHED_BATCH
    );
    #[allow(unsafe_code)]
    // SAFETY: sending a signal to our own child process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let waited = tokio::time::timeout(
        TIMEOUT,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let Ok(status) = waited else {
        // Kill it, or the runtime would wait for the blocked `wait` forever.
        #[allow(unsafe_code)]
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        panic!("walship did not exit within {TIMEOUT:?} of SIGTERM");
    };
    let status = status.unwrap().unwrap();
    let err = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(0), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    // The walsender is gone and the final position stays confirmed.
    assert!(db.confirmed_lsn().await >= end);
}

/// `(thread name, scheduling policy)` of every thread of `pid`, from `/proc/<pid>/task/*/stat`.
fn thread_policies(pid: i32) -> Vec<(String, i32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("task list");
    tasks
        .map(|task| {
            let stat =
                std::fs::read_to_string(task.expect("task").path().join("stat")).expect("stat");
            // `pid (comm) state ...`: the name may hold spaces and parentheses; the fields
            // after the last ')' start at field 3, and the policy is field 41.
            let (head, rest) = stat.rsplit_once(')').expect("comm");
            let name = head.split_once('(').map_or("", |(_, n)| n).to_owned();
            let policy = rest.split_whitespace().nth(41 - 3).expect("policy field");
            (name, policy.parse().expect("policy number"))
        })
        .collect()
}
