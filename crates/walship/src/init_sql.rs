//! `walship init-sql`: prints the SQL kit (`sql/outbox.sql`, or `sql/outbox_partitioned.sql`
//! with `--partitioned`) for a schema and publication name, and with `--role` a login role with
//! only what walship needs ([`role_sql`]).
//!
//! The files stay plain SQL that psql runs as they are (the demo does), so they name the
//! defaults in a form that is valid SQL *and* unambiguous to substitute: the schema appears only
//! as the quoted identifier `"public"` or the string literal `'public'`, the publication only as
//! `"walship_outbox"` or `'walship_outbox'`. Each form is replaced by the new name quoted for the
//! same position, in one pass, so a substituted name is never substituted again.

use std::io::Write;
use std::process::ExitCode;

use walship_postgres::quote_ident;

/// The unpartitioned kit: table, publication, `outbox_emit`.
pub const OUTBOX_SQL: &str = include_str!("../../../sql/outbox.sql");
/// The range-partitioned kit: partitioned table, partition and retention helpers, publication
/// with `publish_via_partition_root`, `outbox_emit`.
pub const OUTBOX_PARTITIONED_SQL: &str = include_str!("../../../sql/outbox_partitioned.sql");

/// Schema the SQL files are written for.
pub const DEFAULT_SCHEMA: &str = "public";
/// Publication the SQL files are written for (walship's default `postgres.publication`).
pub const DEFAULT_PUBLICATION: &str = "walship_outbox";

/// Dollar-quote tag of the function bodies in the SQL files; a name containing it would end a
/// body early.
const DOLLAR_TAG: &str = "$walship$";
/// PostgreSQL truncates longer identifiers (NAMEDATALEN - 1 bytes), after which the catalog
/// lookups in the kit would no longer match the created objects.
const MAX_NAME_BYTES: usize = 63;

/// Options of `walship init-sql`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitSqlArgs {
    /// Schema of the outbox table and its functions (created when missing). walship's
    /// outbox.table is then "SCHEMA.outbox".
    #[arg(long, default_value = DEFAULT_SCHEMA)]
    pub schema: String,
    /// Print the range-partitioned variant (daily partitions, retention helper).
    #[arg(long)]
    pub partitioned: bool,
    /// Publication to create for the outbox table (walship's postgres.publication).
    #[arg(long, default_value = DEFAULT_PUBLICATION)]
    pub publication: String,
    /// Also create (or complete) this login role for walship with only what it needs:
    /// REPLICATION, SELECT on the outbox, the slot history table it writes. The publication
    /// stays yours (set postgres.create_publication = false). No password is set here.
    #[arg(long, value_name = "NAME")]
    pub role: Option<String>,
    /// With --role: let the role emit walship's heartbeat (EXECUTE on pg_logical_emit_message),
    /// for postgres.heartbeat_interval_ms > 0 once EXECUTE is revoked from PUBLIC.
    #[arg(long, requires = "role")]
    pub heartbeat: bool,
    /// With --role: print the role's statements only, not the kit (for an outbox that exists).
    #[arg(long, requires = "role")]
    pub role_only: bool,
}

impl Default for InitSqlArgs {
    fn default() -> Self {
        InitSqlArgs {
            schema: DEFAULT_SCHEMA.to_owned(),
            partitioned: false,
            publication: DEFAULT_PUBLICATION.to_owned(),
            role: None,
            heartbeat: false,
            role_only: false,
        }
    }
}

/// A name `init-sql` cannot use: what is wrong with it and what to do instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InitSqlError(pub String);

/// The SQL kit for `args`: a header naming the matching walship settings, `CREATE SCHEMA` for
/// a schema other than `public`, then the chosen file with the names substituted.
pub fn render(args: &InitSqlArgs) -> Result<String, InitSqlError> {
    check_name("--schema", &args.schema)?;
    check_name("--publication", &args.publication)?;
    if let Some(role) = &args.role {
        check_name("--role", role)?;
    }
    if args.schema.contains('.') {
        // walship's outbox.table is "schema.table", split at the first dot.
        return Err(InitSqlError(format!(
            "--schema {:?} contains '.', which walship's outbox.table (\"schema.table\") cannot \
             express: choose a schema name without a dot",
            args.schema
        )));
    }
    let (file, template) = if args.partitioned {
        ("sql/outbox_partitioned.sql", OUTBOX_PARTITIONED_SQL)
    } else {
        ("sql/outbox.sql", OUTBOX_SQL)
    };
    let table = toml_string(&format!("{}.outbox", args.schema));
    let publication = toml_string(&args.publication);
    let role_settings = match &args.role {
        Some(role) => format!(
            "--   url = {}\n\
             --   create_publication = false\n",
            toml_string(&format!("postgres://{role}@HOST/DATABASE"))
        ),
        None => String::new(),
    };
    let mut out = format!(
        "-- Printed by `walship init-sql{partitioned}{role_flags}`{from} for schema {schema} and \
         publication {pub_name}.\n\
         -- Matching walship configuration:\n\
         --   [postgres]\n\
         {role_settings}\
         --   publication = {publication}\n\
         --   [outbox]\n\
         --   table = {table}\n\n",
        partitioned = if args.partitioned {
            " --partitioned"
        } else {
            ""
        },
        role_flags = match &args.role {
            Some(role) => format!(
                " --role {role}{}{}",
                if args.heartbeat { " --heartbeat" } else { "" },
                if args.role_only { " --role-only" } else { "" }
            ),
            None => String::new(),
        },
        from = if args.role_only {
            String::new()
        } else {
            format!(" from {file}")
        },
        schema = quote_ident(&args.schema),
        pub_name = quote_ident(&args.publication),
    );
    if !args.role_only {
        if args.schema != DEFAULT_SCHEMA {
            out.push_str(&format!(
                "CREATE SCHEMA IF NOT EXISTS {};\n\n",
                quote_ident(&args.schema)
            ));
        }
        out.push_str(&substitute(template, &args.schema, &args.publication));
    }
    if let Some(role) = &args.role {
        if !args.role_only {
            out.push('\n');
        }
        out.push_str(&role_sql(&args.schema, role, args.heartbeat));
    }
    Ok(out)
}

/// The statements that create (or complete) walship's login `role` with only what walship
/// needs, for the outbox in `schema`: safe to run again, and they set no password.
///
/// - `LOGIN REPLICATION`: the replication connection (on Amazon RDS and Aurora, membership in
///   `rds_replication` instead, which `walship check` accepts there);
/// - `CONNECT` on the database and `USAGE` on the schema;
/// - `SELECT` on the outbox (`walship check` lists its aggregate types; streaming needs none);
/// - the slot history table, created here and owned by the caller, with `SELECT, INSERT,
///   UPDATE` for the role (G6: walship records the slot it creates, and refuses to re-create a
///   dropped one);
/// - with `heartbeat`, `EXECUTE` on `pg_logical_emit_message`'s text form (needed once it is
///   revoked from PUBLIC, which message mode calls for).
///
/// The publication is not the role's: the kit creates it, and walship only reads it.
pub fn role_sql(schema: &str, role: &str, heartbeat: bool) -> String {
    let r = quote_ident(role);
    let lit = quote_literal(role);
    let s = quote_ident(schema);
    let history = walship_postgres::TableName {
        schema: schema.to_owned(),
        name: "walship_slots".to_owned(),
    };
    let mut sql = format!(
        "-- walship's role {r}, with only what walship needs (`walship init-sql --role`). Set its
-- password yourself, never in a file: \\password {r} in psql. Replication rights come from the
-- REPLICATION attribute, or on Amazon RDS and Aurora (where it cannot be granted) from
-- membership in rds_replication.
DO $walship$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {lit}) THEN
        CREATE ROLE {r} LOGIN;
    END IF;
    ALTER ROLE {r} LOGIN;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_replication')
       AND current_setting('rds.logical_replication', true) IS NOT NULL THEN
        EXECUTE format('GRANT rds_replication TO %I', {lit});
    ELSE
        ALTER ROLE {r} REPLICATION;
    END IF;
END
$walship$;
DO $walship$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), {lit});
END
$walship$;
GRANT USAGE ON SCHEMA {s} TO {r};
-- walship streams without reading the table; `walship check` reads its aggregate types.
GRANT SELECT ON {s}.outbox TO {r};
-- The slot history (postgres.slot_history_table = \"walship_slots\"): walship records the slot it
-- creates, and refuses to create it again once dropped (G6). Yours; the role only writes rows.
{ddl};
{grant};
",
        ddl = walship_postgres::catalog::history_table_ddl(&history),
        grant = walship_postgres::catalog::history_grant(&history, role),
    );
    if heartbeat {
        sql.push_str(&format!(
            "-- The heartbeat (postgres.heartbeat_interval_ms): EXECUTE on the text form of
-- pg_logical_emit_message (it has a fourth argument, flush, from PostgreSQL 17).
DO $walship$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.proname = 'pg_logical_emit_message'
               AND p.pronamespace = 'pg_catalog'::regnamespace
               AND p.proargtypes[2] = 'text'::regtype
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, {lit});
    END LOOP;
END
$walship$;
"
        ));
    }
    sql
}

/// `walship init-sql`: prints the kit to stdout. Exit code 2 for an unusable name (like a
/// configuration error), 1 when stdout cannot be written.
pub fn main(args: &InitSqlArgs) -> ExitCode {
    let sql = match render(args) {
        Ok(sql) => sql,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(sql.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the SQL to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

fn check_name(option: &str, name: &str) -> Result<(), InitSqlError> {
    if name.is_empty() {
        return Err(InitSqlError(format!("{option} must not be empty")));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(InitSqlError(format!(
            "{option} {name:?} is {} bytes long; PostgreSQL names are at most {MAX_NAME_BYTES} \
             bytes: choose a shorter name",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        // A newline would end the SQL comments the name is printed in.
        return Err(InitSqlError(format!(
            "{option} {name:?} contains control characters: choose a name without them"
        )));
    }
    if name.contains(DOLLAR_TAG) {
        return Err(InitSqlError(format!(
            "{option} {name:?} contains {DOLLAR_TAG}, which quotes the function bodies of the \
             kit: choose a name without it"
        )));
    }
    Ok(())
}

/// `s` as an SQL string literal (standard_conforming_strings: only quotes are doubled).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Replaces the default names' identifier and literal forms in one pass over `template`.
fn substitute(template: &str, schema: &str, publication: &str) -> String {
    let replacements = [
        (quote_ident(DEFAULT_SCHEMA), quote_ident(schema)),
        (quote_literal(DEFAULT_SCHEMA), quote_literal(schema)),
        (quote_ident(DEFAULT_PUBLICATION), quote_ident(publication)),
        (
            quote_literal(DEFAULT_PUBLICATION),
            quote_literal(publication),
        ),
    ];
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    'scan: while let Some(pos) = rest.find(['"', '\'']) {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        for (from, to) in &replacements {
            if let Some(after) = rest.strip_prefix(from.as_str()) {
                out.push_str(to);
                rest = after;
                continue 'scan;
            }
        }
        // A quote that starts no token: copy it and scan on after it.
        out.push_str(&rest[..1]);
        rest = &rest[1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(schema: &str, publication: &str, partitioned: bool) -> InitSqlArgs {
        InitSqlArgs {
            schema: schema.into(),
            partitioned,
            publication: publication.into(),
            ..InitSqlArgs::default()
        }
    }

    #[test]
    fn a_role_gets_replication_select_and_the_slot_history_and_the_heartbeat_when_asked() {
        let with_role = |heartbeat, role_only| InitSqlArgs {
            role: Some("ws'x".into()),
            heartbeat,
            role_only,
            ..args("kit", "kit_pub", false)
        };
        let sql = render(&with_role(false, false)).unwrap();
        assert!(
            sql.contains("CREATE TABLE IF NOT EXISTS \"kit\".outbox"),
            "the kit first"
        );
        let role = &sql[sql.find("-- walship's role").unwrap()..];
        for part in [
            "IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ws''x')",
            "CREATE ROLE \"ws'x\" LOGIN;",
            "ALTER ROLE \"ws'x\" REPLICATION;",
            "EXECUTE format('GRANT rds_replication TO %I', 'ws''x');",
            "GRANT USAGE ON SCHEMA \"kit\" TO \"ws'x\";",
            "GRANT SELECT ON \"kit\".outbox TO \"ws'x\";",
            "CREATE TABLE IF NOT EXISTS \"kit\".\"walship_slots\"",
            "GRANT SELECT, INSERT, UPDATE ON \"kit\".\"walship_slots\" TO \"ws'x\";",
        ] {
            assert!(role.contains(part), "{part}:\n{role}");
        }
        assert!(!role.contains("pg_logical_emit_message"), "{role}");
        assert!(
            !role.to_lowercase().contains("password '"),
            "never a password"
        );
        let sql = render(&with_role(true, true)).unwrap();
        assert!(!sql.contains(".outbox_emit("), "--role-only prints no kit");
        assert!(
            sql.contains("EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', f, 'ws''x');"),
            "{sql}"
        );
        // The header stays TOML, with the role in the URL and the publication left alone.
        let header: String = sql
            .lines()
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.strip_prefix("--   "))
            .map(|l| format!("{l}\n"))
            .collect();
        let header: toml::Table = toml::from_str(&header).expect("the header is TOML");
        assert_eq!(
            header["postgres"]["url"].as_str(),
            Some("postgres://ws'x@HOST/DATABASE")
        );
        assert_eq!(
            header["postgres"]["create_publication"].as_bool(),
            Some(false)
        );
        let e = render(&InitSqlArgs {
            role: Some("a$walship$".into()),
            ..args("s", "p", false)
        })
        .unwrap_err()
        .0;
        assert!(e.contains("--role"), "{e}");
    }

    /// Byte offsets where `word` occurs as a whole word (not inside `publication`, `outbox_x`).
    fn whole_words(text: &str, word: &str) -> Vec<usize> {
        let is_word = |c: char| c.is_alphanumeric() || c == '_';
        text.match_indices(word)
            .map(|(i, _)| i)
            .filter(|&i| {
                !text[..i].chars().next_back().is_some_and(is_word)
                    && !text[i + word.len()..].chars().next().is_some_and(is_word)
            })
            .collect()
    }

    #[test]
    fn default_names_print_the_files_unchanged() {
        for partitioned in [false, true] {
            let sql = render(&args("public", "walship_outbox", partitioned)).unwrap();
            let file = if partitioned {
                OUTBOX_PARTITIONED_SQL
            } else {
                OUTBOX_SQL
            };
            assert!(sql.ends_with(file), "psql on the file = init-sql output");
            assert!(!sql.contains("CREATE SCHEMA"), "public exists already");
        }
    }

    #[test]
    fn every_schema_and_publication_reference_is_substituted() {
        for partitioned in [false, true] {
            let sql = render(&args("kit", "kit_pub", partitioned)).unwrap();
            let body = &sql[sql.find("CREATE SCHEMA").unwrap()..];
            assert_eq!(
                whole_words(body, "public"),
                Vec::<usize>::new(),
                "a schema reference escaped substitution (write it as \"public\" or 'public' in \
                 the file):\n{body}"
            );
            assert_eq!(
                whole_words(body, "walship_outbox"),
                Vec::<usize>::new(),
                "a publication reference escaped substitution:\n{body}"
            );
            assert!(body.starts_with("CREATE SCHEMA IF NOT EXISTS \"kit\";"));
            assert!(body.contains("CREATE TABLE IF NOT EXISTS \"kit\".outbox"));
            assert!(body.contains("CREATE PUBLICATION \"kit_pub\" FOR TABLE \"kit\".outbox"));
            assert!(body.contains("pubname = 'kit_pub'"));
            assert!(sql.contains("table = \"kit.outbox\""), "{sql}");
            assert!(sql.contains("publication = \"kit_pub\""), "{sql}");
        }
    }

    #[test]
    fn names_are_quoted_for_their_position_and_never_substituted_twice() {
        // A schema whose quoted form contains the publication's literal token.
        let schema = "x'walship_outbox'\"y";
        let sql = render(&args(schema, "Pub 'q'", true)).unwrap();
        assert!(
            sql.contains("\"x'walship_outbox'\"\"y\".outbox_emit("),
            "{sql}"
        );
        assert!(sql.contains("nspname = 'x''walship_outbox''\"y'"), "{sql}");
        assert!(sql.contains("CREATE PUBLICATION \"Pub 'q'\""), "{sql}");
        assert!(sql.contains("pubname = 'Pub ''q'''"), "{sql}");
        let header: String = sql
            .lines()
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.strip_prefix("--   "))
            .map(|l| format!("{l}\n"))
            .collect();
        let header: toml::Table = toml::from_str(&header).expect("the header is TOML");
        assert_eq!(
            header["outbox"]["table"].as_str(),
            Some("x'walship_outbox'\"y.outbox")
        );
        assert_eq!(header["postgres"]["publication"].as_str(), Some("Pub 'q'"));
    }

    #[test]
    fn unusable_names_are_refused_with_the_reason() {
        for (schema, publication, expect) in [
            ("", "p", "--schema must not be empty"),
            ("s", "", "--publication must not be empty"),
            ("a.b", "p", "cannot express"),
            ("s\nDROP", "p", "control characters"),
            ("s", "a$walship$b", "quotes the function bodies"),
        ] {
            let e = render(&args(schema, publication, false)).unwrap_err().0;
            assert!(e.contains(expect), "{schema:?}/{publication:?}: {e}");
        }
        let e = render(&args(&"s".repeat(64), "p", false)).unwrap_err().0;
        assert!(e.contains("at most 63 bytes"), "{e}");
        assert!(render(&args(&"s".repeat(63), "p", false)).is_ok());
    }

    #[test]
    fn both_kits_define_the_same_outbox_emit() {
        fn emit(sql: &str) -> &str {
            let start = sql
                .find("-- Writes one event in the caller's transaction")
                .expect("outbox_emit's comment");
            let end = sql[start..]
                .find("COMMENT ON FUNCTION")
                .expect("outbox_emit's COMMENT");
            &sql[start..start + end]
        }
        assert_eq!(emit(OUTBOX_SQL), emit(OUTBOX_PARTITIONED_SQL));
    }

    #[test]
    fn both_kits_define_the_same_outbox_emit_message() {
        fn emit_message(sql: &str) -> &str {
            let start = sql
                .find("-- Emits one event as a transactional logical decoding message")
                .expect("outbox_emit_message's comment");
            let end = sql[start..]
                .find("COMMENT ON FUNCTION")
                .expect("outbox_emit_message's COMMENT");
            &sql[start..start + end]
        }
        let f = emit_message(OUTBOX_SQL);
        assert_eq!(f, emit_message(OUTBOX_PARTITIONED_SQL));
        assert!(f.contains("pg_logical_emit_message(true,"), "{f}");
    }
}
