//! Unit tests of the statements the outbox builds: SQL, bound values, batching and events.

use super::*;

fn event() -> OutboxEvent {
    OutboxEvent::new("order", "42", "OrderPaid", serde_json::json!({"a": "it's"}))
}

#[test]
fn row_statement_quotes_names_and_binds_values() {
    let outbox = Outbox::new()
        .with_table(Some("app\"x"), "out box")
        .with_payload_type(PayloadType::Bytea);
    let e = event();
    let s = outbox
        .statements(std::slice::from_ref(&e))
        .unwrap()
        .remove(0);
    assert_eq!(
        s.sql,
        "INSERT INTO \"app\"\"x\".\"out box\" (\"id\", \"aggregatetype\", \"aggregateid\", \
         \"type\", \"payload\") VALUES ($1::text::uuid, $2::text, $3::text, $4::text, \
         convert_to($5::text, 'UTF8'))"
    );
    assert_eq!(
        s.params,
        vec![
            Some(e.id.to_string()),
            Some("order".into()),
            Some("42".into()),
            Some("OrderPaid".into()),
            Some(r#"{"a":"it's"}"#.into()),
        ]
    );
}

#[test]
fn empty_id_and_type_columns_are_left_out_and_null_is_a_tombstone() {
    let outbox = Outbox::new()
        .with_table(None, "outbox")
        .with_columns(Columns {
            id: String::new(),
            event_type: String::new(),
            ..Columns::default()
        });
    let s = outbox
        .statements(&[OutboxEvent::tombstone("order", "42", "Deleted")])
        .unwrap()
        .remove(0);
    assert_eq!(
        s.sql,
        "INSERT INTO \"outbox\" (\"aggregatetype\", \"aggregateid\", \"payload\") \
         VALUES ($1::text, $2::text, $3::text::jsonb)"
    );
    assert_eq!(s.params[2], None);
}

#[test]
fn message_content_uses_the_column_names() {
    let outbox = Outbox::messages("events").with_columns(Columns {
        aggregate_id: "key".into(),
        ..Columns::default()
    });
    let e = event();
    let s = outbox
        .statements(std::slice::from_ref(&e))
        .unwrap()
        .remove(0);
    assert_eq!(
        s.sql,
        "SELECT pg_logical_emit_message(true, $1::text, $2::text)"
    );
    assert_eq!(s.params[0].as_deref(), Some("events"));
    let content: Value = serde_json::from_str(s.params[1].as_deref().unwrap()).unwrap();
    assert_eq!(
        content,
        serde_json::json!({
            "id": e.id.to_string(), "aggregatetype": "order", "key": "42",
            "type": "OrderPaid", "payload": {"a": "it's"},
        })
    );
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn a_batch_of_rows_is_one_insert_with_every_events_columns() {
    let outbox = Outbox::new().with_payload_type(PayloadType::Bytea);
    let events = [
        OutboxEvent::bytes("order", "42", "Paid", vec![0, 255, b'A'])
            .with_trace_context(TRACEPARENT, Some("a=b".into())),
        event().with_header("tenant", Some("acme".into())),
    ];
    let s = outbox.statements(&events).unwrap().remove(0);
    assert_eq!(
        s.sql,
        "INSERT INTO \"public\".\"outbox\" (\"id\", \"aggregatetype\", \"aggregateid\", \
         \"type\", \"payload\", \"traceparent\", \"tracestate\", \"tenant\") VALUES \
         ($1::text::uuid, $2::text, $3::text, $4::text, decode($5::text, 'hex'), $6::text, \
         $7::text, NULL::text), ($8::text::uuid, $9::text, $10::text, $11::text, \
         convert_to($12::text, 'UTF8'), NULL::text, NULL::text, $13::text)"
    );
    assert_eq!(s.params[4].as_deref(), Some("00ff41"));
    assert_eq!(s.params[5].as_deref(), Some(TRACEPARENT));
    assert_eq!(s.params[12].as_deref(), Some("acme"));
    let err = Outbox::new()
        .statements(&events[..1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("PayloadType::Bytea"), "{err}");
}

#[test]
fn a_batch_of_messages_is_one_select_in_order_with_trace_and_headers() {
    let outbox = Outbox::messages("outbox");
    let events = [
        event().with_trace_context(TRACEPARENT, None),
        event().with_header("tenant", None),
    ];
    let s = outbox.statements(&events).unwrap().remove(0);
    assert!(
        s.sql
            .contains("json_array_elements($2::text::json) WITH ORDINALITY")
    );
    let contents: Vec<Value> = serde_json::from_str(s.params[1].as_deref().unwrap()).unwrap();
    assert_eq!(contents.len(), 2);
    assert_eq!(contents[0]["id"], events[0].id.to_string());
    assert_eq!(contents[0]["traceparent"], TRACEPARENT);
    assert_eq!(contents[1]["tenant"], Value::Null);
    let bytes = OutboxEvent::bytes("order", "42", "Paid", vec![1]);
    assert!(matches!(
        outbox.statements(&[bytes]),
        Err(Error::BinaryPayload(_))
    ));
}

#[cfg(feature = "opentelemetry")]
#[test]
fn the_current_span_becomes_the_trace_context() {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    assert_eq!(
        event().with_current_span().trace,
        None,
        "no span, no context"
    );
    let span = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("rojo", "00f067aa0ba902b7")]).unwrap(),
    );
    let _guard = opentelemetry::Context::new()
        .with_remote_span_context(span)
        .attach();
    assert_eq!(
        event().with_current_span().trace,
        Some(TraceContext {
            traceparent: TRACEPARENT.into(),
            tracestate: Some("rojo=00f067aa0ba902b7".into()),
        })
    );
}

#[test]
fn v7_ids_are_time_ordered() {
    let a = event().with_v7_id();
    let b = event().with_v7_id();
    assert_eq!(a.id.get_version_num(), 7);
    assert!(a.id < b.id || a.id.as_bytes()[..6] == b.id.as_bytes()[..6]);
}

/// `add`'s future is `Send` with every executor, so it can run in spawned tasks.
#[allow(dead_code)]
fn add_futures_are_send() {
    fn send<T: Send>(_: T) {}
    #[cfg(feature = "tokio-postgres")]
    {
        fn tokio_postgres(o: &Outbox, e: &OutboxEvent, tx: &tokio_postgres::Transaction<'_>) {
            send(o.add(tx, e));
        }
        fn generic(o: &Outbox, e: &OutboxEvent, c: &(impl tokio_postgres::GenericClient + Sync)) {
            send(o.add(c, e));
        }
    }
    #[cfg(feature = "sqlx")]
    {
        fn sqlx(o: &Outbox, e: &OutboxEvent, tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) {
            send(o.add(tx, e));
        }
        fn conn(o: &Outbox, e: &OutboxEvent, c: &mut sqlx::PgConnection) {
            send(o.add(c, e));
        }
    }
}

#[test]
fn serialized_payloads_and_ids() {
    #[derive(Serialize)]
    struct Paid {
        id: u32,
    }
    let id = Uuid::new_v4();
    let e = OutboxEvent::serialized("order", "42", "OrderPaid", &Paid { id: 42 })
        .unwrap()
        .with_id(id);
    assert_eq!(e.payload, serde_json::json!({"id": 42}));
    assert_eq!(e.id, id);
    assert_ne!(event().id, event().id, "fresh ids");
}
