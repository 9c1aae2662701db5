use super::*;

fn info(major: u32) -> ServerInfo {
    ServerInfo {
        address: "pg1:5432".into(),
        major,
        version: format!("{major}.1"),
        in_recovery: false,
        timeline: Some(1),
    }
}

#[test]
fn version_requirement_names_the_server_version() {
    assert!(require_support(&info(17), "pg1:5432").is_ok());
    let e = require_support(&info(16), "pg1:5432")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("PostgreSQL 17 or later")
            && e.contains("pg1:5432 runs PostgreSQL 16.1")
            && e.contains("postgres.failover_slot = false"),
        "{e}"
    );
    assert!(create_slot_sql(true).contains("false, false, true"));
    assert!(!create_slot_sql(false).contains("true"));
}
