//! What a record says about itself: which event of which source it is.
//!
//! walship's records carry `walship.source` and `walship.position` (the format is
//! `walship_kafka::headers`); records of other producers carry at most an event id. Reading the
//! headers is pure and never guesses: a walship header that is present but unreadable, or one
//! of the pair without the other, is an error naming the record, never a record treated as
//! foreign (that would apply a duplicate silently).

use rdkafka::message::{Headers, Message};
use walship_kafka::{POSITION_HEADER, Position, SOURCE_HEADER};

use crate::error::{Error, RecordRef};

/// What identifies a record for the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity<'a> {
    /// A walship record: the event at `position` in the stream of `source`.
    Walship {
        /// `walship.source`: names one stream of positions (PostgreSQL system, slot, …).
        source: &'a str,
        /// `walship.position`, parsed.
        position: Position,
        /// `walship.position` as written: its part before `:` is the commit LSN in
        /// PostgreSQL's `pg_lsn` text form, which is how the mark table stores it.
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
    let text = |header: &'static str, value: Option<&'m [u8]>| match value {
        Some(v) => std::str::from_utf8(v).map_err(|_| Error::MalformedHeader {
            record: record(),
            header,
            value: String::from_utf8_lossy(v).into_owned(),
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
            let source = text(SOURCE_HEADER, source)?;
            if source.is_empty() {
                return Err(Error::MalformedHeader {
                    record: record(),
                    header: SOURCE_HEADER,
                    value: String::new(),
                    expected: "a non-empty source name",
                });
            }
            let position_text = text(POSITION_HEADER, position)?;
            let parsed = Position::parse(position_text.as_bytes()).ok_or_else(|| {
                Error::MalformedHeader {
                    record: record(),
                    header: POSITION_HEADER,
                    value: position_text.to_owned(),
                    expected: "<commit LSN hi>/<commit LSN lo>:<index>, e.g. 16/B374D848:0",
                }
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
        (None, None) => match id {
            Some(value) => {
                let id = text(ID_HEADER_LABEL, value)?;
                if id.is_empty() {
                    return Err(Error::MalformedHeader {
                        record: record(),
                        header: ID_HEADER_LABEL,
                        value: String::new(),
                        expected: "a non-empty event id",
                    });
                }
                Ok(Identity::Id(id))
            }
            None => Ok(Identity::Unidentified),
        },
    }
}

/// How errors name the configured event id header (its name is the caller's).
const ID_HEADER_LABEL: &str = "event id";

impl Identity<'_> {
    /// The commit LSN in `pg_lsn` text form (`16/B374D848`): the position text before `:`.
    pub(crate) fn lsn_text(text: &str) -> &str {
        text.split_once(':').map_or(text, |(lsn, _)| lsn)
    }
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
        assert_eq!(Identity::lsn_text("16/B374D848:3"), "16/B374D848");
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
        for bad in [&b"16/B374D848"[..], b"", b"x/0:0", b"1/0:-1", b"\xff\xfe"] {
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
            Err(Error::MalformedHeader {
                header: SOURCE_HEADER,
                ..
            })
        ));
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
