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
//!
//! Layout: `postgres` (connect, settings, role, capacity) with `outbox` (table, columns,
//! publication), `slot` and `privilege` (the slot history, the heartbeat, who may emit
//! messages), then `kafka` (broker, topics, limits, dead-letter topic), and for a
//! file with `[cluster]` its coordination topic (`cluster`); `report`
//! holds the checks and renders them. The rules they report by are the catalog's
//! (`walship_postgres::catalog`) and the router's (`walship_kafka::route`), not copies.

mod cluster;
mod failover;
mod kafka;
mod outbox;
mod postgres;
mod privilege;
mod report;
mod slot;

#[cfg(test)]
mod fixtures;

use std::path::Path;
use std::process::ExitCode;

pub use postgres::{message_check, role_check, wal_level_check};
pub use report::{Check, Report, Status, Summary};
pub use slot::slot_checks;

use crate::command;
use crate::config::Config;
use crate::config::settings::SourceParts;

/// Runs every check against the configured PostgreSQL and Kafka.
pub async fn run_checks(config: &Config) -> Report {
    let mut checks = Vec::new();
    // Resolved once, by the resolvers `run` uses; each part on its own, so one that is wrong
    // does not hide the others.
    let source = SourceParts::resolve(config);
    let facts = postgres::postgres_checks(config, &source, &mut checks).await;
    kafka::kafka_checks(config, &facts, &mut checks).await;
    Report::new(checks)
}

/// `walship check`: exit 0 when nothing failed, 1 when something did, 2 for an unreadable or
/// invalid configuration.
pub fn main(path: &Path, json: bool, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let deployment = match command::load_deployment(path) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if !deployment.is_single() {
        // Several pipelines: every one is checked, each report under its name.
        let mut reports: Vec<(String, Report)> = deployment
            .pipelines
            .iter()
            .map(|p| {
                let name = p.name.clone().unwrap_or_default();
                (name, runtime.block_on(run_checks(&p.config)))
            })
            .collect();
        if let (Some(c), Some(first)) = (&deployment.cluster, deployment.pipelines.first()) {
            let names: Vec<String> = deployment
                .pipelines
                .iter()
                .filter_map(|p| p.name.clone())
                .collect();
            let checks = runtime.block_on(cluster::cluster_checks(c, &first.config, &names));
            reports.push(("[cluster]".to_owned(), Report::new(checks)));
        }
        let human = |name: &str, report: &Report| {
            // The `[cluster]` report is the file's, not a pipeline's.
            let what = if name.starts_with('[') {
                ""
            } else {
                "pipeline "
            };
            format!(
                "walship check ({}) {what}{name}\n{}",
                path.display(),
                report.render_human()
            )
        };
        let ok = reports.iter().all(|(_, r)| r.ok);
        return command::print_named(&reports, json, human, ok);
    }
    let Some(config) = deployment.pipelines.into_iter().next().map(|p| p.config) else {
        return ExitCode::from(2);
    };
    let report = runtime.block_on(run_checks(&config));
    let human = || {
        format!(
            "walship check ({})\n{}",
            path.display(),
            report.render_human()
        )
    };
    command::print_report(&report, json, human, report.ok)
}
