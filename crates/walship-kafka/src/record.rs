//! The record: what walship writes to Kafka for each event and each dead letter — topic, key,
//! value, timestamp and headers — shaped in one place.
//!
//! ```text
//!  event        key = aggregate id · value = payload (none: tombstone) · timestamp = commit time
//!               walship.source · walship.position · walship.timeline · [id] · [type] · [header columns]
//!               · [traceparent · [tracestate]] · [CloudEvents' ce_* · content-type]
//!  dead letter  key = the event's key (or empty) · value = the row, cut to fit · timestamp = commit time
//!               walship.error · walship.lsn · walship.xid · walship.table | walship.prefix ·
//!               walship.source · walship.timeline · [walship.position] · [id] · [walship.truncated]
//! ```
//!
//! An event's record is shaped by its [`Format`]: walship's own (above), or a CloudEvent in
//! binary or structured mode ([`cloudevents`]); fields the row places in an envelope make the
//! value `{"payload": …, "<name>": …}` first, and a partition it names replaces the key's hash.
//! A tombstone stays a tombstone in every format.
//!
//! Invariant: every record walship produces is built by [`Record::event`] (through
//! [`Record::shaped`]) or [`Record::dead_letter`] (only benches assemble one from
//! [`Record::new`] directly), so its headers carry the names of [`crate::headers`] in the order
//! above; a dead letter cut by [`Record::fit`] fits in the producer's `message.max.bytes` and
//! names its original size. The texts walship writes itself (position, LSN, xid, size) are held
//! by the record; the row's bytes (key, value, header columns) stay borrowed from the buffer
//! they were decoded from, and librdkafka copies them once, when the record is sent.

use std::io::Write as _;
use std::sync::Arc;

use crate::headers::{
    CE_ID_HEADER, CE_SOURCE_HEADER, CE_SPECVERSION_HEADER, CE_SUBJECT_HEADER, CE_TIME_HEADER,
    CE_TYPE_HEADER, CONTENT_TYPE_HEADER, ERROR_HEADER, ID_HEADER, LSN_HEADER, POSITION_HEADER,
    PREFIX_HEADER, Position, PositionText, SOURCE_HEADER, TABLE_HEADER, TIMELINE_HEADER,
    TRUNCATED_HEADER, TYPE_HEADER, XID_HEADER,
};

pub mod cloudevents;
pub mod trace;

pub use cloudevents::{CloudEvents, Scratch, ShapeError};
pub use trace::{TRACEPARENT_HEADER, TRACESTATE_HEADER, TraceContext, TraceProblem};

/// Room left in a record for what is not key, value or header text: the record's and its
/// batch's framing (a record batch header is 61 bytes; lengths, offsets and attributes add a
/// few per field).
pub const RECORD_OVERHEAD: usize = 512;

/// Headers a record holds without allocating: a dead letter's nine, an event's five and a few
/// header columns, or a CloudEvent's twelve.
const INLINE_HEADERS: usize = 14;

/// A short text the record writes itself (a position, an LSN, a number): at most 32 bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Text {
    buf: PositionText,
    len: u8,
}

impl Text {
    fn of(args: std::fmt::Arguments<'_>) -> Self {
        let mut text = Text::default();
        let mut cursor = std::io::Cursor::new(&mut text.buf[..]);
        // Every text written here is shorter than the buffer.
        let _ = cursor.write_fmt(args);
        text.len = u8::try_from(cursor.position()).unwrap_or(0);
        text
    }

    fn position(position: Position) -> Self {
        let mut text = Text::default();
        let len = position.encode(&mut text.buf).len();
        text.len = u8::try_from(len).unwrap_or(0);
        text
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// A header's value: bytes the caller lends (or null), or a text the record holds.
#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Lent(Option<&'a [u8]>),
    Text(Text),
}

/// Who wrote an event and where it stands: what every record of it names, an event's own
/// record and its dead letter alike.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// [`SOURCE_HEADER`]: `<system identifier>/<slot>`.
    pub source: &'a str,
    /// [`POSITION_HEADER`]; `None` for what is no event of any transaction.
    pub position: Option<Position>,
    /// [`TIMELINE_HEADER`]: the timeline whose WAL holds the commit.
    pub timeline: &'a str,
    /// [`ID_HEADER`]: the outbox row's id, when it has one.
    pub id: Option<&'a [u8]>,
}

/// What the payload column holds, as far as a record's format cares: CloudEvents encodes
/// `data` and names `datacontenttype` by it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PayloadKind {
    /// JSON text (json, jsonb, a logical message's payload).
    Json,
    /// Text of any other type.
    #[default]
    Text,
    /// Bytes (bytea).
    Binary,
}

/// Where a further column of the row goes (`outbox.header_columns` and
/// `outbox.additional_placement`, Debezium's `table.fields.additional.placement`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A header of this name.
    Header(Arc<str>),
    /// A field of this name in an envelope object around the payload.
    Envelope(Arc<str>),
    /// The record's partition (a number): bypasses the key's hash.
    Partition,
}

/// How an event's record is shaped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Format {
    /// walship's own: the payload as the value, the headers of the module documentation.
    #[default]
    Plain,
    /// A CloudEvent (binary or structured), with walship's headers kept.
    CloudEvents(CloudEvents),
}

/// An outbox event's content: what its record carries besides the [`Stamp`].
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// The aggregate id: decides the partition.
    pub key: &'a [u8],
    /// The payload as stored; `None` sends a tombstone.
    pub payload: Option<&'a [u8]>,
    /// Commit time, ms since the Unix epoch.
    pub commit_ms: i64,
    /// [`TYPE_HEADER`], when the row has one.
    pub event_type: Option<&'a [u8]>,
    /// Header columns, in the configured order: name and value (or NULL).
    pub columns: &'a [(Arc<str>, Option<&'a [u8]>)],
    /// The aggregate type, when extracted (CloudEvents' templates may name it).
    pub aggregate_type: Option<&'a [u8]>,
    /// What the payload is.
    pub payload_kind: PayloadKind,
    /// The writer's trace context, checked ([`TraceContext::check`]).
    pub trace: Option<TraceContext<'a>>,
    /// Fields placed in an envelope around the payload (`outbox.additional_placement`'s
    /// `envelope`): name and value (or NULL). Empty: the value is the payload itself.
    pub envelope: &'a [(Arc<str>, Option<&'a [u8]>)],
    /// The partition the writer chose (`outbox.additional_placement`'s `partition`); `None`:
    /// the key's hash decides.
    pub partition: Option<i32>,
}

/// Where a dead letter's row came from.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A row of this table ([`TABLE_HEADER`]).
    Table(&'a str),
    /// A logical message with this prefix ([`PREFIX_HEADER`]).
    Prefix(&'a str),
}

/// A dead letter's content: the row or record it stands for and why it is one.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    /// The event's key, empty when it has none.
    pub key: &'a [u8],
    /// The row (its JSON or the message's content), or nothing.
    pub value: &'a [u8],
    /// Commit time, ms since the Unix epoch.
    pub commit_ms: i64,
    /// [`ERROR_HEADER`]: why it cannot be an event.
    pub reason: &'a str,
    /// [`LSN_HEADER`]: the row's LSN.
    pub lsn: u64,
    /// [`XID_HEADER`]: its transaction.
    pub xid: u32,
    /// Its table or its message prefix.
    pub origin: Origin<'a>,
}

/// What [`Record::fit`] cut from a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The value's size before, in bytes (what [`TRUNCATED_HEADER`] says).
    pub full: usize,
    /// The bytes kept.
    pub kept: usize,
}

/// A record to send: see the module documentation. librdkafka copies what it keeps.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    /// Destination topic.
    pub topic: &'a str,
    /// Key: decides the partition.
    pub key: &'a [u8],
    /// Value; `None` sends a tombstone.
    pub payload: Option<&'a [u8]>,
    /// Record timestamp (ms since the Unix epoch); the commit time.
    pub timestamp_ms: Option<i64>,
    /// The partition, when not the key's hash's.
    pub partition: Option<i32>,
    inline: [(&'a str, Value<'a>); INLINE_HEADERS],
    len: usize,
    /// Headers past the inline ones, in order.
    more: Vec<(&'a str, Value<'a>)>,
}

impl<'a> Record<'a> {
    /// A record without headers.
    pub fn new(
        topic: &'a str,
        key: &'a [u8],
        payload: Option<&'a [u8]>,
        timestamp_ms: Option<i64>,
    ) -> Self {
        Record {
            topic,
            key,
            payload,
            timestamp_ms,
            partition: None,
            inline: [("", Value::Lent(None)); INLINE_HEADERS],
            len: 0,
            more: Vec::new(),
        }
    }

    /// An outbox event's record.
    pub fn event(topic: &'a str, event: Event<'a>, stamp: Stamp<'a>) -> Self {
        let mut r = Record::new(topic, event.key, event.payload, Some(event.commit_ms));
        r.partition = event.partition;
        r.header(SOURCE_HEADER, Some(stamp.source.as_bytes()));
        if let Some(position) = stamp.position {
            r.text(POSITION_HEADER, Text::position(position));
        }
        r.header(TIMELINE_HEADER, Some(stamp.timeline.as_bytes()));
        r.header_if(ID_HEADER, stamp.id);
        r.header_if(TYPE_HEADER, event.event_type);
        for (name, value) in event.columns {
            r.header(name, *value);
        }
        if let Some(trace) = event.trace {
            r.header(TRACEPARENT_HEADER, Some(trace.traceparent));
            r.header_if(TRACESTATE_HEADER, trace.tracestate);
        }
        r
    }

    /// An outbox event's record in `format`: [`Record::event`]'s, or a CloudEvent with its
    /// attributes rendered into `scratch`. A CloudEvent whose `id`, `source` or `type` would be
    /// empty is refused.
    pub fn shaped(
        topic: &'a str,
        mut event: Event<'a>,
        stamp: Stamp<'a>,
        format: &'a Format,
        scratch: &'a mut Scratch,
    ) -> Result<Self, ShapeError> {
        let Scratch {
            ce: attributes,
            envelope,
        } = scratch;
        if let (false, Some(payload)) = (event.envelope.is_empty(), event.payload) {
            envelope.clear();
            envelope.extend_from_slice(b"{\"payload\":");
            match event.payload_kind {
                PayloadKind::Json => envelope.extend_from_slice(payload),
                PayloadKind::Text => cloudevents::push_json_string(envelope, payload),
                PayloadKind::Binary => cloudevents::push_base64(envelope, payload),
            }
            for (name, value) in event.envelope {
                envelope.push(b',');
                cloudevents::push_json_string(envelope, name.as_bytes());
                envelope.push(b':');
                match value {
                    Some(v) => cloudevents::push_json_string(envelope, v),
                    None => envelope.extend_from_slice(b"null"),
                }
            }
            envelope.push(b'}');
            let envelope: &'a [u8] = envelope;
            event.payload = Some(envelope);
            event.payload_kind = PayloadKind::Json;
        }
        let ce = match format {
            Format::Plain => return Ok(Record::event(topic, event, stamp)),
            Format::CloudEvents(ce) => ce,
        };
        let mut time = Text::default();
        let mut cursor = std::io::Cursor::new(&mut time.buf[..]);
        cloudevents::rfc3339(event.commit_ms, &mut cursor);
        time.len = u8::try_from(cursor.position()).unwrap_or(0);
        let time_str = std::str::from_utf8(time.as_bytes()).unwrap_or_default();
        ce.render(&event, &stamp, time_str, attributes)?;
        let scratch: &'a cloudevents::Attributes = attributes;
        let mut r = Record::event(topic, event, stamp);
        if ce.mode == cloudevents::Mode::Structured && event.payload.is_some() {
            r.payload = Some(&scratch.value);
            r.header(
                CONTENT_TYPE_HEADER,
                Some(cloudevents::STRUCTURED_CONTENT_TYPE.as_bytes()),
            );
            return Ok(r);
        }
        r.header(
            CE_SPECVERSION_HEADER,
            Some(cloudevents::SPEC_VERSION.as_bytes()),
        );
        r.header(CE_ID_HEADER, Some(scratch.id.as_bytes()));
        r.header(CE_SOURCE_HEADER, Some(scratch.source.as_bytes()));
        r.header(CE_TYPE_HEADER, Some(scratch.event_type.as_bytes()));
        r.text(CE_TIME_HEADER, time);
        if !scratch.subject.is_empty() {
            r.header(CE_SUBJECT_HEADER, Some(scratch.subject.as_bytes()));
        }
        if event.payload.is_some() {
            let content_type = ce.content_type(event.payload_kind);
            r.header(CONTENT_TYPE_HEADER, Some(content_type.as_bytes()));
        }
        Ok(r)
    }

    /// A dead letter's record, its value whole (see [`Record::fit`]).
    pub fn dead_letter(topic: &'a str, dead: DeadLetter<'a>, stamp: Stamp<'a>) -> Self {
        let mut r = Record::new(topic, dead.key, Some(dead.value), Some(dead.commit_ms));
        r.header(ERROR_HEADER, Some(dead.reason.as_bytes()));
        let lsn = dead.lsn;
        r.text(
            LSN_HEADER,
            Text::of(format_args!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)),
        );
        r.text(XID_HEADER, Text::of(format_args!("{}", dead.xid)));
        match dead.origin {
            Origin::Table(table) => r.header(TABLE_HEADER, Some(table.as_bytes())),
            Origin::Prefix(prefix) => r.header(PREFIX_HEADER, Some(prefix.as_bytes())),
        }
        r.header(SOURCE_HEADER, Some(stamp.source.as_bytes()));
        r.header(TIMELINE_HEADER, Some(stamp.timeline.as_bytes()));
        if let Some(position) = stamp.position {
            r.text(POSITION_HEADER, Text::position(position));
        }
        r.header_if(ID_HEADER, stamp.id);
        r
    }

    /// Cuts the value to what a producer accepting `max_bytes` (`message.max.bytes`) takes
    /// besides the key, the headers and [`RECORD_OVERHEAD`], and says the original size in
    /// [`TRUNCATED_HEADER`]. `None` when it fits whole (then nothing changes).
    pub fn fit(&mut self, max_bytes: usize) -> Option<Cut> {
        let value = self.payload.unwrap_or_default();
        let full = Text::of(format_args!("{}", value.len()));
        let framing: usize = self.key.len()
            + RECORD_OVERHEAD
            + TRUNCATED_HEADER.len()
            + full.as_bytes().len()
            + self
                .headers()
                .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len))
                .sum::<usize>();
        let room = max_bytes.saturating_sub(framing);
        if value.len() <= room {
            return None;
        }
        self.payload = Some(&value[..room]);
        self.text(TRUNCATED_HEADER, full);
        Some(Cut {
            full: value.len(),
            kept: room,
        })
    }

    /// Adds a header; `None` is a null value.
    pub fn header(&mut self, name: &'a str, value: Option<&'a [u8]>) {
        self.push(name, Value::Lent(value));
    }

    /// Adds a header only when it has a value.
    fn header_if(&mut self, name: &'a str, value: Option<&'a [u8]>) {
        if value.is_some() {
            self.header(name, value);
        }
    }

    fn text(&mut self, name: &'a str, text: Text) {
        self.push(name, Value::Text(text));
    }

    fn push(&mut self, name: &'a str, value: Value<'a>) {
        if self.len < INLINE_HEADERS {
            self.inline[self.len] = (name, value);
            self.len += 1;
        } else {
            self.more.push((name, value));
        }
    }

    /// The headers, in order: name and value (`None`: null).
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> + '_ {
        self.inline[..self.len]
            .iter()
            .chain(&self.more)
            .map(|(name, value)| {
                let value = match value {
                    Value::Lent(v) => *v,
                    Value::Text(t) => Some(t.as_bytes()),
                };
                (*name, value)
            })
    }

    /// How many headers the record has.
    pub fn header_count(&self) -> usize {
        self.len + self.more.len()
    }
}

#[cfg(test)]
mod tests;
