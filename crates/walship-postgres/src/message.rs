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

use crate::outbox::{OutboxRow, OutboxSpec};

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
mod tests {
    use super::*;
    use crate::ident::TableName;

    fn spec() -> OutboxSpec {
        let mut spec = OutboxSpec::debezium(TableName::parse("outbox"));
        spec.header_columns = vec!["tenant".into(), "trace".into()];
        spec
    }

    fn parse(content: &str) -> Result<MessageEvent, MessageError> {
        MessageEvent::parse(&spec(), content.as_bytes())
    }

    #[test]
    fn the_row_contract_fields_become_the_row() {
        let event = parse(
            r#"{"id":"u1","aggregatetype":"order","aggregateid":"42","type":"OrderUpdated",
                "payload":{"total": 10, "big": 123456789012345678901234567890},
                "tenant":"acme","trace":{"a":1},"other":true}"#,
        )
        .unwrap();
        let row = event.row();
        assert_eq!(row.id, Some(&b"u1"[..]));
        assert_eq!(row.aggregate_type, Some(&b"order"[..]));
        assert_eq!(row.aggregate_id, b"42");
        assert_eq!(row.event_type, Some(&b"OrderUpdated"[..]));
        assert_eq!(
            row.payload.as_deref(),
            Some(&br#"{"total": 10, "big": 123456789012345678901234567890}"#[..]),
            "the payload's JSON text as written: no reordering, no precision lost"
        );
        assert_eq!(
            row.headers,
            vec![
                (Arc::from("tenant"), Some(&b"acme"[..])),
                (Arc::from("trace"), Some(&br#"{"a":1}"#[..]))
            ]
        );
    }

    #[test]
    fn strings_are_unescaped_and_integers_taken_as_their_digits() {
        let event =
            parse(r#"{"id":"u\u0031","aggregatetype":"ord\"er","aggregateid":-42,"type":"t"}"#)
                .unwrap();
        let row = event.row();
        assert_eq!(row.id, Some(&b"u1"[..]));
        assert_eq!(row.aggregate_type, Some(&b"ord\"er"[..]));
        assert_eq!(row.aggregate_id, b"-42");
    }

    #[test]
    fn null_or_missing_payload_is_a_tombstone_and_missing_optionals_are_absent() {
        for content in [
            r#"{"id":"u1","aggregatetype":"order","aggregateid":"42","payload":null}"#,
            r#"{"id":"u1","aggregatetype":"order","aggregateid":"42"}"#,
        ] {
            let event = parse(content).unwrap();
            let row = event.row();
            assert_eq!(row.payload, None, "{content}");
            assert_eq!(row.event_type, None, "{content}");
            assert_eq!(
                row.headers,
                vec![(Arc::from("tenant"), None), (Arc::from("trace"), None)]
            );
        }
        let event =
            parse(r#"{"id":"u1","aggregatetype":"o","aggregateid":"1","payload":"s"}"#).unwrap();
        assert_eq!(
            event.row().payload.as_deref(),
            Some(&b"\"s\""[..]),
            "a string payload is sent as its JSON text"
        );
    }

    #[test]
    fn configured_names_are_the_field_names() {
        let mut spec = spec();
        spec.aggregate_id = "key".into();
        spec.payload = "body".into();
        spec.id = String::new();
        spec.aggregate_type = String::new();
        let event =
            MessageEvent::parse(&spec, br#"{"key":"k","body":[1],"aggregateid":"x"}"#).unwrap();
        let row = event.row();
        assert_eq!(row.aggregate_id, b"k");
        assert_eq!(row.payload.as_deref(), Some(&b"[1]"[..]));
        assert_eq!(
            row.id, None,
            "no id column configured: no id, none required"
        );
        assert_eq!(row.aggregate_type, None);
    }

    #[test]
    fn malformed_content_names_what_was_wrong() {
        let err = |content: &str| parse(content).unwrap_err().to_string();
        let e = err("not json");
        assert!(e.contains("not JSON"), "{e}");
        let e = err(r#"{"aggregateid": "1""#);
        assert!(e.contains("not JSON"), "{e}");
        let e = err(r#"["aggregateid"]"#);
        assert!(e.contains("a JSON array, not an object"), "{e}");
        let e = err(r#""text""#);
        assert!(e.contains("a JSON string, not an object"), "{e}");
        let e = err(r#"{"id":"u1","aggregatetype":"order","aggregateid":null}"#);
        assert!(
            e.contains("\"aggregateid\"")
                && e.contains("outbox.aggregate_id_column")
                && e.contains("missing or null"),
            "{e}"
        );
        let e = err(r#"{"id":"u1","aggregateid":"1"}"#);
        assert!(
            e.contains("\"aggregatetype\"") && e.contains("outbox.aggregate_type_column"),
            "{e}"
        );
        let e = err(r#"{"aggregatetype":"o","aggregateid":"1"}"#);
        assert!(
            e.contains("\"id\"") && e.contains("outbox.id_column"),
            "{e}"
        );
        let e = err(r#"{"id":"u1","aggregatetype":"o","aggregateid":4.5}"#);
        assert!(
            e.contains("\"aggregateid\"") && e.contains("fraction or exponent"),
            "{e}"
        );
        let e = err(r#"{"id":"u1","aggregatetype":{"a":1},"aggregateid":"1"}"#);
        assert!(e.contains("\"aggregatetype\" is a JSON object"), "{e}");
        let e = err(r#"{"id":true,"aggregatetype":"o","aggregateid":"1"}"#);
        assert!(e.contains("\"id\" is a JSON boolean"), "{e}");
        let e = err(r#"{"id":"u1","aggregatetype":"o","aggregateid":"1","type":1e3}"#);
        assert!(e.contains("\"type\""), "{e}");
    }

    #[test]
    fn the_last_of_duplicated_fields_counts_as_in_jsonb() {
        let event = parse(r#"{"id":"u1","aggregatetype":"o","aggregateid":"1","aggregateid":"2"}"#)
            .unwrap();
        assert_eq!(event.row().aggregate_id, b"2");
    }
}
