//! Authentication over TLS: a wrong password (never shown), and client certificates under
//! pg_hba's `cert` method.

use walship_postgres::management;

use super::{
    CERT_ROLE, ROLE, assert_mentions, config, config_with, params, replication, replication_error,
    server, slot_and_publication, walsender_ssl,
};
use crate::harness::Relay;

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
