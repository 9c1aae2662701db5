//! walship's PostgreSQL side: everything that talks to the database, nothing that knows Kafka.
//!
//! # Layout
//!
//! - [`replication`] — the streaming-replication connection, its frames, and the options
//!   walship starts streaming with.
//! - [`management`] — the ordinary SQL connection (setup, watchdog, heartbeat, catalog lookups,
//!   `check`, `status`).
//! - [`catalog`] — what the catalog says and the rules on it, one for every caller: which
//!   relations are the outbox (partitions, renames), whether the publication sends them, whether
//!   the slot can be streamed from, the server's settings, what failover slots need read; the
//!   watchdog's check.
//! - [`setup`] — what start-up creates: the publication and the slot (with the slot history),
//!   as a failover slot when configured.
//! - [`outbox`] — the relation cache and outbox-row extraction.
//! - [`message`] — logical decoding messages as outbox events (JSON content → outbox row).
//! - [`batching`] — read batching on the replication socket (`SO_RCVLOWAT`, pacing, window).
//! - [`tls`] — TLS (`sslmode`, `sslrootcert`, client certificates) for both connections.
//! - [`ident`] — SQL names: schema-qualified table names and identifier quoting.
//! - [`hosts`] — several hosts in one connection string: which to try, which to keep.
//! - [`failover`] — PostgreSQL 17+ failover slots: what `check` verifies, and what makes a
//!   promoted server safe to continue from.
//! - [`error`] — errors split into transient (reconnect) and definite (stop and explain).
//!
//! Modules sit in layers, and a module imports only from layers below its own (the `mod.rs` of
//! a folder re-exports its files; the files never import from it):
//!
//! ```text
//!  6  message, failover
//!  5  setup, outbox
//!  4  management, catalog
//!  3  replication
//!  2  tls
//!  1  error, ident, hosts, batching
//! ```

pub mod batching;
pub mod catalog;
pub mod error;
pub mod failover;
pub mod hosts;
pub mod ident;
pub mod management;
pub mod message;
pub mod outbox;
pub mod replication;
pub mod setup;
pub mod tls;

pub use batching::ReadBatching;
pub use catalog::{OutboxFamily, OutboxScope, SlotState};
pub use error::{PgError, ServerError};
pub use ident::{TableName, quote_ident};
pub use message::{MessageError, MessageEvent};
pub use outbox::{OutboxRow, OutboxSpec, PayloadType, Placement, Relations, RowError, RowTarget};
pub use replication::{ConnectParams, Frame, ReplicationStream, StartOptions, SystemIdentity};
pub use tls::{ConnectConfig, SslMode, TlsOptions};
