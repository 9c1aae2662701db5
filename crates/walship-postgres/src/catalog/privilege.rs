//! What roles may do, where walship's guarantees depend on it: whether walship's role can keep
//! the slot history (G6: a dropped slot is never re-created silently), whether it may emit its
//! heartbeat, and which roles may emit logical messages (with `outbox.message_prefixes` every
//! such role can publish events, or stop the pipeline with a non-transactional message).
//!
//! Invariant: the catalog's answers (`has_*_privilege`, the function's ACL) are read here and
//! judged by pure functions, so start-up and `walship check` word the same verdict: a protection
//! that is off is named, with why and the statement that turns it on.

use tokio_postgres::Client;

use crate::error::{PgError, sql_err};
use crate::ident::{TableName, quote_ident};

/// What the connected role can do with the slot history table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryAccess {
    /// The table's schema exists.
    pub schema_exists: bool,
    /// The role may create tables in that schema.
    pub can_create: bool,
    /// The table exists.
    pub table_exists: bool,
    /// The role may read it (USAGE on the schema, SELECT on the table).
    pub can_read: bool,
    /// The role may add and update rows (INSERT and UPDATE).
    pub can_write: bool,
}

/// A protection that is off: what is wrong and the statement(s) that fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unprotected {
    /// What is off and why.
    pub message: String,
    /// How to turn it on.
    pub fix: String,
}

/// The slot history table's definition, as walship creates it.
pub fn history_table_ddl(table: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (slot_name text PRIMARY KEY, created_at timestamptz NOT \
         NULL DEFAULT now(), created_lsn pg_lsn)",
        table.quoted()
    )
}

/// The grant walship's role needs on the slot history table.
pub fn history_grant(table: &TableName, role: &str) -> String {
    format!(
        "GRANT SELECT, INSERT, UPDATE ON {} TO {}",
        table.quoted(),
        quote_ident(role)
    )
}

/// G6's protection, named in every warning about it.
const G6: &str = "G6's protection against re-creating a dropped slot is off: if the slot were \
                  dropped, walship would create a new one and silently skip every event committed \
                  in between";

impl HistoryAccess {
    /// Why `role` cannot keep its slots in `table`, with the fix; `None` when it can (the table
    /// is readable and writable, or missing and creatable).
    pub fn problem(&self, table: &TableName, role: &str) -> Option<Unprotected> {
        let create_and_grant = format!(
            "{}; {};",
            history_table_ddl(table),
            history_grant(table, role)
        );
        if self.table_exists {
            if self.can_read && self.can_write {
                return None;
            }
            return Some(Unprotected {
                message: format!(
                    "user {role} may not read and write the slot history table {table}, so \
                     walship cannot record the slots it creates: {G6}"
                ),
                fix: format!("as the table's owner: {};", history_grant(table, role)),
            });
        }
        if !self.schema_exists {
            return Some(Unprotected {
                message: format!(
                    "the slot history table {table} cannot be created: schema {} does not \
                     exist. {G6}",
                    quote_ident(&table.schema)
                ),
                fix: format!(
                    "CREATE SCHEMA {}; {create_and_grant} (walship init-sql --role {role} prints \
                     it), or point postgres.slot_history_table at a schema that exists",
                    quote_ident(&table.schema)
                ),
            });
        }
        if self.can_create {
            return None;
        }
        Some(Unprotected {
            message: format!(
                "the slot history table {table} does not exist and user {role} may not create it \
                 (no CREATE on schema {}; since PostgreSQL 15 not every role has it on public): \
                 {G6}",
                quote_ident(&table.schema)
            ),
            fix: format!(
                "as the schema's owner: {create_and_grant} (walship init-sql --role {role} \
                 prints it)"
            ),
        })
    }
}

/// Reads what the connected role can do with `table`.
pub async fn history_access(client: &Client, table: &TableName) -> Result<HistoryAccess, PgError> {
    let row = client
        .query_one(
            "SELECT n.oid IS NOT NULL, \
                    COALESCE(has_schema_privilege(n.oid, 'CREATE'), false), \
                    c.oid IS NOT NULL, \
                    COALESCE(has_schema_privilege(n.oid, 'USAGE') \
                             AND has_table_privilege(c.oid, 'SELECT'), false), \
                    COALESCE(has_schema_privilege(n.oid, 'USAGE') \
                             AND has_table_privilege(c.oid, 'INSERT') \
                             AND has_table_privilege(c.oid, 'UPDATE'), false) \
             FROM (SELECT 1) AS one \
             LEFT JOIN pg_namespace n ON n.nspname = $1 \
             LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = $2 \
                                  AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(sql_err(format!(
            "reading the privileges on the slot history table {table}"
        )))?;
    Ok(HistoryAccess {
        schema_exists: row.get(0),
        can_create: row.get(1),
        table_exists: row.get(2),
        can_read: row.get(3),
        can_write: row.get(4),
    })
}

/// Who may execute `pg_logical_emit_message` (any of its forms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmitAccess {
    /// Its forms on this server, as `regprocedure` text: `(boolean, text, text)` and
    /// `(boolean, text, bytea)`, each with a fourth `boolean` (flush) from PostgreSQL 17.
    pub forms: Vec<String>,
    /// Granted to PUBLIC (PostgreSQL's default): every role may.
    pub public: bool,
    /// Login roles that may, directly or through a role they belong to; superusers (who always
    /// may) left out. Sorted.
    pub login_roles: Vec<String>,
    /// The connected role may execute the text form, which the heartbeat uses.
    pub current_user_can_heartbeat: bool,
}

/// Reads who may execute `pg_logical_emit_message`.
pub async fn emit_access(client: &Client) -> Result<EmitAccess, PgError> {
    let row = client
        .query_one(
            "SELECT COALESCE(array_agg(p.oid::regprocedure::text ORDER BY p.oid), '{}'), \
                    COALESCE(bool_or(p.proacl IS NULL OR EXISTS ( \
                        SELECT 1 FROM aclexplode(p.proacl) a \
                        WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')), false), \
                    COALESCE((SELECT array_agg(r.rolname::text ORDER BY r.rolname) \
                              FROM pg_roles r \
                              WHERE r.rolcanlogin AND NOT r.rolsuper AND EXISTS ( \
                                  SELECT 1 FROM pg_proc q \
                                  WHERE q.proname = 'pg_logical_emit_message' \
                                    AND q.pronamespace = 'pg_catalog'::regnamespace \
                                    AND has_function_privilege(r.oid, q.oid, 'EXECUTE'))), \
                             '{}'), \
                    COALESCE(bool_or(has_function_privilege(p.oid, 'EXECUTE')) \
                             FILTER (WHERE p.proargtypes[2] = 'text'::regtype), false) \
             FROM pg_proc p \
             WHERE p.proname = 'pg_logical_emit_message' \
               AND p.pronamespace = 'pg_catalog'::regnamespace",
            &[],
        )
        .await
        .map_err(sql_err("reading who may execute pg_logical_emit_message"))?;
    Ok(EmitAccess {
        forms: row.get(0),
        public: row.get(1),
        login_roles: row.get(2),
        current_user_can_heartbeat: row.get(3),
    })
}

/// The statements, in each database, that leave every form of `pg_logical_emit_message` in
/// `forms` to `writers` and, when it sends a heartbeat, walship's `role`.
pub fn emit_grants(forms: &[String], writers: &[String], role: Option<&str>) -> String {
    let mut grantees: Vec<String> = writers.iter().map(|w| quote_ident(w)).collect();
    grantees.extend(role.map(quote_ident));
    grantees.sort();
    grantees.dedup();
    let mut sql = Vec::new();
    for form in forms {
        sql.push(format!("REVOKE EXECUTE ON FUNCTION {form} FROM PUBLIC;"));
        if !grantees.is_empty() {
            sql.push(format!(
                "GRANT EXECUTE ON FUNCTION {form} TO {};",
                grantees.join(", ")
            ));
        }
    }
    sql.join(" ")
}

/// The statement that lets `role` send the heartbeat (the text form of each `forms`).
pub fn heartbeat_grant(forms: &[String], role: &str) -> String {
    forms
        .iter()
        .filter(|f| f.contains("(boolean,text,text"))
        .map(|f| format!("GRANT EXECUTE ON FUNCTION {f} TO {};", quote_ident(role)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests;
