use super::*;
use crate::tls::certs::RootCert;

#[test]
fn url_tls_parameters_are_taken_out() {
    let c = ConnectConfig::parse(
        "postgres://walship@db.example:5433/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem&connect_timeout=3",
    )
    .unwrap();
    assert_eq!(c.tls.mode, SslMode::VerifyFull);
    assert_eq!(
        c.tls.root_cert,
        Some(RootCert::File("/etc/ca dir/ca.pem".into()))
    );
    assert_eq!(c.get_application_name(), Some("x"));
    assert_eq!(
        c.get_connect_timeout(),
        Some(&std::time::Duration::from_secs(3))
    );
    assert_eq!(c.tls_host().as_deref(), Some("db.example"));

    let c = ConnectConfig::parse("postgres://walship@db/app?sslmode=verify-ca").unwrap();
    assert_eq!(c.tls.mode, SslMode::VerifyCa);
    let c = ConnectConfig::parse("postgres://walship@db/app").unwrap();
    assert_eq!(c.tls, TlsOptions::default());
    let c = ConnectConfig::parse("postgresql://w@db/app?sslrootcert=system").unwrap();
    assert_eq!(c.tls.root_cert, Some(RootCert::System));
    let e = ConnectConfig::parse("postgres://w:hunter2@db/app?sslmode=bogus")
        .err()
        .unwrap();
    assert!(e.contains("bogus") && !e.contains("hunter2"), "{e}");
}

#[test]
fn key_value_tls_parameters_are_taken_out() {
    let c = ConnectConfig::parse(
        "host=db.example user=walship sslmode = 'verify-full' sslrootcert='/ca dir/it\\'s.pem' dbname=app sslcert=/c.pem sslkey=/c.key",
    )
    .unwrap();
    assert_eq!(c.tls.mode, SslMode::VerifyFull);
    assert_eq!(
        c.tls.root_cert,
        Some(RootCert::File("/ca dir/it's.pem".into()))
    );
    assert_eq!(c.tls.client_cert, Some(PathBuf::from("/c.pem")));
    assert_eq!(c.tls.client_key, Some(PathBuf::from("/c.key")));
    assert_eq!(c.get_dbname(), Some("app"));
    assert_eq!(c.get_user(), Some("walship"));
}

#[test]
fn tokio_postgres_modes_carry_over() {
    let mut pg = tokio_postgres::Config::new();
    pg.ssl_mode(tokio_postgres::config::SslMode::Require);
    assert_eq!(ConnectConfig::from(pg).tls.mode, SslMode::Require);
}
