use super::*;

fn table() -> TableName {
    TableName::parse("public.walship_slots")
}

fn access(table_exists: bool, read: bool, write: bool, create: bool) -> HistoryAccess {
    HistoryAccess {
        schema_exists: true,
        can_create: create,
        table_exists,
        can_read: read,
        can_write: write,
    }
}

#[test]
fn the_history_protects_when_the_table_is_writable_or_can_be_created() {
    assert_eq!(access(true, true, true, false).problem(&table(), "w"), None);
    assert_eq!(
        access(false, false, false, true).problem(&table(), "w"),
        None
    );
}

#[test]
fn a_history_walship_cannot_write_names_g6_and_the_grant() {
    let p = access(true, true, false, false)
        .problem(&table(), "walship")
        .unwrap();
    assert!(
        p.message.contains("G6") && p.message.contains("public.walship_slots"),
        "{p:?}"
    );
    assert_eq!(
        p.fix,
        "as the table's owner: GRANT SELECT, INSERT, UPDATE ON \"public\".\"walship_slots\" \
         TO \"walship\";"
    );
}

#[test]
fn a_history_walship_cannot_create_gives_the_table_and_the_grant() {
    let p = access(false, false, false, false)
        .problem(&table(), "walship")
        .unwrap();
    assert!(
        p.message.contains("may not create it") && p.message.contains("PostgreSQL 15"),
        "{p:?}"
    );
    assert!(
        p.fix
            .contains("CREATE TABLE IF NOT EXISTS \"public\".\"walship_slots\"")
            && p.fix.contains("GRANT SELECT, INSERT, UPDATE"),
        "{p:?}"
    );
    let missing = HistoryAccess {
        schema_exists: false,
        ..access(false, false, false, false)
    };
    let p = missing.problem(&table(), "walship").unwrap();
    assert!(p.fix.starts_with("CREATE SCHEMA \"public\";"), "{p:?}");
}

#[test]
fn emit_grants_revoke_every_form_from_public_and_grant_it_to_the_writers_and_walship() {
    // PostgreSQL 17's forms.
    let forms = [
        "pg_logical_emit_message(boolean,text,text,boolean)".to_owned(),
        "pg_logical_emit_message(boolean,text,bytea,boolean)".to_owned(),
    ];
    assert_eq!(
        emit_grants(&forms, &["app".to_owned()], Some("walship")),
        "REVOKE EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text,boolean) FROM \
         PUBLIC; GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text,boolean) \
         TO \"app\", \"walship\"; REVOKE EXECUTE ON FUNCTION \
         pg_logical_emit_message(boolean,text,bytea,boolean) FROM PUBLIC; GRANT EXECUTE ON \
         FUNCTION pg_logical_emit_message(boolean,text,bytea,boolean) TO \"app\", \"walship\";"
    );
    assert_eq!(
        heartbeat_grant(&forms, "walship"),
        "GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean,text,text,boolean) TO \
         \"walship\";"
    );
}
