//! Errors of a walship run, split by meaning: transient (reconnect and resume) or definite
//! (stop, explain, exit non-zero).
//!
//! Owns the run's error type and its one classification ([`Error::is_transient`]), which every
//! retry loop asks. Invariant: a definite error's message names what was wrong, where, and how to
//! fix it; nothing is classified transient that a retry cannot cure.

use pgoutput::Lsn;
use walship_kafka::{DeliveryError, ErrorClass, RouteError, TopicError};
use walship_postgres::{MessageError, PgError, RowError};

use crate::config::ConfigError;

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// PostgreSQL side.
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// An outbox row cannot become a record. Nothing at or after `lsn` was confirmed.
    #[error(
        "outbox row at LSN {lsn} (transaction {xid}): {error}. Nothing from this row on has been \
             confirmed; fix the row's data or the configuration and restart walship, or set \
             outbox.on_bad_row = \"dead-letter\""
    )]
    Row {
        /// WAL position of the row.
        lsn: Lsn,
        /// Transaction id.
        xid: u32,
        /// What was wrong.
        error: RowError,
    },
    /// A logical message with a configured prefix cannot become a record. Nothing at or after
    /// `lsn` was confirmed.
    #[error(
        "outbox message at LSN {lsn} (prefix {prefix:?}{}): {error}. Nothing from this message on \
         has been confirmed; fix the message's content or the configuration and restart walship, \
         or set outbox.on_bad_row = \"dead-letter\"",
        xid.map(|x| format!(", transaction {x}")).unwrap_or_default()
    )]
    Message {
        /// WAL position of the message.
        lsn: Lsn,
        /// The message's prefix.
        prefix: String,
        /// Transaction id (none for a non-transactional message).
        xid: Option<u32>,
        /// What was wrong.
        error: MessageError,
    },
    /// A row's topic cannot be formed.
    #[error(
        "outbox row at LSN {lsn} (transaction {xid}): {error}. Nothing from this row on has been \
         confirmed; {}, or set outbox.on_bad_row = \"dead-letter\"", error.fix()
    )]
    Route {
        /// WAL position of the row.
        lsn: Lsn,
        /// Transaction id.
        xid: u32,
        /// What was wrong.
        error: RouteError,
    },
    /// A row's record cannot take the configured format (a CloudEvents attribute would be empty).
    #[error(
        "outbox row at LSN {lsn} (transaction {xid}): {error}. Nothing from this row on has been \
         confirmed; fix the row, or outbox.cloudevents_{}, or set outbox.on_bad_row = \"dead-letter\"",
        error.attribute
    )]
    Shape {
        /// WAL position of the row.
        lsn: Lsn,
        /// Transaction id.
        xid: u32,
        /// What was wrong.
        error: walship_kafka::record::ShapeError,
    },
    /// A row's partition column does not hold a partition number.
    #[error(
        "outbox row at LSN {lsn} (transaction {xid}): column {column:?} (outbox.additional_placement \
         \"{column}:partition\") holds {value:?}, not a partition number (0 or more). Nothing from \
         this row on has been confirmed; fix the row, or set outbox.on_bad_row = \"dead-letter\""
    )]
    Placement {
        /// WAL position of the row.
        lsn: Lsn,
        /// Transaction id.
        xid: u32,
        /// The partition column.
        column: String,
        /// Its value (lossy UTF-8, cut to 64 bytes), or NULL.
        value: String,
    },
    /// The producer can never accept a row's record (too large, invalid).
    #[error(
        "outbox row at LSN {lsn} (transaction {xid}) cannot be published to topic {topic:?}: {error}. \
             Nothing from this row on has been confirmed; shrink the row, raise the broker's and \
             librdkafka's message.max.bytes, or set outbox.on_bad_row = \"dead-letter\""
    )]
    Record {
        /// WAL position of the row.
        lsn: Lsn,
        /// Transaction id.
        xid: u32,
        /// Destination topic.
        topic: String,
        /// The producer's error.
        error: String,
    },
    /// The dead-letter topic refused a dead letter, even cut to its key, headers and reason.
    /// Nothing at or after `lsn` was confirmed.
    #[error(
        "outbox row at LSN {lsn} (transaction {xid}) could not be dead-lettered: topic {topic:?} \
         refused its dead letter even without a value ({error}). Nothing from this row on has \
         been confirmed; fix the dead-letter topic (its max.message.bytes and \
         message.timestamp settings, walship's permission to write it) or point \
         outbox.dead_letter_topic at another, then restart walship"
    )]
    DeadLetterRefused {
        /// WAL position of the row.
        lsn: Lsn,
        /// Transaction id.
        xid: u32,
        /// The dead-letter topic.
        topic: String,
        /// The producer's or broker's error.
        error: String,
    },
    /// Kafka holds records of this source that the server's history does not contain: a
    /// promotion branched before what was published (or an old primary, or a sibling, is
    /// streamed from). Continuing would let new events take their positions.
    #[error(
        "Kafka holds events of source {walship_source:?} that {server} does not have: topic \
         {topic:?} has {records} record(s) read on timeline {record_timeline}, walship.position \
         {first} to {last}, {}, on timeline {timeline}{}. The server's history branched before \
         them (a promotion without synchronized_standby_slots, or an old primary or a sibling \
         standby started again), so its new events would take the same positions. {}Decide \
         what those events mean for their consumers (this server does not have them: write \
         again those that must happen); then either point postgres.url at the server that has \
         them, or set postgres.source_epoch = {next_epoch} to publish from this server as a new \
         source ({walship_source:?} followed by \"/{next_epoch}\"), so that no position names \
         two events",
        match ended {
            Some(end) => format!("past where timeline {record_timeline} ended ({end}) in the history of {server}"),
            None => format!("a timeline that is not in the history of {server}"),
        },
        branch.map(|b| format!(", which began at {b}")).unwrap_or_default(),
        if *published_before == 0 {
            "Nothing was published or confirmed from this server. ".to_owned()
        } else {
            format!(
                "This session published {published_before} event(s) from this server before it \
                 read that topic, and nothing after. "
            )
        }
    )]
    Fork {
        /// The `walship.source` header value.
        walship_source: String,
        /// `host:port` of the server.
        server: String,
        /// Its timeline.
        timeline: u32,
        /// Where its timeline began, if it is not the first.
        branch: Option<Lsn>,
        /// The topic holding the records.
        topic: String,
        /// Records of this source read there that name `record_timeline`.
        records: u64,
        /// The lowest and highest of their positions.
        first: walship_kafka::Position,
        /// See `first`.
        last: walship_kafka::Position,
        /// The timeline they name.
        record_timeline: u32,
        /// Where that timeline ended in the server's history (`None`: not in it).
        ended: Option<Lsn>,
        /// Events this session had published before it found them.
        published_before: u64,
        /// The `postgres.source_epoch` to set to continue as a new source.
        next_epoch: u32,
    },
    /// What Kafka holds of this source could not be read to check a promotion.
    #[error(
        "cannot check what Kafka holds of this source against the promoted server: {what}: \
         {error}. {}",
        if *denied {
            "Grant walship's Kafka principal Describe and Read on the topics outbox.topic routes \
             to and on the dead-letter topic (or set run.resume_dedup = false: walship then \
             reads none of its topics, and a promotion is not checked against them), then \
             restart walship"
        } else {
            "Retrying"
        }
    )]
    PublishedUnread {
        /// What walship tried.
        what: String,
        /// The client's or broker's error.
        error: String,
        /// The broker refused for lack of permission (definite); otherwise retried.
        denied: bool,
    },
    /// A topic problem.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The broker gave up on a record.
    #[error("{0}; the slot was not confirmed past it")]
    Delivery(DeliveryError),
    /// The producer could not be created or refused a record outright.
    #[error("Kafka producer: {0}")]
    Producer(String),
    /// Pipelines of a multi-pipeline process stopped with definite errors (each named).
    #[error("pipelines stopped with errors: {0}")]
    Pipelines(String),
    /// Joining `[cluster]`'s consumer group failed.
    #[error("cluster: {0}")]
    Group(#[from] walship_kafka::group::GroupError),
    /// The session did not report status to PostgreSQL for longer than it may: the process
    /// was frozen (stopped, or starved of CPU), and the walsender may have ended the stream and
    /// another process may stream the slot now. Nothing more of what it read is published.
    #[error(
        "this process did not report to PostgreSQL for {} ms, past {} ms (three quarters of the \
         server's wal_sender_timeout): it was frozen or starved of CPU, and another process may \
         stream the slot now. Nothing more of what it had read is published; reconnecting",
        silent.as_millis(),
        limit.as_millis()
    )]
    Silenced {
        /// How long it was silent.
        silent: std::time::Duration,
        /// The limit.
        limit: std::time::Duration,
    },
    /// Another consumer streams the slot (another walship of an active-passive pair, or a
    /// leftover walsender): this process waits as a standby.
    #[error(
        "replication slot {slot:?} is streamed by another consumer (walsender PID {pid}); \
         waiting as a standby until it is released"
    )]
    SlotInUse {
        /// The slot.
        slot: String,
        /// PID of the walsender holding it (0 when PostgreSQL did not say).
        pid: i32,
    },
}

impl Error {
    /// True for problems of one row's data (the bad-row policy applies), not of the system.
    pub fn is_bad_row(&self) -> bool {
        matches!(
            self,
            Error::Row { .. }
                | Error::Message { .. }
                | Error::Route { .. }
                | Error::Shape { .. }
                | Error::Placement { .. }
                | Error::Record { .. }
        )
    }

    /// True when reconnecting and resuming from the slot can succeed without a change.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Postgres(e) => e.is_transient(),
            Error::Topic(e) => e.is_transient(),
            Error::Delivery(e) => e.class() == ErrorClass::Transient,
            Error::Group(e) => e.is_transient(),
            Error::Config(_)
            | Error::Row { .. }
            | Error::Message { .. }
            | Error::Route { .. }
            | Error::Shape { .. }
            | Error::Placement { .. }
            | Error::Record { .. }
            | Error::DeadLetterRefused { .. }
            | Error::Fork { .. }
            | Error::Producer(_)
            | Error::Pipelines(_) => false,
            Error::PublishedUnread { denied, .. } => !denied,
            Error::SlotInUse { .. } | Error::Silenced { .. } => true,
        }
    }

    /// PID of the walsender holding the slot when the session could not start because another
    /// consumer streams it (0 when PostgreSQL did not name it).
    pub fn slot_holder(&self) -> Option<i32> {
        match self {
            Error::SlotInUse { pid, .. } => Some(*pid),
            // START_REPLICATION lost a race for the slot: object_in_use, "replication slot
            // \"x\" is active for PID 1234".
            Error::Postgres(PgError::Server { error, .. }) if error.code == "55006" => Some(
                error
                    .message
                    .rsplit(' ')
                    .next()
                    .and_then(|pid| pid.parse().ok())
                    .unwrap_or(0),
            ),
            _ => None,
        }
    }
}
