//! The pgoutput messages, one struct per message type.
//!
//! Field names follow PostgreSQL's "Logical Replication Message Formats" documentation. `xid`
//! fields that are only present inside a streamed transaction (protocol v2+) are `Option`s that
//! are `Some` exactly when the message arrived between Stream Start and Stream Stop.

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::time::PgTimestamp;
use crate::tuple::TupleData;

/// One decoded pgoutput message.
///
/// A protocol v1 stream is a sequence of transactions: [`Begin`], then [`Relation`]/[`Type`]
/// descriptions (before the first change to a table, and again after it changed) and row changes
/// ([`Insert`], [`Update`], [`Delete`], [`Truncate`]) and transactional [`LogicalMessage`]s,
/// then [`Commit`]. Non-transactional logical messages arrive on their own. Later versions add
/// streamed blocks of in-progress transactions (v2: `StreamStart` … `StreamStop`, then
/// `StreamCommit` or `StreamAbort`) and two-phase commit (v3: `BeginPrepare` … `Prepare`, then
/// `CommitPrepared` or `RollbackPrepared`; `StreamPrepare` for a streamed one).
///
/// ```
/// use pgoutput::{Lsn, Message};
/// fn confirmable(msg: &Message) -> Option<Lsn> {
///     match msg {
///         Message::Commit(c) => Some(c.end_lsn),
///         Message::StreamCommit(c) => Some(c.end_lsn),
///         Message::CommitPrepared(c) => Some(c.end_lsn),
///         _ => None,
///     }
/// }
/// assert_eq!(confirmable(&Message::StreamStop), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // each variant is documented on its payload type
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(Type),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(Prepare),
}

impl Message {
    /// The message's type byte on the wire (`b'I'` for Insert, …); see
    /// [`message_type_name`](crate::message_type_name) for its name.
    ///
    /// ```
    /// use pgoutput::Message;
    /// assert_eq!(Message::StreamStop.message_type(), b'E');
    /// ```
    pub fn message_type(&self) -> u8 {
        match self {
            Message::Begin(_) => b'B',
            Message::Commit(_) => b'C',
            Message::Origin(_) => b'O',
            Message::Relation(_) => b'R',
            Message::Type(_) => b'Y',
            Message::Insert(_) => b'I',
            Message::Update(_) => b'U',
            Message::Delete(_) => b'D',
            Message::Truncate(_) => b'T',
            Message::Message(_) => b'M',
            Message::StreamStart(_) => b'S',
            Message::StreamStop => b'E',
            Message::StreamCommit(_) => b'c',
            Message::StreamAbort(_) => b'A',
            Message::BeginPrepare(_) => b'b',
            Message::Prepare(_) => b'P',
            Message::CommitPrepared(_) => b'K',
            Message::RollbackPrepared(_) => b'r',
            Message::StreamPrepare(_) => b'p',
        }
    }
}

/// Begin ('B'): a transaction starts; its changes follow, then [`Commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
}

/// Commit ('C'): the end of a transaction started by [`Begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Flags (currently unused, 0).
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The end LSN of the transaction: the position to confirm once it is processed.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
}

/// Origin ('O'): the transaction was replicated from another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The commit LSN on the origin server.
    pub commit_lsn: Lsn,
    /// Origin name.
    pub name: String,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags: bit 1 marks a column that is part of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// The column's data type OID.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`).
    pub type_modifier: i32,
}

impl RelationColumn {
    /// True when the column is part of the key sent with Update/Delete.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// Relation ('R'): describes a table before the first change to it in a session, and again
/// whenever its definition changed (for example after `ALTER TABLE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Streamed transaction id (inside a stream only).
    pub xid: Option<u32>,
    /// The relation's OID, used by later row messages.
    pub id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `REPLICA IDENTITY` setting: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in table order.
    pub columns: Vec<RelationColumn>,
}

/// Type ('Y'): describes a non-builtin data type used by a following Relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// Streamed transaction id (inside a stream only).
    pub xid: Option<u32>,
    /// The type's OID.
    pub id: u32,
    /// Schema name.
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// Insert ('I'): a new row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// Streamed transaction id (inside a stream only).
    pub xid: Option<u32>,
    /// Relation OID (see [`Relation::id`]).
    pub relation_id: u32,
    /// The new row.
    pub tuple: TupleData,
}

/// Which old values an [`Update`] or [`Delete`] carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `'K'`: the replica identity key columns (others are NULL).
    Key(TupleData),
    /// `'O'`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(TupleData),
}

/// Update ('U'): a changed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// Streamed transaction id (inside a stream only).
    pub xid: Option<u32>,
    /// Relation OID.
    pub relation_id: u32,
    /// The old key or row, when the replica identity sends one.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: TupleData,
}

/// Delete ('D'): a removed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// Streamed transaction id (inside a stream only).
    pub xid: Option<u32>,
    /// Relation OID.
    pub relation_id: u32,
    /// The old key or row.
    pub old: OldTuple,
}

/// Truncate ('T').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Streamed transaction id (inside a stream only).
    pub xid: Option<u32>,
    /// Bit 1: `CASCADE`; bit 2: `RESTART IDENTITY`.
    pub options: u8,
    /// OIDs of the truncated relations.
    pub relation_ids: Vec<u32>,
}

/// Message ('M'): a logical decoding message from `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Streamed transaction id (inside a stream only).
    pub xid: Option<u32>,
    /// Bit 1: the message is transactional.
    pub flags: u8,
    /// The LSN of the message.
    pub lsn: Lsn,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: String,
    /// The content, zero-copy.
    pub content: Bytes,
}

impl LogicalMessage {
    /// True when the message was emitted with `transactional = true`.
    pub fn is_transactional(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// Stream Start ('S'): a block of a large in-progress transaction follows (protocol v2+).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStart {
    /// Transaction id.
    pub xid: u32,
    /// 1 for the transaction's first block.
    pub first_segment: u8,
}

/// Stream Commit ('c'): a streamed transaction committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCommit {
    /// Transaction id.
    pub xid: u32,
    /// Flags (unused, 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
}

/// Stream Abort ('A'): a streamed (sub)transaction rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAbort {
    /// Top-level transaction id.
    pub xid: u32,
    /// Aborted subtransaction id (equal to `xid` when the whole transaction aborted).
    pub subxid: u32,
    /// Abort LSN and timestamp: sent with protocol v4 and `streaming 'parallel'` only (a v4
    /// stream with `streaming 'on'` gets the short form, and this is `None`).
    pub abort: Option<(Lsn, PgTimestamp)>,
}

/// Begin Prepare ('b'): a two-phase transaction's changes follow (protocol v3+).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// End LSN of the prepared transaction.
    pub end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_time: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// Prepare ('P') and Stream Prepare ('p').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    /// Flags (unused, 0).
    pub flags: u8,
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// End LSN of the prepared transaction.
    pub end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_time: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// Commit Prepared ('K').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Flags (unused, 0).
    pub flags: u8,
    /// LSN of the commit prepared record.
    pub commit_lsn: Lsn,
    /// End LSN of the commit prepared transaction.
    pub end_lsn: Lsn,
    /// Commit timestamp.
    pub commit_time: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// Rollback Prepared ('r').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Flags (unused, 0).
    pub flags: u8,
    /// End LSN of the prepared transaction.
    pub prepare_end_lsn: Lsn,
    /// End LSN of the rollback prepared transaction.
    pub rollback_end_lsn: Lsn,
    /// Prepare timestamp.
    pub prepare_time: PgTimestamp,
    /// Rollback timestamp.
    pub rollback_time: PgTimestamp,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}
