//! A one-shot look at the cluster for `walship check`: can the brokers be reached with walship's
//! own producer settings, which brokers are there, and which topics exist.
//!
//! Invariant: probing never creates anything. It builds a client from exactly the configuration
//! the relay's producer uses (so an invalid `[kafka.librdkafka]` property or a wrong security
//! setting shows up here), sends one metadata request for all topics and drops the client.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};

use crate::sink::SinkSettings;

/// What the cluster said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterInfo {
    /// Brokers as `id → host:port`.
    pub brokers: BTreeMap<i32, String>,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicInfo>,
}

/// One topic in the metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicInfo {
    /// Number of partitions.
    pub partitions: usize,
    /// The broker's error for this topic, if any (e.g. authorization failed).
    pub error: Option<String>,
}

impl ClusterInfo {
    /// True when `topic` exists without error and has partitions.
    pub fn has_topic(&self, topic: &str) -> bool {
        self.topics
            .get(topic)
            .is_some_and(|t| t.error.is_none() && t.partitions > 0)
    }
}

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// librdkafka refused the configuration. The property's value is left out: it may be a
    /// secret from `kafka.secret_env` / `kafka.secret_files`.
    #[error("the Kafka client configuration is invalid: {reason}")]
    Config {
        /// What librdkafka said, with the property name.
        reason: String,
    },
    /// No answer within the timeout.
    #[error("no metadata from {brokers} within {timeout:?}: {error}{detail}")]
    Unreachable {
        /// `bootstrap.servers`.
        brokers: String,
        /// The timeout.
        timeout: Duration,
        /// The client error.
        error: KafkaError,
        /// The last transport error librdkafka reported (` (last error: …)`), if any.
        detail: String,
    },
}

/// Keeps the last client error (or error-level log line) for the report; logs only at debug
/// level (the caller reports).
struct ProbeContext {
    last_error: Arc<Mutex<Option<String>>>,
}

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", ?level, "{fac}: {message}");
        // Transport failures (connection refused, TLS, SASL) arrive as error-level logs.
        if matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
        ) {
            let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
            *last = Some(message.to_owned());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        *last = Some(format!("{error}: {reason}"));
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Asks the cluster for its metadata (all brokers and topics), waiting at most `timeout`.
pub async fn probe(settings: &SinkSettings, timeout: Duration) -> Result<ClusterInfo, ProbeError> {
    let last_error = Arc::new(Mutex::new(None));
    let mut config = settings.client_config();
    config.set_log_level(RDKafkaLogLevel::Error);
    let producer: BaseProducer<ProbeContext> = settings
        .create(
            &config,
            ProbeContext {
                last_error: Arc::clone(&last_error),
            },
        )
        .map_err(|e| ProbeError::Config {
            reason: match e {
                KafkaError::ClientConfig(_, description, property, _value) => {
                    format!("{description} (property {property:?})")
                }
                other => other.to_string(),
            },
        })?;
    let metadata = tokio::task::spawn_blocking(move || {
        let result = producer.client().fetch_metadata(None, timeout);
        if result.is_err() {
            // Serve queued error events so the context records the transport error's reason.
            producer.poll(Duration::ZERO);
        }
        result.map(|md| ClusterInfo {
            brokers: md
                .brokers()
                .iter()
                .map(|b| (b.id(), format!("{}:{}", b.host(), b.port())))
                .collect(),
            topics: md
                .topics()
                .iter()
                .map(|t| {
                    (
                        t.name().to_owned(),
                        TopicInfo {
                            partitions: t.partitions().len(),
                            error: t.error().map(|e| format!("{e:?}")),
                        },
                    )
                })
                .collect(),
        })
    })
    .await;
    let unreachable = |error: KafkaError| {
        let detail = last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        ProbeError::Unreachable {
            brokers: settings.brokers.clone(),
            timeout,
            error,
            detail,
        }
    };
    match metadata {
        Ok(Ok(info)) => Ok(info),
        Ok(Err(error)) => Err(unreachable(error)),
        // The blocking task panicked or was cancelled: report it like a failed request.
        Err(_) => Err(unreachable(KafkaError::MetadataFetch(
            RDKafkaErrorCode::Fail,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_with_errors_do_not_count() {
        let mut info = ClusterInfo::default();
        info.topics.insert(
            "ok".into(),
            TopicInfo {
                partitions: 3,
                error: None,
            },
        );
        info.topics.insert(
            "denied".into(),
            TopicInfo {
                partitions: 0,
                error: Some("TopicAuthorizationFailed".into()),
            },
        );
        assert!(info.has_topic("ok"));
        assert!(!info.has_topic("denied"));
        assert!(!info.has_topic("missing"));
    }
}
