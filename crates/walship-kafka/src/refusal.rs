//! Refusals, sorted by what to do about them: the one place that reads librdkafka's error codes
//! for a record the producer or the broker would not take, or a topic that could not be read
//! back.
//!
//! ```text
//!  KafkaError ──classify──▶ ErrorClass ─┬─ Transient: restart from the last confirmed position
//!  (code, text)                         ├─ Record:    this record never fits: a bad row
//!                                       └─ Fatal:     configuration or permissions: stop
//! ```
//!
//! Invariant: an error is classified once, where librdkafka hands it over; what travels on
//! ([`Refusal`] inside [`crate::sink::SendError`] and [`crate::sink::DeliveryError`], [`ReadBackError`])
//! carries the class and librdkafka's own text, never its code, so the session above this
//! crate decides and reports without knowing librdkafka — and its tests build refusals of
//! every class without a client library.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What to do about a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The broker or cluster state may recover: restart from the last confirmed position.
    Transient,
    /// This record can never be accepted (too large, invalid): a bad-row decision.
    Record,
    /// Configuration or permissions are wrong: stop and explain.
    Fatal,
}

/// Sorts librdkafka errors by what to do next.
pub fn classify(error: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessage
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::InvalidTimestamp
            // Only a partition a row names (outbox.additional_placement) can be unknown: the
            // partitioner picks among the topic's own.
            | C::UnknownPartition,
        ) => ErrorClass::Record,
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::Authentication
            | C::InvalidConfig
            | C::InvalidArgument
            | C::InvalidTopic
            | C::UnsupportedVersion
            | C::InvalidRequiredAcks,
        ) => ErrorClass::Fatal,
        _ => ErrorClass::Transient,
    }
}

/// Why the producer or the broker did not take a record, already classified. Shows as
/// librdkafka's own text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Refusal {
    /// What to do about it.
    pub class: ErrorClass,
    /// The record was purged because its producer is going away: no broker refused it, and
    /// the next session reads it again (its class is [`ErrorClass::Transient`]).
    pub purged: bool,
    /// What librdkafka or the broker said.
    pub detail: String,
}

impl Refusal {
    /// A record purged before any broker saw it: transient, and read again by the next
    /// session.
    pub fn purged(detail: impl Into<String>) -> Self {
        Refusal {
            class: ErrorClass::Transient,
            purged: true,
            detail: detail.into(),
        }
    }

    /// A refusal of `class` saying `detail` (for a sink other than librdkafka's, or a fake).
    pub fn new(class: ErrorClass, detail: impl Into<String>) -> Self {
        Refusal {
            class,
            purged: false,
            detail: detail.into(),
        }
    }

    /// librdkafka's `error`, classified.
    pub fn of(error: &KafkaError) -> Self {
        Refusal {
            class: classify(error),
            purged: matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
            ),
            detail: error.to_string(),
        }
    }
}

/// Why a topic could not be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBackError {
    /// What the client or the broker said.
    pub message: String,
    /// The broker refused for lack of permission: reading again will not help.
    pub denied: bool,
}

impl std::fmt::Display for ReadBackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl ReadBackError {
    /// librdkafka's `error`, classified.
    pub fn of(error: &KafkaError) -> Self {
        use RDKafkaErrorCode as C;
        ReadBackError {
            message: error.to_string(),
            denied: matches!(
                error.rdkafka_error_code(),
                Some(
                    C::TopicAuthorizationFailed
                        | C::GroupAuthorizationFailed
                        | C::ClusterAuthorizationFailed
                )
            ),
        }
    }

    /// A failure outside the client (the read-back task itself), never a denial.
    pub fn other(message: String) -> Self {
        ReadBackError {
            message,
            denied: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_errors() {
        let e = |c| KafkaError::MessageProduction(c);
        assert_eq!(
            classify(&e(RDKafkaErrorCode::MessageSizeTooLarge)),
            ErrorClass::Record
        );
        assert_eq!(
            classify(&e(RDKafkaErrorCode::TopicAuthorizationFailed)),
            ErrorClass::Fatal
        );
        assert_eq!(
            classify(&e(RDKafkaErrorCode::UnknownTopicOrPartition)),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(&e(RDKafkaErrorCode::MessageTimedOut)),
            ErrorClass::Transient
        );
    }

    #[test]
    fn a_refusal_keeps_the_text_and_knows_a_purge() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue);
        let r = Refusal::of(&e);
        assert_eq!(r.to_string(), e.to_string());
        assert!(r.purged);
        assert_eq!(r.class, ErrorClass::Transient);
        let r = Refusal::of(&KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        assert!(!r.purged);
        assert_eq!(r.class, ErrorClass::Record);
        let denied = KafkaError::MetadataFetch(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(ReadBackError::of(&denied).denied);
        assert!(!ReadBackError::of(&KafkaError::MetadataFetch(RDKafkaErrorCode::Fail)).denied);
    }
}
