//! Least privilege, end to end: walship runs as a role that has only what `walship init-sql
//! --role` grants (REPLICATION, SELECT on the outbox, the slot history table, EXECUTE for the
//! heartbeat), and keeps its guarantees: events flow, a dropped slot is refused, the heartbeat
//! works. A role without the slot history is told so by `walship check` and at every start,
//! with the fix, and with message prefixes `check` warns while roles other than the writers may
//! emit logical messages.
//!
//! PostgreSQL 15 and later: `public` no longer grants CREATE to every role, which is what turns
//! the slot history off for a role made by hand.

use std::time::Duration;

use crate::check::{checks, find, run, walship};
use crate::harness::{
    self, Binary, Row, TIMEOUT, TestDb, broker, consume, insert_txn, seqs, topic,
};
use crate::metrics::await_heartbeat;

/// `walship init-sql ARGS`' output.
async fn init_sql(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = walship().arg("init-sql").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "init-sql {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
    .await
    .unwrap()
}

/// A role name of the test's own (roles are cluster-wide).
fn role(db: &TestDb, what: &str) -> String {
    format!("{}_{what}", db.name)
}

/// The test's configuration, connecting as `user` (the harness's servers trust every user),
/// with `postgres` and `outbox` lines added to those tables.
fn config_as(db: &TestDb, user: &str, postgres: &str, outbox: &str) -> String {
    let url = db.url.replacen("postgres@", &format!("{user}@"), 1);
    let topic = format!("topic = \"{}.{{aggregatetype}}\"\n", db.slot());
    harness::config_toml(db, &broker().bootstrap, "")
        .replacen(&db.url, &url, 1)
        .replacen(
            "status_interval_ms = 200\n",
            &format!("status_interval_ms = 200\n{postgres}\n"),
            1,
        )
        .replacen(&topic, &format!("{topic}{outbox}\n"), 1)
}

/// How often walship has logged `what`.
fn count(walship: &Binary, what: &str) -> usize {
    walship.log_text().matches(what).count()
}

/// Removes EXECUTE on every form of `pg_logical_emit_message` from PUBLIC in the test's
/// database, as message mode's documentation says to.
async fn revoke_emit_from_public(db: &TestDb) {
    db.client
        .batch_execute(
            "DO $$ DECLARE f regprocedure; BEGIN \
               FOR f IN SELECT oid::regprocedure FROM pg_proc \
                        WHERE proname = 'pg_logical_emit_message' \
                          AND pronamespace = 'pg_catalog'::regnamespace LOOP \
                 EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f); \
               END LOOP; END $$",
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_made_by_init_sql_streams_refuses_a_dropped_slot_and_sends_the_heartbeat() {
    let mut db = TestDb::new().await;
    let walship_role = role(&db, "ws");
    // Message mode's advice first: only granted roles may emit messages, so the heartbeat
    // works only through init-sql's grant.
    revoke_emit_from_public(&db).await;
    let publication = format!("{}_pub", db.name);
    let sql = init_sql(&[
        "--publication",
        &publication,
        "--role",
        &walship_role,
        "--heartbeat",
    ])
    .await;
    db.client.batch_execute(&sql).await.expect("init-sql runs");
    let attrs = db
        .client
        .query_one(
            "SELECT rolreplication, rolsuper, rolcanlogin, rolcreatedb, rolcreaterole \
             FROM pg_roles WHERE rolname = $1",
            &[&walship_role],
        )
        .await
        .unwrap();
    assert_eq!(
        (0..5).map(|i| attrs.get::<_, bool>(i)).collect::<Vec<_>>(),
        [true, false, true, false, false],
        "LOGIN REPLICATION, nothing more"
    );
    let config = config_as(
        &db,
        &walship_role,
        "create_publication = false\nheartbeat_interval_ms = 200",
        "",
    );

    // check passes as the role, the protections included.
    let out = run("check", &config, true).await;
    let all = checks(&out.json());
    assert_eq!(out.code, 0, "{all:#?}");
    for name in [
        "postgres.role",
        "postgres.slot_history_table",
        "postgres.heartbeat_interval_ms",
    ] {
        assert_eq!(find(&all, name).1, "pass", "{:#?}", find(&all, name));
    }

    // Events flow.
    let mut walship = Binary::start(&config);
    db.await_streaming().await;
    for seq in 0..50 {
        insert_txn(&mut db.client, &[Row::new("order", "lp", seq)]).await;
    }
    db.await_caught_up().await;
    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        50,
        TIMEOUT,
        Duration::from_secs(1),
    );
    assert_eq!(seqs(&records), (0..50).collect::<Vec<_>>());
    // The heartbeat, through the grant alone.
    await_heartbeat(&db).await;
    let log = walship.log_text();
    assert!(
        !log.contains("G6") && !log.contains("heartbeat:"),
        "no protection is off:\n{log}"
    );

    // The slot history holds the slot, so a dropped slot is refused, not re-created.
    let recorded: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM walship_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1);
    walship.signal(libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while walship.running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "walship did not stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.client
        .execute("SELECT pg_drop_replication_slot($1)", &[&db.slot()])
        .await
        .unwrap();
    walship.restart();
    let (code, log) = walship.wait_exit(TIMEOUT).await;
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("has been dropped since") && log.contains("walship_slots"),
        "{log}"
    );
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "never re-created");
}

/// The setup: a login + replication role with SELECT on the outbox and a publication
/// made for it, on PostgreSQL 15+, where it cannot create the slot history table. check warns
/// naming G6 and the fix, walship says so at every start, and the fix check gives turns the
/// protection on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_the_slot_history_is_told_so_by_check_and_at_every_start() {
    let db = TestDb::new().await;
    let user = role(&db, "bare");
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {user} LOGIN REPLICATION; GRANT SELECT ON outbox TO {user}; \
             CREATE PUBLICATION {slot}_pub FOR TABLE outbox WITH (publish = 'insert');",
            slot = db.slot()
        ))
        .await
        .unwrap();
    let config = config_as(&db, &user, "create_publication = false", "");
    let history = |all: &[(String, String, Option<String>, String)]| {
        find(all, "postgres.slot_history_table").clone()
    };
    let out = run("check", &config, true).await;
    let all = checks(&out.json());
    assert_eq!(out.code, 0, "warnings only: {all:#?}");
    let (_, status, fix, message) = history(&all);
    assert_eq!(status, "warn", "{message}");
    assert!(
        message.contains("G6") && message.contains("may not create it"),
        "{message}"
    );
    let fix = fix.unwrap();
    assert!(
        fix.contains(&format!(
            "GRANT SELECT, INSERT, UPDATE ON \"public\".\"walship_slots\" TO \"{user}\""
        )),
        "{fix}"
    );

    // walship streams, and says the protection is off: when it creates the slot, and again at
    // each start.
    let warning = "G6's protection against re-creating a dropped slot is off";
    let started = "walship starting";
    let mut walship = Binary::start(&config);
    db.await_streaming().await;
    // Each start checks the history before it logs `walship starting`.
    assert!(
        count(&walship, started) == 1 && count(&walship, warning) == 2,
        "when the slot is created, and at the start:\n{}",
        walship.log_text()
    );
    walship.kill();
    walship.restart();
    harness::until("the next start", || count(&walship, started) == 2).await;
    assert_eq!(count(&walship, warning), 3, "{}", walship.log_text());
    walship.kill();

    // The fix, as check gives it (as the schema's owner): the table and the grant. The slot
    // walship created meanwhile is not in it yet: check says so, with the row to add.
    let statements = fix
        .strip_prefix("as the schema's owner: ")
        .and_then(|f| f.split(" (walship init-sql").next())
        .unwrap_or_else(|| panic!("{fix}"));
    db.client
        .batch_execute(statements)
        .await
        .expect("the fix runs");
    let all = checks(&run("check", &config, true).await.json());
    let (_, status, fix, message) = history(&all);
    assert_eq!(status, "warn", "{message}");
    assert!(message.contains("is not recorded"), "{message}");
    let insert = fix.unwrap();
    let insert = insert
        .split("; or set")
        .next()
        .unwrap_or_else(|| panic!("{insert}"));
    db.client.batch_execute(insert).await.expect("the row");
    let all = checks(&run("check", &config, true).await.json());
    assert_eq!(history(&all).1, "pass", "{:#?}", history(&all));
    walship.restart();
    harness::until("the third start", || count(&walship, started) == 3).await;
    assert_eq!(
        count(&walship, warning),
        3,
        "no warning once the slot is recorded:\n{}",
        walship.log_text()
    );
    db.await_streaming().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_mode_check_warns_while_roles_other_than_the_writers_may_emit() {
    let db = TestDb::new().await;
    let (app, other) = (role(&db, "app"), role(&db, "other"));
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {app} LOGIN; CREATE ROLE {other} LOGIN;"
        ))
        .await
        .unwrap();
    let config = config_as(
        &db,
        "postgres",
        "",
        &format!("message_prefixes = [\"outbox\"]\nmessage_writers = [\"{app}\"]"),
    );
    let writers = |config: &str| {
        let config = config.to_owned();
        async move {
            let all = checks(&run("check", &config, true).await.json());
            find(&all, "outbox.message_writers").clone()
        }
    };
    // PostgreSQL's default: every role may.
    let (_, status, fix, message) = writers(&config).await;
    assert_eq!(status, "warn", "{message}");
    assert!(message.contains("PUBLIC"), "{message}");
    // The fix, as check gives it.
    let fix = fix.unwrap();
    let statements = fix
        .strip_prefix("in this database: ")
        .and_then(|f| f.split(" and list the roles").next())
        .unwrap_or_else(|| panic!("{fix}"));
    db.client
        .batch_execute(statements)
        .await
        .expect("the fix runs");
    let (_, status, _, message) = writers(&config).await;
    assert_eq!(status, "pass", "{message}");
    let can = |user: String| {
        let client = &db.client;
        async move {
            client
                .query_one(
                    "SELECT bool_and(has_function_privilege($1, oid, 'EXECUTE')) FROM pg_proc \
                     WHERE proname = 'pg_logical_emit_message'",
                    &[&user],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
        }
    };
    assert!(can(app.clone()).await && !can(other.clone()).await);
    // Another login role given EXECUTE (on the bytea form: any form emits messages) is named.
    db.client
        .batch_execute(&format!(
            "DO $$ DECLARE f regprocedure; BEGIN \
               FOR f IN SELECT oid::regprocedure FROM pg_proc \
                        WHERE proname = 'pg_logical_emit_message' \
                          AND proargtypes[2] = 'bytea'::regtype LOOP \
                 EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO {other}', f); \
               END LOOP; END $$"
        ))
        .await
        .unwrap();
    let (_, status, _, message) = writers(&config).await;
    assert_eq!(status, "warn", "{message}");
    assert!(message.contains(&format!("\"{other}\"")), "{message}");
}
