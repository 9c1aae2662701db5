use super::*;
use crate::Decoder;

fn insert(xid: Option<u32>) -> Message {
    Message::Insert(Insert {
        xid,
        relation_id: 7,
        tuple: TupleData::encode(&[Column::Text(b"x")]).unwrap(),
    })
}

#[test]
fn xid_must_match_stream_state() {
    let mut e = Encoder::new(2);
    assert_eq!(
        e.encode(&insert(Some(1))),
        Err(EncodeError::XidMismatch {
            message_type: b'I',
            in_stream: false
        })
    );
    e.encode(&Message::StreamStart(StreamStart {
        xid: 1,
        first_segment: 1,
    }))
    .unwrap();
    assert!(e.in_stream());
    assert!(e.encode(&insert(None)).is_err());
    assert!(e.encode(&insert(Some(1))).is_ok());
}

#[test]
fn stream_control_state_is_checked_and_unchanged_on_error() {
    let mut e = Encoder::new(2);
    let mut out = b"keep".to_vec();
    assert_eq!(
        e.encode_into(&Message::StreamStop, &mut out),
        Err(EncodeError::UnexpectedMessage(b'E'))
    );
    assert_eq!(out, b"keep");
    assert!(!e.in_stream());
    let abort = Message::StreamAbort(StreamAbort {
        xid: 1,
        subxid: 1,
        abort: Some((Lsn(1), PgTimestamp(2))),
    });
    assert_eq!(e.encode(&abort), Err(EncodeError::AbortInfoNeedsV4));
    assert_eq!(Encoder::new(4).encode(&abort).map(|b| b.len()), Ok(25));
}

#[test]
fn rejects_nul_in_names() {
    let origin = Message::Origin(Origin {
        commit_lsn: Lsn(1),
        name: "a\0b".into(),
    });
    assert_eq!(
        Encoder::new(1).encode(&origin),
        Err(EncodeError::NulInString("name"))
    );
}

#[test]
fn begin_bytes_match_the_documented_layout() {
    let begin = Message::Begin(Begin {
        final_lsn: Lsn(0x0102_0304_0506_0708),
        commit_time: PgTimestamp(-2),
        xid: 0xAABB_CCDD,
    });
    let bytes = Encoder::new(1).encode(&begin).unwrap();
    let mut want = vec![b'B', 1, 2, 3, 4, 5, 6, 7, 8];
    want.extend_from_slice(&(-2i64).to_be_bytes());
    want.extend_from_slice(&[0xAA, 0xBB, 0xCC, 0xDD]);
    assert_eq!(&bytes[..], &want[..]);
    assert_eq!(Decoder::new(1).decode(bytes).unwrap(), begin);
}
