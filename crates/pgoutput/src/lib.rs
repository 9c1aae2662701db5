//! A zero-copy decoder for PostgreSQL's `pgoutput` logical replication protocol.
//!
//! pgoutput is the output plugin behind PostgreSQL's built-in logical replication. A client
//! that runs `START_REPLICATION ... LOGICAL ... (proto_version 'N', publication_names '...')`
//! receives one pgoutput message per `XLogData` frame; this crate turns those bytes into typed
//! [`Message`]s. It does no I/O: feed it the payload of each `XLogData`.
//!
//! # Layout
//!
//! - [`Decoder`] (this file) — the entry point; tracks whether a streamed transaction block is
//!   open, because that changes the wire format (an `xid` prefix) of the messages inside it.
//! - [`message`] — one struct per message type of protocol versions 1–4.
//! - [`tuple`](mod@tuple) — row data: validated once, then iterated without allocation.
//! - [`Lsn`], [`PgTimestamp`] — WAL positions and PostgreSQL timestamps.
//! - [`DecodeError`] — which message, which field, what was wrong.
//! - `Encoder` (cargo feature `encode`, off by default) — the inverse of [`Decoder`], for tests,
//!   fuzzing and benchmarks; also enables `TupleData::encode` to build rows.
//!
//! # Guarantees
//!
//! - Never panics and never reads past the input: every read is bounds-checked.
//! - No allocation per column: [`TupleData`] is a slice of the input [`Bytes`], and its columns
//!   borrow from it. Names (relation, column, prefix, gid) are owned `String`s; they appear in
//!   rare messages only.
//!
//! ```
//! use bytes::Bytes;
//! use pgoutput::{Column, Decoder, Message};
//!
//! // An Insert into relation 16384 with two text columns.
//! let mut raw = vec![b'I'];
//! raw.extend_from_slice(&16384u32.to_be_bytes());
//! raw.push(b'N');
//! raw.extend_from_slice(&2u16.to_be_bytes());
//! for v in [&b"42"[..], b"hello"] {
//!     raw.push(b't');
//!     raw.extend_from_slice(&(v.len() as i32).to_be_bytes());
//!     raw.extend_from_slice(v);
//! }
//! let mut decoder = Decoder::new(1);
//! let Message::Insert(insert) = decoder.decode(Bytes::from(raw)).unwrap() else { panic!() };
//! assert_eq!(insert.relation_id, 16384);
//! let cols: Vec<_> = insert.tuple.iter().collect();
//! assert_eq!(cols, [Column::Text(b"42"), Column::Text(b"hello")]);
//! ```

#[cfg(any(test, feature = "encode"))]
mod encode;
mod error;
mod lsn;
pub mod message;
mod reader;
mod time;
pub mod tuple;

use bytes::Bytes;

#[cfg(any(test, feature = "encode"))]
pub use encode::{EncodeError, Encoder};
pub use error::{DecodeError, ErrorKind, message_type_name};
pub use lsn::{Lsn, ParseLsnError};
pub use message::*;
pub use time::{PG_EPOCH_OFFSET_SECS, PgTimestamp};
pub use tuple::{Column, Columns, TupleData};

use reader::Reader;

/// Decodes a sequence of pgoutput messages from one replication stream.
///
/// The decoder is stateful only in one respect: between Stream Start and Stream Stop, row and
/// relation messages carry a transaction id prefix. Use one decoder per stream, in order.
///
/// Protocol versions differ only in which messages the server sends (v2 adds streaming, v3
/// two-phase, v4 parallel streaming); the version matters to decoding for Stream Abort, whose
/// abort LSN and time exist from v4 on (and then only with `streaming 'parallel'`).
///
/// ```
/// use bytes::Bytes;
/// use pgoutput::{Decoder, Message};
///
/// let mut decoder = Decoder::new(2);
/// // Stream Start for transaction 7 (first block): later row messages carry an xid.
/// let start = decoder.decode(Bytes::from_static(b"S\0\0\0\x07\x01")).unwrap();
/// assert!(matches!(start, Message::StreamStart(s) if s.xid == 7 && s.first_segment == 1));
/// assert!(decoder.in_stream());
///
/// // Insert inside the stream: xid 7, relation 16384, a tuple with one NULL column.
/// let raw = Bytes::from_static(b"I\0\0\0\x07\0\0\x40\0N\0\x01n");
/// let Message::Insert(insert) = decoder.decode(raw).unwrap() else { panic!() };
/// assert_eq!((insert.xid, insert.relation_id, insert.tuple.len()), (Some(7), 16384, 1));
///
/// decoder.decode(Bytes::from_static(b"E")).unwrap(); // Stream Stop
/// assert!(!decoder.in_stream());
///
/// // Errors name the message and field, and leave the state alone.
/// let err = decoder.decode(Bytes::from_static(b"E")).unwrap_err();
/// assert_eq!(err.to_string(),
///     "malformed pgoutput Stream Stop message ('E'), field type: message not valid in this position");
/// ```
#[derive(Debug, Clone)]
pub struct Decoder {
    protocol_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// A decoder for the `proto_version` given to `START_REPLICATION` (1–4).
    pub fn new(protocol_version: u32) -> Self {
        Self {
            protocol_version,
            in_stream: false,
        }
    }

    /// True between Stream Start and Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Decodes one message (the payload of one `XLogData` frame).
    ///
    /// Row data ([`TupleData`]) and logical message contents are zero-copy slices of `data`;
    /// the message must be exactly one pgoutput message (trailing bytes are an error). On error
    /// the decoder's stream state is unchanged.
    pub fn decode(&mut self, data: Bytes) -> Result<Message, DecodeError> {
        let Some(&tag) = data.first() else {
            return Err(DecodeError::new(
                0,
                "type",
                ErrorKind::UnexpectedEnd {
                    needed: 1,
                    available: 0,
                },
            ));
        };
        // The reader walks `data` itself (from offset 1), so zero-copy fields are slices of
        // `data` at the reader's offsets: no intermediate `Bytes` (and refcount) per message.
        let mut r = Reader::new(&data, 1, tag);
        let msg = self.decode_body(tag, &mut r, &data)?;
        r.finish()?;
        match msg {
            Message::StreamStart(_) => self.in_stream = true,
            Message::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }

    fn stream_xid(&self, r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            r.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    }

    fn decode_body(
        &self,
        tag: u8,
        r: &mut Reader<'_>,
        body: &Bytes,
    ) -> Result<Message, DecodeError> {
        let lsn = |r: &mut Reader<'_>, f| r.u64(f).map(Lsn);
        let ts = |r: &mut Reader<'_>, f| r.i64(f).map(PgTimestamp);
        // Stream control messages are only valid in the right state; rejecting them otherwise
        // keeps a corrupted stream from silently changing how later messages are parsed.
        let outside_stream = |field| {
            if self.in_stream {
                Err(r_err(tag, field, ErrorKind::UnexpectedMessage))
            } else {
                Ok(())
            }
        };
        Ok(match tag {
            b'B' => Message::Begin(Begin {
                final_lsn: lsn(r, "final_lsn")?,
                commit_time: ts(r, "commit_time")?,
                xid: r.u32("xid")?,
            }),
            b'C' => Message::Commit(Commit {
                flags: r.u8("flags")?,
                commit_lsn: lsn(r, "commit_lsn")?,
                end_lsn: lsn(r, "end_lsn")?,
                commit_time: ts(r, "commit_time")?,
            }),
            b'O' => Message::Origin(Origin {
                commit_lsn: lsn(r, "commit_lsn")?,
                name: r.cstr("name")?,
            }),
            b'R' => {
                let xid = self.stream_xid(r)?;
                let id = r.u32("relation_id")?;
                let namespace = r.cstr("namespace")?;
                let name = r.cstr("name")?;
                let replica_identity = r.u8("replica_identity")?;
                let n = r.u16("ncolumns")?;
                // Each column needs at least 10 bytes; bounding the reservation by what the
                // message can hold keeps a hostile count from allocating gigabytes.
                let mut columns = Vec::with_capacity(usize::from(n).min(r.remaining() / 10));
                for _ in 0..n {
                    columns.push(RelationColumn {
                        flags: r.u8("column.flags")?,
                        name: r.cstr("column.name")?,
                        type_oid: r.u32("column.type_oid")?,
                        type_modifier: r.i32("column.type_modifier")?,
                    });
                }
                Message::Relation(Relation {
                    xid,
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }
            b'Y' => Message::Type(Type {
                xid: self.stream_xid(r)?,
                id: r.u32("type_oid")?,
                namespace: r.cstr("namespace")?,
                name: r.cstr("name")?,
            }),
            b'I' => {
                let xid = self.stream_xid(r)?;
                let relation_id = r.u32("relation_id")?;
                match r.u8("tuple_kind")? {
                    b'N' => {}
                    other => return Err(r.err("tuple_kind", ErrorKind::UnexpectedTag(other))),
                }
                Message::Insert(Insert {
                    xid,
                    relation_id,
                    tuple: TupleData::decode(r, body)?,
                })
            }
            b'U' => {
                let xid = self.stream_xid(r)?;
                let relation_id = r.u32("relation_id")?;
                let (old, new_kind) = match r.u8("tuple_kind")? {
                    b'K' => (
                        Some(OldTuple::Key(TupleData::decode(r, body)?)),
                        r.u8("new_tuple_kind")?,
                    ),
                    b'O' => (
                        Some(OldTuple::Full(TupleData::decode(r, body)?)),
                        r.u8("new_tuple_kind")?,
                    ),
                    b'N' => (None, b'N'),
                    other => return Err(r.err("tuple_kind", ErrorKind::UnexpectedTag(other))),
                };
                if new_kind != b'N' {
                    return Err(r.err("new_tuple_kind", ErrorKind::UnexpectedTag(new_kind)));
                }
                Message::Update(Update {
                    xid,
                    relation_id,
                    old,
                    new: TupleData::decode(r, body)?,
                })
            }
            b'D' => {
                let xid = self.stream_xid(r)?;
                let relation_id = r.u32("relation_id")?;
                let old = match r.u8("tuple_kind")? {
                    b'K' => OldTuple::Key(TupleData::decode(r, body)?),
                    b'O' => OldTuple::Full(TupleData::decode(r, body)?),
                    other => return Err(r.err("tuple_kind", ErrorKind::UnexpectedTag(other))),
                };
                Message::Delete(Delete {
                    xid,
                    relation_id,
                    old,
                })
            }
            b'T' => {
                let xid = self.stream_xid(r)?;
                let n = r.u32("nrelations")?;
                let options = r.u8("options")?;
                let count = usize::try_from(n).unwrap_or(usize::MAX);
                let mut relation_ids = Vec::with_capacity(count.min(r.remaining() / 4));
                for _ in 0..n {
                    relation_ids.push(r.u32("relation_id")?);
                }
                Message::Truncate(Truncate {
                    xid,
                    options,
                    relation_ids,
                })
            }
            b'M' => {
                let xid = self.stream_xid(r)?;
                let flags = r.u8("flags")?;
                let lsn = lsn(r, "lsn")?;
                let prefix = r.cstr("prefix")?;
                let len = r.u32("content_length")?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let content = r.bytes(body, len, "content")?;
                Message::Message(LogicalMessage {
                    xid,
                    flags,
                    lsn,
                    prefix,
                    content,
                })
            }
            b'S' => {
                outside_stream("xid")?;
                Message::StreamStart(StreamStart {
                    xid: r.u32("xid")?,
                    first_segment: r.u8("first_segment")?,
                })
            }
            b'E' => {
                if !self.in_stream {
                    return Err(r.err("type", ErrorKind::UnexpectedMessage));
                }
                Message::StreamStop
            }
            b'c' => {
                outside_stream("xid")?;
                Message::StreamCommit(StreamCommit {
                    xid: r.u32("xid")?,
                    flags: r.u8("flags")?,
                    commit_lsn: lsn(r, "commit_lsn")?,
                    end_lsn: lsn(r, "end_lsn")?,
                    commit_time: ts(r, "commit_time")?,
                })
            }
            b'A' => {
                outside_stream("xid")?;
                let xid = r.u32("xid")?;
                let subxid = r.u32("subxid")?;
                // Protocol v4 appends the abort LSN and time, but only when the subscriber asked
                // for `streaming 'parallel'`; with `streaming 'on'` a v4 Stream Abort has the
                // v2 form. The message length is the only way to tell them apart.
                let abort = if self.protocol_version >= 4 && r.remaining() > 0 {
                    Some((lsn(r, "abort_lsn")?, ts(r, "abort_time")?))
                } else {
                    None
                };
                Message::StreamAbort(StreamAbort { xid, subxid, abort })
            }
            b'b' => Message::BeginPrepare(BeginPrepare {
                prepare_lsn: lsn(r, "prepare_lsn")?,
                end_lsn: lsn(r, "end_lsn")?,
                prepare_time: ts(r, "prepare_time")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?,
            }),
            b'P' | b'p' => {
                if tag == b'p' {
                    outside_stream("flags")?;
                }
                let p = Prepare {
                    flags: r.u8("flags")?,
                    prepare_lsn: lsn(r, "prepare_lsn")?,
                    end_lsn: lsn(r, "end_lsn")?,
                    prepare_time: ts(r, "prepare_time")?,
                    xid: r.u32("xid")?,
                    gid: r.cstr("gid")?,
                };
                if tag == b'P' {
                    Message::Prepare(p)
                } else {
                    Message::StreamPrepare(p)
                }
            }
            b'K' => Message::CommitPrepared(CommitPrepared {
                flags: r.u8("flags")?,
                commit_lsn: lsn(r, "commit_lsn")?,
                end_lsn: lsn(r, "end_lsn")?,
                commit_time: ts(r, "commit_time")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?,
            }),
            b'r' => Message::RollbackPrepared(RollbackPrepared {
                flags: r.u8("flags")?,
                prepare_end_lsn: lsn(r, "prepare_end_lsn")?,
                rollback_end_lsn: lsn(r, "rollback_end_lsn")?,
                prepare_time: ts(r, "prepare_time")?,
                rollback_time: ts(r, "rollback_time")?,
                xid: r.u32("xid")?,
                gid: r.cstr("gid")?,
            }),
            other => return Err(r.err("type", ErrorKind::UnknownMessageType(other))),
        })
    }
}

fn r_err(tag: u8, field: &'static str, kind: ErrorKind) -> DecodeError {
    DecodeError::new(tag, field, kind)
}

#[cfg(test)]
mod tests;
