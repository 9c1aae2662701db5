//! The SQL kit (`sql/`, `walship init-sql`) end to end with walship, and the `docker/` files
//! checked as far as possible without a Docker engine.
//!
//! The kit goes into schema `kit` of each test database (the harness's own `public.outbox` stays
//! untouched), and walship is pointed at `kit.outbox` and the kit's publication.

mod docker;
mod emit_functions;
mod partitioned;
mod psql;

use std::time::Duration;

use tokio_postgres::GenericClient;
use walship::Config;
use walship::init_sql::{self, InitSqlArgs};

use crate::harness::{self, TestDb, broker};

/// Settle time after the expected count: long enough to see duplicates that are in the broker.
const SETTLE: Duration = Duration::from_secs(1);

/// The kit for schema `kit` with the default publication.
fn kit(partitioned: bool) -> String {
    init_sql::render(&InitSqlArgs {
        schema: "kit".into(),
        partitioned,
        publication: init_sql::DEFAULT_PUBLICATION.into(),
        ..InitSqlArgs::default()
    })
    .expect("the kit renders for schema kit")
}

/// walship on `kit.outbox` through the kit's publication, which it must not create itself.
fn kit_config(db: &TestDb) -> Config {
    let env = [
        ("WALSHIP_OUTBOX__TABLE", "kit.outbox"),
        (
            "WALSHIP_POSTGRES__PUBLICATION",
            init_sql::DEFAULT_PUBLICATION,
        ),
        ("WALSHIP_POSTGRES__CREATE_PUBLICATION", "false"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    Config::from_toml(
        &harness::config_toml(db, &broker().bootstrap, ""),
        env,
        "sql kit test config",
    )
    .expect("valid kit config")
}

/// Calls `kit.outbox_emit` with a `{"seq": seq}` payload; returns the event id.
async fn emit(
    client: &impl GenericClient,
    aggregate_id: &str,
    seq: u64,
    delete_after: bool,
) -> String {
    let payload = serde_json::json!({ "seq": seq }).to_string();
    client
        .query_one(
            "SELECT kit.outbox_emit('order', $1, 'Updated', $2::text::jsonb, delete_after => $3)::text",
            &[&aggregate_id, &payload, &delete_after],
        )
        .await
        .expect("kit.outbox_emit")
        .get(0)
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}
