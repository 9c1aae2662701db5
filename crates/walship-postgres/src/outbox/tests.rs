use super::*;
use bytes::Bytes;
use pgoutput::{Decoder, Message, RelationColumn};

fn rel(cols: &[(&str, u32)]) -> Relation {
    Relation {
        xid: None,
        id: 7,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns: cols
            .iter()
            .map(|(n, t)| RelationColumn {
                flags: 0,
                name: (*n).into(),
                type_oid: *t,
                type_modifier: -1,
            })
            .collect(),
    }
}

fn insert(values: &[Option<&[u8]>]) -> TupleData {
    let mut raw = vec![b'I'];
    raw.extend_from_slice(&7u32.to_be_bytes());
    raw.push(b'N');
    raw.extend_from_slice(&(values.len() as u16).to_be_bytes());
    for v in values {
        match v {
            None => raw.push(b'n'),
            Some(b) => {
                raw.push(b't');
                raw.extend_from_slice(&(b.len() as i32).to_be_bytes());
                raw.extend_from_slice(b);
            }
        }
    }
    match Decoder::new(1).decode(Bytes::from(raw)) {
        Ok(Message::Insert(i)) => i.tuple,
        other => panic!("{other:?}"),
    }
}

const COLS: &[(&str, u32)] = &[
    ("id", 2950),
    ("aggregatetype", 25),
    ("aggregateid", 25),
    ("type", 25),
    ("payload", 3802),
    ("tenant", 25),
];

#[test]
fn extracts_debezium_columns_and_headers() {
    let mut spec = OutboxSpec::debezium(TableName::parse("outbox"));
    spec.header_columns = vec!["tenant".into()];
    let mut r = Relations::new(spec);
    r.update(rel(COLS));
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        Some(b"42"),
        Some(b"created"),
        Some(b"{}"),
        None,
    ]);
    let row = r.extract(7, &t).unwrap();
    assert_eq!(row.id, Some(&b"u1"[..]));
    assert_eq!(row.aggregate_type, Some(&b"order"[..]));
    assert_eq!(row.aggregate_id, b"42");
    assert_eq!(row.event_type, Some(&b"created"[..]));
    assert_eq!(row.payload.as_deref(), Some(&b"{}"[..]));
    assert_eq!(row.headers, vec![(Arc::from("tenant"), None)]);
}

#[test]
fn trace_context_columns_and_the_payload_type_are_extracted() {
    let mut spec = OutboxSpec::debezium(TableName::parse("outbox"));
    spec.traceparent = "traceparent".into();
    spec.tracestate = "tracestate".into();
    let mut r = Relations::new(spec.clone());
    let mut cols = COLS.to_vec();
    cols.extend([("traceparent", 25), ("tracestate", 25)]);
    r.update(rel(&cols));
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        Some(b"42"),
        Some(b"created"),
        Some(b"{}"),
        None,
        Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        None,
    ]);
    let row = r.extract(7, &t).unwrap();
    assert_eq!(
        row.traceparent,
        Some(&b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..])
    );
    assert_eq!(row.tracestate, None);
    assert_eq!(row.payload_type, PayloadType::Json, "jsonb");
    for (oid, kind) in [(25, PayloadType::Text), (oid::BYTEA, PayloadType::Bytea)] {
        cols[4].1 = oid;
        r.update(rel(&cols));
        let t = insert(&[
            Some(b"u1"),
            Some(b"order"),
            Some(b"42"),
            Some(b"created"),
            Some(b"\\x00"),
            None,
            None,
            None,
        ]);
        assert_eq!(r.extract(7, &t).unwrap().payload_type, kind);
    }
    // A configured trace column the table lacks is a missing column, like any other.
    let mut r = Relations::new(spec);
    r.update(rel(COLS));
    let t = insert(&[Some(b"u1"), Some(b"order"), Some(b"42"), None, None, None]);
    let err = r.extract(7, &t).unwrap_err().to_string();
    assert!(err.contains("outbox.traceparent_column"), "{err}");
}

#[test]
fn event_times_are_read_from_integers_and_postgres_timestamps() {
    for (text, ms) in [
        ("1796571301005", Some(1_796_571_301_005)),
        ("2026-12-06 15:35:01.005+00", Some(1_796_571_301_005)),
        ("2026-12-06 15:35:01.005123+00", Some(1_796_571_301_005)),
        ("2026-12-06 17:35:01.005+02", Some(1_796_571_301_005)),
        ("2026-12-06 10:05:01.005-05:30", Some(1_796_571_301_005)),
        ("2026-12-06 15:35:01.005", Some(1_796_571_301_005)),
        ("2026-12-06T15:35:01Z", Some(1_796_571_301_000)),
        ("1970-01-01 00:00:00+00", Some(0)),
        ("2000-02-29 00:00:00+00", Some(951_782_400_000)),
        ("infinity", None),
        ("2026-13-06 15:35:01+00", None),
        ("2026-12-06 15:35:01+0", None),
        ("2026-12-06 15:35:01.+00", None),
        ("06.12.2026 15:35", None),
    ] {
        assert_eq!(timestamp_millis(text.as_bytes()), ms, "{text}");
    }
}

#[test]
fn null_payload_is_a_tombstone_but_null_key_is_an_error() {
    let mut r = Relations::new(OutboxSpec::debezium(TableName::parse("outbox")));
    r.update(rel(COLS));
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        Some(b"42"),
        Some(b"created"),
        None,
        None,
    ]);
    assert_eq!(r.extract(7, &t).unwrap().payload, None);
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        None,
        Some(b"created"),
        Some(b"{}"),
        None,
    ]);
    let err = r.extract(7, &t).unwrap_err().to_string();
    assert!(
        err.contains("\"aggregateid\"") && err.contains("NULL"),
        "{err}"
    );
}

#[test]
fn missing_column_names_column_and_key() {
    let mut spec = OutboxSpec::debezium(TableName::parse("outbox"));
    spec.event_type = "kind".into();
    let mut r = Relations::new(spec);
    r.update(rel(COLS));
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        Some(b"42"),
        Some(b"created"),
        Some(b"{}"),
        None,
    ]);
    let err = r.extract(7, &t).unwrap_err().to_string();
    assert!(
        err.contains("\"kind\"") && err.contains("outbox.type_column"),
        "{err}"
    );
}

#[test]
fn bytea_payload_is_decoded_from_hex() {
    let mut r = Relations::new(OutboxSpec::debezium(TableName::parse("outbox")));
    let mut cols = COLS.to_vec();
    cols[4].1 = oid::BYTEA;
    r.update(rel(&cols));
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        Some(b"42"),
        Some(b"x"),
        Some(b"\\x00ff41"),
        None,
    ]);
    assert_eq!(
        r.extract(7, &t).unwrap().payload.as_deref(),
        Some(&[0u8, 0xff, b'A'][..])
    );
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        Some(b"42"),
        Some(b"x"),
        Some(b"\\x0"),
        None,
    ]);
    assert!(matches!(r.extract(7, &t), Err(RowError::BadBytea { .. })));
}

#[test]
fn row_json_names_columns_and_escapes() {
    let mut r = Relations::new(OutboxSpec::debezium(TableName::parse("outbox")));
    r.update(rel(COLS));
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        None,
        Some(b"q\"\\\n"),
        Some(b"{}"),
        None,
    ]);
    assert_eq!(
        r.row_json(7, &t),
        r#"{"id":"u1","aggregatetype":"order","aggregateid":null,"type":"q\"\\\u000a","payload":"{}","tenant":null}"#
    );
}

#[test]
fn other_tables_are_not_outbox() {
    let mut r = Relations::new(OutboxSpec::debezium(TableName::parse("outbox")));
    let mut other = rel(COLS);
    other.name = "orders".into();
    r.update(other);
    assert!(!r.is_outbox(7));
}

fn named(id: u32, name: &str) -> Relation {
    let mut r = rel(COLS);
    r.id = id;
    r.name = name.into();
    r
}

fn scoped() -> Relations {
    let mut family = crate::catalog::OutboxFamily::single(TableName::parse("outbox"), 7);
    family.partitioned = true;
    family.members.insert(8, TableName::parse("outbox_default"));
    Relations::with_scope(
        OutboxSpec::debezium(TableName::parse("outbox")),
        OutboxScope { family },
        "pub",
        "walship",
    )
}

#[test]
fn partitions_and_a_renamed_outbox_are_the_outbox() {
    let mut r = scoped();
    assert_eq!(r.update(named(8, "outbox_default")), Placement::Known);
    assert!(
        r.is_outbox(8),
        "a known partition, published under its own name"
    );
    assert_eq!(r.update(named(7, "outbox_renamed")), Placement::Known);
    assert!(r.is_outbox(7), "the outbox's OID under a new name");
    assert_eq!(r.update(named(9, "outbox")), Placement::Known);
    assert!(
        r.is_outbox(9),
        "a table replacing the outbox under its name"
    );
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        Some(b"42"),
        Some(b"created"),
        Some(b"{}"),
        None,
    ]);
    assert_eq!(r.extract(8, &t).unwrap().aggregate_id, b"42");
}

#[test]
fn a_table_without_the_outbox_columns_is_another_table_without_asking() {
    let mut r = scoped();
    let mut orders = rel(&[("id", 20), ("total", 1700)]);
    orders.id = 30;
    orders.name = "orders".into();
    assert_eq!(r.update(orders), Placement::Known);
    assert!(matches!(r.target(30), Ok(RowTarget::Other(_))));
}

#[test]
fn relations_with_the_outbox_columns_are_placed_by_the_catalog_or_refused() {
    let mut r = scoped();
    // A partition attached after the session started.
    assert_eq!(
        r.update(named(20, "outbox_p20990101")),
        Placement::Lookup(20)
    );
    assert!(!r.is_outbox(20));
    assert!(r.target(20).is_err(), "refused until placed");
    r.place(20, true);
    assert!(r.is_outbox(20));
    // Not in the tree now: detached since, dropped, or a copy of the outbox. Refused.
    assert_eq!(
        r.update(named(22, "outbox_p20200101")),
        Placement::Lookup(22)
    );
    r.place(22, false);
    let err = r.target(22).err().expect("unplaced").to_string();
    assert!(
        err.contains("public.outbox_p20200101")
            && err.contains("OID 22")
            && err.contains("pg_replication_slot_advance('walship'")
            && err.contains("skips the whole transaction"),
        "{err}"
    );
}

#[test]
fn header_columns_come_in_the_settings_order_whatever_the_tables() {
    // The session pairs these one by one with their placements (header, envelope, partition):
    // the table's column order must not decide which value goes where.
    let mut spec = OutboxSpec::debezium(TableName::parse("outbox"));
    spec.header_columns = vec!["shard".into(), "tenant".into(), "shard".into()];
    let mut r = Relations::new(spec);
    let mut cols = COLS.to_vec();
    cols.push(("shard", 25));
    r.update(rel(&cols));
    let t = insert(&[
        Some(b"u1"),
        Some(b"order"),
        Some(b"42"),
        Some(b"created"),
        Some(b"{}"),
        Some(b"acme"),
        Some(b"3"),
    ]);
    let row = r.extract(7, &t).unwrap();
    assert_eq!(
        row.headers,
        vec![
            (Arc::from("shard"), Some(&b"3"[..])),
            (Arc::from("tenant"), Some(&b"acme"[..])),
            (Arc::from("shard"), Some(&b"3"[..])),
        ]
    );
}

#[test]
fn an_event_time_outside_1970_to_9999_is_a_bad_row() {
    let mut spec = OutboxSpec::debezium(TableName::parse("outbox"));
    spec.timestamp = "tenant".into();
    let mut r = Relations::new(spec);
    r.update(rel(COLS));
    let row = |t: &[u8]| {
        let values = [
            Some(&b"u1"[..]),
            Some(b"order"),
            Some(b"42"),
            Some(b"created"),
            Some(b"{}"),
            Some(t),
        ];
        r.extract(7, &insert(&values)).map(|row| row.timestamp_ms)
    };
    assert_eq!(row(b"1765035301005").unwrap(), Some(1_765_035_301_005));
    // Microseconds stored by mistake: year 57,900.
    assert!(matches!(
        row(b"1765035301005000"),
        Err(RowError::BadTimestamp { .. })
    ));
    assert!(matches!(row(b"-1"), Err(RowError::BadTimestamp { .. })));
    assert!(matches!(
        row(b"1969-12-31 23:59:59+00"),
        Err(RowError::BadTimestamp { .. })
    ));
}
