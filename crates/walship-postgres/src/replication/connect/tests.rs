use bytes::{BufMut, BytesMut};

use super::*;

#[test]
fn parses_identify_system_rows() {
    let mut row = BytesMut::new();
    row.put_u16(4);
    for field in [&b"7301234567890123456"[..], b"1", b"0/16B3F28"] {
        row.put_i32(field.len() as i32);
        row.put_slice(field);
    }
    row.put_i32(-1);
    assert_eq!(
        parse_identify_row(&row).unwrap(),
        SystemIdentity {
            system_id: "7301234567890123456".into(),
            timeline: 1,
            xlogpos: "0/16B3F28".parse().unwrap(),
        }
    );
    let truncated = &row[..row.len() - 8];
    assert!(parse_identify_row(truncated).is_err());
    assert!(parse_identify_row(b"").is_err());
}

#[test]
fn start_options_ask_for_v1_messages_and_the_quoted_publication() {
    assert_eq!(
        StartOptions::new("out\"box").pairs(),
        [
            ("proto_version", "1"),
            ("publication_names", "\"out\"\"box\""),
            ("messages", "true"),
        ]
    );
}
