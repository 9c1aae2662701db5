//! Several processes share a deployment's pipelines (`[cluster]`).
//!
//! Owns the mapping from the consumer group's assignment to running pipelines. Each pipeline
//! has a coordination topic named after it ([`ClusterConfig::coordination_topic`]), and Kafka's
//! group protocol ([`walship_kafka::group`]) decides which process holds which topic — as Kafka
//! Connect spreads connector tasks over its workers. A process subscribes to the topics of the
//! pipelines its file lists, so processes whose files differ (a rolling deploy that adds a
//! pipeline) agree on what each topic means, and a pipeline only some processes know is run by
//! one of those. Each pipeline has a follower task here that runs it while its claim says so.
//!
//! ```text
//!  group member ──Assignment──▶ claim per pipeline ──▶ follower: run_pipeline / stop / hold
//!   reachable, assigned here          Run
//!   reachable, assigned elsewhere     Release  (graceful stop: acks awaited, slot confirmed, let go)
//!   reachable, group never settles    Run      (every pipeline; the slot admits one process)
//!   cut off from the coordinator      Hold     (start nothing; keep what runs until the broker
//!                                               answers again, or another process waits for
//!                                               the slot: then stop at once)
//! ```
//!
//! Invariants: a pipeline runs in this process only while its claim is Run or Hold, and a new
//! run starts only after the previous one here has ended. Between processes the replication
//! slot stays the lock: a pipeline moved here while the old owner's walsender still holds its
//! slot waits as a standby ([`crate::pipeline::standby`]) until the slot is released, and the old owner
//! releases it only once its producer is gone ([`crate::session`]), so a move never puts two
//! producers on one slot. A process cut off from the broker takes nothing new: falling back on
//! the slots there would take pipelines it cannot publish from.
//!
//! How long a move takes (the bound [`ClusterConfig::move_bound`], 2 session timeouts + 5 s):
//! a process that leaves (SIGTERM) hands its pipelines over at once; one that dies is noticed
//! when its group session times out (`cluster.session_timeout_ms`, 6 s by default), then the
//! group rebalances and the new owner takes the slot as soon as PostgreSQL has ended the dead
//! process's walsender; when the group does not settle (tansu 0.6.0 after its leader died)
//! every process falls back after two session timeouts. A pipeline that nobody streams for
//! longer than the bound is logged and shows in `walship_unowned_seconds`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use walship_kafka::group::{self, Assignment, GroupSettings};

use crate::config::deployment::ClusterConfig;
use crate::error::Error;
use crate::pipeline::membership::{Claim, follow};
use crate::pipeline::watch::watch_unowned;
use crate::pipeline::{Member, failure, note_stopped};
use crate::telemetry::Telemetry;

/// Session timeouts without a steady group membership (while the coordinator answers) after
/// which this process runs every pipeline, the slots deciding which process streams which,
/// until the group settles. A rebalance waits at most one rebalance timeout (walship sets it
/// to the session timeout) for the members to rejoin, so one that is still not steady after a
/// whole session timeout is not completing — and one session timeout keeps the fallback within
/// [`ClusterConfig::move_bound`] after the group's leader dies (its death is noticed after one
/// session timeout, the fallback after a second).
const UNSETTLED_SESSIONS: u32 = 1;

/// Pause before joining again after the broker did not answer.
const JOIN_RETRY: Duration = Duration::from_secs(2);

/// Joins the group and runs the pipelines assigned to this process until `cancel`; returns
/// the pipelines that stopped with a definite error (`name: error`).
pub async fn run(
    cluster: &ClusterConfig,
    pipelines: Vec<Member>,
    cancel: &CancellationToken,
) -> Result<Vec<String>, Error> {
    let Some((_, first, _)) = pipelines.first() else {
        return Ok(Vec::new());
    };
    let settings = GroupSettings {
        group: cluster.group.clone(),
        topics: pipelines
            .iter()
            .map(|(name, _, _)| cluster.coordination_topic(name))
            .collect(),
        session_timeout: cluster.session_timeout(),
        settle_limit: cluster.session_timeout() * UNSETTLED_SESSIONS,
    };
    for (_, _, telemetry) in &pipelines {
        telemetry.elsewhere.store(true, Ordering::Relaxed);
    }
    let membership = loop {
        match group::join(&first.sink, &settings).await {
            Ok(m) => break m,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in_ms = JOIN_RETRY.as_millis() as u64, "cannot join the cluster yet; running no pipeline meanwhile");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(Vec::new()),
                    _ = tokio::time::sleep(JOIN_RETRY) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    tracing::info!(
        group = %settings.group,
        topics = %format!("{}<pipeline>", cluster.topic_prefix()),
        pipelines = pipelines.len(),
        "joined the cluster; pipelines start as the group assigns them to this process"
    );
    let names: Vec<String> = pipelines.iter().map(|(n, _, _)| n.clone()).collect();
    let mut watchers = watch_unowned(&pipelines, cluster.move_bound());
    let mut followers = tokio::task::JoinSet::new();
    let mut claims = Vec::with_capacity(pipelines.len());
    let members: Vec<Arc<Telemetry>> = pipelines.iter().map(|(_, _, t)| Arc::clone(t)).collect();
    for (name, settings, telemetry) in pipelines {
        let (tx, rx) = watch::channel(Claim::Hold);
        claims.push(tx);
        let cancel = cancel.clone();
        let span = tracing::info_span!("pipeline", name = %name);
        followers.spawn(
            async move {
                let result = follow(rx, &settings, &telemetry, &cancel).await;
                note_stopped(&telemetry, &result);
                (name, result)
            }
            .instrument(span),
        );
    }
    let mut assignment = membership.assigned();
    let mut failed = Vec::new();
    let mut last = Assignment::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = assignment.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = assignment.borrow_and_update().clone();
                log_change(&settings, &names, &last, &now);
                for telemetry in &members {
                    telemetry.in_group.store(now.reachable, Ordering::Relaxed);
                }
                for (i, tx) in claims.iter().enumerate() {
                    let claim = Claim::of(&now, i);
                    tx.send_if_modified(|c| std::mem::replace(c, claim) != claim);
                }
                last = now;
            }
            Some(joined) = followers.join_next() => failed.extend(failure(joined)),
        }
    }
    // Stop first, then leave: the pipelines' slots are released before the group hands them on.
    while let Some(joined) = followers.join_next().await {
        failed.extend(failure(joined));
    }
    membership.leave().await;
    watchers.abort_all();
    Ok(failed)
}

/// Logs what changed between two assignments: reachability, settling, and where pipelines run.
fn log_change(settings: &GroupSettings, names: &[String], last: &Assignment, now: &Assignment) {
    let group = &settings.group;
    if now.reachable != last.reachable {
        if now.reachable {
            tracing::info!(%group, "the group coordinator answers");
        } else {
            tracing::warn!(
                %group,
                "cut off from the group coordinator: starting no pipeline, and keeping those \
                 that run here until the broker answers again or another process waits for \
                 their slots"
            );
        }
    }
    if now.unsettled != last.unsettled {
        if now.unsettled {
            tracing::warn!(
                %group,
                "the consumer group has not settled for {} s while its coordinator answers (it is \
                 not completing rebalances): running every pipeline, each slot admitting one \
                 process, until it settles",
                settings.settle_limit.as_secs()
            );
        } else {
            tracing::info!(%group, "the consumer group settled again");
        }
    }
    if now.reachable {
        tracing::info!(
            here = %now.items.iter().map(|&i| names[i].as_str()).collect::<Vec<_>>().join(","),
            unsettled = now.unsettled,
            "the cluster's assignment changed"
        );
    }
}
