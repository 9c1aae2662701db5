use super::*;
use std::str::FromStr;

fn config(s: &str) -> tokio_postgres::Config {
    tokio_postgres::Config::from_str(s).unwrap()
}

#[test]
fn hosts_and_ports_pair_up_as_in_libpq() {
    let c = config("postgres://w@pg1:5433,pg2:5434/app");
    assert_eq!(describe(&c), "pg1:5433,pg2:5434");
    let c = config("host=pg1,pg2 port=6000 user=w");
    assert_eq!(
        describe(&c),
        "pg1:6000,pg2:6000",
        "one port serves every host"
    );
    let c = config("host=pg1,pg2 hostaddr=10.0.0.1,10.0.0.2 user=w");
    let e = endpoints(&c);
    assert_eq!(e.len(), 2);
    assert_eq!(e[1].hostaddr, Some("10.0.0.2".parse().unwrap()));
    assert_eq!(
        e[1].tls_name(),
        "pg2",
        "the certificate names the host, not the address"
    );
    assert_eq!(describe(&config("user=w")), "localhost:5432");
    let c = config("hostaddr=10.0.0.9 user=w");
    assert_eq!(
        (describe(&c), endpoints(&c)[0].tls_name()),
        ("10.0.0.9:5432".into(), "10.0.0.9".into())
    );
}

#[test]
fn one_host_of_a_list_keeps_everything_else() {
    let c = config(
        "postgres://w:pw@pg1:5433,pg2:5434/app?connect_timeout=3&application_name=x&target_session_attrs=read-write",
    );
    let e = endpoints(&c);
    let one = only(&c, &e[1]);
    assert_eq!(describe(&one), "pg2:5434");
    assert_eq!(one.get_user(), Some("w"));
    assert_eq!(one.get_password(), Some(&b"pw"[..]));
    assert_eq!(one.get_dbname(), Some("app"));
    assert_eq!(one.get_application_name(), Some("x"));
    assert_eq!(
        one.get_connect_timeout(),
        Some(&std::time::Duration::from_secs(3))
    );
    assert_eq!(one.get_target_session_attrs(), TargetSessionAttrs::Any);
}

#[test]
fn session_targets() {
    assert_eq!(
        SessionTarget::parse("read-write"),
        Ok(SessionTarget::ReadWrite)
    );
    assert_eq!(SessionTarget::parse("primary"), Ok(SessionTarget::Primary));
    let e = SessionTarget::parse("standby").unwrap_err();
    assert!(e.contains("read-write"), "{e}");
    assert!(SessionTarget::parse("bogus").is_err());
    assert!(SessionTarget::ReadWrite.accepts(false, false));
    assert!(
        !SessionTarget::ReadWrite.accepts(false, true),
        "read-only primary"
    );
    assert!(SessionTarget::Primary.accepts(false, true));
    assert!(!SessionTarget::Primary.accepts(true, true), "a standby");
    assert!(SessionTarget::Any.accepts(true, true));
}
