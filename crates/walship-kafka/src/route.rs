//! Topic routing: the topic template and validation of the names it produces.
//!
//! Invariant: every topic name handed to the producer is legal for Kafka (1–249 characters of
//! `[a-zA-Z0-9._-]`, not `.` or `..`). A value that would produce an illegal name is an error
//! naming the value, never a silently "cleaned" topic.

use std::collections::HashMap;
use std::sync::Arc;

/// The placeholder replaced by the row's aggregate type.
pub const AGGREGATE_TYPE: &str = "{aggregatetype}";

/// Why a row cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The template needs an aggregate type and the row has none.
    #[error("topic template {template:?} needs an aggregate type but the row has none")]
    MissingAggregateType {
        /// The template.
        template: String,
    },
    /// The produced name is not a legal Kafka topic name.
    #[error(
        "topic name {topic:?} (from template {template:?}) is not a legal Kafka topic name: \
             use 1-249 characters of letters, digits, '.', '_' and '-'"
    )]
    InvalidTopic {
        /// The offending name (lossy UTF-8).
        topic: String,
        /// The template.
        template: String,
    },
}

/// Maps an aggregate type to its topic, caching the answer.
#[derive(Debug, Clone)]
pub struct TopicRouter {
    template: String,
    uses_aggregate_type: bool,
    cache: HashMap<Vec<u8>, Arc<str>>,
}

/// Cached distinct aggregate types before the cache is reset (bounds memory on hostile input).
const CACHE_LIMIT: usize = 10_000;

impl TopicRouter {
    /// A router for a template such as `outbox.event.{aggregatetype}`.
    ///
    /// Fails when the template without placeholders could never form a legal name.
    pub fn new(template: &str) -> Result<Self, RouteError> {
        let uses_aggregate_type = template.contains(AGGREGATE_TYPE);
        let probe = template.replace(AGGREGATE_TYPE, "x");
        if !is_legal_topic(probe.as_bytes()) {
            return Err(RouteError::InvalidTopic {
                topic: template.to_owned(),
                template: template.to_owned(),
            });
        }
        Ok(TopicRouter {
            template: template.to_owned(),
            uses_aggregate_type,
            cache: HashMap::new(),
        })
    }

    /// True when the template contains `{aggregatetype}`.
    pub fn uses_aggregate_type(&self) -> bool {
        self.uses_aggregate_type
    }

    /// The topic for a row with this aggregate type.
    pub fn route(&mut self, aggregate_type: Option<&[u8]>) -> Result<&Arc<str>, RouteError> {
        let key = if self.uses_aggregate_type {
            aggregate_type.ok_or_else(|| RouteError::MissingAggregateType {
                template: self.template.clone(),
            })?
        } else {
            &[]
        };
        if !self.cache.contains_key(key) {
            let topic = self.render(key)?;
            if self.cache.len() >= CACHE_LIMIT {
                self.cache.clear();
            }
            self.cache.insert(key.to_vec(), topic);
        }
        // Present: inserted above when missing.
        self.cache
            .get(key)
            .ok_or_else(|| unreachable_route(&self.template))
    }

    fn render(&self, aggregate_type: &[u8]) -> Result<Arc<str>, RouteError> {
        let value = String::from_utf8_lossy(aggregate_type);
        let topic = self.template.replace(AGGREGATE_TYPE, &value);
        if !is_legal_topic(topic.as_bytes()) {
            return Err(RouteError::InvalidTopic {
                topic,
                template: self.template.clone(),
            });
        }
        Ok(Arc::from(topic))
    }
}

fn unreachable_route(template: &str) -> RouteError {
    RouteError::InvalidTopic {
        topic: String::new(),
        template: template.to_owned(),
    }
}

/// Kafka's topic name rule.
pub fn is_legal_topic(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != b"."
        && name != b".."
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_caches() {
        let mut r = TopicRouter::new("outbox.event.{aggregatetype}").unwrap();
        assert_eq!(&**r.route(Some(b"order")).unwrap(), "outbox.event.order");
        assert_eq!(&**r.route(Some(b"order")).unwrap(), "outbox.event.order");
        assert_eq!(
            &**r.route(Some(b"Customer-1")).unwrap(),
            "outbox.event.Customer-1"
        );
    }

    #[test]
    fn rejects_illegal_names_and_missing_type() {
        let mut r = TopicRouter::new("outbox.event.{aggregatetype}").unwrap();
        let e = r.route(Some(b"bad type/1")).unwrap_err().to_string();
        assert!(e.contains("outbox.event.bad type/1"), "{e}");
        assert!(matches!(
            r.route(None),
            Err(RouteError::MissingAggregateType { .. })
        ));
        assert!(r.route(Some(&[b'a'; 300])).is_err());
        assert!(TopicRouter::new("bad topic").is_err());
    }

    #[test]
    fn fixed_topic_ignores_aggregate_type() {
        let mut r = TopicRouter::new("events").unwrap();
        assert_eq!(&**r.route(None).unwrap(), "events");
    }
}
