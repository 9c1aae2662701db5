//! The `[cluster]` check: can the processes of this file meet in their consumer group.
//!
//! Owns one check, `cluster.topics`: each pipeline's coordination topic on the pipelines'
//! brokers exists, or `walship run` will create it. Like every check it changes nothing; the
//! decision ([`topic_check`]) is a pure function of what the broker said.

use std::time::Duration;

use walship_kafka::probe::{self, ClusterInfo};

use super::report::Check;
use crate::config::deployment::ClusterConfig;

const NAME: &str = "cluster.topics";

/// Checks the coordination topics of `pipelines` with the first pipeline's Kafka settings
/// (every pipeline has the same brokers under `[cluster]`).
pub(super) async fn cluster_checks(
    cluster: &ClusterConfig,
    first: &crate::config::Config,
    pipelines: &[String],
) -> Vec<Check> {
    let settings = match first.sink_settings() {
        Ok(s) => s,
        Err(e) => {
            return vec![Check::skip(
                NAME,
                format!("the Kafka settings are incomplete: {e}"),
            )];
        }
    };
    match probe::probe(&settings, Duration::from_secs(10)).await {
        Ok(info) => vec![topic_check(cluster, pipelines, &info)],
        Err(e) => vec![Check::fail(
            NAME,
            format!("group {:?}: {e}", cluster.group),
            "make the brokers in kafka.brokers reachable from every walship process",
        )],
    }
}

/// What the broker's metadata says about the coordination topics of `pipelines`.
pub(super) fn topic_check(
    cluster: &ClusterConfig,
    pipelines: &[String],
    info: &ClusterInfo,
) -> Check {
    let group = &cluster.group;
    let topics: Vec<String> = pipelines
        .iter()
        .map(|p| cluster.coordination_topic(p))
        .collect();
    if let Some((topic, error)) = topics.iter().find_map(|t| {
        info.topics
            .get(t)
            .and_then(|i| i.error.clone())
            .map(|e| (t, e))
    }) {
        return Check::fail(
            NAME,
            format!("coordination topic {topic:?} of group {group:?}: {error}"),
            "grant walship's Kafka principal Describe, Create and Read on the topics \
             cluster.topic_prefix names and Read on the group",
        );
    }
    let missing: Vec<&String> = topics.iter().filter(|t| !info.has_topic(t)).collect();
    let prefix = cluster.topic_prefix();
    if missing.is_empty() {
        Check::pass(
            NAME,
            format!(
                "group {group:?}: the {} pipelines' coordination topics ({prefix}<pipeline>) exist",
                topics.len()
            ),
        )
    } else {
        Check::pass(
            NAME,
            format!(
                "group {group:?}: {} of {} coordination topics ({prefix}<pipeline>) do not exist \
                 yet; walship run creates them with 1 partition each",
                missing.len(),
                topics.len()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use walship_kafka::probe::TopicInfo;

    use super::*;
    use crate::check::Status;

    fn cluster() -> ClusterConfig {
        ClusterConfig {
            group: "fleet".into(),
            topic_prefix: None,
            topic: None,
            session_timeout_ms: 6000,
        }
    }

    #[test]
    fn the_coordination_topics_are_judged_by_their_existence_and_errors() {
        let names = ["a".to_owned(), "b".to_owned()];
        let mut info = ClusterInfo::default();
        let c = topic_check(&cluster(), &names, &info);
        assert_eq!(c.status, Status::Pass);
        assert!(
            c.message.contains(
                "2 of 2 coordination topics (walship.fleet.pipeline.<pipeline>) do not exist yet"
            ),
            "{}",
            c.message
        );
        let exists = TopicInfo {
            partitions: 1,
            error: None,
        };
        info.topics
            .insert("walship.fleet.pipeline.a".into(), exists.clone());
        let c = topic_check(&cluster(), &names, &info);
        assert!(c.message.contains("1 of 2"), "{}", c.message);
        info.topics
            .insert("walship.fleet.pipeline.b".into(), exists);
        let c = topic_check(&cluster(), &names, &info);
        assert!(
            c.message
                .contains("topics (walship.fleet.pipeline.<pipeline>) exist"),
            "{}",
            c.message
        );
        info.topics.insert(
            "walship.fleet.pipeline.b".into(),
            TopicInfo {
                partitions: 0,
                error: Some("Broker: Topic authorization failed".into()),
            },
        );
        let c = topic_check(&cluster(), &names, &info);
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.message.contains("walship.fleet.pipeline.b"),
            "{}",
            c.message
        );
        assert!(c.fix.unwrap_or_default().contains("Read on the group"));
    }
}
