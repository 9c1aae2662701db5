//! Metrics and health: process-lifetime counters, the commit→ack histogram, and the HTTP
//! endpoints `/metrics` (Prometheus text format 0.0.4), `/healthz` (the process runs),
//! `/readyz` (every pipeline is healthy: active, standby or run elsewhere) and `/active` (this
//! process streams a pipeline's slot).
//!
//! Invariant: recording is a few relaxed atomic operations on the hot path, never a lock or an
//! allocation; all formatting happens when a scraper asks. The values survive reconnects: a new
//! session reuses the same [`Telemetry`]. Every per-pipeline sample carries a `pipeline` label;
//! the process's own metrics (`process_*`, `walship_build_info`: [`process`]) carry none.
//! "Is it healthy" (`/readyz`) and "is it the active one" (`/active`, `walship_role`) are
//! separate questions, as Patroni's `/health` and `/primary` are: a healthy standby is ready,
//! so a rolling update or a node drain is never held up by the process that waits to take over.
//!
//! ```text
//!  session, progress, run ──(relaxed atomics)──▶ Telemetry
//!                                                     │ read at scrape time
//!  scraper ──TCP──▶ accept loop ──▶ hyper HTTP/1 ──▶ TelemetryCollector ──▶ prometheus-client
//!                   (slot per connection)            (encodes the atomics)   text encoder
//! ```
//!
//! The endpoint must never cost the relay more than a bounded amount, whatever its clients do:
//! - at most [`Limits::max_connections`] connections are served at once; further ones wait in
//!   the kernel's listen backlog until a slot frees (they are not accepted, so they hold no
//!   task, buffer or descriptor of walship's);
//! - a client has [`Limits::header_read_timeout`] from connecting to finish sending its request
//!   head, however it trickles it, and the whole connection (request and response) is dropped
//!   after [`Limits::connection_timeout`]; there is no keep-alive, so no idle connection stays;
//! - an accept error that concerns one peer (reset, aborted) is skipped; any other (`EMFILE`,
//!   `ENFILE`, `ENOBUFS`, ...) would repeat at once, so the loop waits before the next accept,
//!   doubling the wait from 10 ms to 1 s while the errors last (`AcceptBackoff`): never a busy
//!   loop, and at most one warning per wait.
//!
//! HTTP parsing is hyper's, the exposition format prometheus-client's; this module only maps
//! paths to answers and the atomics to metric families.

mod encode;
pub mod http;
pub mod process;
pub mod state;

pub use http::{Limits, bind, serve, serve_pipelines, serve_with};
pub use state::{
    BROKER_SILENCE, Health, LATENCY_BUCKETS, Latency, Pipelines, Role, SLOT_WAL_STATUSES,
    STANDBY_SILENCE, Telemetry, process_start_ms, unix_ms,
};

#[cfg(test)]
mod tests;
