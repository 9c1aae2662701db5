//! CloudEvents 1.0 per the Kafka protocol binding: an event's attributes from its outbox fields.
//!
//! ```text
//!  binary      value = the payload as stored     headers += ce_specversion ce_id ce_source ce_type
//!                                                           ce_time [ce_subject] content-type
//!  structured  value = {"specversion":"1.0","id":…,"source":…,"type":…,"time":…,["subject":…,]
//!                       "datacontenttype":…,"data":… | "data_base64":…}
//!                                                headers += content-type: application/cloudevents+json
//!  tombstone   no value, in both modes           headers += the binary mode's, without content-type
//! ```
//!
//! `id`, `source`, `type` and `subject` are [`Template`]s over the outbox fields; `time` is the
//! commit time. `data` is the payload: a json/jsonb payload (and a logical message's, which is
//! JSON text) as JSON, a text payload as a JSON string (as JSON when `datacontenttype` is
//! overridden with a JSON media type and the text parses), a bytea payload as `data_base64`.
//!
//! Invariant: every non-tombstone record is a valid CloudEvent: `id`, `source` and `type` are
//! never empty (a row that would leave one empty is refused with a [`ShapeError`]), and a
//! structured value is one JSON object. The walship headers stay as they are in either mode, so
//! resuming and deduplication read CloudEvents records like any other.

use std::fmt::Write as _;

use base64::Engine as _;

use super::{Event, PayloadKind, Stamp};

/// `ce_specversion`.
pub const SPEC_VERSION: &str = "1.0";
/// Structured mode's `content-type` header (Kafka protocol binding 3.3.1).
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// Which content mode (Kafka protocol binding 1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The payload is the value; attributes are `ce_` headers.
    Binary,
    /// The value is the event in CloudEvents' JSON format.
    Structured,
}

/// An outbox field a [`Template`] can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `{id}`: the event id column.
    Id,
    /// `{type}`: the event type column.
    Type,
    /// `{aggregatetype}`: the aggregate type column.
    AggregateType,
    /// `{aggregateid}`: the aggregate id (the key).
    AggregateId,
    /// `{position}`: `walship.position`.
    Position,
    /// `{source}`: `walship.source`.
    Source,
}

impl Field {
    const ALL: [(&'static str, Field); 6] = [
        ("id", Field::Id),
        ("type", Field::Type),
        ("aggregatetype", Field::AggregateType),
        ("aggregateid", Field::AggregateId),
        ("position", Field::Position),
        ("source", Field::Source),
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field),
}

/// An attribute's template: text with `{field}` placeholders (see [`Field`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses `text`; the error names the placeholder that is not a field.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("{text:?} has a '{{' without '}}'"));
            };
            let name = &rest[open + 1..open + close];
            let field = Field::ALL
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    format!(
                        "{text:?} names {{{name}}}, which is not one of {{id}}, {{type}}, \
                         {{aggregatetype}}, {{aggregateid}}, {{position}}, {{source}}"
                    )
                })?;
            parts.push(Part::Field(field));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template {
            text: text.to_owned(),
            parts,
        })
    }

    /// True when the template names `field`.
    pub fn uses(&self, field: Field) -> bool {
        self.parts.contains(&Part::Field(field))
    }

    /// True for `""`: the attribute is left out (only `subject` may be).
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn render(&self, event: &Event<'_>, stamp: &Stamp<'_>, out: &mut String) {
        out.clear();
        for part in &self.parts {
            let bytes = match part {
                Part::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Part::Field(Field::Position) => {
                    if let Some(p) = stamp.position {
                        let _ = write!(out, "{p}");
                    }
                    continue;
                }
                Part::Field(Field::Source) => Some(stamp.source.as_bytes()),
                Part::Field(Field::Id) => stamp.id,
                Part::Field(Field::Type) => event.event_type,
                Part::Field(Field::AggregateType) => event.aggregate_type,
                Part::Field(Field::AggregateId) => Some(event.key),
            };
            out.push_str(&String::from_utf8_lossy(bytes.unwrap_or_default()));
        }
    }
}

/// How events become CloudEvents: the mode and where each attribute comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvents {
    /// Binary or structured.
    pub mode: Mode,
    /// `id` (default `{id}`).
    pub id: Template,
    /// `source` (default `/outbox/{aggregatetype}`).
    pub source: Template,
    /// `type` (default `{type}`).
    pub event_type: Template,
    /// `subject` (default `{aggregateid}`); empty: no subject.
    pub subject: Template,
    /// `datacontenttype` for every event; `None`: from the payload's kind (see
    /// [`CloudEvents::content_type`]).
    pub data_content_type: Option<String>,
}

impl CloudEvents {
    /// The defaults in `mode`: `id` = `{id}`, `source` = `/outbox/{aggregatetype}`, `type` =
    /// `{type}`, `subject` = `{aggregateid}`, `datacontenttype` by the payload's kind.
    pub fn new(mode: Mode) -> Self {
        let t = |s: &str| Template::parse(s).unwrap_or_else(|_| Template::empty());
        CloudEvents {
            mode,
            id: t("{id}"),
            source: t("/outbox/{aggregatetype}"),
            event_type: t("{type}"),
            subject: t("{aggregateid}"),
            data_content_type: None,
        }
    }

    /// True when any attribute's template names `field`.
    pub fn uses(&self, field: Field) -> bool {
        [&self.id, &self.source, &self.event_type, &self.subject]
            .iter()
            .any(|t| t.uses(field))
    }

    /// `datacontenttype`: the configured one, else `application/json` for JSON payloads,
    /// `text/plain; charset=utf-8` for text and `application/octet-stream` for bytes.
    pub fn content_type(&self, kind: PayloadKind) -> &str {
        self.data_content_type.as_deref().unwrap_or(match kind {
            PayloadKind::Json => "application/json",
            PayloadKind::Text => "text/plain; charset=utf-8",
            PayloadKind::Binary => "application/octet-stream",
        })
    }

    /// Renders the attributes into `scratch` (and, in structured mode, the value), or says
    /// which required attribute would be empty.
    pub(super) fn render(
        &self,
        event: &Event<'_>,
        stamp: &Stamp<'_>,
        time: &str,
        scratch: &mut Attributes,
    ) -> Result<(), ShapeError> {
        for (name, template, out) in [
            ("id", &self.id, &mut scratch.id),
            ("source", &self.source, &mut scratch.source),
            ("type", &self.event_type, &mut scratch.event_type),
        ] {
            template.render(event, stamp, out);
            if out.is_empty() {
                return Err(ShapeError {
                    attribute: name,
                    template: template.text.clone(),
                });
            }
        }
        self.subject.render(event, stamp, &mut scratch.subject);
        scratch.value.clear();
        if let (Mode::Structured, Some(payload)) = (self.mode, event.payload) {
            self.structured(event.payload_kind, payload, time, scratch);
        }
        Ok(())
    }

    fn structured(&self, kind: PayloadKind, payload: &[u8], time: &str, scratch: &mut Attributes) {
        let out = &mut scratch.value;
        out.reserve(payload.len() + 256);
        out.extend_from_slice(b"{\"specversion\":\"1.0\",\"id\":");
        push_json_string(out, scratch.id.as_bytes());
        out.extend_from_slice(b",\"source\":");
        push_json_string(out, scratch.source.as_bytes());
        out.extend_from_slice(b",\"type\":");
        push_json_string(out, scratch.event_type.as_bytes());
        out.extend_from_slice(b",\"time\":");
        push_json_string(out, time.as_bytes());
        if !scratch.subject.is_empty() {
            out.extend_from_slice(b",\"subject\":");
            push_json_string(out, scratch.subject.as_bytes());
        }
        let content_type = self.content_type(kind);
        out.extend_from_slice(b",\"datacontenttype\":");
        push_json_string(out, content_type.as_bytes());
        let as_json = match kind {
            PayloadKind::Json => true,
            PayloadKind::Text => {
                is_json_media_type(content_type)
                    && serde_json::from_slice::<&serde_json::value::RawValue>(payload).is_ok()
            }
            PayloadKind::Binary => false,
        };
        if as_json {
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(payload);
        } else if kind == PayloadKind::Binary {
            out.extend_from_slice(b",\"data_base64\":");
            push_base64(out, payload);
        } else {
            out.extend_from_slice(b",\"data\":");
            push_json_string(out, payload);
        }
        out.push(b'}');
    }
}

impl Template {
    fn empty() -> Template {
        Template {
            text: String::new(),
            parts: Vec::new(),
        }
    }
}

/// Appends `bytes` as a JSON string of their base64.
pub(super) fn push_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut text);
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// `application/json`, `text/json` or any `+json` type (parameters aside).
fn is_json_media_type(media_type: &str) -> bool {
    let essence = media_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// Appends `bytes` (lossy UTF-8) as a JSON string: runs that need no escape are copied whole
/// (bytes of multi-byte characters are all 0x80 or more, so scanning bytes is safe).
pub(super) fn push_json_string(out: &mut Vec<u8>, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let b = text.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let escape: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&b[start..i]);
                let _ = std::io::Write::write_fmt(out, format_args!("\\u{c:04x}"));
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

/// What a shaped record holds besides what it borrows from the row: a CloudEvent's rendered
/// attributes and structured value, an envelope. One per record; reuse it to keep its
/// allocations.
#[derive(Debug, Default)]
pub struct Scratch {
    pub(super) ce: Attributes,
    pub(super) envelope: Vec<u8>,
}

/// A CloudEvent's rendered attributes and, in structured mode, its value.
#[derive(Debug, Default)]
pub struct Attributes {
    pub(super) id: String,
    pub(super) source: String,
    pub(super) event_type: String,
    pub(super) subject: String,
    pub(super) value: Vec<u8>,
}

/// A required CloudEvents attribute would be empty for this row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "its CloudEvents attribute {attribute} (outbox.cloudevents_{attribute} = {template:?}) would \
     be empty, and CloudEvents requires it"
)]
pub struct ShapeError {
    /// `id`, `source` or `type`.
    pub attribute: &'static str,
    /// Its template.
    pub template: String,
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of `ms` since the Unix epoch (proleptic Gregorian, UTC).
pub(super) fn rfc3339(ms: i64, out: &mut impl std::io::Write) {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    );
}
