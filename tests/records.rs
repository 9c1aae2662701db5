//! The records consumers get (docs/src/records.md), end to end: walship's own, CloudEvents in
//! binary and structured mode, and the writer's trace context, for jsonb, text and bytea
//! payloads, tombstones and logical messages, read back header by header.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{self, Consumed, Relay, TIMEOUT, TestDb, broker, consume, topic};

const SETTLE: Duration = Duration::from_secs(1);
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "rojo=00f067aa0ba902b7";
const TYPE: &str = "OrderCreated";

/// What each record of the scenario is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Jsonb,
    Tombstone,
    Message,
    Text,
    Bytea,
}

/// The scenario, in commit order, all of key `42`: a jsonb row with a trace context, a
/// tombstone, a logical message with a trace context, a text row with a malformed traceparent
/// (dropped; walship goes on), a bytea row. The payload column changes type mid-stream, which
/// walship follows from the Relation messages.
async fn scenario(extra: &str) -> (Vec<(Kind, String, Consumed)>, Relay, u16) {
    let db = TestDb::new().await;
    db.client
        .batch_execute("ALTER TABLE outbox ADD COLUMN traceparent text, ADD COLUMN tracestate text")
        .await
        .expect("trace columns");
    let port = harness::process::free_port();
    let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let toml = harness::config_toml(&db, &broker().bootstrap, &metrics).replace(
        "[outbox]\n",
        &format!(
            "[outbox]\nmessage_prefixes = [\"outbox\"]\ntraceparent_column = \"traceparent\"\n\
             tracestate_column = \"tracestate\"\n{extra}"
        ),
    );
    let config = walship::Config::from_toml(&toml, std::iter::empty(), "test").expect("config");
    let relay = Relay::start_streaming(config, &db).await;

    let mut ids = Vec::new();
    let insert = async |payload: &str, traceparent: Option<&str>, tracestate: Option<&str>| {
        let id = uuid::Uuid::new_v4().to_string();
        db.client
            .execute(
                &format!(
                    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, traceparent, tracestate) \
                     VALUES ($1::text::uuid, 'order', '42', '{TYPE}', {payload}, $2, $3)"
                ),
                &[&id, &traceparent, &tracestate],
            )
            .await
            .expect("insert");
        id
    };
    ids.push(insert("'{\"total\": 10}'", Some(TRACEPARENT), Some(TRACESTATE)).await);
    ids.push(insert("NULL", None, None).await);
    let message_id = uuid::Uuid::new_v4().to_string();
    let content = json!({
        "id": message_id, "aggregatetype": "order", "aggregateid": "42", "type": TYPE,
        "payload": {"total": 11}, "traceparent": TRACEPARENT,
    });
    db.client
        .execute(
            "SELECT pg_logical_emit_message(true, 'outbox', $1)",
            &[&content.to_string()],
        )
        .await
        .expect("emit");
    ids.push(message_id);
    db.client
        .batch_execute("ALTER TABLE outbox ALTER COLUMN payload TYPE text USING payload::text")
        .await
        .expect("to text");
    ids.push(insert("'total=10'", Some("00-not-a-traceparent"), Some(TRACESTATE)).await);
    db.client
        .batch_execute(
            "ALTER TABLE outbox ALTER COLUMN payload TYPE bytea USING convert_to(payload, 'UTF8')",
        )
        .await
        .expect("to bytea");
    ids.push(insert("'\\x00ff41'::bytea", None, None).await);
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        5,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(records.len(), 5, "every event once: {records:#?}");
    let mut records = records;
    records.sort_by_key(|r| r.offset);
    let kinds = [
        Kind::Jsonb,
        Kind::Tombstone,
        Kind::Message,
        Kind::Text,
        Kind::Bytea,
    ];
    let out = kinds
        .into_iter()
        .zip(ids)
        .zip(records)
        .map(|((k, id), r)| (k, id, r))
        .collect();
    (out, relay, port)
}

/// The header names of a record, in the order walship wrote them.
fn names(r: &Consumed) -> Vec<&str> {
    r.headers.keys().map(String::as_str).collect()
}

fn common(kind: Kind, id: &str, r: &Consumed) {
    assert_eq!(r.key_str(), "42");
    assert_eq!(r.header("id").as_deref(), Some(id), "{kind:?}");
    assert_eq!(r.header("type").as_deref(), Some(TYPE));
    assert!(r.header("walship.position").is_some());
    let trace = r.header("traceparent");
    match kind {
        Kind::Jsonb => {
            assert_eq!(trace.as_deref(), Some(TRACEPARENT), "arrives unchanged");
            assert_eq!(r.header("tracestate").as_deref(), Some(TRACESTATE));
        }
        Kind::Message => {
            assert_eq!(trace.as_deref(), Some(TRACEPARENT));
            assert_eq!(r.header("tracestate"), None);
        }
        _ => {
            assert_eq!(trace, None, "{kind:?}: malformed or none: left off");
            assert_eq!(r.header("tracestate"), None, "{kind:?}");
        }
    }
}

fn payload(kind: Kind) -> Option<&'static [u8]> {
    match kind {
        Kind::Jsonb => Some(br#"{"total": 10}"#),
        Kind::Tombstone => None,
        Kind::Message => Some(br#"{"total":11}"#),
        Kind::Text => Some(b"total=10"),
        Kind::Bytea => Some(b"\x00\xffA"),
    }
}

fn content_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Text => "text/plain; charset=utf-8",
        Kind::Bytea => "application/octet-stream",
        _ => "application/json",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_keep_the_payload_as_stored_and_carry_a_well_formed_trace_context() {
    let (records, relay, port) = scenario("").await;
    for (kind, id, r) in &records {
        common(*kind, id, r);
        assert_eq!(r.payload.as_deref(), payload(*kind), "{kind:?}");
        assert!(
            !names(r)
                .iter()
                .any(|n| n.starts_with("ce_") || *n == "content-type"),
            "{kind:?}: {:?}",
            names(r)
        );
    }
    let metrics = crate::metrics::get(port, "/metrics").1;
    assert_eq!(
        crate::metrics::value(&metrics, "walship_trace_context_dropped_total"),
        1.0,
        "the malformed traceparent is counted"
    );
    relay
        .stop()
        .await
        .expect("a malformed traceparent does not stop walship");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_cloudevents_put_the_attributes_in_headers_and_the_payload_in_the_value() {
    let (records, relay, _) = scenario("cloudevents = \"binary\"\n").await;
    for (kind, id, r) in &records {
        common(*kind, id, r);
        assert_eq!(r.payload.as_deref(), payload(*kind), "{kind:?}");
        assert_eq!(r.header("ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(r.header("ce_id").as_deref(), Some(id.as_str()));
        assert_eq!(r.header("ce_source").as_deref(), Some("/outbox/order"));
        assert_eq!(r.header("ce_type").as_deref(), Some(TYPE));
        assert_eq!(r.header("ce_subject").as_deref(), Some("42"));
        let time = r.header("ce_time").expect("ce_time");
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{time}"
        );
        let expected = (*kind != Kind::Tombstone).then(|| content_type(*kind));
        assert_eq!(r.header("content-type").as_deref(), expected, "{kind:?}");
    }
    relay.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_cloudevents_hold_the_event_as_json_and_a_tombstone_stays_one() {
    let (records, relay, _) = scenario("cloudevents = \"structured\"\n").await;
    for (kind, id, r) in &records {
        common(*kind, id, r);
        if *kind == Kind::Tombstone {
            assert_eq!(r.payload, None, "a tombstone stays a tombstone");
            assert_eq!(r.header("ce_id").as_deref(), Some(id.as_str()));
            assert_eq!(r.header("content-type"), None);
            continue;
        }
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/cloudevents+json; charset=UTF-8")
        );
        assert_eq!(r.header("ce_id"), None, "attributes are in the value");
        let event: Value = r.json();
        let time = event["time"].as_str().expect("time").to_owned();
        let mut expected = json!({
            "specversion": "1.0", "id": id, "source": "/outbox/order", "type": TYPE,
            "time": time, "subject": "42", "datacontenttype": content_type(*kind),
        });
        match kind {
            Kind::Jsonb => expected["data"] = json!({"total": 10}),
            Kind::Message => expected["data"] = json!({"total": 11}),
            Kind::Text => expected["data"] = json!("total=10"),
            _ => expected["data_base64"] = json!("AP9B"),
        }
        assert_eq!(event, expected, "{kind:?}");
    }
    relay.stop().await.expect("graceful stop");
}

/// Debezium's router options: additional placement (header with a name, envelope, partition),
/// the event time column, an empty payload as a tombstone; for rows of each payload type and a
/// logical message; a partition that is no number is a bad row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_options_place_fields_time_and_tombstones_as_configured() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "ALTER TABLE outbox ADD COLUMN tenant text, ADD COLUMN version text, \
             ADD COLUMN shard text, ADD COLUMN occurred_at timestamptz",
        )
        .await
        .expect("columns");
    let dlq = format!("{}_dlq", db.slot());
    let toml = harness::config_toml(&db, &broker().bootstrap, "").replace(
        "[outbox]\n",
        &format!(
            "[outbox]\nmessage_prefixes = [\"outbox\"]\n\
             additional_placement = [\"tenant:header:tenantId\", \"version:envelope:schemaVersion\", \"shard:partition\"]\n\
             timestamp_column = \"occurred_at\"\ntombstone_on_empty_payload = true\n\
             on_bad_row = \"dead-letter\"\ndead_letter_topic = \"{dlq}\"\n"
        ),
    );
    let config = walship::Config::from_toml(&toml, std::iter::empty(), "test").expect("config");
    let relay = Relay::start_streaming(config, &db).await;

    let insert = async |payload: &str, shard: Option<&str>| {
        let id = uuid::Uuid::new_v4().to_string();
        db.client
            .execute(
                &format!(
                    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, tenant, version, shard, occurred_at) \
                     VALUES ($1::text::uuid, 'order', '42', '{TYPE}', {payload}, 'acme', '3', $2, \
                     '2026-12-06 17:35:01.005+02')"
                ),
                &[&id, &shard],
            )
            .await
            .expect("insert");
        id
    };
    let jsonb = insert("'{\"total\": 10}'", Some("2")).await;
    let tombstone = insert("NULL", Some("2")).await;
    let bad = insert("'{}'", Some("two")).await;
    let message = uuid::Uuid::new_v4().to_string();
    let content = json!({
        "id": message, "aggregatetype": "order", "aggregateid": "42", "type": TYPE,
        "payload": {"total": 11}, "tenant": "m", "version": 4, "shard": 1,
        "occurred_at": 1_796_571_301_005_i64,
    });
    db.client
        .execute(
            "SELECT pg_logical_emit_message(true, 'outbox', $1)",
            &[&content.to_string()],
        )
        .await
        .expect("emit");
    db.client
        .batch_execute("ALTER TABLE outbox ALTER COLUMN payload TYPE text USING payload::text")
        .await
        .expect("to text");
    let empty = insert("''", Some("0")).await;
    let text = insert("'total=10'", Some("0")).await;
    db.client
        .batch_execute(
            "ALTER TABLE outbox ALTER COLUMN payload TYPE bytea USING convert_to(payload, 'UTF8')",
        )
        .await
        .expect("to bytea");
    let bytea = insert("'\\x00ff41'::bytea", Some("0")).await;
    db.await_caught_up().await;

    let records = consume(
        &broker().bootstrap,
        &[&topic(&db, "order")],
        6,
        TIMEOUT,
        SETTLE,
    );
    assert_eq!(records.len(), 6, "{records:#?}");
    let by_id = |id: &str| {
        records
            .iter()
            .find(|r| r.header("id").as_deref() == Some(id))
            .unwrap_or_else(|| panic!("record {id}"))
    };
    let envelope = |r: &Consumed| -> Value { r.json() };
    for (id, partition, value) in [
        (
            &jsonb,
            2,
            Some(json!({"payload": {"total": 10}, "schemaVersion": "3"})),
        ),
        (&tombstone, 2, None),
        (
            &message,
            1,
            Some(json!({"payload": {"total": 11}, "schemaVersion": "4"})),
        ),
        (&empty, 0, None),
        (
            &text,
            0,
            Some(json!({"payload": "total=10", "schemaVersion": "3"})),
        ),
        (
            &bytea,
            0,
            Some(json!({"payload": "AP9B", "schemaVersion": "3"})),
        ),
    ] {
        let r = by_id(id);
        assert_eq!(
            r.partition, partition,
            "the row's partition, not the key's hash"
        );
        assert_eq!(r.payload.as_ref().map(|_| envelope(r)), value, "{id}");
        assert_eq!(
            r.timestamp_ms,
            Some(1_796_571_301_005),
            "the event time, not the commit time"
        );
        let tenant = if id == &message { "m" } else { "acme" };
        assert_eq!(r.header("tenantId").as_deref(), Some(tenant));
        for placed in ["tenant", "version", "shard", "schemaVersion"] {
            assert_eq!(r.header(placed), None, "{placed} is placed elsewhere");
        }
    }
    let dead = consume(&broker().bootstrap, &[&dlq], 1, TIMEOUT, SETTLE);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("id").as_deref(), Some(bad.as_str()));
    let error = dead[0].header("walship.error").expect("reason");
    assert!(
        error.contains("\"shard\"") && error.contains("partition"),
        "{error}"
    );
    relay.stop().await.expect("graceful stop");
}

/// Debezium's `route.topic.regex`: groups of the aggregate type name the topic, for rows and
/// messages; a value that does not match is a bad row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_regex_routes_rows_and_messages_by_its_groups() {
    let db = TestDb::new().await;
    let slot = db.slot().to_owned();
    let dlq = format!("{slot}_dlq");
    let toml = harness::config_toml(&db, &broker().bootstrap, "").replace(
        &format!("topic = \"{slot}.{{aggregatetype}}\"\n"),
        &format!(
            "topic = \"{slot}.{{domain}}\"\ntopic_regex = \"(?<domain>[a-z]+)\\\\.[a-z]+\"\n\
                 message_prefixes = [\"outbox\"]\non_bad_row = \"dead-letter\"\n\
                 dead_letter_topic = \"{dlq}\"\n"
        ),
    );
    assert!(toml.contains("topic_regex"), "{toml}");
    let config = walship::Config::from_toml(&toml, std::iter::empty(), "test").expect("config");
    let relay = Relay::start_streaming(config, &db).await;
    for aggregate_type in ["shop.order", "Shop.order"] {
        db.client
            .execute(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) \
                 VALUES ($1, '42', 'Placed', '{}')",
                &[&aggregate_type],
            )
            .await
            .expect("insert");
    }
    let content = json!({
        "id": uuid::Uuid::new_v4().to_string(), "aggregatetype": "shop.invoice",
        "aggregateid": "42", "type": "Issued", "payload": {},
    });
    db.client
        .execute(
            "SELECT pg_logical_emit_message(true, 'outbox', $1)",
            &[&content.to_string()],
        )
        .await
        .expect("emit");
    db.await_caught_up().await;
    let records = consume(
        &broker().bootstrap,
        &[&format!("{slot}.shop")],
        2,
        TIMEOUT,
        SETTLE,
    );
    let types: Vec<String> = records.iter().filter_map(|r| r.header("type")).collect();
    assert_eq!(types, ["Placed", "Issued"], "both to the domain's topic");
    let dead = consume(&broker().bootstrap, &[&dlq], 1, TIMEOUT, SETTLE);
    let error = dead[0].header("walship.error").expect("reason");
    assert!(
        error.contains("does not match outbox.topic_regex"),
        "{error}"
    );
    relay.stop().await.expect("graceful stop");
}
