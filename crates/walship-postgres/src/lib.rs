//! walship's PostgreSQL side: everything that talks to the database, nothing that knows Kafka.
//!
//! # Layout
//!
//! - [`replication`] — the streaming-replication connection and its frames.
//! - [`slot`] — the SQL connection: preflight checks, slot and publication setup, slot state.
//! - [`catalog`] — which relations are the outbox (partitions, renames): one rule for all.
//! - [`outbox`] — the relation cache and outbox-row extraction.
//! - [`message`] — logical decoding messages as outbox events (JSON content → outbox row).
//! - [`preflight`] — read-only catalog queries for `walship check` and `walship status`.
//! - [`batching`] — read batching on the replication socket (`SO_RCVLOWAT`, pacing, window).
//! - [`tls`] — TLS (`sslmode`, `sslrootcert`, client certificates) for both connections.
//! - [`hosts`] — several hosts in one connection string: which to try, which to keep.
//! - [`failover`] — PostgreSQL 17+ failover slots: setup, what `check` verifies, and what makes
//!   a promoted server safe to continue from.
//! - [`error`] — errors split into transient (reconnect) and definite (stop and explain).

pub mod batching;
pub mod catalog;
pub mod error;
pub mod failover;
pub mod hosts;
pub mod message;
pub mod outbox;
pub mod preflight;
pub mod replication;
pub mod slot;
pub mod tls;

pub use batching::ReadBatching;
pub use catalog::{OutboxFamily, OutboxScope};
pub use error::{PgError, ServerError};
pub use message::{MessageError, MessageEvent};
pub use outbox::{OutboxRow, OutboxSpec, Placement, Relations, RowError, RowTarget};
pub use replication::{ConnectParams, Frame, ReplicationStream, SystemIdentity};
pub use slot::{SlotState, TableName};
pub use tls::{ConnectConfig, SslMode, TlsOptions};
