use super::*;

#[test]
fn modes_parse_and_print() {
    for m in [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ] {
        assert_eq!(m.as_str().parse::<SslMode>().unwrap(), m);
    }
    let e = "verify_full".parse::<SslMode>().unwrap_err();
    assert!(
        e.contains("verify-full") && e.contains("verify_full"),
        "{e}"
    );
    assert_eq!(SslMode::default(), SslMode::Prefer);
}

#[test]
fn connector_errors_name_the_key_and_file() {
    let opts = TlsOptions {
        mode: SslMode::VerifyFull,
        root_cert: Some(RootCert::File("/nonexistent/ca.pem".into())),
        ..TlsOptions::default()
    };
    let e = opts.connector().unwrap_err().to_string();
    assert!(
        e.contains("postgres.sslrootcert") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    let opts = TlsOptions {
        mode: SslMode::Require,
        client_cert: Some("/c.pem".into()),
        ..TlsOptions::default()
    };
    let e = opts.connector().unwrap_err().to_string();
    assert!(e.contains("sslkey"), "{e}");
    // Without a CA, require only encrypts.
    let opts = TlsOptions {
        mode: SslMode::Require,
        ..TlsOptions::default()
    };
    assert!(opts.connector().is_ok());
}
