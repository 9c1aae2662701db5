//! End-to-end tests against a real PostgreSQL server and a real Kafka-protocol broker.
//!
//! All integration tests compile into this one binary so the cluster and the broker start once
//! per run. See `harness` for how they are started and how to point the tests elsewhere.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod check;
mod cli;
mod cluster;
mod codecs;
mod cutoff;
mod deploy;
mod failover;
mod failover_slots;
mod faults;
mod handover;
mod harness;
mod inbox;
mod messages;
mod metrics;
mod monitoring;
mod ownership;
mod partitions;
mod pgoutput_golden;
mod pipelines;
mod privilege;
mod records;
mod relay;
mod reliability;
mod resume;
mod sql;
mod tls;
mod writer;
