//! A PostgreSQL cluster for the test run, and a fresh database + slot + publication per test.
//!
//! The cluster is started once per test process from the installed server binaries (`initdb`
//! into a temporary directory, `wal_level=logical`, a free port). `WALSHIP_TEST_PG_URL` points the
//! tests at an external server instead (a superuser URL without database name is expected).
//! When the tests run as root, the server runs as the `postgres` system user: `initdb` refuses
//! to run as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use pgoutput::Lsn;
use tokio_postgres::{Client, NoTls};

use super::process::{
    a_test_failed, at_exit, free_port, note_failures, spawn_owned, wait_for_port,
};

/// Where the test server listens.
pub struct Cluster {
    /// URL prefix without database: `postgres://postgres@127.0.0.1:PORT`.
    pub base_url: String,
    /// Port (for restarts).
    pub port: u16,
    pub data_dir: Option<PathBuf>,
    bin_dir: Option<PathBuf>,
    run_as: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
    extra: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.tear_down();
    }
}

impl Cluster {
    /// Stops the server at once and removes its directory, unless a test of this process
    /// failed: then the data directory and `postgres.log` stay for inspection. Dropping does
    /// this; a cluster held in a static registers it with [`at_exit`].
    pub fn tear_down(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // SIGQUIT: immediate shutdown; the data directory is thrown away anyway.
            #[allow(unsafe_code)]
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGQUIT);
            }
            let _ = child.wait();
        }
        let Some(root) = self.data_dir.as_ref().and_then(|d| d.parent()) else {
            return;
        };
        if a_test_failed() {
            eprintln!(
                "a test failed: kept the PostgreSQL data directory and log in {}",
                root.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

/// The server binaries: `WALSHIP_TEST_PG_BIN` (a PostgreSQL `bin` directory, e.g. one that
/// `scripts/postgres.sh 18` prints), else the newest `/usr/lib/postgresql/*/bin` (Debian's 15).
/// The client tools the tests run (`psql`) come from `PATH` and may be another version.
pub fn pg_bin_dir() -> PathBuf {
    server_binaries().0.clone()
}

/// The major version of the server binaries [`pg_bin_dir`] picks (from `postgres --version`),
/// for tests of settings that older servers refuse.
pub fn pg_bin_major() -> u32 {
    server_binaries().1
}

fn server_binaries() -> &'static (PathBuf, u32) {
    static DIR: OnceLock<(PathBuf, u32)> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = find_pg_bin_dir();
        let version = Command::new(dir.join("postgres"))
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| panic!("{} --version failed", dir.join("postgres").display()));
        eprintln!("test server: {version} from {}", dir.display());
        // "postgres (PostgreSQL) 18.6" or "… 15.18 (Debian 15.18-0+deb12u1)"
        let major = version
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no major version in {version:?}"));
        (dir, major)
    })
}

fn find_pg_bin_dir() -> PathBuf {
    // WALSHIP_PG_BIN: the variable's earlier name.
    if let Some(dir) = ["WALSHIP_TEST_PG_BIN", "WALSHIP_PG_BIN"]
        .iter()
        .find_map(|v| std::env::var_os(v).filter(|d| !d.is_empty()))
    {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").exists() && dir.join("postgres").exists(),
            "WALSHIP_TEST_PG_BIN={} has no initdb and postgres (scripts/postgres.sh VERSION prints \
             a bin directory that has)",
            dir.display()
        );
        return dir;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).expect(
        "no PostgreSQL server binaries found under /usr/lib/postgresql/*/bin: run scripts/setup.sh \
         (installs postgresql) or set WALSHIP_TEST_PG_BIN",
    )
}

fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY-free check of the effective uid: /proc/self/status "Uid:" line.
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let euid: u32 = status
        .lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()?;
    if euid != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:")).expect(
        "running as root needs the 'postgres' system user to run the test server (initdb refuses root): run scripts/setup.sh",
    );
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().ok()?, f[3].parse().ok()?))
}

fn as_user(cmd: &mut Command, run_as: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
}

impl Cluster {
    fn start() -> Cluster {
        if let Ok(url) = std::env::var("WALSHIP_TEST_PG_URL") {
            let base_url = url.trim_end_matches('/').to_owned();
            return Cluster {
                base_url,
                port: 0,
                data_dir: None,
                bin_dir: None,
                run_as: None,
                child: Mutex::new(None),
                extra: Vec::new(),
            };
        }
        Self::private(&[])
    }

    /// A cluster of the caller's own (for tests that restart it or change server settings),
    /// with extra `name=value` settings. Stopped when dropped.
    pub fn private(extra: &[&str]) -> Cluster {
        Self::private_with(extra, |_| {})
    }

    /// Like [`Cluster::private`], with `setup` run on the data directory after `initdb` and
    /// before the server starts (to write `pg_hba.conf`, certificates, …). Files `setup`
    /// creates belong to whoever runs the tests: hand them to the data directory's owner (the
    /// server's OS user) when the server must read them.
    pub fn private_with(extra: &[&str], setup: impl FnOnce(&Path)) -> Cluster {
        static N: AtomicU32 = AtomicU32::new(0);
        note_failures();
        let bin = pg_bin_dir();
        let run_as = postgres_user();
        let root = std::env::temp_dir().join(format!(
            "walship-test-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create test dir");
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .expect("chown test dir to postgres");
        }
        let data = root.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdout(Stdio::null());
        as_user(&mut initdb, run_as);
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let cluster = Cluster {
            base_url: format!("postgres://postgres@127.0.0.1:{port}"),
            port,
            data_dir: Some(data),
            bin_dir: Some(bin),
            run_as,
            child: Mutex::new(None),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        if let Some(data) = &cluster.data_dir {
            setup(data);
        }
        cluster.start_server();
        cluster
    }

    /// A cluster on a data directory made elsewhere (a copy of another cluster's, for a
    /// standby: see `harness::standby`), under `root`, with extra `name=value` settings, on a
    /// free port; started at once. Stopped when dropped, like [`Cluster::private`].
    pub fn from_data_dir(root: &Path, extra: &[&str]) -> Cluster {
        note_failures();
        let port = free_port();
        let cluster = Cluster {
            base_url: format!("postgres://postgres@127.0.0.1:{port}"),
            port,
            data_dir: Some(root.join("data")),
            bin_dir: Some(pg_bin_dir()),
            run_as: postgres_user(),
            child: Mutex::new(None),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        cluster.start_server();
        cluster
    }

    /// Runs `pg_ctl <args> -D <data dir>` as the server's user (`promote -w`, …); panics unless
    /// it succeeds.
    pub fn pg_ctl(&self, args: &[&str]) {
        let (Some(bin), Some(data)) = (&self.bin_dir, &self.data_dir) else {
            panic!("external server has no pg_ctl")
        };
        let mut cmd = Command::new(bin.join("pg_ctl"));
        cmd.args(args).arg("-D").arg(data).stdout(Stdio::null());
        as_user(&mut cmd, self.run_as);
        let out = cmd.output().expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server process (again, after [`Cluster::stop_server`]).
    pub fn start_server(&self) {
        let (Some(bin), Some(data)) = (&self.bin_dir, &self.data_dir) else {
            panic!("external server cannot be started")
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                data.parent()
                    .unwrap_or(Path::new("/tmp"))
                    .join("postgres.log"),
            )
            .expect("open postgres log");
        if let Some((uid, gid)) = self.run_as {
            let _ = std::os::unix::fs::chown(
                data.parent()
                    .unwrap_or(Path::new("/tmp"))
                    .join("postgres.log"),
                Some(uid),
                Some(gid),
            );
        }
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(data)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(data.parent().unwrap_or(data));
        for setting in [
            "listen_addresses=127.0.0.1",
            "wal_level=logical",
            "max_replication_slots=100",
            "max_wal_senders=100",
            "max_connections=300",
            "fsync=off",
            "full_page_writes=off",
            "shared_buffers=128MB",
            "max_prepared_transactions=10",
            "wal_sender_timeout=60s",
        ]
        .iter()
        .copied()
        .chain(self.extra.iter().map(String::as_str))
        {
            cmd.arg("-c").arg(setting);
        }
        cmd.stdout(Stdio::null()).stderr(log);
        as_user(&mut cmd, self.run_as);
        // SIGQUIT: immediate shutdown of the whole server when the tests exit.
        let child = spawn_owned(cmd, libc::SIGQUIT).expect("start postgres");
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        wait_for_port(self.port, "PostgreSQL", Duration::from_secs(60));
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let Some(bin) = &self.bin_dir else { return };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ok = Command::new(bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-q",
                ])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL not ready within 60s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fast shutdown (`pg_ctl stop -m fast`) and wait for the process to exit.
    pub fn stop_server(&self) {
        self.stop_server_mode("fast");
    }

    /// `pg_ctl stop -m <mode>` (`smart`, `fast` or `immediate`: a crash) and wait for the
    /// process to exit.
    pub fn stop_server_mode(&self, mode: &str) {
        let (Some(bin), Some(data)) = (&self.bin_dir, &self.data_dir) else {
            panic!("external server cannot be stopped")
        };
        let mut cmd = Command::new(bin.join("pg_ctl"));
        cmd.arg("stop")
            .arg("-D")
            .arg(data)
            .args(["-m", mode, "-w"])
            .stdout(Stdio::null());
        as_user(&mut cmd, self.run_as);
        let status = cmd.status().expect("pg_ctl stop");
        assert!(status.success(), "pg_ctl stop failed");
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.wait();
        }
    }
}

/// The cluster shared by every test in this process.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        // A static is never dropped: tear the cluster down when the process exits.
        at_exit(Box::new(|| {
            if let Some(cluster) = CLUSTER.get() {
                cluster.tear_down();
            }
        }));
        Cluster::start()
    })
}

/// A database of its own for one test, with the outbox table, a publication and a slot name.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

/// The outbox table the tests (and the demo) use: Debezium's column names.
pub const OUTBOX_DDL: &str = "
CREATE TABLE outbox (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype text        NOT NULL,
    aggregateid   text        NOT NULL,
    type          text        NOT NULL,
    payload       jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE other_table (id bigserial PRIMARY KEY, note text);
";

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

impl TestDb {
    /// Creates `t_<pid>_<n>` with the outbox table. The slot and publication names are the
    /// database name (slots are cluster-wide, so they must be unique too).
    pub async fn new() -> TestDb {
        Self::new_in(cluster()).await
    }

    /// Like [`TestDb::new`], in a given cluster.
    pub async fn new_in(c: &Cluster) -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&format!("{}/postgres", c.base_url)).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let url = format!("{}/{name}", c.base_url);
        let client = connect(&url).await;
        client
            .batch_execute(OUTBOX_DDL)
            .await
            .expect("create outbox table");
        TestDb { name, url, client }
    }

    /// The server's major version (`server_version_num` / 10000: 15, 16, 17, 18), for the few
    /// checks whose expected server output differs between versions.
    pub async fn server_major(&self) -> u32 {
        let num: String = self
            .client
            .query_one("SHOW server_version_num", &[])
            .await
            .expect("server_version_num")
            .get(0);
        num.parse::<u32>().expect("numeric server_version_num") / 10000
    }

    /// Slot name used for this database.
    pub fn slot(&self) -> &str {
        &self.name
    }

    /// `confirmed_flush_lsn` of this test's slot (0/0 when the slot does not exist yet).
    pub async fn confirmed_lsn(&self) -> Lsn {
        self.slot_confirmed_lsn(&self.name).await
    }

    /// `confirmed_flush_lsn` of any slot (0/0 when it does not exist).
    pub async fn slot_confirmed_lsn(&self, slot: &str) -> Lsn {
        let row = self
            .client
            .query_opt(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("read slot");
        row.and_then(|r| r.get::<_, Option<tokio_postgres::types::PgLsn>>(0))
            .map(|l| Lsn(u64::from(l)))
            .unwrap_or_default()
    }

    /// The server's current WAL insert position.
    pub async fn current_lsn(&self) -> Lsn {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()", &[])
            .await
            .expect("current lsn");
        Lsn(u64::from(row.get::<_, tokio_postgres::types::PgLsn>(0)))
    }

    /// The position the walsender has sent to the slot's consumer (0/0 when not streaming).
    pub async fn sent_lsn(&self) -> Lsn {
        let row = self
            .client
            .query_opt(
                "SELECT r.sent_lsn FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
                 WHERE s.slot_name = $1",
                &[&self.name],
            )
            .await
            .expect("read pg_stat_replication");
        row.and_then(|r| r.get::<_, Option<tokio_postgres::types::PgLsn>>(0))
            .map(|l| Lsn(u64::from(l)))
            .unwrap_or_default()
    }

    /// Waits until a walsender streams from this test's slot (so rows written now are captured).
    ///
    /// The slot's `active_pid` alone is not enough: while `pg_create_logical_replication_slot`
    /// waits for a consistent point (for transactions open anywhere in the cluster to end), the
    /// creating backend holds the slot, and rows committed before that point are — correctly —
    /// never decoded. Only a walsender (listed in `pg_stat_replication`) on a slot with a
    /// confirmed position is past creation.
    pub async fn await_streaming(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let row = self
                .client
                .query_opt(
                    "SELECT s.active_pid FROM pg_replication_slots s \
                     JOIN pg_stat_replication r ON r.pid = s.active_pid \
                     WHERE s.slot_name = $1 AND s.confirmed_flush_lsn IS NOT NULL",
                    &[&self.name],
                )
                .await
                .expect("read slot");
            if row.and_then(|r| r.get::<_, Option<i32>>(0)).is_some() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "walship never started streaming from slot {}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the slot confirms everything written so far; returns that WAL position.
    pub async fn await_caught_up(&self) -> Lsn {
        let end = self.current_lsn().await;
        self.await_confirmed(end, super::TIMEOUT).await;
        end
    }

    /// Waits until the slot confirms at least `target`.
    pub async fn await_confirmed(&self, target: Lsn, timeout: Duration) {
        self.await_slot_confirmed(&self.name, target, timeout).await;
    }

    /// Waits until `slot` (any slot of the cluster) confirms at least `target`.
    pub async fn await_slot_confirmed(&self, slot: &str, target: Lsn, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = self.slot_confirmed_lsn(slot).await;
            if now >= target {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "slot {slot} confirmed {now}, expected >= {target} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
