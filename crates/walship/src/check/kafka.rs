//! The Kafka side of `walship check`: the broker answers with walship's own producer settings,
//! the topics walship will write to exist or can be created, the aggregate types in the outbox
//! table pass `outbox.allowed_aggregate_types` and `outbox.max_topics`, and the dead-letter topic
//! is ready when rows may be dead-lettered.
//!
//! Invariant: one metadata request, nothing created; topic names come from the run's own router
//! (the same template, limits and validation), so a topic this check accepts is one walship can
//! write to.

use std::time::Duration;

use walship_kafka::RouteError;
use walship_kafka::probe::{self, ClusterInfo};

use super::postgres::{AGGREGATE_TYPE_SAMPLE, AggregateTypes};
use super::report::{Check, quoted_list};
use crate::config::{BadRowPolicy, Config};

/// How long the broker may take to answer the metadata request.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

/// The Kafka checks: broker metadata, then topics.
pub(super) async fn kafka_checks(config: &Config, types: &AggregateTypes, checks: &mut Vec<Check>) {
    const BROKER: &str = "kafka.broker";
    let settings = match config.sink_settings() {
        Ok(s) => s,
        Err(e) => {
            checks.push(Check::fail(
                BROKER,
                e.to_string(),
                "set the environment variables or files named in kafka.secret_env / \
                 kafka.secret_files",
            ));
            checks.push(Check::skip(
                "kafka.topics",
                "the Kafka settings are incomplete",
            ));
            return;
        }
    };
    match probe::probe(&settings, KAFKA_TIMEOUT).await {
        Ok(cluster) => {
            checks.push(Check::pass(
                BROKER,
                format!(
                    "reached {} ({} broker{}: {})",
                    settings.brokers,
                    cluster.brokers.len(),
                    if cluster.brokers.len() == 1 { "" } else { "s" },
                    cluster
                        .brokers
                        .values()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
            checks.extend(topic_checks(config, types, &cluster));
            checks.extend(dead_letter_check(config, &cluster));
        }
        Err(e @ probe::ProbeError::Config { .. }) => {
            checks.push(Check::fail(
                BROKER,
                e.to_string(),
                "fix or remove the offending property in [kafka.librdkafka] (see librdkafka's \
                 CONFIGURATION.md)",
            ));
            checks.push(Check::skip(
                "kafka.topics",
                "the Kafka client cannot be created",
            ));
        }
        Err(e) => {
            checks.push(Check::fail(
                BROKER,
                format!("cannot reach Kafka: {e}"),
                "check kafka.brokers (host:port as seen from this machine), that the brokers \
                 run, that their advertised listeners resolve from here, and the security \
                 settings (security.protocol, sasl.*, ssl.* in [kafka.librdkafka] / secret_env)",
            ));
            checks.push(Check::skip(
                "kafka.topics",
                "Kafka is not reachable (see kafka.broker)",
            ));
        }
    }
}

/// Aggregate types found in the outbox table that `outbox.allowed_aggregate_types` or
/// `outbox.max_topics` would refuse: a failure under `on_bad_row = "fail"` (walship would stop
/// at the first such row), a warning under `"dead-letter"`.
fn limit_checks(config: &Config, refused: &[String], beyond: &[String]) -> Vec<Check> {
    let outbox = &config.outbox;
    let (fail, outcome) = match outbox.on_bad_row {
        BadRowPolicy::Fail => (true, "walship stops at the first such row"),
        BadRowPolicy::DeadLetter => (false, "walship dead-letters those rows"),
    };
    let check = |name: &str, message: String, fix: String| {
        if fail {
            Check::fail(name, message, fix)
        } else {
            Check::warn(name, message, fix)
        }
    };
    let mut checks = Vec::new();
    if !refused.is_empty() {
        checks.push(check(
            "kafka.topics.allowed",
            format!(
                "aggregate types {} in {} are not in outbox.allowed_aggregate_types; {outcome}",
                quoted_list(refused),
                outbox.table
            ),
            "add the legitimate ones to outbox.allowed_aggregate_types, and fix or delete the \
             other rows before walship reads them"
                .to_owned(),
        ));
    }
    if !beyond.is_empty() {
        checks.push(check(
            "kafka.topics.bound",
            format!(
                "the outbox table {} has aggregate types for more than outbox.max_topics = {} \
                 topics; {} would be refused ({outcome})",
                outbox.table,
                outbox.max_topics,
                quoted_list(beyond)
            ),
            format!(
                "raise outbox.max_topics above {} (0 = no bound) if this many topics are \
                 legitimate, or fix the rows' aggregate types",
                outbox.max_topics
            ),
        ));
    }
    checks
}

/// The topics walship will write to exist, or can be created.
fn topic_checks(config: &Config, types: &AggregateTypes, cluster: &ClusterInfo) -> Vec<Check> {
    const NAME: &str = "kafka.topics";
    let template = &config.outbox.topic;
    let kafka = &config.kafka;
    let mut checks = Vec::new();
    let topics: Vec<String> = match types {
        AggregateTypes::NotUsed => vec![template.clone()],
        AggregateTypes::Unknown(why) => {
            return vec![Check::warn(
                NAME,
                format!(
                    "topics come from {template:?} per aggregate type, and the aggregate types \
                     could not be listed: {why}"
                ),
                if kafka.create_topics {
                    "walship creates missing topics (kafka.create_topics = true); fix the cause \
                     above to have them checked"
                        .to_owned()
                } else {
                    format!(
                        "kafka.create_topics is false: make sure {template:?} exists for every \
                         aggregate type"
                    )
                },
            )];
        }
        AggregateTypes::Found(found) if found.is_empty() => {
            let message = format!(
                "the outbox table has no rows, so no aggregate type (and topic from \
                 {template:?}) can be checked yet"
            );
            return vec![if kafka.create_topics {
                Check::pass(
                    NAME,
                    format!("{message}; walship creates each topic on first use"),
                )
            } else {
                Check::warn(
                    NAME,
                    message,
                    format!(
                        "kafka.create_topics is false: create {template:?} for every aggregate \
                         type before events arrive, or set kafka.create_topics = true"
                    ),
                )
            }];
        }
        AggregateTypes::Found(found) => {
            // The run's router, with outbox.allowed_aggregate_types and outbox.max_topics.
            let mut router = match config.topic_router() {
                Ok(r) => r,
                Err(e) => return vec![Check::fail(NAME, e.to_string(), "fix outbox.topic")],
            };
            let mut topics = Vec::new();
            let mut illegal = Vec::new();
            let mut refused = Vec::new();
            let mut beyond = Vec::new();
            for t in found {
                match router.route(Some(t.as_bytes())) {
                    Ok(topic) => topics.push(topic.to_string()),
                    Err(RouteError::NotAllowed { .. }) => refused.push(t.clone()),
                    Err(RouteError::TooManyTopics { .. }) => beyond.push(t.clone()),
                    Err(_) => illegal.push(t.clone()),
                }
            }
            checks.extend(limit_checks(config, &refused, &beyond));
            if !illegal.is_empty() {
                checks.push(Check::fail(
                    "kafka.topics.names",
                    format!(
                        "aggregate types {} in {} make illegal topic names from {template:?}; \
                         walship stops at the first such row",
                        quoted_list(&illegal),
                        config.outbox.table
                    ),
                    "Kafka topic names are 1-249 characters of letters, digits, '.', '_' and \
                     '-': fix those rows' aggregate type (or delete them before walship reads \
                     them)",
                ));
            }
            topics
        }
    };
    let (present, absent): (Vec<&String>, Vec<&String>) =
        topics.iter().partition(|t| cluster.has_topic(t));
    let errored: Vec<String> = absent
        .iter()
        .filter_map(|t| {
            let e = cluster.topics.get(t.as_str())?.error.as_ref()?;
            Some(format!("{t} ({e})"))
        })
        .collect();
    let missing: Vec<&String> = absent
        .iter()
        .copied()
        .filter(|t| {
            cluster
                .topics
                .get(t.as_str())
                .is_none_or(|i| i.error.is_none())
        })
        .collect();
    let sample_note = match types {
        AggregateTypes::Found(f) if f.len() as i64 >= AGGREGATE_TYPE_SAMPLE => {
            format!(" (the first {AGGREGATE_TYPE_SAMPLE} aggregate types)")
        }
        _ => String::new(),
    };
    if !errored.is_empty() {
        checks.push(Check::fail(
            "kafka.topics.access",
            format!("the broker reports errors for {}", errored.join(", ")),
            format!(
                "grant client {:?} Describe and Write on those topics (and Create when \
                 kafka.create_topics = true)",
                kafka.client_id
            ),
        ));
    }
    let rf_too_high = replication_factor_too_high(kafka, cluster);
    let mut message = if present.is_empty() {
        String::new()
    } else {
        format!("exist: {}", quoted_list(&present))
    };
    if missing.is_empty() {
        if !present.is_empty() {
            checks.push(Check::pass(NAME, format!("topics {message}{sample_note}")));
        }
    } else if !kafka.create_topics {
        if !message.is_empty() {
            message.push_str("; ");
        }
        checks.push(Check::fail(
            NAME,
            format!(
                "topics {message}missing: {}{sample_note}, and kafka.create_topics is false",
                quoted_list(&missing)
            ),
            format!(
                "create them (e.g. kafka-topics.sh --create --topic NAME --partitions {} \
                 --replication-factor {}) or set kafka.create_topics = true",
                kafka.topic_partitions, kafka.topic_replication_factor
            ),
        ));
    } else if rf_too_high {
        checks.push(Check::fail(
            NAME,
            format!(
                "topics {} are missing and walship would create them with replication factor \
                 {}, but the cluster has {} broker{}",
                quoted_list(&missing),
                kafka.topic_replication_factor,
                cluster.brokers.len(),
                if cluster.brokers.len() == 1 { "" } else { "s" }
            ),
            format!(
                "set kafka.topic_replication_factor to at most {}, or create the topics yourself",
                cluster.brokers.len()
            ),
        ));
    } else {
        if !message.is_empty() {
            message.push_str("; ");
        }
        checks.push(Check::pass(
            NAME,
            format!(
                "topics {message}missing, created by walship on first use ({} partitions, \
                 replication factor {}): {}{sample_note}",
                kafka.topic_partitions,
                kafka.topic_replication_factor,
                quoted_list(&missing)
            ),
        ));
    }
    checks
}

/// True when topics walship creates would ask for more replicas than the cluster has brokers
/// (-1, the broker's default, never does).
fn replication_factor_too_high(kafka: &crate::config::KafkaConfig, cluster: &ClusterInfo) -> bool {
    usize::try_from(kafka.topic_replication_factor).is_ok_and(|rf| rf > cluster.brokers.len())
}

/// With `on_bad_row = "dead-letter"`: the dead-letter topic must exist or be creatable, or
/// the first bad row would stop walship instead of being set aside.
fn dead_letter_check(config: &Config, cluster: &ClusterInfo) -> Option<Check> {
    const NAME: &str = "kafka.dead_letter_topic";
    if config.outbox.on_bad_row != crate::config::BadRowPolicy::DeadLetter {
        return None;
    }
    let topic = &config.outbox.dead_letter_topic;
    let kafka = &config.kafka;
    let error = cluster.topics.get(topic).and_then(|t| t.error.as_ref());
    let rf_too_high = replication_factor_too_high(kafka, cluster);
    Some(if cluster.has_topic(topic) {
        Check::pass(NAME, format!("dead-letter topic {topic:?} exists"))
    } else if let Some(e) = error {
        Check::fail(
            NAME,
            format!("the broker reports an error for dead-letter topic {topic:?}: {e}"),
            format!(
                "grant client {:?} Describe and Write on it (and Create when \
                 kafka.create_topics = true)",
                kafka.client_id
            ),
        )
    } else if kafka.create_topics && rf_too_high {
        Check::fail(
            NAME,
            format!(
                "dead-letter topic {topic:?} is missing and walship would create it with \
                 replication factor {}, but the cluster has {} broker(s)",
                kafka.topic_replication_factor,
                cluster.brokers.len()
            ),
            format!(
                "set kafka.topic_replication_factor to at most {}, or create the topic yourself",
                cluster.brokers.len()
            ),
        )
    } else if kafka.create_topics {
        Check::pass(
            NAME,
            format!(
                "dead-letter topic {topic:?} is missing; walship creates it for the first bad row"
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!(
                "dead-letter topic {topic:?} is missing and kafka.create_topics is false: the \
                 first bad row would stop walship instead of being dead-lettered"
            ),
            format!(
                "create it (e.g. kafka-topics.sh --create --topic {topic} --partitions {} \
                 --replication-factor {}) or set kafka.create_topics = true",
                config.kafka.topic_partitions, config.kafka.topic_replication_factor
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::fixtures::config;
    use crate::check::report::Status;

    #[test]
    fn dead_letter_topic_is_checked_only_with_that_policy() {
        let mut cluster = ClusterInfo::default();
        cluster.brokers.insert(1, "k:9092".into());
        assert!(dead_letter_check(&config(""), &cluster).is_none());
        let dead_letter = "[outbox]\non_bad_row = \"dead-letter\"\ndead_letter_topic = \"dlq\"\n";
        let creates = dead_letter_check(&config(dead_letter), &cluster).unwrap();
        assert_eq!(creates.status, Status::Pass, "{creates:?}");
        let fixed = config(&format!("create_topics = false\n{dead_letter}"));
        let missing = dead_letter_check(&fixed, &cluster).unwrap();
        assert_eq!(missing.status, Status::Fail);
        assert!(
            missing.message.contains("\"dlq\"")
                && missing
                    .fix
                    .as_deref()
                    .is_some_and(|f| f.contains("--topic dlq")),
            "{missing:?}"
        );
        cluster.topics.insert(
            "dlq".into(),
            walship_kafka::probe::TopicInfo {
                partitions: 1,
                error: None,
            },
        );
        let exists = dead_letter_check(&fixed, &cluster).unwrap();
        assert_eq!(exists.status, Status::Pass, "{exists:?}");
        let too_many = config(&format!("topic_replication_factor = 3\n{dead_letter}"));
        cluster.topics.clear();
        let rf = dead_letter_check(&too_many, &cluster).unwrap();
        assert_eq!(rf.status, Status::Fail, "{rf:?}");
        cluster.topics.insert(
            "dlq".into(),
            walship_kafka::probe::TopicInfo {
                partitions: 0,
                error: Some("TopicAuthorizationFailed".into()),
            },
        );
        let denied = dead_letter_check(&config(dead_letter), &cluster).unwrap();
        assert_eq!(denied.status, Status::Fail, "{denied:?}");
        assert!(
            denied.message.contains("TopicAuthorizationFailed"),
            "{denied:?}"
        );
    }

    #[test]
    fn topics_fixed_aggregate_and_missing() {
        let mut cluster = ClusterInfo::default();
        cluster.brokers.insert(1, "k:9092".into());
        cluster.topics.insert(
            "outbox.event.order".into(),
            walship_kafka::probe::TopicInfo {
                partitions: 3,
                error: None,
            },
        );
        let c = config("[outbox]\ntopic = \"events\"\n");
        let checks = topic_checks(&c, &AggregateTypes::NotUsed, &cluster);
        assert_eq!(
            checks[0].status,
            Status::Pass,
            "create_topics = true: {checks:?}"
        );
        let c = Config::from_toml(
            "[postgres]\nurl = \"postgres://w@db/app\"\n[kafka]\nbrokers = \"k:9092\"\ncreate_topics = false\n",
            std::iter::empty(),
            "test",
        )
        .unwrap();
        let types =
            AggregateTypes::Found(vec!["order".into(), "customer".into(), "bad name".into()]);
        let checks = topic_checks(&c, &types, &cluster);
        let missing = checks.iter().find(|c| c.name == "kafka.topics").unwrap();
        assert_eq!(missing.status, Status::Fail);
        assert!(
            missing.message.contains("\"outbox.event.customer\"")
                && missing.message.contains("exist: \"outbox.event.order\""),
            "{missing:?}"
        );
        let names = checks
            .iter()
            .find(|c| c.name == "kafka.topics.names")
            .unwrap();
        assert!(names.message.contains("\"bad name\""), "{names:?}");
    }

    #[test]
    fn topics_the_limits_would_refuse_are_named() {
        let mut cluster = ClusterInfo::default();
        cluster.brokers.insert(1, "k:9092".into());
        let types = AggregateTypes::Found(vec!["order".into(), "customer".into(), "x".into()]);
        let find = |checks: &[Check], name: &str| {
            checks
                .iter()
                .find(|c| c.name == name)
                .cloned()
                .unwrap_or_else(|| panic!("no {name} in {checks:?}"))
        };
        let fix = |c: &Check| c.fix.clone().unwrap_or_default();

        let c = config("[outbox]\nallowed_aggregate_types = [\"order\", \"customer\"]\n");
        let checks = topic_checks(&c, &types, &cluster);
        let allowed = find(&checks, "kafka.topics.allowed");
        assert_eq!(allowed.status, Status::Fail, "{allowed:?}");
        assert!(
            allowed.message.contains("\"x\"")
                && !allowed.message.contains("\"order\"")
                && fix(&allowed).contains("outbox.allowed_aggregate_types"),
            "{allowed:?}"
        );
        assert!(checks.iter().all(|c| c.name != "kafka.topics.bound"));

        let c = config("[outbox]\nmax_topics = 1\n");
        let checks = topic_checks(&c, &types, &cluster);
        let bound = find(&checks, "kafka.topics.bound");
        assert_eq!(bound.status, Status::Fail, "{bound:?}");
        assert!(
            bound.message.contains("\"customer\", \"x\"")
                && bound.message.contains("max_topics = 1")
                && fix(&bound).contains("outbox.max_topics"),
            "{bound:?}"
        );

        let c = config("[outbox]\nmax_topics = 1\non_bad_row = \"dead-letter\"\n");
        let checks = topic_checks(&c, &types, &cluster);
        let bound = find(&checks, "kafka.topics.bound");
        assert_eq!(bound.status, Status::Warn, "{bound:?}");
        assert!(bound.message.contains("dead-letters"), "{bound:?}");
    }
}
