//! walship's PostgreSQL side: everything that talks to the database, nothing that knows Kafka.
//!
//! # Layout
//!
//! - [`replication`] — the streaming-replication connection and its frames.
//! - [`slot`] — the SQL connection: preflight checks, slot and publication setup, slot state.
//! - [`outbox`] — the relation cache and outbox-row extraction.
//! - [`preflight`] — read-only catalog queries for `walship check` and `walship status`.
//! - [`tls`] — TLS (`sslmode`, `sslrootcert`, client certificates) for both connections.
//! - [`error`] — errors split into transient (reconnect) and definite (stop and explain).

pub mod error;
pub mod outbox;
pub mod preflight;
pub mod replication;
pub mod slot;
pub mod tls;

pub use error::{PgError, ServerError};
pub use outbox::{OutboxRow, OutboxSpec, Relations, RowError, RowTarget};
pub use replication::{ConnectParams, Frame, ReplicationStream, SystemIdentity};
pub use slot::{SlotState, TableName};
pub use tls::{ConnectConfig, SslMode, TlsOptions};
