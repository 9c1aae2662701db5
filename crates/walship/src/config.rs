//! Configuration: the TOML file, `WALSHIP_<SECTION>__<KEY>` environment overrides, validation.
//!
//! Invariant: every key that is accepted has an effect, and every key that is not known is an
//! error that names it (`deny_unknown_fields`). Secrets never live in this structure's `Debug`
//! output or in logs: passwords are read from the environment or files at start-up and held in
//! [`Secret`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::scheduling::CpuScheduling;
use walship_kafka::{SinkSettings, TopicLimits, TopicRouter};
use walship_postgres::{
    ConnectConfig, ConnectParams, OutboxSpec, ReadBatching, SslMode, TableName,
};

/// A configuration problem: what, where, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A secret value: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the outbox lives.
    pub postgres: PostgresConfig,
    /// The outbox table and how rows become records.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// Where records go.
    pub kafka: KafkaConfig,
    /// Process behaviour.
    #[serde(default)]
    pub run: RunConfig,
    /// Metrics and health endpoints.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for `/metrics`, `/healthz`, `/readyz` and `/active` (e.g. `0.0.0.0:10187`, or an
    /// IP address alone for [`DEFAULT_METRICS_PORT`]); unset = off.
    pub listen: Option<String>,
}

/// walship's metrics port when `metrics.listen` names an address without one. Not 9187
/// (postgres_exporter's) nor any port of 9100-9999, which the Prometheus project's list of
/// exporter ports has given out; clear of the Kubernetes components' 10248-10260 too.
pub const DEFAULT_METRICS_PORT: u16 = 10187;

impl MetricsConfig {
    /// `listen`, parsed; `None` when the endpoints are off. An IP address without a port gets
    /// [`DEFAULT_METRICS_PORT`].
    pub fn address(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        self.listen
            .as_deref()
            .map(|addr| {
                addr.parse().or_else(|e| {
                    let ip = addr.trim_start_matches('[').trim_end_matches(']');
                    ip.parse::<std::net::IpAddr>()
                        .map(|ip| std::net::SocketAddr::new(ip, DEFAULT_METRICS_PORT))
                        .map_err(|_| {
                            ConfigError(format!(
                                "metrics.listen {addr:?} is not a socket address ({e}); expected \
                                 e.g. \"0.0.0.0:{DEFAULT_METRICS_PORT}\", or \"0.0.0.0\" for \
                                 port {DEFAULT_METRICS_PORT}"
                            ))
                        })
                })
            })
            .transpose()
    }
}

/// `[postgres]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style connection string or URL, without the password (required).
    pub url: String,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Path of a file holding the password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// TLS mode for both connections: `disable`, `prefer`, `require`, `verify-ca`,
    /// `verify-full`. Overrides the URL's `sslmode`; default `prefer` (like libpq).
    pub sslmode: Option<String>,
    /// PEM file of the CA(s) that signed the server's certificate (`system`: the OS trust
    /// store). Overrides the URL's `sslrootcert`.
    pub sslrootcert: Option<String>,
    /// Client certificate (PEM) for `cert` authentication / `clientcert=verify-*`.
    pub sslcert: Option<PathBuf>,
    /// The client certificate's private key (unencrypted PKCS#8 PEM, mode 0600).
    pub sslkey: Option<PathBuf>,
    /// Logical replication slot (created with pgoutput when missing and `create_slot`).
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication that includes the outbox table.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Create the slot if it does not exist.
    #[serde(default = "yes")]
    pub create_slot: bool,
    /// Create the publication if it does not exist.
    #[serde(default = "yes")]
    pub create_publication: bool,
    /// Most milliseconds between standby status updates while streaming.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// Every this many milliseconds, write a tiny non-transactional logical message
    /// (`pg_logical_emit_message(false, 'walship.heartbeat', '')`) so the slot keeps advancing on
    /// a server whose other databases are busy while the outbox is quiet. 0 = off.
    #[serde(default)]
    pub heartbeat_interval_ms: u64,
    /// Table (in the outbox table's schema unless qualified) where walship records the slots it
    /// created, so a slot dropped later is refused instead of silently re-created. "" = off.
    #[serde(default = "default_slot_history_table")]
    pub slot_history_table: String,
    /// How often, while streaming, walship checks that the slot, the publication and the
    /// outbox table still exist (a dropped one stops walship with an explanation).
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
    /// Batch reads from the walsender: wake once per 32 KiB or per 1–2 ms and keep a small
    /// receive window, so the server sends in bulk. `auto` (default): on when the server is
    /// reached over loopback TCP; `on`: any TCP connection (the window caps throughput near
    /// 50 MB/s per ms of round trip); `off`: OS defaults. Linux 5.8 or later only.
    #[serde(default = "default_read_batching")]
    pub read_batching: String,
    /// Create the slot as a failover slot (PostgreSQL 17+), which standbys with
    /// `sync_replication_slots = on` copy, so walship continues from it on a promoted standby;
    /// an existing slot gets failover turned on at start. On an older server walship refuses to
    /// start. Default false.
    #[serde(default)]
    pub failover_slot: bool,
    /// Starts a new `walship.source` (`<system id>/<slot>/<epoch>` instead of
    /// `<system id>/<slot>`) when above 0: for continuing on a server whose history branched
    /// before what Kafka holds (walship stops there and names the value to set), or on a
    /// cloned cluster that shares the system identifier and the slot name. Default 0.
    #[serde(default)]
    pub source_epoch: u32,
}

/// `[outbox]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// `schema.table` of the outbox.
    #[serde(default = "default_table")]
    pub table: String,
    /// Event id column → header `id` (empty string: no id header).
    #[serde(default = "default_id")]
    pub id_column: String,
    /// Aggregate type column (routes the topic).
    #[serde(default = "default_aggregate_type")]
    pub aggregate_type_column: String,
    /// Aggregate id column → record key.
    #[serde(default = "default_aggregate_id")]
    pub aggregate_id_column: String,
    /// Event type column → header `type` (empty string: no type header).
    #[serde(default = "default_type")]
    pub type_column: String,
    /// Payload column → record value.
    #[serde(default = "default_payload")]
    pub payload_column: String,
    /// Extra columns copied to headers of the same name.
    #[serde(default)]
    pub header_columns: Vec<String>,
    /// Topic template; `{aggregatetype}` is replaced by the row's aggregate type.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// What to do with a row that cannot become a record (NULL key, missing column, unroutable
    /// aggregate type, too large for the broker).
    #[serde(default)]
    pub on_bad_row: BadRowPolicy,
    /// Topic for rows dead-lettered under `on_bad_row = "dead-letter"`.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// Aggregate types that may be routed (exact, case-sensitive); empty = any. A row with
    /// another value is a bad row (`on_bad_row`). Needs `{aggregatetype}` in `topic`.
    #[serde(default)]
    pub allowed_aggregate_types: Vec<String>,
    /// Most distinct topics `topic` may route to since walship started (the dead-letter topic
    /// does not count); a row that would route to one more is a bad row. 0 = no bound.
    #[serde(default = "default_max_topics")]
    pub max_topics: u64,
    /// Prefixes of transactional logical decoding messages (`pg_logical_emit_message(true,
    /// prefix, content)`) that are outbox events, matched exactly; empty (the default) = none.
    #[serde(default)]
    pub message_prefixes: Vec<String>,
    /// Roles that write outbox messages. Only `walship check` reads it: with
    /// `message_prefixes` set it warns when any other login role (superusers and walship's own
    /// aside) may execute `pg_logical_emit_message`, since each could publish events or stop
    /// the pipeline.
    #[serde(default)]
    pub message_writers: Vec<String>,
}

/// `outbox.on_bad_row`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BadRowPolicy {
    /// Stop without confirming past the row; the error names table, LSN and column.
    #[default]
    Fail,
    /// Publish the row (as JSON of its columns) with the reason in headers to
    /// `dead_letter_topic`, then continue.
    DeadLetter,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            table: default_table(),
            id_column: default_id(),
            aggregate_type_column: default_aggregate_type(),
            aggregate_id_column: default_aggregate_id(),
            type_column: default_type(),
            payload_column: default_payload(),
            header_columns: Vec::new(),
            topic: default_topic(),
            on_bad_row: BadRowPolicy::Fail,
            dead_letter_topic: default_dead_letter_topic(),
            allowed_aggregate_types: Vec::new(),
            max_topics: default_max_topics(),
            message_prefixes: Vec::new(),
            message_writers: Vec::new(),
        }
    }
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers` (required).
    pub brokers: String,
    /// `client.id`.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Create missing topics.
    #[serde(default = "yes")]
    pub create_topics: bool,
    /// Partitions of created topics.
    #[serde(default = "default_partitions")]
    pub topic_partitions: i32,
    /// Replication factor of created topics.
    #[serde(default = "default_replication_factor")]
    pub topic_replication_factor: i32,
    /// Raw librdkafka properties (applied after walship's defaults). No secrets here.
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
    /// librdkafka properties whose values come from environment variables:
    /// `{ "sasl.password" = "KAFKA_PASSWORD" }`.
    #[serde(default)]
    pub secret_env: BTreeMap<String, String>,
    /// librdkafka properties whose values come from files.
    #[serde(default)]
    pub secret_files: BTreeMap<String, PathBuf>,
}

/// `[run]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// On shutdown, how long to wait for in-flight records to be acknowledged.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// Most events handed to the producer and not yet acknowledged. When reached, walship stops
    /// reading until half of them are acknowledged (bounded memory, batched wake-ups). The
    /// window caps throughput at about half of it per acknowledgement round trip: 20,000 keeps
    /// that cap far above what one slot streams even where round trips take tens of ms.
    #[serde(default = "default_max_in_flight_events")]
    pub max_in_flight_events: u64,
    /// Most transactions with events tracked between the oldest unacknowledged one and the
    /// newest read (acknowledged or not: one stalled partition holds back every later
    /// confirmation). When reached, walship stops reading, keeping standby status flowing,
    /// until the oldest completes: memory stays bounded when one partition stalls.
    #[serde(default = "default_max_pending_transactions")]
    pub max_pending_transactions: u64,
    /// After a start that follows an unclean stop, read back each topic's tail before the first
    /// send and skip the events an earlier run already delivered (needs read access to the
    /// topics; without it walship warns and sends them again).
    #[serde(default = "yes")]
    pub resume_dedup: bool,
    /// How the kernel schedules walship's threads: `"batch"` (`SCHED_BATCH`: walship's
    /// wake-ups do not preempt what runs, usually the database) or `"normal"` (the OS
    /// default). The process's: with `[[pipelines]]`, set it in the top-level `[run]`.
    #[serde(default = "default_cpu_scheduling")]
    pub cpu_scheduling: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            max_in_flight_events: default_max_in_flight_events(),
            max_pending_transactions: default_max_pending_transactions(),
            resume_dedup: true,
            cpu_scheduling: default_cpu_scheduling(),
        }
    }
}

fn default_cpu_scheduling() -> String {
    "batch".into()
}
fn yes() -> bool {
    true
}
fn default_slot() -> String {
    "walship".into()
}
fn default_publication() -> String {
    "walship_outbox".into()
}
fn default_read_batching() -> String {
    "auto".into()
}

fn default_status_interval_ms() -> u64 {
    1000
}
fn default_slot_history_table() -> String {
    "walship_slots".into()
}
fn default_watch_interval_ms() -> u64 {
    10_000
}
fn default_table() -> String {
    "public.outbox".into()
}
fn default_id() -> String {
    "id".into()
}
fn default_aggregate_type() -> String {
    "aggregatetype".into()
}
fn default_aggregate_id() -> String {
    "aggregateid".into()
}
fn default_type() -> String {
    "type".into()
}
fn default_payload() -> String {
    "payload".into()
}
fn default_dead_letter_topic() -> String {
    "outbox.dead-letter".into()
}
fn default_max_topics() -> u64 {
    1000
}
fn default_topic() -> String {
    "outbox.event.{aggregatetype}".into()
}
fn default_client_id() -> String {
    "walship".into()
}
fn default_partitions() -> i32 {
    6
}
fn default_replication_factor() -> i32 {
    1
}
fn default_shutdown_timeout_ms() -> u64 {
    30_000
}
fn default_max_in_flight_events() -> u64 {
    20_000
}
/// Default of `run.max_pending_transactions`.
pub const DEFAULT_MAX_PENDING_TRANSACTIONS: u64 = 100_000;

fn default_max_pending_transactions() -> u64 {
    DEFAULT_MAX_PENDING_TRANSACTIONS
}

/// Prefix of environment overrides: `WALSHIP_KAFKA__BROKERS` sets `kafka.brokers`.
pub const ENV_PREFIX: &str = "WALSHIP_";

impl Config {
    /// Reads, overrides from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::from_toml(
            &read_file(path)?,
            std::env::vars(),
            &path.display().to_string(),
        )
    }

    /// Parses `text`, applies `WALSHIP_<SECTION>__<KEY>` overrides from `env`, and validates.
    /// `origin` names the source in errors.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        origin: &str,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError(format!("in {origin}: {e}")))?;
        let applied = apply_env(&mut table, env)?;
        Self::from_table(table, &applied, origin)
    }

    /// Deserializes and validates one pipeline's table; `applied` names the environment
    /// overrides already in it (for the error message).
    pub(crate) fn from_table(
        table: toml::Table,
        applied: &[String],
        origin: &str,
    ) -> Result<Config, ConfigError> {
        let config: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            let env_note = if applied.is_empty() {
                String::new()
            } else {
                format!(" (environment overrides applied: {})", applied.join(", "))
            };
            ConfigError(format!("in {origin}{env_note}: {}", e.message()))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let slot = &self.postgres.slot;
        if slot.is_empty()
            || slot.len() > 63
            || !slot
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        {
            return Err(ConfigError(format!(
                "postgres.slot {slot:?} is not a valid replication slot name: use 1-63 lower-case letters, digits and '_'"
            )));
        }
        if self.postgres.publication.is_empty() {
            return Err(ConfigError("postgres.publication must not be empty".into()));
        }
        self.connect_config()?;
        if self.postgres.status_interval_ms == 0 {
            return Err(ConfigError(
                "postgres.status_interval_ms must be at least 1".into(),
            ));
        }
        self.read_batching()?;
        self.cpu_scheduling()?;
        let router = TopicRouter::new(&self.outbox.topic)
            .map_err(|e| ConfigError(format!("outbox.topic: {e}")))?;
        if router.uses_aggregate_type() && self.outbox.aggregate_type_column.is_empty() {
            return Err(ConfigError(
                "outbox.topic uses {aggregatetype} but outbox.aggregate_type_column is empty: name the column or use a fixed topic".into(),
            ));
        }
        if self.run.resume_dedup && self.outbox.id_column.is_empty() {
            // The position alone repeats on a diverged timeline or a cloned cluster with the
            // same system identifier: skipping on it could drop a different event.
            return Err(ConfigError(
                "outbox.id_column is empty but run.resume_dedup is on: after a crash walship skips \
                 an event only when a record with its position and its outbox id is in the topic, \
                 and the position alone is not enough (it repeats on a diverged timeline or a \
                 cloned cluster). Name the event id column in outbox.id_column, or set \
                 run.resume_dedup = false to accept duplicates after a crash"
                    .into(),
            ));
        }
        self.validate_topic_limits(&router)?;
        for (role, v) in [
            ("aggregate_id_column", &self.outbox.aggregate_id_column),
            ("payload_column", &self.outbox.payload_column),
        ] {
            if v.is_empty() {
                return Err(ConfigError(format!("outbox.{role} must name a column")));
            }
        }
        if let Some(c) = self
            .outbox
            .header_columns
            .iter()
            .find(|c| c.starts_with("walship."))
        {
            return Err(ConfigError(format!(
                "outbox.header_columns: {c:?} would become a header in walship's own `walship.` \
                 namespace (which names each record's source and position): rename the column \
                 with a view, or leave it out"
            )));
        }
        if let Some(p) = self
            .outbox
            .message_prefixes
            .iter()
            .find(|p| p.is_empty() || p.starts_with("walship."))
        {
            return Err(ConfigError(format!(
                "outbox.message_prefixes: {p:?} cannot be an outbox prefix: prefixes must not be \
                 empty, and `walship.` is walship's own namespace (its heartbeat messages use \
                 walship.heartbeat); use a prefix of your own, e.g. \"outbox\""
            )));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError(
                "kafka.brokers must list at least one host:port".into(),
            ));
        }
        if self.outbox.on_bad_row == BadRowPolicy::DeadLetter
            && !walship_kafka::route::is_legal_topic(self.outbox.dead_letter_topic.as_bytes())
        {
            return Err(ConfigError(format!(
                "outbox.dead_letter_topic {:?} is not a legal Kafka topic name: use 1-249 characters of letters, digits, '.', '_' and '-'",
                self.outbox.dead_letter_topic
            )));
        }
        self.metrics.address()?;
        if self.run.max_in_flight_events < 2 {
            return Err(ConfigError(
                "run.max_in_flight_events must be at least 2".into(),
            ));
        }
        if self.run.max_pending_transactions < 2 {
            return Err(ConfigError(
                "run.max_pending_transactions must be at least 2".into(),
            ));
        }
        if self.kafka.topic_partitions < 1 {
            return Err(ConfigError(
                "kafka.topic_partitions must be at least 1".into(),
            ));
        }
        if self.kafka.topic_replication_factor < 1 && self.kafka.topic_replication_factor != -1 {
            return Err(ConfigError(format!(
                "kafka.topic_replication_factor = {} is not a replication factor: use 1 or more, \
                 or -1 for the broker's default",
                self.kafka.topic_replication_factor
            )));
        }
        if self.postgres.watch_interval_ms < 100 {
            return Err(ConfigError(format!(
                "postgres.watch_interval_ms = {} is too short: use 100 or more (each check queries \
                 the server)",
                self.postgres.watch_interval_ms
            )));
        }
        for key in self.kafka.librdkafka.keys() {
            if is_secret_property(key) {
                return Err(ConfigError(format!(
                    "kafka.librdkafka.{key:?} holds a secret: do not put secrets in the config file; use \
                     kafka.secret_env = {{ {key:?} = \"ENV_VAR_NAME\" }} or kafka.secret_files"
                )));
            }
        }
        let librdkafka = self.kafka.librdkafka.keys().map(|k| ("librdkafka", k));
        let secret_env = self.kafka.secret_env.keys().map(|k| ("secret_env", k));
        let secret_files = self.kafka.secret_files.keys().map(|k| ("secret_files", k));
        for (table, key) in librdkafka.chain(secret_env).chain(secret_files) {
            if MANAGED_PROPERTIES.contains(&key.as_str()) {
                return Err(ConfigError(format!(
                    "kafka.{table}.{key:?} is managed by walship (idempotent producer with acks=all, \
                     brokers from kafka.brokers, topics created per kafka.create_topics): remove it"
                )));
            }
        }
        Ok(())
    }

    /// `outbox.allowed_aggregate_types` and `outbox.max_topics` against `outbox.topic`.
    fn validate_topic_limits(&self, router: &TopicRouter) -> Result<(), ConfigError> {
        let allowed = &self.outbox.allowed_aggregate_types;
        if allowed.is_empty() {
            return Ok(());
        }
        if !router.uses_aggregate_type() {
            return Err(ConfigError(format!(
                "outbox.allowed_aggregate_types is set but outbox.topic {:?} does not use \
                 {{aggregatetype}}, so every row goes to that one topic: remove the list, or put \
                 {{aggregatetype}} in outbox.topic",
                self.outbox.topic
            )));
        }
        let mut topics = std::collections::BTreeSet::new();
        for value in allowed {
            let topic = router.render_unchecked(value.as_bytes());
            if !walship_kafka::route::is_legal_topic(topic.as_bytes()) {
                return Err(ConfigError(format!(
                    "outbox.allowed_aggregate_types: {value:?} would route to {topic:?}, which is \
                     not a legal Kafka topic name (1-249 characters of letters, digits, '.', '_' \
                     and '-'): remove it or fix outbox.topic"
                )));
            }
            topics.insert(topic);
        }
        let max = self.outbox.max_topics;
        if max != 0 && topics.len() as u64 > max {
            return Err(ConfigError(format!(
                "outbox.allowed_aggregate_types lists {} values but outbox.max_topics = {max} \
                 would refuse rows of some of them: raise outbox.max_topics to at least {} (or 0 \
                 for no bound), or shorten the list",
                topics.len(),
                topics.len()
            )));
        }
        Ok(())
    }

    /// The topic router for `outbox.topic` with the allow-list and the bound; the dead-letter
    /// topic is exempt from the bound when it is in use. One per run: its clones share the count.
    pub fn topic_router(&self) -> Result<TopicRouter, ConfigError> {
        let router = TopicRouter::new(&self.outbox.topic)
            .map_err(|e| ConfigError(format!("outbox.topic: {e}")))?;
        let max_topics = usize::try_from(self.outbox.max_topics).unwrap_or(usize::MAX);
        Ok(router.with_limits(TopicLimits {
            allowed_aggregate_types: self.outbox.allowed_aggregate_types.clone(),
            max_topics,
            exempt_topic: (self.outbox.on_bad_row == BadRowPolicy::DeadLetter)
                .then(|| self.outbox.dead_letter_topic.clone()),
        }))
    }

    /// Everything needed to connect to PostgreSQL: [`connect_config`](Self::connect_config)
    /// plus how replication streams read (`postgres.read_batching`).
    pub fn connect_params(&self) -> Result<ConnectParams, ConfigError> {
        Ok(ConnectParams {
            config: self.connect_config()?,
            read_batching: self.read_batching()?,
        })
    }

    /// The parsed PostgreSQL connection parameters (password applied separately): the URL,
    /// with `postgres.sslmode` / `sslrootcert` / `sslcert` / `sslkey` overriding the URL's.
    /// Dereferences to the [`tokio_postgres::Config`].
    pub fn connect_config(&self) -> Result<ConnectConfig, ConfigError> {
        let mut c = ConnectConfig::parse(&self.postgres.url).map_err(|e| {
            ConfigError(format!(
                "postgres.url is not a valid connection string ({e}); expected e.g. postgres://walship@db.example:5432/app?sslmode=verify-full"
            ))
        })?;
        let pg = &self.postgres;
        if let Some(mode) = &pg.sslmode {
            c.tls.mode = mode.parse::<SslMode>().map_err(|_| {
                ConfigError(format!(
                    "postgres.sslmode {mode:?} is not one of {}: use verify-full (with postgres.sslrootcert) \
                     to encrypt and check the server's certificate",
                    SslMode::VALUES
                ))
            })?;
        }
        if let Some(root) = &pg.sslrootcert {
            c.tls.set_root_cert(root);
        }
        if let Some(cert) = &pg.sslcert {
            c.tls.client_cert = Some(cert.clone());
        }
        if let Some(key) = &pg.sslkey {
            c.tls.client_key = Some(key.clone());
        }
        if c.tls.client_cert.is_some() != c.tls.client_key.is_some() {
            return Err(ConfigError(
                "postgres.sslcert and postgres.sslkey go together: set both (the client certificate \
                 and its private key) or neither"
                    .into(),
            ));
        }
        let hosts = c.pg.get_hosts().len().max(c.pg.get_hostaddrs().len());
        if hosts > 1 && c.session_target == walship_postgres::hosts::SessionTarget::Any {
            return Err(ConfigError(format!(
                "postgres.url names {hosts} hosts but no target_session_attrs: walship creates \
                 its slot on and streams from the primary, and without it a list could check one \
                 server and stream from another. Add target_session_attrs=read-write (URL: \
                 ?target_session_attrs=read-write; key=value: target_session_attrs=read-write) \
                 so walship connects to whichever host is the primary and follows a failover, or \
                 name the primary alone"
            )));
        }
        Ok(c)
    }

    /// Resolves the PostgreSQL password: `password_file`, then `password_env`, then the URL's,
    /// then `PGPASSWORD`.
    pub fn postgres_password(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(path) = &self.postgres.password_file {
            return read_secret_file(path, "postgres.password_file").map(Some);
        }
        if let Some(var) = &self.postgres.password_env {
            return std::env::var(var).map(|v| Some(Secret(v))).map_err(|_| {
                ConfigError(format!(
                    "postgres.password_env names {var:?} but that environment variable is not set"
                ))
            });
        }
        let url_password = self
            .connect_config()?
            .get_password()
            .map(|p| Secret(String::from_utf8_lossy(p).into_owned()));
        Ok(url_password.or_else(|| std::env::var("PGPASSWORD").ok().map(Secret)))
    }

    /// The slot history table, qualified with the outbox table's schema when unqualified.
    pub fn slot_history(&self) -> walship_postgres::setup::SlotHistory {
        let name = &self.postgres.slot_history_table;
        let table = (!name.is_empty()).then(|| {
            if name.contains('.') {
                TableName::parse(name)
            } else {
                TableName {
                    schema: TableName::parse(&self.outbox.table).schema,
                    name: name.clone(),
                }
            }
        });
        walship_postgres::setup::SlotHistory { table }
    }

    /// The outbox definition for the PostgreSQL side.
    pub fn outbox_spec(&self) -> OutboxSpec {
        let router_uses_type = self
            .outbox
            .topic
            .contains(walship_kafka::route::AGGREGATE_TYPE);
        OutboxSpec {
            table: TableName::parse(&self.outbox.table),
            id: self.outbox.id_column.clone(),
            aggregate_type: if router_uses_type {
                self.outbox.aggregate_type_column.clone()
            } else {
                String::new()
            },
            aggregate_id: self.outbox.aggregate_id_column.clone(),
            event_type: self.outbox.type_column.clone(),
            payload: self.outbox.payload_column.clone(),
            header_columns: self.outbox.header_columns.clone(),
        }
    }

    /// Producer settings, with secrets resolved.
    pub fn sink_settings(&self) -> Result<SinkSettings, ConfigError> {
        self.sink_settings_with_env(|var| std::env::var(var).ok())
    }

    /// [`Config::sink_settings`] with `kafka.secret_env` looked up through `env`.
    fn sink_settings_with_env(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<SinkSettings, ConfigError> {
        let mut secret_properties = BTreeMap::new();
        for (prop, var) in &self.kafka.secret_env {
            let v = env(var).ok_or_else(|| {
                ConfigError(format!("kafka.secret_env.{prop:?} names {var:?} but that environment variable is not set"))
            })?;
            secret_properties.insert(prop.clone(), v);
        }
        for (prop, path) in &self.kafka.secret_files {
            let v = read_secret_file(path, &format!("kafka.secret_files.{prop:?}"))?;
            secret_properties.insert(prop.clone(), v.0);
        }
        Ok(SinkSettings {
            brokers: self.kafka.brokers.clone(),
            client_id: self.kafka.client_id.clone(),
            create_topics: self.kafka.create_topics,
            topic_partitions: self.kafka.topic_partitions,
            topic_replication_factor: self.kafka.topic_replication_factor,
            librdkafka: self.kafka.librdkafka.clone(),
            secret_properties,
        })
    }

    /// `postgres.read_batching`, parsed.
    pub fn read_batching(&self) -> Result<ReadBatching, ConfigError> {
        self.postgres
            .read_batching
            .parse()
            .map_err(|e| ConfigError(format!("postgres.{e}")))
    }

    /// `run.cpu_scheduling`, parsed.
    pub fn cpu_scheduling(&self) -> Result<CpuScheduling, ConfigError> {
        self.run
            .cpu_scheduling
            .parse()
            .map_err(|e| ConfigError(format!("run.{e}")))
    }

    /// How often to send standby status while streaming.
    pub fn status_interval(&self) -> Duration {
        Duration::from_millis(self.postgres.status_interval_ms)
    }

    /// How long shutdown waits for acknowledgements.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.run.shutdown_timeout_ms)
    }
}

/// librdkafka properties walship sets itself (with their aliases): overriding them would break
/// G1/G2 or let the broker create topics behind `kafka.create_topics`.
const MANAGED_PROPERTIES: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "bootstrap.servers",
    "metadata.broker.list",
    "allow.auto.create.topics",
];

fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k == "ssl.key.pem"
        || k == "sasl.oauthbearer.config"
}

fn read_secret_file(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    let v = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("{key}: cannot read {}: {e}", path.display())))?;
    Ok(Secret(v.trim_end_matches(['\n', '\r']).to_owned()))
}

/// The text of the configuration file at `path`.
pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))
}

/// Applies `WALSHIP_<SECTION>__<KEY>` overrides from `env` to `table`; returns the names of
/// those applied.
pub(crate) fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut applied = Vec::new();
    // Shallow overrides first, so `KAFKA__LIBRDKAFKA__X` refines `KAFKA__LIBRDKAFKA` whatever
    // the environment's order.
    let mut env: Vec<(String, String)> = env.into_iter().collect();
    env.sort_by(|(a, _), (b, _)| {
        (a.matches("__").count(), a.as_str()).cmp(&(b.matches("__").count(), b.as_str()))
    });
    for (name, value) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // SECTION__KEY, or deeper: KAFKA__LIBRDKAFKA__<property> sets one entry of a table.
        let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        let Some((key, tables)) = segments.split_last() else {
            continue;
        };
        if tables.is_empty() {
            continue;
        }
        let mut t = &mut *table;
        for (depth, section) in tables.iter().enumerate() {
            let entry = t
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(inner) = entry else {
                return Err(ConfigError(format!(
                    "{name}: [{}] is not a table",
                    tables[..=depth].join(".")
                )));
            };
            t = inner;
        }
        // Entries of nested tables (librdkafka properties, secret names) are strings.
        let parsed = if tables.len() > 1 {
            toml::Value::String(value.clone())
        } else {
            env_value(&value)
        };
        match (t.get_mut(key.as_str()), parsed) {
            // A table given whole (an inline table) adds to the file's entries.
            (Some(toml::Value::Table(existing)), toml::Value::Table(given)) => {
                existing.extend(given);
            }
            (_, v) => {
                t.insert(key.clone(), v);
            }
        }
        applied.push(name);
    }
    Ok(applied)
}

/// An environment value as TOML when it parses as a scalar or array, else as a string.
fn env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests;
