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
        aggregate_type: Some(b"order"),
        payload_kind: PayloadKind::Json,
        trace: None,
        envelope: &[],
        partition: None,
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

fn event<'a>(payload: Option<&'a [u8]>, kind: PayloadKind) -> Event<'a> {
    Event {
        key: b"42",
        payload,
        commit_ms: 951_782_400_123,
        event_type: Some(b"OrderCreated"),
        columns: &[],
        aggregate_type: Some(b"order"),
        payload_kind: kind,
        trace: None,
        envelope: &[],
        partition: None,
    }
}

fn cloudevents(mode: cloudevents::Mode) -> Format {
    Format::CloudEvents(CloudEvents::new(mode))
}

const CE_HEADERS: [(&str, Option<&str>); 10] = [
    ("walship.source", Some("7/slot")),
    ("walship.position", Some("16/B374D848:2")),
    ("walship.timeline", Some("3")),
    ("id", Some("u1")),
    ("type", Some("OrderCreated")),
    ("ce_specversion", Some("1.0")),
    ("ce_id", Some("u1")),
    ("ce_source", Some("/outbox/order")),
    ("ce_type", Some("OrderCreated")),
    ("ce_time", Some("2000-02-29T00:00:00.123Z")),
];

#[test]
fn the_plain_format_is_the_event_record() {
    let mut scratch = Scratch::default();
    let e = event(Some(b"{}"), PayloadKind::Json);
    let r = Record::shaped("t", e, STAMP, &Format::Plain, &mut scratch).unwrap();
    assert_eq!(headers(&r), headers(&Record::event("t", e, STAMP)));
    assert_eq!(r.payload, Some(&b"{}"[..]));
}

#[test]
fn binary_cloudevents_keep_the_payload_and_add_ce_headers() {
    let format = cloudevents(cloudevents::Mode::Binary);
    for (payload, kind, content_type) in [
        (
            &br#"{"total": 10}"#[..],
            PayloadKind::Json,
            "application/json",
        ),
        (
            b"plain text",
            PayloadKind::Text,
            "text/plain; charset=utf-8",
        ),
        (b"\x00\xff", PayloadKind::Binary, "application/octet-stream"),
    ] {
        let mut scratch = Scratch::default();
        let r = Record::shaped(
            "t",
            event(Some(payload), kind),
            STAMP,
            &format,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(
            r.payload,
            Some(payload),
            "the value is the payload as stored"
        );
        assert_eq!((r.key, r.timestamp_ms), (&b"42"[..], Some(951_782_400_123)));
        let mut expected = named(&CE_HEADERS);
        expected.extend(named(&[
            ("ce_subject", Some("42")),
            ("content-type", Some(content_type)),
        ]));
        assert_eq!(headers(&r), expected);
    }
}

#[test]
fn structured_cloudevents_hold_the_event_as_json() {
    let format = cloudevents(cloudevents::Mode::Structured);
    let cases: [(&[u8], PayloadKind, serde_json::Value); 3] = [
        (
            br#"{"total": 10}"#,
            PayloadKind::Json,
            serde_json::json!({"datacontenttype": "application/json", "data": {"total": 10}}),
        ),
        (
            b"say \"hi\"\n",
            PayloadKind::Text,
            serde_json::json!({"datacontenttype": "text/plain; charset=utf-8", "data": "say \"hi\"\n"}),
        ),
        (
            b"\x00\xffA",
            PayloadKind::Binary,
            serde_json::json!({"datacontenttype": "application/octet-stream", "data_base64": "AP9B"}),
        ),
    ];
    for (payload, kind, data) in cases {
        let mut scratch = Scratch::default();
        let r = Record::shaped(
            "t",
            event(Some(payload), kind),
            STAMP,
            &format,
            &mut scratch,
        )
        .unwrap();
        let value: serde_json::Value = serde_json::from_slice(r.payload.unwrap()).unwrap();
        let mut expected = serde_json::json!({
            "specversion": "1.0",
            "id": "u1",
            "source": "/outbox/order",
            "type": "OrderCreated",
            "time": "2000-02-29T00:00:00.123Z",
            "subject": "42",
        });
        for (k, v) in data.as_object().unwrap() {
            expected[k] = v.clone();
        }
        assert_eq!(value, expected);
        let mut expected = named(&CE_HEADERS[..5]);
        expected.push((
            "content-type".into(),
            Some("application/cloudevents+json; charset=UTF-8".into()),
        ));
        assert_eq!(headers(&r), expected);
    }
}

#[test]
fn a_text_payload_is_json_data_when_the_content_type_says_json_and_it_parses() {
    let mut ce = CloudEvents::new(cloudevents::Mode::Structured);
    ce.data_content_type = Some("application/vnd.acme+json".into());
    let format = Format::CloudEvents(ce);
    for (payload, data) in [
        (&br#"{"a":1}"#[..], serde_json::json!({"a": 1})),
        (b"{not json", serde_json::json!("{not json")),
    ] {
        let mut scratch = Scratch::default();
        let r = Record::shaped(
            "t",
            event(Some(payload), PayloadKind::Text),
            STAMP,
            &format,
            &mut scratch,
        )
        .unwrap();
        let value: serde_json::Value = serde_json::from_slice(r.payload.unwrap()).unwrap();
        assert_eq!(value["data"], data);
        assert_eq!(value["datacontenttype"], "application/vnd.acme+json");
    }
}

#[test]
fn a_tombstone_stays_a_tombstone_in_both_modes() {
    for mode in [cloudevents::Mode::Binary, cloudevents::Mode::Structured] {
        let mut scratch = Scratch::default();
        let format = cloudevents(mode);
        let r = Record::shaped(
            "t",
            event(None, PayloadKind::Json),
            STAMP,
            &format,
            &mut scratch,
        )
        .unwrap();
        assert_eq!(r.payload, None, "{mode:?}");
        let mut expected = named(&CE_HEADERS);
        expected.extend(named(&[("ce_subject", Some("42"))]));
        assert_eq!(
            headers(&r),
            expected,
            "{mode:?}: the attributes, no content-type"
        );
    }
}

#[test]
fn an_empty_required_attribute_is_refused_and_templates_render_fields() {
    let format = cloudevents(cloudevents::Mode::Binary);
    let mut scratch = Scratch::default();
    let untyped = Event {
        event_type: None,
        ..event(Some(b"{}"), PayloadKind::Json)
    };
    let err = Record::shaped("t", untyped, STAMP, &format, &mut scratch).unwrap_err();
    assert_eq!(err.attribute, "type");
    assert!(
        err.to_string()
            .contains("outbox.cloudevents_type = \"{type}\""),
        "{err}"
    );

    let mut ce = CloudEvents::new(cloudevents::Mode::Binary);
    ce.id = cloudevents::Template::parse("{source}:{position}").unwrap();
    ce.source = cloudevents::Template::parse("urn:acme:{aggregatetype}").unwrap();
    ce.event_type = cloudevents::Template::parse("com.acme.{aggregatetype}.{type}").unwrap();
    ce.subject = cloudevents::Template::parse("").unwrap();
    let format = Format::CloudEvents(ce);
    let mut scratch = Scratch::default();
    let r = Record::shaped(
        "t",
        event(Some(b"{}"), PayloadKind::Json),
        STAMP,
        &format,
        &mut scratch,
    )
    .unwrap();
    let h = headers(&r);
    let get = |name: &str| {
        h.iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.clone())
    };
    assert_eq!(get("ce_id").as_deref(), Some("7/slot:16/B374D848:2"));
    assert_eq!(get("ce_source").as_deref(), Some("urn:acme:order"));
    assert_eq!(
        get("ce_type").as_deref(),
        Some("com.acme.order.OrderCreated")
    );
    assert_eq!(get("ce_subject"), None, "an empty subject is left out");

    for bad in ["{nope}", "x{id", "{ID}"] {
        assert!(cloudevents::Template::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_trace_context_follows_the_columns() {
    let trace = TraceContext {
        traceparent: b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        tracestate: Some(b"a=b"),
    };
    let e = Event {
        trace: Some(trace),
        ..event(Some(b"{}"), PayloadKind::Json)
    };
    let h = headers(&Record::event("t", e, STAMP));
    assert_eq!(
        &h[h.len() - 2..],
        &named(&[
            (
                "traceparent",
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            ),
            ("tracestate", Some("a=b")),
        ])[..]
    );
}

#[test]
fn times_are_rfc3339_utc_with_milliseconds() {
    for (ms, text) in [
        (0, "1970-01-01T00:00:00.000Z"),
        (951_782_400_123, "2000-02-29T00:00:00.123Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        (1_796_571_301_005, "2026-12-06T15:35:01.005Z"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
    ] {
        let mut out = Vec::new();
        cloudevents::rfc3339(ms, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), text, "{ms}");
    }
}

#[test]
fn an_envelope_holds_the_payload_and_the_placed_fields_and_a_partition_is_kept() {
    let fields: Vec<(Arc<str>, Option<&[u8]>)> = vec![
        (Arc::from("schemaVersion"), Some(&b"3"[..])),
        (Arc::from("tenant"), None),
    ];
    for (payload, kind, expected) in [
        (
            &br#"{"total": 10}"#[..],
            PayloadKind::Json,
            serde_json::json!({"total": 10}),
        ),
        (
            b"total=10",
            PayloadKind::Text,
            serde_json::json!("total=10"),
        ),
        (b"\x00\xffA", PayloadKind::Binary, serde_json::json!("AP9B")),
    ] {
        let e = Event {
            envelope: &fields,
            partition: Some(2),
            ..event(Some(payload), kind)
        };
        let mut scratch = Scratch::default();
        let r = Record::shaped("t", e, STAMP, &Format::Plain, &mut scratch).unwrap();
        assert_eq!(r.partition, Some(2));
        let value: serde_json::Value = serde_json::from_slice(r.payload.unwrap()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"payload": expected, "schemaVersion": "3", "tenant": null})
        );
        // In structured mode the envelope is the data.
        let format = cloudevents(cloudevents::Mode::Structured);
        let mut scratch = Scratch::default();
        let r = Record::shaped("t", e, STAMP, &format, &mut scratch).unwrap();
        let value: serde_json::Value = serde_json::from_slice(r.payload.unwrap()).unwrap();
        assert_eq!(value["data"]["payload"], expected);
        assert_eq!(value["datacontenttype"], "application/json");
    }
    let tombstone = Event {
        envelope: &fields,
        ..event(None, PayloadKind::Json)
    };
    let mut scratch = Scratch::default();
    let r = Record::shaped("t", tombstone, STAMP, &Format::Plain, &mut scratch).unwrap();
    assert_eq!(r.payload, None, "a tombstone has no envelope");
}

#[test]
fn json_strings_escape_what_json_needs_and_keep_the_rest() {
    for text in [
        "plain",
        "say \"hi\"\\ now",
        "tab\tnew\nline\r\u{1}\u{1f}",
        "ünïcødé ✓ 𝄞",
        "",
    ] {
        let mut out = Vec::new();
        cloudevents::push_json_string(&mut out, text.as_bytes());
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, text);
    }
    let mut out = Vec::new();
    cloudevents::push_json_string(&mut out, b"a\xffb");
    let back: String = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        back, "a\u{fffd}b",
        "invalid UTF-8 is replaced, never passed on"
    );
}
