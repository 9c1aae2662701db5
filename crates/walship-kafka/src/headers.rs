//! The record header format: how every record walship produces names its writer, its event
//! and its place in the stream. Producing writes these headers, the resume scan and delivery
//! reports read them back.
//!
//! ```text
//!  walship.source   = <PostgreSQL system identifier>/<slot>
//!  walship.position = <commit LSN hi>/<commit LSN lo>:<index in the transaction>   e.g. 16/B374D848:0
//!  id               = the outbox row's id
//!  walship.timeline = the PostgreSQL timeline whose WAL held the event's commit (absent on
//!                     records of versions before it was written: unknown)
//!  type             = the outbox row's event type
//!  dead letters add walship.error, walship.lsn, walship.xid, walship.table or walship.prefix,
//!  and walship.truncated (the value's original size) when the value was cut
//!  traceparent, tracestate = the writer's W3C trace context, when configured and well formed
//!  ce_*, content-type     = CloudEvents attributes, when outbox.cloudevents is on
//! ```
//!
//! [`crate::record`] puts them on records; here is only what they are called and how a
//! position is written.
//!
//! Invariant: [`Position::parse`] reads back exactly what [`Position::encode`] writes, and
//! positions order like the stream (by commit LSN, then by index), so a consumer or a restart
//! can compare them without knowing PostgreSQL. Changing the format breaks resuming from topics
//! an earlier version wrote: these names and this text are a contract with the topics.

use std::io::Write as _;

/// Header naming the writer: `<PostgreSQL system identifier>/<slot>`.
pub const SOURCE_HEADER: &str = "walship.source";
/// Header naming the event: `<commit LSN>:<index in the transaction>`, e.g. `16/B374D848:0`.
/// Increases strictly, per source, in the order events were committed.
pub const POSITION_HEADER: &str = "walship.position";
/// Header naming the PostgreSQL timeline whose WAL held the event's commit. A position names
/// one event only within one history: after a promotion that branched before what was
/// published, the same position can name another event on the new timeline, and this header
/// tells the two apart. Records of earlier versions lack it (timeline unknown).
pub const TIMELINE_HEADER: &str = "walship.timeline";

/// The timeline a record names in its [`TIMELINE_HEADER`]; `None` when it has none (written by
/// an earlier version) or it does not parse.
pub fn parse_timeline(value: Option<&[u8]>) -> Option<u32> {
    value
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
}

/// Header carrying the outbox row's id (Debezium's name), compared too before skipping.
pub const ID_HEADER: &str = "id";
/// Header carrying the outbox row's event type (Debezium's name).
pub const TYPE_HEADER: &str = "type";

/// Header of a dead letter: why its row or record cannot be an event.
pub const ERROR_HEADER: &str = "walship.error";
/// Header of a dead letter: the row's LSN (a refused record: its transaction's commit LSN).
pub const LSN_HEADER: &str = "walship.lsn";
/// Header of a dead letter: the row's transaction id.
pub const XID_HEADER: &str = "walship.xid";
/// Header of a dead letter for a row: the outbox table.
pub const TABLE_HEADER: &str = "walship.table";
/// Header of a dead letter for a logical message: the message's prefix.
pub const PREFIX_HEADER: &str = "walship.prefix";
/// Header of a dead letter whose value was cut to fit: the original value's size in bytes.
pub const TRUNCATED_HEADER: &str = "walship.truncated";

/// CloudEvents' binary content mode (Kafka protocol binding 3.2.3): every attribute but `data`
/// is a header named `ce_` + the attribute. walship writes these; structured mode writes them
/// on a tombstone only (which has no value to hold them).
pub const CE_SPECVERSION_HEADER: &str = "ce_specversion";
/// CloudEvents `id`.
pub const CE_ID_HEADER: &str = "ce_id";
/// CloudEvents `source`.
pub const CE_SOURCE_HEADER: &str = "ce_source";
/// CloudEvents `type`.
pub const CE_TYPE_HEADER: &str = "ce_type";
/// CloudEvents `time` (RFC 3339, UTC, milliseconds): the commit time.
pub const CE_TIME_HEADER: &str = "ce_time";
/// CloudEvents `subject`.
pub const CE_SUBJECT_HEADER: &str = "ce_subject";
/// The value's media type: CloudEvents `datacontenttype` in binary mode,
/// `application/cloudevents+json; charset=UTF-8` in structured mode.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// Where an event stands in a source's stream: ordered like the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// Commit LSN of the event's transaction (`Begin.final_lsn`).
    pub commit_lsn: u64,
    /// Index of the event among the transaction's outbox rows, from 0.
    pub index: u32,
}

/// Room for the longest [`Position`] text (`FFFFFFFF/FFFFFFFF:4294967295`).
pub type PositionText = [u8; 32];

impl std::fmt::Display for Position {
    /// The header's text: `16/B374D848:0`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut buf = PositionText::default();
        f.write_str(std::str::from_utf8(self.encode(&mut buf)).unwrap_or("?"))
    }
}

impl Position {
    /// Writes the header value into `buf` and returns it.
    pub fn encode(self, buf: &mut PositionText) -> &[u8] {
        let mut cursor = std::io::Cursor::new(&mut buf[..]);
        // Cannot fail: the longest text is 28 bytes.
        let _ = write!(
            cursor,
            "{:X}/{:X}:{}",
            self.commit_lsn >> 32,
            self.commit_lsn & 0xFFFF_FFFF,
            self.index
        );
        let len = usize::try_from(cursor.position()).unwrap_or(0);
        &buf[..len]
    }

    /// Parses a header value written by [`Position::encode`].
    pub fn parse(text: &[u8]) -> Option<Position> {
        let text = std::str::from_utf8(text).ok()?;
        let (lsn, index) = text.split_once(':')?;
        let (hi, lo) = lsn.split_once('/')?;
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some(Position {
            commit_lsn: (u64::from(hi) << 32) | u64::from(lo),
            index: index.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_order_like_the_stream() {
        let mut buf = PositionText::default();
        for (lsn, index, text) in [
            (0x16_B374_D848_u64, 0, "16/B374D848:0"),
            (0x0000_0000_0016_B3F2, 7, "0/16B3F2:7"),
            (u64::MAX, u32::MAX, "FFFFFFFF/FFFFFFFF:4294967295"),
        ] {
            let p = Position {
                commit_lsn: lsn,
                index,
            };
            assert_eq!(p.encode(&mut buf), text.as_bytes());
            assert_eq!(Position::parse(text.as_bytes()), Some(p));
        }
        let a = Position::parse(b"1/0:5").unwrap();
        let b = Position::parse(b"1/1:0").unwrap();
        assert!(a < b);
        for bad in [
            &b""[..],
            b"1/0",
            b"1:0",
            b"x/0:0",
            b"1/0:-1",
            b"1/0:0:0",
            b"\xff",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }
}
