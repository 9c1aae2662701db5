//! What a record says about itself: which event of which source it is.
//!
//! walship's records carry `walship.source` and `walship.position` (the format is
//! `walship_kafka::headers`); records of other producers carry at most an event id. Reading the
//! headers is pure and never guesses: a walship header that is present but unreadable, or one
//! of the pair without the other, is an error naming the record, never a record treated as
//! foreign (that would apply a duplicate silently).

use std::borrow::Cow;

use rdkafka::message::{Headers, Message};
use walship_kafka::{POSITION_HEADER, Position, SOURCE_HEADER};

use crate::error::{Error, RecordRef, quoted};

/// What identifies a record for the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity<'a> {
    /// A walship record: the event at `position` in the stream of `source`.
    Walship {
        /// `walship.source`: names one stream of positions (PostgreSQL system, slot, …).
        source: &'a str,
        /// `walship.position`, parsed.
        position: Position,
        /// `walship.position` as written (its canonical form: `<hex>/<hex>:<decimal>`, 1–8 hex
        /// digits each side of the `/`). The mark table is given the parsed `position`.
        text: &'a str,
    },
    /// No walship headers, but an event id header.
    Id(&'a str),
    /// Neither walship headers nor an event id header.
    Unidentified,
}

/// Reads a record's identity from its headers; `id_header` names the event id header looked
/// at when the walship headers are absent (`id` for walship's and Debezium's records), `None`:
/// none is.
pub fn identify<'m, M: Message>(
    message: &'m M,
    id_header: Option<&str>,
) -> Result<Identity<'m>, Error> {
    let mut source = None;
    let mut position = None;
    let mut id = None;
    if let Some(headers) = message.headers() {
        for h in headers.iter() {
            // The first of each name counts, as in walship's resume scan.
            let slot = if h.key == SOURCE_HEADER {
                &mut source
            } else if h.key == POSITION_HEADER {
                &mut position
            } else if Some(h.key) == id_header {
                &mut id
            } else {
                continue;
            };
            if slot.is_none() {
                *slot = Some(h.value);
            }
        }
    }
    let record = || RecordRef::of(message);
    let text = |header: Cow<'static, str>, value: Option<&'m [u8]>| match value {
        Some(v) => std::str::from_utf8(v).map_err(|_| Error::MalformedHeader {
            record: record(),
            header,
            value: quoted(v),
            expected: "UTF-8 text",
        }),
        None => Err(Error::MalformedHeader {
            record: record(),
            header,
            value: "(null)".into(),
            expected: "a value",
        }),
    };
    match (source, position) {
        (Some(source), Some(position)) => {
            let source = text(SOURCE_HEADER.into(), source)?;
            if source.is_empty() {
                return Err(Error::MalformedHeader {
                    record: record(),
                    header: SOURCE_HEADER.into(),
                    value: String::new(),
                    expected: "a non-empty source name",
                });
            }
            let position_text = text(POSITION_HEADER.into(), position)?;
            let parsed = canonical(position_text)
                .then(|| Position::parse(position_text.as_bytes()))
                .flatten()
                .ok_or_else(|| Error::MalformedHeader {
                    record: record(),
                    header: POSITION_HEADER.into(),
                    value: quoted(position_text.as_bytes()),
                    expected: "<commit LSN hi>/<commit LSN lo>:<index> (1-8 hex digits each \
                               side of the /, a decimal index), e.g. 16/B374D848:0",
                })?;
            Ok(Identity::Walship {
                source,
                position: parsed,
                text: position_text,
            })
        }
        (Some(_), None) => Err(Error::IncompleteHeaders {
            record: record(),
            present: SOURCE_HEADER,
            missing: POSITION_HEADER,
        }),
        (None, Some(_)) => Err(Error::IncompleteHeaders {
            record: record(),
            present: POSITION_HEADER,
            missing: SOURCE_HEADER,
        }),
        (None, None) => match (id, id_header) {
            (Some(value), Some(name)) => {
                let id = text(Cow::Owned(name.to_owned()), value)?;
                if id.is_empty() {
                    return Err(Error::MalformedHeader {
                        record: record(),
                        header: Cow::Owned(name.to_owned()),
                        value: String::new(),
                        expected: "a non-empty event id",
                    });
                }
                Ok(Identity::Id(id))
            }
            _ => Ok(Identity::Unidentified),
        },
    }
}

/// True when `text` has the shape walship writes: `<hex>/<hex>:<decimal>`, 1–8 hex digits each
/// side of the `/` (what `pg_lsn` reads), ASCII digits only — no sign, no space. A position
/// outside this shape is refused, not read as some other number.
fn canonical(text: &str) -> bool {
    let Some((lsn, index)) = text.split_once(':') else {
        return false;
    };
    let Some((hi, lo)) = lsn.split_once('/') else {
        return false;
    };
    let hex = |s: &str| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
    hex(hi) && hex(lo) && !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    use super::*;

    fn message(headers: &[(&str, Option<&[u8]>)]) -> OwnedMessage {
        let mut owned = OwnedHeaders::new();
        for (key, value) in headers {
            owned = owned.insert(Header { key, value: *value });
        }
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            Some(b"k".to_vec()),
            "orders".into(),
            Timestamp::NotAvailable,
            2,
            41,
            Some(owned),
        )
    }

    #[test]
    fn walship_headers_give_source_and_position() {
        let m = message(&[
            ("id", Some(b"e-1")),
            (SOURCE_HEADER, Some(b"7305/orders/1")),
            (POSITION_HEADER, Some(b"16/B374D848:3")),
            (POSITION_HEADER, Some(b"garbage, ignored: the first counts")),
        ]);
        let identity = identify(&m, Some("id")).unwrap();
        assert_eq!(
            identity,
            Identity::Walship {
                source: "7305/orders/1",
                position: Position {
                    commit_lsn: 0x16_B374_D848,
                    index: 3
                },
                text: "16/B374D848:3",
            }
        );
    }

    #[test]
    fn other_producers_records_are_identified_by_id_or_not_at_all() {
        assert_eq!(
            identify(&message(&[("event-id", Some(b"e-9"))]), Some("event-id")).unwrap(),
            Identity::Id("e-9")
        );
        assert_eq!(
            identify(&message(&[("id", Some(b"e-9"))]), Some("event-id")).unwrap(),
            Identity::Unidentified
        );
        let bare = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 0, None);
        assert_eq!(identify(&bare, None).unwrap(), Identity::Unidentified);
        // Without an id header configured, no header is taken for one (not even a nameless one).
        assert_eq!(
            identify(&message(&[("", Some(b"e-9"))]), None).unwrap(),
            Identity::Unidentified
        );
    }

    #[test]
    fn a_malformed_position_is_an_error_naming_the_record_and_the_header() {
        for bad in [
            &b"16/B374D848"[..],
            b"",
            b"x/0:0",
            b"1/0:-1",
            b"\xff\xfe",
            // Read by a lenient parser as 16/B374D848:0, but not what walship writes, and not
            // what pg_lsn reads: refused here, naming the header, not failing in the database.
            b"+16/B374D848:0",
            b"000000016/B374D848:0",
            b"16/0B374D848:0",
            b"16/B374D848:+0",
            b"16/:0",
            b" 16/B374D848:0",
        ] {
            let m = message(&[(SOURCE_HEADER, Some(b"s")), (POSITION_HEADER, Some(bad))]);
            let err = identify(&m, Some("id")).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::MalformedHeader { .. }), "{text}");
            assert!(
                text.contains("orders") && text.contains("partition 2"),
                "{text}"
            );
            assert!(
                text.contains("offset 41") && text.contains(POSITION_HEADER),
                "{text}"
            );
            assert!(!err.is_transient());
        }
        let null = message(&[(SOURCE_HEADER, Some(b"s")), (POSITION_HEADER, None)]);
        assert!(
            identify(&null, Some("id"))
                .unwrap_err()
                .to_string()
                .contains("(null)")
        );
        let empty_source = message(&[
            (SOURCE_HEADER, Some(b"")),
            (POSITION_HEADER, Some(b"0/1:0")),
        ]);
        assert!(matches!(
            identify(&empty_source, Some("id")),
            Err(Error::MalformedHeader { header, .. }) if header == SOURCE_HEADER
        ));
        // Lower-case hex is what pg_lsn reads too.
        let lower = message(&[
            (SOURCE_HEADER, Some(b"s")),
            (POSITION_HEADER, Some(b"16/b374d848:0")),
        ]);
        assert!(identify(&lower, None).is_ok());
        // A long value is quoted cut short.
        let long = format!("1/0:{}", "9".repeat(500));
        let m = message(&[
            (SOURCE_HEADER, Some(b"s")),
            (POSITION_HEADER, Some(long.as_bytes())),
        ]);
        let text = identify(&m, None).unwrap_err().to_string();
        assert!(
            text.contains(&format!("{}…", "9".repeat(60))) && !text.contains(&"9".repeat(61)),
            "{text}"
        );
    }

    /// An unreadable or empty event id names the configured header.
    #[test]
    fn a_malformed_id_names_the_configured_header() {
        for value in [&b""[..], b"\xff"] {
            let m = message(&[("event-id", Some(value))]);
            let err = identify(&m, Some("event-id")).unwrap_err();
            assert!(
                matches!(&err, Error::MalformedHeader { header, .. } if header == "event-id"),
                "{err}"
            );
            assert!(err.to_string().contains("header event-id"), "{err}");
        }
    }

    #[test]
    fn half_of_the_pair_is_an_error_never_a_foreign_record() {
        let err = identify(
            &message(&[(POSITION_HEADER, Some(b"0/1:0")), ("id", Some(b"e"))]),
            Some("id"),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::IncompleteHeaders {
                    missing: SOURCE_HEADER,
                    ..
                }
            ),
            "{err}"
        );
        let err = identify(&message(&[(SOURCE_HEADER, Some(b"s"))]), None).unwrap_err();
        assert!(err.to_string().contains(POSITION_HEADER), "{err}");
    }
}
