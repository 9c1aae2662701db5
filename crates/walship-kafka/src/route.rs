//! Topic routing: the topic template and validation of the names it produces.
//!
//! Invariants:
//! - Every topic name handed to the producer is legal for Kafka (1–249 characters of
//!   `[a-zA-Z0-9._-]`, not `.` or `..`). A value that would produce an illegal name is an error
//!   naming the value, never a silently "cleaned" topic.
//! - With [`TopicLimits`], every topic handed out comes from an allowed aggregate type and is one
//!   of the first `max_topics` distinct topics this router (and its clones) handed out; a row
//!   past either limit is an error naming the value, the topic and the key to change. The count
//!   is kept apart from the lookup cache, so resetting the cache never resets it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// The placeholder replaced by the row's aggregate type.
pub const AGGREGATE_TYPE: &str = "{aggregatetype}";

/// Longest aggregate type shown whole in an error (a hostile value can be any length).
const SHOWN_VALUE_LIMIT: usize = 300;

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
    /// The aggregate type is not in `outbox.allowed_aggregate_types`.
    #[error(
        "aggregate type {aggregate_type} (topic {topic:?}) is not in outbox.allowed_aggregate_types"
    )]
    NotAllowed {
        /// The row's aggregate type, quoted (lossy UTF-8, shortened when long).
        aggregate_type: String,
        /// The topic it would route to (shortened when long).
        topic: String,
    },
    /// The aggregate type does not match `outbox.topic_regex`.
    #[error("aggregate type {aggregate_type} does not match outbox.topic_regex {regex:?}")]
    NoMatch {
        /// The row's aggregate type, quoted (lossy UTF-8, shortened when long).
        aggregate_type: String,
        /// The regular expression.
        regex: String,
    },
    /// The topic would be one more distinct topic than `outbox.max_topics`.
    #[error(
        "aggregate type {aggregate_type} would route to topic {topic:?}, a new topic beyond \
         outbox.max_topics = {limit} (walship has routed to {limit} distinct topics since it \
         started)"
    )]
    TooManyTopics {
        /// The row's aggregate type, quoted (lossy UTF-8, shortened when long).
        aggregate_type: String,
        /// The topic it would route to.
        topic: String,
        /// `outbox.max_topics`.
        limit: usize,
    },
}

impl RouteError {
    /// How to fix the cause: the data or the configuration key to change.
    pub fn fix(&self) -> &'static str {
        match self {
            RouteError::MissingAggregateType { .. } | RouteError::InvalidTopic { .. } => {
                "fix the row's aggregate type or outbox.topic"
            }
            RouteError::NoMatch { .. } => {
                "fix the row's aggregate type, or widen outbox.topic_regex"
            }
            RouteError::NotAllowed { .. } => {
                "fix the row's aggregate type, or add the value to \
                 outbox.allowed_aggregate_types if it is legitimate"
            }
            RouteError::TooManyTopics { .. } => {
                "fix the row's aggregate type, or raise outbox.max_topics (0 = no bound) if \
                 this many topics are legitimate"
            }
        }
    }
}

/// Which topics a router may hand out: an allow-list of aggregate types and a bound on the
/// number of distinct topics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicLimits {
    /// Aggregate types that may be routed; empty = any.
    pub allowed_aggregate_types: Vec<String>,
    /// Most distinct topics handed out; 0 = no bound.
    pub max_topics: usize,
    /// A topic never counted against nor refused by `max_topics` (the dead-letter topic).
    pub exempt_topic: Option<String>,
}

/// Maps an aggregate type to its topic, caching the answer.
///
/// Clones share the set of topics counted against [`TopicLimits::max_topics`], so the bound
/// holds across the sessions of one run.
#[derive(Debug, Clone)]
pub struct TopicRouter {
    template: String,
    uses_aggregate_type: bool,
    /// `outbox.topic_regex`, anchored: the aggregate type must match it whole, and the
    /// template may name its groups (`{1}`, `{name}`).
    regex: Option<Arc<regex::Regex>>,
    cache: HashMap<Vec<u8>, Arc<str>>,
    allowed: Option<Arc<HashSet<Vec<u8>>>>,
    max_topics: usize,
    exempt_topic: Option<String>,
    /// Distinct topics handed out (at most `max_topics`); empty without a bound.
    counted: Arc<Mutex<HashSet<Arc<str>>>>,
}

/// True when `topic` has the shape `template` gives: equal to it, or — with placeholders —
/// made of its literal parts around values (an empty aggregate type renders as nothing).
fn matches_template(template: &str, topic: &str) -> bool {
    let parts: Vec<&str> = literals(template);
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    if parts.len() == 1 {
        return topic == *first;
    }
    let Some(mut rest) = topic.strip_prefix(first) else {
        return false;
    };
    let Some(middle) = rest.strip_suffix(last) else {
        return false;
    };
    rest = middle;
    // A literal between two placeholders is found greedily from the left, which is enough for
    // a shape test.
    for literal in &parts[1..parts.len() - 1] {
        match rest.find(literal) {
            Some(at) => rest = &rest[at + literal.len()..],
            None => return false,
        }
    }
    true
}

/// The literal parts of a template around its `{…}` placeholders.
fn literals(template: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        parts.push(&rest[..open]);
        rest = &rest[open + close + 1..];
    }
    parts.push(rest);
    parts
}

/// The names inside a template's `{…}` placeholders.
fn placeholders(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        names.push(&rest[open + 1..open + close]);
        rest = &rest[open + close + 1..];
    }
    names
}

/// Cached distinct aggregate types before the cache is reset (bounds memory on hostile input).
const CACHE_LIMIT: usize = 10_000;

impl TopicRouter {
    /// True when this router could have routed an event to `topic` (its name has the
    /// template's shape): which existing topics may hold this source's events.
    pub fn could_route_to(&self, topic: &str) -> bool {
        matches_template(&self.template, topic)
    }

    /// A router for a template such as `outbox.event.{aggregatetype}`, without limits.
    ///
    /// Fails when the template without placeholders could never form a legal name.
    pub fn new(template: &str) -> Result<Self, RouteError> {
        let uses_aggregate_type = template.contains(AGGREGATE_TYPE);
        // Every placeholder as a one-letter value (`{1}`, `{name}` are for a regex's groups).
        let probe = literals(template).join("x");
        if !is_legal_topic(probe.as_bytes()) {
            return Err(RouteError::InvalidTopic {
                topic: template.to_owned(),
                template: template.to_owned(),
            });
        }
        Ok(TopicRouter {
            template: template.to_owned(),
            uses_aggregate_type,
            regex: None,
            cache: HashMap::new(),
            allowed: None,
            max_topics: 0,
            exempt_topic: None,
            counted: Arc::default(),
        })
    }

    /// This router with `outbox.topic_regex` (Debezium's `route.topic.regex`): an aggregate type
    /// must match `pattern` whole, and the template may use its groups as `{1}` or `{name}`
    /// besides `{aggregatetype}` (the whole value). The error says what is wrong.
    pub fn with_regex(mut self, pattern: &str) -> Result<Self, String> {
        let regex = regex::Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|e| format!("{pattern:?} is not a regular expression: {e}"))?;
        for name in placeholders(&self.template) {
            let known = name == "aggregatetype"
                || name
                    .parse::<usize>()
                    .is_ok_and(|n| n < regex.captures_len())
                || regex.capture_names().flatten().any(|n| n == name);
            if !known {
                return Err(format!(
                    "the topic template {:?} names {{{name}}}, which is neither {{aggregatetype}} \
                     nor a group of {pattern:?} ({{1}}, {{2}}, … or {{name}} of (?<name>…))",
                    self.template
                ));
            }
        }
        self.uses_aggregate_type = true;
        self.regex = Some(Arc::new(regex));
        self.cache.clear();
        Ok(self)
    }

    /// This router with `limits` (replacing any earlier ones, with a fresh count).
    pub fn with_limits(mut self, limits: TopicLimits) -> Self {
        self.allowed = (!limits.allowed_aggregate_types.is_empty()).then(|| {
            Arc::new(
                limits
                    .allowed_aggregate_types
                    .into_iter()
                    .map(String::into_bytes)
                    .collect(),
            )
        });
        self.max_topics = limits.max_topics;
        self.exempt_topic = limits.exempt_topic;
        self.counted = Arc::default();
        self.cache.clear();
        self
    }

    /// The template's placeholders other than `{aggregatetype}`: a regex's groups, which
    /// need [`TopicRouter::with_regex`].
    pub fn group_placeholders(&self) -> Vec<&str> {
        placeholders(&self.template)
            .into_iter()
            .filter(|p| *p != "aggregatetype")
            .collect()
    }

    /// True when the template contains `{aggregatetype}` (or a regex picks from it).
    pub fn uses_aggregate_type(&self) -> bool {
        self.uses_aggregate_type
    }

    /// The topic an aggregate type renders to, without checking legality or limits (for
    /// messages and `walship check`).
    pub fn render_unchecked(&self, aggregate_type: &[u8]) -> String {
        let value = String::from_utf8_lossy(aggregate_type);
        let Some(regex) = &self.regex else {
            return self.template.replace(AGGREGATE_TYPE, &value);
        };
        let captures = regex.captures(&value);
        let mut out = String::with_capacity(self.template.len() + value.len());
        let mut rest = self.template.as_str();
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            out.push_str(&rest[..open]);
            let name = &rest[open + 1..open + close];
            let group = match (&captures, name.parse::<usize>()) {
                _ if name == "aggregatetype" => Some(&*value),
                (Some(c), Ok(n)) => c.get(n).map(|m| m.as_str()),
                (Some(c), Err(_)) => c.name(name).map(|m| m.as_str()),
                (None, _) => None,
            };
            out.push_str(group.unwrap_or_default());
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        out
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
            let topic = self.admit(key)?;
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

    /// Renders the topic for an aggregate type that is not cached and applies the limits.
    fn admit(&self, aggregate_type: &[u8]) -> Result<Arc<str>, RouteError> {
        if let Some(regex) = &self.regex
            && !regex.is_match(&String::from_utf8_lossy(aggregate_type))
        {
            return Err(RouteError::NoMatch {
                aggregate_type: shown(aggregate_type),
                regex: regex.as_str()[4..regex.as_str().len() - 2].to_owned(),
            });
        }
        if self.uses_aggregate_type
            && let Some(allowed) = &self.allowed
            && !allowed.contains(aggregate_type)
        {
            return Err(RouteError::NotAllowed {
                aggregate_type: shown(aggregate_type),
                topic: clipped(self.render_unchecked(aggregate_type)),
            });
        }
        let topic = self.render(aggregate_type)?;
        if self.max_topics == 0 || self.exempt_topic.as_deref() == Some(&*topic) {
            return Ok(topic);
        }
        // A poisoned lock only means another clone panicked mid-insert; the set is still valid.
        let mut counted = self
            .counted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(known) = counted.get(&topic) {
            return Ok(Arc::clone(known));
        }
        if counted.len() >= self.max_topics {
            return Err(RouteError::TooManyTopics {
                aggregate_type: shown(aggregate_type),
                topic: topic.to_string(),
                limit: self.max_topics,
            });
        }
        counted.insert(Arc::clone(&topic));
        Ok(topic)
    }

    /// Distinct topics counted against `max_topics` so far.
    pub fn topics_counted(&self) -> usize {
        self.counted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    fn render(&self, aggregate_type: &[u8]) -> Result<Arc<str>, RouteError> {
        let topic = self.render_unchecked(aggregate_type);
        if !is_legal_topic(topic.as_bytes()) {
            return Err(RouteError::InvalidTopic {
                topic,
                template: self.template.clone(),
            });
        }
        Ok(Arc::from(topic))
    }
}

/// A would-be topic for a message: at most 249 bytes (the longest legal name) and a marker.
fn clipped(mut topic: String) -> String {
    if topic.len() > 249 {
        let mut end = 249;
        while !topic.is_char_boundary(end) {
            end -= 1;
        }
        topic.truncate(end);
        topic.push_str("...");
    }
    topic
}

/// An aggregate type for a message: quoted, lossy UTF-8, shortened when long.
fn shown(value: &[u8]) -> String {
    if value.len() <= SHOWN_VALUE_LIMIT {
        return format!("{:?}", String::from_utf8_lossy(value));
    }
    let head = String::from_utf8_lossy(&value[..SHOWN_VALUE_LIMIT]);
    format!("{head:?}... ({} bytes)", value.len())
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
    fn a_regex_picks_the_parts_of_the_aggregate_type_the_topic_names() {
        let mut r = TopicRouter::new("events.{domain}.{2}")
            .unwrap()
            .with_regex(r"(?<domain>[a-z]+)\.([a-z]+)")
            .unwrap();
        assert!(r.uses_aggregate_type());
        assert_eq!(
            &**r.route(Some(b"shop.order")).unwrap(),
            "events.shop.order"
        );
        let err = r.route(Some(b"Shop.order")).unwrap_err();
        assert!(matches!(err, RouteError::NoMatch { .. }), "{err}");
        assert!(err.to_string().contains("(?<domain>[a-z]+)"), "{err}");
        assert!(r.could_route_to("events.billing.invoice"));
        assert!(!r.could_route_to("other.billing"));
        // Debezium's default: the whole value.
        let mut r = TopicRouter::new("outbox.event.{aggregatetype}")
            .unwrap()
            .with_regex("(?<routedByValue>.*)")
            .unwrap();
        assert_eq!(&**r.route(Some(b"order")).unwrap(), "outbox.event.order");
        for (template, pattern) in [("t.{3}", "(a)(b)"), ("t.{x}", "(?<y>a)"), ("t.{1}", "(")] {
            assert!(
                TopicRouter::new(template)
                    .unwrap()
                    .with_regex(pattern)
                    .is_err(),
                "{template} {pattern}"
            );
        }
    }

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

    fn limited(allowed: &[&str], max_topics: usize, exempt: Option<&str>) -> TopicRouter {
        TopicRouter::new("outbox.event.{aggregatetype}")
            .unwrap()
            .with_limits(TopicLimits {
                allowed_aggregate_types: allowed.iter().map(|s| s.to_string()).collect(),
                max_topics,
                exempt_topic: exempt.map(str::to_owned),
            })
    }

    #[test]
    fn allow_list_accepts_listed_types_and_refuses_others_by_name() {
        let mut r = limited(&["order", "customer"], 0, None);
        assert_eq!(&**r.route(Some(b"order")).unwrap(), "outbox.event.order");
        assert_eq!(
            &**r.route(Some(b"customer")).unwrap(),
            "outbox.event.customer"
        );
        let e = r.route(Some(b"Order")).unwrap_err();
        assert_eq!(
            e,
            RouteError::NotAllowed {
                aggregate_type: "\"Order\"".into(),
                topic: "outbox.event.Order".into()
            }
        );
        let text = e.to_string();
        assert!(
            text.contains("\"Order\"")
                && text.contains("outbox.event.Order")
                && text.contains("outbox.allowed_aggregate_types"),
            "{text}"
        );
        assert!(e.fix().contains("outbox.allowed_aggregate_types"));
        // Refused every time, not only the first.
        assert!(r.route(Some(b"Order")).is_err());
        assert!(matches!(
            r.route(None),
            Err(RouteError::MissingAggregateType { .. })
        ));
        // An empty list allows any value.
        let mut any = limited(&[], 0, None);
        assert!(any.route(Some(b"whatever")).is_ok());
    }

    #[test]
    fn bound_counts_distinct_topics_and_keeps_routing_the_first_ones() {
        let mut r = limited(&[], 2, None);
        assert_eq!(&**r.route(Some(b"a")).unwrap(), "outbox.event.a");
        assert_eq!(&**r.route(Some(b"a")).unwrap(), "outbox.event.a");
        assert_eq!(&**r.route(Some(b"b")).unwrap(), "outbox.event.b");
        assert_eq!(r.topics_counted(), 2);
        let e = r.route(Some(b"c")).unwrap_err();
        assert_eq!(
            e,
            RouteError::TooManyTopics {
                aggregate_type: "\"c\"".into(),
                topic: "outbox.event.c".into(),
                limit: 2
            }
        );
        let text = format!("{e}; {}", e.fix());
        assert!(
            text.contains("\"c\"")
                && text.contains("outbox.event.c")
                && text.contains("outbox.max_topics = 2"),
            "{text}"
        );
        // The first two keep routing; the third stays refused; illegal names are still named.
        assert!(r.route(Some(b"a")).is_ok());
        assert!(r.route(Some(b"b")).is_ok());
        assert!(r.route(Some(b"c")).is_err());
        assert!(matches!(
            r.route(Some(b"bad type")),
            Err(RouteError::InvalidTopic { .. })
        ));
        assert_eq!(r.topics_counted(), 2);
    }

    #[test]
    fn refused_rows_do_not_use_up_the_bound() {
        let mut r = limited(&["a", "b", "bad type"], 1, None);
        assert!(r.route(Some(b"x")).is_err(), "not allowed");
        assert!(r.route(Some(b"bad type")).is_err(), "illegal name");
        assert_eq!(r.topics_counted(), 0);
        assert!(r.route(Some(b"b")).is_ok());
        assert!(matches!(
            r.route(Some(b"a")),
            Err(RouteError::TooManyTopics { .. })
        ));
    }

    #[test]
    fn cache_reset_does_not_reset_the_bound() {
        let mut r = limited(&[], 3, None);
        for v in ["a", "b", "c"] {
            r.route(Some(v.as_bytes())).unwrap();
        }
        // Over CACHE_LIMIT distinct (refused) values, and more cache misses for allowed ones:
        // the cache is reset on the way, the count never is.
        for i in 0..CACHE_LIMIT + 10 {
            assert!(r.route(Some(format!("x{i}").as_bytes())).is_err());
        }
        r.cache.clear();
        assert!(r.route(Some(b"a")).is_ok(), "a counted topic routes again");
        assert!(matches!(
            r.route(Some(b"d")),
            Err(RouteError::TooManyTopics { .. })
        ));
        assert_eq!(r.topics_counted(), 3);

        // Unbounded: more than CACHE_LIMIT distinct topics route, and nothing is counted.
        let mut r = limited(&[], 0, None);
        for i in 0..CACHE_LIMIT + 10 {
            assert!(r.route(Some(format!("t{i}").as_bytes())).is_ok());
        }
        assert_eq!(r.topics_counted(), 0);
        assert!(r.cache.len() <= CACHE_LIMIT);
    }

    #[test]
    fn clones_share_the_count() {
        let mut first = limited(&[], 1, None);
        let mut second = first.clone();
        first.route(Some(b"a")).unwrap();
        assert!(second.route(Some(b"a")).is_ok());
        assert!(second.route(Some(b"b")).is_err());
    }

    #[test]
    fn the_exempt_topic_is_neither_counted_nor_refused() {
        let mut r = limited(&[], 1, Some("outbox.event.dlq"));
        r.route(Some(b"a")).unwrap();
        assert_eq!(&**r.route(Some(b"dlq")).unwrap(), "outbox.event.dlq");
        assert_eq!(r.topics_counted(), 1);
        // The allow-list still applies to the value.
        let mut r = limited(&["a"], 1, Some("outbox.event.dlq"));
        assert!(matches!(
            r.route(Some(b"dlq")),
            Err(RouteError::NotAllowed { .. })
        ));
    }

    #[test]
    fn long_values_are_shortened_in_errors() {
        let mut r = limited(&["a"], 0, None);
        let e = r.route(Some(&[b'z'; 5000])).unwrap_err().to_string();
        assert!(e.len() < 1000 && e.contains("(5000 bytes)"), "{e}");
    }

    #[test]
    fn knows_which_topics_have_its_shape() {
        let r = TopicRouter::new("outbox.event.{aggregatetype}").unwrap();
        assert!(r.could_route_to("outbox.event.order"));
        assert!(r.could_route_to("outbox.event.a.b"));
        assert!(r.could_route_to("outbox.event."), "an empty aggregate type");
        assert!(!r.could_route_to("outbox.dead-letter"));
        assert!(!r.could_route_to("other.event.order"));
        let fixed = TopicRouter::new("events").unwrap();
        assert!(fixed.could_route_to("events") && !fixed.could_route_to("events2"));
        let two = TopicRouter::new("{aggregatetype}.x.{aggregatetype}-y").unwrap();
        assert!(two.could_route_to("a.x.a-y"));
        assert!(!two.could_route_to("a.y.a-y"));
        assert!(!two.could_route_to("a.x.a-z"));
    }
}
