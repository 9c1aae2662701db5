//! The server and the connected role: the settings logical replication depends on, the free
//! replication slots and WAL senders, and what the role may do.
//!
//! Invariant: read-only. The one rule kept here, that `wal_level` must be `logical`
//! ([`is_logical_wal_level`]), is the rule start-up refuses by and `walship check` reports by.

use tokio_postgres::Client;

use crate::error::{PgError, sql_err};

/// True when `wal_level` lets PostgreSQL decode WAL logically (only `logical` does).
pub fn is_logical_wal_level(level: &str) -> bool {
    level == "logical"
}

/// Fails unless `wal_level` is `logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), PgError> {
    let row = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(sql_err("reading wal_level"))?;
    let level: String = row.get(0);
    if !is_logical_wal_level(&level) {
        return Err(PgError::Setup(format!(
            "PostgreSQL wal_level is {level:?} but logical replication needs \"logical\": run \
             ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
        )));
    }
    Ok(())
}

/// The session's `wal_sender_timeout` (what a walsender started with this connection's
/// settings uses): how long a walsender waits for a status report before it ends the stream.
/// `None` when it is 0 (never).
pub async fn wal_sender_timeout(client: &Client) -> Result<Option<std::time::Duration>, PgError> {
    let row = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(sql_err("reading wal_sender_timeout"))?;
    let ms: i64 = row.get(0);
    Ok((ms > 0).then(|| std::time::Duration::from_millis(ms as u64)))
}

/// Server settings that logical replication depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSettings {
    /// `wal_level` (`minimal`, `replica`, `logical`).
    pub wal_level: String,
    /// `max_replication_slots`.
    pub max_replication_slots: i64,
    /// `max_wal_senders`.
    pub max_wal_senders: i64,
    /// `server_version` (human form, e.g. `16.4`).
    pub server_version: String,
}

/// Reads the settings from `pg_settings`.
pub async fn server_settings(client: &Client) -> Result<ServerSettings, PgError> {
    let rows = client
        .query(
            "SELECT name::text, setting::text FROM pg_settings \
             WHERE name IN ('wal_level', 'max_replication_slots', 'max_wal_senders', 'server_version')",
            &[],
        )
        .await
        .map_err(sql_err("reading pg_settings"))?;
    let mut s = ServerSettings::default();
    for row in rows {
        let name: String = row.get(0);
        let value: String = row.get(1);
        match name.as_str() {
            "wal_level" => s.wal_level = value,
            "max_replication_slots" => s.max_replication_slots = value.parse().unwrap_or(0),
            "max_wal_senders" => s.max_wal_senders = value.parse().unwrap_or(0),
            "server_version" => s.server_version = value,
            _ => {}
        }
    }
    Ok(s)
}

/// How many replication slots exist and how many WAL senders run, cluster-wide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationUsage {
    /// Rows of `pg_replication_slots` (every database, physical and logical).
    pub slots: i64,
    /// Running walsender processes.
    pub wal_senders: i64,
}

/// Counts used slots and WAL senders.
pub async fn replication_usage(client: &Client) -> Result<ReplicationUsage, PgError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots), \
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')",
            &[],
        )
        .await
        .map_err(sql_err("counting replication slots and WAL senders"))?;
    Ok(ReplicationUsage {
        slots: row.get(0),
        wal_senders: row.get(1),
    })
}

/// The connected role's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    /// `current_user`.
    pub name: String,
    /// `rolreplication`.
    pub replication: bool,
    /// `rolsuper`.
    pub superuser: bool,
    /// `CREATE` privilege on the current database (needed for `CREATE PUBLICATION`).
    pub can_create_in_database: bool,
    /// `current_database()`.
    pub database: String,
    /// Member of a role named `rds_replication` (how Amazon RDS and Aurora grant replication).
    pub rds_replication_member: bool,
    /// The server is Amazon RDS or Aurora (it has `rds.*` settings).
    pub on_rds: bool,
}

/// Where the connected role's right to open a replication connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationRight {
    /// A superuser may.
    Superuser,
    /// The `REPLICATION` attribute.
    Attribute,
    /// Amazon RDS / Aurora: membership in `rds_replication` (`rolreplication` stays false there).
    RdsReplication,
    /// Member of a role named `rds_replication` on a server that is not RDS: such a role gives
    /// no replication right.
    RdsRoleOffRds,
    /// None.
    Missing,
}

impl RoleInfo {
    /// Where the role's right to stream comes from, if it has one.
    pub fn replication_right(&self) -> ReplicationRight {
        if self.superuser {
            ReplicationRight::Superuser
        } else if self.replication {
            ReplicationRight::Attribute
        } else if self.rds_replication_member && self.on_rds {
            ReplicationRight::RdsReplication
        } else if self.rds_replication_member {
            ReplicationRight::RdsRoleOffRds
        } else {
            ReplicationRight::Missing
        }
    }
}

/// Reads the connected role's attributes.
pub async fn role_info(client: &Client) -> Result<RoleInfo, PgError> {
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolreplication, r.rolsuper, \
                    has_database_privilege(current_database(), 'CREATE'), current_database()::text, \
                    COALESCE((SELECT pg_has_role(current_user, x.oid, 'MEMBER') \
                              FROM pg_roles x WHERE x.rolname = 'rds_replication'), false), \
                    EXISTS (SELECT 1 FROM pg_settings WHERE name LIKE 'rds.%') \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(sql_err("reading the attributes of the connected role"))?;
    Ok(RoleInfo {
        name: row.get(0),
        replication: row.get(1),
        superuser: row.get(2),
        can_create_in_database: row.get(3),
        database: row.get(4),
        rds_replication_member: row.get(5),
        on_rds: row.get(6),
    })
}

#[cfg(test)]
mod tests;
