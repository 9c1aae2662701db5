use super::*;

#[test]
fn wal_status_reads_as_kept_at_risk_or_lost() {
    assert_eq!(WalRetention::of(Some("reserved")), WalRetention::Kept);
    assert_eq!(WalRetention::of(Some("extended")), WalRetention::Kept);
    assert_eq!(WalRetention::of(None), WalRetention::Kept);
    assert_eq!(WalRetention::of(Some("unreserved")), WalRetention::AtRisk);
    assert_eq!(WalRetention::of(Some("lost")), WalRetention::Lost);
}

#[test]
fn lag_never_underflows() {
    assert_eq!(lag_bytes(Lsn(100), Lsn(40)), 60);
    assert_eq!(lag_bytes(Lsn(40), Lsn(100)), 0);
}

#[test]
fn lost_slot_is_refused_with_fix() {
    let s = SlotState {
        name: "w".into(),
        plugin: Some("pgoutput".into()),
        database: None,
        confirmed_flush_lsn: Some(Lsn(5)),
        restart_lsn: None,
        wal_status: Some("lost".into()),
        invalidation_reason: None,
        active_pid: None,
        safe_wal_size: None,
    };
    let msg = validate_slot(&s).unwrap_err().to_string();
    assert!(
        msg.contains("invalidated")
            && msg.contains("pg_drop_replication_slot('w')")
            && msg.contains("removed WAL")
            && msg.contains("max_slot_wal_keep_size"),
        "{msg}"
    );
    // PostgreSQL 18 invalidates a slot nobody streamed from for idle_replication_slot_timeout:
    // the WAL was not removed for lack of space, and the setting to change is another.
    let idle = SlotState {
        invalidation_reason: Some("idle_timeout".into()),
        ..s
    };
    let msg = validate_slot(&idle).unwrap_err().to_string();
    assert!(
        msg.contains("invalidation_reason = idle_timeout")
            && msg.contains("idle_replication_slot_timeout")
            && !msg.contains("max_slot_wal_keep_size")
            && msg.contains("pg_drop_replication_slot('w')"),
        "{msg}"
    );
}
