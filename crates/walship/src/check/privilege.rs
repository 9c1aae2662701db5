//! What walship's protections need of the database's roles, in `walship check`: the slot history
//! walship's role must write (G6: a dropped slot is never re-created silently), the heartbeat
//! it must be allowed to emit, and, with `outbox.message_prefixes`, which roles may emit
//! logical messages (each could publish events, or stop the pipeline with one non-transactional
//! message under `on_bad_row = "fail"`).
//!
//! Invariant: a protection that is off is a warning that names it, says why, and gives the
//! statement that turns it on; the verdicts are the catalog's rules
//! (`walship_postgres::catalog::privilege`), applied by pure functions tested without a server.

use tokio_postgres::Client;
use walship_postgres::TableName;
use walship_postgres::catalog::{self, EmitAccess, Unprotected};

use super::report::{Check, quoted_list};
use crate::config::Config;
use crate::config::settings::SourceParts;

const HISTORY: &str = "postgres.slot_history_table";
const HEARTBEAT: &str = "postgres.heartbeat_interval_ms";
const WRITERS: &str = "outbox.message_writers";

/// The privilege checks for `role` (the connected user); `slot_exists` says whether the slot
/// is there already.
pub(super) async fn privilege_checks(
    config: &Config,
    source: &SourceParts,
    client: &Client,
    role: &str,
    slot_exists: bool,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let history = &source.history;
    let facts = match (&history.table, config.postgres.create_slot) {
        (Some(table), true) => {
            let access = catalog::history_access(client, table).await;
            let recorded = history.created(client, &config.postgres.slot).await;
            match (access, recorded) {
                (Ok(access), Ok(recorded)) => {
                    Some(Ok((access.problem(table, role), recorded.is_some())))
                }
                (Err(e), _) | (_, Err(e)) => Some(Err(e)),
            }
        }
        _ => None,
    };
    checks.push(match facts {
        Some(Err(e)) => Check::warn(
            HISTORY,
            format!(
                "could not check the slot history: {}",
                walship_postgres::error::error_chain(&e)
            ),
            "make sure the configured user can read the system catalogs",
        ),
        Some(Ok((problem, recorded))) => history_check(
            &config.postgres.slot,
            true,
            history.table.as_ref(),
            slot_exists,
            problem,
            recorded,
        ),
        None => history_check(
            &config.postgres.slot,
            config.postgres.create_slot,
            history.table.as_ref(),
            slot_exists,
            None,
            false,
        ),
    });

    let heartbeat = config.postgres.heartbeat_interval_ms > 0;
    let prefixes = &config.outbox.message_prefixes;
    if heartbeat || !prefixes.is_empty() {
        match catalog::emit_access(client).await {
            Ok(access) => {
                if heartbeat {
                    checks.push(heartbeat_check(role, &access));
                }
                checks.extend(writers_check(
                    prefixes,
                    &config.outbox.message_writers,
                    role,
                    heartbeat,
                    &access,
                ));
            }
            Err(e) => checks.push(Check::warn(
                if heartbeat { HEARTBEAT } else { WRITERS },
                format!(
                    "could not read who may execute pg_logical_emit_message: {}",
                    walship_postgres::error::error_chain(&e)
                ),
                "make sure the configured user can read the system catalogs",
            )),
        }
    }
    checks
}

/// The slot history: whether it protects the slot from being re-created after a drop.
pub fn history_check(
    slot: &str,
    create_slot: bool,
    table: Option<&TableName>,
    slot_exists: bool,
    problem: Option<Unprotected>,
    recorded: bool,
) -> Check {
    if !create_slot {
        return Check::pass(
            HISTORY,
            "postgres.create_slot = false: walship never creates a slot, so a dropped one is never \
             re-created",
        );
    }
    let Some(table) = table else {
        return Check::warn(
            HISTORY,
            "postgres.slot_history_table is empty, so G6's protection against re-creating a \
             dropped slot is off: if the slot were dropped, walship would create a new one and \
             silently skip every event committed in between",
            "set postgres.slot_history_table = \"walship_slots\" (the default), or \
             postgres.create_slot = false once the slot exists",
        );
    };
    if let Some(off) = problem {
        return Check::warn(HISTORY, off.message, off.fix);
    }
    if slot_exists && !recorded {
        return Check::warn(
            HISTORY,
            format!(
                "slot {slot:?} is not recorded in {table} (created by hand, or while walship \
                 could not write the table), so G6's protection is off for it: if it were \
                 dropped, walship would create a new one and silently skip every event committed \
                 in between"
            ),
            format!(
                "INSERT INTO {} (slot_name) VALUES ('{}') ON CONFLICT DO NOTHING; or set \
                 postgres.create_slot = false",
                table.quoted(),
                slot.replace('\'', "''")
            ),
        );
    }
    Check::pass(
        HISTORY,
        if slot_exists {
            format!(
                "slot {slot:?} is recorded in {table}: walship refuses to re-create it if it is dropped"
            )
        } else {
            format!(
                "walship can record the slot in {table} when it creates it, and then refuses to \
                 re-create it if it is dropped"
            )
        },
    )
}

/// The heartbeat needs EXECUTE on `pg_logical_emit_message`.
pub fn heartbeat_check(role: &str, access: &EmitAccess) -> Check {
    if access.current_user_can_heartbeat {
        return Check::pass(
            HEARTBEAT,
            format!("user {role} may execute pg_logical_emit_message for the heartbeat"),
        );
    }
    Check::warn(
        HEARTBEAT,
        format!(
            "user {role} may not execute pg_logical_emit_message, so the heartbeat fails (each \
             attempt is logged) and a slot whose publication sees no traffic on a busy server \
             holds WAL"
        ),
        format!(
            "{} or set postgres.heartbeat_interval_ms = 0",
            catalog::heartbeat_grant(&access.forms, role)
        ),
    )
}

/// With message prefixes: only the writers (and walship, for its heartbeat) should be able to
/// emit logical messages. `None` when message mode is off.
pub fn writers_check(
    prefixes: &[String],
    writers: &[String],
    role: &str,
    heartbeat: bool,
    access: &EmitAccess,
) -> Option<Check> {
    if prefixes.is_empty() {
        return None;
    }
    let risk = format!(
        "can publish events with prefix {}, or stop the pipeline with one non-transactional \
         message (on_bad_row = \"fail\")",
        quoted_list(prefixes)
    );
    let walship = heartbeat.then_some(role);
    if access.public {
        return Some(Check::warn(
            WRITERS,
            format!(
                "every role may execute pg_logical_emit_message (PostgreSQL grants it to PUBLIC): \
                 any role that can connect to this database {risk}"
            ),
            format!(
                "in this database: {} and list the roles that write events in \
                 outbox.message_writers",
                catalog::emit_grants(&access.forms, writers, walship)
            ),
        ));
    }
    let others: Vec<&String> = access
        .login_roles
        .iter()
        .filter(|r| !writers.contains(r) && r.as_str() != role)
        .collect();
    if !others.is_empty() {
        return Some(Check::warn(
            WRITERS,
            format!(
                "login roles other than outbox.message_writers ({}) and walship's may execute \
                 pg_logical_emit_message: {}; each {risk}",
                if writers.is_empty() {
                    "none listed".to_owned()
                } else {
                    quoted_list(writers)
                },
                quoted_list(&others)
            ),
            format!(
                "revoke EXECUTE on {} from them (or from the role they have it through), or list \
                 them in outbox.message_writers if they write events",
                access.forms.join(" and ")
            ),
        ));
    }
    Some(Check::pass(
        WRITERS,
        format!(
            "only outbox.message_writers ({}), walship's user and superusers may execute \
             pg_logical_emit_message",
            quoted_list(writers)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use walship_postgres::catalog::HistoryAccess;

    use super::*;
    use crate::check::report::Status;

    fn table() -> TableName {
        TableName::parse("public.walship_slots")
    }

    #[test]
    fn the_slot_history_protection_is_reported_off_with_why_and_the_fix() {
        // The role cannot create the table (PostgreSQL 15's public schema).
        let problem = HistoryAccess {
            schema_exists: true,
            can_create: false,
            table_exists: false,
            can_read: false,
            can_write: false,
        }
        .problem(&table(), "walship");
        let c = history_check("w", true, Some(&table()), true, problem, false);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.message.contains("G6"), "{c:?}");
        assert!(
            c.fix.as_deref().unwrap().contains(
                "GRANT SELECT, INSERT, UPDATE ON \"public\".\"walship_slots\" TO \"walship\""
            ),
            "{c:?}"
        );
        // Writable, but the existing slot is not in it.
        let c = history_check("w", true, Some(&table()), true, None, false);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(
            c.fix
                .as_deref()
                .unwrap()
                .starts_with("INSERT INTO \"public\".\"walship_slots\" (slot_name) VALUES ('w')"),
            "{c:?}"
        );
        // Off by configuration.
        let c = history_check("w", true, None, true, None, false);
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.message.contains("G6"), "{c:?}");
        // Protected, or nothing to protect.
        for c in [
            history_check("w", true, Some(&table()), true, None, true),
            history_check("w", true, Some(&table()), false, None, false),
            history_check("w", false, None, true, None, false),
        ] {
            assert_eq!(c.status, Status::Pass, "{c:?}");
        }
    }

    fn access(public: bool, roles: &[&str], heartbeat: bool) -> EmitAccess {
        EmitAccess {
            forms: vec![
                "pg_logical_emit_message(boolean,text,text)".to_owned(),
                "pg_logical_emit_message(boolean,text,bytea)".to_owned(),
            ],
            public,
            login_roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            current_user_can_heartbeat: heartbeat,
        }
    }

    #[test]
    fn message_mode_warns_while_roles_other_than_the_writers_may_emit() {
        let prefixes = ["outbox".to_owned()];
        let writers = ["app".to_owned()];
        assert!(writers_check(&[], &writers, "walship", false, &access(true, &[], true)).is_none());
        // PostgreSQL's default: PUBLIC.
        let c = writers_check(
            &prefixes,
            &writers,
            "walship",
            true,
            &access(true, &["app", "report", "walship"], true),
        )
        .unwrap();
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(c.message.contains("PUBLIC"), "{c:?}");
        let fix = c.fix.unwrap();
        assert!(
            fix.contains(
                "REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text) FROM PUBLIC"
            ) && fix.contains(
                "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text) TO \"app\", \
                 \"walship\""
            ),
            "{fix}"
        );
        // Revoked from PUBLIC, but another login role still may.
        let c = writers_check(
            &prefixes,
            &writers,
            "walship",
            false,
            &access(false, &["app", "report", "walship"], true),
        )
        .unwrap();
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert!(
            c.message
                .contains("execute pg_logical_emit_message: \"report\"; each"),
            "{c:?}"
        );
        // Only the writers and walship.
        let c = writers_check(
            &prefixes,
            &writers,
            "walship",
            true,
            &access(false, &["app", "walship"], true),
        )
        .unwrap();
        assert_eq!(c.status, Status::Pass, "{c:?}");
    }

    #[test]
    fn a_heartbeat_walship_may_not_emit_is_a_warning_with_the_grant() {
        let c = heartbeat_check("walship", &access(false, &[], false));
        assert_eq!(c.status, Status::Warn, "{c:?}");
        assert_eq!(
            c.fix.as_deref(),
            Some(
                "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text) TO \
                 \"walship\"; or set postgres.heartbeat_interval_ms = 0"
            )
        );
        assert_eq!(
            heartbeat_check("walship", &access(true, &[], true)).status,
            Status::Pass
        );
    }
}
