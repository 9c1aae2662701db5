//! The consumer's half of walship's contract: apply each event exactly once.
//!
//! walship delivers at least once: a record can arrive twice (a resume after a crash, a frozen
//! old owner's late batch, the consumer's own redelivery after it crashed before committing
//! its offset). Every walship record carries `walship.source` and `walship.position`, and the
//! positions of one source only grow in commit order. So a consumer that keeps, per topic,
//! partition and source, the highest position it applied — in the same database transaction as
//! the effects — recognises every copy: a record at or below the mark changes nothing.
//!
//! ```text
//!  Kafka record ──▶ identify (headers) ──▶ BEGIN ─▶ advance mark ──above──▶ handler ─▶ COMMIT ─▶ store offset
//!                                                       │                                         ▲
//!                                                       └─at or below: a copy─▶ ROLLBACK ─────────┘
//! ```
//!
//! Invariant: the mark and the handler's effects commit together or not at all, and the Kafka
//! offset is stored only after that commit. A crash between the commit and the offset commit
//! redelivers records whose marks are already there: they are skipped.
//!
//! Precondition: within a partition, walship writes the first copies of events in position
//! order, across keys. walship enforces its part (it refuses `message.timeout.ms` /
//! `delivery.timeout.ms` other than 0 and `partitioner = "random"`); two parts it cannot:
//! every process owning the pipeline must use the same partitioner, and no partitions may be
//! added to a topic while copies of earlier events can still be written (a copy can then land
//! in another partition and be applied twice). docs/src/inbox.md says more.
//!
//! # Layout
//!
//! - [`Inbox`] — the configuration, the tables' DDL, [`Inbox::admit`] (the decision, in the
//!   caller's transaction) and [`Inbox::process`] (one record end to end: transaction,
//!   decision, [`Handler`], commit, offset); [`Inbox::prepare`] gives a [`Prepared`] doing the
//!   same with its statements prepared once on a connection.
//! - [`identify`] — what a record's headers say it is ([`Identity`]).
//! - [`Error`] / [`ProcessError`] — what went wrong, naming topic, partition, offset and header,
//!   and what to do; [`Error::is_transient`] says whether retrying can help.
//!
//! ```no_run
//! use rdkafka::consumer::{Consumer, StreamConsumer};
//! use rdkafka::{ClientConfig, Message};
//! use tokio_postgres::Transaction;
//! use walship_inbox::{Handler, Inbox};
//!
//! struct ApplyOrders;
//!
//! impl Handler for ApplyOrders {
//!     type Error = tokio_postgres::Error;
//!     async fn handle<M: Message + Sync>(
//!         &mut self,
//!         tx: &Transaction<'_>,
//!         record: &M,
//!     ) -> Result<(), tokio_postgres::Error> {
//!         let payload = std::str::from_utf8(record.payload().unwrap_or_default()).unwrap_or("");
//!         tx.execute("INSERT INTO orders_seen (event) VALUES ($1::text::jsonb)", &[&payload])
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run(mut client: tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = ClientConfig::new();
//! config.set("bootstrap.servers", "localhost:9092").set("group.id", "orders-projection");
//! walship_inbox::configure(&mut config); // offsets are stored by the inbox, after the commit
//! let consumer: StreamConsumer = config.create()?;
//! consumer.subscribe(&["outbox.event.order"])?;
//! let inbox = Inbox::new();
//! inbox.create_tables(&client).await?;
//! let mut handler = ApplyOrders;
//! loop {
//!     let message = consumer.recv().await?;
//!     // An error stops the loop: the record is redelivered after a restart.
//!     inbox.process(&mut client, &consumer, &message, &mut handler).await?;
//! }
//! # }
//! ```

use std::future::Future;

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};
use tokio_postgres::types::{PgLsn, ToSql, Type};
use tokio_postgres::{Client, GenericClient, Statement, Transaction};

mod error;
mod identity;
mod table;

pub use error::{Error, ProcessError, RecordRef};
pub use identity::{Identity, identify};
pub use walship_kafka::{ID_HEADER, POSITION_HEADER, Position, SOURCE_HEADER};

/// What the inbox does with a record that has no walship headers (another producer writes to
/// the topic). Each choice keeps a different guarantee; docs/src/inbox.md has the table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Unmarked {
    /// Refuse it: [`Error::Unmarked`] names the record. The default: on a topic only walship
    /// writes, such a record means something is misconfigured.
    #[default]
    Reject,
    /// Deduplicate by the event id in this header (exactly once per topic and id, for as long
    /// as the ids table keeps the id; no order protection). A record without the header is
    /// refused ([`Error::Unmarked`]).
    ById {
        /// Header name: `id` for Debezium's outbox router and walship.
        header: String,
    },
    /// Apply it every time it is delivered: at least once.
    PassThrough,
}

/// The inbox's decision about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// New: apply it in this transaction (the mark, or the id, is already recorded in it).
    Apply,
    /// A copy of something already applied: change nothing, and acknowledge it.
    Duplicate,
}

/// The consumer's work for one record, run inside the inbox's transaction. Its effects commit
/// with the mark, or roll back with it on error.
pub trait Handler: Send {
    /// The handler's error; it rolls the record back.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Applies `record` within `tx`. Must not commit or roll back `tx` (it cannot: it is
    /// borrowed) and should touch only this database: effects elsewhere are not covered by
    /// the mark.
    fn handle<M: Message + Sync>(
        &mut self,
        tx: &Transaction<'_>,
        record: &M,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Sets what the inbox needs of a consumer: offsets stored by the inbox, after the database
/// commit (`enable.auto.offset.store=false`), and committed in the background
/// (`enable.auto.commit=true`). With librdkafka's default (offsets stored when a record is
/// returned), a crash after the auto-commit and before the database commit would lose the
/// record; a consumer created without these settings gets [`Error::StoreOffset`] on its first
/// record (after that record's commit), and must not go on.
pub fn configure(config: &mut ClientConfig) -> &mut ClientConfig {
    config
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
}

/// The inbox: where its tables are and how records without walship headers are treated.
/// Cheap to clone; build one at start-up and share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbox {
    marks: String,
    ids: String,
    ids_index: String,
    unmarked: Unmarked,
    advance_sql: String,
    remember_sql: String,
}

impl Default for Inbox {
    fn default() -> Inbox {
        Inbox::new()
    }
}

impl Inbox {
    /// Marks in `public.walship_inbox`, ids in `public.walship_inbox_ids`; records without
    /// walship headers are refused.
    pub fn new() -> Inbox {
        Inbox::with_tables(Some("public"), "walship_inbox", Unmarked::Reject)
    }

    /// The marks table `schema.table` (ids in `table_ids`; `schema` `None` leaves it to the
    /// `search_path`). Consumers that apply the same topics to one database for different
    /// purposes (two consumer groups) need a table each; the instances of one group share one.
    #[must_use]
    pub fn with_table(self, schema: Option<&str>, table: &str) -> Inbox {
        Inbox::with_tables(schema, table, self.unmarked)
    }

    /// How records without walship headers are treated.
    #[must_use]
    pub fn with_unmarked(mut self, unmarked: Unmarked) -> Inbox {
        self.unmarked = unmarked;
        self
    }

    fn with_tables(schema: Option<&str>, table: &str, unmarked: Unmarked) -> Inbox {
        let marks = table::qualified(schema, table);
        let ids = table::qualified(schema, &format!("{table}_ids"));
        let ids_index = table::qualified(None, &format!("{table}_ids_received_at"));
        Inbox {
            advance_sql: table::advance(&marks),
            remember_sql: table::remember(&ids),
            marks,
            ids,
            ids_index,
            unmarked,
        }
    }

    /// `CREATE TABLE IF NOT EXISTS` for the marks and ids tables, for migrations of one's own.
    pub fn ddl(&self) -> String {
        table::ddl(&self.marks, &self.ids, &self.ids_index)
    }

    /// Creates the tables if they do not exist ([`Inbox::ddl`]).
    pub async fn create_tables(&self, client: &impl GenericClient) -> Result<(), Error> {
        client
            .batch_execute(&self.ddl())
            .await
            .map_err(Error::Setup)
    }

    /// Decides about `record` within the caller's transaction `tx`: [`Admission::Apply`] has
    /// already advanced the mark (or recorded the id) in `tx`, so the caller applies the record
    /// in `tx` and commits; [`Admission::Duplicate`] changed nothing. One statement, and none
    /// for [`Unmarked::PassThrough`].
    ///
    /// Never begins, commits or rolls back: the caller commits the transaction and only then
    /// stores the record's offset. `tx` is a transaction, not any client: on a bare connection
    /// (autocommit) the mark would commit by itself, before the effects. At READ COMMITTED
    /// (PostgreSQL's default)
    /// a concurrent holder of the same record waits on the mark's row and sees the
    /// first one's mark; at REPEATABLE READ or SERIALIZABLE it gets a serialization failure
    /// (transient: process the record again).
    pub async fn admit<M: Message>(
        &self,
        tx: &Transaction<'_>,
        record: &M,
    ) -> Result<Admission, Error> {
        self.admit_with(tx, record, None).await
    }

    /// [`Inbox::admit`] with the statements prepared on `tx`'s connection, or one-shot ones.
    async fn admit_with<M: Message>(
        &self,
        tx: &Transaction<'_>,
        record: &M,
        prepared: Option<&Statements>,
    ) -> Result<Admission, Error> {
        let database = |during: &'static str| {
            move |source| Error::Database {
                record: RecordRef::of(record),
                during,
                source,
            }
        };
        let id_header = match &self.unmarked {
            Unmarked::ById { header } => Some(header.as_str()),
            // No id header is looked for: every foreign record is handled alike.
            Unmarked::Reject | Unmarked::PassThrough => None,
        };
        let row = match identify(record, id_header)? {
            Identity::Walship {
                source, position, ..
            } => {
                // The parsed position, not the header's text: what the mark compares is what
                // `identify` read.
                let params: [&(dyn ToSql + Sync); 6] = [
                    &record.topic(),
                    &record.partition(),
                    &source,
                    &PgLsn::from(position.commit_lsn),
                    &i64::from(position.index),
                    &record.offset(),
                ];
                match prepared {
                    Some(p) => tx.query_opt(&p.advance, &params).await,
                    None => {
                        tx.query_typed_opt(&self.advance_sql, &typed(&params, &ADVANCE_TYPES))
                            .await
                    }
                }
                .map_err(database("advancing the inbox mark"))?
            }
            Identity::Id(id) => {
                let params: [&(dyn ToSql + Sync); 4] =
                    [&record.topic(), &id, &record.partition(), &record.offset()];
                match prepared {
                    Some(p) => tx.query_opt(&p.remember, &params).await,
                    None => {
                        tx.query_typed_opt(&self.remember_sql, &typed(&params, &REMEMBER_TYPES))
                            .await
                    }
                }
                .map_err(database("recording the event id"))?
            }
            Identity::Unidentified => {
                return match &self.unmarked {
                    Unmarked::PassThrough => Ok(Admission::Apply),
                    Unmarked::Reject => Err(Error::Unmarked {
                        record: RecordRef::of(record),
                        id_header: None,
                    }),
                    Unmarked::ById { header } => Err(Error::Unmarked {
                        record: RecordRef::of(record),
                        id_header: Some(header.clone()),
                    }),
                };
            }
        };
        Ok(if row.is_some() {
            Admission::Apply
        } else {
            Admission::Duplicate
        })
    }

    /// One record end to end: begins a transaction on `client`, decides ([`Inbox::admit`]),
    /// runs `handler` for a new record, commits, then stores the record's offset in
    /// `consumer` for its next commit (see [`configure`]). Records must be processed in the
    /// order they are received, one at a time per partition.
    ///
    /// On error nothing of the record is committed (except [`Error::StoreOffset`], which says
    /// so) and its offset is not stored: stop consuming with this consumer (drop it, or seek
    /// the partition back to the record) — storing a later record's offset would commit past
    /// this one.
    pub async fn process<C, X, M, H>(
        &self,
        client: &mut Client,
        consumer: &C,
        record: &M,
        handler: &mut H,
    ) -> Result<Admission, ProcessError<H::Error>>
    where
        C: Consumer<X>,
        X: ConsumerContext,
        M: Message + Sync,
        H: Handler,
    {
        self.process_with(client, consumer, record, handler, None)
            .await
    }

    /// Prepares the inbox's statements on `client`'s connection, once: [`Prepared::process`]
    /// and [`Prepared::admit`] then skip parsing and planning them for every record (half the
    /// inbox's cost per event in the bench). Use the result with this connection only (a
    /// prepared statement lives in one PostgreSQL session), and not through a pooler in
    /// transaction mode that does not carry prepared statements.
    pub async fn prepare(&self, client: &Client) -> Result<Prepared, Error> {
        let statements = Statements {
            advance: client
                .prepare_typed(&self.advance_sql, &ADVANCE_TYPES)
                .await
                .map_err(Error::Setup)?,
            remember: client
                .prepare_typed(&self.remember_sql, &REMEMBER_TYPES)
                .await
                .map_err(Error::Setup)?,
        };
        Ok(Prepared {
            inbox: self.clone(),
            statements,
        })
    }

    async fn process_with<C, X, M, H>(
        &self,
        client: &mut Client,
        consumer: &C,
        record: &M,
        handler: &mut H,
        prepared: Option<&Statements>,
    ) -> Result<Admission, ProcessError<H::Error>>
    where
        C: Consumer<X>,
        X: ConsumerContext,
        M: Message + Sync,
        H: Handler,
    {
        let database = |during: &'static str| {
            move |source| Error::Database {
                record: RecordRef::of(record),
                during,
                source,
            }
        };
        let tx = client
            .transaction()
            .await
            .map_err(database("beginning the transaction"))?;
        let admission = self.admit_with(&tx, record, prepared).await?;
        match admission {
            Admission::Apply => {
                if let Err(source) = handler.handle(&tx, record).await {
                    // Dropping the transaction rolls it back; say so to the server now.
                    let _ = tx.rollback().await;
                    return Err(ProcessError::Handler {
                        record: RecordRef::of(record),
                        source,
                    });
                }
                tx.commit()
                    .await
                    .map_err(database("committing the transaction"))?;
            }
            Admission::Duplicate => tx
                .rollback()
                .await
                .map_err(database("ending the transaction of a duplicate"))?,
        }
        store_offset(consumer, record)?;
        Ok(admission)
    }
}

/// Stores the offset after `record` for the consumer's next commit. `rd_kafka_offsets_store`
/// (unlike `rd_kafka_offset_store`) refuses a consumer that stores offsets by itself, so one
/// created without [`configure`] fails on its first record instead of committing past records
/// not yet applied.
fn store_offset<C, X, M>(consumer: &C, record: &M) -> Result<(), Error>
where
    C: Consumer<X>,
    X: ConsumerContext,
    M: Message,
{
    let error = |source| Error::StoreOffset {
        record: RecordRef::of(record),
        source,
    };
    let mut list = TopicPartitionList::with_capacity(1);
    list.add_partition_offset(
        record.topic(),
        record.partition(),
        Offset::Offset(record.offset() + 1),
    )
    .map_err(error)?;
    consumer.store_offsets(&list).map_err(error)
}

/// The parameter types of the marks' statement: topic, partition, source, commit LSN (the
/// parsed position's, bound as a `pg_lsn`), index, offset.
const ADVANCE_TYPES: [Type; 6] = [
    Type::TEXT,
    Type::INT4,
    Type::TEXT,
    Type::PG_LSN,
    Type::INT8,
    Type::INT8,
];
/// The parameter types of the ids' statement: topic, id, partition, offset.
const REMEMBER_TYPES: [Type; 4] = [Type::TEXT, Type::TEXT, Type::INT4, Type::INT8];

fn typed<'a>(
    params: &[&'a (dyn ToSql + Sync)],
    types: &[Type],
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().copied().zip(types.iter().cloned()).collect()
}

/// The inbox's statements prepared on one connection.
#[derive(Debug, Clone)]
struct Statements {
    advance: Statement,
    remember: Statement,
}

/// An [`Inbox`] with its statements prepared on one connection ([`Inbox::prepare`]): the same
/// decisions, without parsing and planning a statement per record. Use it only with the
/// connection it was prepared on.
#[derive(Debug, Clone)]
pub struct Prepared {
    inbox: Inbox,
    statements: Statements,
}

impl Prepared {
    /// [`Inbox::admit`] with the prepared statements; `tx` must be a transaction of the
    /// connection they were prepared on.
    pub async fn admit<M: Message>(
        &self,
        tx: &Transaction<'_>,
        record: &M,
    ) -> Result<Admission, Error> {
        self.inbox
            .admit_with(tx, record, Some(&self.statements))
            .await
    }

    /// [`Inbox::process`] with the prepared statements; `client` must be the connection they
    /// were prepared on.
    pub async fn process<C, X, M, H>(
        &self,
        client: &mut Client,
        consumer: &C,
        record: &M,
        handler: &mut H,
    ) -> Result<Admission, ProcessError<H::Error>>
    where
        C: Consumer<X>,
        X: ConsumerContext,
        M: Message + Sync,
        H: Handler,
    {
        self.inbox
            .process_with(client, consumer, record, handler, Some(&self.statements))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_the_configured_name() {
        let inbox = Inbox::new()
            .with_unmarked(Unmarked::PassThrough)
            .with_table(Some("app"), "orders_inbox");
        assert_eq!(inbox.unmarked, Unmarked::PassThrough);
        let ddl = inbox.ddl();
        assert!(ddl.contains("CREATE TABLE IF NOT EXISTS \"app\".\"orders_inbox\" ("));
        assert!(ddl.contains("CREATE TABLE IF NOT EXISTS \"app\".\"orders_inbox_ids\" ("));
        assert!(ddl.contains(
            "CREATE INDEX IF NOT EXISTS \"orders_inbox_ids_received_at\" \
             ON \"app\".\"orders_inbox_ids\" (received_at);"
        ));
        assert!(
            inbox
                .advance_sql
                .starts_with("INSERT INTO \"app\".\"orders_inbox\" AS m")
        );
        assert!(
            inbox
                .remember_sql
                .starts_with("INSERT INTO \"app\".\"orders_inbox_ids\"")
        );
    }

    /// The book's DDL (docs/src/inbox.md) is the one `create_tables` runs, names unquoted.
    #[test]
    fn the_book_shows_the_ddl_the_crate_runs() {
        let book = include_str!("../../../docs/src/inbox.md");
        let ddl = Inbox::new()
            .with_table(None, "walship_inbox")
            .ddl()
            .replace('"', "");
        assert!(
            book.contains(&format!("```sql\n{ddl}```")),
            "docs/src/inbox.md's DDL differs from Inbox::ddl():\n{ddl}"
        );
    }

    #[test]
    fn configure_keeps_offsets_for_the_inbox_to_store() {
        let mut config = ClientConfig::new();
        configure(&mut config);
        assert_eq!(config.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(config.get("enable.auto.commit"), Some("true"));
    }

    /// A consumer on rdkafka's mock cluster (no broker needed), with `configure` or without.
    fn mock_consumer(configured: bool) -> rdkafka::consumer::BaseConsumer {
        let mut config = ClientConfig::new();
        config
            .set("test.mock.num.brokers", "1")
            .set("group.id", "inbox-unit")
            .set("log_level", "0");
        if configured {
            configure(&mut config);
        }
        config.create().expect("mock consumer")
    }

    fn a_record() -> rdkafka::message::OwnedMessage {
        rdkafka::message::OwnedMessage::new(
            None,
            None,
            "orders".into(),
            rdkafka::message::Timestamp::NotAvailable,
            0,
            41,
            None,
        )
    }

    /// A consumer created without `configure` stores offsets by itself: the inbox's store
    /// fails on the first record, loudly and for good, naming the fix.
    #[test]
    fn a_consumer_without_configure_fails_on_its_first_record() {
        let err = store_offset(&mock_consumer(false), &a_record()).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                &err,
                Error::StoreOffset { source, .. }
                    if source.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::InvalidArgument)
            ),
            "{text}"
        );
        assert!(text.contains("walship_inbox::configure"), "{text}");
        assert!(
            text.contains("topic orders partition 0 offset 41"),
            "{text}"
        );
        assert!(!err.is_transient());
    }

    /// A configured consumer that does not hold the partition (a rebalance revoked it): an
    /// error that ends a retry loop, saying to go on.
    #[test]
    fn a_store_for_a_partition_not_held_says_to_go_on() {
        let err = store_offset(&mock_consumer(true), &a_record()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::StoreOffset { .. }), "{text}");
        assert!(text.contains("revoked"), "{text}");
        assert!(!err.is_transient());
    }

    /// `process`'s future is `Send` (it can run in a spawned task).
    #[allow(dead_code)]
    fn process_futures_are_send<H: Handler>(
        inbox: &Inbox,
        client: &mut Client,
        consumer: &rdkafka::consumer::StreamConsumer,
        message: &rdkafka::message::BorrowedMessage<'_>,
        handler: &mut H,
    ) {
        fn send<T: Send>(_: T) {}
        send(inbox.process(client, consumer, message, handler));
        send(inbox.prepare(client));
    }

    #[allow(dead_code)]
    fn prepared_futures_are_send<H: Handler>(
        prepared: &Prepared,
        client: &mut Client,
        consumer: &rdkafka::consumer::StreamConsumer,
        message: &rdkafka::message::BorrowedMessage<'_>,
        handler: &mut H,
    ) {
        fn send<T: Send>(_: T) {}
        send(prepared.process(client, consumer, message, handler));
    }
}
