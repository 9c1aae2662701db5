//! `walship check`: a preflight that reports every problem of a setup at once, each with its fix.
//!
//! ```text
//!  config ──▶ PostgreSQL: connect ─▶ settings, role, slots/senders ─▶ table, columns ─▶ publication ─▶ slot
//!         └─▶ Kafka: metadata (walship's own producer settings) ─▶ topics (fixed, or per aggregate type
//!                                                                   found in the outbox table)
//! ```
//!
//! Invariant: checking changes nothing — no slot, publication or topic is created, nothing is
//! confirmed. Every check yields a [`Check`] (pass, warn, fail, or skip when an earlier failure
//! makes it impossible), so one run lists every problem. The decisions are pure functions over
//! what the catalog and the broker said, unit-tested without servers; the I/O only gathers facts.
//! Messages name the object (host:port, table, column, slot, topic) and never a secret.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use pgoutput::Lsn;
use serde::Serialize;
use tokio_postgres::Client;
use walship_kafka::RouteError;
use walship_kafka::probe::{self, ClusterInfo};
use walship_postgres::preflight::{
    self, ColumnInfo, PublicationInfo, ReplicationUsage, RoleInfo, ServerSettings, TableInfo,
};
use walship_postgres::replication::ConnectParams;
use walship_postgres::slot::{self, quote_ident};
use walship_postgres::{OutboxSpec, PgError, SlotState, TableName};

use crate::config::{BadRowPolicy, Config};

/// How long connecting to PostgreSQL may take when the URL sets no `connect_timeout`.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on every catalog query (and the aggregate-type sample) of a check run.
const PG_STATEMENT_TIMEOUT: &str = "15s";
/// How long the broker may take to answer the metadata request.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// Most distinct aggregate types read from the outbox table to check their topics.
const AGGREGATE_TYPE_SAMPLE: i64 = 100;
/// Slot lag above which `check` warns.
const LAG_WARN_BYTES: u64 = 1 << 30;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Pass,
    /// Works, but deserves a look.
    Warn,
    /// walship cannot start or would stop: fix it.
    Fail,
    /// Not checked because an earlier check failed.
    Skip,
}

impl Status {
    fn symbol(self) -> &'static str {
        match self {
            Status::Pass => "✓",
            Status::Warn => "!",
            Status::Fail => "✗",
            Status::Skip => "-",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier, e.g. `postgres.wal_level`.
    pub name: String,
    /// Outcome.
    pub status: Status,
    /// What was found, and where.
    pub message: String,
    /// How to fix it (for warnings and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &str, message: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Pass,
            message: message.into(),
            fix: None,
        }
    }

    fn warn(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Warn,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &str, message: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Fail,
            message: message.into(),
            fix: Some(fix.into()),
        }
    }

    fn skip(name: &str, why: impl Into<String>) -> Check {
        Check {
            name: name.to_owned(),
            status: Status::Skip,
            message: format!("not checked: {}", why.into()),
            fix: None,
        }
    }
}

/// Counts per outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Passed checks.
    pub pass: usize,
    /// Warnings.
    pub warn: usize,
    /// Failures.
    pub fail: usize,
    /// Skipped checks.
    pub skip: usize,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// True when nothing failed (warnings allowed).
    pub ok: bool,
    /// Counts.
    pub summary: Summary,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// Builds the report from its checks.
    pub fn new(checks: Vec<Check>) -> Report {
        let mut summary = Summary::default();
        for c in &checks {
            match c.status {
                Status::Pass => summary.pass += 1,
                Status::Warn => summary.warn += 1,
                Status::Fail => summary.fail += 1,
                Status::Skip => summary.skip += 1,
            }
        }
        Report {
            ok: summary.fail == 0,
            summary,
            checks,
        }
    }

    /// The human form: one line per check (`✓` pass, `!` warning, `✗` failure, `-` skipped),
    /// the fix indented below, and a summary line.
    pub fn render_human(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{} {:<width$}  {}\n",
                c.status.symbol(),
                c.name,
                c.message
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("  {:<width$}  fix: {fix}\n", ""));
            }
        }
        let s = &self.summary;
        out.push_str(&format!(
            "\n{} passed, {} warning{}, {} failed, {} skipped: {}\n",
            s.pass,
            s.warn,
            if s.warn == 1 { "" } else { "s" },
            s.fail,
            s.skip,
            if self.ok {
                "walship can start"
            } else {
                "fix the failures (✗) before starting walship"
            }
        ));
        out
    }
}

/// Runs every check against the configured PostgreSQL and Kafka.
pub async fn run_checks(config: &Config) -> Report {
    let mut checks = Vec::new();
    let facts = postgres_checks(config, &mut checks).await;
    kafka_checks(config, &facts, &mut checks).await;
    Report::new(checks)
}

/// What the PostgreSQL side found that the Kafka side needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AggregateTypes {
    /// The template has no `{aggregatetype}`.
    NotUsed,
    /// Distinct values found in the outbox table (at most [`AGGREGATE_TYPE_SAMPLE`]).
    Found(Vec<String>),
    /// Could not be read; the reason.
    Unknown(String),
}

const PG_UNREACHABLE: &str = "no connection to PostgreSQL (see postgres.connect)";

/// The PostgreSQL checks; returns what the topic checks need to know.
async fn postgres_checks(config: &Config, checks: &mut Vec<Check>) -> AggregateTypes {
    let spec = config.outbox_spec();
    let uses_type = !spec.aggregate_type.is_empty();
    let unknown = |why: &str| {
        if uses_type {
            AggregateTypes::Unknown(why.to_owned())
        } else {
            AggregateTypes::NotUsed
        }
    };
    let Some((client, role)) = connect_check(config, checks).await else {
        for name in [
            "postgres.wal_level",
            "postgres.replication_slots",
            "postgres.wal_senders",
            "postgres.role",
            "outbox.table",
            "postgres.publication",
            "postgres.slot",
        ] {
            checks.push(Check::skip(name, PG_UNREACHABLE));
        }
        return unknown(PG_UNREACHABLE);
    };
    let slot_name = config.postgres.slot.as_str();

    // Server settings, capacity and the role.
    let state = slot::slot_state(&client, slot_name).await;
    match preflight::server_settings(&client).await {
        Ok(settings) => {
            checks.push(wal_level_check(&settings.wal_level));
            checks.extend(message_check(
                &config.outbox.message_prefixes,
                &settings.server_version,
            ));
            match (preflight::replication_usage(&client).await, &state) {
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
    let table = match preflight::table_info(&client, &spec.table).await {
        Err(e) => {
            checks.push(query_failed("outbox.table", &e));
            None
        }
        Ok(None) => {
            checks.push(table_missing(&spec.table, &role.database));
            None
        }
        Ok(Some(info)) if !matches!(info.relkind.as_str(), "r" | "p") => {
            checks.push(table_wrong_kind(&spec.table, &info));
            Some(info)
        }
        Ok(Some(info)) => {
            checks.push(Check::pass(
                "outbox.table",
                format!(
                    "{} exists ({}, owner {})",
                    spec.table,
                    if info.relkind == "p" {
                        "partitioned table"
                    } else {
                        "table"
                    },
                    info.owner
                ),
            ));
            match preflight::table_columns(&client, info.oid).await {
                Ok(cols) => {
                    checks.extend(column_checks(&spec, &cols));
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
        Some(_) => match walship_postgres::catalog::outbox_family(&client, &spec.table).await {
            Ok(f) => f,
            Err(e) => {
                checks.push(query_failed("outbox.partitions", &e));
                None
            }
        },
        None => None,
    };
    match preflight::publication_info(&client, &config.postgres.publication).await {
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
    // A missing slot that walship created before was dropped: run refuses to re-create it.
    let dropped = match (&state, config.slot_history().table) {
        (Ok(None), Some(table)) => slot::created_before(&client, &table, slot_name)
            .await
            .ok()
            .flatten()
            .map(|c| (table, c)),
        _ => None,
    };
    match state {
        Ok(None) if dropped.is_some() => {
            if let Some((table, (at, lsn))) = dropped {
                checks.push(Check::fail(
                    "postgres.slot",
                    format!(
                        "slot {slot_name:?} does not exist, but walship created it on {at} at LSN {lsn} (recorded \
                         in {table}): it was dropped since, and walship will not create a new one because that \
                         would skip the events committed in between"
                    ),
                    format!(
                        "reconcile the outbox table with Kafka, then DELETE FROM {} WHERE slot_name = '{slot_name}';",
                        table.quoted()
                    ),
                ));
            }
        }
        Ok(state) => {
            let current = slot::current_wal_lsn(&client).await.ok();
            checks.extend(slot_checks(
                slot_name,
                config.postgres.create_slot,
                state.as_ref(),
                &role.database,
                current,
            ));
        }
        Err(e) => checks.push(query_failed("postgres.slot", &e)),
    }
    checks.extend(crate::failover::checks(config, &client).await);

    // Aggregate types for the topic check.
    if !uses_type {
        return AggregateTypes::NotUsed;
    }
    let Some(info) = table.filter(|t| matches!(t.relkind.as_str(), "r" | "p")) else {
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
    match preflight::distinct_values(
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
async fn connect_check(config: &Config, checks: &mut Vec<Check>) -> Option<(Client, RoleInfo)> {
    const NAME: &str = "postgres.connect";
    let mut pg_config = match config.connect_config() {
        Ok(c) => c,
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
    let password = match config.postgres_password() {
        Ok(p) => p,
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
    let connect = slot::connect(&params, password.as_ref().map(|p| p.expose().as_bytes()));
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
    let role = match preflight::role_info(&client).await {
        Ok(r) => r,
        Err(e) => {
            checks.push(query_failed(NAME, &e));
            return None;
        }
    };
    let version = preflight::server_settings(&client)
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

/// An error with its causes (`error connecting to server: Connection refused (os error 111)`);
/// client libraries often keep the useful part in the source.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
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
    if level == "logical" {
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

/// The role needs REPLICATION (or superuser) to open a replication connection.
pub fn role_check(role: &RoleInfo) -> Check {
    const NAME: &str = "postgres.role";
    if role.superuser {
        Check::pass(NAME, format!("user {} is a superuser", role.name))
    } else if role.replication {
        Check::pass(
            NAME,
            format!("user {} has the REPLICATION attribute", role.name),
        )
    } else {
        Check::fail(
            NAME,
            format!(
                "user {} has neither the REPLICATION attribute nor superuser, so it cannot open \
                 a replication connection",
                role.name
            ),
            format!(
                "as a superuser: ALTER ROLE {} WITH REPLICATION; (pg_hba.conf must also allow \
                 it: replication connections to a named database match ordinary entries)",
                quote_ident(&role.name)
            ),
        )
    }
}

fn table_missing(table: &TableName, database: &str) -> Check {
    Check::fail(
        "outbox.table",
        format!("outbox table {table} does not exist in database {database}"),
        "create it (walship init-sql prints a definition) or set outbox.table to the right \
         schema.table",
    )
}

fn table_wrong_kind(table: &TableName, info: &TableInfo) -> Check {
    let kind = match info.relkind.as_str() {
        "v" => "a view",
        "m" => "a materialized view",
        "f" => "a foreign table",
        "S" => "a sequence",
        "i" | "I" => "an index",
        _ => "not a table",
    };
    Check::fail(
        "outbox.table",
        format!("{table} is {kind}; logical replication only publishes tables"),
        "set outbox.table to the table the application inserts events into",
    )
}

/// Which configured column plays which role.
struct ColumnRole<'a> {
    key: String,
    column: &'a str,
    kind: ColumnKind,
    /// A NULL in it stops walship.
    required: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    /// Becomes a key, topic part or header: its text output is used.
    Text,
    /// Becomes the record value.
    Payload,
}

/// One check per configured column: exists, has a usable type, and (for the key and the topic)
/// cannot be NULL.
fn column_checks(spec: &OutboxSpec, columns: &[ColumnInfo]) -> Vec<Check> {
    let mut roles = vec![
        ColumnRole {
            key: "id_column".into(),
            column: &spec.id,
            kind: ColumnKind::Text,
            required: false,
        },
        ColumnRole {
            key: "aggregate_type_column".into(),
            column: &spec.aggregate_type,
            kind: ColumnKind::Text,
            required: true,
        },
        ColumnRole {
            key: "aggregate_id_column".into(),
            column: &spec.aggregate_id,
            kind: ColumnKind::Text,
            required: true,
        },
        ColumnRole {
            key: "type_column".into(),
            column: &spec.event_type,
            kind: ColumnKind::Text,
            required: false,
        },
        ColumnRole {
            key: "payload_column".into(),
            column: &spec.payload,
            kind: ColumnKind::Payload,
            required: false,
        },
    ];
    for h in &spec.header_columns {
        roles.push(ColumnRole {
            key: "header_columns".into(),
            column: h,
            kind: ColumnKind::Text,
            required: false,
        });
    }
    roles
        .iter()
        .filter(|r| !r.column.is_empty())
        .map(|r| column_check(&spec.table, r, columns))
        .collect()
}

fn column_check(table: &TableName, role: &ColumnRole<'_>, columns: &[ColumnInfo]) -> Check {
    let name = format!("outbox.column.{}", role.column);
    let Some(col) = columns.iter().find(|c| c.name == role.column) else {
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        return Check::fail(
            &name,
            format!(
                "column {:?} (outbox.{}) is not in {table}; its columns are: {}",
                role.column,
                role.key,
                names.join(", ")
            ),
            format!(
                "set outbox.{} to one of those columns, or add it: ALTER TABLE {} ADD COLUMN {} …;",
                role.key,
                table.quoted(),
                quote_ident(role.column)
            ),
        );
    };
    let mut notes = Vec::new();
    let mut fixes = Vec::new();
    match role.kind {
        ColumnKind::Payload => {
            if !matches!(
                col.base_type.as_str(),
                "json" | "jsonb" | "text" | "varchar" | "bytea"
            ) {
                notes.push(format!(
                    "has type {}; walship sends its text output as the record value",
                    col.declared_type
                ));
                fixes.push("use jsonb, json, text, varchar or bytea for the payload".to_owned());
            }
        }
        ColumnKind::Text => {
            if col.base_type == "bpchar" {
                notes.push(format!(
                    "has type {}: values are blank-padded and the padding becomes part of the \
                     key, topic or header",
                    col.declared_type
                ));
                fixes.push("use text or varchar".to_owned());
            } else if !(col.category == "S"
                || col.typtype == "e"
                || matches!(col.base_type.as_str(), "uuid" | "int2" | "int4" | "int8"))
            {
                notes.push(format!(
                    "has type {}, an unusual type for outbox.{}; walship uses its text output",
                    col.declared_type, role.key
                ));
                fixes.push("use text, varchar, uuid or an integer type".to_owned());
            }
        }
    }
    if role.required && !col.not_null {
        notes.push(
            "is nullable, and a row with NULL here stops walship (the event cannot be keyed or \
             routed)"
                .to_owned(),
        );
        fixes.push(format!(
            "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL;",
            table.quoted(),
            quote_ident(role.column)
        ));
    }
    if notes.is_empty() {
        Check::pass(
            &name,
            format!(
                "{:?} (outbox.{}) is {}",
                role.column, role.key, col.declared_type
            ),
        )
    } else {
        Check::warn(
            &name,
            format!(
                "{:?} (outbox.{}) in {table} {}",
                role.column,
                role.key,
                notes.join("; it ")
            ),
            fixes.join("; "),
        )
    }
}

/// The publication exists (or can be created) and publishes the table's inserts.
fn publication_checks(
    publication: &str,
    create: bool,
    table: &TableName,
    table_info: Option<&TableInfo>,
    family: Option<&walship_postgres::OutboxFamily>,
    info: Option<&PublicationInfo>,
    role: &RoleInfo,
) -> Vec<Check> {
    const NAME: &str = "postgres.publication";
    let create_sql = format!(
        "{};",
        walship_postgres::catalog::create_publication_sql(publication, table)
    );
    let Some(info) = info else {
        if !create {
            return vec![Check::fail(
                NAME,
                format!(
                    "publication {publication:?} does not exist and postgres.create_publication \
                     is false"
                ),
                format!("run {create_sql} or set postgres.create_publication = true"),
            )];
        }
        let Some(t) = table_info else {
            return vec![Check::skip(
                NAME,
                format!(
                    "publication {publication:?} does not exist; walship creates it once the \
                     outbox table exists"
                ),
            )];
        };
        let mut missing = Vec::new();
        if !role.superuser && !t.owned_by_current_user {
            missing.push(format!(
                "it does not own {table} (owner: {}) and is not a superuser",
                t.owner
            ));
        }
        if !role.superuser && !role.can_create_in_database {
            missing.push(format!(
                "it lacks the CREATE privilege on database {}",
                role.database
            ));
        }
        if missing.is_empty() {
            return vec![Check::pass(
                NAME,
                format!(
                    "publication {publication:?} does not exist yet; walship will create it as {} \
                     ({create_sql})",
                    role.name
                ),
            )];
        }
        return vec![Check::fail(
            NAME,
            format!(
                "publication {publication:?} does not exist and user {} cannot create it: {}",
                role.name,
                missing.join(", and ")
            ),
            format!(
                "as the table owner or a superuser run {create_sql} and set \
                 postgres.create_publication = false"
            ),
        )];
    };
    let mut checks = Vec::new();
    if family.map_or_else(|| info.includes(table), |f| info.publishes_outbox(f)) {
        checks.push(Check::pass(
            NAME,
            format!(
                "publication {publication:?} includes {table}{}",
                if info.all_tables {
                    " (FOR ALL TABLES)"
                } else {
                    ""
                }
            ),
        ));
        if family.is_some_and(|f| f.partitioned) && !info.via_partition_root {
            checks.push(Check::warn(
                "postgres.publication.partition_root",
                format!(
                    "publication {publication:?} publishes the partitioned outbox {table} without \
                     publish_via_partition_root: rows arrive under each partition's name (walship \
                     maps them to the outbox, with a catalog lookup for partitions attached later)"
                ),
                format!(
                    "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
                    quote_ident(publication)
                ),
            ));
        }
    } else {
        let partitioned = table_info.is_some_and(|t| t.relkind == "p");
        let fix = if partitioned && !info.via_partition_root {
            format!(
                "ALTER PUBLICATION {p} ADD TABLE {t}; ALTER PUBLICATION {p} SET \
                 (publish_via_partition_root = true); so events carry the parent table's name",
                p = quote_ident(publication),
                t = table.quoted()
            )
        } else {
            format!(
                "ALTER PUBLICATION {} ADD TABLE {};",
                quote_ident(publication),
                table.quoted()
            )
        };
        checks.push(Check::fail(
            NAME,
            format!(
                "publication {publication:?} does not include the outbox table {table} (it \
                 publishes: {}), so no event would ever arrive",
                info.tables_text()
            ),
            fix,
        ));
    }
    if !info.publishes_insert {
        checks.push(Check::fail(
            "postgres.publication.inserts",
            format!(
                "publication {publication:?} does not publish inserts, so no outbox row would \
                 arrive"
            ),
            format!(
                "ALTER PUBLICATION {} SET (publish = 'insert');",
                quote_ident(publication)
            ),
        ));
    }
    checks
}

/// The slot: exists or can be created; pgoutput; this database; WAL kept; not taken; lag.
pub fn slot_checks(
    slot: &str,
    create: bool,
    state: Option<&SlotState>,
    database: &str,
    current_wal_lsn: Option<Lsn>,
) -> Vec<Check> {
    const NAME: &str = "postgres.slot";
    let Some(state) = state else {
        return vec![if create {
            Check::pass(
                NAME,
                format!(
                    "slot {slot:?} does not exist yet; walship creates it (pgoutput) on its first \
                     start and captures transactions committed from then on"
                ),
            )
        } else {
            Check::fail(
                NAME,
                format!(
                    "replication slot {slot:?} does not exist and postgres.create_slot is false"
                ),
                format!(
                    "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput'); or set \
                     postgres.create_slot = true"
                ),
            )
        }];
    };
    let lsn_text = |l: Option<Lsn>| l.map_or_else(|| "unknown".to_owned(), |l| l.to_string());
    let mut checks = Vec::new();
    let plugin = state.plugin.as_deref().unwrap_or("(none: physical slot)");
    if plugin != "pgoutput" {
        checks.push(Check::fail(
            NAME,
            format!("slot {slot:?} uses output plugin {plugin:?}; walship needs pgoutput"),
            format!(
                "set postgres.slot to another name, or drop this slot if nothing uses it: SELECT \
                 pg_drop_replication_slot('{slot}');"
            ),
        ));
    } else if state.database.as_deref() != Some(database) {
        checks.push(Check::fail(
            NAME,
            format!(
                "slot {slot:?} belongs to database {}, but postgres.url connects to {database}",
                state.database.as_deref().unwrap_or("(none)")
            ),
            "set postgres.slot to a slot of this database (or a new name), or point postgres.url \
             at the slot's database",
        ));
    } else {
        checks.push(Check::pass(
            NAME,
            format!("slot {slot:?} exists (pgoutput, database {database})"),
        ));
    }

    const WAL: &str = "postgres.slot.wal_status";
    match state.wal_status.as_deref() {
        Some("lost") => checks.push(Check::fail(
            WAL,
            format!(
                "slot {slot:?} is invalidated ({}, confirmed_flush_lsn {}): {}, so events \
                 committed after the confirmed position may never reach Kafka",
                state.lost_description(),
                lsn_text(state.confirmed_flush_lsn),
                state.invalidation_cause().0
            ),
            format!(
                "reconcile the outbox table with Kafka (re-publish events after the confirmed \
                 position), then SELECT pg_drop_replication_slot('{slot}'); and start walship to \
                 create a new slot; {}",
                state.invalidation_cause().1
            ),
        )),
        Some("unreserved") => checks.push(Check::warn(
            WAL,
            format!(
                "slot {slot:?} is at risk (wal_status = unreserved): the WAL it needs is beyond \
                 max_wal_size and will be removed at the next checkpoint unless walship catches up"
            ),
            "start walship (or let it catch up) now; raise max_slot_wal_keep_size",
        )),
        other => checks.push(Check::pass(
            WAL,
            format!("wal_status = {}", other.unwrap_or("unknown")),
        )),
    }

    const ACTIVE: &str = "postgres.slot.consumer";
    match state.active_pid {
        Some(pid) => checks.push(Check::warn(
            ACTIVE,
            format!(
                "slot {slot:?} is in use by walsender pid {pid}: another walship (or another \
                 consumer) is streaming from it, and a second walship would retry until it \
                 disconnects"
            ),
            format!(
                "if that is this walship, nothing to do; otherwise stop the other consumer \
                 (SELECT application_name, client_addr FROM pg_stat_replication WHERE pid = {pid}; \
                 then SELECT pg_terminate_backend({pid});)"
            ),
        )),
        None => checks.push(Check::pass(ACTIVE, "no other consumer is using the slot")),
    }

    const LAG: &str = "postgres.slot.lag";
    match (current_wal_lsn, state.confirmed_flush_lsn) {
        (Some(current), Some(confirmed)) => {
            let lag = preflight::lag_bytes(current, confirmed);
            let message = format!(
                "confirmed_flush_lsn {confirmed} is {} behind pg_current_wal_lsn() {current}",
                human_bytes(lag)
            );
            if lag > LAG_WARN_BYTES {
                checks.push(Check::warn(
                    LAG,
                    message,
                    "start walship if it is not running; if it is, look at its logs for broker \
                     problems (the slot holds this much WAL on the server)",
                ));
            } else {
                checks.push(Check::pass(LAG, message));
            }
        }
        _ => checks.push(Check::skip(LAG, "the slot has no confirmed position")),
    }
    checks
}

/// `1234 bytes` or `1234567 bytes (1.2 MiB)`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{n} bytes ({v:.1} {})", UNITS[unit])
}

/// The Kafka checks: broker metadata, then topics.
async fn kafka_checks(config: &Config, types: &AggregateTypes, checks: &mut Vec<Check>) {
    const BROKER: &str = "kafka.broker";
    let settings = match config.sink_settings() {
        Ok(s) => s,
        Err(e) => {
            checks.push(Check::fail(
                BROKER,
                e.to_string(),
                "set the environment variables or files named in kafka.secret_env / \
                 kafka.secret_files",
            ));
            checks.push(Check::skip(
                "kafka.topics",
                "the Kafka settings are incomplete",
            ));
            return;
        }
    };
    match probe::probe(&settings, KAFKA_TIMEOUT).await {
        Ok(cluster) => {
            checks.push(Check::pass(
                BROKER,
                format!(
                    "reached {} ({} broker{}: {})",
                    settings.brokers,
                    cluster.brokers.len(),
                    if cluster.brokers.len() == 1 { "" } else { "s" },
                    cluster
                        .brokers
                        .values()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            checks.extend(topic_checks(config, types, &cluster));
            checks.extend(dead_letter_check(config, &cluster));
        }
        Err(e @ probe::ProbeError::Config { .. }) => {
            checks.push(Check::fail(
                BROKER,
                e.to_string(),
                "fix or remove the offending property in [kafka.librdkafka] (see librdkafka's \
                 CONFIGURATION.md)",
            ));
            checks.push(Check::skip(
                "kafka.topics",
                "the Kafka client cannot be created",
            ));
        }
        Err(e) => {
            checks.push(Check::fail(
                BROKER,
                format!("cannot reach Kafka: {e}"),
                "check kafka.brokers (host:port as seen from this machine), that the brokers \
                 run, that their advertised listeners resolve from here, and the security \
                 settings (security.protocol, sasl.*, ssl.* in [kafka.librdkafka] / secret_env)",
            ));
            checks.push(Check::skip(
                "kafka.topics",
                "Kafka is not reachable (see kafka.broker)",
            ));
        }
    }
}

/// Aggregate types found in the outbox table that `outbox.allowed_aggregate_types` or
/// `outbox.max_topics` would refuse: a failure under `on_bad_row = "fail"` (walship would stop
/// at the first such row), a warning under `"dead-letter"`.
fn limit_checks(config: &Config, refused: &[String], beyond: &[String]) -> Vec<Check> {
    let outbox = &config.outbox;
    let (fail, outcome) = match outbox.on_bad_row {
        BadRowPolicy::Fail => (true, "walship stops at the first such row"),
        BadRowPolicy::DeadLetter => (false, "walship dead-letters those rows"),
    };
    let check = |name: &str, message: String, fix: String| {
        if fail {
            Check::fail(name, message, fix)
        } else {
            Check::warn(name, message, fix)
        }
    };
    let mut checks = Vec::new();
    if !refused.is_empty() {
        checks.push(check(
            "kafka.topics.allowed",
            format!(
                "aggregate types {} in {} are not in outbox.allowed_aggregate_types; {outcome}",
                quoted_list(refused),
                outbox.table
            ),
            "add the legitimate ones to outbox.allowed_aggregate_types, and fix or delete the \
             other rows before walship reads them"
                .to_owned(),
        ));
    }
    if !beyond.is_empty() {
        checks.push(check(
            "kafka.topics.bound",
            format!(
                "the outbox table {} has aggregate types for more than outbox.max_topics = {} \
                 topics; {} would be refused ({outcome})",
                outbox.table,
                outbox.max_topics,
                quoted_list(beyond)
            ),
            format!(
                "raise outbox.max_topics above {} (0 = no bound) if this many topics are \
                 legitimate, or fix the rows' aggregate types",
                outbox.max_topics
            ),
        ));
    }
    checks
}

/// The topics walship will write to exist, or can be created.
fn topic_checks(config: &Config, types: &AggregateTypes, cluster: &ClusterInfo) -> Vec<Check> {
    const NAME: &str = "kafka.topics";
    let template = &config.outbox.topic;
    let kafka = &config.kafka;
    let mut checks = Vec::new();
    let topics: Vec<String> = match types {
        AggregateTypes::NotUsed => vec![template.clone()],
        AggregateTypes::Unknown(why) => {
            return vec![Check::warn(
                NAME,
                format!(
                    "topics come from {template:?} per aggregate type, and the aggregate types \
                     could not be listed: {why}"
                ),
                if kafka.create_topics {
                    "walship creates missing topics (kafka.create_topics = true); fix the cause \
                     above to have them checked"
                        .to_owned()
                } else {
                    format!(
                        "kafka.create_topics is false: make sure {template:?} exists for every \
                         aggregate type"
                    )
                },
            )];
        }
        AggregateTypes::Found(found) if found.is_empty() => {
            let message = format!(
                "the outbox table has no rows, so no aggregate type (and topic from \
                 {template:?}) can be checked yet"
            );
            return vec![if kafka.create_topics {
                Check::pass(
                    NAME,
                    format!("{message}; walship creates each topic on first use"),
                )
            } else {
                Check::warn(
                    NAME,
                    message,
                    format!(
                        "kafka.create_topics is false: create {template:?} for every aggregate \
                         type before events arrive, or set kafka.create_topics = true"
                    ),
                )
            }];
        }
        AggregateTypes::Found(found) => {
            // The run's router, with outbox.allowed_aggregate_types and outbox.max_topics.
            let mut router = match config.topic_router() {
                Ok(r) => r,
                Err(e) => return vec![Check::fail(NAME, e.to_string(), "fix outbox.topic")],
            };
            let mut topics = Vec::new();
            let mut illegal = Vec::new();
            let mut refused = Vec::new();
            let mut beyond = Vec::new();
            for t in found {
                match router.route(Some(t.as_bytes())) {
                    Ok(topic) => topics.push(topic.to_string()),
                    Err(RouteError::NotAllowed { .. }) => refused.push(t.clone()),
                    Err(RouteError::TooManyTopics { .. }) => beyond.push(t.clone()),
                    Err(_) => illegal.push(t.clone()),
                }
            }
            checks.extend(limit_checks(config, &refused, &beyond));
            if !illegal.is_empty() {
                checks.push(Check::fail(
                    "kafka.topics.names",
                    format!(
                        "aggregate types {} in {} make illegal topic names from {template:?}; \
                         walship stops at the first such row",
                        quoted_list(&illegal),
                        config.outbox.table
                    ),
                    "Kafka topic names are 1-249 characters of letters, digits, '.', '_' and \
                     '-': fix those rows' aggregate type (or delete them before walship reads \
                     them)",
                ));
            }
            topics
        }
    };
    let (present, absent): (Vec<&String>, Vec<&String>) =
        topics.iter().partition(|t| cluster.has_topic(t));
    let errored: Vec<String> = absent
        .iter()
        .filter_map(|t| {
            let e = cluster.topics.get(t.as_str())?.error.as_ref()?;
            Some(format!("{t} ({e})"))
        })
        .collect();
    let missing: Vec<&String> = absent
        .iter()
        .copied()
        .filter(|t| {
            cluster
                .topics
                .get(t.as_str())
                .is_none_or(|i| i.error.is_none())
        })
        .collect();
    let sample_note = match types {
        AggregateTypes::Found(f) if f.len() as i64 >= AGGREGATE_TYPE_SAMPLE => {
            format!(" (the first {AGGREGATE_TYPE_SAMPLE} aggregate types)")
        }
        _ => String::new(),
    };
    if !errored.is_empty() {
        checks.push(Check::fail(
            "kafka.topics.access",
            format!("the broker reports errors for {}", errored.join(", ")),
            format!(
                "grant client {:?} Describe and Write on those topics (and Create when \
                 kafka.create_topics = true)",
                kafka.client_id
            ),
        ));
    }
    let rf_too_high = replication_factor_too_high(kafka, cluster);
    let mut message = if present.is_empty() {
        String::new()
    } else {
        format!("exist: {}", quoted_list(&present))
    };
    if missing.is_empty() {
        if !present.is_empty() {
            checks.push(Check::pass(NAME, format!("topics {message}{sample_note}")));
        }
    } else if !kafka.create_topics {
        if !message.is_empty() {
            message.push_str("; ");
        }
        checks.push(Check::fail(
            NAME,
            format!(
                "topics {message}missing: {}{sample_note}, and kafka.create_topics is false",
                quoted_list(&missing)
            ),
            format!(
                "create them (e.g. kafka-topics.sh --create --topic NAME --partitions {} \
                 --replication-factor {}) or set kafka.create_topics = true",
                kafka.topic_partitions, kafka.topic_replication_factor
            ),
        ));
    } else if rf_too_high {
        checks.push(Check::fail(
            NAME,
            format!(
                "topics {} are missing and walship would create them with replication factor \
                 {}, but the cluster has {} broker{}",
                quoted_list(&missing),
                kafka.topic_replication_factor,
                cluster.brokers.len(),
                if cluster.brokers.len() == 1 { "" } else { "s" }
            ),
            format!(
                "set kafka.topic_replication_factor to at most {}, or create the topics yourself",
                cluster.brokers.len()
            ),
        ));
    } else {
        if !message.is_empty() {
            message.push_str("; ");
        }
        checks.push(Check::pass(
            NAME,
            format!(
                "topics {message}missing, created by walship on first use ({} partitions, \
                 replication factor {}): {}{sample_note}",
                kafka.topic_partitions,
                kafka.topic_replication_factor,
                quoted_list(&missing)
            ),
        ));
    }
    checks
}

/// True when topics walship creates would ask for more replicas than the cluster has brokers
/// (-1, the broker's default, never does).
fn replication_factor_too_high(kafka: &crate::config::KafkaConfig, cluster: &ClusterInfo) -> bool {
    usize::try_from(kafka.topic_replication_factor).is_ok_and(|rf| rf > cluster.brokers.len())
}

/// With `on_bad_row = "dead-letter"`: the dead-letter topic must exist or be creatable, or
/// the first bad row would stop walship instead of being set aside.
fn dead_letter_check(config: &Config, cluster: &ClusterInfo) -> Option<Check> {
    const NAME: &str = "kafka.dead_letter_topic";
    if config.outbox.on_bad_row != crate::config::BadRowPolicy::DeadLetter {
        return None;
    }
    let topic = &config.outbox.dead_letter_topic;
    let kafka = &config.kafka;
    let error = cluster.topics.get(topic).and_then(|t| t.error.as_ref());
    let rf_too_high = replication_factor_too_high(kafka, cluster);
    Some(if cluster.has_topic(topic) {
        Check::pass(NAME, format!("dead-letter topic {topic:?} exists"))
    } else if let Some(e) = error {
        Check::fail(
            NAME,
            format!("the broker reports an error for dead-letter topic {topic:?}: {e}"),
            format!(
                "grant client {:?} Describe and Write on it (and Create when \
                 kafka.create_topics = true)",
                kafka.client_id
            ),
        )
    } else if kafka.create_topics && rf_too_high {
        Check::fail(
            NAME,
            format!(
                "dead-letter topic {topic:?} is missing and walship would create it with \
                 replication factor {}, but the cluster has {} broker(s)",
                kafka.topic_replication_factor,
                cluster.brokers.len()
            ),
            format!(
                "set kafka.topic_replication_factor to at most {}, or create the topic yourself",
                cluster.brokers.len()
            ),
        )
    } else if kafka.create_topics {
        Check::pass(
            NAME,
            format!(
                "dead-letter topic {topic:?} is missing; walship creates it for the first bad row"
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!(
                "dead-letter topic {topic:?} is missing and kafka.create_topics is false: the \
                 first bad row would stop walship instead of being dead-lettered"
            ),
            format!(
                "create it (e.g. kafka-topics.sh --create --topic {topic} --partitions {} \
                 --replication-factor {}) or set kafka.create_topics = true",
                config.kafka.topic_partitions, config.kafka.topic_replication_factor
            ),
        )
    })
}

fn quoted_list(items: &[impl AsRef<str>]) -> String {
    items
        .iter()
        .map(|s| format!("{:?}", s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `walship check`: exit 0 when nothing failed, 1 when something did, 2 for an unreadable or
/// invalid configuration.
pub fn main(path: &Path, json: bool, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let config = match crate::cli::load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let report = runtime.block_on(run_checks(&config));
    let human = || {
        format!(
            "walship check ({})\n{}",
            path.display(),
            report.render_human()
        )
    };
    crate::cli::print_report(&report, json, human, report.ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_toml(
            &format!(
                "[postgres]\nurl = \"postgres://walship@db:5432/app\"\n[kafka]\nbrokers = \"k:9092\"\n{extra}"
            ),
            std::iter::empty(),
            "test",
        )
        .unwrap()
    }

    fn col(name: &str, base: &str, not_null: bool) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            declared_type: base.into(),
            base_type: base.into(),
            typtype: "b".into(),
            category: match base {
                "text" | "varchar" | "bpchar" => "S".into(),
                "int4" | "int8" | "float8" => "N".into(),
                _ => "U".into(),
            },
            not_null,
        }
    }

    fn role(replication: bool, superuser: bool) -> RoleInfo {
        RoleInfo {
            name: "nrep".into(),
            replication,
            superuser,
            can_create_in_database: false,
            database: "app".into(),
        }
    }

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
        };
        let [slots, senders] = capacity_checks(&settings, full, Some(&ours));
        assert_eq!(slots.status, Status::Pass, "{slots:?}");
        assert_eq!(senders.status, Status::Pass, "{senders:?}");
    }

    #[test]
    fn columns_missing_odd_and_nullable() {
        let c = config("");
        let spec = c.outbox_spec();
        let cols = vec![
            col("id", "uuid", true),
            col("aggregatetype", "bpchar", true),
            col("aggregateid", "text", false),
            col("type", "float8", true),
            col("payload", "xml", false),
        ];
        let checks = column_checks(&spec, &cols);
        let by = |n: &str| checks.iter().find(|c| c.name == n).unwrap().clone();
        assert_eq!(by("outbox.column.id").status, Status::Pass);
        assert_eq!(by("outbox.column.aggregatetype").status, Status::Warn);
        let agg = by("outbox.column.aggregateid");
        assert_eq!(agg.status, Status::Warn);
        assert!(agg.fix.unwrap().contains("SET NOT NULL"));
        assert_eq!(by("outbox.column.type").status, Status::Warn);
        assert_eq!(by("outbox.column.payload").status, Status::Warn);

        let checks = column_checks(&spec, &cols[..4]);
        let p = checks
            .iter()
            .find(|c| c.name == "outbox.column.payload")
            .unwrap();
        assert_eq!(p.status, Status::Fail);
        assert!(p.message.contains("outbox.payload_column"), "{p:?}");
    }

    #[test]
    fn missing_publication_without_create_gives_create_statement() {
        let t = TableName::parse("outbox");
        let c = publication_checks("pub", false, &t, None, None, None, &role(true, false));
        assert_eq!(c[0].status, Status::Fail);
        assert!(
            c[0].fix
                .as_deref()
                .unwrap()
                .contains("CREATE PUBLICATION \"pub\" FOR TABLE \"public\".\"outbox\""),
            "{c:?}"
        );
        let info = TableInfo {
            oid: 1,
            relkind: "r".into(),
            owner: "postgres".into(),
            owned_by_current_user: false,
            can_select: true,
        };
        let c = publication_checks("pub", true, &t, Some(&info), None, None, &role(true, false));
        assert_eq!(c[0].status, Status::Fail, "non-owner cannot create: {c:?}");
        assert!(c[0].message.contains("owner: postgres"), "{c:?}");
    }

    #[test]
    fn publication_without_table_or_inserts_fails_twice() {
        let t = TableName::parse("outbox");
        let info = PublicationInfo {
            name: "pub".into(),
            all_tables: false,
            publishes_insert: false,
            via_partition_root: false,
            tables: vec![TableName::parse("other")],
        };
        let c = publication_checks("pub", true, &t, None, None, Some(&info), &role(false, true));
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.status == Status::Fail));
        assert!(c[0].fix.as_deref().unwrap().contains("ADD TABLE"));
        assert!(c[1].fix.as_deref().unwrap().contains("publish = 'insert'"));
    }

    #[test]
    fn slot_lost_fails_unreserved_and_active_warn() {
        let mut s = SlotState {
            name: "w".into(),
            plugin: Some("pgoutput".into()),
            database: Some("app".into()),
            confirmed_flush_lsn: Some(Lsn(100)),
            restart_lsn: Some(Lsn(50)),
            wal_status: Some("lost".into()),
            invalidation_reason: None,
            active_pid: None,
        };
        let c = slot_checks("w", true, Some(&s), "app", Some(Lsn(300)));
        let by = |c: &[Check], n: &str| c.iter().find(|c| c.name == n).unwrap().clone();
        let lost = by(&c, "postgres.slot.wal_status");
        assert_eq!(lost.status, Status::Fail);
        assert!(lost.fix.unwrap().contains("pg_drop_replication_slot('w')"));
        // 18's idle_replication_slot_timeout: the cause and the setting named, not the WAL size.
        s.invalidation_reason = Some("idle_timeout".into());
        let c = slot_checks("w", true, Some(&s), "app", Some(Lsn(300)));
        let idle = by(&c, "postgres.slot.wal_status");
        assert!(
            idle.message.contains("invalidation_reason = idle_timeout"),
            "{idle:?}"
        );
        let fix = idle.fix.unwrap();
        assert!(
            fix.contains("idle_replication_slot_timeout")
                && !fix.contains("max_slot_wal_keep_size")
        );
        s.invalidation_reason = None;
        assert!(by(&c, "postgres.slot.lag").message.contains("200 bytes"));
        s.wal_status = Some("unreserved".into());
        s.active_pid = Some(42);
        let c = slot_checks("w", true, Some(&s), "app", Some(Lsn(100)));
        assert_eq!(by(&c, "postgres.slot.wal_status").status, Status::Warn);
        let active = by(&c, "postgres.slot.consumer");
        assert_eq!(active.status, Status::Warn);
        assert!(active.message.contains("42"));
        assert_eq!(by(&c, "postgres.slot").status, Status::Pass);
        let c = slot_checks("w", true, Some(&s), "other", None);
        assert_eq!(by(&c, "postgres.slot").status, Status::Fail);
        let c = slot_checks("w", false, None, "app", None);
        assert_eq!(c[0].status, Status::Fail);
        assert!(
            c[0].fix
                .as_deref()
                .unwrap()
                .contains("pg_create_logical_replication_slot")
        );
    }

    #[test]
    fn dead_letter_topic_is_checked_only_with_that_policy() {
        let mut cluster = ClusterInfo::default();
        cluster.brokers.insert(1, "k:9092".into());
        assert!(dead_letter_check(&config(""), &cluster).is_none());
        let dead_letter = "[outbox]\non_bad_row = \"dead-letter\"\ndead_letter_topic = \"dlq\"\n";
        let creates = dead_letter_check(&config(dead_letter), &cluster).unwrap();
        assert_eq!(creates.status, Status::Pass, "{creates:?}");
        let fixed = config(&format!("create_topics = false\n{dead_letter}"));
        let missing = dead_letter_check(&fixed, &cluster).unwrap();
        assert_eq!(missing.status, Status::Fail);
        assert!(
            missing.message.contains("\"dlq\"")
                && missing
                    .fix
                    .as_deref()
                    .is_some_and(|f| f.contains("--topic dlq")),
            "{missing:?}"
        );
        cluster.topics.insert(
            "dlq".into(),
            walship_kafka::probe::TopicInfo {
                partitions: 1,
                error: None,
            },
        );
        let exists = dead_letter_check(&fixed, &cluster).unwrap();
        assert_eq!(exists.status, Status::Pass, "{exists:?}");
        let too_many = config(&format!("topic_replication_factor = 3\n{dead_letter}"));
        cluster.topics.clear();
        let rf = dead_letter_check(&too_many, &cluster).unwrap();
        assert_eq!(rf.status, Status::Fail, "{rf:?}");
        cluster.topics.insert(
            "dlq".into(),
            walship_kafka::probe::TopicInfo {
                partitions: 0,
                error: Some("TopicAuthorizationFailed".into()),
            },
        );
        let denied = dead_letter_check(&config(dead_letter), &cluster).unwrap();
        assert_eq!(denied.status, Status::Fail, "{denied:?}");
        assert!(
            denied.message.contains("TopicAuthorizationFailed"),
            "{denied:?}"
        );
    }

    #[test]
    fn topics_fixed_aggregate_and_missing() {
        let mut cluster = ClusterInfo::default();
        cluster.brokers.insert(1, "k:9092".into());
        cluster.topics.insert(
            "outbox.event.order".into(),
            walship_kafka::probe::TopicInfo {
                partitions: 3,
                error: None,
            },
        );
        let c = config("[outbox]\ntopic = \"events\"\n");
        let checks = topic_checks(&c, &AggregateTypes::NotUsed, &cluster);
        assert_eq!(
            checks[0].status,
            Status::Pass,
            "create_topics = true: {checks:?}"
        );
        let c = Config::from_toml(
            "[postgres]\nurl = \"postgres://w@db/app\"\n[kafka]\nbrokers = \"k:9092\"\ncreate_topics = false\n",
            std::iter::empty(),
            "test",
        )
        .unwrap();
        let types =
            AggregateTypes::Found(vec!["order".into(), "customer".into(), "bad name".into()]);
        let checks = topic_checks(&c, &types, &cluster);
        let missing = checks.iter().find(|c| c.name == "kafka.topics").unwrap();
        assert_eq!(missing.status, Status::Fail);
        assert!(
            missing.message.contains("\"outbox.event.customer\"")
                && missing.message.contains("exist: \"outbox.event.order\""),
            "{missing:?}"
        );
        let names = checks
            .iter()
            .find(|c| c.name == "kafka.topics.names")
            .unwrap();
        assert!(names.message.contains("\"bad name\""), "{names:?}");
    }

    #[test]
    fn topics_the_limits_would_refuse_are_named() {
        let mut cluster = ClusterInfo::default();
        cluster.brokers.insert(1, "k:9092".into());
        let types = AggregateTypes::Found(vec!["order".into(), "customer".into(), "x".into()]);
        let find = |checks: &[Check], name: &str| {
            checks
                .iter()
                .find(|c| c.name == name)
                .cloned()
                .unwrap_or_else(|| panic!("no {name} in {checks:?}"))
        };
        let fix = |c: &Check| c.fix.clone().unwrap_or_default();

        let c = config("[outbox]\nallowed_aggregate_types = [\"order\", \"customer\"]\n");
        let checks = topic_checks(&c, &types, &cluster);
        let allowed = find(&checks, "kafka.topics.allowed");
        assert_eq!(allowed.status, Status::Fail, "{allowed:?}");
        assert!(
            allowed.message.contains("\"x\"")
                && !allowed.message.contains("\"order\"")
                && fix(&allowed).contains("outbox.allowed_aggregate_types"),
            "{allowed:?}"
        );
        assert!(checks.iter().all(|c| c.name != "kafka.topics.bound"));

        let c = config("[outbox]\nmax_topics = 1\n");
        let checks = topic_checks(&c, &types, &cluster);
        let bound = find(&checks, "kafka.topics.bound");
        assert_eq!(bound.status, Status::Fail, "{bound:?}");
        assert!(
            bound.message.contains("\"customer\", \"x\"")
                && bound.message.contains("max_topics = 1")
                && fix(&bound).contains("outbox.max_topics"),
            "{bound:?}"
        );

        let c = config("[outbox]\nmax_topics = 1\non_bad_row = \"dead-letter\"\n");
        let checks = topic_checks(&c, &types, &cluster);
        let bound = find(&checks, "kafka.topics.bound");
        assert_eq!(bound.status, Status::Warn, "{bound:?}");
        assert!(bound.message.contains("dead-letters"), "{bound:?}");
    }

    #[test]
    fn report_counts_and_renders_every_fix() {
        let r = Report::new(vec![
            Check::pass("a", "fine"),
            Check::fail("bb", "broken", "repair it"),
            Check::warn("c", "odd", "look at it"),
            Check::skip("d", "because"),
        ]);
        assert!(!r.ok);
        assert_eq!(
            r.summary,
            Summary {
                pass: 1,
                warn: 1,
                fail: 1,
                skip: 1
            }
        );
        let text = r.render_human();
        assert!(
            text.contains("✗ bb  broken\n      fix: repair it"),
            "{text}"
        );
        assert!(
            text.contains("1 passed, 1 warning, 1 failed, 1 skipped"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["checks"][1]["fix"], "repair it");
        assert_eq!(json["ok"], false);
    }

    #[test]
    fn error_chain_keeps_the_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("error connecting to server")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        ));
        assert_eq!(
            error_chain(&e),
            "error connecting to server: Connection refused"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(2048), "2048 bytes (2.0 KiB)");
        assert_eq!(human_bytes(3 << 30), "3221225472 bytes (3.0 GiB)");
    }
}
