//! Outbox extraction: the relation cache and turning an outbox row into an [`OutboxRow`].
//!
//! ```text
//!  Relation msg ──▶ Relations (oid → columns, outbox layout) ──┐
//!  Insert msg ─────────────────────────────────────────────────┴─▶ extract ─▶ OutboxRow<'_>
//! ```
//!
//! Invariant: a row of the outbox table either becomes an [`OutboxRow`] or an [`RowError`] that
//! names the column and what was wrong; it is never dropped. The layout (which column index
//! plays which role) is recomputed whenever PostgreSQL sends a new Relation message, so `ALTER
//! TABLE` on the outbox mid-stream is picked up at the exact point in the stream it happened.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use pgoutput::{Column, Relation, TupleData};

use crate::catalog::OutboxScope;
use crate::ident::TableName;

/// Type OIDs walship treats specially.
mod oid {
    pub const BYTEA: u32 = 17;
    pub const JSON: u32 = 114;
    pub const JSONB: u32 = 3802;
}

/// What the payload column holds: a record format may encode or label the value by it
/// (CloudEvents' `data` and `datacontenttype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PayloadType {
    /// JSON text: a json or jsonb column, or a logical message's payload.
    Json,
    /// Any other type, as its text.
    #[default]
    Text,
    /// bytea, decoded.
    Bytea,
}

/// The outbox table and which of its columns play which role (Debezium's names by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxSpec {
    /// The outbox table.
    pub table: TableName,
    /// Event id column → header `id`; empty to disable.
    pub id: String,
    /// Aggregate type column (routes the topic); empty when the topic template does not use it.
    pub aggregate_type: String,
    /// Aggregate id column → Kafka key.
    pub aggregate_id: String,
    /// Event type column → header `type`; empty to disable.
    pub event_type: String,
    /// Payload column → message value.
    pub payload: String,
    /// Further columns copied into headers of the same name.
    pub header_columns: Vec<String>,
    /// Column holding the writer's W3C `traceparent`; empty when off.
    pub traceparent: String,
    /// Column holding the writer's W3C `tracestate`; empty when off.
    pub tracestate: String,
    /// Column holding the event's time (the record timestamp instead of the commit time):
    /// `timestamptz`/`timestamp` (UTC when without zone) or an integer of ms since the Unix
    /// epoch; empty when off.
    pub timestamp: String,
}

impl OutboxSpec {
    /// Debezium-compatible defaults for `public.outbox`.
    pub fn debezium(table: TableName) -> Self {
        OutboxSpec {
            table,
            id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
            header_columns: Vec::new(),
            traceparent: String::new(),
            tracestate: String::new(),
            timestamp: String::new(),
        }
    }
}

/// Column positions of the outbox roles in the current table definition.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    id: Option<usize>,
    aggregate_type: Option<usize>,
    aggregate_id: usize,
    event_type: Option<usize>,
    payload: usize,
    payload_type: PayloadType,
    traceparent: Option<usize>,
    tracestate: Option<usize>,
    timestamp: Option<usize>,
    headers: Vec<(Arc<str>, usize)>,
    ncolumns: usize,
}

/// Why an outbox row cannot become an event. Carries no position: the caller adds the LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// A configured column is not in the table.
    #[error(
        "column {column:?} (outbox.{role}) is not in table {table}; add it, or set outbox.{role} to the right column name"
    )]
    MissingColumn {
        /// Table.
        table: String,
        /// Configuration key.
        role: &'static str,
        /// Configured column name.
        column: String,
    },
    /// A required value is NULL.
    #[error("column {column:?} of table {table} is NULL but is required ({role})")]
    Null {
        /// Table.
        table: String,
        /// Role of the column.
        role: &'static str,
        /// Column name.
        column: String,
    },
    /// The row does not have the columns the Relation message announced.
    #[error("row of table {table} has {got} columns but its relation describes {expected}")]
    ColumnCount {
        /// Table.
        table: String,
        /// From the Relation message.
        expected: usize,
        /// In the row.
        got: usize,
    },
    /// A bytea payload's text form is not valid hex.
    #[error(
        "column {column:?} of table {table} is bytea but its value is not in hex format (\\x...)"
    )]
    BadBytea {
        /// Table.
        table: String,
        /// Column.
        column: String,
    },
    /// The timestamp column's value is not a time walship reads.
    #[error(
        "column {column:?} of table {table} (outbox.timestamp_column) holds {value:?}, which is \
         neither a timestamp (YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM]]) nor an integer of \
         milliseconds since the Unix epoch"
    )]
    BadTimestamp {
        /// Table.
        table: String,
        /// Column.
        column: String,
        /// The value (lossy UTF-8, cut to 64 bytes).
        value: String,
    },
    /// A row arrived for a relation never described.
    #[error("row for unknown relation OID {0}: the server sent no Relation message for it")]
    UnknownRelation(u32),
    /// A row of a relation that has the outbox's columns but that the catalog does not place
    /// under the outbox: a partition detached or dropped since the row was written, or another
    /// table with the outbox's columns in the publication.
    #[error(
        "row of relation {table} (OID {oid}), which has the outbox's columns but which the catalog does not \
         place under the outbox {outbox} now: a partition detached or dropped since the row was written, or \
         another table with the outbox's columns in publication {publication:?}. walship cannot tell whether \
         it is an event, so nothing from this transaction on is confirmed. If it is another table, remove it \
         from the publication (ALTER PUBLICATION {publication_sql} DROP TABLE ...) and move the slot past this \
         transaction with SELECT pg_replication_slot_advance('{slot}', '{commit_lsn}'); this skips the whole \
         transaction, its other outbox rows too (publish those by hand). Keep partitions attached until \
         walship has read their rows, and publish only the outbox"
    )]
    Unplaced {
        /// The relation as the stream described it.
        table: String,
        /// Its OID.
        oid: u32,
        /// The configured outbox table.
        outbox: String,
        /// The publication.
        publication: String,
        /// The publication, quoted for SQL.
        publication_sql: String,
        /// The slot.
        slot: String,
        /// The transaction's commit LSN (filled in by the caller, which knows it).
        commit_lsn: String,
    },
}

/// An outbox row, borrowing from the replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow<'a> {
    /// Event id (text form, e.g. a UUID).
    pub id: Option<&'a [u8]>,
    /// Aggregate type (routes the topic).
    pub aggregate_type: Option<&'a [u8]>,
    /// Aggregate id: the Kafka key.
    pub aggregate_id: &'a [u8],
    /// Event type.
    pub event_type: Option<&'a [u8]>,
    /// Payload bytes as stored; `None` is a tombstone.
    pub payload: Option<Cow<'a, [u8]>>,
    /// What the payload column holds.
    pub payload_type: PayloadType,
    /// The writer's W3C `traceparent`, unchecked (`outbox.traceparent_column`).
    pub traceparent: Option<&'a [u8]>,
    /// The writer's W3C `tracestate`, unchecked (`outbox.tracestate_column`).
    pub tracestate: Option<&'a [u8]>,
    /// The event's time, ms since the Unix epoch (`outbox.timestamp_column`); `None`: the
    /// commit time.
    pub timestamp_ms: Option<i64>,
    /// Extra header columns: (name, value or NULL).
    pub headers: Vec<(Arc<str>, Option<&'a [u8]>)>,
}

struct Entry {
    relation: Relation,
    kind: Kind,
}

/// What a described relation is to walship.
enum Kind {
    /// The outbox table or one of its partitions; `Err` when unusable as configured.
    Outbox(Result<Layout, RowError>),
    /// Another table of the publication.
    Other,
    /// Not placed yet: [`Relations::place`] decides from the catalog.
    Unplaced,
}

/// What [`Relations::update`] could tell about a new relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Known: the outbox (or a partition of it), or another table.
    Known,
    /// Not known from the session's scope: ask the catalog whether this OID is in the outbox's
    /// partition tree, then call [`Relations::place`]. Until then its rows are refused.
    Lookup(u32),
}

/// What a row message refers to.
pub enum RowTarget<'r> {
    /// A table other than the outbox (ignored by walship).
    Other(&'r Relation),
    /// The outbox table.
    Outbox(&'r Relation),
}

/// The relation cache: relation OID → definition and outbox layout.
pub struct Relations {
    spec: OutboxSpec,
    /// Which relations are the outbox, from the catalog; `None`: by name only.
    scope: Option<OutboxScope>,
    /// The publication and slot (for messages).
    publication: String,
    slot: String,
    map: HashMap<u32, Entry>,
}

impl Relations {
    /// An empty cache that knows the outbox by its configured name only (no partitions).
    pub fn new(spec: OutboxSpec) -> Self {
        Relations {
            spec,
            scope: None,
            publication: String::new(),
            slot: String::new(),
            map: HashMap::new(),
        }
    }

    /// An empty cache that knows the outbox as the catalog has it: the table by OID and name,
    /// and every partition under it (see [`crate::catalog`]).
    pub fn with_scope(spec: OutboxSpec, scope: OutboxScope, publication: &str, slot: &str) -> Self {
        Relations {
            spec,
            scope: Some(scope),
            publication: publication.to_owned(),
            slot: slot.to_owned(),
            map: HashMap::new(),
        }
    }

    /// The outbox table's OID when the session started, if known.
    pub fn outbox_oid(&self) -> Option<u32> {
        self.scope.as_ref().map(|s| s.family.root)
    }

    /// The outbox definition.
    pub fn spec(&self) -> &OutboxSpec {
        &self.spec
    }

    /// Records (or replaces) a relation's definition.
    ///
    /// The outbox is the configured name, the OID it had when the session started (renamed or
    /// not), and any partition under it the session knows. A relation without the outbox's
    /// aggregate id and payload columns is another table: partitions have their parent's
    /// columns, so it was never one of the outbox's. Any other relation is placed by the
    /// catalog: see [`Placement::Lookup`].
    pub fn update(&mut self, relation: Relation) -> Placement {
        let by_name =
            relation.namespace == self.spec.table.schema && relation.name == self.spec.table.name;
        let outbox = match &self.scope {
            None => by_name,
            Some(scope) => {
                if scope.family.root == relation.id && !by_name {
                    tracing::warn!(
                        "the outbox table {} is now called {}.{}: its rows are still published; \
                         set outbox.table to the new name",
                        self.spec.table,
                        relation.namespace,
                        relation.name
                    );
                }
                by_name || scope.family.contains(relation.id)
            }
        };
        let kind = if outbox {
            Kind::Outbox(self.layout_of(&relation))
        } else if self.scope.is_none() || !self.has_outbox_columns(&relation) {
            Kind::Other
        } else {
            Kind::Unplaced
        };
        let placement = match kind {
            Kind::Unplaced => Placement::Lookup(relation.id),
            _ => Placement::Known,
        };
        self.map.insert(relation.id, Entry { relation, kind });
        placement
    }

    /// True when `relation` has the outbox's required columns (as a partition of it would).
    fn has_outbox_columns(&self, relation: &Relation) -> bool {
        let has = |name: &str| relation.columns.iter().any(|c| c.name == name);
        has(&self.spec.aggregate_id) && has(&self.spec.payload)
    }

    /// Places a relation [`Relations::update`] asked about: `true` when the catalog has it in
    /// the outbox's partition tree now. Otherwise it stays unplaced and its rows are refused
    /// with [`RowError::Unplaced`]: a partition detached since the row was written looks like
    /// any other table now, so "not in the tree now" is no proof that a row is not an event.
    pub fn place(&mut self, relation_id: u32, in_outbox: bool) {
        if !in_outbox {
            return;
        }
        let layout = self
            .map
            .get(&relation_id)
            .map(|e| self.layout_of(&e.relation));
        if let (Some(e), Some(l)) = (self.map.get_mut(&relation_id), layout) {
            e.kind = Kind::Outbox(l);
        }
    }

    fn layout_of(&self, relation: &Relation) -> Result<Layout, RowError> {
        let l = layout(&self.spec, relation);
        if let Err(e) = &l {
            tracing::warn!(
                "outbox table definition ({}.{}) is not usable: {e}",
                relation.namespace,
                relation.name
            );
        }
        l
    }

    /// Looks up a relation OID.
    pub fn target(&self, relation_id: u32) -> Result<RowTarget<'_>, RowError> {
        let e = self
            .map
            .get(&relation_id)
            .ok_or(RowError::UnknownRelation(relation_id))?;
        match e.kind {
            Kind::Outbox(_) => Ok(RowTarget::Outbox(&e.relation)),
            Kind::Other => Ok(RowTarget::Other(&e.relation)),
            Kind::Unplaced => Err(RowError::Unplaced {
                table: format!("{}.{}", e.relation.namespace, e.relation.name),
                oid: relation_id,
                outbox: self.spec.table.to_string(),
                publication: self.publication.clone(),
                publication_sql: crate::ident::quote_ident(&self.publication),
                slot: self.slot.clone(),
                commit_lsn: "<commit LSN of the transaction>".to_owned(),
            }),
        }
    }

    /// True when the OID is the outbox table or one of its partitions.
    pub fn is_outbox(&self, relation_id: u32) -> bool {
        self.map
            .get(&relation_id)
            .is_some_and(|e| matches!(e.kind, Kind::Outbox(_)))
    }

    /// Extracts an outbox row from an Insert's tuple. The relation must be the outbox table.
    pub fn extract<'a>(
        &self,
        relation_id: u32,
        tuple: &'a TupleData,
    ) -> Result<OutboxRow<'a>, RowError> {
        let entry = self
            .map
            .get(&relation_id)
            .ok_or(RowError::UnknownRelation(relation_id))?;
        let layout = match &entry.kind {
            Kind::Outbox(Ok(l)) => l,
            Kind::Outbox(Err(e)) => return Err(e.clone()),
            Kind::Other | Kind::Unplaced => return Err(RowError::UnknownRelation(relation_id)),
        };
        if tuple.len() != layout.ncolumns {
            return Err(RowError::ColumnCount {
                table: self.spec.table.to_string(),
                expected: layout.ncolumns,
                got: tuple.len(),
            });
        }
        let mut id = None;
        let mut aggregate_type = None;
        let mut aggregate_id = None;
        let mut event_type = None;
        let mut payload = None;
        let mut traceparent = None;
        let mut tracestate = None;
        let mut timestamp = None;
        // In the order of the settings (`header_columns`, then `additional_placement`), which the
        // session pairs one by one with their placements: never the table's column order.
        let mut headers: Vec<(Arc<str>, Option<&[u8]>)> = layout
            .headers
            .iter()
            .map(|(name, _)| (Arc::clone(name), None))
            .collect();
        for (i, col) in tuple.iter().enumerate() {
            let v = col.bytes();
            if Some(i) == layout.id {
                id = v;
            }
            if Some(i) == layout.aggregate_type {
                aggregate_type = v;
            }
            if i == layout.aggregate_id {
                aggregate_id = v;
            }
            if Some(i) == layout.event_type {
                event_type = v;
            }
            if i == layout.payload {
                payload = match col {
                    Column::Text(b) if layout.payload_type == PayloadType::Bytea => {
                        Some(Cow::Owned(decode_bytea_hex(b).ok_or_else(|| {
                            RowError::BadBytea {
                                table: self.spec.table.to_string(),
                                column: self.spec.payload.clone(),
                            }
                        })?))
                    }
                    _ => v.map(Cow::Borrowed),
                };
            }
            if Some(i) == layout.traceparent {
                traceparent = v;
            }
            if Some(i) == layout.tracestate {
                tracestate = v;
            }
            if Some(i) == layout.timestamp {
                timestamp = v;
            }
            for (k, (_, idx)) in layout.headers.iter().enumerate() {
                if *idx == i {
                    headers[k].1 = v;
                }
            }
        }
        let null = |role: &'static str, column: &str| RowError::Null {
            table: self.spec.table.to_string(),
            role,
            column: column.to_owned(),
        };
        let aggregate_id = aggregate_id.ok_or_else(|| {
            null(
                "aggregate_id_column: the Kafka key",
                &self.spec.aggregate_id,
            )
        })?;
        if layout.aggregate_type.is_some() && aggregate_type.is_none() {
            return Err(null(
                "aggregate_type_column: routes the topic",
                &self.spec.aggregate_type,
            ));
        }
        if layout.id.is_some() && id.is_none() {
            return Err(null(
                "id_column: the event id header consumers deduplicate on",
                &self.spec.id,
            ));
        }
        let timestamp_ms = timestamp
            .map(|t| {
                // A Kafka timestamp (and CloudEvents' RFC 3339 `time`) needs 1970 to 9999: ms
                // stored as µs, or a date before 1970, is a bad row, never an absurd time.
                timestamp_millis(t)
                    .filter(|ms| (0..=MAX_TIMESTAMP_MS).contains(ms))
                    .ok_or_else(|| RowError::BadTimestamp {
                        table: self.spec.table.to_string(),
                        column: self.spec.timestamp.clone(),
                        value: String::from_utf8_lossy(&t[..t.len().min(64)]).into_owned(),
                    })
            })
            .transpose()?;
        Ok(OutboxRow {
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            payload_type: layout.payload_type,
            timestamp_ms,
            traceparent,
            tracestate,
            headers,
        })
    }
}

impl Relations {
    /// The row as a JSON object of column name → text value (or null), for a dead-letter
    /// record: everything needed to repair and replay the event by hand. Binary values are hex.
    pub fn row_json(&self, relation_id: u32, tuple: &TupleData) -> String {
        let mut out = String::from("{");
        let columns = self
            .map
            .get(&relation_id)
            .map(|e| e.relation.columns.as_slice())
            .unwrap_or_default();
        for (i, col) in tuple.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let name = columns
                .get(i)
                .map_or_else(|| format!("column{i}"), |c| c.name.clone());
            push_json_string(&mut out, name.as_bytes());
            out.push(':');
            match col {
                Column::Null => out.push_str("null"),
                Column::UnchangedToast => out.push_str("\"(unchanged toast)\""),
                Column::Text(b) => push_json_string(&mut out, b),
                Column::Binary(b) => {
                    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                    push_json_string(&mut out, hex.as_bytes());
                }
            }
        }
        out.push('}');
        out
    }
}

fn push_json_string(out: &mut String, bytes: &[u8]) {
    out.push('"');
    for c in String::from_utf8_lossy(bytes).chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn layout(spec: &OutboxSpec, rel: &Relation) -> Result<Layout, RowError> {
    let find = |role: &'static str, name: &str| -> Result<Option<usize>, RowError> {
        if name.is_empty() {
            return Ok(None);
        }
        rel.columns
            .iter()
            .position(|c| c.name == name)
            .map(Some)
            .ok_or_else(|| RowError::MissingColumn {
                table: spec.table.to_string(),
                role,
                column: name.to_owned(),
            })
    };
    let required = |role: &'static str, name: &str| {
        find(role, name)?.ok_or_else(|| RowError::MissingColumn {
            table: spec.table.to_string(),
            role,
            column: name.to_owned(),
        })
    };
    let payload = required("payload_column", &spec.payload)?;
    let mut headers = Vec::with_capacity(spec.header_columns.len());
    for h in &spec.header_columns {
        headers.push((Arc::from(h.as_str()), required("header_columns", h)?));
    }
    Ok(Layout {
        id: find("id_column", &spec.id)?,
        aggregate_type: find("aggregate_type_column", &spec.aggregate_type)?,
        aggregate_id: required("aggregate_id_column", &spec.aggregate_id)?,
        event_type: find("type_column", &spec.event_type)?,
        payload_type: match rel.columns[payload].type_oid {
            oid::BYTEA => PayloadType::Bytea,
            oid::JSON | oid::JSONB => PayloadType::Json,
            _ => PayloadType::Text,
        },
        payload,
        traceparent: find("traceparent_column", &spec.traceparent)?,
        tracestate: find("tracestate_column", &spec.tracestate)?,
        timestamp: find("timestamp_column", &spec.timestamp)?,
        headers,
        ncolumns: rel.columns.len(),
    })
}

/// The latest event time a record may carry: 9999-12-31T23:59:59.999Z, in ms since the epoch.
pub const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// Milliseconds since the Unix epoch of an event time: an integer (already ms), or PostgreSQL's
/// ISO text of a `timestamptz` (`2026-12-06 15:35:01.005+00`, offsets `+HH`, `+HH:MM`,
/// `+HH:MM:SS`) or a `timestamp` (no offset: UTC). Fractions beyond milliseconds are cut.
pub fn timestamp_millis(text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.trim();
    if let Ok(ms) = text.parse::<i64>() {
        return Some(ms);
    }
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(r)?;
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().ok())?
    };
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b' ' | b'T') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let ms: String = frac[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = ms.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset_secs = match rest.as_bytes().first() {
        None => 0,
        Some(b'Z') if rest.len() == 1 => 0,
        Some(sign @ (b'+' | b'-')) => {
            let mut parts = rest[1..].split(':');
            let mut secs = 0;
            for unit in [3600, 60, 1] {
                if let Some(p) = parts.next() {
                    if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_digit()) {
                        return None;
                    }
                    secs += p.parse::<i64>().ok()? * unit;
                }
            }
            if parts.next().is_some() {
                return None;
            }
            if *sign == b'-' { -secs } else { secs }
        }
        _ => return None,
    };
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1000 + millis)
}

/// Decodes bytea's text output (`\x` + hex) into bytes.
fn decode_bytea_hex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests;
