//! Why a record was not applied, split by what to do about it: a transient error (the database
//! connection, a serialization failure) is retried by processing the same record again; a
//! definite one (a record the inbox cannot read, a foreign record it was told to refuse) needs
//! a person — the message says which record and what to change.

use std::borrow::Cow;

use rdkafka::Message;
use rdkafka::types::RDKafkaErrorCode;

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
        /// The header's name: walship's, or the configured event id header.
        header: Cow<'static, str>,
        /// Its value, lossily as text, cut after [`QUOTED_MAX`] bytes (`…` marks the cut).
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
    /// stored for the next commit. Not transient: processing the record again cannot help (it
    /// is a duplicate now, and storing fails alike). Either the partition is no longer this
    /// consumer's (a rebalance revoked it: go on, its new owner gets the record again and
    /// skips it), or the consumer stores offsets by itself (`enable.auto.offset.store` is not
    /// `false`: fix its configuration with [`crate::configure`] — until then a crash can lose
    /// records). The message says which.
    #[error(
        "{record}: applied and committed, but storing its offset failed: {source}. {advice}",
        advice = store_offset_advice(source)
    )]
    StoreOffset {
        /// The record.
        record: RecordRef,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

/// How many bytes of a header's value an error quotes.
pub const QUOTED_MAX: usize = 64;

/// A header's value as errors quote it: lossily as text, cut after [`QUOTED_MAX`] bytes.
pub(crate) fn quoted(value: &[u8]) -> String {
    if value.len() <= QUOTED_MAX {
        return String::from_utf8_lossy(value).into_owned();
    }
    let mut text = String::from_utf8_lossy(&value[..QUOTED_MAX]).into_owned();
    text.push('…');
    text
}

fn store_offset_advice(e: &rdkafka::error::KafkaError) -> &'static str {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::InvalidArgument) => {
            "The consumer stores offsets by itself (enable.auto.offset.store is not false), so \
             a crash can commit past records not yet applied: create it with \
             walship_inbox::configure(&mut config). Do not process further records with it"
        }
        Some(RDKafkaErrorCode::State | RDKafkaErrorCode::UnknownPartition) => {
            "The partition is not assigned to this consumer any more (a rebalance revoked it): \
             go on with the next record; its new owner gets this one again and skips it"
        }
        _ => "Processing the record again does not help (it is a duplicate now)",
    }
}

fn db_hint(e: &tokio_postgres::Error) -> &'static str {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c) if *c == SqlState::UNDEFINED_TABLE => {
            ". The inbox table does not exist: create it with Inbox::create_tables or the DDL \
             from Inbox::ddl (docs: The inbox)"
        }
        _ if e.is_closed() => {
            ". The connection is closed: connect again (and Inbox::prepare again on the new \
             connection, if prepared), then process the record again"
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
    /// serialization failure, a deadlock); false when it cannot: a person must change something
    /// first (the message says what), or the record is done ([`Error::StoreOffset`]: applied
    /// and committed, its offset not storable — retrying would repeat that forever).
    ///
    /// A lost connection is transient, but not on the same connection: when
    /// [`Error::is_connection_closed`], connect again (and [`crate::Inbox::prepare`] again on
    /// the new connection: prepared statements live in one session) before retrying.
    pub fn is_transient(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            Error::MalformedHeader { .. }
            | Error::IncompleteHeaders { .. }
            | Error::Unmarked { .. }
            | Error::StoreOffset { .. } => false,
            Error::Database { source, .. } | Error::Setup(source) => match source.code() {
                None => true,
                Some(c) => {
                    *c == SqlState::T_R_SERIALIZATION_FAILURE
                        || *c == SqlState::T_R_DEADLOCK_DETECTED
                        || *c == SqlState::ADMIN_SHUTDOWN
                        || *c == SqlState::CANNOT_CONNECT_NOW
                }
            },
        }
    }

    /// True when the database connection is closed: retry on a new connection (and prepare
    /// the inbox's statements again on it).
    pub fn is_connection_closed(&self) -> bool {
        match self {
            Error::Database { source, .. } | Error::Setup(source) => source.is_closed(),
            _ => false,
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
#[non_exhaustive]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_cut_after_64_bytes() {
        assert_eq!(quoted(b"16/B374D848"), "16/B374D848");
        let long = quoted(&[b'x'; 1000]);
        assert_eq!(long, format!("{}…", "x".repeat(QUOTED_MAX)));
        // A cut inside a character leaves a replacement character, never a panic.
        let cut = quoted("é".repeat(40).as_bytes());
        assert!(cut.ends_with('…') && cut.len() < 3 * QUOTED_MAX, "{cut}");
    }

    #[test]
    fn a_store_offset_error_is_never_retried_and_says_why() {
        let record = RecordRef {
            topic: "orders".into(),
            partition: 1,
            offset: 7,
        };
        let e = |code| Error::StoreOffset {
            record: record.clone(),
            source: rdkafka::error::KafkaError::StoreOffset(code),
        };
        let misconfigured = e(RDKafkaErrorCode::InvalidArgument);
        assert!(!misconfigured.is_transient());
        assert!(
            misconfigured
                .to_string()
                .contains("walship_inbox::configure"),
            "{misconfigured}"
        );
        let revoked = e(RDKafkaErrorCode::State);
        assert!(!revoked.is_transient());
        assert!(revoked.to_string().contains("revoked"), "{revoked}");
    }
}
