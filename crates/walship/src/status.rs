//! `walship status`: where the slot stands — who streams from it, what it confirmed, how far it
//! is behind the server's WAL, whether PostgreSQL still keeps the WAL it needs — and what the
//! publication publishes.
//!
//! Invariant: read-only, one management connection, no replication connection (so it never
//! disturbs a running walship). Lag is `pg_current_wal_lsn() - confirmed_flush_lsn`, both read
//! from the same server; it is cluster-wide WAL, so traffic of other databases counts too.

use std::path::Path;
use std::process::ExitCode;

use serde::Serialize;
use walship_postgres::catalog::WalRetention;
use walship_postgres::error::error_chain;
use walship_postgres::{catalog, management};

use crate::command::{self, human_bytes};
use crate::config::Config;
use crate::config::settings::SourceSettings;
use crate::error::Error;

/// The slot and publication as PostgreSQL sees them now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotStatus {
    /// `postgres.host:port` (never credentials).
    pub server: String,
    /// Slot name.
    pub slot: String,
    /// The slot exists.
    pub exists: bool,
    /// Output plugin.
    pub plugin: Option<String>,
    /// Database the slot belongs to.
    pub database: Option<String>,
    /// A walsender streams from it.
    pub active: bool,
    /// PID of that walsender.
    pub active_pid: Option<i32>,
    /// Who streams the slot — its owner: the walsender's `application_name` and client
    /// address (`null` when nobody does, or the role may not see them).
    pub owner: Option<String>,
    /// walship processes waiting for the slot as standbys (active-passive, or `[cluster]`
    /// during a move).
    pub standbys: u32,
    /// Where streaming resumes (everything before it reached Kafka).
    pub confirmed_flush_lsn: Option<String>,
    /// Oldest WAL the slot keeps.
    pub restart_lsn: Option<String>,
    /// `pg_current_wal_lsn()`.
    pub current_wal_lsn: String,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`, in bytes.
    pub lag_bytes: Option<u64>,
    /// `pg_current_wal_lsn() - restart_lsn`: WAL the server retains for this slot.
    pub retained_wal_bytes: Option<u64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot risks invalidation; `null` when
    /// unlimited (`max_slot_wal_keep_size = -1`) or lost.
    pub safe_wal_size: Option<i64>,
    /// Publication name.
    pub publication: String,
    /// The publication exists.
    pub publication_exists: bool,
    /// Its tables, `schema.table`.
    pub publication_tables: Vec<String>,
    /// Why the outbox's rows would not reach walship through the publication (the stream's
    /// own rule, partitions included); `null` when they do.
    pub outbox_problem: Option<String>,
}

impl SlotStatus {
    /// True when the slot exists and is usable (not lost).
    pub fn healthy(&self) -> bool {
        self.exists && !self.retention_lost()
    }

    /// True when PostgreSQL no longer keeps the slot's WAL (the catalog's rule for `wal_status`).
    fn retention_lost(&self) -> bool {
        WalRetention::of(self.wal_status.as_deref()) == WalRetention::Lost
    }

    /// The human form: one `name  value` line per field.
    pub fn render_human(&self) -> String {
        let none = || "-".to_owned();
        let mut rows: Vec<(&str, String)> = vec![("server", self.server.clone())];
        if self.exists {
            rows.push((
                "slot",
                format!(
                    "{} ({}, database {})",
                    self.slot,
                    self.plugin.as_deref().unwrap_or("physical"),
                    self.database.as_deref().unwrap_or("-")
                ),
            ));
            rows.push((
                "owner",
                match (self.active_pid, &self.owner) {
                    (Some(pid), Some(owner)) => format!("walsender PID {pid}, {owner}"),
                    (Some(pid), None) => format!("walsender PID {pid}"),
                    (None, _) => "none: nobody streams this slot, so no walship process runs \
                                  this pipeline now (see their logs and walship_unowned_seconds)"
                        .to_owned(),
                },
            ));
            rows.push((
                "standbys",
                match self.standbys {
                    0 => "none waiting for the slot".to_owned(),
                    n => format!("{n} walship process(es) waiting for the slot"),
                },
            ));
            rows.push((
                "confirmed_flush_lsn",
                self.confirmed_flush_lsn.clone().unwrap_or_else(none),
            ));
            rows.push(("restart_lsn", self.restart_lsn.clone().unwrap_or_else(none)));
            rows.push(("current_wal_lsn", self.current_wal_lsn.clone()));
            rows.push((
                "lag",
                self.lag_bytes.map_or_else(none, |b| {
                    format!("{} behind current_wal_lsn", human_bytes(b))
                }),
            ));
            rows.push((
                "retained WAL",
                self.retained_wal_bytes.map_or_else(none, human_bytes),
            ));
            rows.push(("wal_status", self.wal_status.clone().unwrap_or_else(none)));
            rows.push((
                "safe_wal_size",
                match self.safe_wal_size {
                    Some(b) => human_bytes(u64::try_from(b).unwrap_or(0)),
                    None if self.retention_lost() => "none (slot lost)".to_owned(),
                    None => "unlimited (max_slot_wal_keep_size = -1)".to_owned(),
                },
            ));
        } else {
            rows.push((
                "slot",
                format!(
                    "{} does not exist (walship creates it on first start when \
                     postgres.create_slot = true)",
                    self.slot
                ),
            ));
            rows.push(("current_wal_lsn", self.current_wal_lsn.clone()));
        }
        rows.push((
            "publication",
            if !self.publication_exists {
                format!("{} does not exist", self.publication)
            } else if self.publication_tables.is_empty() {
                format!("{} (no tables)", self.publication)
            } else {
                format!(
                    "{}: {}",
                    self.publication,
                    self.publication_tables.join(", ")
                )
            },
        ));
        rows.push((
            "outbox",
            self.outbox_problem
                .clone()
                .unwrap_or_else(|| "published through the publication".to_owned()),
        ));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

/// Reads the slot's and the publication's status.
pub async fn read_status(config: &Config) -> Result<SlotStatus, Error> {
    let source = SourceSettings::resolve(config)?;
    let client = management::connect(&source.params, source.password_bytes()).await?;
    let name = &source.slot;
    let state = catalog::slot_state(&client, name).await?;
    let extra = catalog::slot_extra(&client, name).await?;
    let current = catalog::current_wal_lsn(&client).await?;
    let owner = match state.as_ref().and_then(|s| s.active_pid) {
        Some(pid) => client
            .query_opt(
                "SELECT application_name, host(client_addr) FROM pg_stat_replication WHERE pid = $1",
                &[&pid],
            )
            .await
            .ok()
            .flatten()
            .map(|r| {
                let app: Option<String> = r.get(0);
                let addr: Option<String> = r.get(1);
                format!(
                    "application_name {:?}, client {}",
                    app.unwrap_or_default(),
                    addr.unwrap_or_else(|| "local or not visible to this role".to_owned())
                )
            }),
        None => None,
    };
    let standbys = crate::pipeline::standby::standbys_waiting(&client, name)
        .await
        .map(|pids| u32::try_from(pids.len()).unwrap_or(u32::MAX))
        .unwrap_or(0);
    let publication = catalog::publication_info(&client, &source.publication).await?;
    let table = &source.outbox.table;
    let family = catalog::outbox_family(&client, table).await?;
    let outbox_problem = catalog::publication_problem(
        &source.publication,
        table,
        family.as_ref(),
        publication.as_ref(),
        None,
        false,
    );
    Ok(SlotStatus {
        server: source.params.describe(),
        slot: name.clone(),
        exists: state.is_some(),
        plugin: state.as_ref().and_then(|s| s.plugin.clone()),
        database: state.as_ref().and_then(|s| s.database.clone()),
        active: state.as_ref().is_some_and(|s| s.active_pid.is_some()),
        active_pid: state.as_ref().and_then(|s| s.active_pid),
        owner,
        standbys,
        confirmed_flush_lsn: state
            .as_ref()
            .and_then(|s| s.confirmed_flush_lsn)
            .map(|l| l.to_string()),
        restart_lsn: state
            .as_ref()
            .and_then(|s| s.restart_lsn)
            .map(|l| l.to_string()),
        current_wal_lsn: current.to_string(),
        lag_bytes: state
            .as_ref()
            .and_then(|s| s.confirmed_flush_lsn)
            .map(|l| catalog::lag_bytes(current, l)),
        retained_wal_bytes: state
            .as_ref()
            .and_then(|s| s.restart_lsn)
            .map(|l| catalog::lag_bytes(current, l)),
        wal_status: state.as_ref().and_then(|s| s.wal_status.clone()),
        safe_wal_size: extra.and_then(|e| e.safe_wal_size),
        publication: source.publication.clone(),
        publication_exists: publication.is_some(),
        publication_tables: publication
            .map(|p| p.tables.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        outbox_problem,
    })
}

/// `walship status`: exit 0 when the slot exists and is not lost, 1 when it is missing or lost
/// (the status is still printed) or PostgreSQL cannot be read, 2 for a configuration error.
pub fn main(path: &Path, json: bool, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let deployment = match command::load_deployment(path) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if !deployment.is_single() {
        // Several pipelines: each one's status under its name; one that cannot be read is
        // reported on stderr and makes the exit code 1, the others are still shown.
        let mut all_read = true;
        let mut statuses = Vec::new();
        for p in &deployment.pipelines {
            let name = p.name.clone().unwrap_or_default();
            match runtime.block_on(read_status(&p.config)) {
                Ok(s) => statuses.push((name, s)),
                Err(e) => {
                    eprintln!("error: pipeline {name}: {}", error_chain(&e));
                    all_read = false;
                }
            }
        }
        let human = |name: &str, s: &SlotStatus| format!("pipeline {name}\n{}", s.render_human());
        let ok = all_read && statuses.iter().all(|(_, s)| s.healthy());
        return command::print_named(&statuses, json, human, ok);
    }
    let Some(config) = deployment.pipelines.into_iter().next().map(|p| p.config) else {
        return ExitCode::from(2);
    };
    let status = match runtime.block_on(read_status(&config)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            return ExitCode::from(if matches!(e, Error::Config(_)) { 2 } else { 1 });
        }
    };
    command::print_report(&status, json, || status.render_human(), status.healthy())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SlotStatus {
        SlotStatus {
            server: "db:5432".into(),
            slot: "walship".into(),
            exists: true,
            plugin: Some("pgoutput".into()),
            database: Some("app".into()),
            active: true,
            active_pid: Some(4242),
            owner: Some("application_name \"walship\", client 10.0.0.5".into()),
            standbys: 1,
            confirmed_flush_lsn: Some("0/16B3F40".into()),
            restart_lsn: Some("0/16B3F08".into()),
            current_wal_lsn: "0/16B3F40".into(),
            lag_bytes: Some(0),
            retained_wal_bytes: Some(56),
            wal_status: Some("reserved".into()),
            safe_wal_size: None,
            publication: "walship_outbox".into(),
            publication_exists: true,
            publication_tables: vec!["public.outbox".into()],
            outbox_problem: None,
        }
    }

    #[test]
    fn human_table_names_every_field() {
        let text = sample().render_human();
        for needle in [
            "owner                walsender PID 4242, application_name \"walship\", client 10.0.0.5",
            "standbys             1 walship process(es) waiting for the slot",
            "confirmed_flush_lsn  0/16B3F40",
            "lag                  0 bytes behind",
            "wal_status           reserved",
            "safe_wal_size        unlimited",
            "publication          walship_outbox: public.outbox",
        ] {
            assert!(text.contains(needle), "{needle:?} in\n{text}");
        }
    }

    #[test]
    fn missing_or_lost_slot_is_unhealthy() {
        let mut s = sample();
        assert!(s.healthy());
        s.active_pid = None;
        assert!(
            s.render_human().contains("none: nobody streams this slot"),
            "an unowned pipeline shows"
        );
        s.wal_status = Some("lost".into());
        assert!(!s.healthy());
        s.exists = false;
        assert!(!s.healthy());
        assert!(s.render_human().contains("does not exist"));
    }

    #[test]
    fn json_has_the_documented_fields() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["slot"], "walship");
        assert_eq!(v["lag_bytes"], 0);
        assert_eq!(v["active_pid"], 4242);
        assert!(v["safe_wal_size"].is_null());
        assert_eq!(v["publication_tables"][0], "public.outbox");
    }
}
