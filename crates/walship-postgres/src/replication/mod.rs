//! The streaming-replication connection: startup, authentication, `START_REPLICATION`, and the
//! CopyBoth stream of `XLogData` and keepalive frames.
//!
//! ```text
//!  socket ──read (batched: ≥32 KiB or 1–2 ms)──▶ rbuf ──try_next (in place, zero-copy)──▶ Frame
//!  socket ◀──────────── standby status update (write/flush/apply = LSN we choose) ◀── caller
//! ```
//!
//! # Layout
//!
//! - `stream` — [`ReplicationStream`] at the byte level: socket, read and write buffers.
//! - `connect` — [`ConnectParams`], picking a host, TLS, startup and authentication,
//!   replication commands, `START_REPLICATION` with walship's [`StartOptions`].
//! - `frames` — [`Frame`]s cut from the read buffer.
//! - `status` — standby status updates and the clean end of a stream.
//!
//! Imports go one way: `connect`, `frames` and `status` build on `stream`, never on each other.
//!
//! Invariant: the server only ever hears the LSN the caller passes to [`ReplicationStream::
//! send_status`]; nothing here acknowledges on its own. Frames are parsed straight out of the read
//! buffer and handed to the caller on the same task, so there is no per-message hand-off between
//! tasks and one `read` syscall serves hundreds of messages during catch-up.

mod connect;
mod frames;
mod status;
mod stream;

pub use connect::{ConnectParams, StartOptions};
pub use frames::Frame;
pub use stream::{ReplicationStream, SystemIdentity, TextRows};
