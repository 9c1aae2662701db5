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

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgoutput::Lsn;
use tokio::sync::OnceCell;
use walship::Config;
use walship_postgres::replication::ConnectParams;
use walship_postgres::{PgError, ReplicationStream, management};

use crate::harness::postgres::Cluster;
use crate::harness::process::at_exit;
use crate::harness::{self, Binary, Relay, Row, TIMEOUT, TestDb, broker, consume, insert_txn};

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

/// The acceptance path: walship streams over TLS with `verify-full`, the test CA and SCRAM, the
/// password from `password_env`; the walsender's session is TLS; events reach the broker in
/// order; `walship check` and `walship status` connect the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_tls_with_verify_full_and_scram() {
    let server = server().await;
    let db = server.db().await;
    let url = server.url(ROLE, "localhost", &db, "");
    let extra = format!(
        "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\npassword_env = \"{PASSWORD_ENV}\"",
        server.ca.display()
    );
    let config = config(&db, &url, &extra);
    let relay = Relay::start_streaming(config.clone(), &db).await;

    let (ssl, version, user) = slot_walsender(&db).await;
    assert!(ssl, "walship's walsender runs over TLS");
    assert_eq!(user, ROLE);
    assert!(
        version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")),
        "{version:?}"
    );
    let stored: String = db
        .client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&ROLE],
        )
        .await
        .expect("pg_authid")
        .get(0);
    assert!(
        stored.starts_with("SCRAM-SHA-256$"),
        "the role authenticates with SCRAM"
    );

    let mut writer = harness::postgres::connect(&db.url).await;
    for seq in 0..5 {
        insert_txn(
            &mut writer,
            &[Row::new("order", "o-1", seq), Row::new("order", "o-2", seq)],
        )
        .await;
    }
    db.await_caught_up().await;
    let topic = harness::topic(&db, "order");
    let records = consume(
        &broker().bootstrap,
        &[&topic],
        10,
        TIMEOUT,
        Duration::from_millis(500),
    );
    assert_eq!(records.len(), 10);
    for (key, recs) in harness::by_key(&records) {
        assert_eq!(
            harness::seqs(&recs),
            vec![0, 1, 2, 3, 4],
            "order of {key:?}"
        );
    }

    // The management connection (tokio-postgres) with the same settings is TLS too.
    let client = management::connect(&params(&config), Some(server.password.as_bytes()))
        .await
        .expect("management connection");
    assert!(own_ssl(&client).await);
    let report = walship::check::run_checks(&config).await;
    let connect = report
        .checks
        .iter()
        .find(|c| c.name == "postgres.connect")
        .expect("postgres.connect check");
    assert_eq!(
        connect.status,
        walship::check::Status::Pass,
        "{}",
        connect.message
    );
    let status = walship::status::read_status(&config)
        .await
        .expect("walship status over TLS");
    assert!(status.exists);

    relay.stop().await.expect("graceful stop");
}

/// `verify-full` refuses a certificate that does not name the host connected to, and a CA that
/// did not sign the server's certificate fails `verify-ca`: definite errors that name the host,
/// the mode and the fix, on both connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_a_certificate_for_another_host() {
    let server = server().await;
    let db = server.db().await;
    slot_and_publication(&db, &format!("{}_wrong", db.name)).await;
    let pw = Some(server.password.as_str());
    // hostaddr: connect to the server, but expect the certificate to name wrong-host.invalid.
    let url = server.url(ROLE, "wrong-host.invalid", &db, "?hostaddr=127.0.0.1");
    let extra = format!(
        "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\npassword_env = \"{PASSWORD_ENV}\"",
        server.ca.display()
    );
    let config = config(&db, &url, &extra);

    let err = Relay::start(config.clone())
        .exit()
        .await
        .expect_err("walship refuses the server");
    assert!(!err.is_transient(), "a wrong certificate is not retried");
    let text = err.to_string();
    assert_mentions(
        &text,
        &["wrong-host.invalid", "verify-full", "subjectAltName"],
    );

    let p = params(&config);
    let e = replication_error(
        replication(&p, pw, "tls_wrong_host", &format!("{}_wrong", db.name), "x").await,
    );
    assert!(!e.is_transient(), "{e}");
    assert_mentions(
        &e.to_string(),
        &["wrong-host.invalid", "verify-full", "subjectAltName"],
    );

    // verify-ca checks the chain only: the same host name is fine there.
    let ca_only = config_with(&db, &url, "verify-ca", Some(&server.ca));
    let client = management::connect(&params(&ca_only), pw.map(str::as_bytes))
        .await
        .expect("verify-ca ignores the host name");
    assert!(own_ssl(&client).await);

    // A CA that did not sign the server's certificate.
    let url = server.url(ROLE, "localhost", &db, "");
    let wrong_ca = config_with(&db, &url, "verify-ca", Some(&server.other_ca));
    let e = management::connect(&params(&wrong_ca), pw.map(str::as_bytes))
        .await
        .expect_err("untrusted CA refused");
    assert!(!e.is_transient(), "{e}");
    let ca_path = server.other_ca.display().to_string();
    assert_mentions(
        &e.to_string(),
        &[
            "localhost",
            "verify-ca",
            "certificate verify failed",
            &ca_path,
        ],
    );
    let e = replication_error(
        replication(
            &params(&wrong_ca),
            pw,
            "tls_wrong_ca",
            &format!("{}_wrong", db.name),
            "x",
        )
        .await,
    );
    assert!(!e.is_transient(), "{e}");
    assert_mentions(
        &e.to_string(),
        &[
            "localhost",
            "verify-ca",
            "certificate verify failed",
            &ca_path,
        ],
    );
}

fn config_with(db: &TestDb, url: &str, mode: &str, ca: Option<&Path>) -> Config {
    let mut extra = format!("sslmode = \"{mode}\"\npassword_env = \"{PASSWORD_ENV}\"");
    if let Some(ca) = ca {
        extra.push_str(&format!("\nsslrootcert = \"{}\"", ca.display()));
    }
    config(db, url, &extra)
}

/// Every mode that allows TLS uses it on both connections when the server offers it; the
/// mode can come from the URL (`?sslmode=…&sslrootcert=…`) as well as from the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tls_mode_encrypts_both_connections() {
    let server = server().await;
    let db = server.db().await;
    let slot_name = format!("{}_modes", db.name);
    slot_and_publication(&db, &slot_name).await;
    let pw = Some(server.password.as_str());
    let ca = server.ca.display().to_string();
    let cases = [
        ("prefer", "localhost", String::new()),
        ("require", "127.0.0.1", "?sslmode=require".to_owned()),
        (
            "verify-ca",
            "localhost",
            format!("?sslmode=verify-ca&sslrootcert={ca}"),
        ),
        (
            "verify-full",
            "127.0.0.1",
            format!("?sslmode=verify-full&sslrootcert={ca}"),
        ),
    ];
    for (mode, host, query) in cases {
        let url = server.url(ROLE, host, &db, &query);
        let config = config(&db, &url, &format!("password_env = \"{PASSWORD_ENV}\""));
        let p = params(&config);
        assert_eq!(p.config.tls.mode.as_str(), mode, "{url}");

        let client = management::connect(&p, pw.map(str::as_bytes))
            .await
            .unwrap_or_else(|e| panic!("management connection with sslmode={mode}: {e}"));
        assert!(own_ssl(&client).await, "management connection, {mode}");

        let app = format!("tls_mode_{}", mode.replace('-', "_"));
        let stream = replication(&p, pw, &app, &slot_name, &slot_name)
            .await
            .unwrap_or_else(|e| panic!("replication connection with sslmode={mode}: {e}"));
        assert!(walsender_ssl(&db, &app).await.0, "walsender, {mode}");
        stream.finish().await.expect("finish");
    }
}

/// `require` without a CA encrypts without verifying; here with the walship binary, the mode in
/// the URL and the password from `password_file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_without_ca_streams_with_the_binary() {
    let server = server().await;
    let db = server.db().await;
    let secrets = tempfile::tempdir().expect("tempdir");
    let pw_file = secrets.path().join("pg_password");
    std::fs::write(&pw_file, format!("{}\n", server.password)).expect("write password file");
    let url = server.url(ROLE, "127.0.0.1", &db, "?sslmode=require");
    let toml = config_toml(
        &db,
        &url,
        &format!("password_file = \"{}\"", pw_file.display()),
    );
    let bin = Binary::start(&toml);
    db.await_streaming().await;
    assert!(slot_walsender(&db).await.0, "sslmode=require encrypts");

    let mut writer = harness::postgres::connect(&db.url).await;
    insert_txn(
        &mut writer,
        &[Row::new("invoice", "i-1", 0), Row::new("invoice", "i-1", 1)],
    )
    .await;
    let end = db.current_lsn().await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while db.confirmed_lsn().await < end {
        assert!(
            tokio::time::Instant::now() < deadline,
            "walship did not confirm {end}; its log:\n{}",
            bin.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let topic = harness::topic(&db, "invoice");
    let records = consume(
        &broker().bootstrap,
        &[&topic],
        2,
        TIMEOUT,
        Duration::from_millis(300),
    );
    assert_eq!(harness::seqs(&records), vec![0, 1]);
    let (code, log) = bin.stop().await;
    assert_eq!(code, 0, "{log}");
    assert!(
        !log.contains(&server.password),
        "the password is never logged"
    );
}

/// `sslmode = disable` (a key, overriding the URL's `verify-full`) against a server whose
/// pg_hba.conf rejects plaintext: a definite error with the fix, on both connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_disable_is_refused_with_the_fix() {
    let server = server().await;
    let db = server.db().await;
    slot_and_publication(&db, &format!("{}_plain", db.name)).await;
    let url = server.url(
        ROLE,
        "localhost",
        &db,
        &format!("?sslmode=verify-full&sslrootcert={}", server.ca.display()),
    );
    let config = config_with(&db, &url, "disable", None);
    assert_eq!(
        params(&config).config.tls.mode,
        walship_postgres::SslMode::Disable
    );
    let err = Relay::start(config.clone())
        .exit()
        .await
        .expect_err("plaintext refused");
    assert!(!err.is_transient());
    let text = err.to_string();
    assert_mentions(
        &text,
        &[
            "without TLS",
            "sslmode = disable",
            "postgres.sslmode = verify-full",
        ],
    );

    let e = replication_error(
        replication(
            &params(&config),
            Some(&server.password),
            "tls_plain",
            &format!("{}_plain", db.name),
            "x",
        )
        .await,
    );
    assert!(!e.is_transient());
    assert_mentions(&e.to_string(), &["without TLS", "sslmode = disable"]);
}

/// A wrong password fails with the server's message, never the password itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_fails_without_showing_it() {
    let server = server().await;
    let db = server.db().await;
    slot_and_publication(&db, &format!("{}_pw", db.name)).await;
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    let secrets = tempfile::tempdir().expect("tempdir");
    let pw_file = secrets.path().join("pg_password");
    std::fs::write(&pw_file, &wrong).expect("write password file");
    let url = server.url(ROLE, "localhost", &db, "");
    let extra = format!(
        "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\npassword_file = \"{}\"",
        server.ca.display(),
        pw_file.display()
    );
    let config = config(&db, &url, &extra);
    let err = Relay::start(config.clone())
        .exit()
        .await
        .expect_err("wrong password refused");
    assert!(!err.is_transient());
    let text = err.to_string();
    assert_mentions(&text, &["password authentication failed", ROLE]);
    assert!(!text.contains(&wrong), "{text}");
    assert!(!format!("{err:?}").contains(&wrong));

    let e = replication_error(
        replication(
            &params(&config),
            Some(&wrong),
            "tls_pw",
            &format!("{}_pw", db.name),
            "x",
        )
        .await,
    );
    assert!(!e.is_transient());
    let text = e.to_string();
    assert_mentions(&text, &["password authentication failed", ROLE]);
    assert!(!text.contains(&wrong), "{text}");
}

/// Client certificates (`sslcert`/`sslkey`) authenticate both connections under pg_hba's `cert`
/// method; without one the server refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_authenticates_both_connections() {
    let server = server().await;
    let db = server.db().await;
    let slot_name = format!("{}_cert", db.name);
    slot_and_publication(&db, &slot_name).await;
    let url = server.url(CERT_ROLE, "localhost", &db, "");
    let extra = format!(
        "sslmode = \"verify-full\"\nsslrootcert = \"{}\"\nsslcert = \"{}\"\nsslkey = \"{}\"",
        server.ca.display(),
        server.client_cert.display(),
        server.client_key.display()
    );
    let config = config(&db, &url, &extra);
    let p = params(&config);
    let client = management::connect(&p, None)
        .await
        .expect("certificate authentication");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("current_user")
        .get(0);
    assert_eq!(user, CERT_ROLE);
    let stream = replication(&p, None, "tls_client_cert", &slot_name, &slot_name)
        .await
        .expect("replication with a client certificate");
    let (ssl, dn) = walsender_ssl(&db, "tls_client_cert").await;
    assert!(ssl);
    assert_eq!(dn.as_deref(), Some(format!("/CN={CERT_ROLE}").as_str()));
    stream.finish().await.expect("finish");

    let without = config_with(&db, &url, "verify-full", Some(&server.ca));
    let e = management::connect(&params(&without), None)
        .await
        .expect_err("no certificate, no entry");
    assert!(!e.is_transient(), "{e}");
}

/// `require` against a server without TLS fails on both connections, naming host and mode;
/// `prefer` (the default, used by every other test module) falls back to plaintext there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_names_host_and_mode() {
    if std::env::var("WALSHIP_TEST_PG_URL").is_ok() {
        return; // an external server may well offer TLS
    }
    let db = TestDb::new().await;
    let slot_name = format!("{}_notls", db.name);
    slot_and_publication(&db, &slot_name).await;
    let url = format!("{}?sslmode=require", db.url);
    let config = Config::from_toml(
        &harness::config_toml(&db, &broker().bootstrap, "").replace(&db.url, &url),
        std::iter::empty(),
        "test",
    )
    .expect("config");
    let p = params(&config);
    let target = p.describe();
    let e = management::connect(&p, None)
        .await
        .expect_err("no TLS, no connection");
    assert!(!e.is_transient());
    assert_mentions(
        &e.to_string(),
        &[
            &target,
            "does not support TLS but postgres.sslmode = require",
        ],
    );
    let e = replication_error(replication(&p, None, "notls", &slot_name, &slot_name).await);
    assert!(!e.is_transient());
    assert_mentions(
        &e.to_string(),
        &[
            &target,
            "does not support TLS but postgres.sslmode = require",
        ],
    );

    let prefer = Config::from_toml(
        &harness::config_toml(&db, &broker().bootstrap, ""),
        std::iter::empty(),
        "test",
    )
    .expect("config");
    let p = params(&prefer);
    assert_eq!(p.config.tls.mode, walship_postgres::SslMode::Prefer);
    let client = management::connect(&p, None)
        .await
        .expect("prefer falls back");
    assert!(!own_ssl(&client).await);
    let stream = replication(&p, None, "notls_prefer", &slot_name, &slot_name)
        .await
        .expect("prefer falls back");
    assert!(!walsender_ssl(&db, "notls_prefer").await.0);
    stream.finish().await.expect("finish");
}
