use super::*;
use crate::failover::fixtures::{lsn, synced};

fn info(major: u32) -> ServerInfo {
    ServerInfo {
        address: "pg1:5432".into(),
        major,
        version: format!("{major}.1"),
        in_recovery: false,
        timeline: Some(1),
    }
}

fn physical(name: &str, active: bool) -> SlotSync {
    SlotSync {
        name: name.into(),
        slot_type: "physical".into(),
        active,
        ..SlotSync::default()
    }
}

#[test]
fn primary_findings_say_what_to_set() {
    let settings = FailoverSettings::default();
    let info17 = info(17);
    let facts = PrimaryFacts {
        server: "pg1:5432",
        info: &info17,
        settings: &settings,
        physical: &[],
        slot: None,
        slot_name: "w",
        hosts: 2,
    };
    // Off, with two hosts: a warning that the slot will not follow.
    let off = primary_findings(false, &facts);
    assert_eq!(off.len(), 1);
    assert_eq!(off[0].level, Level::Warn);
    assert!(
        off[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("postgres.failover_slot = true")
    );
    assert!(
        primary_findings(
            false,
            &PrimaryFacts {
                hosts: 1,
                ..facts.clone()
            }
        )
        .is_empty()
    );

    // On, PostgreSQL 16: refused.
    let info16 = info(16);
    let old = primary_findings(
        true,
        &PrimaryFacts {
            info: &info16,
            ..facts.clone()
        },
    );
    assert_eq!(old[0].level, Level::Fail);
    assert!(old[0].message.contains("PostgreSQL 16.1"), "{:?}", old[0]);

    // On, empty synchronized_standby_slots: fail with the physical slots to name.
    let phys = [physical("sb1", true)];
    let f = primary_findings(
        true,
        &PrimaryFacts {
            physical: &phys,
            ..facts.clone()
        },
    );
    let sss = f
        .iter()
        .find(|f| f.name.ends_with("synchronized_standby_slots"))
        .unwrap();
    assert_eq!(sss.level, Level::Fail);
    assert!(
        sss.fix
            .as_deref()
            .unwrap()
            .contains("synchronized_standby_slots = 'sb1'")
    );

    // Naming a missing slot stalls walship; naming an inactive one makes it wait.
    let named = FailoverSettings {
        synchronized_standby_slots: Some("sb1, \"sb2\"".into()),
        ..settings.clone()
    };
    let f = primary_findings(
        true,
        &PrimaryFacts {
            settings: &named,
            physical: &phys,
            ..facts.clone()
        },
    );
    let sss = f
        .iter()
        .find(|f| f.name.ends_with("synchronized_standby_slots"))
        .unwrap();
    assert_eq!(sss.level, Level::Fail);
    assert!(
        sss.message.contains("sb2 (no such physical slot)"),
        "{sss:?}"
    );
    let both = [physical("sb1", true), physical("sb2", false)];
    let f = primary_findings(
        true,
        &PrimaryFacts {
            settings: &named,
            physical: &both,
            ..facts.clone()
        },
    );
    let sss = f
        .iter()
        .find(|f| f.name.ends_with("synchronized_standby_slots"))
        .unwrap();
    assert_eq!(
        (sss.level, sss.message.contains("sb2")),
        (Level::Warn, true)
    );

    // A slot without failover: walship fixes it at start.
    let nf = SlotSync {
        failover: Some(false),
        ..synced("0/1")
    };
    let f = primary_findings(
        true,
        &PrimaryFacts {
            slot: Some(&nf),
            ..facts.clone()
        },
    );
    assert_eq!(f[0].level, Level::Warn);
    assert!(
        f[0].fix
            .as_deref()
            .unwrap()
            .contains("ALTER_REPLICATION_SLOT \"w\" (FAILOVER true)")
    );
}

#[test]
fn standby_findings_say_what_to_set() {
    let good = FailoverSettings {
        synchronized_standby_slots: Some(String::new()),
        sync_replication_slots: Some(true),
        hot_standby_feedback: true,
        primary_slot_name: "sb1".into(),
        wal_receiver: Some("streaming".into()),
    };
    let names = ["sb1".to_owned()];
    let slot = synced("0/100");
    let facts = StandbyFacts {
        server: "pg2:5432",
        settings: &good,
        slot: Some(&slot),
        slot_name: "w",
        primary_confirmed: Some(lsn("0/180")),
        primary_standby_slots: &names,
    };
    let f = standby_findings(&facts);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].level, Level::Pass);
    assert!(f[0].message.contains("128 bytes behind"), "{f:?}");

    // A role without pg_read_all_stats sees the receiver's pid but not its state.
    let hidden = FailoverSettings {
        wal_receiver: Some("hidden".into()),
        ..good.clone()
    };
    let f = standby_findings(&StandbyFacts {
        settings: &hidden,
        ..facts.clone()
    });
    assert!(
        f.iter().any(|f| f.level == Level::Warn
            && f.message.contains("may not see whether it streams")
            && f.fix
                .as_deref()
                .is_some_and(|x| x.contains("pg_read_all_stats"))),
        "{f:?}"
    );

    let bad = FailoverSettings {
        synchronized_standby_slots: Some("sb1".into()),
        sync_replication_slots: Some(false),
        hot_standby_feedback: false,
        primary_slot_name: String::new(),
        wal_receiver: None,
    };
    let temporary = SlotSync {
        temporary: true,
        confirmed_flush_lsn: None,
        ..synced("0/1")
    };
    let f = standby_findings(&StandbyFacts {
        settings: &bad,
        slot: Some(&temporary),
        ..facts.clone()
    });
    let names: Vec<&str> = f.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "postgres.standby.sync_replication_slots",
            "postgres.standby.hot_standby_feedback",
            "postgres.standby.primary_slot_name",
            "postgres.standby.synchronized_standby_slots",
            "postgres.standby.streaming",
            "postgres.standby.slot",
        ]
    );
    assert!(
        f[5].message.contains("first sync")
            && f[5]
                .fix
                .as_deref()
                .unwrap()
                .contains("pg_log_standby_snapshot")
    );
    let f = standby_findings(&StandbyFacts {
        slot: None,
        ..facts.clone()
    });
    assert!(f[0].message.contains("not on standby pg2:5432"), "{f:?}");
    let other = ["sb9".to_owned()];
    let f = standby_findings(&StandbyFacts {
        primary_standby_slots: &other,
        ..facts.clone()
    });
    assert_eq!(f[0].name, "postgres.standby.primary_slot_name");
}
