use super::*;
use crate::ident::TableName;

fn spec() -> OutboxSpec {
    let mut spec = OutboxSpec::debezium(TableName::parse("outbox"));
    spec.header_columns = vec!["tenant".into(), "trace".into()];
    spec
}

fn parse(content: &str) -> Result<MessageEvent, MessageError> {
    MessageEvent::parse(&spec(), content.as_bytes())
}

#[test]
fn trace_context_fields_are_strings_or_nothing() {
    let mut spec = spec();
    spec.traceparent = "traceparent".into();
    spec.tracestate = "tracestate".into();
    let event = MessageEvent::parse(
        &spec,
        br#"{"id":"u1","aggregatetype":"order","aggregateid":"42","payload":1,
            "traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tracestate":{"not":"a string"}}"#,
    )
    .unwrap();
    let row = event.row();
    assert_eq!(
        row.traceparent,
        Some(&b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..])
    );
    assert_eq!(
        row.tracestate, None,
        "not a string: no context, not an error"
    );
    assert_eq!(row.payload_type, PayloadType::Json);
}

#[test]
fn the_row_contract_fields_become_the_row() {
    let event = parse(
        r#"{"id":"u1","aggregatetype":"order","aggregateid":"42","type":"OrderUpdated",
            "payload":{"total": 10, "big": 123456789012345678901234567890},
            "tenant":"acme","trace":{"a":1},"other":true}"#,
    )
    .unwrap();
    let row = event.row();
    assert_eq!(row.id, Some(&b"u1"[..]));
    assert_eq!(row.aggregate_type, Some(&b"order"[..]));
    assert_eq!(row.aggregate_id, b"42");
    assert_eq!(row.event_type, Some(&b"OrderUpdated"[..]));
    assert_eq!(
        row.payload.as_deref(),
        Some(&br#"{"total": 10, "big": 123456789012345678901234567890}"#[..]),
        "the payload's JSON text as written: no reordering, no precision lost"
    );
    assert_eq!(
        row.headers,
        vec![
            (Arc::from("tenant"), Some(&b"acme"[..])),
            (Arc::from("trace"), Some(&br#"{"a":1}"#[..]))
        ]
    );
}

#[test]
fn strings_are_unescaped_and_integers_taken_as_their_digits() {
    let event = parse(r#"{"id":"u\u0031","aggregatetype":"ord\"er","aggregateid":-42,"type":"t"}"#)
        .unwrap();
    let row = event.row();
    assert_eq!(row.id, Some(&b"u1"[..]));
    assert_eq!(row.aggregate_type, Some(&b"ord\"er"[..]));
    assert_eq!(row.aggregate_id, b"-42");
}

#[test]
fn null_or_missing_payload_is_a_tombstone_and_missing_optionals_are_absent() {
    for content in [
        r#"{"id":"u1","aggregatetype":"order","aggregateid":"42","payload":null}"#,
        r#"{"id":"u1","aggregatetype":"order","aggregateid":"42"}"#,
    ] {
        let event = parse(content).unwrap();
        let row = event.row();
        assert_eq!(row.payload, None, "{content}");
        assert_eq!(row.event_type, None, "{content}");
        assert_eq!(
            row.headers,
            vec![(Arc::from("tenant"), None), (Arc::from("trace"), None)]
        );
    }
    let event =
        parse(r#"{"id":"u1","aggregatetype":"o","aggregateid":"1","payload":"s"}"#).unwrap();
    assert_eq!(
        event.row().payload.as_deref(),
        Some(&b"\"s\""[..]),
        "a string payload is sent as its JSON text"
    );
}

#[test]
fn configured_names_are_the_field_names() {
    let mut spec = spec();
    spec.aggregate_id = "key".into();
    spec.payload = "body".into();
    spec.id = String::new();
    spec.aggregate_type = String::new();
    let event = MessageEvent::parse(&spec, br#"{"key":"k","body":[1],"aggregateid":"x"}"#).unwrap();
    let row = event.row();
    assert_eq!(row.aggregate_id, b"k");
    assert_eq!(row.payload.as_deref(), Some(&b"[1]"[..]));
    assert_eq!(
        row.id, None,
        "no id column configured: no id, none required"
    );
    assert_eq!(row.aggregate_type, None);
}

#[test]
fn malformed_content_names_what_was_wrong() {
    let err = |content: &str| parse(content).unwrap_err().to_string();
    let e = err("not json");
    assert!(e.contains("not JSON"), "{e}");
    let e = err(r#"{"aggregateid": "1""#);
    assert!(e.contains("not JSON"), "{e}");
    let e = err(r#"["aggregateid"]"#);
    assert!(e.contains("a JSON array, not an object"), "{e}");
    let e = err(r#""text""#);
    assert!(e.contains("a JSON string, not an object"), "{e}");
    let e = err(r#"{"id":"u1","aggregatetype":"order","aggregateid":null}"#);
    assert!(
        e.contains("\"aggregateid\"")
            && e.contains("outbox.aggregate_id_column")
            && e.contains("missing or null"),
        "{e}"
    );
    let e = err(r#"{"id":"u1","aggregateid":"1"}"#);
    assert!(
        e.contains("\"aggregatetype\"") && e.contains("outbox.aggregate_type_column"),
        "{e}"
    );
    let e = err(r#"{"aggregatetype":"o","aggregateid":"1"}"#);
    assert!(
        e.contains("\"id\"") && e.contains("outbox.id_column"),
        "{e}"
    );
    let e = err(r#"{"id":"u1","aggregatetype":"o","aggregateid":4.5}"#);
    assert!(
        e.contains("\"aggregateid\"") && e.contains("fraction or exponent"),
        "{e}"
    );
    let e = err(r#"{"id":"u1","aggregatetype":{"a":1},"aggregateid":"1"}"#);
    assert!(e.contains("\"aggregatetype\" is a JSON object"), "{e}");
    let e = err(r#"{"id":true,"aggregatetype":"o","aggregateid":"1"}"#);
    assert!(e.contains("\"id\" is a JSON boolean"), "{e}");
    let e = err(r#"{"id":"u1","aggregatetype":"o","aggregateid":"1","type":1e3}"#);
    assert!(e.contains("\"type\""), "{e}");
}

#[test]
fn the_last_of_duplicated_fields_counts_as_in_jsonb() {
    let event =
        parse(r#"{"id":"u1","aggregatetype":"o","aggregateid":"1","aggregateid":"2"}"#).unwrap();
    assert_eq!(event.row().aggregate_id, b"2");
}
