use super::*;

fn decode_all(version: u32, msgs: &[&[u8]]) -> Vec<Result<Message, DecodeError>> {
    let mut d = Decoder::new(version);
    msgs.iter()
        .map(|m| d.decode(Bytes::copy_from_slice(m)))
        .collect()
}

fn decode_err(version: u32, msg: &[u8]) -> DecodeError {
    Decoder::new(version)
        .decode(Bytes::copy_from_slice(msg))
        .unwrap_err()
}

fn stream_abort(extra: &[u8]) -> Vec<u8> {
    let mut m = vec![b'A', 0, 0, 0, 9, 0, 0, 0, 10];
    m.extend_from_slice(extra);
    m
}

/// Regression: protocol v4 sends the abort LSN and time only with `streaming 'parallel'`;
/// with `streaming 'on'` a v4 Stream Abort is 9 bytes and used to fail as truncated.
#[test]
fn v4_stream_abort_without_parallel_fields() {
    let short = stream_abort(&[]);
    let mut lsn_ts = 5u64.to_be_bytes().to_vec();
    lsn_ts.extend_from_slice(&6i64.to_be_bytes());
    let long = stream_abort(&lsn_ts);
    let got = decode_all(4, &[&short, &long]);
    assert_eq!(
        got[0],
        Ok(Message::StreamAbort(StreamAbort {
            xid: 9,
            subxid: 10,
            abort: None
        }))
    );
    assert_eq!(
        got[1],
        Ok(Message::StreamAbort(StreamAbort {
            xid: 9,
            subxid: 10,
            abort: Some((Lsn(5), PgTimestamp(6)))
        }))
    );
    // Before v4 the long form is not a thing; a partial abort field is never accepted.
    assert_eq!(decode_err(2, &long).kind(), ErrorKind::TrailingBytes(16));
    let partial = stream_abort(&lsn_ts[..8]);
    assert_eq!(decode_err(4, &partial).field(), "abort_time");
}

/// Regression: an Update whose first tuple marker is neither K, O nor N was reported as a
/// bad `new_tuple_kind`; the first marker is `tuple_kind`.
#[test]
fn update_reports_the_right_marker_field() {
    let err = decode_err(1, b"U\0\0\0\x01X\0\0");
    assert_eq!(err.field(), "tuple_kind");
    assert_eq!(err.kind(), ErrorKind::UnexpectedTag(b'X'));
    let err = decode_err(1, b"U\0\0\0\x01K\0\0X\0\0");
    assert_eq!(err.field(), "new_tuple_kind");
}

#[test]
fn stream_state_follows_start_and_stop_only_on_success() {
    let mut d = Decoder::new(2);
    assert!(d.decode(Bytes::from_static(b"E")).is_err());
    assert!(d.decode(Bytes::from_static(b"S\0\0\0\x01")).is_err()); // truncated
    assert!(!d.in_stream());
    d.decode(Bytes::from_static(b"S\0\0\0\x01\x01")).unwrap();
    assert!(d.in_stream());
    // Stream Start, Commit, Abort and Prepare are invalid inside a stream.
    for m in [&b"S\0\0\0\x01\x01"[..], b"A\0\0\0\x01\0\0\0\x01"] {
        let e = d.decode(Bytes::copy_from_slice(m)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnexpectedMessage);
    }
    assert!(d.decode(Bytes::from_static(b"E\0")).is_err()); // trailing byte
    assert!(d.in_stream());
    d.decode(Bytes::from_static(b"E")).unwrap();
    assert!(!d.in_stream());
}

#[test]
fn zero_copy_fields_point_into_the_input() {
    let raw = Bytes::from_static(b"I\0\0\0\x07N\0\x01t\0\0\0\x03abc");
    let Message::Insert(i) = Decoder::new(1).decode(raw.clone()).unwrap() else {
        panic!("not an insert")
    };
    let col = i.tuple.iter().next().unwrap().bytes().unwrap();
    assert_eq!(col, b"abc");
    assert_eq!(col.as_ptr(), raw[13..].as_ptr());
    assert_eq!(i.tuple.raw().as_ptr(), raw[8..].as_ptr());
}

#[test]
fn empty_input_is_an_error() {
    let e = Decoder::new(1).decode(Bytes::new()).unwrap_err();
    assert_eq!(e.message_type(), 0);
    assert_eq!(
        e.kind(),
        ErrorKind::UnexpectedEnd {
            needed: 1,
            available: 0
        }
    );
}
