//! Definite errors when TLS cannot be had as configured: a certificate for another host or from
//! another CA, `sslmode = disable` against a pg_hba.conf that rejects plaintext, and `require`
//! against a server without TLS.

use walship::Config;
use walship_postgres::management;

use super::{
    PASSWORD_ENV, ROLE, assert_mentions, config, config_with, own_ssl, params, replication,
    replication_error, server, slot_and_publication, walsender_ssl,
};
use crate::harness::{self, Relay, TestDb, broker};

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
