use super::*;
use crate::failover::fixtures::{lsn, synced};

fn promoted<'a>(slot: Option<&'a SlotSync>, history: &'a [TimelineSwitch]) -> SessionFacts<'a> {
    SessionFacts {
        server: "pg2:5432",
        major: 17,
        timeline: 2,
        history,
        slot,
        slot_name: "w",
    }
}

const BEFORE: Streamed = Streamed {
    timeline: 1,
    confirmed: Lsn(0x0300_0100),
};

#[test]
fn parses_history_files() {
    let h = parse_history(
        "1\t0/1A1EC38\tno recovery target specified\n\n2\t0/3000000\tbefore 2000-01-01\n",
    );
    assert_eq!(
        h,
        [
            TimelineSwitch {
                timeline: 1,
                end: lsn("0/1A1EC38")
            },
            TimelineSwitch {
                timeline: 2,
                end: lsn("0/3000000")
            }
        ]
    );
    assert!(parse_history("").is_empty());
}

#[test]
fn a_synced_slot_behind_what_walship_confirmed_is_normal() {
    let history = [TimelineSwitch {
        timeline: 1,
        end: lsn("0/3000200"),
    }];
    let slot = synced("0/2F00000");
    assert_eq!(
        verify_continuity(BEFORE, &promoted(Some(&slot), &history)).unwrap(),
        Continuity::Promoted {
            from: 1,
            to: 2,
            switch: lsn("0/3000200"),
            slot_confirmed: lsn("0/2F00000"),
            confirmed: BEFORE.confirmed,
        }
    );
    // The same timeline, or nothing streamed yet: nothing to compare.
    let same = SessionFacts {
        timeline: 1,
        ..promoted(None, &[])
    };
    assert_eq!(verify_continuity(BEFORE, &same).unwrap(), Continuity::Same);
    assert_eq!(
        verify_continuity(Streamed::default(), &promoted(None, &[])).unwrap(),
        Continuity::Same
    );
}

#[test]
fn a_promoted_server_without_the_slot_is_fatal_and_explained() {
    let history = [TimelineSwitch {
        timeline: 1,
        end: lsn("0/3000200"),
    }];
    let e = verify_continuity(BEFORE, &promoted(None, &history)).unwrap_err();
    assert!(!e.is_transient());
    let e = e.to_string();
    assert!(
        e.contains("pg2:5432")
            && e.contains("does not exist there")
            && e.contains("sync_replication_slots")
            && e.contains("will not create a new slot")
            && e.contains("0/3000100"),
        "{e}"
    );
}

#[test]
fn a_switch_point_before_the_confirmed_position_is_fatal() {
    let history = [TimelineSwitch {
        timeline: 1,
        end: lsn("0/3000000"),
    }];
    let slot = synced("0/2F00000");
    let e = verify_continuity(BEFORE, &promoted(Some(&slot), &history))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("before the position 0/3000100")
            && e.contains("synchronized_standby_slots")
            && e.contains("between 0/3000000 and 0/3000100"),
        "{e}"
    );
}

#[test]
fn a_synced_slot_another_process_advanced_is_followed() {
    let history = [TimelineSwitch {
        timeline: 1,
        end: lsn("0/3000400"),
    }];
    // This process confirmed 0/3000100; its peer confirmed up to 0/3000300 before the
    // promotion, and the slot was synced there.
    let ahead = synced("0/3000300");
    assert_eq!(
        verify_continuity(BEFORE, &promoted(Some(&ahead), &history)).unwrap(),
        Continuity::Promoted {
            from: 1,
            to: 2,
            switch: lsn("0/3000400"),
            slot_confirmed: lsn("0/3000300"),
            confirmed: BEFORE.confirmed,
        }
    );
}

#[test]
fn a_history_holds_its_own_timeline_and_its_ancestors_up_to_their_ends() {
    let h = History {
        timeline: 3,
        switches: vec![
            TimelineSwitch {
                timeline: 1,
                end: lsn("0/3000000"),
            },
            TimelineSwitch {
                timeline: 2,
                end: lsn("0/5000000"),
            },
        ],
    };
    assert!(h.holds(3, lsn("0/1000000")) && h.holds(3, lsn("0/9000000")));
    assert!(h.holds(1, lsn("0/2FFFFFF")));
    assert!(!h.holds(1, lsn("0/3000000")), "past timeline 1's end");
    assert!(h.holds(2, lsn("0/4000000")));
    assert!(!h.holds(2, lsn("0/5000000")));
    assert!(!h.holds(4, lsn("0/1000000")), "a later timeline");
    assert_eq!(h.branch_point(), Some(lsn("0/5000000")));
    assert!(History::first().holds(1, lsn("F/0")));
    assert!(
        !History::first().holds(2, lsn("0/1")),
        "an old primary back"
    );
    assert_eq!(History::first().branch_point(), None);
}

#[test]
fn unsynced_or_invalidated_slots_are_fatal() {
    let history = [TimelineSwitch {
        timeline: 1,
        end: lsn("0/3000200"),
    }];
    let created_there = SlotSync {
        synced: Some(false),
        ..synced("0/3000300")
    };
    let e = verify_continuity(BEFORE, &promoted(Some(&created_there), &history))
        .unwrap_err()
        .to_string();
    assert!(e.contains("synced = false"), "{e}");
    // Before 17 there is no synced column: the position rule still catches a new slot.
    let pg16 = SessionFacts {
        major: 16,
        ..promoted(Some(&created_there), &history)
    };
    // Before 17 a slot on a promoted server was copied by a tool: followed, and Kafka is
    // the measure of what was published.
    assert!(matches!(
        verify_continuity(BEFORE, &pg16).unwrap(),
        Continuity::Promoted { .. }
    ));
    let lost = SlotSync {
        invalidation_reason: Some("rows_removed".into()),
        ..synced("0/2F00000")
    };
    let e = verify_continuity(BEFORE, &promoted(Some(&lost), &history))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("invalidated (invalidation_reason = rows_removed)"),
        "{e}"
    );
}

#[test]
fn an_older_or_unrelated_timeline_is_fatal() {
    let back = SessionFacts {
        timeline: 1,
        ..promoted(None, &[])
    };
    let e = verify_continuity(
        Streamed {
            timeline: 2,
            ..BEFORE
        },
        &back,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is older") && e.contains("old primary"), "{e}");
    // Timeline 3 branched from 1, not from the 2 walship streamed on.
    let history = [TimelineSwitch {
        timeline: 1,
        end: lsn("0/2000000"),
    }];
    let sibling = SessionFacts {
        timeline: 3,
        ..promoted(None, &history)
    };
    let e = verify_continuity(
        Streamed {
            timeline: 2,
            ..BEFORE
        },
        &sibling,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("does not descend from timeline 2"), "{e}");
}
