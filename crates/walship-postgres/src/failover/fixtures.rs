//! What the failover rules' unit tests share: positions from text and a synced failover slot.

use pgoutput::Lsn;

use crate::catalog::failover::SlotSync;

pub(super) fn lsn(s: &str) -> Lsn {
    s.parse().unwrap()
}

pub(super) fn synced(confirmed: &str) -> SlotSync {
    SlotSync {
        name: "w".into(),
        slot_type: "logical".into(),
        failover: Some(true),
        synced: Some(true),
        confirmed_flush_lsn: Some(lsn(confirmed)),
        wal_status: Some("reserved".into()),
        ..SlotSync::default()
    }
}
