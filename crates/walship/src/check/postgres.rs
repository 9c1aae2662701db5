//! The PostgreSQL side of `walship check`: connect, the server's settings and capacity, the
//! role, then the outbox table, its publication and the slot; and, for the Kafka side, the
//! aggregate types found in the outbox table.
//!
//! ```text
//!  connect ─▶ wal_level, messages, slots/senders free ─▶ role ─▶ table, columns (outbox)
//!          ─▶ publication (outbox) ─▶ slot (slot) ─▶ distinct aggregate types ─▶ AggregateTypes
//! ```
//!
//! Invariant: one management connection with bounded waits (connect timeout, statement
//! timeout), read-only queries only; a query that fails yields a failed check naming it, and the
//! checks that depend on it are skipped, so the run always finishes with every problem listed.

use std::time::Duration;

use tokio_postgres::Client;
use walship_postgres::catalog::{
    self, ReplicationRight, ReplicationUsage, RoleInfo, ServerSettings, TableInfo,
};
use walship_postgres::error::error_chain;
use walship_postgres::replication::ConnectParams;
use walship_postgres::{PgError, SlotState, management, quote_ident};

use super::outbox::{column_checks, publication_checks, table_missing, table_wrong_kind};
use super::report::{Check, quoted_list};
use super::slot;
use crate::config::Config;
use crate::config::settings::SourceParts;

/// How long connecting to PostgreSQL may take when the URL sets no `connect_timeout`.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on every catalog query (and the aggregate-type sample) of a check run.
const PG_STATEMENT_TIMEOUT: &str = "15s";
/// Most distinct aggregate types read from the outbox table to check their topics.
pub(super) const AGGREGATE_TYPE_SAMPLE: i64 = 100;

/// What the PostgreSQL side found that the Kafka side needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AggregateTypes {
    /// The template has no `{aggregatetype}`.
    NotUsed,
    /// Distinct values found in the outbox table (at most [`AGGREGATE_TYPE_SAMPLE`]).
    Found(Vec<String>),
    /// Could not be read; the reason.
    Unknown(String),
}

const PG_UNREACHABLE: &str = "no connection to PostgreSQL (see postgres.connect)";

/// The PostgreSQL checks; returns what the topic checks need to know.
pub(super) async fn postgres_checks(
    config: &Config,
    source: &SourceParts,
    checks: &mut Vec<Check>,
) -> AggregateTypes {
    let spec = &source.outbox;
    let uses_type = !spec.aggregate_type.is_empty();
    let unknown = |why: &str| {
        if uses_type {
            AggregateTypes::Unknown(why.to_owned())
        } else {
            AggregateTypes::NotUsed
        }
    };
    let Some((client, role)) = connect_check(source, checks).await else {
        for name in [
            "postgres.wal_level",
            "postgres.replication_slots",
            "postgres.wal_senders",
            "postgres.role",
            "outbox.table",
            "postgres.publication",
            "postgres.slot",
            "postgres.slot_history_table",
        ] {
            checks.push(Check::skip(name, PG_UNREACHABLE));
        }
        return unknown(PG_UNREACHABLE);
    };

    // Server settings, capacity and the role.
    let state = catalog::slot_state(&client, &config.postgres.slot).await;
    match catalog::server_settings(&client).await {
        Ok(settings) => {
            checks.push(wal_level_check(&settings.wal_level));
            checks.extend(message_check(
                &config.outbox.message_prefixes,
                &settings.server_version,
            ));
            match (catalog::replication_usage(&client).await, &state) {
                (Ok(usage), Ok(state)) => {
                    checks.extend(capacity_checks(&settings, usage, state.as_ref()))
                }
                (Err(e), _) => checks.push(query_failed("postgres.replication_slots", &e)),
                (_, Err(e)) => checks.push(query_failed("postgres.replication_slots", e)),
            }
        }
        Err(e) => checks.push(query_failed("postgres.wal_level", &e)),
    }
    checks.push(role_check(&role));

    // The outbox table and its columns.
    let mut columns = None;
    let table = match catalog::table_info(&client, &spec.table).await {
        Err(e) => {
            checks.push(query_failed("outbox.table", &e));
            None
        }
        Ok(None) => {
            checks.push(table_missing(&spec.table, &role.database));
            None
        }
        Ok(Some(info)) if !info.is_table() => {
            checks.push(table_wrong_kind(&spec.table, &info));
            Some(info)
        }
        Ok(Some(info)) => {
            checks.push(Check::pass(
                "outbox.table",
                format!(
                    "{} exists ({}, owner {})",
                    spec.table,
                    if info.is_partitioned() {
                        "partitioned table"
                    } else {
                        "table"
                    },
                    info.owner
                ),
            ));
            match catalog::table_columns(&client, info.oid).await {
                Ok(cols) => {
                    checks.extend(column_checks(spec, &cols));
                    columns = Some(cols);
                }
                Err(e) => checks.push(query_failed("outbox.columns", &e)),
            }
            Some(info)
        }
    };

    // The publication: whether it sends the outbox's rows is the stream's own rule
    // (walship_postgres::catalog), partitions included.
    let family = match table {
        Some(_) => match catalog::outbox_family(&client, &spec.table).await {
            Ok(f) => f,
            Err(e) => {
                checks.push(query_failed("outbox.partitions", &e));
                None
            }
        },
        None => None,
    };
    match catalog::publication_info(&client, &config.postgres.publication).await {
        Ok(publication) => checks.extend(publication_checks(
            &config.postgres.publication,
            config.postgres.create_publication,
            &spec.table,
            table.as_ref(),
            family.as_ref(),
            publication.as_ref(),
            &role,
        )),
        Err(e) => checks.push(query_failed("postgres.publication", &e)),
    }

    // The slot.
    let slot_exists = matches!(state, Ok(Some(_)));
    match state {
        Ok(state) => checks.extend(
            slot::server_slot_checks(config, source, &client, state.as_ref(), &role.database).await,
        ),
        Err(e) => checks.push(query_failed("postgres.slot", &e)),
    }
    checks.extend(super::failover::checks(config, source, &client).await);
    // What the protections need of the roles: the slot history, the heartbeat, who may emit.
    checks.extend(
        super::privilege::privilege_checks(config, source, &client, &role.name, slot_exists).await,
    );

    // Aggregate types for the topic check.
    if !uses_type {
        return AggregateTypes::NotUsed;
    }
    let Some(info) = table.filter(TableInfo::is_table) else {
        return AggregateTypes::Unknown(format!(
            "the outbox table {} is not usable (see outbox.table)",
            spec.table
        ));
    };
    if !columns
        .as_ref()
        .is_some_and(|cols| cols.iter().any(|c| c.name == spec.aggregate_type))
    {
        return AggregateTypes::Unknown(format!(
            "the aggregate type column {:?} does not exist",
            spec.aggregate_type
        ));
    }
    if !info.can_select {
        return AggregateTypes::Unknown(format!(
            "user {} may not SELECT from {} (walship itself does not need to; only this check \
             does: GRANT SELECT ON {} TO {} to let it list the aggregate types)",
            role.name,
            spec.table,
            spec.table.quoted(),
            quote_ident(&role.name)
        ));
    }
    match catalog::distinct_values(
        &client,
        &spec.table,
        &spec.aggregate_type,
        AGGREGATE_TYPE_SAMPLE,
    )
    .await
    {
        Ok(types) => AggregateTypes::Found(types),
        Err(e) => AggregateTypes::Unknown(error_chain(&e)),
    }
}

/// Connects (bounded by a timeout) and reads the role; pushes `postgres.connect`.
async fn connect_check(
    source: &SourceParts,
    checks: &mut Vec<Check>,
) -> Option<(Client, RoleInfo)> {
    const NAME: &str = "postgres.connect";
    let mut pg_config = match &source.connect {
        Ok(c) => c.clone(),
        Err(e) => {
            checks.push(Check::fail(
                NAME,
                e.to_string(),
                "fix postgres.url in the configuration",
            ));
            return None;
        }
    };
    if pg_config.get_connect_timeout().is_none() {
        pg_config.connect_timeout(PG_CONNECT_TIMEOUT);
    }
    // Only SQL connections here: how replication streams read does not matter.
    let params = ConnectParams {
        config: pg_config,
        read_batching: walship_postgres::ReadBatching::Off,
    };
    let target = params.describe();
    let user = params
        .config
        .get_user()
        .unwrap_or("(default user)")
        .to_owned();
    let password = match &source.password {
        Ok(p) => p.as_ref(),
        Err(e) => {
            checks.push(Check::fail(
                NAME,
                format!("cannot resolve the password for {user}@{target}: {e}"),
                "set the environment variable or file named by postgres.password_env / \
                 postgres.password_file, or remove that key",
            ));
            return None;
        }
    };
    let connect = management::connect(&params, password.as_ref().map(|p| p.expose().as_bytes()));
    let client = match tokio::time::timeout(PG_CONNECT_TIMEOUT * 2, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            checks.push(connect_failure(&e, &target, &user, &params));
            return None;
        }
        Err(_) => {
            checks.push(Check::fail(
                NAME,
                format!("no answer from PostgreSQL at {target} within {PG_CONNECT_TIMEOUT:?}"),
                "check postgres.url's host and port, that PostgreSQL is running there, its \
                 listen_addresses, and firewalls between here and it",
            ));
            return None;
        }
    };
    // Bound every query of this run; a huge outbox table must not hang the check.
    let _ = client
        .batch_execute(&format!("SET statement_timeout = '{PG_STATEMENT_TIMEOUT}'"))
        .await;
    let role = match catalog::role_info(&client).await {
        Ok(r) => r,
        Err(e) => {
            checks.push(query_failed(NAME, &e));
            return None;
        }
    };
    let version = catalog::server_settings(&client)
        .await
        .map(|s| format!(", PostgreSQL {}", s.server_version))
        .unwrap_or_default();
    checks.push(Check::pass(
        NAME,
        format!(
            "connected to {target} as {} (database {}{version})",
            role.name, role.database
        ),
    ));
    Some((client, role))
}

fn connect_failure(e: &PgError, target: &str, user: &str, params: &ConnectParams) -> Check {
    const NAME: &str = "postgres.connect";
    let (code, e) = match e {
        PgError::Sql { source, .. } => (
            source.code().map(|c| c.code().to_owned()),
            error_chain(source),
        ),
        other => (None, error_chain(other)),
    };
    let db = params.config.get_dbname().unwrap_or(user);
    match code.as_deref() {
        Some("28P01" | "28000") => Check::fail(
            NAME,
            format!("PostgreSQL at {target} refused user {user}: {e}"),
            format!(
                "check the password (postgres.password_file, postgres.password_env, the URL, or \
                 PGPASSWORD) and that pg_hba.conf allows {user} to connect to database {db} from \
                 this host"
            ),
        ),
        Some("3D000") => Check::fail(
            NAME,
            format!("database {db} does not exist on {target}"),
            "fix the database name in postgres.url, or create the database",
        ),
        Some(c) if c.starts_with("53") => Check::fail(
            NAME,
            format!("PostgreSQL at {target} has no room for another connection: {e}"),
            "close idle connections or raise max_connections",
        ),
        _ => Check::fail(
            NAME,
            format!("cannot connect to PostgreSQL at {target}: {e}"),
            "check postgres.url's host and port, that PostgreSQL is running there, its \
             listen_addresses, and firewalls between here and it",
        ),
    }
}

fn query_failed(name: &str, e: &PgError) -> Check {
    Check::fail(
        name,
        format!("could not check: {}", error_chain(e)),
        "make sure the configured user can read the system catalogs (pg_settings, pg_roles, \
         pg_class, pg_publication, pg_replication_slots)",
    )
}

/// Message mode (`outbox.message_prefixes`): usable when the server's pgoutput has the
/// `messages` option (PostgreSQL 14 and later). `None` when no prefix is configured (off).
pub fn message_check(prefixes: &[String], server_version: &str) -> Option<Check> {
    const NAME: &str = "outbox.message_prefixes";
    if prefixes.is_empty() {
        return None;
    }
    let major: Option<u32> = server_version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok());
    Some(match major {
        Some(v) if v >= 14 => Check::pass(
            NAME,
            format!(
                "transactional logical messages with prefix {} are events (PostgreSQL {v} sends \
                 them with the rows)",
                quoted_list(prefixes)
            ),
        ),
        _ => Check::fail(
            NAME,
            format!(
                "PostgreSQL {server_version} cannot send logical messages through pgoutput \
                 (its messages option came with PostgreSQL 14)"
            ),
            "upgrade PostgreSQL to 14 or later, or write events as outbox rows and set \
             outbox.message_prefixes = []",
        ),
    })
}

/// `wal_level` must be `logical`.
pub fn wal_level_check(level: &str) -> Check {
    const NAME: &str = "postgres.wal_level";
    if catalog::is_logical_wal_level(level) {
        Check::pass(NAME, "wal_level = logical")
    } else {
        Check::fail(
            NAME,
            format!("wal_level is {level:?}; logical replication needs \"logical\""),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL (a reload is not \
             enough; on managed services set the parameter group's wal_level / \
             rds.logical_replication)",
        )
    }
}

/// Free replication slots and WAL senders.
fn capacity_checks(
    settings: &ServerSettings,
    usage: ReplicationUsage,
    state: Option<&SlotState>,
) -> [Check; 2] {
    let max_slots = settings.max_replication_slots;
    let slots = if state.is_some() {
        Check::pass(
            "postgres.replication_slots",
            format!(
                "walship's slot exists, so no new slot is needed ({} of max_replication_slots = {max_slots} used)",
                usage.slots
            ),
        )
    } else if usage.slots < max_slots {
        Check::pass(
            "postgres.replication_slots",
            format!(
                "{} of max_replication_slots = {max_slots} used; one is free for walship's slot",
                usage.slots
            ),
        )
    } else {
        Check::fail(
            "postgres.replication_slots",
            format!(
                "no free replication slot: {} of max_replication_slots = {max_slots} in use",
                usage.slots
            ),
            "drop slots nobody uses (SELECT slot_name, active, database FROM pg_replication_slots; \
             then SELECT pg_drop_replication_slot('name');) or raise max_replication_slots \
             (ALTER SYSTEM SET max_replication_slots = 10; and restart PostgreSQL)",
        )
    };
    // A walsender already streaming from walship's slot is the one walship would take over.
    let ours = i64::from(state.is_some_and(|s| s.active_pid.is_some()));
    let max_senders = settings.max_wal_senders;
    let senders = if usage.wal_senders - ours < max_senders {
        Check::pass(
            "postgres.wal_senders",
            format!(
                "{} of max_wal_senders = {max_senders} in use; one is free for walship",
                usage.wal_senders
            ),
        )
    } else {
        Check::fail(
            "postgres.wal_senders",
            format!(
                "no free WAL sender: {} of max_wal_senders = {max_senders} in use",
                usage.wal_senders
            ),
            "stop replication clients nobody needs (SELECT pid, application_name FROM \
             pg_stat_replication;) or raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = \
             10; and restart PostgreSQL)",
        )
    };
    [slots, senders]
}

/// The role needs REPLICATION (or superuser; on Amazon RDS and Aurora membership in
/// `rds_replication`) to open a replication connection.
pub fn role_check(role: &RoleInfo) -> Check {
    const NAME: &str = "postgres.role";
    let user = &role.name;
    let alter = format!(
        "as a superuser: ALTER ROLE {} WITH REPLICATION; (pg_hba.conf must also allow it: \
         replication connections to a named database match ordinary entries)",
        quote_ident(user)
    );
    match role.replication_right() {
        ReplicationRight::Superuser => Check::pass(NAME, format!("user {user} is a superuser")),
        ReplicationRight::Attribute => {
            Check::pass(NAME, format!("user {user} has the REPLICATION attribute"))
        }
        ReplicationRight::RdsReplication => Check::pass(
            NAME,
            format!(
                "user {user} is a member of rds_replication, which gives the right to stream on \
                 Amazon RDS and Aurora (rolreplication stays false there)"
            ),
        ),
        ReplicationRight::RdsRoleOffRds => Check::fail(
            NAME,
            format!(
                "user {user} has neither the REPLICATION attribute nor superuser; it is a member \
                 of a role named rds_replication, but this server is not Amazon RDS or Aurora, \
                 where that role would give the right to stream"
            ),
            alter,
        ),
        ReplicationRight::Missing => Check::fail(
            NAME,
            format!(
                "user {user} has neither the REPLICATION attribute nor superuser, so it cannot \
                 open a replication connection"
            ),
            format!(
                "{alter}; on Amazon RDS or Aurora: GRANT rds_replication TO {};",
                quote_ident(user)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use pgoutput::Lsn;

    use super::*;
    use crate::check::fixtures::role;
    use crate::check::report::Status;

    #[test]
    fn message_mode_is_reported_when_configured_and_needs_postgresql_14() {
        assert!(message_check(&[], "16.4").is_none(), "off: no line");
        let prefixes = ["outbox".to_owned()];
        let c = message_check(&prefixes, "15.8 (Debian 15.8-1)").unwrap();
        assert_eq!(c.status, Status::Pass);
        assert!(c.message.contains("\"outbox\""), "{}", c.message);
        let c = message_check(&prefixes, "13.16").unwrap();
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.message.contains("13.16") && c.fix.as_deref().is_some_and(|f| f.contains("14")),
            "{c:?}"
        );
    }

    #[test]
    fn wal_level_replica_fails_with_the_fix() {
        let c = wal_level_check("replica");
        assert_eq!(c.status, Status::Fail);
        assert!(c.message.contains("\"replica\""), "{c:?}");
        let fix = c.fix.unwrap();
        assert!(
            fix.contains("ALTER SYSTEM SET wal_level = logical") && fix.contains("restart"),
            "{fix}"
        );
        assert_eq!(wal_level_check("logical").status, Status::Pass);
    }

    #[test]
    fn role_without_replication_fails_with_alter_role() {
        let c = role_check(&role(false, false));
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.fix
                .unwrap()
                .contains("ALTER ROLE \"nrep\" WITH REPLICATION"),
            "fix names the role"
        );
        assert_eq!(role_check(&role(true, false)).status, Status::Pass);
        assert_eq!(role_check(&role(false, true)).status, Status::Pass);
    }

    /// On RDS and Aurora a role streams through rds_replication with rolreplication false;
    /// a role of that name on another server gives no right and is not taken for one.
    #[test]
    fn rds_replication_membership_passes_on_rds_only() {
        let rds = RoleInfo {
            rds_replication_member: true,
            on_rds: true,
            ..role(false, false)
        };
        let c = role_check(&rds);
        assert_eq!(c.status, Status::Pass, "{c:?}");
        assert!(c.message.contains("rds_replication"), "{c:?}");
        let local = RoleInfo {
            on_rds: false,
            ..rds.clone()
        };
        let c = role_check(&local);
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(c.message.contains("not Amazon RDS"), "{c:?}");
        let c = role_check(&RoleInfo {
            rds_replication_member: false,
            ..rds
        });
        assert_eq!(c.status, Status::Fail, "{c:?}");
        assert!(
            c.fix
                .as_deref()
                .is_some_and(|f| f.contains("GRANT rds_replication TO \"nrep\"")),
            "{c:?}"
        );
    }

    #[test]
    fn capacity_counts_used_against_max_and_existing_slot_needs_none() {
        let settings = ServerSettings {
            wal_level: "logical".into(),
            max_replication_slots: 2,
            max_wal_senders: 2,
            server_version: "16".into(),
        };
        let full = ReplicationUsage {
            slots: 2,
            wal_senders: 2,
        };
        let [slots, senders] = capacity_checks(&settings, full, None);
        assert_eq!(slots.status, Status::Fail, "{slots:?}");
        assert!(slots.message.contains("2 of max_replication_slots = 2"));
        assert_eq!(senders.status, Status::Fail, "{senders:?}");
        let ours = SlotState {
            name: "walship".into(),
            plugin: Some("pgoutput".into()),
            database: Some("app".into()),
            confirmed_flush_lsn: Some(Lsn(10)),
            restart_lsn: Some(Lsn(5)),
            wal_status: Some("reserved".into()),
            invalidation_reason: None,
            active_pid: Some(7),
            safe_wal_size: None,
        };
        let [slots, senders] = capacity_checks(&settings, full, Some(&ours));
        assert_eq!(slots.status, Status::Pass, "{slots:?}");
        assert_eq!(senders.status, Status::Pass, "{senders:?}");
    }
}
