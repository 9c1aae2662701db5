use super::*;

#[test]
fn parses_error_fields() {
    let body = b"SERROR\0VERROR\0C42704\0Mreplication slot \"x\" does not exist\0Hcreate it\0\0";
    let e = ServerError::parse(body);
    assert_eq!(e.code, "42704");
    assert_eq!(e.severity, "ERROR");
    assert_eq!(e.hint.as_deref(), Some("create it"));
    assert_eq!(
        e.to_string(),
        "ERROR 42704: replication slot \"x\" does not exist (hint: create it)"
    );
}

#[test]
fn error_chain_keeps_the_cause_once() {
    #[derive(Debug, thiserror::Error)]
    #[error("error connecting to server")]
    struct Outer(#[source] std::io::Error);
    let e = Outer(std::io::Error::new(
        std::io::ErrorKind::ConnectionRefused,
        "Connection refused",
    ));
    assert_eq!(
        error_chain(&e),
        "error connecting to server: Connection refused"
    );
}

#[test]
fn classifies_sqlstates() {
    let server = |code: &str| PgError::Server {
        context: "test".into(),
        error: ServerError {
            code: code.into(),
            ..Default::default()
        },
    };
    assert!(server("57P01").is_transient());
    assert!(server("08006").is_transient());
    assert!(server("55006").is_transient());
    assert!(!server("42704").is_transient(), "missing slot is definite");
    assert!(!server("28P01").is_transient(), "bad password is definite");
    assert!(
        !server("55000").is_transient(),
        "invalidated slot is definite"
    );
}
