//! walship streams transactional-outbox events from a PostgreSQL logical replication slot to
//! Kafka, keyed by aggregate id, in commit order, confirming the slot only behind broker acks.
//!
//! # Layout
//!
//! - [`config`] — the TOML configuration, environment overrides, validation, secrets, the
//!   `[[pipelines]]` deployment, and the settings each layer gets, resolved once.
//! - [`run`](mod@run) — `walship run` for one configuration. Wiring only.
//! - [`pipeline`] — one pipeline: preflight, sessions, reconnect with backoff, standby, watchdog.
//! - [`deployment`] — every pipeline of a file in this process: all, or those `[cluster]` assigns.
//! - [`cluster`] — several processes share the pipelines through a Kafka consumer group.
//! - [`session`] — one streaming session, generic over its WAL source and event sink: decode,
//!   extract, route, produce, report status; [`session::seams`] holds the two traits,
//!   [`session::progress`] the tracker of which LSN is safe to confirm, and [`session::resume`]
//!   what an earlier run already delivered after a crash.
//! - [`check`] — `walship check`: every setup problem at once, each with its fix.
//! - [`status`] — `walship status`: the slot's position, lag and WAL retention.
//! - [`cli`] — the command line (`walship run`, …); `main.rs` only calls it.
//! - [`command`] — what the commands share: loading the config, printing a report, exit codes.
//! - [`failover`] — following a promotion (failover slots): start-up, sessions, `check`.
//! - [`error`] — run errors, transient or definite.
//! - [`scheduling`] — how the kernel schedules walship's threads (`run.cpu_scheduling`).
//! - [`telemetry`] — metrics, `/metrics`, `/healthz`, `/readyz`, `/active`.
//!
//! The protocol code lives in the `pgoutput`, `walship-postgres` and `walship-kafka` crates.

pub mod check;
pub mod cli;
pub mod cluster;
pub mod command;
pub mod config;
pub mod deployment;
pub mod error;
pub mod failover;
pub mod init_sql;
pub mod pipeline;
pub mod run;
pub mod scheduling;
pub mod session;
pub mod status;
pub mod telemetry;

pub use config::Config;
pub use error::Error;
pub use run::{run, run_until_cancelled};
