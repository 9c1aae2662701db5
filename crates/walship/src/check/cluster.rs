//! The `[cluster]` check: can the processes of this file meet in their consumer group.
//!
//! Owns one check, `cluster.topic`: the coordination topic on the pipelines' brokers exists
//! with a partition per pipeline, or `walship run` will create or grow it. Like every check it
//! changes nothing; the decision ([`topic_check`]) is a pure function of what the broker said.

use std::time::Duration;

use walship_kafka::probe::{self, ClusterInfo};

use super::report::Check;
use crate::pipelines::ClusterConfig;

const NAME: &str = "cluster.topic";

/// Checks the coordination topic with the first pipeline's Kafka settings (every pipeline has
/// the same brokers under `[cluster]`).
pub(super) async fn cluster_checks(
    cluster: &ClusterConfig,
    first: &crate::Config,
    pipelines: usize,
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

/// What the broker's metadata says about the coordination topic.
pub(super) fn topic_check(cluster: &ClusterConfig, pipelines: usize, info: &ClusterInfo) -> Check {
    let topic = cluster.topic();
    let group = &cluster.group;
    match info.topics.get(&topic) {
        Some(t) if t.error.is_some() => Check::fail(
            NAME,
            format!(
                "coordination topic {topic:?} of group {group:?}: {}",
                t.error.clone().unwrap_or_default()
            ),
            "grant walship's Kafka principal Describe, Create and Read on the topic and Read on \
             the group",
        ),
        Some(t) if t.partitions >= pipelines => Check::pass(
            NAME,
            format!(
                "group {group:?}: coordination topic {topic:?} has {} partitions for {pipelines} \
                 pipelines",
                t.partitions
            ),
        ),
        Some(t) => Check::pass(
            NAME,
            format!(
                "group {group:?}: coordination topic {topic:?} has {} partitions; walship run \
                 adds partitions up to {pipelines}, one per pipeline",
                t.partitions
            ),
        ),
        None => Check::pass(
            NAME,
            format!(
                "group {group:?}: coordination topic {topic:?} does not exist yet; walship run \
                 creates it with {pipelines} partitions"
            ),
        ),
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
            topic: None,
            session_timeout_ms: 6000,
        }
    }

    #[test]
    fn the_coordination_topic_is_judged_by_its_partitions_and_errors() {
        let mut info = ClusterInfo::default();
        let c = topic_check(&cluster(), 3, &info);
        assert_eq!(c.status, Status::Pass);
        assert!(
            c.message.contains("creates it with 3 partitions"),
            "{}",
            c.message
        );
        info.topics.insert(
            "walship.fleet.pipelines".into(),
            TopicInfo {
                partitions: 2,
                error: None,
            },
        );
        let c = topic_check(&cluster(), 3, &info);
        assert!(
            c.message.contains("adds partitions up to 3"),
            "{}",
            c.message
        );
        let c = topic_check(&cluster(), 2, &info);
        assert!(
            c.message.contains("has 2 partitions for 2 pipelines"),
            "{}",
            c.message
        );
        info.topics.insert(
            "walship.fleet.pipelines".into(),
            TopicInfo {
                partitions: 0,
                error: Some("Broker: Topic authorization failed".into()),
            },
        );
        let c = topic_check(&cluster(), 2, &info);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap_or_default().contains("Read on the group"));
    }
}
