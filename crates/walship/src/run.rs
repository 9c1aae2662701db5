//! `walship run` for one configuration: the single-pipeline entry points and the metrics
//! endpoint's set-up. Wiring only: each pipeline itself is [`crate::pipeline`].
//!
//! Invariant: a configuration is resolved into [`Settings`] once, before anything connects.

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::settings::Settings;
use crate::config::{Config, ConfigError};
use crate::error::Error;
use crate::failover::Lineage;
use crate::pipeline::run_pipeline;
use crate::pipeline::watch::{UNOWNED_LOG_AFTER, log_unowned};
use crate::telemetry::{self, Telemetry};

/// Runs walship until `shutdown` completes (returns `Ok` after a graceful stop) or a definite
/// error occurs.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (cancel, watcher) = cancel_on(shutdown);
    let result = run_until_cancelled(&config, &cancel).await;
    watcher.abort();
    result
}

/// A token cancelled when `shutdown` completes, and the task that waits for it (abort it when
/// done).
pub(crate) fn cancel_on(
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let watcher = tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    (cancel, watcher)
}

/// Like [`run`], with cancellation given as a token.
pub async fn run_until_cancelled(config: &Config, cancel: &CancellationToken) -> Result<(), Error> {
    let settings = Settings::resolve(config)?;
    run_settings(&settings, cancel).await
}

/// Like [`run_until_cancelled`], with the configuration already resolved.
pub async fn run_settings(settings: &Settings, cancel: &CancellationToken) -> Result<(), Error> {
    telemetry::process_start_ms();
    let telemetry = Arc::new(Telemetry::default());
    let unowned = tokio::spawn(log_unowned(
        Arc::clone(&telemetry),
        settings.source.slot.clone(),
        UNOWNED_LOG_AFTER,
    ));
    let server = match settings.metrics_listen {
        // A file without [[pipelines]]: its one pipeline is named after its slot.
        Some(addr) => Some(
            metrics_server(
                addr,
                Arc::new([(settings.source.slot.clone(), Arc::clone(&telemetry))]),
            )
            .await?,
        ),
        None => None,
    };
    let lineage = Arc::new(Lineage::default());
    let result = run_pipeline(
        settings,
        cancel,
        &CancellationToken::new(),
        &telemetry,
        &lineage,
    )
    .await;
    unowned.abort();
    if let Some(server) = server {
        server.abort();
    }
    result
}

/// Binds `/metrics`, `/healthz`, `/readyz` and `/active` for `pipelines` and serves them on a
/// task.
pub(crate) async fn metrics_server(
    addr: std::net::SocketAddr,
    pipelines: telemetry::Pipelines,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = telemetry::bind(addr).await.map_err(|e| {
        ConfigError(format!(
            "metrics.listen {addr}: cannot listen ({e}); pick a free address"
        ))
    })?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz and /active");
    Ok(tokio::spawn(telemetry::serve_pipelines(
        listener,
        pipelines,
        telemetry::Limits::default(),
    )))
}
