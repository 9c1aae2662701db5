//! Membership in a Kafka consumer group that divides work items among processes.
//!
//! Owns the coordination topics (one per work item, one partition each; they never hold a
//! record) and one group member: a consumer subscribed to the topics of the items *this*
//! process knows, whose assignment, decided by Kafka's group protocol with the
//! cooperative-sticky assignor, says which items it runs. This is how Kafka Connect spreads
//! tasks over workers, with no coordinator of walship's own. An item is named by its topic, so
//! processes that know different items agree on what each topic means, and an item only some
//! processes know is assigned to one of those (the group assigns a topic's partition only to
//! members subscribed to it). Nothing needs more partitions than a topic is created with.
//!
//! Invariant: [`Membership::assigned`] only ever reports the items librdkafka holds assigned
//! now. A member that cannot reach the group coordinator for `session.timeout.ms` loses its
//! assignment and reports the empty set with [`Assignment::reachable`] false, so the caller
//! can tell "moved to another member" (reachable, not assigned) from "cut off" (unreachable:
//! nobody may have been given the item yet). Exclusivity at the source is not this module's
//! promise: the caller keeps a lock of its own (walship: the replication slot, which admits one
//! walsender) for the moment both sides of a move believe they own an item.
//!
//! A coordinator that answers but never completes a rebalance leaves every member without an
//! assignment. The member watches its own join state (librdkafka's statistics, once a second)
//! and reports [`Assignment::unsettled`] once it has been reachable without a steady
//! membership for [`GroupSettings::settle_limit`]: the caller can then fall back on its own
//! lock for every item (walship runs every pipeline, each slot admitting one process) until
//! the group settles again. A member that cannot reach the coordinator is never unsettled: it
//! is cut off, and falling back would take slots it cannot publish from.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::Statistics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::watch;

use crate::sink::SinkSettings;

/// How often the member thread serves librdkafka's callbacks and looks at its assignment.
const POLL: Duration = Duration::from_millis(100);
/// How often the member asks the broker for metadata to know it can reach it, and how long it
/// waits for the answer. A connection into a network partition stays "up" in librdkafka until
/// its requests time out (`socket.timeout.ms`, a minute): an answer is the only proof.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Without an answer for this long, the member counts as cut off.
const CUT_OFF_AFTER: Duration = Duration::from_secs(3);

/// Where and how a process joins the group.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// Kafka consumer group id shared by every process of the deployment.
    pub group: String,
    /// The coordination topic of each work item this process knows: item `i` is `topics[i]`.
    pub topics: Vec<String>,
    /// How long the group waits for a silent member before moving its items.
    pub session_timeout: Duration,
    /// How long the member may be reachable without a steady membership before it reports
    /// [`Assignment::unsettled`].
    pub settle_limit: Duration,
}

/// What the group gave this process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// The items assigned here (indices into [`GroupSettings::topics`]).
    pub items: BTreeSet<usize>,
    /// The member has been reachable without a steady membership for longer than the settle
    /// limit: the coordinator answers but is not completing rebalances, and `items` says
    /// nothing about the others.
    pub unsettled: bool,
    /// The broker answers this member (a metadata request within the last few seconds) and its
    /// group coordinator is known. False while cut off (and before the first contact): which
    /// member runs what is then unknown.
    pub reachable: bool,
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// A coordination topic cannot be read or created.
    #[error(
        "coordination topic {topic:?} on {brokers}: {what}: {error}. walship keeps one topic \
         per pipeline for the group (one partition, no records); create it with 1 partition, or \
         let walship create it (the broker must accept CreateTopics from walship's principal)"
    )]
    Topic {
        /// The topic.
        topic: String,
        /// bootstrap.servers.
        brokers: String,
        /// What walship tried.
        what: &'static str,
        /// The client's or broker's error.
        error: String,
        /// The request went unanswered (retrying can succeed); false when the broker refused.
        unanswered: bool,
    },
    /// The consumer could not be created or subscribed.
    #[error("joining consumer group {group:?} on {brokers}: {error}")]
    Join {
        /// The group.
        group: String,
        /// bootstrap.servers.
        brokers: String,
        /// The client's error.
        error: KafkaError,
    },
}

impl GroupError {
    /// True when retrying later can succeed without a change (the broker was not reachable).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            GroupError::Topic {
                unanswered: true,
                ..
            }
        )
    }
}

/// This process's membership: the assignment as it changes, until [`Membership::leave`].
pub struct Membership {
    assigned: watch::Receiver<Assignment>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Membership {
    /// The assignment now; `changed()` wakes on every change.
    pub fn assigned(&self) -> watch::Receiver<Assignment> {
        self.assigned.clone()
    }

    /// Leaves the group (the others get this member's items at once instead of after the
    /// session timeout) and waits for the member thread to end.
    pub async fn leave(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Makes sure every coordination topic exists, then joins the group.
pub async fn join(sink: &SinkSettings, group: &GroupSettings) -> Result<Membership, GroupError> {
    coordination_topics(sink, group).await?;
    let mut config = sink.connection_config();
    let session_ms = group.session_timeout.as_millis().max(1) as u64;
    config
        .set("group.id", &group.group)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", session_ms.to_string())
        // A third of the session, as Kafka advises, and never slower than a second.
        .set(
            "heartbeat.interval.ms",
            (session_ms / 3).clamp(100, 1000).to_string(),
        )
        // Sent as the rebalance timeout: how long the coordinator waits for every member to
        // rejoin during a rebalance. Brokers that wait for it in full before dropping a dead
        // member (tansu does) would otherwise hold a move for librdkafka's default 300 s. The
        // member thread polls every 100 ms, far within it; librdkafka wants it ≥ the session.
        .set("max.poll.interval.ms", session_ms.to_string())
        // Nothing is read or committed: the assignment is all that matters.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "latest")
        // The join state, for telling a slow rebalance from one that never completes and a
        // member that is cut off from one that is not.
        .set("statistics.interval.ms", "1000")
        .set_log_level(RDKafkaLogLevel::Warning);
    let join_error = |error| GroupError::Join {
        group: group.group.clone(),
        brokers: sink.brokers.clone(),
        error,
    };
    let context = MemberContext {
        steady: AtomicBool::new(false),
        coordinator: AtomicBool::new(false),
    };
    let consumer: BaseConsumer<MemberContext> =
        sink.create(&config, context).map_err(join_error)?;
    let topics: Vec<&str> = group.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(join_error)?;
    let (tx, rx) = watch::channel(Assignment::default());
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = Arc::clone(&stop);
        let (name, topics, limit) = (
            group.group.clone(),
            group.topics.clone(),
            group.settle_limit,
        );
        std::thread::Builder::new()
            .name("walship-group".into())
            .spawn(move || member(consumer, &topics, limit, &tx, &stop, &name))
            .map_err(|e| join_error(KafkaError::ClientCreation(e.to_string())))?
    };
    Ok(Membership {
        assigned: rx,
        stop,
        thread: Some(thread),
    })
}

/// Receives the member's statistics (on the member thread's poll) and librdkafka's log.
struct MemberContext {
    /// The member's join state was `steady` at the last statistics.
    steady: AtomicBool,
    /// The group coordinator was known and connected (`cgrp.state` "up") at the last
    /// statistics.
    coordinator: AtomicBool,
}

impl ClientContext for MemberContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            tracing::warn!(target: "librdkafka", "consumer group member: {fac}: {message}");
        }
    }

    fn stats(&self, statistics: Statistics) {
        let (coordinator, steady) = statistics.cgrp.map_or((false, false), |g| {
            (g.state == "up", g.state == "up" && g.join_state == "steady")
        });
        self.coordinator.store(coordinator, Ordering::Relaxed);
        self.steady.store(steady, Ordering::Relaxed);
    }
}

impl ConsumerContext for MemberContext {}

/// The member thread: serves the consumer's callbacks (heartbeats run on librdkafka's own
/// threads; rebalances and statistics are served here) and publishes each new assignment.
fn member(
    consumer: BaseConsumer<MemberContext>,
    topics: &[String],
    settle_limit: Duration,
    tx: &watch::Sender<Assignment>,
    stop: &AtomicBool,
    group: &str,
) {
    let mut last_error = String::new();
    // Since when the member has been reachable without a steady membership (joining counts: a
    // first join that never completes is the same failure).
    let mut unsteady_since: Option<std::time::Instant> = None;
    let (mut probed_at, mut answered_at): (Option<std::time::Instant>, Option<std::time::Instant>) =
        (None, None);
    while !stop.load(Ordering::Relaxed) {
        if probed_at.is_none_or(|t| t.elapsed() >= PROBE_EVERY) {
            probed_at = Some(std::time::Instant::now());
            let probe = topics.first().map(String::as_str);
            if consumer.fetch_metadata(probe, PROBE_TIMEOUT).is_ok() {
                answered_at = Some(std::time::Instant::now());
            }
        }
        match consumer.poll(POLL) {
            // Records are never produced there; one written by hand is ignored.
            None | Some(Ok(_)) => {}
            Some(Err(e)) => {
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(group, error = %text, "consumer group member");
                    last_error = text;
                }
            }
        }
        let assigned: BTreeSet<usize> = consumer
            .assignment()
            .map(|list| {
                list.elements()
                    .iter()
                    .filter_map(|e| topics.iter().position(|t| t == e.topic()))
                    .collect()
            })
            .unwrap_or_default();
        let context = consumer.context();
        let reachable = context.coordinator.load(Ordering::Relaxed)
            && answered_at.is_some_and(|t| t.elapsed() < CUT_OFF_AFTER);
        if !reachable || context.steady.load(Ordering::Relaxed) {
            unsteady_since = None;
        } else if unsteady_since.is_none() {
            unsteady_since = Some(std::time::Instant::now());
        }
        let now = Assignment {
            items: assigned,
            unsettled: unsteady_since.is_some_and(|t| t.elapsed() >= settle_limit),
            reachable,
        };
        tx.send_if_modified(|current| {
            let changed = *current != now;
            if changed {
                *current = now;
            }
            changed
        });
    }
    // Closing leaves the group: the others rebalance now, not after the session timeout.
    consumer.unsubscribe();
    drop(consumer);
    tx.send_replace(Assignment::default());
}

/// Creates the coordination topics that do not exist yet (one partition each). Processes
/// creating the same topic at once all succeed: the broker's "already exists" counts as done.
async fn coordination_topics(sink: &SinkSettings, group: &GroupSettings) -> Result<(), GroupError> {
    let topics = group.topics.join(", ");
    let fail = |what: &'static str, error: String, unanswered: bool| GroupError::Topic {
        topic: topics.clone(),
        brokers: sink.brokers.clone(),
        what,
        error,
        unanswered,
    };
    let mut config = sink.connection_config();
    config.set_log_level(RDKafkaLogLevel::Error);
    let admin: AdminClient<DefaultClientContext> = sink
        .create(&config, DefaultClientContext)
        .map_err(|e| fail("connecting", e.to_string(), false))?;
    let admin = Arc::new(admin);
    let mut missing = Vec::new();
    for topic in &group.topics {
        let have = crate::sink::listed_partitions(&admin, topic)
            .await
            .map_err(|e| fail("reading its metadata", e.to_string(), false))?
            .map_err(|e| fail("reading its metadata", e.to_string(), true))?;
        if have == 0 {
            missing.push(NewTopic::new(
                topic,
                1,
                TopicReplication::Fixed(sink.topic_replication_factor),
            ));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&missing, &opts)
        .await
        .map_err(|e| fail("creating it", e.to_string(), true))?;
    for r in results {
        match r {
            Ok(topic) => tracing::info!(%topic, "created a coordination topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                // A controller being elected, a broker away: creating it again can succeed.
                use RDKafkaErrorCode as C;
                let passing = matches!(
                    code,
                    C::RequestTimedOut
                        | C::NotController
                        | C::NetworkException
                        | C::BrokerNotAvailable
                        | C::LeaderNotAvailable
                        | C::NotCoordinator
                        | C::CoordinatorNotAvailable
                        | C::CoordinatorLoadInProgress
                        | C::OperationTimedOut
                );
                return Err(GroupError::Topic {
                    topic,
                    brokers: sink.brokers.clone(),
                    what: "creating it",
                    error: code.to_string(),
                    unanswered: passing,
                });
            }
        }
    }
    Ok(())
}
