//! walship streams transactional-outbox events from a PostgreSQL logical replication slot to
//! Kafka, keyed by aggregate id, in commit order, confirming the slot only behind broker acks.
//!
//! # Layout
//!
//! - [`config`] — the TOML configuration, environment overrides, validation, secrets.
//! - [`run`](mod@run) — the supervisor: preflight, sessions, reconnect with backoff. Wiring only.
//! - [`pipeline`] — one streaming session: decode, extract, route, produce, report status.
//! - [`progress`] — the progress tracker: which LSN is safe to confirm.
//! - [`resume`] — after a crash, which events an earlier run already delivered.
//! - [`check`] — `walship check`: every setup problem at once, each with its fix.
//! - [`status`] — `walship status`: the slot's position, lag and WAL retention.
//! - [`cli`] — the command line (`walship run`, …); `main.rs` only calls it.
//! - [`failover`] — following a promotion (failover slots): start-up, sessions, `check`.
//! - [`error`] — run errors, transient or definite.
//! - [`telemetry`] — metrics, `/metrics`, `/healthz`, `/readyz`.
//!
//! The protocol code lives in the `pgoutput`, `walship-postgres` and `walship-kafka` crates.

pub mod check;
pub mod cli;
pub mod config;
pub mod error;
pub mod failover;
pub mod init_sql;
pub mod pipeline;
pub mod progress;
pub mod resume;
pub mod run;
pub mod status;
pub mod telemetry;

pub use config::Config;
pub use error::Error;
pub use run::{run, run_until_cancelled};
