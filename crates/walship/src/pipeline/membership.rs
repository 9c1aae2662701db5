//! One pipeline under `[cluster]`: run it while the group's claim says so.
//!
//! Owns [`Claim`] (what this process may do with one pipeline, from the group's assignment) and
//! the follower that starts, stops or holds the pipeline as its claim changes
//! ([`crate::cluster`] maps the assignment to claims).
//!
//! Invariant: a pipeline runs here only while its claim is Run or Hold, and a new run starts
//! only after the previous one here has ended; a pipeline held while cut off from the broker
//! is stopped at once when another process waits for its slot.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use walship_kafka::group::Assignment;

use super::run_pipeline;
use super::standby::{contender, watch_owner};
use crate::config::settings::Settings;
use crate::error::Error;
use crate::failover::Lineage;
use crate::telemetry::Telemetry;

/// What this process may do with one pipeline, from the group's assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Run it: assigned here, or the group never settles (the slot decides).
    Run,
    /// Stop it gracefully: the group gave it to another process.
    Release,
    /// Cut off from the group's coordinator: start nothing, keep it if it runs here until the
    /// broker answers again or another process waits for its slot.
    Hold,
}

impl Claim {
    /// The claim on pipeline `i` under `assignment`.
    pub(crate) fn of(assignment: &Assignment, i: usize) -> Claim {
        if !assignment.reachable {
            Claim::Hold
        } else if assignment.unsettled || assignment.items.contains(&i) {
            Claim::Run
        } else {
            Claim::Release
        }
    }
}

/// Runs one pipeline while `claim` is Run (or Hold, once running), stopping it when it turns
/// Release, until `cancel`. Ends with the pipeline's definite error, if it has one (the
/// pipeline stays assigned here, stopped: another process would meet the same error).
pub(crate) async fn follow(
    mut claim: watch::Receiver<Claim>,
    settings: &Settings,
    telemetry: &Arc<Telemetry>,
    cancel: &CancellationToken,
) -> Result<(), Error> {
    // What this process learns of the server's timelines outlives each turn it runs the pipeline.
    let lineage = Arc::new(Lineage::default());
    loop {
        telemetry.elsewhere.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            run = claim.wait_for(|c| *c == Claim::Run) => if run.is_err() {
                return Ok(());
            },
            // Who streams the slot meanwhile, for `walship_unowned_seconds`.
            () = watch_owner(&settings.source, telemetry) => {}
        }
        telemetry.elsewhere.store(false, Ordering::Relaxed);
        tracing::info!("assigned to this process: starting");
        let run_token = cancel.child_token();
        let abandon = CancellationToken::new();
        let run = run_pipeline(settings, &run_token, &abandon, telemetry, &lineage);
        tokio::pin!(run);
        let result = loop {
            let held = *claim.borrow() == Claim::Hold && !run_token.is_cancelled();
            tokio::select! {
                result = &mut run => break result,
                changed = claim.changed(), if !run_token.is_cancelled() => {
                    if changed.is_err() {
                        run_token.cancel();
                        continue;
                    }
                    let now = *claim.borrow_and_update();
                    if now == Claim::Release {
                        tracing::info!("assigned to another process: stopping to release the slot");
                        run_token.cancel();
                    }
                }
                () = contender(&settings.source), if held => {
                    tracing::warn!(
                        "cut off from the group while another process waits for this \
                         pipeline's slot: stopping now, without waiting for acknowledgements \
                         (what was not acknowledged is read again by the slot's next owner)"
                    );
                    abandon.cancel();
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_claim_follows_reachability_then_settling_then_the_assignment() {
        let a = |items: &[usize], unsettled, reachable| Assignment {
            items: items.iter().copied().collect::<BTreeSet<_>>(),
            unsettled,
            reachable,
        };
        assert_eq!(Claim::of(&a(&[0], false, true), 0), Claim::Run);
        assert_eq!(Claim::of(&a(&[0], false, true), 1), Claim::Release);
        // A group that never settles while the broker answers: every pipeline, the slots decide.
        assert_eq!(Claim::of(&a(&[], true, true), 1), Claim::Run);
        // Cut off: nothing new, whatever was assigned before and however long it lasts.
        assert_eq!(Claim::of(&a(&[0], false, false), 0), Claim::Hold);
        assert_eq!(Claim::of(&a(&[], true, false), 1), Claim::Hold);
        assert_eq!(Claim::of(&Assignment::default(), 0), Claim::Hold);
    }
}
