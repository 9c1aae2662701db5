//! The producer's configuration, a pipeline's sink (sending records, reporting deliveries),
//! and topic management.
//!
//! ```text
//!  send(record, token) ──▶ its lane in a producer (bounded) ──▶ broker (acks=all, idempotent)
//!                                                                 │
//!  DeliveryListener::on_delivery(token, result) ◀── poll thread ◀─┘
//! ```
//!
//! Invariant: every record accepted by [`Sink::send`] produces exactly one `on_delivery` call
//! for its token — success only after the broker acknowledged it with `acks=all`. Nothing is
//! awaited per record; records stay in flight together and the listener sees each outcome.
//! Per-partition order is kept by the idempotent producer, retries included.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;

use crate::producer::{Lane, LaneRefusal, Producers};
use crate::record::Record;
use crate::refusal::{ErrorClass, Refusal};

/// Receives the outcome of every record accepted by [`Sink::send`].
///
/// Called on librdkafka's polling thread: implementations must be quick and must not block.
pub trait DeliveryListener: Send + Sync + 'static {
    /// `token` is the value given to [`Sink::send`]; `result` is final (librdkafka has already
    /// retried what it could). On success it carries the record's key + value size in bytes.
    fn on_delivery(&self, token: usize, result: Result<usize, DeliveryError>);
}

/// A record that the producer gave up on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("Kafka did not accept a record for topic {topic:?} partition {partition}: {error}")]
pub struct DeliveryError {
    /// Topic of the record.
    pub topic: String,
    /// Partition (-1 when unassigned).
    pub partition: i32,
    /// The record's key (to dead-letter it).
    pub key: Option<Vec<u8>>,
    /// The record's value size in bytes.
    pub payload_len: usize,
    /// The record's `walship.position` header: which event it was.
    pub position: Option<crate::headers::Position>,
    /// The record's `id` header (the outbox row id).
    pub id: Option<Vec<u8>>,
    /// Why, classified.
    pub error: Refusal,
}

impl DeliveryError {
    /// How the session should react.
    pub fn class(&self) -> ErrorClass {
        self.error.class
    }

    /// True when the record was purged because its producer is going away: no broker refused
    /// it, and the next session reads it again.
    pub fn is_purge(&self) -> bool {
        self.error.purged
    }
}

/// Why [`Sink::send`] did not accept a record.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The producer queue is full: wait for deliveries, then send again (backpressure).
    #[error("producer queue is full")]
    QueueFull,
    /// The producer refused the record.
    #[error("producing to topic {topic:?}: {error}")]
    Rejected {
        /// Topic.
        topic: String,
        /// Why, classified.
        error: Refusal,
    },
}

/// Kafka connection and producer settings. Its `Debug` never shows secret values.
#[derive(Clone)]
pub struct SinkSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// `client.id`.
    pub client_id: String,
    /// Create missing topics through the admin API.
    pub create_topics: bool,
    /// Partitions of created topics.
    pub topic_partitions: i32,
    /// Replication factor of created topics.
    pub topic_replication_factor: i32,
    /// Raw librdkafka properties, applied last (the escape hatch).
    pub librdkafka: BTreeMap<String, String>,
    /// librdkafka properties whose values are secrets (never logged).
    pub secret_properties: BTreeMap<String, String>,
    /// Share one producer with the process's other pipelines of the same producer settings
    /// (`kafka.share_producer`).
    pub share_producer: bool,
}

impl std::fmt::Debug for SinkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secrets: Vec<(&String, &str)> =
            self.secret_properties.keys().map(|k| (k, "***")).collect();
        f.debug_struct("SinkSettings")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("create_topics", &self.create_topics)
            .field("topic_partitions", &self.topic_partitions)
            .field("topic_replication_factor", &self.topic_replication_factor)
            .field("librdkafka", &self.librdkafka)
            .field("secret_properties", &secrets)
            .field("share_producer", &self.share_producer)
            .finish()
    }
}

/// librdkafka properties only a producer understands (CONFIGURATION.md, marked `P`).
const PRODUCER_ONLY_PROPERTIES: &[&str] = &[
    "transactional.id",
    "transaction.timeout.ms",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "queue.buffering.backpressure.threshold",
    "compression.codec",
    "compression.type",
    "compression.level",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "sticky.partitioning.linger.ms",
    "request.required.acks",
    "acks",
    "request.timeout.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "queuing.strategy",
    "produce.offset.report",
    "partitioner",
];

impl SinkSettings {
    /// The producer configuration: walship's defaults, then the user's overrides.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            // G1/G2: acknowledged by all in-sync replicas, no duplicates or reordering on retry.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Java-client-compatible partitioning: the same key lands in the same partition
            // whichever client produces it.
            .set("partitioner", "murmur2_random")
            // Never give up on an event: during a broker outage records wait (bounded by the
            // queue limits below) instead of failing and being re-read from the slot.
            .set("message.timeout.ms", "0")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "100000")
            .set("queue.buffering.max.kbytes", "65536")
            .set("allow.auto.create.topics", "false");
        for (k, v) in self.librdkafka.iter().chain(&self.secret_properties) {
            c.set(k, v);
        }
        c.set_log_level(RDKafkaLogLevel::Warning);
        c
    }

    /// The configuration of walship's other clients (the admin client, the resume scanner):
    /// brokers, client id, and every user property except producer-only ones (a consumer warns
    /// about each), so they connect exactly as the producer does. Neither may make the broker
    /// create a topic by asking for its metadata.
    pub fn connection_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id);
        for (k, v) in self.librdkafka.iter().chain(&self.secret_properties) {
            if !PRODUCER_ONLY_PROPERTIES.contains(&k.as_str()) {
                c.set(k, v);
            }
        }
        c.set("allow.auto.create.topics", "false");
        c
    }

    /// The largest record the producer accepts (`message.max.bytes`, librdkafka's default
    /// 1,000,000 unless set).
    pub fn max_record_bytes(&self) -> usize {
        self.librdkafka
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    }

    /// `text` with every secret property's value replaced by `***`.
    pub fn mask(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in self.secret_properties.values().filter(|v| !v.is_empty()) {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }

    /// `error` with every secret value masked: librdkafka echoes the value of a property it
    /// rejects, and a value from `kafka.secret_env` / `kafka.secret_files` must never reach a
    /// log or an error message, whatever the property's name.
    pub fn mask_error(&self, error: KafkaError) -> KafkaError {
        match error {
            KafkaError::ClientConfig(res, description, key, value) => {
                let value = if self.secret_properties.contains_key(&key) {
                    "***".to_owned()
                } else {
                    self.mask(&value)
                };
                KafkaError::ClientConfig(res, self.mask(&description), key, value)
            }
            KafkaError::ClientCreation(text) => KafkaError::ClientCreation(self.mask(&text)),
            other => other,
        }
    }

    /// Creates a client of any kind (producer, consumer, admin) from `config`, which was built
    /// from these settings, with its errors masked ([`SinkSettings::mask_error`]). Every
    /// client walship builds is created here.
    pub fn create<C, X>(&self, config: &ClientConfig, context: X) -> Result<C, KafkaError>
    where
        C: rdkafka::config::FromClientConfigAndContext<X>,
        X: ClientContext,
    {
        config
            .create_with_context(context)
            .map_err(|e| self.mask_error(e))
    }
}

impl DeliveryError {
    /// The failure librdkafka reported for `msg`, with what the record's headers say of it.
    pub(crate) fn of(error: &KafkaError, msg: &impl rdkafka::Message) -> Self {
        use rdkafka::message::Headers;
        let (mut position, mut id) = (None, None);
        for h in msg.headers().iter().flat_map(|h| h.iter()) {
            match h.key {
                crate::headers::POSITION_HEADER if position.is_none() => {
                    position = h.value.and_then(crate::headers::Position::parse);
                }
                crate::headers::ID_HEADER if id.is_none() => id = h.value.map(<[u8]>::to_vec),
                _ => {}
            }
        }
        DeliveryError {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            key: msg.key().map(<[u8]>::to_vec),
            payload_len: msg.payload().map_or(0, <[u8]>::len),
            position,
            id,
            error: Refusal::of(error),
        }
    }
}

/// One pipeline's way to the broker: its lane in a producer ([`crate::producer`]), plus topic
/// management.
///
/// Dropping it never blocks an async runtime thread: destroying a producer joins its poll
/// thread, purges its queue and waits up to 500 ms for the purge reports, so on a runtime that
/// happens on the blocking pool.
pub struct Sink {
    lane: Lane,
    settings: SinkSettings,
    known_topics: HashSet<String>,
}

/// A problem with a topic: missing and not creatable, or the broker refused to create it.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// Missing and `kafka.create_topics` is false.
    #[error(
        "topic {0:?} does not exist and kafka.create_topics is false: create it, or set kafka.create_topics = true"
    )]
    Missing(String),
    /// The broker refused to create it.
    #[error(
        "creating topic {topic:?}: {error}; check the broker's permissions and kafka.topic_partitions / kafka.topic_replication_factor"
    )]
    CreateFailed {
        /// Topic.
        topic: String,
        /// Broker's answer.
        error: String,
    },
    /// The broker did not answer (down or unreachable).
    #[error("looking up topic {topic:?} on {brokers}: {error}")]
    Unreachable {
        /// Topic.
        topic: String,
        /// bootstrap.servers.
        brokers: String,
        /// Client error.
        error: KafkaError,
    },
    /// The broker answered the lookup but not the request to create the topic.
    #[error(
        "creating topic {topic:?} on {brokers}: {error}; the broker answers metadata requests but \
         did not create the topic: one without an active controller, or that cannot create topics \
         through the Admin API (CreateTopics; librdkafka's mock cluster cannot), never will. \
         Create the topic on the broker ({partitions} partitions, replication factor \
         {replication_factor}); walship retries until it exists"
    )]
    CreateUnanswered {
        /// Topic.
        topic: String,
        /// bootstrap.servers.
        brokers: String,
        /// kafka.topic_partitions.
        partitions: i32,
        /// kafka.topic_replication_factor.
        replication_factor: i32,
        /// Client error.
        error: KafkaError,
    },
}

impl TopicError {
    /// True when retrying later can succeed without a change.
    pub fn is_transient(&self) -> bool {
        // A controller may be elected, or the topic created by hand, meanwhile.
        matches!(
            self,
            TopicError::Unreachable { .. } | TopicError::CreateUnanswered { .. }
        )
    }
}

impl Sink {
    /// A sink with a producer of its own (connecting happens in the background).
    pub fn new(
        settings: SinkSettings,
        listener: Arc<dyn DeliveryListener>,
    ) -> Result<Self, KafkaError> {
        let own = SinkSettings {
            share_producer: false,
            ..settings
        };
        Sink::in_pool(&Producers::default(), own, listener)
    }

    /// A sink in the producer `producers` has for these settings (made now if needed), or in
    /// one of its own when `settings.share_producer` is false.
    pub fn in_pool(
        producers: &Producers,
        settings: SinkSettings,
        listener: Arc<dyn DeliveryListener>,
    ) -> Result<Self, KafkaError> {
        let lane = producers.lane(&settings, listener)?;
        Ok(Sink {
            lane,
            settings,
            known_topics: HashSet::new(),
        })
    }

    /// Closes the sink once none of its records can still be sent: at once when all are
    /// answered; otherwise its producer is purged and retired first ([`crate::producer`]).
    /// The next producer of this pipeline cannot be overtaken by anything this one held.
    pub fn close(self) -> impl Future<Output = ()> + Send + 'static {
        self.lane.close()
    }

    /// Whether other sinks use this sink's producer now: closing this one with records in
    /// flight would purge theirs too.
    pub fn shares_producer(&self) -> bool {
        self.lane.shared_with_others()
    }

    /// Records handed over and not yet reported.
    pub fn in_flight(&self) -> usize {
        self.lane.in_flight()
    }

    /// Hands a record to the producer; its outcome reaches the listener with `token`.
    pub fn send(&self, record: &Record<'_>, token: usize) -> Result<(), SendError> {
        let mut headers = OwnedHeaders::new_with_capacity(record.header_count());
        for (key, value) in record.headers() {
            headers = headers.insert(Header { key, value });
        }
        let mut rec: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(record.topic, 0)
                .key(record.key)
                .headers(headers);
        if let Some(p) = record.payload {
            rec = rec.payload(p);
        }
        if let Some(ts) = record.timestamp_ms {
            rec = rec.timestamp(ts);
        }
        if let Some(partition) = record.partition {
            rec = rec.partition(partition);
        }
        let size = record.key.len() + record.payload.map_or(0, <[u8]>::len);
        match self.lane.send(rec, token, size) {
            Ok(()) => Ok(()),
            Err(LaneRefusal::Full) => Err(SendError::QueueFull),
            Err(LaneRefusal::Retired) => Err(SendError::Rejected {
                topic: record.topic.to_owned(),
                error: Refusal::purged(
                    "the producer this pipeline shares was purged because another pipeline \
                     stopped with records in flight; this session starts again from its \
                     confirmed position",
                ),
            }),
            Err(LaneRefusal::Refused(error)) => Err(SendError::Rejected {
                topic: record.topic.to_owned(),
                error: Refusal::of(&error),
            }),
        }
    }

    /// None when `topic` is known to exist; else the check (and creation, if configured) as a
    /// future that borrows nothing, so the caller can do other work while it waits. Report its
    /// success with [`Sink::topic_exists`].
    pub fn check_topic(
        &self,
        topic: &str,
    ) -> Option<impl Future<Output = Result<(), TopicError>> + Send + 'static> {
        if self.known_topics.contains(topic) {
            return None;
        }
        let (settings, topic) = (self.settings.clone(), topic.to_owned());
        Some(async move { ensure_topic(&settings, &topic).await })
    }

    /// Remembers that `topic` exists.
    pub fn topic_exists(&mut self, topic: &str) {
        self.known_topics.insert(topic.to_owned());
    }
}

/// A value whose drop may block: dropped on the blocking pool when a tokio runtime is current.
/// `gone` fires once the value is dropped, wherever that happened.
pub(crate) struct OffRuntime<T: Send + 'static> {
    value: Option<T>,
    gone: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<T: Send + 'static> OffRuntime<T> {
    pub(crate) fn new(value: T) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let this = OffRuntime {
            value: Some(value),
            gone: Some(tx),
        };
        (this, rx)
    }

    pub(crate) fn get(&self) -> &T {
        // Only `drop` takes the value out.
        self.value
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only in drop"))
    }
}

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        let (value, gone) = (self.value.take(), self.gone.take());
        let destroy = move || {
            drop(value);
            if let Some(gone) = gone {
                let _ = gone.send(());
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(destroy)),
            Err(_) => destroy(),
        }
    }
}

/// How many partitions the brokers list for `topic` (0 when it is missing or has an error),
/// asked off the async runtime: the outer error is the blocking task's, the inner the request's.
pub(crate) async fn listed_partitions(
    admin: &Arc<AdminClient<DefaultClientContext>>,
    topic: &str,
) -> Result<Result<usize, KafkaError>, tokio::task::JoinError> {
    let (admin, topic) = (Arc::clone(admin), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let md = admin
            .inner()
            .fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len()))
    })
    .await
}

/// A client kept to ask the brokers for metadata now and then: do they answer? (A standby
/// that cannot reach them could not take over.)
pub struct BrokerProbe {
    admin: Arc<AdminClient<DefaultClientContext>>,
}

impl BrokerProbe {
    /// Made with walship's connection settings (security included); nothing is sent yet.
    pub fn new(settings: &SinkSettings) -> Result<Self, KafkaError> {
        let mut config = settings.connection_config();
        config.set_log_level(RDKafkaLogLevel::Error);
        Ok(BrokerProbe {
            admin: Arc::new(settings.create(&config, DefaultClientContext)?),
        })
    }

    /// True when a broker answers a metadata request within `timeout`. It asks about one
    /// topic, whether or not it exists (the answer is what counts; nothing is created), so
    /// the request stays small however many topics the cluster has.
    pub async fn answers(&self, timeout: Duration) -> bool {
        let admin = Arc::clone(&self.admin);
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(Some("__walship_probe"), timeout)
                .is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

/// Every topic the brokers list (without errors), asked once off the async runtime: which
/// topics may hold a source's events is decided by the caller.
pub async fn list_topics(settings: &SinkSettings) -> Result<Vec<String>, KafkaError> {
    let mut config = settings.connection_config();
    config.set_log_level(RDKafkaLogLevel::Error);
    let admin: AdminClient<DefaultClientContext> =
        settings.create(&config, DefaultClientContext)?;
    tokio::task::spawn_blocking(move || {
        let md = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.name().to_owned())
            .collect())
    })
    .await
    // Only a panic in the metadata call ends the blocking task otherwise.
    .map_err(|_| KafkaError::MetadataFetch(RDKafkaErrorCode::Fail))?
}

/// Makes sure `topic` exists, creating it if `settings.create_topics`.
pub async fn ensure_topic(settings: &SinkSettings, topic: &str) -> Result<(), TopicError> {
    let mut config = settings.connection_config();
    config.set_log_level(RDKafkaLogLevel::Error);
    let admin: AdminClient<DefaultClientContext> = settings
        .create(&config, DefaultClientContext)
        .map_err(|error| TopicError::Unreachable {
        topic: topic.to_owned(),
        brokers: settings.brokers.clone(),
        error,
    })?;
    let admin = Arc::new(admin);
    let exists = listed_partitions(&admin, topic)
        .await
        .map_err(|e| TopicError::CreateFailed {
            topic: topic.to_owned(),
            error: e.to_string(),
        })?
        .map_err(|error| TopicError::Unreachable {
            topic: topic.to_owned(),
            brokers: settings.brokers.clone(),
            error,
        })?
        > 0;
    if exists {
        return Ok(());
    }
    if !settings.create_topics {
        return Err(TopicError::Missing(topic.to_owned()));
    }
    let new = NewTopic::new(
        topic,
        settings.topic_partitions,
        TopicReplication::Fixed(settings.topic_replication_factor),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results =
        admin
            .create_topics(&[new], &opts)
            .await
            .map_err(|error| TopicError::CreateUnanswered {
                topic: topic.to_owned(),
                brokers: settings.brokers.clone(),
                partitions: settings.topic_partitions,
                replication_factor: settings.topic_replication_factor,
                error,
            })?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(TopicError::CreateFailed {
                    topic: topic.to_owned(),
                    error: code.to_string(),
                });
            }
        }
    }
    tracing::info!(
        topic,
        partitions = settings.topic_partitions,
        "created topic"
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
