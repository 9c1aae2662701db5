//! Why a record was not applied, split by what to do about it: a transient error (the database
//! connection, a serialization failure) is retried by processing the same record again; a
//! definite one (a record the inbox cannot read, a foreign record it was told to refuse) needs
//! a person — the message says which record and what to change.

use rdkafka::Message;

/// The record an error is about: where it is in Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
}

impl RecordRef {
    /// Where `message` is.
    pub fn of<M: Message>(message: &M) -> RecordRef {
        RecordRef {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        }
    }
}

impl std::fmt::Display for RecordRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "topic {} partition {} offset {}",
            self.topic, self.partition, self.offset
        )
    }
}

/// Why the inbox could not decide about, or finish, a record. Nothing of the record was
/// applied unless the variant says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A walship header is present but cannot be read. Skipping it could apply a duplicate or
    /// skip an event, so the inbox stops on it.
    #[error(
        "{record}: header {header} is {value:?}, expected {expected}. walship writes it; a \
         producer that copies or rewrites headers must keep it intact. To go past this record \
         once you have dealt with it, commit the consumer group's offset {next} for this \
         partition (kafka-consumer-groups --reset-offsets --to-offset {next})",
        next = record.offset + 1
    )]
    MalformedHeader {
        /// The record.
        record: RecordRef,
        /// The header's name.
        header: &'static str,
        /// Its value, lossily as text.
        value: String,
        /// What it should look like.
        expected: &'static str,
    },
    /// One of `walship.source` and `walship.position` without the other.
    #[error(
        "{record}: header {present} is present but {missing} is not; walship writes both. A \
         producer that copies headers must copy both (or neither, for records that are not \
         walship's events)"
    )]
    IncompleteHeaders {
        /// The record.
        record: RecordRef,
        /// The header found.
        present: &'static str,
        /// The header missing.
        missing: &'static str,
    },
    /// A record without walship's headers, and the inbox was set to refuse those
    /// ([`crate::Unmarked::Reject`]) or to deduplicate them by an id it does not carry.
    #[error(
        "{record}: no walship.source/walship.position headers{id}, so the inbox cannot tell a \
         copy from a new event. If another producer writes to this topic, choose how its \
         records are handled: Unmarked::ById (deduplicated by an event id header) or \
         Unmarked::PassThrough (at-least-once)",
        id = match id_header { Some(h) => format!(" and no {h:?} header"), None => String::new() }
    )]
    Unmarked {
        /// The record.
        record: RecordRef,
        /// The id header the inbox looked for, when it deduplicates by id.
        id_header: Option<String>,
    },
    /// A database statement failed: the caller's transaction is rolled back (PostgreSQL
    /// aborted it) and the record was not applied.
    #[error("{record}: {during}: {source}{hint}", hint = db_hint(source))]
    Database {
        /// The record.
        record: RecordRef,
        /// What the inbox was doing.
        during: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Creating the inbox's tables failed.
    #[error("creating the inbox tables: {0}")]
    Setup(#[source] tokio_postgres::Error),
    /// The record was applied and its transaction committed, but its offset could not be
    /// stored for the next commit (typically: its partition was revoked by a rebalance). Safe
    /// to go on: the record is redelivered to whoever owns the partition and skipped there.
    #[error(
        "{record}: applied and committed, but storing its offset failed: {source}. Safe to go \
         on: a redelivery is skipped by the mark. If it repeats, the consumer must be created \
         with enable.auto.offset.store=false (walship_inbox::configure)"
    )]
    StoreOffset {
        /// The record.
        record: RecordRef,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

fn db_hint(e: &tokio_postgres::Error) -> &'static str {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNDEFINED_TABLE => {
            ". The inbox table does not exist: create it with Inbox::create_tables or the DDL \
             from Inbox::ddl (docs: The inbox)"
        }
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE => {
            ". Another transaction applied this partition concurrently (a rebalance); process \
             the record again"
        }
        _ => "",
    }
}

impl Error {
    /// True when processing the same record again may succeed (a lost connection, a
    /// serialization failure, a deadlock, an offset store during a rebalance); false when a
    /// person must change something first (the message says what).
    pub fn is_transient(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            Error::MalformedHeader { .. }
            | Error::IncompleteHeaders { .. }
            | Error::Unmarked { .. } => false,
            Error::Database { source, .. } | Error::Setup(source) => match source.code() {
                None => true,
                Some(c) => {
                    *c == SqlState::T_R_SERIALIZATION_FAILURE
                        || *c == SqlState::T_R_DEADLOCK_DETECTED
                        || *c == SqlState::ADMIN_SHUTDOWN
                        || *c == SqlState::CANNOT_CONNECT_NOW
                }
            },
            Error::StoreOffset { .. } => true,
        }
    }

    /// The record the error is about, when it is about one.
    pub fn record(&self) -> Option<&RecordRef> {
        match self {
            Error::MalformedHeader { record, .. }
            | Error::IncompleteHeaders { record, .. }
            | Error::Unmarked { record, .. }
            | Error::Database { record, .. }
            | Error::StoreOffset { record, .. } => Some(record),
            Error::Setup(_) => None,
        }
    }
}

/// Why [`crate::Inbox::process`] did not finish a record: the inbox's own reason, or the
/// handler's.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError<E> {
    /// The inbox's reason (see [`Error`]).
    #[error(transparent)]
    Inbox(#[from] Error),
    /// The handler failed: its effects and the mark were rolled back together, the offset was
    /// not stored. Stop consuming with this consumer (or seek the partition back to
    /// `record.offset`): storing a later record's offset would commit past this one.
    #[error("{record}: the handler failed: {source}")]
    Handler {
        /// The record.
        record: RecordRef,
        /// The handler's error.
        #[source]
        source: E,
    },
}
