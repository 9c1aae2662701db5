use bytes::BufMut;
use bytes::BytesMut;

use super::*;

#[test]
fn parses_xlogdata_and_keepalive() {
    let mut w = BytesMut::new();
    w.put_u8(b'w');
    w.put_u64(10);
    w.put_u64(20);
    w.put_i64(30);
    w.put_slice(b"Bxyz");
    let Frame::XLogData {
        wal_start,
        wal_end,
        data,
        ..
    } = parse_copy_data(w.freeze()).unwrap()
    else {
        panic!("not xlogdata")
    };
    assert_eq!(
        (wal_start, wal_end, &data[..]),
        (Lsn(10), Lsn(20), &b"Bxyz"[..])
    );

    let mut k = BytesMut::new();
    k.put_u8(b'k');
    k.put_u64(99);
    k.put_i64(1);
    k.put_u8(1);
    assert_eq!(
        parse_copy_data(k.freeze()).unwrap(),
        Frame::Keepalive {
            wal_end: Lsn(99),
            send_time: PgTimestamp(1),
            reply_requested: true
        }
    );
    assert!(parse_copy_data(Bytes::from_static(b"w\0\0")).is_err());
    assert!(parse_copy_data(Bytes::from_static(b"")).is_err());
}
