//! walship's Kafka side: everything that talks to the broker, nothing that knows PostgreSQL.
//!
//! # Layout
//!
//! - [`sink`] — producer configuration, sending, delivery reports, topic creation.
//! - [`route`] — the topic template and topic-name validation.
//! - [`probe`] — a one-shot metadata request for `walship check`.
//! - [`resume`] — the record headers that name each event, and reading them back after a crash.

pub mod probe;
pub mod resume;
pub mod route;
pub mod sink;

pub use resume::{
    Delivered, ID_HEADER, POSITION_HEADER, Position, PositionText, ResumeScanner, SOURCE_HEADER,
};
pub use route::{RouteError, TopicLimits, TopicRouter};
pub use sink::{
    DeliveryError, DeliveryListener, ErrorClass, Record, SendError, Sink, SinkSettings, TopicError,
};
