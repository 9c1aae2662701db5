//! A primary with a physical standby that syncs failover slots (PostgreSQL 17+), built without
//! `pg_basebackup` as `../shared/PLATFORM.md` describes: a cold copy of the primary's data
//! directory.
//!
//! ```text
//!  primary  (physical slot `standby1`; synchronized_standby_slots = 'standby1', set after the copy)
//!     │ streaming replication, through a link the test can cut (Pair::cut_standby)
//!  standby  (standby.signal, primary_conninfo with dbname=, primary_slot_name = 'standby1',
//!            hot_standby_feedback = on, sync_replication_slots = on)
//! ```
//!
//! The two pitfalls: the standby does not inherit `synchronized_standby_slots` (it is set on the
//! primary with `ALTER SYSTEM` after the copy, so a promoted standby does not wait for a slot it
//! lacks), and [`Pair::await_synced`] nudges the first sync of a new slot along
//! (`pg_log_standby_snapshot()`, then a confirmed transaction).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgoutput::Lsn;

use super::postgres::{Cluster, TestDb, connect};

/// The physical slot the standby streams through.
pub const STANDBY_SLOT: &str = "standby1";

/// A primary and its standby.
pub struct Pair {
    pub primary: Cluster,
    pub standby: Cluster,
    link: Link,
}

/// A TCP relay between the standby and the primary that the test can cut.
struct Link {
    port: u16,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Link {
    async fn to(port: u16) -> Link {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the link");
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let link_port = listener.local_addr().expect("link address").port();
        let accept = tokio::spawn({
            let (cut, connections) = (Arc::clone(&cut), Arc::clone(&connections));
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the standby cannot reconnect
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                        {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(task);
                }
            }
        });
        Link {
            port: link_port,
            cut,
            connections,
            accept,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Sets the primary's `synchronized_standby_slots` (`ALTER SYSTEM` runs alone, outside the
/// implicit transaction of a multi-statement query) and reloads.
pub async fn set_standby_slots(primary: &tokio_postgres::Client, slots: &str) {
    primary
        .batch_execute(&format!(
            "ALTER SYSTEM SET synchronized_standby_slots = '{slots}'"
        ))
        .await
        .expect("set synchronized_standby_slots");
    primary
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
}

/// How a standby's copy of a logical slot looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedSlot {
    pub synced: bool,
    pub temporary: bool,
    pub confirmed: Option<Lsn>,
}

impl Pair {
    /// Starts a primary and a standby of it. With `standby_slots`, the primary's
    /// `synchronized_standby_slots` names the standby's slot (what failover slots need); without,
    /// the primary may send logical changes the standby does not have yet.
    pub async fn new(standby_slots: bool) -> Pair {
        static N: AtomicU32 = AtomicU32::new(0);
        let primary = Cluster::private(&[]);
        let admin = connect(&format!("{}/postgres", primary.base_url)).await;
        admin
            .batch_execute(&format!(
                "SELECT pg_create_physical_replication_slot('{STANDBY_SLOT}')"
            ))
            .await
            .expect("create the standby's physical slot");
        drop(admin);
        // A cold copy: the primary stopped, its data directory copied without the files that
        // belong to the running server and without its slots.
        primary.stop_server();
        let data = primary.data_dir.clone().expect("a private cluster");
        let root = std::env::temp_dir().join(format!(
            "walship-test-pg-standby-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create the standby's directory");
        let owner = std::fs::metadata(&data).expect("primary data dir");
        let chown = |p: &Path| {
            std::os::unix::fs::chown(p, Some(owner.uid()), Some(owner.gid()))
                .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        };
        chown(&root);
        let copy = Command::new("cp")
            .arg("-a")
            .arg(&data)
            .arg(root.join("data"))
            .status()
            .expect("run cp");
        assert!(
            copy.success(),
            "copying the primary's data directory failed"
        );
        let copied = root.join("data");
        for f in ["postmaster.pid", "postmaster.opts"] {
            let _ = std::fs::remove_file(copied.join(f));
        }
        for entry in std::fs::read_dir(copied.join("pg_replslot")).expect("pg_replslot") {
            let _ = std::fs::remove_dir_all(entry.expect("slot dir").path());
        }
        std::fs::write(copied.join("standby.signal"), "").expect("standby.signal");
        chown(&copied.join("standby.signal"));
        primary.start_server();
        let link = Link::to(primary.port).await;
        let conninfo = format!(
            "primary_conninfo=host=127.0.0.1 port={} user=postgres dbname=postgres \
             application_name={STANDBY_SLOT}",
            link.port
        );
        let standby = Cluster::from_data_dir(
            &root,
            &[
                &conninfo,
                &format!("primary_slot_name={STANDBY_SLOT}"),
                "hot_standby_feedback=on",
                "sync_replication_slots=on",
            ],
        );
        if standby_slots {
            // After the copy, so the standby never inherits it (pitfall 2).
            let admin = connect(&format!("{}/postgres", primary.base_url)).await;
            set_standby_slots(&admin, STANDBY_SLOT).await;
        }
        let pair = Pair {
            primary,
            standby,
            link,
        };
        pair.await_replicating().await;
        pair
    }

    /// Cuts the standby off the primary: its connections are dropped and it cannot reconnect,
    /// so it keeps only the WAL it has received so far.
    pub fn cut_standby(&self) {
        self.link.cut();
    }

    /// Waits until the standby streams from the primary through its slot.
    pub async fn await_replicating(&self) {
        let admin = connect(&format!("{}/postgres", self.primary.base_url)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let active: Option<bool> = admin
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&STANDBY_SLOT],
                )
                .await
                .expect("read the standby's slot")
                .map(|r| r.get(0));
            if active == Some(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the standby did not start streaming from the primary within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the standby has replayed everything the primary has written so far (a
    /// database just created on the primary exists on the standby afterwards).
    pub async fn await_replayed(&self) {
        let primary = connect(&format!("{}/postgres", self.primary.base_url)).await;
        let standby = connect(&format!("{}/postgres", self.standby.base_url)).await;
        let lsn = |row: tokio_postgres::Row| {
            row.get::<_, Option<tokio_postgres::types::PgLsn>>(0)
                .map_or(0, u64::from)
        };
        let target = lsn(primary
            .query_one("SELECT pg_current_wal_lsn()", &[])
            .await
            .expect("read the primary's position"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let replayed = lsn(standby
                .query_one("SELECT pg_last_wal_replay_lsn()", &[])
                .await
                .expect("read the standby's replay position"));
            if replayed >= target {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the standby did not replay up to {target:X} within 60 s (at {replayed:X})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The standby's copy of `slot` (`None`: not there).
    pub async fn standby_slot(&self, slot: &str) -> Option<SyncedSlot> {
        let standby = connect(&format!("{}/postgres", self.standby.base_url)).await;
        standby
            .query_opt(
                "SELECT synced, temporary, confirmed_flush_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("read the standby's slots")
            .map(|r| SyncedSlot {
                synced: r.get(0),
                temporary: r.get(1),
                confirmed: r
                    .get::<_, Option<tokio_postgres::types::PgLsn>>(2)
                    .map(|l| Lsn(u64::from(l))),
            })
    }

    /// Waits until the standby holds a persistent synced copy of `db`'s slot at or past what
    /// the primary had confirmed when this started. While the copy waits for a catalog xmin
    /// (pitfall 1), logs a running-xacts record on the primary and commits a transaction for
    /// walship to confirm past it. Returns how long it took.
    pub async fn await_synced(&self, db: &TestDb) -> Duration {
        let started = tokio::time::Instant::now();
        let deadline = started + Duration::from_secs(120);
        let target = db.await_caught_up().await;
        loop {
            if let Some(s) = self.standby_slot(db.slot()).await
                && s.synced
                && !s.temporary
                && s.confirmed.is_some_and(|c| c >= target)
            {
                return started.elapsed();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "slot {} was not synced to the standby within 120 s: {:?}",
                db.slot(),
                self.standby_slot(db.slot()).await
            );
            db.client
                .batch_execute(
                    "SELECT pg_log_standby_snapshot(); \
                     INSERT INTO other_table (note) VALUES ('nudge the slot sync')",
                )
                .await
                .expect("nudge");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
