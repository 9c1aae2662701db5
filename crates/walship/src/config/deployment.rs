//! Several pipelines in one configuration file: `[[pipelines]]` over shared defaults.
//!
//! Owns reading a configuration into a [`Deployment`]: one pipeline (the single-pipeline file
//! of before, unchanged) or several, each a complete [`Config`] made of the file's top-level
//! `[postgres]`, `[outbox]`, `[kafka]` and `[run]` tables with the pipeline's own tables laid
//! over them key by key (nested tables such as `kafka.librdkafka` merge too).
//!
//! ```toml
//! [kafka]                      # shared by every pipeline
//! brokers = "kafka:9092"
//!
//! [[pipelines]]
//! name = "orders"
//! postgres = { url = "postgres://walship@orders-db/app", slot = "walship_orders" }
//!
//! [[pipelines]]
//! name = "billing"
//! postgres = { url = "postgres://walship@billing-db/app" }
//! outbox = { topic = "billing.{aggregatetype}" }
//! kafka = { librdkafka = { "linger.ms" = "20" } }
//! ```
//!
//! `[cluster]` (with `[[pipelines]]` only) lets several processes started with this file divide
//! the pipelines among themselves; see [`crate::cluster`].
//!
//! Invariants: each pipeline is validated as a whole configuration would be, and its errors
//! name it; two pipelines never share a name, nor a slot on the same server; `[metrics]` is the
//! process's and cannot be set per pipeline. `WALSHIP_*` environment overrides apply to the
//! shared tables (a pipeline's own value takes precedence over them).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::env::apply_env;
use super::format::{Config, ConfigError, MetricsConfig, read_file};
use crate::scheduling::CpuScheduling;

/// Tables a pipeline may set for itself.
const PIPELINE_TABLES: [&str; 4] = ["postgres", "outbox", "kafka", "run"];

/// What one process runs.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The pipelines, in file order; exactly one, unnamed, for a file without `[[pipelines]]`.
    pub pipelines: Vec<Pipeline>,
    /// `[metrics]`, shared by the process.
    pub metrics: MetricsConfig,
    /// `[cluster]`: several processes share the pipelines (`None`: this process runs them all).
    pub cluster: Option<ClusterConfig>,
    /// `run.cpu_scheduling`, the process's (every pipeline has the same).
    pub cpu_scheduling: CpuScheduling,
}

/// `[cluster]`: the Kafka consumer group through which processes started with the same file
/// (or with files that share some pipelines) divide its pipelines.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Consumer group id, the same in every process of the deployment (required).
    pub group: String,
    /// Prefix of the coordination topics: pipeline `name` is coordinated through topic
    /// `<prefix><name>` (one partition, no records). Default `walship.<group>.pipeline.`.
    pub topic_prefix: Option<String>,
    /// The single coordination topic of earlier versions (one partition per pipeline, by
    /// index): refused with the way to move on, never silently ignored.
    pub topic: Option<String>,
    /// How long the group waits for a process that stopped answering before moving its
    /// pipelines (default 6,000 ms, the smallest a Kafka broker accepts by default).
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
}

fn default_session_timeout_ms() -> u64 {
    6_000
}

/// The longest pipeline name (see [`pipeline_name`]).
const MAX_PIPELINE_NAME: usize = 63;

impl ClusterConfig {
    /// The prefix of the coordination topics.
    pub fn topic_prefix(&self) -> String {
        self.topic_prefix
            .clone()
            .unwrap_or_else(|| format!("walship.{}.pipeline.", self.group))
    }

    /// The coordination topic of pipeline `name`: named after the pipeline, so every process
    /// that knows the pipeline means the same topic by it, whatever else its file lists.
    pub fn coordination_topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix())
    }

    /// `session_timeout_ms` as a duration.
    pub fn session_timeout(&self) -> Duration {
        Duration::from_millis(self.session_timeout_ms)
    }

    /// How long a pipeline may go without an owner after any change before it counts as
    /// unowned: the group notices a silent process within a session timeout, a group that then
    /// does not settle falls back after one more, and the new owner needs a few seconds to
    /// start.
    pub fn move_bound(&self) -> Duration {
        self.session_timeout() * 2 + Duration::from_secs(5)
    }

    /// Takes `[cluster]` out of `table` and checks it; `None` when absent.
    fn take(table: &mut toml::Table, origin: &str) -> Result<Option<Self>, ConfigError> {
        let Some(value) = table.remove("cluster") else {
            return Ok(None);
        };
        let cluster: ClusterConfig = value
            .try_into()
            .map_err(|e| ConfigError(format!("in {origin}: [cluster]: {e}")))?;
        if cluster.group.is_empty()
            || !walship_kafka::route::is_legal_topic(cluster.group.as_bytes())
        {
            return Err(ConfigError(format!(
                "in {origin}: cluster.group = {:?}: use letters, digits, '.', '_' and '-' \
                 (the same in every process that shares these pipelines)",
                cluster.group
            )));
        }
        if let Some(topic) = &cluster.topic {
            return Err(ConfigError(format!(
                "in {origin}: cluster.topic = {topic:?} named the single coordination topic of \
                 earlier versions, which mapped pipelines to its partitions by their place in \
                 each file; every pipeline now has a coordination topic of its own, named \
                 cluster.topic_prefix + the pipeline's name. Remove cluster.topic (set \
                 cluster.topic_prefix to choose the names; the old topic can be deleted once \
                 no process of an earlier version runs)"
            )));
        }
        let longest = cluster.coordination_topic(&"x".repeat(MAX_PIPELINE_NAME));
        if !walship_kafka::route::is_legal_topic(longest.as_bytes()) {
            return Err(ConfigError(format!(
                "in {origin}: cluster.topic_prefix = {:?} does not make legal Kafka topic names \
                 with the pipelines' names: use letters, digits, '.', '_' and '-', at most {} \
                 characters",
                cluster.topic_prefix(),
                249 - MAX_PIPELINE_NAME
            )));
        }
        if !(1_000..=300_000).contains(&cluster.session_timeout_ms) {
            return Err(ConfigError(format!(
                "in {origin}: cluster.session_timeout_ms = {} is out of range: use 1000 to \
                 300000 (and at least the broker's group.min.session.timeout.ms, 6000 by default)",
                cluster.session_timeout_ms
            )));
        }
        Ok(Some(cluster))
    }
}

/// One pipeline: its name (`None` for a single-pipeline file) and its whole configuration.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// `pipelines[].name`; labels its metrics, log lines and readiness.
    pub name: Option<String>,
    /// The merged configuration.
    pub config: Config,
}

impl Deployment {
    /// Reads, overrides from the process environment, merges and validates.
    pub fn load(path: &Path) -> Result<Deployment, ConfigError> {
        Self::from_toml(
            &read_file(path)?,
            std::env::vars(),
            &path.display().to_string(),
        )
    }

    /// Parses `text`, applies `WALSHIP_<SECTION>__<KEY>` overrides from `env` to the shared
    /// tables, lays each pipeline over them and validates each. `origin` names the source.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        origin: &str,
    ) -> Result<Deployment, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(format!("in {origin}: {e}")))?;
        let listed = table.remove("pipelines");
        let applied = apply_env(&mut table, env)?;
        let cluster = ClusterConfig::take(&mut table, origin)?;
        let Some(listed) = listed else {
            if cluster.is_some() {
                return Err(ConfigError(format!(
                    "in {origin}: [cluster] shares [[pipelines]] among processes, and this file \
                     has none: declare the pipelines as [[pipelines]] with names, or remove \
                     [cluster] (for one slot, two processes with this file already run \
                     active-passive: the slot admits one of them)"
                )));
            }
            let config = Config::from_table(table, &applied, origin)?;
            return Ok(Deployment {
                metrics: config.metrics.clone(),
                cpu_scheduling: config.cpu_scheduling()?,
                pipelines: vec![Pipeline { name: None, config }],
                cluster: None,
            });
        };
        let toml::Value::Array(entries) = listed else {
            return Err(ConfigError(format!(
                "in {origin}: pipelines must be an array of tables: write each as [[pipelines]]"
            )));
        };
        if entries.is_empty() {
            return Err(ConfigError(format!(
                "in {origin}: pipelines is empty: declare at least one [[pipelines]] with a name, \
                 or remove the key for a single-pipeline file"
            )));
        }
        let mut pipelines = Vec::with_capacity(entries.len());
        let mut names = HashSet::new();
        let mut slots = HashSet::new();
        for (i, entry) in entries.into_iter().enumerate() {
            let toml::Value::Table(mut own) = entry else {
                return Err(ConfigError(format!(
                    "in {origin}: pipelines[{i}] is not a table: write it as [[pipelines]]"
                )));
            };
            let name = pipeline_name(&mut own, i, origin)?;
            if !names.insert(name.clone()) {
                return Err(ConfigError(format!(
                    "in {origin}: two pipelines are named {name:?}: give each its own name"
                )));
            }
            if let Some(key) = own.keys().find(|k| !PIPELINE_TABLES.contains(&k.as_str())) {
                return Err(ConfigError(format!(
                    "in {origin}: pipelines[{i}] ({name}) sets {key:?}, which a pipeline cannot \
                     set: a pipeline has a name and its own {} tables{}",
                    PIPELINE_TABLES.join(", "),
                    if key == "metrics" {
                        "; [metrics] is the process's, at the top of the file"
                    } else {
                        ""
                    }
                )));
            }
            let mut merged = table.clone();
            merge(&mut merged, own);
            let here = format!("{origin}, pipeline {name:?}");
            let config = Config::from_table(merged, &applied, &here).map_err(|e| {
                // Validation errors do not say where; the pipeline does.
                if e.0.starts_with("in ") {
                    e
                } else {
                    ConfigError(format!("in {here}: {}", e.0))
                }
            })?;
            let slot = (config.postgres.url.clone(), config.postgres.slot.clone());
            if !slots.insert(slot) {
                return Err(ConfigError(format!(
                    "in {origin}: pipeline {name:?} uses slot {:?} of a server another pipeline \
                     already streams from: give it its own postgres.slot (a slot admits one \
                     consumer)",
                    config.postgres.slot
                )));
            }
            pipelines.push(Pipeline {
                name: Some(name),
                config,
            });
        }
        let metrics = pipelines
            .first()
            .map(|p| p.config.metrics.clone())
            .unwrap_or_default();
        if cluster.is_some()
            && let Some(first) = pipelines.first()
            && let Some(other) = pipelines
                .iter()
                .find(|p| p.config.kafka.brokers != first.config.kafka.brokers)
        {
            return Err(ConfigError(format!(
                "in {origin}: with [cluster], every pipeline uses the same kafka.brokers (the \
                 group that divides them lives there), but pipeline {:?} uses {:?} and pipeline \
                 {:?} uses {:?}: set kafka.brokers once, in the shared [kafka] table",
                first.name.as_deref().unwrap_or_default(),
                first.config.kafka.brokers,
                other.name.as_deref().unwrap_or_default(),
                other.config.kafka.brokers
            )));
        }
        if let Some(first) = pipelines.first()
            && let Some(other) = pipelines
                .iter()
                .find(|p| p.config.run.cpu_scheduling != first.config.run.cpu_scheduling)
        {
            return Err(ConfigError(format!(
                "in {origin}: run.cpu_scheduling is the process's (its threads serve every \
                 pipeline), but pipeline {:?} sets {:?} and pipeline {:?} {:?}: set it once, in \
                 the top-level [run] table",
                first.name.as_deref().unwrap_or_default(),
                first.config.run.cpu_scheduling,
                other.name.as_deref().unwrap_or_default(),
                other.config.run.cpu_scheduling
            )));
        }
        // Every pipeline's value was validated with its configuration and they are all equal.
        let cpu_scheduling = match pipelines.first() {
            Some(first) => first.config.cpu_scheduling()?,
            None => CpuScheduling::default(),
        };
        Ok(Deployment {
            pipelines,
            metrics,
            cluster,
            cpu_scheduling,
        })
    }

    /// True for a file without `[[pipelines]]`.
    pub fn is_single(&self) -> bool {
        matches!(self.pipelines.as_slice(), [Pipeline { name: None, .. }])
    }
}

/// Takes `name` out of a pipeline's table: 1-63 lower-case letters, digits, `_` and `-`.
fn pipeline_name(own: &mut toml::Table, i: usize, origin: &str) -> Result<String, ConfigError> {
    match own.remove("name") {
        Some(toml::Value::String(name))
            if (1..=MAX_PIPELINE_NAME).contains(&name.len())
                && name.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-'
                }) =>
        {
            Ok(name)
        }
        Some(other) => Err(ConfigError(format!(
            "in {origin}: pipelines[{i}].name = {other} is not a pipeline name: use 1-63 \
             lower-case letters, digits, '_' and '-' (it labels metrics and log lines)"
        ))),
        None => Err(ConfigError(format!(
            "in {origin}: pipelines[{i}] has no name: add name = \"...\" (it labels metrics, \
             log lines and /readyz/<name>)"
        ))),
    }
}

/// Lays `over` onto `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

#[cfg(test)]
mod tests;
