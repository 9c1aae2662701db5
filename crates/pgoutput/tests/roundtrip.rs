//! Property tests: every message kind survives encode → decode unchanged, in and out of streams
//! and for every protocol version; the decoder never panics on arbitrary or mutated bytes, and
//! whatever it accepts re-encodes to exactly the same bytes (so it drops and invents nothing).

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use pgoutput::{
    Begin, BeginPrepare, Column, Commit, CommitPrepared, Decoder, Delete, Encoder, Insert,
    LogicalMessage, Lsn, Message, OldTuple, Origin, PgTimestamp, Prepare, Relation, RelationColumn,
    RollbackPrepared, StreamAbort, StreamCommit, StreamStart, Truncate, TupleData, Type, Update,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

/// A column value that owns its bytes, so strategies can generate it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Col {
    Null,
    Toast,
    Text(Vec<u8>),
    Binary(Vec<u8>),
}

impl Col {
    fn as_column(&self) -> Column<'_> {
        match self {
            Col::Null => Column::Null,
            Col::Toast => Column::UnchangedToast,
            Col::Text(v) => Column::Text(v),
            Col::Binary(v) => Column::Binary(v),
        }
    }
}

fn col() -> impl Strategy<Value = Col> {
    prop_oneof![
        Just(Col::Null),
        Just(Col::Toast),
        vec(any::<u8>(), 0..48).prop_map(Col::Text),
        vec(any::<u8>(), 0..48).prop_map(Col::Binary),
    ]
}

fn cols() -> impl Strategy<Value = Vec<Col>> {
    vec(col(), 0..8)
}

fn tuple() -> impl Strategy<Value = TupleData> {
    cols().prop_map(|c| {
        let c: Vec<Column<'_>> = c.iter().map(Col::as_column).collect();
        TupleData::encode(&c).unwrap()
    })
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn ts() -> impl Strategy<Value = PgTimestamp> {
    any::<i64>().prop_map(PgTimestamp)
}

/// Any UTF-8 text without NUL (names are C strings on the wire).
fn name() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn prepare() -> impl Strategy<Value = Prepare> {
    (any::<u8>(), lsn(), lsn(), ts(), any::<u32>(), name()).prop_map(
        |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| Prepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid,
        },
    )
}

/// Any message. Streamed `xid`s are always `Some` and Stream Abort may carry v4 fields here;
/// [`normalize`] makes a sequence consistent with the stream state and protocol version.
fn message() -> impl Strategy<Value = Message> {
    // Stream Start and Stop are weighted up so that sequences spend time inside streams.
    prop_oneof![
        17 => other_message(),
        3 => (any::<u32>(), any::<u8>()).prop_map(|(xid, first_segment)| {
            Message::StreamStart(StreamStart { xid, first_segment })
        }),
        2 => Just(Message::StreamStop),
    ]
}

fn other_message() -> impl Strategy<Value = Message> {
    let xid = any::<u32>().prop_map(Some);
    let relation_column = (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| RelationColumn {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    );
    prop_oneof![
        (lsn(), ts(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            Message::Begin(Begin {
                final_lsn,
                commit_time,
                xid,
            })
        }),
        (any::<u8>(), lsn(), lsn(), ts()).prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
            Message::Commit(Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            })
        }),
        (lsn(), name()).prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name })),
        (
            xid.clone(),
            any::<u32>(),
            name(),
            name(),
            select(&b"dnfi"[..]),
            vec(relation_column, 0..6)
        )
            .prop_map(|(xid, id, namespace, name, replica_identity, columns)| {
                Message::Relation(Relation {
                    xid,
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (xid.clone(), any::<u32>(), name(), name()).prop_map(|(xid, id, namespace, name)| {
            Message::Type(Type {
                xid,
                id,
                namespace,
                name,
            })
        }),
        (xid.clone(), any::<u32>(), tuple()).prop_map(|(xid, relation_id, tuple)| {
            Message::Insert(Insert {
                xid,
                relation_id,
                tuple,
            })
        }),
        (
            xid.clone(),
            any::<u32>(),
            proptest::option::of(old_tuple()),
            tuple()
        )
            .prop_map(|(xid, relation_id, old, new)| {
                Message::Update(Update {
                    xid,
                    relation_id,
                    old,
                    new,
                })
            }),
        (xid.clone(), any::<u32>(), old_tuple()).prop_map(|(xid, relation_id, old)| {
            Message::Delete(Delete {
                xid,
                relation_id,
                old,
            })
        }),
        (xid.clone(), any::<u8>(), vec(any::<u32>(), 0..8)).prop_map(
            |(xid, options, relation_ids)| Message::Truncate(Truncate {
                xid,
                options,
                relation_ids,
            })
        ),
        (xid, any::<u8>(), lsn(), name(), vec(any::<u8>(), 0..64)).prop_map(
            |(xid, flags, lsn, prefix, content)| Message::Message(LogicalMessage {
                xid,
                flags,
                lsn,
                prefix,
                content: Bytes::from(content),
            })
        ),
        (any::<u32>(), any::<u8>(), lsn(), lsn(), ts()).prop_map(
            |(xid, flags, commit_lsn, end_lsn, commit_time)| Message::StreamCommit(StreamCommit {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            })
        ),
        (
            any::<u32>(),
            any::<u32>(),
            proptest::option::of((lsn(), ts()))
        )
            .prop_map(|(xid, subxid, abort)| Message::StreamAbort(StreamAbort {
                xid,
                subxid,
                abort
            })),
        (lsn(), lsn(), ts(), any::<u32>(), name()).prop_map(
            |(prepare_lsn, end_lsn, prepare_time, xid, gid)| Message::BeginPrepare(BeginPrepare {
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            })
        ),
        prepare().prop_map(Message::Prepare),
        (any::<u8>(), lsn(), lsn(), ts(), any::<u32>(), name()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time, xid, gid)| Message::CommitPrepared(
                CommitPrepared {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                    xid,
                    gid,
                }
            )
        ),
        (any::<u8>(), lsn(), lsn(), ts(), ts(), any::<u32>(), name()).prop_map(
            |(flags, prepare_end_lsn, rollback_end_lsn, prepare_time, rollback_time, xid, gid)| {
                Message::RollbackPrepared(RollbackPrepared {
                    flags,
                    prepare_end_lsn,
                    rollback_end_lsn,
                    prepare_time,
                    rollback_time,
                    xid,
                    gid,
                })
            }
        ),
        prepare().prop_map(Message::StreamPrepare),
    ]
}

/// The streamed-xid field of a row/relation message, if the message has one.
fn xid_slot(m: &mut Message) -> Option<&mut Option<u32>> {
    match m {
        Message::Relation(m) => Some(&mut m.xid),
        Message::Type(m) => Some(&mut m.xid),
        Message::Insert(m) => Some(&mut m.xid),
        Message::Update(m) => Some(&mut m.xid),
        Message::Delete(m) => Some(&mut m.xid),
        Message::Truncate(m) => Some(&mut m.xid),
        Message::Message(m) => Some(&mut m.xid),
        _ => None,
    }
}

/// Makes a generated sequence one PostgreSQL could send: xids exactly inside streams, stream
/// control messages only in valid states (a Stream Stop is inserted where needed), and Stream
/// Abort's v4 fields only with protocol v4.
fn normalize(version: u32, msgs: Vec<Message>) -> Vec<Message> {
    let mut out = Vec::with_capacity(msgs.len() * 2);
    let mut in_stream = false;
    for mut m in msgs {
        if let Some(slot) = xid_slot(&mut m)
            && !in_stream
        {
            *slot = None;
        }
        if let Message::StreamAbort(a) = &mut m
            && version < 4
        {
            a.abort = None;
        }
        match m {
            Message::StreamStop if !in_stream => continue,
            Message::StreamStart(_)
            | Message::StreamCommit(_)
            | Message::StreamAbort(_)
            | Message::StreamPrepare(_)
                if in_stream =>
            {
                out.push(Message::StreamStop);
                in_stream = false;
            }
            _ => {}
        }
        match m {
            Message::StreamStart(_) => in_stream = true,
            Message::StreamStop => in_stream = false,
            _ => {}
        }
        out.push(m);
    }
    out
}

fn sequence() -> impl Strategy<Value = (u32, Vec<Message>)> {
    (1u32..=4, vec(message(), 1..40)).prop_map(|(v, msgs)| (v, normalize(v, msgs)))
}

/// A short prefix of a valid v4 Stream Abort is the valid v2-form Stream Abort.
fn is_v4_short_abort(version: u32, msg: &Message, prefix_len: usize) -> bool {
    version >= 4 && matches!(msg, Message::StreamAbort(a) if a.abort.is_some()) && prefix_len == 9
}

const TAGS: &[u8] = b"BCORYIUDTMSEcAbPKrp";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// decode(encode(m)) == m for whole sequences, with one encoder and one decoder that agree
    /// on the stream state after every message.
    #[test]
    fn encode_then_decode_is_identity((version, msgs) in sequence()) {
        let mut enc = Encoder::new(version);
        let mut dec = Decoder::new(version);
        for m in &msgs {
            let bytes = enc.encode(m).unwrap();
            let got = dec.decode(bytes.clone());
            prop_assert_eq!(got.as_ref(), Ok(m), "bytes {:?}", bytes);
            prop_assert_eq!(enc.in_stream(), dec.in_stream());
        }
    }

    /// Every strict prefix of a valid message is rejected (nothing is optional at the end,
    /// except v4 Stream Abort's parallel-streaming fields), and so is one byte more.
    #[test]
    fn truncated_or_extended_messages_are_rejected((version, msgs) in sequence()) {
        let mut enc = Encoder::new(version);
        let mut dec = Decoder::new(version);
        for m in &msgs {
            let bytes = enc.encode(m).unwrap();
            for len in 0..bytes.len() {
                let got = dec.clone().decode(bytes.slice(..len));
                if !is_v4_short_abort(version, m, len) {
                    prop_assert!(got.is_err(), "prefix {len} of {:?} decoded as {:?}", m, got);
                }
            }
            let mut longer = bytes.to_vec();
            longer.push(0);
            prop_assert!(dec.clone().decode(Bytes::from(longer)).is_err());
            dec.decode(bytes).unwrap();
        }
    }

    /// Columns come back in order and kind, borrowed from the message.
    #[test]
    fn tuple_columns_round_trip(cols in cols(), old in cols(), key in any::<bool>()) {
        let t = |c: &[Col]| {
            TupleData::encode(&c.iter().map(Col::as_column).collect::<Vec<_>>()).unwrap()
        };
        let old_t = if key { OldTuple::Key(t(&old)) } else { OldTuple::Full(t(&old)) };
        let m = Message::Update(Update { xid: None, relation_id: 1, old: Some(old_t), new: t(&cols) });
        let bytes = Encoder::new(1).encode(&m).unwrap();
        let Ok(Message::Update(u)) = Decoder::new(1).decode(bytes.clone()) else {
            panic!("not an update")
        };
        let new: Vec<Column<'_>> = u.new.iter().collect();
        let want: Vec<Column<'_>> = cols.iter().map(Col::as_column).collect();
        prop_assert_eq!(new, want);
        prop_assert_eq!(u.new.iter().len(), cols.len());
        let (Some(OldTuple::Key(o)) | Some(OldTuple::Full(o))) = &u.old else { panic!("no old") };
        prop_assert_eq!(o.iter().collect::<Vec<_>>(), old.iter().map(Col::as_column).collect::<Vec<_>>());
        // Zero-copy: every value points into the message bytes.
        let range = bytes.as_ptr_range();
        for c in u.new.iter() {
            if let Some(v) = c.bytes() {
                prop_assert!(range.contains(&v.as_ptr()) || v.is_empty());
            }
        }
    }

    /// Arbitrary bytes, with a valid type byte most of the time, in and out of a stream, for
    /// every version: no panic, and anything accepted re-encodes to the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic(
        version in 1u32..=4,
        in_stream in any::<bool>(),
        msgs in vec((proptest::option::weighted(0.9, select(TAGS)), vec(any::<u8>(), 0..64)), 1..8),
    ) {
        let mut dec = Decoder::new(version);
        let mut enc = Encoder::new(version);
        if in_stream {
            let start = Message::StreamStart(StreamStart { xid: 1, first_segment: 1 });
            dec.decode(enc.encode(&start).unwrap()).unwrap();
        }
        for (tag, body) in msgs {
            let mut raw: Vec<u8> = tag.into_iter().collect();
            raw.extend_from_slice(&body);
            let raw = Bytes::from(raw);
            if let Ok(m) = dec.decode(raw.clone()) {
                prop_assert_eq!(enc.encode(&m).unwrap(), raw);
            }
            prop_assert_eq!(enc.in_stream(), dec.in_stream());
        }
    }

    /// Valid messages with bytes flipped: no panic, and anything still accepted is canonical.
    #[test]
    fn mutated_messages_never_panic(
        (version, msgs) in sequence(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut enc = Encoder::new(version);
        let mut dec = Decoder::new(version);
        for m in &msgs {
            let bytes = enc.encode(m).unwrap();
            let mut mutated = bytes.to_vec();
            for (i, b) in &flips {
                let i = i.index(mutated.len());
                mutated[i] ^= b;
            }
            let mutated = Bytes::from(mutated);
            let mut probe = dec.clone();
            if let Ok(got) = probe.decode(mutated.clone()) {
                let mut e = Encoder::new(version);
                if dec.in_stream() {
                    e.encode(&Message::StreamStart(StreamStart { xid: 0, first_segment: 0 })).unwrap();
                }
                prop_assert_eq!(e.encode(&got).unwrap(), mutated);
            }
            dec.decode(bytes).unwrap();
        }
    }
}

/// Hand-written edge cases the generators reach rarely.
#[test]
fn edge_cases_round_trip() {
    let wide: Vec<Column<'_>> = (0..u16::MAX).map(|_| Column::Null).collect();
    let big = vec![0xAB; 1 << 20];
    let cases = [
        Message::Insert(Insert {
            xid: None,
            relation_id: u32::MAX,
            tuple: TupleData::encode(&wide).unwrap(),
        }),
        Message::Insert(Insert {
            xid: None,
            relation_id: 0,
            tuple: TupleData::encode(&[Column::Binary(&big), Column::Text(b"")]).unwrap(),
        }),
        Message::Message(LogicalMessage {
            xid: None,
            flags: 1,
            lsn: Lsn(u64::MAX),
            prefix: String::new(),
            content: Bytes::from(big.clone()),
        }),
        Message::Truncate(Truncate {
            xid: None,
            options: 3,
            relation_ids: (0..10_000).collect(),
        }),
    ];
    for m in cases {
        let bytes = Encoder::new(1).encode(&m).unwrap();
        assert_eq!(Decoder::new(1).decode(bytes).unwrap(), m);
    }
    let too_wide: Vec<Column<'_>> = (0..=u32::from(u16::MAX)).map(|_| Column::Null).collect();
    assert!(TupleData::encode(&too_wide).is_err());
}

/// Hostile counts (65535 columns, 2^32 relations, 2 GiB values) fail on the missing bytes.
#[test]
fn huge_counts_fail_fast() {
    let mut relation = b"R\0\0\0\x01ns\0t\0d\xff\xff".to_vec();
    relation.extend_from_slice(&[0; 4]);
    assert!(Decoder::new(1).decode(Bytes::from(relation)).is_err());
    let truncate = Bytes::from_static(b"T\xff\xff\xff\xff\0\0\0\0\x01");
    assert!(Decoder::new(1).decode(truncate).is_err());
    let tuple = Bytes::from_static(b"I\0\0\0\x01N\xff\xfft\x7f\xff\xff\xff");
    assert!(Decoder::new(1).decode(tuple).is_err());
    let message = Bytes::from_static(b"M\x01\0\0\0\0\0\0\0\0p\0\xff\xff\xff\xff");
    assert!(Decoder::new(1).decode(message).is_err());
}
