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
    /// generates a random (v4) one; [`OutboxEvent::with_v7_id`] a time-ordered one.
    pub id: Uuid,
    /// Routes the topic (walship's `outbox.event.{aggregatetype}` template by default).
    pub aggregate_type: String,
    /// The record key: events of one aggregate keep their commit order in one partition.
    pub aggregate_id: String,
    /// The record's `type` header.
    pub event_type: String,
    /// The record value. JSON `null` is a tombstone (a record without value) in both modes: a
    /// SQL NULL in a row, `null` in a message.
    pub payload: Payload,
    /// Further columns (row) or fields (message) with their text, which walship copies to
    /// headers of the same name when they are in its `outbox.header_columns`; `None` = NULL.
    pub headers: Vec<(String, Option<String>)>,
    /// The W3C trace context of the caller's span, for walship's `outbox.traceparent_column`
    /// and `outbox.tracestate_column`: consumers continue the caller's trace.
    pub trace: Option<TraceContext>,
}

#[cfg(feature = "opentelemetry")]
impl OutboxEvent {
    /// The same event carrying the trace context of OpenTelemetry's current span (feature
    /// `opentelemetry`), as [`OutboxEvent::with_trace_context`] would with its W3C text; the
    /// event unchanged when there is no valid current span.
    #[must_use]
    pub fn with_current_span(self) -> OutboxEvent {
        use opentelemetry::trace::TraceContextExt as _;
        let context = opentelemetry::Context::current();
        let span = context.span();
        let span = span.span_context();
        if !span.is_valid() {
            return self;
        }
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8()
        );
        let state = span.trace_state().header();
        self.with_trace_context(traceparent, (!state.is_empty()).then_some(state))
    }
}

/// An event's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// JSON (`null`: a tombstone). Rows: its text cast to the payload column's type.
    Json(Value),
    /// Bytes, for a `bytea` payload column (rows only: a logical message's payload is JSON).
    Bytes(Vec<u8>),
}

impl Payload {
    /// True for JSON `null`: the event is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        matches!(self, Payload::Json(Value::Null))
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Payload {
        Payload::Json(value)
    }
}

impl PartialEq<Value> for Payload {
    fn eq(&self, other: &Value) -> bool {
        matches!(self, Payload::Json(v) if v == other)
    }
}

/// A W3C trace context (<https://www.w3.org/TR/trace-context/>): the `traceparent` and
/// `tracestate` of the span the event is written in. walship checks them before it copies them
/// to headers, and leaves a malformed one off (with a warning) rather than fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `version-traceid-parentid-flags`, e.g. `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
    pub traceparent: String,
    /// Vendor-specific state, e.g. `rojo=00f067aa0ba902b7`.
    pub tracestate: Option<String>,
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
            payload: Payload::Json(payload),
            headers: Vec::new(),
            trace: None,
        }
    }

    /// An event whose payload is bytes, for a `bytea` payload column
    /// ([`PayloadType::Bytea`]); rows only.
    pub fn bytes(
        aggregate_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> OutboxEvent {
        let mut event = OutboxEvent::new(aggregate_type, aggregate_id, event_type, Value::Null);
        event.payload = Payload::Bytes(payload.into());
        event
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

    /// The same event with a fresh UUIDv7 id: time-ordered, so ids written close together sort
    /// together (kinder to a B-tree primary key than random v4 ids).
    #[must_use]
    pub fn with_v7_id(mut self) -> OutboxEvent {
        self.id = Uuid::now_v7();
        self
    }

    /// The same event with one more column (row) or field (message): `name` must be a column
    /// of the outbox table for a row, and in walship's `outbox.header_columns` to become a
    /// header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: Option<String>) -> OutboxEvent {
        self.headers.push((name.into(), value));
        self
    }

    /// The same event carrying the caller's trace context (written to [`Columns::traceparent`]
    /// and [`Columns::tracestate`]).
    #[must_use]
    pub fn with_trace_context(
        mut self,
        traceparent: impl Into<String>,
        tracestate: Option<String>,
    ) -> OutboxEvent {
        self.trace = Some(TraceContext {
            traceparent: traceparent.into(),
            tracestate,
        });
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
    /// The W3C `traceparent` (`traceparent`: walship's `outbox.traceparent_column`), written
    /// only for an event with a trace context.
    pub traceparent: String,
    /// The W3C `tracestate` (`tracestate`), written only when the trace context has one.
    pub tracestate: String,
}

impl Default for Columns {
    fn default() -> Columns {
        Columns {
            id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
            traceparent: "traceparent".into(),
            tracestate: "tracestate".into(),
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
        let statement = self.statements(std::slice::from_ref(event))?;
        executor.run(&statement).await?;
        Ok(event.id)
    }

    /// Adds `events` within the caller's transaction, in order, with one statement per
    /// [`BATCH`] events (a multi-row `INSERT`, or one `SELECT` emitting every message), and
    /// returns their ids. As [`Outbox::add`]: nothing is begun, committed or rolled back.
    pub async fn add_all<E: Executor>(
        &self,
        executor: E,
        events: &[OutboxEvent],
    ) -> Result<Vec<Uuid>, Error> {
        let mut statements = Vec::new();
        for chunk in events.chunks(BATCH) {
            statements.extend(self.statements(chunk)?);
        }
        executor.run(&statements).await?;
        Ok(events.iter().map(|e| e.id).collect())
    }

    /// The statements writing `events` (at most [`BATCH`]): one.
    fn statements(&self, events: &[OutboxEvent]) -> Result<Vec<Statement>, Error> {
        match &self.mode {
            Mode::Row => Ok(vec![self.row_statement(events)?]),
            Mode::Message { prefix } => Ok(vec![self.message_statement(prefix, events)?]),
        }
    }

    /// An event's columns: name, value (text; `None` = NULL) and the SQL that takes the
    /// parameter `$n` to the column's type (`{}` stands for `$n`).
    fn row_fields<'e>(&'e self, event: &'e OutboxEvent) -> Result<Vec<Field<'e>>, Error> {
        let c = &self.columns;
        // Every parameter is text, cast on the server: the same SQL for both drivers, and no
        // dependence on the driver's type mapping.
        let json_sql = match self.payload_type {
            PayloadType::Jsonb => "{}::text::jsonb",
            PayloadType::Json => "{}::text::json",
            PayloadType::Text => "{}::text",
            PayloadType::Bytea => "convert_to({}::text, 'UTF8')",
        };
        let (payload, payload_sql) = match (&event.payload, self.payload_type) {
            (Payload::Json(Value::Null), _) => (None, json_sql),
            (Payload::Json(v), _) => (Some(v.to_string()), json_sql),
            (Payload::Bytes(b), PayloadType::Bytea) => (Some(hex(b)), "decode({}::text, 'hex')"),
            (Payload::Bytes(_), _) => {
                return Err(Error::BinaryPayload(
                    "the payload column is not bytea: set with_payload_type(PayloadType::Bytea)",
                ));
            }
        };
        let mut fields: Vec<Field<'e>> = vec![
            (c.id.as_str(), Some(event.id.to_string()), "{}::text::uuid"),
            (
                c.aggregate_type.as_str(),
                Some(event.aggregate_type.clone()),
                "{}::text",
            ),
            (
                c.aggregate_id.as_str(),
                Some(event.aggregate_id.clone()),
                "{}::text",
            ),
            (
                c.event_type.as_str(),
                Some(event.event_type.clone()),
                "{}::text",
            ),
            (c.payload.as_str(), payload, payload_sql),
        ];
        if let Some(trace) = &event.trace {
            fields.push((
                c.traceparent.as_str(),
                Some(trace.traceparent.clone()),
                "{}::text",
            ));
            if trace.tracestate.is_some() {
                fields.push((c.tracestate.as_str(), trace.tracestate.clone(), "{}::text"));
            }
        }
        for (name, value) in &event.headers {
            fields.push((name.as_str(), value.clone(), "{}::text"));
        }
        fields.retain(|(name, _, _)| !name.is_empty());
        Ok(fields)
    }

    fn row_statement(&self, events: &[OutboxEvent]) -> Result<Statement, Error> {
        // The columns of every event, in first-seen order; an event without one writes NULL.
        let per_event = events
            .iter()
            .map(|e| self.row_fields(e))
            .collect::<Result<Vec<_>, _>>()?;
        let mut columns: Vec<(&str, &str)> = Vec::new();
        for fields in &per_event {
            for (name, _, sql) in fields {
                if !columns.iter().any(|(n, _)| n == name) {
                    columns.push((name, sql));
                }
            }
        }
        let mut params = Vec::new();
        let mut rows = Vec::with_capacity(events.len());
        for fields in per_event {
            let mut values = Vec::with_capacity(columns.len());
            for (name, sql) in &columns {
                match fields.iter().find(|(n, _, _)| n == name) {
                    Some((_, value, sql)) => {
                        params.push(value.clone());
                        values.push(sql.replace("{}", &format!("${}", params.len())));
                    }
                    None => values.push(sql.replace("{}", "NULL")),
                }
            }
            rows.push(format!("({})", values.join(", ")));
        }
        let table = match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.table)),
            None => quote_ident(&self.table),
        };
        let names: Vec<String> = columns.iter().map(|(n, _)| quote_ident(n)).collect();
        Ok(Statement {
            sql: format!(
                "INSERT INTO {table} ({}) VALUES {}",
                names.join(", "),
                rows.join(", ")
            ),
            params,
        })
    }

    fn message_content(
        &self,
        event: &OutboxEvent,
    ) -> Result<serde_json::Map<String, Value>, Error> {
        let c = &self.columns;
        let Payload::Json(payload) = &event.payload else {
            return Err(Error::BinaryPayload(
                "a logical message's payload is JSON: write bytes as a row with a bytea payload",
            ));
        };
        let mut content = serde_json::Map::new();
        let mut fields = vec![
            (&c.id, Value::String(event.id.to_string())),
            (
                &c.aggregate_type,
                Value::String(event.aggregate_type.clone()),
            ),
            (&c.aggregate_id, Value::String(event.aggregate_id.clone())),
            (&c.event_type, Value::String(event.event_type.clone())),
            (&c.payload, payload.clone()),
        ];
        if let Some(trace) = &event.trace {
            fields.push((&c.traceparent, Value::String(trace.traceparent.clone())));
            if let Some(state) = &trace.tracestate {
                fields.push((&c.tracestate, Value::String(state.clone())));
            }
        }
        for (name, value) in &event.headers {
            fields.push((name, value.clone().map_or(Value::Null, Value::String)));
        }
        for (name, value) in fields {
            if !name.is_empty() {
                content.insert(name.clone(), value);
            }
        }
        Ok(content)
    }

    fn message_statement(&self, prefix: &str, events: &[OutboxEvent]) -> Result<Statement, Error> {
        if let [event] = events {
            let content =
                serde_json::to_string(&self.message_content(event)?).map_err(Error::Payload)?;
            return Ok(Statement {
                // true: transactional, decoded at commit with the transaction's rows; walship
                // refuses non-transactional messages with an outbox prefix.
                sql: "SELECT pg_logical_emit_message(true, $1::text, $2::text)".into(),
                params: vec![Some(prefix.to_owned()), Some(content)],
            });
        }
        let contents = events
            .iter()
            .map(|e| self.message_content(e).map(Value::Object))
            .collect::<Result<Vec<_>, _>>()?;
        let contents = serde_json::to_string(&contents).map_err(Error::Payload)?;
        Ok(Statement {
            // json (not jsonb) keeps each content's text as written; PostgreSQL evaluates a
            // volatile function of the select list after the sort, so in array order.
            sql: "SELECT pg_logical_emit_message(true, $1::text, e.content::text) \
                  FROM json_array_elements($2::text::json) WITH ORDINALITY AS e(content, n) \
                  ORDER BY e.n"
                .into(),
            params: vec![Some(prefix.to_owned()), Some(contents)],
        })
    }
}

/// Most events [`Outbox::add_all`] writes with one statement (PostgreSQL binds at most 65535
/// parameters; a row takes 5 to 10 or so).
pub const BATCH: usize = 1000;

/// A column: name, text value (`None` = NULL), SQL taking `{}` (the parameter) to its type.
type Field<'e> = (&'e str, Option<String>, &'static str);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One statement with text parameters (`None` = SQL NULL).
#[doc(hidden)]
#[derive(Debug)]
pub struct Statement {
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
    /// A [`Payload::Bytes`] where it cannot be written.
    #[error("outbox event with a binary payload: {0}")]
    BinaryPayload(&'static str),
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
    /// Runs `statements`, in order.
    #[doc(hidden)]
    fn run(self, statements: &[Statement]) -> impl Future<Output = Result<(), Error>> + Send;
}

impl Statement {
    fn params(&self) -> Vec<Option<&str>> {
        self.params.iter().map(Option::as_deref).collect()
    }
}

#[cfg(feature = "tokio-postgres")]
mod tokio_postgres_impl {
    use tokio_postgres::GenericClient;
    use tokio_postgres::types::ToSql;

    use super::{Error, Executor, Statement, sealed};

    impl<C: GenericClient + Sync> sealed::Sealed for &C {}

    impl<C: GenericClient + Sync> Executor for &C {
        async fn run(self, statements: &[Statement]) -> Result<(), Error> {
            for statement in statements {
                let params = statement.params();
                let params: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                self.execute(&statement.sql, &params).await?;
            }
            Ok(())
        }
    }
}

#[cfg(feature = "sqlx")]
mod sqlx_impl {
    use sqlx::{PgConnection, Postgres, Transaction};

    use super::{Error, Executor, Statement, sealed};

    async fn run(conn: &mut PgConnection, statements: &[Statement]) -> Result<(), Error> {
        for statement in statements {
            let mut query = sqlx::query(&statement.sql);
            for p in statement.params() {
                query = query.bind(p);
            }
            query.execute(&mut *conn).await?;
        }
        Ok(())
    }

    impl sealed::Sealed for &mut PgConnection {}

    impl Executor for &mut PgConnection {
        async fn run(self, statements: &[Statement]) -> Result<(), Error> {
            run(self, statements).await
        }
    }

    impl sealed::Sealed for &mut Transaction<'_, Postgres> {}

    impl Executor for &mut Transaction<'_, Postgres> {
        async fn run(self, statements: &[Statement]) -> Result<(), Error> {
            run(self, statements).await
        }
    }
}

#[cfg(test)]
mod tests;
