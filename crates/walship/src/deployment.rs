//! A deployment: every pipeline of one configuration file, in this process.
//!
//! Owns what a process with several pipelines does beyond running each: resolving every
//! pipeline's settings before anything starts, the shared metrics endpoint, and deciding which
//! pipelines this process runs — all of them, or under `[cluster]` those the group assigns it
//! ([`crate::cluster`]). Each pipeline itself is [`crate::pipeline`]. This module only
//! connects things.
//!
//! Invariant: a file without `[[pipelines]]` runs exactly as [`crate::run::run`]; with several,
//! a pipeline's definite error stops only that pipeline, and the process reports every such
//! error by name when it ends.

use std::future::Future;
use std::sync::Arc;

use crate::config::ConfigError;
use crate::config::deployment::Deployment;
use crate::config::settings::Settings;
use crate::error::Error;
use crate::pipeline::run_all;
use crate::run::{cancel_on, metrics_server, run};
use crate::telemetry::Telemetry;

/// Runs every pipeline of `deployment` until `shutdown` completes. A file without
/// `[[pipelines]]` runs exactly as [`run`]. With several, each pipeline is a task of its own
/// with its own sessions, progress, resume and reconnect loop: a database that is down only
/// delays its pipeline, and a definite error stops only its pipeline (logged with its name,
/// shown on `/readyz` and `/readyz/<name>`) while the others keep streaming. Returns an error
/// naming the pipelines that stopped with one, once all have ended.
pub async fn run_deployment(
    deployment: Deployment,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    if deployment.is_single() {
        let config = deployment.pipelines.into_iter().next().map(|p| p.config);
        return match config {
            Some(config) => run(config, shutdown).await,
            None => Ok(()),
        };
    }
    crate::telemetry::process_start_ms();
    // Every pipeline's configuration is resolved (secrets included) before anything starts.
    let mut pipelines = Vec::new();
    // One pool: pipelines with the same producer settings share a producer.
    let producers = walship_kafka::Producers::new();
    for p in &deployment.pipelines {
        let name = p.name.clone().unwrap_or_default();
        let mut settings = Settings::resolve(&p.config)
            .map_err(|e| ConfigError(format!("pipeline {name:?}: {}", e.0)))?;
        settings.producers = Arc::clone(&producers);
        pipelines.push((name, settings, Arc::new(Telemetry::default())));
    }
    let (cancel, watcher) = cancel_on(shutdown);
    let server = match deployment.metrics.address()? {
        Some(addr) => {
            let all = pipelines
                .iter()
                .map(|(name, _, t)| (name.clone(), Arc::clone(t)))
                .collect();
            Some(metrics_server(addr, all).await?)
        }
        None => None,
    };
    tracing::info!(
        pipelines = %pipelines.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>().join(","),
        "running {} pipelines",
        pipelines.len()
    );
    let failed = match &deployment.cluster {
        Some(cluster) => crate::cluster::run(cluster, pipelines, &cancel).await,
        None => Ok(run_all(pipelines, &cancel).await),
    };
    watcher.abort();
    if let Some(server) = server {
        server.abort();
    }
    let failed = failed?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Pipelines(failed.join("; ")))
    }
}
