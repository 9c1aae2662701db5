//! Configuration: what the operator wrote, layered and validated, and what each layer gets.
//!
//! ```text
//!  file ─▶ format (TOML tables, defaults) ◀─ env (WALSHIP_* overrides, secret files)
//!       ─▶ validate (cross-key rules)      ─▶ settings (typed, per layer: source, sink, session)
//!  deployment: a file with [[pipelines]] → one Config per pipeline, [cluster]
//! ```
//!
//! Owns reading a configuration file into a [`deployment::Deployment`] of validated
//! [`format::Config`]s, and resolving each into [`settings::Settings`] once, before anything
//! connects. The submodules are the real homes; the names re-exported here are the crate's
//! public face for library users.
//!
//! Invariant: every key that is accepted has an effect, every unknown key is an error that names
//! it, and every error names the key and how to fix it. Secrets are held in [`format::Secret`]
//! and never printed.

pub mod deployment;
pub mod env;
pub mod format;
pub mod settings;
mod validate;

pub use deployment::{ClusterConfig, Deployment, Pipeline};
pub use format::{
    BadRowPolicy, CloudEventsMode, Config, ConfigError, DEFAULT_MAX_PENDING_TRANSACTIONS,
    DEFAULT_METRICS_PORT, KafkaConfig, MetricsConfig, OutboxConfig, PostgresConfig, RunConfig,
    Secret,
};
pub use settings::{SessionSettings, Settings, SourceSettings};

#[cfg(test)]
mod tests;
