//! Logical decoding messages as outbox events: the content of a transactional
//! `pg_logical_emit_message(true, prefix, content)` turned into the [`OutboxRow`] a table row
//! of the outbox becomes.
//!
//! ```text
//!  Message msg (prefix in outbox.message_prefixes) ─▶ MessageEvent::parse ─▶ MessageEvent::row ─▶ OutboxRow<'_>
//! ```
//!
//! The content is a JSON object whose field names are the configured column names
//! ([`OutboxSpec`]), so one configuration serves rows and messages:
//!
//! | field (default name) | becomes | accepted values |
//! |---|---|---|
//! | `aggregateid` | the key | a string, or an integer (its digits); required |
//! | `aggregatetype` | the topic | as `aggregateid`; required when the topic template uses it |
//! | `id` | header `id` | as `aggregateid`; required unless `outbox.id_column = ""` (the resume lookup matches it) |
//! | `type` | header `type` | as `aggregateid`; optional |
//! | `payload` | the value: its JSON text as written | any JSON value; `null` or missing = tombstone |
//! | `header_columns` | headers of the same name | a string (its text), another value (its JSON text), `null` or missing (a header without value) |
//! | `timestamp_column` | the record timestamp | an integer (ms since the Unix epoch) or a timestamp string; optional |
//! | `traceparent_column`, `tracestate_column` | W3C trace context headers (checked when the record is built) | a string; anything else is no context |
//!
//! Other fields are ignored. A duplicated field counts with its last value, as in `jsonb`.
//!
//! Invariant: content either becomes an [`OutboxRow`] or a [`MessageError`] naming the field
//! and what was wrong; it is never dropped and never guessed at (a fraction, a boolean or an
//! object where a key is expected is an error, not its JSON text).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::outbox::{OutboxRow, OutboxSpec, PayloadType};

/// Why a logical message with a configured prefix cannot become an event. Carries no position:
/// the caller adds the LSN and the prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// Emitted with `transactional = false`.
    #[error(
        "the message was emitted with transactional = false, so PostgreSQL sends it as soon as it \
         is written, even if its transaction rolls back: it cannot be an outbox event. Emit it \
         with pg_logical_emit_message(true, prefix, content)"
    )]
    NonTransactional,
    /// The content does not parse as JSON.
    #[error("the content is not JSON ({0}); it must be a JSON object with the outbox fields")]
    NotJson(String),
    /// The content is JSON but not an object.
    #[error("the content is a JSON {0}, not an object with the outbox fields")]
    NotObject(&'static str),
    /// A required field is missing or `null`.
    #[error("field {field:?} ({role}) is missing or null but is required")]
    Missing {
        /// The field's name (the configured column name).
        field: String,
        /// The configuration key naming it, and what it does.
        role: &'static str,
    },
    /// The event time field is not a time.
    #[error(
        "field {field:?} (outbox.timestamp_column) is {value:?}, which is neither a timestamp \
         (YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM]]) nor an integer of milliseconds since the Unix epoch"
    )]
    BadTimestamp {
        /// The field's name.
        field: String,
        /// Its value (cut to 64 characters).
        value: String,
    },
    /// A field has a JSON type it cannot have.
    #[error("field {field:?} is a JSON {found}, but must be a string or an integer")]
    WrongType {
        /// The field's name.
        field: String,
        /// The JSON type found (`number with a fraction or exponent`, `boolean`, ...).
        found: &'static str,
    },
}

/// An event decoded from a message's content. Owns its values (JSON strings are unescaped);
/// [`MessageEvent::row`] lends them as the [`OutboxRow`] the produce path takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageEvent {
    id: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: String,
    event_type: Option<String>,
    payload: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    timestamp_ms: Option<i64>,
    headers: Vec<(Arc<str>, Option<String>)>,
}

impl MessageEvent {
    /// Decodes a message's content with the field names of `spec`.
    pub fn parse(spec: &OutboxSpec, content: &[u8]) -> Result<MessageEvent, MessageError> {
        let fields: HashMap<String, &RawValue> = match serde_json::from_slice(content) {
            Ok(fields) => fields,
            Err(e) => {
                return Err(match serde_json::from_slice::<&RawValue>(content) {
                    Ok(v) => MessageError::NotObject(kind(v)),
                    Err(_) => MessageError::NotJson(e.to_string()),
                });
            }
        };
        let text = |field: &str| -> Result<Option<String>, MessageError> {
            if field.is_empty() {
                return Ok(None);
            }
            fields.get(field).map_or(Ok(None), |v| key_text(field, v))
        };
        let required = |field: &str, role: &'static str| -> Result<Option<String>, MessageError> {
            if field.is_empty() {
                return Ok(None);
            }
            text(field)?.map(Some).ok_or_else(|| MessageError::Missing {
                field: field.to_owned(),
                role,
            })
        };
        let aggregate_id = required(
            &spec.aggregate_id,
            "outbox.aggregate_id_column: the Kafka key",
        )?
        .unwrap_or_default();
        let aggregate_type = required(
            &spec.aggregate_type,
            "outbox.aggregate_type_column: routes the topic",
        )?;
        let id = required(
            &spec.id,
            "outbox.id_column: the event id header consumers deduplicate on",
        )?;
        let event_type = text(&spec.event_type)?;
        let payload = fields
            .get(spec.payload.as_str())
            .filter(|v| v.get() != "null")
            .map(|v| v.get().to_owned());
        // A trace context is the writer's hint, never a reason to refuse the event: a value that
        // is not a string is no context (the record builder drops malformed strings).
        let trace = |field: &str| {
            (!field.is_empty())
                .then(|| fields.get(field))
                .flatten()
                .filter(|v| kind(v) == "string")
                .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
        };
        let traceparent = trace(&spec.traceparent);
        let tracestate = trace(&spec.tracestate);
        let timestamp_ms =
            match text(&spec.timestamp)? {
                None => None,
                Some(t) => Some(crate::outbox::timestamp_millis(t.as_bytes()).ok_or_else(
                    || MessageError::BadTimestamp {
                        field: spec.timestamp.clone(),
                        value: t.chars().take(64).collect(),
                    },
                )?),
            };
        let headers = spec
            .header_columns
            .iter()
            .map(|name| {
                let value = fields.get(name.as_str()).and_then(|v| header_text(v));
                (Arc::from(name.as_str()), value)
            })
            .collect();
        Ok(MessageEvent {
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
            traceparent,
            tracestate,
            timestamp_ms,
            headers,
        })
    }

    /// The event as the outbox row the produce path takes.
    pub fn row(&self) -> OutboxRow<'_> {
        OutboxRow {
            id: self.id.as_deref().map(str::as_bytes),
            aggregate_type: self.aggregate_type.as_deref().map(str::as_bytes),
            aggregate_id: self.aggregate_id.as_bytes(),
            event_type: self.event_type.as_deref().map(str::as_bytes),
            payload: self.payload.as_deref().map(|p| Cow::Borrowed(p.as_bytes())),
            payload_type: PayloadType::Json,
            traceparent: self.traceparent.as_deref().map(str::as_bytes),
            tracestate: self.tracestate.as_deref().map(str::as_bytes),
            timestamp_ms: self.timestamp_ms,
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (Arc::clone(k), v.as_deref().map(str::as_bytes)))
                .collect(),
        }
    }
}

/// What kind of JSON value `v` is, for messages.
fn kind(v: &RawValue) -> &'static str {
    match v.get().as_bytes().first() {
        Some(b'"') => "string",
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        _ if is_integer(v.get()) => "integer",
        _ => "number with a fraction or exponent",
    }
}

/// True for a JSON number without fraction or exponent.
fn is_integer(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit())
}

/// A key-like field (id, aggregate type and id, type): a string's text, an integer's digits
/// (so `jsonb_build_object('aggregateid', 42)` keys like a text column holding `42`), `None`
/// for `null`.
fn key_text(field: &str, v: &RawValue) -> Result<Option<String>, MessageError> {
    match kind(v) {
        "null" => Ok(None),
        "string" => serde_json::from_str::<String>(v.get())
            .map(Some)
            .map_err(|e| MessageError::NotJson(e.to_string())),
        "integer" => Ok(Some(v.get().to_owned())),
        found => Err(MessageError::WrongType {
            field: field.to_owned(),
            found,
        }),
    }
}

/// A header field: a string's text, any other value's JSON text (as a `jsonb` column's text
/// form), `None` for `null`.
fn header_text(v: &RawValue) -> Option<String> {
    match kind(v) {
        "null" => None,
        "string" => serde_json::from_str::<String>(v.get()).ok(),
        _ => Some(v.get().to_owned()),
    }
}

#[cfg(test)]
mod tests;
