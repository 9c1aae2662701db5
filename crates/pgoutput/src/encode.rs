//! Turning [`Message`]s back into pgoutput bytes (feature `encode`).
//!
//! The encoder exists for tests, property tests, fuzzing oracles and benchmarks: it produces the
//! exact bytes PostgreSQL would send for a message, so `decode(encode(m)) == m` and, for any bytes
//! the decoder accepts, `encode(decode(b)) == b`. It mirrors the [`Decoder`](crate::Decoder)'s
//! state: inside a streamed block (between Stream Start and Stream Stop) row and relation
//! messages carry an `xid` prefix, and Stream Abort's abort LSN/time need protocol v4.
//!
//! It is strict: a message that PostgreSQL could not have sent in the encoder's state (an `xid`
//! outside a stream or missing inside one, Stream Stop outside a stream, a name with a NUL byte,
//! abort information before v4) is an [`EncodeError`], never silently written differently.
//!
//! It owns everything that builds pgoutput bytes, [`TupleData::encode`] included: the decoding
//! modules ([`tuple`](crate::tuple), [`message`](crate::message)) never refer to it, so
//! imports go one way, from here to them.

use std::fmt;

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::message::*;
use crate::time::PgTimestamp;
use crate::tuple::{Column, TupleData};

/// Why a message cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// A streamed-transaction `xid` was `Some` outside a stream or `None` inside one.
    XidMismatch {
        /// The message type byte.
        message_type: u8,
        /// The encoder's stream state.
        in_stream: bool,
    },
    /// A stream control message where the stream state does not allow it (for example Stream
    /// Start inside a stream, or Stream Commit before Stream Stop).
    UnexpectedMessage(u8),
    /// Stream Abort's abort LSN and time exist from protocol version 4 on.
    AbortInfoNeedsV4,
    /// A string field contains a NUL byte, which cannot be sent as a C string.
    NulInString(&'static str),
    /// A count or length does not fit its wire field.
    TooLong(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EncodeError::XidMismatch {
                message_type,
                in_stream: true,
            } => write!(
                f,
                "'{}' message inside a stream needs an xid",
                message_type.escape_ascii()
            ),
            EncodeError::XidMismatch { message_type, .. } => write!(
                f,
                "'{}' message outside a stream cannot have an xid",
                message_type.escape_ascii()
            ),
            EncodeError::UnexpectedMessage(t) => write!(
                f,
                "'{}' message is not valid in this stream state",
                t.escape_ascii()
            ),
            EncodeError::AbortInfoNeedsV4 => {
                write!(f, "Stream Abort LSN and time need protocol version 4")
            }
            EncodeError::NulInString(field) => write!(f, "{field} contains a NUL byte"),
            EncodeError::TooLong(field) => write!(f, "{field} does not fit its wire field"),
        }
    }
}

impl std::error::Error for EncodeError {}

impl TupleData {
    /// Builds a TupleData from column values, byte for byte as pgoutput sends them (feature
    /// `encode`; meant for tests and benchmarks — decoding never builds tuples this way).
    ///
    /// Fails when there are more than 65535 columns or a value is longer than `i32::MAX` bytes.
    ///
    /// ```
    /// use pgoutput::{Column, TupleData};
    /// let t = TupleData::encode(&[Column::Text(b"42"), Column::Null]).unwrap();
    /// assert_eq!(t.len(), 2);
    /// assert_eq!(t.iter().collect::<Vec<_>>(), [Column::Text(b"42"), Column::Null]);
    /// assert_eq!(&t.raw()[..], b"t\0\0\0\x0242n");
    /// ```
    pub fn encode(columns: &[Column<'_>]) -> Result<TupleData, EncodeError> {
        let len =
            u16::try_from(columns.len()).map_err(|_| EncodeError::TooLong("tuple.ncolumns"))?;
        let size = columns
            .iter()
            .map(|c| 1 + c.bytes().map_or(0, |b| 4 + b.len()))
            .sum();
        let mut raw = Vec::with_capacity(size);
        for column in columns {
            let (kind, value) = match *column {
                Column::Null => (b'n', None),
                Column::UnchangedToast => (b'u', None),
                Column::Text(v) => (b't', Some(v)),
                Column::Binary(v) => (b'b', Some(v)),
            };
            raw.push(kind);
            if let Some(v) = value {
                let n = i32::try_from(v.len())
                    .map_err(|_| EncodeError::TooLong("tuple.column_length"))?;
                raw.extend_from_slice(&n.to_be_bytes());
                raw.extend_from_slice(v);
            }
        }
        Ok(TupleData::from_encoded(Bytes::from(raw), len))
    }
}

/// Encodes a sequence of messages of one replication stream, the inverse of
/// [`Decoder`](crate::Decoder).
///
/// ```
/// use pgoutput::{Column, Decoder, EncodeError, Encoder, Insert, Message, StreamStart, TupleData};
///
/// let insert = Message::Insert(Insert {
///     xid: Some(742),
///     relation_id: 16384,
///     tuple: TupleData::encode(&[Column::Text(b"42"), Column::Null]).unwrap(),
/// });
/// let mut encoder = Encoder::new(2);
/// let mut decoder = Decoder::new(2);
/// // Inside a stream, row messages carry the transaction id.
/// let start = Message::StreamStart(StreamStart { xid: 742, first_segment: 1 });
/// for msg in [start, insert.clone(), Message::StreamStop] {
///     let bytes = encoder.encode(&msg).unwrap();
///     assert_eq!(decoder.decode(bytes).unwrap(), msg);
/// }
/// // Outside a stream the same Insert is invalid: it has an xid.
/// assert_eq!(
///     encoder.encode(&insert),
///     Err(EncodeError::XidMismatch { message_type: b'I', in_stream: false })
/// );
/// ```
#[derive(Debug, Clone)]
pub struct Encoder {
    protocol_version: u32,
    in_stream: bool,
}

impl Encoder {
    /// An encoder for protocol version `protocol_version` (1–4), outside any stream.
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

    /// Encodes one message (the payload of one `XLogData` frame).
    pub fn encode(&mut self, msg: &Message) -> Result<Bytes, EncodeError> {
        let mut out = Vec::new();
        self.encode_into(msg, &mut out)?;
        Ok(Bytes::from(out))
    }

    /// Appends one encoded message to `out`. On error `out` and the stream state are unchanged.
    pub fn encode_into(&mut self, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let mut w = Writer { out };
        if let Err(e) = self.write(msg, &mut w) {
            out.truncate(start);
            return Err(e);
        }
        match msg {
            Message::StreamStart(_) => self.in_stream = true,
            Message::StreamStop => self.in_stream = false,
            _ => {}
        }
        Ok(())
    }

    fn xid(&self, w: &mut Writer<'_>, tag: u8, xid: Option<u32>) -> Result<(), EncodeError> {
        match (self.in_stream, xid) {
            (true, Some(x)) => {
                w.u32(x);
                Ok(())
            }
            (false, None) => Ok(()),
            (in_stream, _) => Err(EncodeError::XidMismatch {
                message_type: tag,
                in_stream,
            }),
        }
    }

    fn outside_stream(&self, tag: u8) -> Result<(), EncodeError> {
        if self.in_stream {
            Err(EncodeError::UnexpectedMessage(tag))
        } else {
            Ok(())
        }
    }

    fn write(&self, msg: &Message, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        let tag = msg.message_type();
        w.u8(tag);
        match msg {
            Message::Begin(m) => {
                w.lsn(m.final_lsn);
                w.ts(m.commit_time);
                w.u32(m.xid);
            }
            Message::Commit(m) => {
                w.u8(m.flags);
                w.lsn(m.commit_lsn);
                w.lsn(m.end_lsn);
                w.ts(m.commit_time);
            }
            Message::Origin(m) => {
                w.lsn(m.commit_lsn);
                w.cstr(&m.name, "name")?;
            }
            Message::Relation(m) => {
                self.xid(w, tag, m.xid)?;
                w.u32(m.id);
                w.cstr(&m.namespace, "namespace")?;
                w.cstr(&m.name, "name")?;
                w.u8(m.replica_identity);
                let n =
                    u16::try_from(m.columns.len()).map_err(|_| EncodeError::TooLong("ncolumns"))?;
                w.u16(n);
                for c in &m.columns {
                    w.u8(c.flags);
                    w.cstr(&c.name, "column.name")?;
                    w.u32(c.type_oid);
                    w.i32(c.type_modifier);
                }
            }
            Message::Type(m) => {
                self.xid(w, tag, m.xid)?;
                w.u32(m.id);
                w.cstr(&m.namespace, "namespace")?;
                w.cstr(&m.name, "name")?;
            }
            Message::Insert(m) => {
                self.xid(w, tag, m.xid)?;
                w.u32(m.relation_id);
                w.u8(b'N');
                w.tuple(&m.tuple);
            }
            Message::Update(m) => {
                self.xid(w, tag, m.xid)?;
                w.u32(m.relation_id);
                w.old(m.old.as_ref());
                w.u8(b'N');
                w.tuple(&m.new);
            }
            Message::Delete(m) => {
                self.xid(w, tag, m.xid)?;
                w.u32(m.relation_id);
                w.old(Some(&m.old));
            }
            Message::Truncate(m) => {
                self.xid(w, tag, m.xid)?;
                let n = u32::try_from(m.relation_ids.len())
                    .map_err(|_| EncodeError::TooLong("nrelations"))?;
                w.u32(n);
                w.u8(m.options);
                for &id in &m.relation_ids {
                    w.u32(id);
                }
            }
            Message::Message(m) => {
                self.xid(w, tag, m.xid)?;
                w.u8(m.flags);
                w.lsn(m.lsn);
                w.cstr(&m.prefix, "prefix")?;
                let n = u32::try_from(m.content.len())
                    .map_err(|_| EncodeError::TooLong("content_length"))?;
                w.u32(n);
                w.out.extend_from_slice(&m.content);
            }
            Message::StreamStart(m) => {
                self.outside_stream(tag)?;
                w.u32(m.xid);
                w.u8(m.first_segment);
            }
            Message::StreamStop => {
                if !self.in_stream {
                    return Err(EncodeError::UnexpectedMessage(tag));
                }
            }
            Message::StreamCommit(m) => {
                self.outside_stream(tag)?;
                w.u32(m.xid);
                w.u8(m.flags);
                w.lsn(m.commit_lsn);
                w.lsn(m.end_lsn);
                w.ts(m.commit_time);
            }
            Message::StreamAbort(m) => {
                self.outside_stream(tag)?;
                w.u32(m.xid);
                w.u32(m.subxid);
                if let Some((lsn, time)) = m.abort {
                    if self.protocol_version < 4 {
                        return Err(EncodeError::AbortInfoNeedsV4);
                    }
                    w.lsn(lsn);
                    w.ts(time);
                }
            }
            Message::BeginPrepare(m) => {
                w.lsn(m.prepare_lsn);
                w.lsn(m.end_lsn);
                w.ts(m.prepare_time);
                w.u32(m.xid);
                w.cstr(&m.gid, "gid")?;
            }
            Message::Prepare(m) | Message::StreamPrepare(m) => {
                if tag == b'p' {
                    self.outside_stream(tag)?;
                }
                w.u8(m.flags);
                w.lsn(m.prepare_lsn);
                w.lsn(m.end_lsn);
                w.ts(m.prepare_time);
                w.u32(m.xid);
                w.cstr(&m.gid, "gid")?;
            }
            Message::CommitPrepared(m) => {
                w.u8(m.flags);
                w.lsn(m.commit_lsn);
                w.lsn(m.end_lsn);
                w.ts(m.commit_time);
                w.u32(m.xid);
                w.cstr(&m.gid, "gid")?;
            }
            Message::RollbackPrepared(m) => {
                w.u8(m.flags);
                w.lsn(m.prepare_end_lsn);
                w.lsn(m.rollback_end_lsn);
                w.ts(m.prepare_time);
                w.ts(m.rollback_time);
                w.u32(m.xid);
                w.cstr(&m.gid, "gid")?;
            }
        }
        Ok(())
    }
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    fn lsn(&mut self, v: Lsn) {
        self.out.extend_from_slice(&v.0.to_be_bytes());
    }

    fn ts(&mut self, v: PgTimestamp) {
        self.out.extend_from_slice(&v.0.to_be_bytes());
    }

    fn cstr(&mut self, s: &str, field: &'static str) -> Result<(), EncodeError> {
        if s.as_bytes().contains(&0) {
            return Err(EncodeError::NulInString(field));
        }
        self.out.extend_from_slice(s.as_bytes());
        self.out.push(0);
        Ok(())
    }

    fn tuple(&mut self, t: &TupleData) {
        // `TupleData` can only be built with at most u16::MAX columns (decoded or encoded).
        let n = u16::try_from(t.len()).unwrap_or(u16::MAX);
        self.u16(n);
        self.out.extend_from_slice(t.raw());
    }

    fn old(&mut self, old: Option<&OldTuple>) {
        match old {
            Some(OldTuple::Key(t)) => {
                self.u8(b'K');
                self.tuple(t);
            }
            Some(OldTuple::Full(t)) => {
                self.u8(b'O');
                self.tuple(t);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests;
