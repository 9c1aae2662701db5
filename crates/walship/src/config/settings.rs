//! Settings resolved once: the configuration turned into typed settings per layer.
//!
//! Owns the step from [`Config`] (what the operator wrote) to what each layer consumes — the
//! PostgreSQL source, the Kafka sink, the session — so the wiring in [`crate::run`] and [`crate::pipeline`]
//! only hands values down and never calls back into the configuration.
//!
//! Invariant: everything that can be wrong about a configuration (a connection string, a
//! secret that is not set, a topic template, a listen address) fails here, before any
//! connection is made, with the key that is wrong and how to fix it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use walship_kafka::record::cloudevents::{CloudEvents, Field, Mode, Template};
use walship_kafka::record::{Format, Placement};
use walship_kafka::{Producers, SinkSettings, TopicLimits, TopicRouter};
use walship_postgres::setup::SlotHistory;
use walship_postgres::{
    ConnectConfig, ConnectParams, OutboxSpec, ReadBatching, SslMode, TableName,
};

use super::env::read_secret_file;
use super::format::{BadRowPolicy, CloudEventsMode, Config, ConfigError, Secret};
use crate::scheduling::CpuScheduling;

/// Everything one run needs, per layer.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the events come from.
    pub source: SourceSettings,
    /// Where they go (the producer; the resume scanner and topic checks use the same).
    pub sink: SinkSettings,
    /// One streaming session's behaviour.
    pub session: SessionSettings,
    /// The topic router. One per run: its clones share the count of distinct topics, so a
    /// reconnect does not reset `outbox.max_topics`.
    pub router: TopicRouter,
    /// `/metrics`, `/healthz` and `/readyz` address (`metrics.listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// The process's producers: pipelines with the same producer settings share one
    /// (`kafka.share_producer`). A deployment gives every pipeline the same pool.
    pub producers: Arc<Producers>,
}

/// The PostgreSQL side: connection, slot, publication, outbox table.
#[derive(Clone)]
pub struct SourceSettings {
    /// Connection parameters (TLS, read batching) without the password.
    pub params: ConnectParams,
    /// The password, if any (never logged).
    pub password: Option<Secret>,
    /// `postgres.slot`.
    pub slot: String,
    /// `postgres.publication`.
    pub publication: String,
    /// `postgres.create_slot`.
    pub create_slot: bool,
    /// `postgres.create_publication`.
    pub create_publication: bool,
    /// `postgres.failover_slot`: the slot is a failover slot (PostgreSQL 17+).
    pub failover_slot: bool,
    /// Where walship records the slots it created.
    pub history: SlotHistory,
    /// The outbox table and which columns mean what.
    pub outbox: OutboxSpec,
    /// `postgres.heartbeat_interval_ms`; `None` when off.
    pub heartbeat: Option<Duration>,
    /// How often the watchdog checks slot, publication and table (validated: at least 100 ms).
    pub watch_interval: Duration,
    /// `postgres.source_epoch`: 0, or the epoch appended to the `walship.source` header.
    pub source_epoch: u32,
}

impl std::fmt::Debug for SourceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSettings")
            .field("postgres", &self.params.describe())
            .field("password", &self.password)
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("table", &self.outbox.table)
            .finish_non_exhaustive()
    }
}

/// The source layer with each part resolved on its own, so one that is wrong does not hide the
/// others: what `walship check` reports on, and what [`SourceSettings::resolve`] is made of.
#[derive(Debug)]
pub struct SourceParts {
    /// The connection parameters (`postgres.url` and the `ssl*` keys).
    pub connect: Result<ConnectConfig, ConfigError>,
    /// The password (`password_file`, `password_env`, the URL's, `PGPASSWORD`).
    pub password: Result<Option<Secret>, ConfigError>,
    /// `postgres.read_batching` (how replication streams read; `check` opens none).
    pub read_batching: Result<ReadBatching, ConfigError>,
    /// The outbox table and which columns mean what.
    pub outbox: OutboxSpec,
    /// Where walship records the slots it created.
    pub history: SlotHistory,
}

impl SourceParts {
    /// Resolves every part of `config`'s source layer.
    pub fn resolve(config: &Config) -> SourceParts {
        SourceParts {
            connect: config.connect_config(),
            password: config.postgres_password(),
            read_batching: config.read_batching(),
            outbox: config.outbox_spec(),
            history: config.slot_history(),
        }
    }
}

impl SourceSettings {
    /// Resolves the source layer alone (what `walship status` connects with).
    pub fn resolve(config: &Config) -> Result<SourceSettings, ConfigError> {
        let parts = SourceParts::resolve(config);
        let pg = &config.postgres;
        Ok(SourceSettings {
            params: ConnectParams {
                config: parts.connect?,
                read_batching: parts.read_batching?,
            },
            password: parts.password?,
            slot: pg.slot.clone(),
            publication: pg.publication.clone(),
            create_slot: pg.create_slot,
            create_publication: pg.create_publication,
            failover_slot: pg.failover_slot,
            history: parts.history,
            outbox: parts.outbox,
            heartbeat: (pg.heartbeat_interval_ms > 0)
                .then(|| Duration::from_millis(pg.heartbeat_interval_ms)),
            watch_interval: Duration::from_millis(pg.watch_interval_ms),
            source_epoch: pg.source_epoch,
        })
    }

    /// The `walship.source` header value for a server with `system_id`: `<system id>/<slot>`,
    /// with `/<epoch>` after it when `postgres.source_epoch` is set.
    pub fn source_id(&self, system_id: &str) -> String {
        match self.source_epoch {
            0 => format!("{system_id}/{}", self.slot),
            epoch => format!("{system_id}/{}/{epoch}", self.slot),
        }
    }

    /// The password as libpq wants it.
    pub fn password_bytes(&self) -> Option<&[u8]> {
        self.password.as_ref().map(|p| p.expose().as_bytes())
    }
}

/// One streaming session's behaviour (see [`crate::session::Session`]).
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Most time between two standby status updates.
    pub status_interval: Duration,
    /// How long a stop waits to finish the open transaction and for acknowledgements.
    pub shutdown_timeout: Duration,
    /// Most events handed to the producer and not acknowledged (validated: at least 2).
    pub max_in_flight: u64,
    /// Most transactions tracked between the oldest unacknowledged one and the newest read
    /// (at least 2).
    pub max_pending: u64,
    /// `Some(topic)` under `outbox.on_bad_row = "dead_letter"`; `None` to fail on a bad row.
    pub dead_letter_topic: Option<String>,
    /// Prefixes of logical messages that are outbox events (`outbox.message_prefixes`).
    pub message_prefixes: Vec<String>,
    /// Read topics back after an unclean stop (`run.resume_dedup`).
    pub resume_dedup: bool,
    /// The largest record the producer accepts (`message.max.bytes`): a dead letter's value is
    /// cut to fit it.
    pub max_record_bytes: usize,
    /// How event records are shaped (`outbox.cloudevents` and its attributes).
    pub format: Format,
    /// Where each extracted further column goes, in the order of the outbox spec's
    /// `header_columns` (`outbox.header_columns`, then `outbox.additional_placement`); empty
    /// when every one is a header of its column's name (the rows' headers are used as they are).
    pub placements: Vec<Placement>,
    /// `outbox.tombstone_on_empty_payload`.
    pub tombstone_on_empty_payload: bool,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            status_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            max_in_flight: 2_000,
            max_pending: super::format::DEFAULT_MAX_PENDING_TRANSACTIONS,
            dead_letter_topic: None,
            message_prefixes: Vec::new(),
            resume_dedup: true,
            max_record_bytes: 1_000_000,
            format: Format::Plain,
            placements: Vec::new(),
            tombstone_on_empty_payload: false,
        }
    }
}

impl Settings {
    /// Resolves every derived setting of `config` (secrets included) once.
    pub fn resolve(config: &Config) -> Result<Settings, ConfigError> {
        let metrics_listen = config.metrics.address()?;
        let source = SourceSettings::resolve(config)?;
        let sink = config.sink_settings()?;
        let session = SessionSettings {
            status_interval: config.status_interval(),
            shutdown_timeout: config.shutdown_timeout(),
            max_in_flight: config.run.max_in_flight_events,
            max_pending: config.run.max_pending_transactions,
            dead_letter_topic: (config.outbox.on_bad_row == BadRowPolicy::DeadLetter)
                .then(|| config.outbox.dead_letter_topic.clone()),
            message_prefixes: config.outbox.message_prefixes.clone(),
            resume_dedup: config.run.resume_dedup,
            max_record_bytes: sink.max_record_bytes(),
            format: config.record_format()?,
            placements: {
                let placed = config.placements()?;
                let plain = placed
                    .iter()
                    .all(|(c, p)| matches!(p, Placement::Header(n) if **n == **c));
                if plain {
                    Vec::new()
                } else {
                    placed.into_iter().map(|(_, p)| p).collect()
                }
            },
            tombstone_on_empty_payload: config.outbox.tombstone_on_empty_payload,
        };
        Ok(Settings {
            source,
            sink,
            session,
            router: config.topic_router()?,
            metrics_listen,
            producers: Producers::new(),
        })
    }
}

/// The per-layer resolvers: `run` (through [`Settings::resolve`]), `check` and `status` all
/// derive what they connect with here, so the three read a configuration the same way.
impl Config {
    /// The topic router for `outbox.topic` with the allow-list and the bound; the dead-letter
    /// topic is exempt from the bound when it is in use. One per run: its clones share the count.
    pub fn topic_router(&self) -> Result<TopicRouter, ConfigError> {
        let mut router = TopicRouter::new(&self.outbox.topic)
            .map_err(|e| ConfigError(format!("outbox.topic: {e}")))?;
        let regex = &self.outbox.topic_regex;
        if regex.is_empty() {
            if let Some(name) = router.group_placeholders().first() {
                return Err(ConfigError(format!(
                    "outbox.topic {:?} names {{{name}}}, which only a group of outbox.topic_regex \
                     can fill: set outbox.topic_regex, or use {{aggregatetype}}",
                    self.outbox.topic
                )));
            }
        } else {
            router = router
                .with_regex(regex)
                .map_err(|e| ConfigError(format!("outbox.topic_regex: {e}")))?;
        }
        let max_topics = usize::try_from(self.outbox.max_topics).unwrap_or(usize::MAX);
        Ok(router.with_limits(TopicLimits {
            allowed_aggregate_types: self.outbox.allowed_aggregate_types.clone(),
            max_topics,
            exempt_topic: (self.outbox.on_bad_row == BadRowPolicy::DeadLetter)
                .then(|| self.outbox.dead_letter_topic.clone()),
        }))
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

    /// How event records are shaped: `outbox.cloudevents` and its attribute templates, each
    /// error naming its key.
    pub fn record_format(&self) -> Result<Format, ConfigError> {
        let o = &self.outbox;
        let mode = match o.cloudevents {
            CloudEventsMode::Off => return Ok(Format::Plain),
            CloudEventsMode::Binary => Mode::Binary,
            CloudEventsMode::Structured => Mode::Structured,
        };
        let template = |key: &str, text: &str, required: bool| {
            let t = Template::parse(text)
                .map_err(|e| ConfigError(format!("outbox.cloudevents_{key}: {e}")))?;
            if required && t.is_empty() {
                return Err(ConfigError(format!(
                    "outbox.cloudevents_{key} is empty, but every CloudEvent has a {key}: name \
                     the fields it is made of, e.g. the default {:?}",
                    match key {
                        "id" => "{id}",
                        "source" => "/outbox/{aggregatetype}",
                        _ => "{type}",
                    }
                )));
            }
            for (field, column_key, column) in [
                (Field::Id, "id_column", &o.id_column),
                (Field::Type, "type_column", &o.type_column),
                (
                    Field::AggregateType,
                    "aggregate_type_column",
                    &o.aggregate_type_column,
                ),
            ] {
                if t.uses(field) && column.is_empty() {
                    return Err(ConfigError(format!(
                        "outbox.cloudevents_{key} = {text:?} uses a field whose column is off \
                         (outbox.{column_key} = \"\"): name the column in outbox.{column_key}, \
                         or change outbox.cloudevents_{key}"
                    )));
                }
            }
            Ok(t)
        };
        let content_type = &o.cloudevents_data_content_type;
        if content_type.bytes().any(|c| c.is_ascii_control()) {
            return Err(ConfigError(format!(
                "outbox.cloudevents_data_content_type {content_type:?} holds control characters: \
                 use a media type such as \"application/json\""
            )));
        }
        Ok(Format::CloudEvents(CloudEvents {
            mode,
            id: template("id", &o.cloudevents_id, true)?,
            source: template("source", &o.cloudevents_source, true)?,
            event_type: template("type", &o.cloudevents_type, true)?,
            subject: template("subject", &o.cloudevents_subject, false)?,
            data_content_type: (!content_type.is_empty()).then(|| content_type.clone()),
        }))
    }

    /// Every further column and where it goes: `outbox.header_columns` (headers of their own
    /// name), then `outbox.additional_placement` (`column:placement[:name]`), each checked.
    pub fn placements(&self) -> Result<Vec<(String, Placement)>, ConfigError> {
        let o = &self.outbox;
        let mut out: Vec<(String, Placement)> = o
            .header_columns
            .iter()
            .map(|c| (c.clone(), Placement::Header(Arc::from(c.as_str()))))
            .collect();
        for entry in &o.additional_placement {
            let bad = |why: &str| {
                ConfigError(format!(
                    "outbox.additional_placement: {entry:?} {why}; write \"column:header\", \
                     \"column:header:name\", \"column:envelope\", \"column:envelope:name\" \
                     or \"column:partition\""
                ))
            };
            let mut parts = entry.split(':');
            let column = parts.next().unwrap_or_default();
            let placement = parts.next().ok_or_else(|| bad("names no placement"))?;
            let alias = parts.next();
            if parts.next().is_some() || column.is_empty() || alias == Some("") {
                return Err(bad("is not column:placement[:name]"));
            }
            let name = Arc::from(alias.unwrap_or(column));
            let placement = match placement {
                "header" => Placement::Header(name),
                "envelope" => Placement::Envelope(name),
                "partition" if alias.is_none() => Placement::Partition,
                "partition" => return Err(bad("names a partition placement, which has no name")),
                _ => {
                    return Err(bad(
                        "has a placement other than header, envelope or partition",
                    ));
                }
            };
            out.push((column.to_owned(), placement));
        }
        let mut envelope = std::collections::BTreeSet::new();
        let mut partitions = 0;
        // header_columns keep the names they always had; only additional_placement is checked
        // against walship's own headers.
        for (i, (column, placement)) in out.iter().enumerate() {
            match placement {
                Placement::Header(_) if i < o.header_columns.len() => {}
                Placement::Header(name) => {
                    let own = name.starts_with("walship.")
                        || name.starts_with("ce_")
                        || ["id", "type", "traceparent", "tracestate", "content-type"]
                            .contains(&&**name);
                    if own {
                        return Err(ConfigError(format!(
                            "outbox.additional_placement: column {column:?} would \
                             become header {name:?}, which walship writes itself (walship.*, id, \
                             type, traceparent, tracestate, ce_*, content-type): give it another \
                             name (\"{column}:header:<name>\")"
                        )));
                    }
                }
                Placement::Envelope(name) => {
                    if &**name == "payload" || !envelope.insert(name.clone()) {
                        return Err(ConfigError(format!(
                            "outbox.additional_placement: envelope field {name:?} (column \
                             {column:?}) is \"payload\" or named twice: the envelope is \
                             {{\"payload\": …, \"<name>\": …}}, so give each field its own name"
                        )));
                    }
                }
                Placement::Partition => partitions += 1,
            }
        }
        if partitions > 1 {
            return Err(ConfigError(
                "outbox.additional_placement names more than one partition column: a record has \
                 one partition; keep one \"column:partition\""
                    .into(),
            ));
        }
        Ok(out)
    }

    /// The outbox definition for the PostgreSQL side.
    pub fn outbox_spec(&self) -> OutboxSpec {
        let format_uses_type = match self.record_format() {
            Ok(Format::CloudEvents(ce)) => ce.uses(Field::AggregateType),
            _ => false,
        };
        let router_uses_type = format_uses_type
            || !self.outbox.topic_regex.is_empty()
            || self
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
            header_columns: self
                .placements()
                .map(|p| p.into_iter().map(|(column, _)| column).collect())
                .unwrap_or_else(|_| self.outbox.header_columns.clone()),
            timestamp: self.outbox.timestamp_column.clone(),
            traceparent: self.outbox.traceparent_column.clone(),
            tracestate: self.outbox.tracestate_column.clone(),
        }
    }

    /// Producer settings, with secrets resolved.
    pub fn sink_settings(&self) -> Result<SinkSettings, ConfigError> {
        self.sink_settings_with_env(|var| std::env::var(var).ok())
    }

    /// [`Config::sink_settings`] with `kafka.secret_env` looked up through `env`.
    pub(crate) fn sink_settings_with_env(
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
            share_producer: self.kafka.share_producer,
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
