//! Validation: the rules a [`Config`] must keep beyond its types, checked before anything runs.
//!
//! Owns every cross-key rule (slot and publication names, intervals, topic limits, librdkafka
//! properties that hold secrets or that walship manages) and the message that names the key and
//! how to fix it.
//!
//! Invariant: a configuration that passes here resolves into settings
//! ([`super::settings`]) without a rule of this module being checked again there.

use walship_kafka::TopicRouter;

use super::env::is_secret_property;
use super::format::{BadRowPolicy, Config, ConfigError};

impl Config {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
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
        let router = self.topic_router()?;
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
        self.validate_trace_columns()?;
        self.record_format()?;
        self.placements()?;
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
        self.validate_order_properties()
    }

    /// The producer properties that would let a key's records land out of commit order: a
    /// record that times out (`message.timeout.ms`, alias `delivery.timeout.ms`, other than 0)
    /// is read again from the slot after later records of its partition landed, and a
    /// partitioner that ignores the key spreads one key over partitions. Either breaks per-key
    /// order (G2) and the order within a partition that consumers' inboxes rely on.
    fn validate_order_properties(&self) -> Result<(), ConfigError> {
        for key in ["message.timeout.ms", "delivery.timeout.ms"] {
            if let Some(v) = self.kafka.librdkafka.get(key)
                && v.trim() != "0"
            {
                return Err(ConfigError(format!(
                    "kafka.librdkafka.{key:?} = {v:?}: walship never lets a record time out (0), \
                     because a record that timed out is sent again after later records of its \
                     partition landed, so a consumer would see an aggregate's events out of \
                     order. Remove it (during a broker outage records wait, bounded by \
                     run.max_in_flight_events; alert on walship_last_ack_timestamp_seconds instead)"
                )));
            }
        }
        // With a shared producer these bound each pipeline's share of the queue, checked by
        // walship rather than librdkafka: refuse what librdkafka would have refused.
        for (key, least) in [
            ("queue.buffering.max.messages", 0_u64),
            ("queue.buffering.max.kbytes", 1),
        ] {
            if let Some(v) = self.kafka.librdkafka.get(key)
                && !v
                    .trim()
                    .parse::<u64>()
                    .is_ok_and(|n| (least..=2_147_483_647).contains(&n))
            {
                return Err(ConfigError(format!(
                    "kafka.librdkafka.{key:?} = {v:?}: not a whole number from {least} to                      2147483647; it bounds each pipeline's records queued in the producer"
                )));
            }
        }
        if let Some(v) = self.kafka.librdkafka.get("partitioner")
            && v.trim() == "random"
        {
            return Err(ConfigError(
                "kafka.librdkafka.\"partitioner\" = \"random\" ignores the key, so one \
                 aggregate's events would spread over partitions and lose their order: remove \
                 it (walship's default murmur2_random matches the Java client) or pick a keyed \
                 partitioner (murmur2, consistent, fnv1a, …), the same in every process"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `outbox.traceparent_column` and `outbox.tracestate_column`: a trace state only beside a
    /// trace parent, and neither also a header column (its header would come twice).
    fn validate_trace_columns(&self) -> Result<(), ConfigError> {
        let o = &self.outbox;
        if o.traceparent_column.is_empty() && !o.tracestate_column.is_empty() {
            return Err(ConfigError(format!(
                "outbox.tracestate_column = {:?} but outbox.traceparent_column is empty: a W3C \
                 tracestate means nothing without its traceparent; name the traceparent column \
                 too, or remove outbox.tracestate_column",
                o.tracestate_column
            )));
        }
        for (key, column) in [
            ("traceparent_column", &o.traceparent_column),
            ("tracestate_column", &o.tracestate_column),
        ] {
            if !column.is_empty() && o.header_columns.contains(column) {
                return Err(ConfigError(format!(
                    "outbox.{key} = {column:?} is also in outbox.header_columns, so its header \
                     would come twice (and unchecked once): remove it from outbox.header_columns"
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
