//! Whether walship may continue on the server a new session reached: the same timeline, a
//! promotion it can follow, or one it must stop at ([`verify_continuity`]), and which published
//! positions a server's history holds ([`History`]).
//!
//! # What is normal after a promotion, and what is fatal
//!
//! The synced slot's `confirmed_flush_lsn` trails the old primary's: the standby's slotsync worker
//! copies it every 200 ms while it changes and backs off to once every 30 s while it does not, so
//! after a quiet spell the copy can be up to 30 s old (measured: README, "Failover"). Streaming
//! from it sends those events again; they are the unconfirmed window of an ordinary crash, and the
//! resume lookup skips the ones already in Kafka. That is normal.
//!
//! Fatal, each with its explanation, because continuing would leave Kafka with events the new
//! primary does not have or skip events it does have:
//!
//! - the promoted server is on an older timeline than walship streamed from, or on one that does
//!   not descend from it (an old primary started again, a sibling standby);
//! - its timeline branched off *before* the position walship had confirmed (`S < P`): the old
//!   primary sent walship WAL the standby never received (no `synchronized_standby_slots`), so
//!   Kafka holds events that are not in the new primary's history;
//! - the slot is missing there (never synced, or still temporary at the promotion), was not synced
//!   from the old primary (`synced = false`: created on the standby or after the promotion), or
//!   is invalidated.
//!
//! A synced slot *ahead* of what this process confirmed is normal: another walship process
//! (the other half of an active-passive pair, another member of `[cluster]`) streamed the slot
//! and confirmed more before the promotion. The slot only moves behind acknowledged events.
//!
//! What was *published* is the measure, not what one process remembers: events can be in
//! Kafka that no process confirmed (in flight at a crash) or that a process that has since died
//! confirmed. Kafka holds them, each with its position and, after the first promotion, its
//! timeline ([`History::holds`] decides whether a record is in the server's history); the
//! session reads the topics back and stops before its first record when one is not. The
//! process's own memory ([`Streamed`]: the timeline and the highest position it confirmed) adds
//! one quick, certain case: a promotion that branched before what it confirmed itself.
//!
//! Invariant: a promotion that would make Kafka hold events the new primary does not have (or
//! skip events it has) is a definite error that explains what happened and what to do; nothing
//! here creates a slot to replace a missing one.

use pgoutput::Lsn;

use crate::catalog::failover::{MIN_MAJOR, SlotSync};
use crate::error::PgError;
use crate::replication::{ConnectParams, ReplicationStream};

/// What walship remembers about where it streamed, carried from one session to the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streamed {
    /// The timeline of the last session (0: none yet).
    pub timeline: u32,
    /// The highest position walship confirmed: everything before it reached Kafka.
    pub confirmed: Lsn,
}

/// One line of a timeline history file: `timeline` ended (and its child began) at `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineSwitch {
    /// The parent timeline.
    pub timeline: u32,
    /// Where it ended: the switch point.
    pub end: Lsn,
}

/// A server's timeline and the history that led to it: which positions of which timelines
/// its WAL contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The server's timeline.
    pub timeline: u32,
    /// Where each earlier timeline of its history ended (empty on timeline 1).
    pub switches: Vec<TimelineSwitch>,
}

impl History {
    /// The history of a server on timeline 1 (or of one whose history was not read).
    pub fn first() -> Self {
        History {
            timeline: 1,
            switches: Vec::new(),
        }
    }

    /// True when an event read on `timeline` with commit LSN `commit_lsn` is in this server's
    /// history: read on the server's own timeline, or on an ancestor before it ended. Anything
    /// else (a later timeline, a sibling, an ancestor's WAL past its switch point) was
    /// published from WAL this server does not have, and its position may name another event
    /// here.
    pub fn holds(&self, timeline: u32, commit_lsn: Lsn) -> bool {
        timeline == self.timeline
            || self
                .switches
                .iter()
                .any(|s| s.timeline == timeline && commit_lsn < s.end)
    }

    /// Where the server's own timeline began: the end of its parent (`None` on timeline 1).
    pub fn branch_point(&self) -> Option<Lsn> {
        self.switches
            .iter()
            .filter(|s| s.timeline < self.timeline)
            .max_by_key(|s| s.timeline)
            .map(|s| s.end)
    }
}

/// Parses a timeline history file (`TIMELINE_HISTORY` content): `1\t0/3000158\treason` lines.
pub fn parse_history(text: &str) -> Vec<TimelineSwitch> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let timeline = f.next()?.parse().ok()?;
            let end = f.next()?.parse().ok()?;
            Some(TimelineSwitch { timeline, end })
        })
        .collect()
}

/// Reads timeline `timeline`'s history from the server (`TIMELINE_HISTORY` on a replication
/// connection) and parses it.
pub async fn timeline_history(
    params: &ConnectParams,
    password: Option<&[u8]>,
    timeline: u32,
) -> Result<Vec<TimelineSwitch>, PgError> {
    let rows = ReplicationStream::command(
        params,
        password,
        "walship",
        &format!("TIMELINE_HISTORY {timeline}"),
    )
    .await?;
    let content = rows
        .first()
        .and_then(|r| r.get(1))
        .cloned()
        .flatten()
        .unwrap_or_default();
    // Sent as text; a server that sends the bytea's hex form is decoded too.
    let text = match content.strip_prefix("\\x") {
        Some(hex) => String::from_utf8_lossy(
            &(0..hex.len() / 2)
                .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect::<Vec<u8>>(),
        )
        .into_owned(),
        None => content,
    };
    Ok(parse_history(&text))
}

/// How a session's server relates to the one walship streamed from before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// Nothing to compare (first session) or the same timeline.
    Same,
    /// A promotion walship followed: everything this process confirmed is in the new
    /// primary's history (what others published is judged against Kafka by the session).
    Promoted {
        /// The timeline walship streamed from.
        from: u32,
        /// The promoted server's timeline.
        to: u32,
        /// Where `from` ended.
        switch: Lsn,
        /// The synced slot's position: streaming restarts here.
        slot_confirmed: Lsn,
        /// What this process had confirmed: events between the two are sent again (another
        /// process may have confirmed more: then the slot is ahead of it).
        confirmed: Lsn,
    },
}

/// What a session learned about its server, for [`verify_continuity`].
#[derive(Debug, Clone)]
pub struct SessionFacts<'a> {
    /// `host:port` of the server.
    pub server: &'a str,
    /// Its version.
    pub major: u32,
    /// Its timeline now.
    pub timeline: u32,
    /// Its timeline's history (empty on timeline 1).
    pub history: &'a [TimelineSwitch],
    /// walship's slot there.
    pub slot: Option<&'a SlotSync>,
    /// The slot's name.
    pub slot_name: &'a str,
}

/// The rule of this module's doc: whether walship may continue on the server of a new session
/// after streaming `before`. Errors are definite and explain what happened and what to do.
pub fn verify_continuity(before: Streamed, now: &SessionFacts<'_>) -> Result<Continuity, PgError> {
    let (from, to) = (before.timeline, now.timeline);
    if from == 0 || from == to {
        return Ok(Continuity::Same);
    }
    let server = now.server;
    let slot_name = now.slot_name;
    let confirmed = before.confirmed;
    let not_ours = |why: String| {
        PgError::Setup(format!(
            "walship streamed from timeline {from} (confirmed up to {confirmed}) and now reached \
             {server} on timeline {to}, which {why}: it is not the standby that took over from \
             walship's primary (an old primary started again, or a sibling standby), and \
             streaming from it would publish a history Kafka does not have. Point postgres.url \
             at the current primary; fence or rebuild the other server"
        ))
    };
    if to < from {
        return Err(not_ours("is older".into()));
    }
    let Some(switch) = now
        .history
        .iter()
        .find(|s| s.timeline == from)
        .map(|s| s.end)
    else {
        return Err(not_ours(format!("does not descend from timeline {from}")));
    };
    let Some(slot) = now.slot else {
        return Err(PgError::Setup(format!(
            "the primary failed over to {server} (timeline {to}, branched from {from} at \
             {switch}), but replication slot {slot_name:?} does not exist there: it was not \
             synchronized to that standby before the promotion (postgres.failover_slot = false, \
             sync_replication_slots off on the standby, or the slot never finished its first \
             sync). walship will not create a new slot, which would skip every event committed \
             since {confirmed}. Reconcile the outbox with Kafka from {confirmed} on, then create \
             the slot and start walship again; walship check lists the settings that make the \
             slot follow the next failover"
        )));
    };
    if switch < confirmed {
        return Err(PgError::Setup(format!(
            "the primary failed over to {server}, whose timeline {to} branched from timeline \
             {from} at {switch}, before the position {confirmed} walship had confirmed: the old \
             primary sent walship WAL this standby never received, so Kafka holds events (with \
             walship.position between {switch} and {confirmed}) that the new primary does not \
             have, and it may commit different ones at the same positions. Decide what those \
             events mean for their consumers, then start walship again (a new process has no \
             memory of the old position). synchronized_standby_slots on the primary prevents \
             this: walship then only receives WAL the standby has"
        )));
    }
    // Before 17 PostgreSQL has no `synced` column: a slot there was copied by a tool (Patroni's
    // permanent slots, pg_failover_slots) or made by hand, and what Kafka holds is the measure.
    if now.major >= MIN_MAJOR && slot.synced != Some(true) {
        return Err(PgError::Setup(format!(
            "the primary failed over to {server} (timeline {to}), but its replication slot \
             {slot_name:?} was not synchronized from the old primary (synced = false): it was \
             created there, and streaming from it could skip or repeat events. Reconcile the \
             outbox with Kafka from {confirmed} on, drop that slot, create a new one and start \
             walship again (it reads Kafka back first; set postgres.source_epoch if it says to)"
        )));
    }
    if let Some(why) = slot.invalidated() {
        return Err(PgError::Setup(format!(
            "the primary failed over to {server} (timeline {to}), but the synced replication \
             slot {slot_name:?} there is invalidated ({why}), so events after its position may \
             be gone. Reconcile the outbox with Kafka from {confirmed} on, drop the slot and \
             start walship again; keep hot_standby_feedback = on and primary_slot_name set on \
             the standbys"
        )));
    }
    // A slot ahead of `confirmed` was moved by another walship process that streamed it
    // behind the broker's acknowledgements: normal (see the module documentation).
    let slot_confirmed = slot.confirmed_flush_lsn.unwrap_or_default();
    Ok(Continuity::Promoted {
        from,
        to,
        switch,
        slot_confirmed,
        confirmed,
    })
}

#[cfg(test)]
mod tests;
