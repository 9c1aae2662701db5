//! Adding outbox events to the caller's PostgreSQL transaction, for walship to stream to Kafka.
//!
//! This crate owns the write side of the outbox: turning an [`OutboxEvent`] into one statement
//! (an `INSERT` into the outbox table, or a transactional `pg_logical_emit_message`) with the
//! table, column names and message prefix walship is configured with. Its invariant: it never
//! begins, commits or rolls back anything. [`Outbox::add`] runs one statement on the connection
//! or transaction it is given, so the event becomes visible, and is published by walship,
//! exactly when the caller's transaction commits, and never if it rolls back or is dropped.
//!
//! ```no_run
//! # #[cfg(feature = "tokio-postgres")]
//! # async fn example(client: &mut tokio_postgres::Client) -> Result<(), walship_outbox::Error> {
//! use walship_outbox::{Outbox, OutboxEvent};
//!
//! let outbox = Outbox::new(); // public.outbox, Debezium's column names, as rows
//! let tx = client.transaction().await?;
//! tx.execute("UPDATE orders SET status = 'paid' WHERE id = 42", &[]).await?;
//! let id = outbox
//!     .add(&tx, &OutboxEvent::new("order", "42", "OrderPaid", serde_json::json!({"id": 42})))
//!     .await?;
//! tx.commit().await?; // the caller commits; walship publishes the event with header id = `id`
//! # let _ = id;
//! # Ok(())
//! # }
//! ```
//!
//! Drivers are features: `tokio-postgres` (default) takes `&Transaction`, `&Client` or any
//! `&(impl GenericClient + Sync)`; `sqlx` takes `&mut PgConnection` or
//! `&mut Transaction<'_, Postgres>`. Every value is a bound parameter; table and column names
//! are quoted identifiers.

use std::future::Future;

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

/// One event: what walship turns into one Kafka record.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// The event id: the record's `id` header, for consumers' deduplication. [`OutboxEvent::new`]
    /// generates a random (v4) one.
    pub id: Uuid,
    /// Routes the topic (walship's `outbox.event.{aggregatetype}` template by default).
    pub aggregate_type: String,
    /// The record key: events of one aggregate keep their commit order in one partition.
    pub aggregate_id: String,
    /// The record's `type` header.
    pub event_type: String,
    /// The record value (its JSON text). `Value::Null` is a tombstone (a record without value)
    /// in both modes: a SQL NULL in a row, `null` in a message.
    pub payload: Value,
}

impl OutboxEvent {
    /// An event with a fresh random id.
    pub fn new(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: Value,
    ) -> OutboxEvent {
        OutboxEvent {
            id: Uuid::new_v4(),
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            payload,
        }
    }

    /// An event whose payload is `payload` serialised to JSON, with a fresh random id.
    pub fn serialized<T: Serialize + ?Sized>(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: &T,
    ) -> Result<OutboxEvent, Error> {
        let payload = serde_json::to_value(payload).map_err(Error::Payload)?;
        Ok(OutboxEvent::new(
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
        ))
    }

    /// A tombstone for the aggregate (a record without value: log compaction deletes its key).
    pub fn tombstone(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
    ) -> OutboxEvent {
        OutboxEvent::new(aggregate_type, aggregate_id, event_type, Value::Null)
    }

    /// The same event with the given id (e.g. one derived from a request id, for idempotence).
    #[must_use]
    pub fn with_id(mut self, id: Uuid) -> OutboxEvent {
        self.id = id;
        self
    }
}

/// How an event is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// A row inserted into the outbox table (walship publishes the insert).
    Row,
    /// A transactional logical decoding message with this prefix (no table row), which must be
    /// in walship's `outbox.message_prefixes`; needs PostgreSQL 14 or later.
    Message {
        /// The message prefix, e.g. `outbox`.
        prefix: String,
    },
}

/// The SQL type of the payload column (rows only): the JSON text is cast to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadType {
    /// `jsonb` (the SQL kit's table).
    #[default]
    Jsonb,
    /// `json`.
    Json,
    /// `text` (or `varchar`).
    Text,
    /// `bytea`: the JSON text's UTF-8 bytes.
    Bytea,
}

/// The column names, which are also a message's field names: walship's `outbox.*_column`
/// settings. Defaults are Debezium's, as in walship and the SQL kit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    /// Event id (`id`); empty: not written (walship's `id_column = ""`).
    pub id: String,
    /// Aggregate type (`aggregatetype`).
    pub aggregate_type: String,
    /// Aggregate id (`aggregateid`).
    pub aggregate_id: String,
    /// Event type (`type`); empty: not written (walship's `type_column = ""`).
    pub event_type: String,
    /// Payload (`payload`).
    pub payload: String,
}

impl Default for Columns {
    fn default() -> Columns {
        Columns {
            id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
        }
    }
}

/// Where and how events are written; [`Outbox::add`] writes one. Cheap to clone; build one at
/// start-up and share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbox {
    schema: Option<String>,
    table: String,
    columns: Columns,
    payload_type: PayloadType,
    mode: Mode,
}

impl Default for Outbox {
    fn default() -> Outbox {
        Outbox::new()
    }
}

impl Outbox {
    /// Rows in `public.outbox` with Debezium's column names and a `jsonb` payload: the SQL
    /// kit's table and walship's defaults.
    pub fn new() -> Outbox {
        Outbox {
            schema: Some("public".into()),
            table: "outbox".into(),
            columns: Columns::default(),
            payload_type: PayloadType::Jsonb,
            mode: Mode::Row,
        }
    }

    /// Logical messages with `prefix` instead of rows (see [`Mode::Message`]).
    pub fn messages(prefix: impl Into<String>) -> Outbox {
        Outbox::new().with_mode(Mode::Message {
            prefix: prefix.into(),
        })
    }

    /// The outbox table (walship's `outbox.table = "schema.table"`); `schema` `None` leaves it
    /// to the connection's `search_path`.
    #[must_use]
    pub fn with_table(mut self, schema: Option<&str>, table: &str) -> Outbox {
        self.schema = schema.map(str::to_owned);
        self.table = table.to_owned();
        self
    }

    /// The column (and message field) names.
    #[must_use]
    pub fn with_columns(mut self, columns: Columns) -> Outbox {
        self.columns = columns;
        self
    }

    /// The payload column's SQL type (rows only; `jsonb` by default).
    #[must_use]
    pub fn with_payload_type(mut self, payload_type: PayloadType) -> Outbox {
        self.payload_type = payload_type;
        self
    }

    /// Rows or messages.
    #[must_use]
    pub fn with_mode(mut self, mode: Mode) -> Outbox {
        self.mode = mode;
        self
    }

    /// The mode events are written in.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Adds `event` within the caller's transaction with one statement, and returns its id.
    ///
    /// Runs on what it is given and nothing else: it never begins, commits or rolls back. Given
    /// a transaction, the event is published if and only if the caller commits it; given a
    /// connection outside a transaction (`&Client`, `&mut PgConnection`), the statement commits
    /// by itself, like any statement there, so pass the transaction of the business change.
    pub async fn add<E: Executor>(&self, executor: E, event: &OutboxEvent) -> Result<Uuid, Error> {
        let statement = self.statement(event)?;
        let params: Vec<Option<&str>> = statement.params.iter().map(Option::as_deref).collect();
        executor.run(&statement.sql, &params).await?;
        Ok(event.id)
    }

    /// The SQL and its text parameters for `event`.
    fn statement(&self, event: &OutboxEvent) -> Result<Statement, Error> {
        match &self.mode {
            Mode::Row => Ok(self.row_statement(event)),
            Mode::Message { prefix } => self.message_statement(prefix, event),
        }
    }

    fn row_statement(&self, event: &OutboxEvent) -> Statement {
        let c = &self.columns;
        let payload = (!event.payload.is_null()).then(|| event.payload.to_string());
        // Every parameter is text, cast on the server: the same SQL for both drivers, and no
        // dependence on the driver's type mapping.
        let payload_cast = match self.payload_type {
            PayloadType::Jsonb => "::text::jsonb",
            PayloadType::Json => "::text::json",
            PayloadType::Text | PayloadType::Bytea => "::text",
        };
        let fields: [(&str, Option<String>, &str); 5] = [
            (&c.id, Some(event.id.to_string()), "::text::uuid"),
            (
                &c.aggregate_type,
                Some(event.aggregate_type.clone()),
                "::text",
            ),
            (&c.aggregate_id, Some(event.aggregate_id.clone()), "::text"),
            (&c.event_type, Some(event.event_type.clone()), "::text"),
            (&c.payload, payload, payload_cast),
        ];
        let mut names = Vec::new();
        let mut values = Vec::new();
        let mut params = Vec::new();
        for (i, (name, value, cast)) in fields.into_iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            params.push(value);
            let n = params.len();
            names.push(quote_ident(name));
            values.push(if i == 4 && self.payload_type == PayloadType::Bytea {
                format!("convert_to(${n}::text, 'UTF8')")
            } else {
                format!("${n}{cast}")
            });
        }
        let table = match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.table)),
            None => quote_ident(&self.table),
        };
        Statement {
            sql: format!(
                "INSERT INTO {table} ({}) VALUES ({})",
                names.join(", "),
                values.join(", ")
            ),
            params,
        }
    }

    fn message_statement(&self, prefix: &str, event: &OutboxEvent) -> Result<Statement, Error> {
        let c = &self.columns;
        let mut content = serde_json::Map::new();
        let fields = [
            (&c.id, Value::String(event.id.to_string())),
            (
                &c.aggregate_type,
                Value::String(event.aggregate_type.clone()),
            ),
            (&c.aggregate_id, Value::String(event.aggregate_id.clone())),
            (&c.event_type, Value::String(event.event_type.clone())),
            (&c.payload, event.payload.clone()),
        ];
        for (name, value) in fields {
            if !name.is_empty() {
                content.insert(name.clone(), value);
            }
        }
        let content = serde_json::to_string(&content).map_err(Error::Payload)?;
        Ok(Statement {
            // true: transactional, decoded at commit with the transaction's rows; walship
            // refuses non-transactional messages with an outbox prefix.
            sql: "SELECT pg_logical_emit_message(true, $1::text, $2::text)".into(),
            params: vec![Some(prefix.to_owned()), Some(content)],
        })
    }
}

/// One statement with text parameters (`None` = SQL NULL).
struct Statement {
    sql: String,
    params: Vec<Option<String>>,
}

/// `name` as a quoted SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Why an event was not added. The caller's transaction is unusable after a database error
/// (PostgreSQL aborts it): roll it back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The payload could not be serialised to JSON.
    #[error("outbox event payload: {0}")]
    Payload(#[source] serde_json::Error),
    /// tokio-postgres reported an error.
    #[cfg(feature = "tokio-postgres")]
    #[error("adding the outbox event: {0}")]
    TokioPostgres(#[from] tokio_postgres::Error),
    /// sqlx reported an error.
    #[cfg(feature = "sqlx")]
    #[error("adding the outbox event: {0}")]
    Sqlx(#[from] sqlx::Error),
}

mod sealed {
    pub trait Sealed {}
}

/// What [`Outbox::add`] runs its statement on: the caller's transaction or connection.
/// Implemented (with the `tokio-postgres` feature) for `&C` where `C` is a
/// `tokio_postgres::GenericClient` (`Transaction`, `Client`), and (with `sqlx`) for
/// `&mut sqlx::PgConnection` and `&mut sqlx::Transaction<'_, Postgres>`. Sealed.
pub trait Executor: sealed::Sealed + Send {
    /// Runs `sql` with text parameters (`None` = NULL).
    #[doc(hidden)]
    fn run(
        self,
        sql: &str,
        params: &[Option<&str>],
    ) -> impl Future<Output = Result<(), Error>> + Send;
}

#[cfg(feature = "tokio-postgres")]
mod tokio_postgres_impl {
    use tokio_postgres::GenericClient;
    use tokio_postgres::types::ToSql;

    use super::{Error, Executor, sealed};

    impl<C: GenericClient + Sync> sealed::Sealed for &C {}

    impl<C: GenericClient + Sync> Executor for &C {
        async fn run(self, sql: &str, params: &[Option<&str>]) -> Result<(), Error> {
            let params: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            self.execute(sql, &params).await?;
            Ok(())
        }
    }
}

#[cfg(feature = "sqlx")]
mod sqlx_impl {
    use sqlx::{PgConnection, Postgres, Transaction};

    use super::{Error, Executor, sealed};

    async fn run(conn: &mut PgConnection, sql: &str, params: &[Option<&str>]) -> Result<(), Error> {
        let mut query = sqlx::query(sql);
        for p in params {
            query = query.bind(*p);
        }
        query.execute(conn).await?;
        Ok(())
    }

    impl sealed::Sealed for &mut PgConnection {}

    impl Executor for &mut PgConnection {
        async fn run(self, sql: &str, params: &[Option<&str>]) -> Result<(), Error> {
            run(self, sql, params).await
        }
    }

    impl sealed::Sealed for &mut Transaction<'_, Postgres> {}

    impl Executor for &mut Transaction<'_, Postgres> {
        async fn run(self, sql: &str, params: &[Option<&str>]) -> Result<(), Error> {
            run(self, sql, params).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> OutboxEvent {
        OutboxEvent::new("order", "42", "OrderPaid", serde_json::json!({"a": "it's"}))
    }

    #[test]
    fn row_statement_quotes_names_and_binds_values() {
        let outbox = Outbox::new()
            .with_table(Some("app\"x"), "out box")
            .with_payload_type(PayloadType::Bytea);
        let e = event();
        let s = outbox.statement(&e).unwrap();
        assert_eq!(
            s.sql,
            "INSERT INTO \"app\"\"x\".\"out box\" (\"id\", \"aggregatetype\", \"aggregateid\", \
             \"type\", \"payload\") VALUES ($1::text::uuid, $2::text, $3::text, $4::text, \
             convert_to($5::text, 'UTF8'))"
        );
        assert_eq!(
            s.params,
            vec![
                Some(e.id.to_string()),
                Some("order".into()),
                Some("42".into()),
                Some("OrderPaid".into()),
                Some(r#"{"a":"it's"}"#.into()),
            ]
        );
    }

    #[test]
    fn empty_id_and_type_columns_are_left_out_and_null_is_a_tombstone() {
        let outbox = Outbox::new()
            .with_table(None, "outbox")
            .with_columns(Columns {
                id: String::new(),
                event_type: String::new(),
                ..Columns::default()
            });
        let s = outbox
            .statement(&OutboxEvent::tombstone("order", "42", "Deleted"))
            .unwrap();
        assert_eq!(
            s.sql,
            "INSERT INTO \"outbox\" (\"aggregatetype\", \"aggregateid\", \"payload\") \
             VALUES ($1::text, $2::text, $3::text::jsonb)"
        );
        assert_eq!(s.params[2], None);
    }

    #[test]
    fn message_content_uses_the_column_names() {
        let outbox = Outbox::messages("events").with_columns(Columns {
            aggregate_id: "key".into(),
            ..Columns::default()
        });
        let e = event();
        let s = outbox.statement(&e).unwrap();
        assert_eq!(
            s.sql,
            "SELECT pg_logical_emit_message(true, $1::text, $2::text)"
        );
        assert_eq!(s.params[0].as_deref(), Some("events"));
        let content: Value = serde_json::from_str(s.params[1].as_deref().unwrap()).unwrap();
        assert_eq!(
            content,
            serde_json::json!({
                "id": e.id.to_string(), "aggregatetype": "order", "key": "42",
                "type": "OrderPaid", "payload": {"a": "it's"},
            })
        );
    }

    /// `add`'s future is `Send` with every executor, so it can run in spawned tasks.
    #[allow(dead_code)]
    fn add_futures_are_send() {
        fn send<T: Send>(_: T) {}
        #[cfg(feature = "tokio-postgres")]
        {
            fn tokio_postgres(o: &Outbox, e: &OutboxEvent, tx: &tokio_postgres::Transaction<'_>) {
                send(o.add(tx, e));
            }
            fn generic(
                o: &Outbox,
                e: &OutboxEvent,
                c: &(impl tokio_postgres::GenericClient + Sync),
            ) {
                send(o.add(c, e));
            }
        }
        #[cfg(feature = "sqlx")]
        {
            fn sqlx(o: &Outbox, e: &OutboxEvent, tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) {
                send(o.add(tx, e));
            }
            fn conn(o: &Outbox, e: &OutboxEvent, c: &mut sqlx::PgConnection) {
                send(o.add(c, e));
            }
        }
    }

    #[test]
    fn serialized_payloads_and_ids() {
        #[derive(Serialize)]
        struct Paid {
            id: u32,
        }
        let id = Uuid::new_v4();
        let e = OutboxEvent::serialized("order", "42", "OrderPaid", &Paid { id: 42 })
            .unwrap()
            .with_id(id);
        assert_eq!(e.payload, serde_json::json!({"id": 42}));
        assert_eq!(e.id, id);
        assert_ne!(event().id, event().id, "fresh ids");
    }
}
