//! walship's Kafka side: everything that talks to the broker, nothing that knows PostgreSQL.
//!
//! # Layout
//!
//! - [`sink`] — producer configuration, sending, delivery reports, topic creation.
//! - [`producer`] — the producers behind the sinks: shared by pipelines, driven by their reports.
//! - [`refusal`] — librdkafka's errors sorted by what to do: retry, dead-letter, or stop.
//! - [`route`] — the topic template and topic-name validation.
//! - [`headers`] — the record header format: source, position and id of each event.
//! - [`record`] — the shape of every record walship writes: an event's and a dead letter's.
//! - [`group`] — membership in the consumer group that divides pipelines among processes.
//! - [`probe`] — a one-shot metadata request for `walship check`.
//! - [`resume`] — reading the position headers back from topic tails after a crash.

pub mod group;
pub mod headers;
pub mod probe;
pub mod producer;
pub mod record;
pub mod refusal;
pub mod resume;
pub mod route;
pub mod sink;

pub use headers::{
    ID_HEADER, POSITION_HEADER, Position, PositionText, SOURCE_HEADER, TIMELINE_HEADER,
};
pub use producer::Producers;
pub use record::Record;
pub use refusal::{ErrorClass, ReadBackError, Refusal};
pub use resume::{Delivered, ResumeScanner, TimelineSpan};
pub use route::{RouteError, TopicLimits, TopicRouter};
pub use sink::{DeliveryError, DeliveryListener, SendError, Sink, SinkSettings, TopicError};
