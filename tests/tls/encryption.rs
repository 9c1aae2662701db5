//! TLS on both connections: `verify-full` with SCRAM end to end, every mode that allows TLS, and
//! `require` without a CA with the binary.

use std::time::Duration;

use walship_postgres::management;

use super::{
    PASSWORD_ENV, ROLE, config, config_toml, own_ssl, params, replication, server,
    slot_and_publication, slot_walsender, walsender_ssl,
};
use crate::harness::{self, Binary, Relay, Row, TIMEOUT, broker, consume, insert_txn};

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
