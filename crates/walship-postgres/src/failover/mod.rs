//! PostgreSQL 17+ failover slots: creating walship's slot as one, what `walship check` verifies on
//! the primary and its standbys, and when a promoted standby is safe to continue from.
//!
//! ```text
//!  primary   synchronized_standby_slots = 'sb1'   logical walsender sends walship only WAL that
//!     │      physical slot sb1                    the standby behind sb1 has flushed
//!     │ WAL                                                           │
//!     ▼                                                               ▼
//!  standby   primary_slot_name = 'sb1', hot_standby_feedback = on, sync_replication_slots = on
//!     │      slotsync worker copies walship's slot (failover = true): synced = true, not temporary
//!     ▼ pg_ctl promote
//!  new primary: timeline N+1 branches from N at the switch point S; walship (several hosts with
//!  target_session_attrs=read-write, see crate::hosts) reconnects and streams from the synced slot
//! ```
//!
//! # Layout
//!
//! - [`findings`] — `walship check`'s findings on the primary and the standbys.
//! - [`continuity`] — the rule after a promotion: [`verify_continuity`], [`History`].
//! - The catalog reads (server, slots, settings) live in `crate::catalog::failover`, the slot
//!   DDL (creating the slot as a failover slot, `ALTER_REPLICATION_SLOT`) in `crate::setup`;
//!   both are re-exported here, so other crates find the whole of failover under one path.
//!
//! Invariant: nothing here creates a slot to replace a missing one (see `crate::setup`); a
//! promoted server walship cannot safely continue from is a definite error, never a new slot.

pub mod continuity;
pub mod findings;
#[cfg(test)]
mod fixtures;

pub use continuity::{
    Continuity, History, SessionFacts, Streamed, TimelineSwitch, parse_history, timeline_history,
    verify_continuity,
};
pub use findings::{
    Finding, Level, PrimaryFacts, StandbyFacts, primary_findings, standby_findings,
};

pub use crate::catalog::failover::{
    FailoverSettings, MIN_MAJOR, ServerInfo, SlotSync, physical_slots, server_info, settings, slot,
};
pub use crate::setup::{alter_slot_command, create_slot_sql, enable, require_support};
