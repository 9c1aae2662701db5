use super::*;

#[test]
fn no_tls_error_names_mode_and_fix() {
    let opts = TlsOptions {
        mode: SslMode::Require,
        ..TlsOptions::default()
    };
    let e = no_tls_error("db:5432", &opts).to_string();
    assert!(
        e.contains("db:5432") && e.contains("does not support TLS but postgres.sslmode = require"),
        "{e}"
    );
    assert!(!no_tls_error("db:5432", &opts).is_transient());
}
