//! Tests of the record shapes: header names and order, the dead letter's cut, many headers.

use super::*;

fn headers(r: &Record<'_>) -> Vec<(String, Option<String>)> {
    r.headers()
        .map(|(k, v)| {
            let v = v.map(|v| String::from_utf8_lossy(v).into_owned());
            (k.to_owned(), v)
        })
        .collect()
}

fn named(list: &[(&str, Option<&str>)]) -> Vec<(String, Option<String>)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned)))
        .collect()
}

const STAMP: Stamp<'static> = Stamp {
    source: "7/slot",
    position: Some(Position {
        commit_lsn: 0x16_B374_D848,
        index: 2,
    }),
    timeline: "3",
    id: Some(b"u1"),
};

#[test]
fn an_event_names_its_writer_position_timeline_id_type_then_its_columns() {
    let columns: Vec<(Arc<str>, Option<&[u8]>)> = vec![
        (Arc::from("tenant"), Some(&b"acme"[..])),
        (Arc::from("trace"), None),
    ];
    let event = Event {
        key: b"A",
        payload: Some(b"{}"),
        commit_ms: 17,
        event_type: Some(b"created"),
        columns: &columns,
    };
    let r = Record::event("outbox.event.order", event, STAMP);
    assert_eq!(
        (r.topic, r.key, r.payload),
        ("outbox.event.order", &b"A"[..], Some(&b"{}"[..]))
    );
    assert_eq!(r.timestamp_ms, Some(17));
    assert_eq!(
        headers(&r),
        named(&[
            ("walship.source", Some("7/slot")),
            ("walship.position", Some("16/B374D848:2")),
            ("walship.timeline", Some("3")),
            ("id", Some("u1")),
            ("type", Some("created")),
            ("tenant", Some("acme")),
            ("trace", None),
        ])
    );
    let bare = Record::event(
        "t",
        Event {
            event_type: None,
            columns: &[],
            payload: None,
            ..event
        },
        Stamp { id: None, ..STAMP },
    );
    assert_eq!(bare.header_count(), 3);
    assert_eq!(bare.payload, None, "a tombstone stays one");
}

#[test]
fn a_dead_letter_names_why_where_and_whose_and_is_cut_to_fit() {
    let value = vec![b'x'; 4000];
    let dead = DeadLetter {
        key: b"A",
        value: &value,
        commit_ms: 5,
        reason: "bad row",
        lsn: 0x1_0000_00A0,
        xid: 742,
        origin: Origin::Table("public.outbox"),
    };
    let mut r = Record::dead_letter("dlq", dead, STAMP);
    let expected = [
        ("walship.error", Some("bad row")),
        ("walship.lsn", Some("1/A0")),
        ("walship.xid", Some("742")),
        ("walship.table", Some("public.outbox")),
        ("walship.source", Some("7/slot")),
        ("walship.timeline", Some("3")),
        ("walship.position", Some("16/B374D848:2")),
        ("id", Some("u1")),
    ];
    assert_eq!(headers(&r), named(&expected));
    assert_eq!(r.fit(1_000_000), None, "fits whole");
    assert_eq!(r.payload.map(<[u8]>::len), Some(4000));
    let cut = r.fit(3000).expect("cut");
    assert_eq!(cut.full, 4000);
    assert_eq!(r.payload.map(<[u8]>::len), Some(cut.kept));
    let text: usize = r
        .headers()
        .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len))
        .sum();
    assert_eq!(cut.kept + text + r.key.len() + RECORD_OVERHEAD, 3000);
    let mut with_size = named(&expected);
    with_size.push(("walship.truncated".into(), Some("4000".into())));
    assert_eq!(headers(&r), with_size);

    let message = DeadLetter {
        origin: Origin::Prefix("outbox"),
        ..dead
    };
    let r = Record::dead_letter(
        "dlq",
        message,
        Stamp {
            position: None,
            id: None,
            ..STAMP
        },
    );
    assert_eq!(r.header_count(), 6);
    assert!(
        r.headers()
            .any(|(k, v)| k == "walship.prefix" && v == Some(b"outbox"))
    );
}

#[test]
fn headers_past_the_inline_ones_keep_their_order() {
    let names: Vec<String> = (0..25).map(|i| format!("h{i}")).collect();
    let mut r = Record::new("t", b"k", None, None);
    for name in &names {
        r.header(name, Some(name.as_bytes()));
    }
    assert_eq!(r.header_count(), 25);
    let got: Vec<&str> = r.headers().map(|(k, _)| k).collect();
    assert_eq!(got, names.iter().map(String::as_str).collect::<Vec<_>>());
}
