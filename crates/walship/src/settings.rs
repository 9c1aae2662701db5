//! Settings resolved once: the configuration turned into typed settings per layer.
//!
//! Owns the step from [`Config`] (what the operator wrote) to what each layer consumes — the
//! PostgreSQL source, the Kafka sink, the session — so the wiring in [`crate::run`] only hands
//! values down and never calls back into the configuration.
//!
//! Invariant: everything that can be wrong about a configuration (a connection string, a
//! secret that is not set, a topic template, a listen address) fails here, before any
//! connection is made, with the key that is wrong and how to fix it.

use std::net::SocketAddr;
use std::time::Duration;

use walship_kafka::{SinkSettings, TopicRouter};
use walship_postgres::setup::SlotHistory;
use walship_postgres::{ConnectParams, OutboxSpec};

use crate::config::{BadRowPolicy, Config, ConfigError, Secret};

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

impl SourceSettings {
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
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            status_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            max_in_flight: 2_000,
            max_pending: crate::config::DEFAULT_MAX_PENDING_TRANSACTIONS,
            dead_letter_topic: None,
            message_prefixes: Vec::new(),
            resume_dedup: true,
            max_record_bytes: 1_000_000,
        }
    }
}

impl Settings {
    /// Resolves every derived setting of `config` (secrets included) once.
    pub fn resolve(config: &Config) -> Result<Settings, ConfigError> {
        let metrics_listen = config.metrics.address()?;
        let pg = &config.postgres;
        let source = SourceSettings {
            params: config.connect_params()?,
            password: config.postgres_password()?,
            slot: pg.slot.clone(),
            publication: pg.publication.clone(),
            create_slot: pg.create_slot,
            create_publication: pg.create_publication,
            failover_slot: pg.failover_slot,
            history: config.slot_history(),
            outbox: config.outbox_spec(),
            heartbeat: (pg.heartbeat_interval_ms > 0)
                .then(|| Duration::from_millis(pg.heartbeat_interval_ms)),
            watch_interval: Duration::from_millis(pg.watch_interval_ms),
            source_epoch: pg.source_epoch,
        };
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
        };
        Ok(Settings {
            source,
            sink,
            session,
            router: config.topic_router()?,
            metrics_listen,
        })
    }
}
