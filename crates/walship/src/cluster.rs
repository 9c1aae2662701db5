//! Several processes share a deployment's pipelines (`[cluster]`).
//!
//! Owns the mapping from the consumer group's assignment to running pipelines. Pipelines are
//! numbered in name order, partition `i` of the coordination topic stands for pipeline `i`, and
//! Kafka's group protocol ([`walship_kafka::group`]) decides which process holds which
//! partition — as Kafka Connect spreads connector tasks over its workers. Each pipeline has a
//! follower task here that runs it while it is assigned to this process and stops it when it
//! is not: gracefully, so its open transaction is finished, the slot confirmed behind the
//! broker's acks, and its walsender gone.
//!
//! Invariants: a pipeline runs in this process only while assigned here, and a new run starts
//! only after the previous one here has ended. Between processes the replication slot stays the
//! lock: a pipeline moved here while the old owner's walsender still holds its slot waits as a
//! standby ([`crate::run`]) until the slot is released, so a move never puts two producers on
//! one slot, even when the group and PostgreSQL disagree for a moment about who owns it.
//!
//! How long a move takes: a process that leaves (SIGTERM) hands its pipelines over at once; one
//! that dies is noticed when its group session times out (`cluster.session_timeout_ms`, 6 s by
//! default), then the group rebalances and the new owner takes the slot as soon as PostgreSQL
//! has ended the dead process's walsender.
//!
//! When the group does not settle for [`UNSETTLED_SESSIONS`] session timeouts (a coordinator
//! that never completes a rebalance: tansu 0.6.0 after its leader died), every process runs
//! every pipeline, which is active-passive per slot: still one process per slot, no spreading,
//! and nothing left unstreamed. Once the group settles, the assignment rules again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use walship_kafka::group::{self, GroupSettings};

use crate::error::Error;
use crate::pipelines::ClusterConfig;
use crate::run::{Member, failure, note_stopped, run_pipeline};
use crate::settings::Settings;
use crate::telemetry::Telemetry;

/// Session timeouts without a steady group membership after which this process runs every
/// pipeline, the slots deciding which process streams which, until the group settles.
const UNSETTLED_SESSIONS: u32 = 2;

/// Pause before joining again after the broker did not answer.
const JOIN_RETRY: Duration = Duration::from_secs(2);

/// Joins the group and runs the pipelines assigned to this process until `cancel`; returns
/// the pipelines that stopped with a definite error (`name: error`).
pub async fn run(
    cluster: &ClusterConfig,
    mut pipelines: Vec<Member>,
    cancel: &CancellationToken,
) -> Result<Vec<String>, Error> {
    // Every process numbers the pipelines alike: by name, whatever the file's order.
    pipelines.sort_by(|a, b| a.0.cmp(&b.0));
    let Some((_, first, _)) = pipelines.first() else {
        return Ok(Vec::new());
    };
    let settings = GroupSettings {
        group: cluster.group.clone(),
        topic: cluster.topic(),
        items: pipelines.len(),
        session_timeout: cluster.session_timeout(),
        settle_limit: cluster.session_timeout() * UNSETTLED_SESSIONS,
    };
    let membership = loop {
        match group::join(&first.sink, &settings).await {
            Ok(m) => break m,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, retry_in_ms = JOIN_RETRY.as_millis() as u64, "cannot join the cluster yet");
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
        topic = %settings.topic,
        pipelines = pipelines.len(),
        "joined the cluster; pipelines start as the group assigns them to this process"
    );
    let names: Vec<String> = pipelines.iter().map(|(n, _, _)| n.clone()).collect();
    let mut followers = tokio::task::JoinSet::new();
    let mut assigned_to = Vec::with_capacity(pipelines.len());
    for (name, settings, telemetry) in pipelines {
        let (tx, rx) = watch::channel(false);
        assigned_to.push(tx);
        telemetry.elsewhere.store(true, Ordering::Relaxed);
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
    let mut unsettled = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = assignment.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = assignment.borrow_and_update().clone();
                let here: BTreeSet<usize> = if now.unsettled {
                    (0..names.len()).collect()
                } else {
                    now.items.clone()
                };
                if now.unsettled != unsettled {
                    unsettled = now.unsettled;
                    if unsettled {
                        tracing::warn!(
                            group = %settings.group,
                            "the consumer group has not settled for {} s (its coordinator is not \
                             completing rebalances): running every pipeline, each slot admitting \
                             one process, until it settles",
                            settings.settle_limit.as_secs()
                        );
                    } else {
                        tracing::info!(group = %settings.group, "the consumer group settled again");
                    }
                }
                tracing::info!(
                    here = %here.iter().map(|&i| names[i].as_str()).collect::<Vec<_>>().join(","),
                    unsettled,
                    "the cluster's assignment changed"
                );
                for (i, tx) in assigned_to.iter().enumerate() {
                    let want = here.contains(&i);
                    tx.send_if_modified(|a| std::mem::replace(a, want) != want);
                }
            }
            Some(joined) = followers.join_next() => failed.extend(failure(joined)),
        }
    }
    // Stop first, then leave: the pipelines' slots are released before the group hands them on.
    while let Some(joined) = followers.join_next().await {
        failed.extend(failure(joined));
    }
    membership.leave().await;
    Ok(failed)
}

/// Runs one pipeline whenever `assigned` is true, stopping it when it turns false, until
/// `cancel`. Ends with the pipeline's definite error, if it has one (the pipeline stays
/// assigned here, stopped: another process would meet the same error).
async fn follow(
    mut assigned: watch::Receiver<bool>,
    settings: &Settings,
    telemetry: &Arc<Telemetry>,
    cancel: &CancellationToken,
) -> Result<(), Error> {
    loop {
        telemetry.elsewhere.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            here = assigned.wait_for(|a| *a) => if here.is_err() {
                return Ok(());
            },
        }
        telemetry.elsewhere.store(false, Ordering::Relaxed);
        tracing::info!("assigned to this process: starting");
        let run_token = cancel.child_token();
        let run = run_pipeline(settings, &run_token, telemetry);
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                result = &mut run => break result,
                _ = assigned.wait_for(|a| !*a), if !run_token.is_cancelled() => {
                    tracing::info!("assigned to another process: stopping to release the slot");
                    run_token.cancel();
                }
            }
        };
        result?;
        if cancel.is_cancelled() {
            return Ok(());
        }
        tracing::info!("stopped; the slot is free for the process the group chose");
    }
}
