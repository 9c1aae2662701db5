//! walship's Kafka side: everything that talks to the broker, nothing that knows PostgreSQL.
//!
//! # Layout
//!
//! - [`sink`] — producer configuration, sending, delivery reports, topic creation.
//! - [`route`] — the topic template and topic-name validation.
//! - [`probe`] — a one-shot metadata request for `walship check`.

pub mod probe;
pub mod route;
pub mod sink;

pub use route::{RouteError, TopicRouter};
pub use sink::{
    DeliveryError, DeliveryListener, ErrorClass, Record, SendError, Sink, SinkSettings, TopicError,
};
