//! The configuration file's format: the TOML tables and their defaults, read into [`Config`].
//!
//! Owns the shape of one pipeline's configuration (`[postgres]`, `[outbox]`, `[kafka]`,
//! `[run]`, `[metrics]`), the defaults of every key, and turning a TOML table (after the
//! environment layer: `env`) into a validated [`Config`].
//!
//! Invariant: every key that is accepted has an effect, and every key that is not known is an
//! error that names it (`deny_unknown_fields`). Secrets never live in this structure's `Debug`
//! output or in logs: passwords are read from the environment or files at start-up and held in
//! [`Secret`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration problem: what, where, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// A secret value: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(crate) String);

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
    /// A regular expression the aggregate type must match whole (Debezium's
    /// `route.topic.regex`); `topic` may then name its groups, `{1}` or `{name}`. `""` (the
    /// default): the whole value, no regular expression.
    #[serde(default)]
    pub topic_regex: String,
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
    /// Further columns and where they go, as Debezium's `table.fields.additional.placement`:
    /// `"column:header[:name]"`, `"column:envelope[:name]"` or `"column:partition"`.
    #[serde(default)]
    pub additional_placement: Vec<String>,
    /// Column (or message field) holding the event's time, the record timestamp instead of the
    /// commit time: a `timestamptz` (or `timestamp`, read as UTC), or an integer of ms since the
    /// Unix epoch; `""` (the default) = the commit time.
    #[serde(default)]
    pub timestamp_column: String,
    /// An empty payload (zero bytes) is a tombstone too, as
    /// Debezium's `route.tombstone.on.empty.payload`; a NULL payload always is.
    #[serde(default)]
    pub tombstone_on_empty_payload: bool,
    /// Column (or message field) holding the writer's W3C `traceparent`, copied to the header
    /// of that name when well formed; `""` (the default) = off.
    #[serde(default)]
    pub traceparent_column: String,
    /// Column (or message field) holding the writer's W3C `tracestate`, copied beside a
    /// well-formed `traceparent`; `""` (the default) = off.
    #[serde(default)]
    pub tracestate_column: String,
    /// Records as CloudEvents: `off` (the default), `binary` (`ce_*` headers, the payload as
    /// the value) or `structured` (the event as `application/cloudevents+json`).
    #[serde(default)]
    pub cloudevents: CloudEventsMode,
    /// CloudEvents `id`: a template over `{id}`, `{type}`, `{aggregatetype}`,
    /// `{aggregateid}`, `{position}`, `{source}`.
    #[serde(default = "default_ce_id")]
    pub cloudevents_id: String,
    /// CloudEvents `source` (a template).
    #[serde(default = "default_ce_source")]
    pub cloudevents_source: String,
    /// CloudEvents `type` (a template).
    #[serde(default = "default_ce_type")]
    pub cloudevents_type: String,
    /// CloudEvents `subject` (a template); `""` = none.
    #[serde(default = "default_ce_subject")]
    pub cloudevents_subject: String,
    /// CloudEvents `datacontenttype`; `""` = by the payload column's type.
    #[serde(default)]
    pub cloudevents_data_content_type: String,
    /// Roles that write outbox messages. Only `walship check` reads it: with
    /// `message_prefixes` set it warns when any other login role (superusers and walship's own
    /// aside) may execute `pg_logical_emit_message`, since each could publish events or stop
    /// the pipeline.
    #[serde(default)]
    pub message_writers: Vec<String>,
}

/// `outbox.cloudevents`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloudEventsMode {
    /// walship's own records.
    #[default]
    Off,
    /// Binary content mode.
    Binary,
    /// Structured content mode (JSON event format).
    Structured,
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
            topic_regex: String::new(),
            on_bad_row: BadRowPolicy::Fail,
            dead_letter_topic: default_dead_letter_topic(),
            allowed_aggregate_types: Vec::new(),
            max_topics: default_max_topics(),
            message_prefixes: Vec::new(),
            additional_placement: Vec::new(),
            timestamp_column: String::new(),
            tombstone_on_empty_payload: false,
            traceparent_column: String::new(),
            tracestate_column: String::new(),
            cloudevents: CloudEventsMode::Off,
            cloudevents_id: default_ce_id(),
            cloudevents_source: default_ce_source(),
            cloudevents_type: default_ce_type(),
            cloudevents_subject: default_ce_subject(),
            cloudevents_data_content_type: String::new(),
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
    /// Pipelines of one process with the same producer settings share one producer (its
    /// threads, connections and batches); `false` gives each its own.
    #[serde(default = "yes")]
    pub share_producer: bool,
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
fn default_ce_id() -> String {
    "{id}".into()
}
fn default_ce_source() -> String {
    "/outbox/{aggregatetype}".into()
}
fn default_ce_type() -> String {
    "{type}".into()
}
fn default_ce_subject() -> String {
    "{aggregateid}".into()
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

impl Config {
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
}

/// The text of the configuration file at `path`.
pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))
}
