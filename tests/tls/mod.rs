//! TLS and SCRAM against a real server: a private PostgreSQL cluster with `ssl = on`, SCRAM
//! passwords, and a pg_hba.conf that lets walship's roles in over TLS only.
//!
//! ```text
//!  pg_hba.conf: local/host … postgres trust            (test setup only)
//!               hostssl … walship_cert   cert          (client certificate)
//!               hostssl … all            scram-sha-256
//!               host    … all            reject        (no plaintext for walship's roles)
//! ```
//!
//! Both connections walship opens are checked: the replication stream (its own client) and the
//! management connections (tokio-postgres), each with `pg_stat_ssl`.

mod authentication;
mod encryption;
mod refusals;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgoutput::Lsn;
use tokio::sync::OnceCell;
use walship::Config;
use walship_postgres::replication::ConnectParams;
use walship_postgres::{PgError, ReplicationStream};

use crate::harness::postgres::Cluster;
use crate::harness::process::at_exit;
use crate::harness::{self, TIMEOUT, TestDb, broker};

/// The password role (SCRAM over TLS only).
const ROLE: &str = "walship_tls";
/// The client-certificate role (`cert` authentication).
const CERT_ROLE: &str = "walship_cert";
/// Where walship reads `ROLE`'s password from in the `password_env` tests. Not `WALSHIP_…`:
/// `harness::Binary` clears those.
const PASSWORD_ENV: &str = "TLS_TEST_PG_PASSWORD";

/// The TLS cluster shared by this module's tests, and the files clients need.
struct TlsServer {
    cluster: Cluster,
    /// The CA that signed the server's certificate (for `sslrootcert`).
    ca: PathBuf,
    /// A CA that signed nothing the server uses.
    other_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    password: String,
}

async fn server() -> &'static TlsServer {
    static SERVER: OnceCell<TlsServer> = OnceCell::const_new();
    SERVER
        .get_or_init(|| {
            // A static is never dropped: tear the cluster down when the process exits.
            at_exit(Box::new(|| {
                if let Some(server) = SERVER.get() {
                    server.cluster.tear_down();
                }
            }));
            start_server()
        })
        .await
}

async fn start_server() -> TlsServer {
    let cluster = Cluster::private_with(
        &[
            "ssl=on",
            "ssl_cert_file=server.crt",
            "ssl_key_file=server.key",
            "ssl_ca_file=ca.crt",
            "password_encryption=scram-sha-256",
        ],
        |data| {
            make_certificates(data);
            std::fs::write(data.join("pg_hba.conf"), PG_HBA).expect("write pg_hba.conf");
            give_to_server(data, &["pg_hba.conf"]);
        },
    );
    let data = cluster.data_dir.clone().expect("private cluster");
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let admin = harness::postgres::connect(&format!("{}/postgres", cluster.base_url)).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {ROLE} WITH LOGIN REPLICATION PASSWORD '{password}';
             CREATE ROLE {CERT_ROLE} WITH LOGIN REPLICATION;"
        ))
        .await
        .expect("create roles");
    #[allow(unsafe_code)]
    // SAFETY: a new variable set once, before any walship of this module reads it; nothing else
    // in the test process reads or writes it. It is the process's only setenv: glibc's first
    // setenv copies the environment into a new array and leaves the initial one in place, so a
    // getenv running meanwhile in C code (OpenSSL, librdkafka) still reads a valid array.
    unsafe {
        std::env::set_var(PASSWORD_ENV, &password);
    }
    TlsServer {
        ca: data.join("ca.crt"),
        other_ca: data.join("other-ca.crt"),
        client_cert: data.join("client.crt"),
        client_key: data.join("client.key"),
        cluster,
        password,
    }
}

const PG_HBA: &str = "\
local   all          postgres                     trust
host    all          postgres      127.0.0.1/32   trust
hostssl all          walship_cert  127.0.0.1/32   cert
hostssl replication  walship_cert  127.0.0.1/32   cert
hostssl all          all           127.0.0.1/32   scram-sha-256
hostssl replication  all           127.0.0.1/32   scram-sha-256
host    all          all           127.0.0.1/32   reject
host    replication  all           127.0.0.1/32   reject
";

/// A CA, a server certificate for `localhost` and 127.0.0.1, a client certificate for
/// `CERT_ROLE`, and an unrelated CA; keys readable by the server's OS user only.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (install the openssl package)");
        assert!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, cn) in [("ca", "walship test CA"), ("other-ca", "unrelated CA")] {
        let (key, crt, subj) = (
            format!("{name}.key"),
            format!("{name}.crt"),
            format!("/CN={cn}"),
        );
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "3",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&args);
    }
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .expect("write client.ext");
    for (name, cn) in [("server", "localhost"), ("client", CERT_ROLE)] {
        let (key, csr, crt, ext, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
            format!("/CN={cn}"),
        );
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(&args);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "3",
            "-extfile",
            &ext,
        ]);
    }
    for key in ["ca.key", "other-ca.key", "server.key", "client.key"] {
        std::fs::set_permissions(dir.join(key), std::fs::Permissions::from_mode(0o600))
            .expect("chmod key");
    }
    give_to_server(
        dir,
        &[
            "ca.crt",
            "ca.key",
            "ca.srl",
            "other-ca.crt",
            "other-ca.key",
            "server.crt",
            "server.key",
            "server.csr",
            "server.ext",
            "client.crt",
            "client.key",
            "client.csr",
            "client.ext",
        ],
    );
}

/// Hands files to the data directory's owner (the server's OS user when tests run as root).
fn give_to_server(dir: &Path, files: &[&str]) {
    let meta = std::fs::metadata(dir).expect("stat data dir");
    for f in files {
        std::os::unix::fs::chown(dir.join(f), Some(meta.uid()), Some(meta.gid()))
            .expect("chown to the server's user");
    }
}

impl TlsServer {
    fn port(&self) -> u16 {
        self.cluster.port
    }

    /// A test database in the TLS cluster, usable by walship's roles.
    async fn db(&self) -> TestDb {
        let db = TestDb::new_in(&self.cluster).await;
        db.client
            .batch_execute(&format!(
                "GRANT CREATE ON DATABASE {name} TO {ROLE}, {CERT_ROLE};
                 GRANT USAGE, CREATE ON SCHEMA public TO {ROLE}, {CERT_ROLE};
                 ALTER TABLE outbox OWNER TO {ROLE};",
                name = db.name
            ))
            .await
            .expect("grant");
        db
    }

    /// `postgres://ROLE@host:port/db` plus `query`.
    fn url(&self, role: &str, host: &str, db: &TestDb, query: &str) -> String {
        format!(
            "postgres://{role}@{host}:{port}/{name}{query}",
            port = self.port(),
            name = db.name
        )
    }
}

/// A walship configuration for `db` with `url` and extra `[postgres]` lines.
fn config_toml(db: &TestDb, url: &str, postgres_extra: &str) -> String {
    format!(
        r#"
[postgres]
url = "{url}"
slot = "{slot}"
publication = "{slot}_pub"
status_interval_ms = 200
{postgres_extra}

[outbox]
topic = "{slot}.{{aggregatetype}}"

[kafka]
brokers = "{bootstrap}"
topic_partitions = 2
"#,
        slot = db.slot(),
        bootstrap = broker().bootstrap,
    )
}

fn config(db: &TestDb, url: &str, postgres_extra: &str) -> Config {
    Config::from_toml(
        &config_toml(db, url, postgres_extra),
        std::iter::empty(),
        "tls test",
    )
    .expect("valid config")
}

fn params(config: &Config) -> ConnectParams {
    walship::config::SourceSettings::resolve(config)
        .expect("connect params")
        .params
}

/// Opens a replication connection on `slot`; the error when it fails.
async fn replication(
    params: &ConnectParams,
    password: Option<&str>,
    app: &str,
    slot: &str,
    publication: &str,
) -> Result<ReplicationStream, PgError> {
    let publication = format!("\"{publication}\"");
    ReplicationStream::start(
        params,
        password.map(str::as_bytes),
        app,
        slot,
        Lsn::ZERO,
        &[
            ("proto_version", "1"),
            ("publication_names", publication.as_str()),
        ],
    )
    .await
}

fn replication_error(r: Result<ReplicationStream, PgError>) -> PgError {
    match r {
        Ok(_) => panic!("the replication connection was expected to fail"),
        Err(e) => e,
    }
}

/// Creates a slot and a publication as the superuser (for direct replication connections).
async fn slot_and_publication(db: &TestDb, name: &str) {
    db.client
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('{name}', 'pgoutput');
             CREATE PUBLICATION {name} FOR TABLE outbox;"
        ))
        .await
        .expect("create slot and publication");
}

/// `pg_stat_ssl.ssl` of the walsender serving `application_name`.
async fn walsender_ssl(db: &TestDb, app: &str) -> (bool, Option<String>) {
    let row = db
        .client
        .query_one(
            "SELECT s.ssl, s.client_dn FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid) \
             WHERE r.application_name = $1",
            &[&app],
        )
        .await
        .expect("pg_stat_ssl of the walsender");
    (row.get(0), row.get(1))
}

/// `pg_stat_ssl.ssl`, `.version` and the user of the walsender streaming from `db`'s slot.
async fn slot_walsender(db: &TestDb) -> (bool, Option<String>, String) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        // A row unless walship is between two sessions (it reconnects after transient errors).
        if let Some(row) = db
            .client
            .query_opt(
                "SELECT s.ssl, s.version, r.usename::text FROM pg_stat_ssl s \
                 JOIN pg_stat_replication r USING (pid) \
                 JOIN pg_replication_slots sl ON sl.active_pid = r.pid WHERE sl.slot_name = $1",
                &[&db.slot()],
            )
            .await
            .expect("walship's walsender")
        {
            return (row.get(0), row.get(1), row.get(2));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "walship does not stream from its slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `pg_stat_ssl.ssl` of a management connection's own backend.
async fn own_ssl(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

/// Asserts `text` contains every part; prints it (shown with `--nocapture`: what operators see).
fn assert_mentions(text: &str, parts: &[&str]) {
    eprintln!("error text: {text}");
    for p in parts {
        assert!(text.contains(p), "expected {p:?} in: {text}");
    }
}

fn config_with(db: &TestDb, url: &str, mode: &str, ca: Option<&Path>) -> Config {
    let mut extra = format!("sslmode = \"{mode}\"\npassword_env = \"{PASSWORD_ENV}\"");
    if let Some(ca) = ca {
        extra.push_str(&format!("\nsslrootcert = \"{}\"", ca.display()));
    }
    config(db, url, &extra)
}
