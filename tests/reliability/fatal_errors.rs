//! Definite errors, each provoked and its message checked: an invalidated or dropped slot, a
//! dropped publication or table, `wal_level = replica`, no REPLICATION privilege.

use std::time::Duration;

use super::exits_with;
use crate::harness::postgres::Cluster;
use crate::harness::{self, Binary, Row, TIMEOUT, TestDb, broker, insert_txn};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_slot_is_fatal_and_explained() {
    let cluster = Cluster::private(&[
        "max_slot_wal_keep_size=1MB",
        "max_wal_size=32MB",
        "min_wal_size=32MB",
    ]);
    let mut db = TestDb::new_in(&cluster).await;
    let config = harness::config_toml(&db, &broker().bootstrap, "");
    let walship = Binary::start(&config);
    db.await_streaming().await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 0)]).await;
    db.await_caught_up().await;
    let (code, _) = walship.stop().await;
    assert_eq!(code, 0);
    // Move WAL far past the slot with nobody reading it, then checkpoint: the slot is lost.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        db.client
            .batch_execute("INSERT INTO other_table (note) SELECT repeat('w', 500) FROM generate_series(1, 3000); SELECT pg_switch_wal(); CHECKPOINT;")
            .await
            .unwrap();
        let row = db
            .client
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap();
        if row.get::<_, Option<String>>(0).as_deref() == Some("lost") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never became lost"
        );
    }
    let walship = Binary::start(&config);
    exits_with(
        walship,
        &[
            "invalidated",
            "wal_status = lost",
            &format!("pg_drop_replication_slot('{}')", db.name),
        ],
    )
    .await;
}

/// PostgreSQL 18 also invalidates a slot nobody streamed from for longer than
/// `idle_replication_slot_timeout` (at a checkpoint), with its WAL still there: walship names
/// that cause and setting, not removed WAL and `max_slot_wal_keep_size` (the only cause it knew
/// before 17 made `invalidation_reason` readable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_invalidated_slot_is_fatal_and_explained() {
    if harness::postgres::pg_bin_major() < 18 {
        eprintln!("skipped: idle_replication_slot_timeout is new in PostgreSQL 18");
        return;
    }
    let cluster = Cluster::private(&["idle_replication_slot_timeout=1s"]);
    let mut db = TestDb::new_in(&cluster).await;
    let config = harness::config_toml(&db, &broker().bootstrap, "");
    let walship = Binary::start(&config);
    db.await_streaming().await;
    insert_txn(&mut db.client, &[Row::new("order", "a", 0)]).await;
    db.await_caught_up().await;
    let (code, _) = walship.stop().await;
    assert_eq!(code, 0);
    // Idle for more than a second, a checkpoint invalidates the slot.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        db.client.batch_execute("CHECKPOINT").await.unwrap();
        let row = db
            .client
            .query_one(
                "SELECT wal_status, invalidation_reason FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap();
        if row.get::<_, Option<String>>(0).as_deref() == Some("lost") {
            assert_eq!(
                row.get::<_, Option<String>>(1).as_deref(),
                Some("idle_timeout")
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never became lost"
        );
    }
    let walship = Binary::start(&config);
    let log = exits_with(
        walship,
        &[
            "invalidated",
            "wal_status = lost, invalidation_reason = idle_timeout",
            "idle_replication_slot_timeout",
            &format!("pg_drop_replication_slot('{}')", db.name),
        ],
    )
    .await;
    assert!(!log.contains("max_slot_wal_keep_size"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_slot_is_not_recreated_silently() {
    let db = TestDb::new().await;
    let config = harness::config_toml(&db, &broker().bootstrap, "");
    let walship = Binary::start(&config);
    db.await_streaming().await;
    let (code, _) = walship.stop().await;
    assert_eq!(code, 0);
    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.name])
        .await
        .unwrap();
    // The preflight says so too, with the fix.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("w.toml"), &config).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_walship"))
        .args(["check", "--config"])
        .arg(dir.path().join("w.toml"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{out}");
    assert!(
        out.contains("dropped since") && out.contains("DELETE FROM"),
        "{out}"
    );
    let walship = Binary::start(&config);
    exits_with(
        walship,
        &["has been dropped", "walship_slots", "DELETE FROM"],
    )
    .await;
    let slot = db
        .client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    assert!(slot.is_none(), "no new slot was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_publication_and_table_while_running_are_fatal_and_explained() {
    for what in ["publication", "table"] {
        let db = TestDb::new().await;
        let walship = Binary::start(&harness::config_toml(&db, &broker().bootstrap, "").replace(
            "status_interval_ms = 200",
            "status_interval_ms = 200\nwatch_interval_ms = 200",
        ));
        db.await_streaming().await;
        if what == "publication" {
            db.client
                .batch_execute(&format!("DROP PUBLICATION {}_pub", db.name))
                .await
                .unwrap();
            exits_with(
                walship,
                &[
                    &format!("{}_pub", db.name),
                    "was dropped",
                    "CREATE PUBLICATION",
                ],
            )
            .await;
        } else {
            db.client.batch_execute("DROP TABLE outbox").await.unwrap();
            exits_with(walship, &["public.outbox", "was dropped"]).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_fatal_and_explained() {
    let cluster = Cluster::private(&["wal_level=replica"]);
    let db = TestDb::new_in(&cluster).await;
    let walship = Binary::start(&harness::config_toml(&db, &broker().bootstrap, ""));
    exits_with(
        walship,
        &[
            "wal_level",
            "\"replica\"",
            "ALTER SYSTEM SET wal_level = logical",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_replication_privilege_is_fatal_and_explained() {
    let db = TestDb::new().await;
    let role = format!("{}_norep", db.name);
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; CREATE PUBLICATION {db}_pub FOR TABLE outbox WITH (publish = 'insert');",
            db = db.name
        ))
        .await
        .unwrap();
    let config = harness::config_toml(&db, &broker().bootstrap, "")
        .replace("postgres://postgres@", &format!("postgres://{role}@"));
    let walship = Binary::start(&config);
    exits_with(
        walship,
        &[
            &db.name,
            "REPLICATION",
            &format!("ALTER ROLE \"{role}\" REPLICATION"),
        ],
    )
    .await;
}
