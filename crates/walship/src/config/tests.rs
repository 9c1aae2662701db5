//! Unit tests of the configuration: parsing, environment overrides, validation, secrets.
use super::*;
use crate::scheduling::CpuScheduling;
use walship_postgres::{ReadBatching, SslMode};

const MINIMAL: &str = "[postgres]\nurl = \"postgres://walship@localhost/app\"\n[kafka]\nbrokers = \"localhost:9092\"\n";

fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml(
        text,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        "test.toml",
    )
}

#[test]
fn minimal_config_gets_debezium_defaults() {
    let c = parse(MINIMAL, &[]).unwrap();
    assert_eq!(c.postgres.slot, "walship");
    assert_eq!(c.outbox.topic, "outbox.event.{aggregatetype}");
    assert_eq!(c.outbox_spec().aggregate_id, "aggregateid");
    assert_eq!(c.kafka.topic_partitions, 6);
}

#[test]
fn unknown_keys_are_named() {
    let e = parse(&format!("{MINIMAL}[run]\nshutdown_timout_ms = 5\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("shutdown_timout_ms"), "{e}");
    let e = parse(&format!("{MINIMAL}[bogus]\nx = 1\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("bogus"), "{e}");
}

#[test]
fn managed_producer_properties_are_refused_wherever_they_are_set() {
    for (table, line) in [
        ("librdkafka", "\"request.required.acks\" = \"1\""),
        ("librdkafka", "\"allow.auto.create.topics\" = \"true\""),
        ("secret_env", "\"acks\" = \"SOME_VAR\""),
        (
            "secret_files",
            "\"enable.idempotence\" = \"/run/secrets/x\"",
        ),
    ] {
        let e = parse(&format!("{MINIMAL}[kafka.{table}]\n{line}\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is managed by walship") && e.contains(table),
            "{e}"
        );
    }
}

#[test]
fn out_of_range_numbers_are_refused_with_the_accepted_range() {
    let e = parse(&format!("{MINIMAL}topic_replication_factor = 0\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("topic_replication_factor = 0") && e.contains("-1"),
        "{e}"
    );
    let c = parse(&format!("{MINIMAL}topic_replication_factor = -1\n"), &[]).unwrap();
    assert_eq!(c.kafka.topic_replication_factor, -1);
    let e = parse(MINIMAL, &[("WALSHIP_POSTGRES__WATCH_INTERVAL_MS", "0")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("watch_interval_ms = 0") && e.contains("100"),
        "{e}"
    );
}

#[test]
fn message_prefixes_default_to_none_and_come_from_the_file_and_the_environment() {
    assert!(
        parse(MINIMAL, &[])
            .unwrap()
            .outbox
            .message_prefixes
            .is_empty()
    );
    let c = parse(
        &format!("{MINIMAL}[outbox]\nmessage_prefixes = [\"outbox\", \"billing\"]\n"),
        &[],
    )
    .unwrap();
    assert_eq!(c.outbox.message_prefixes, ["outbox", "billing"]);
    let c = parse(
        MINIMAL,
        &[("WALSHIP_OUTBOX__MESSAGE_PREFIXES", "[\"outbox\"]")],
    )
    .unwrap();
    assert_eq!(c.outbox.message_prefixes, ["outbox"]);
    for bad in ["\"\"", "\"walship.heartbeat\""] {
        let e = parse(
            MINIMAL,
            &[("WALSHIP_OUTBOX__MESSAGE_PREFIXES", &format!("[{bad}]"))],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("outbox.message_prefixes") && e.contains("walship.heartbeat"),
            "{e}"
        );
    }
}

#[test]
fn topic_limits_default_to_any_type_and_a_thousand_topics() {
    let c = parse(MINIMAL, &[]).unwrap();
    assert!(c.outbox.allowed_aggregate_types.is_empty());
    assert_eq!(c.outbox.max_topics, 1000);
    let mut router = c.topic_router().unwrap();
    for i in 0..1000 {
        router.route(Some(format!("t{i}").as_bytes())).unwrap();
    }
    assert!(router.route(Some(b"one-more")).is_err());
}

#[test]
fn topic_limits_come_from_the_file_and_the_environment() {
    let file = format!(
        "{MINIMAL}[outbox]\nallowed_aggregate_types = [\"order\", \"customer\"]\nmax_topics = 5\n"
    );
    let c = parse(&file, &[]).unwrap();
    assert_eq!(c.outbox.allowed_aggregate_types, ["order", "customer"]);
    assert_eq!(c.outbox.max_topics, 5);
    let mut router = c.topic_router().unwrap();
    assert!(router.route(Some(b"order")).is_ok());
    assert!(router.route(Some(b"invoice")).is_err());

    // A list in the environment is a TOML array.
    let c = parse(
        MINIMAL,
        &[
            ("WALSHIP_OUTBOX__ALLOWED_AGGREGATE_TYPES", "[\"a\", \"b\"]"),
            ("WALSHIP_OUTBOX__MAX_TOPICS", "0"),
        ],
    )
    .unwrap();
    assert_eq!(c.outbox.allowed_aggregate_types, ["a", "b"]);
    assert_eq!(c.outbox.max_topics, 0);
    // A bare word is a string, not a list: the error names the variable.
    let e = parse(MINIMAL, &[("WALSHIP_OUTBOX__ALLOWED_AGGREGATE_TYPES", "a")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("WALSHIP_OUTBOX__ALLOWED_AGGREGATE_TYPES") && e.contains("sequence"),
        "{e}"
    );
    let e = parse(MINIMAL, &[("WALSHIP_OUTBOX__MAX_TOPICS", "-1")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("WALSHIP_OUTBOX__MAX_TOPICS") && e.contains("-1"),
        "{e}"
    );
}

#[test]
fn inconsistent_topic_limits_are_refused_with_the_fix() {
    let with = |lines: &str| format!("{MINIMAL}[outbox]\n{lines}\n");
    let e = parse(
        &with("topic = \"events\"\nallowed_aggregate_types = [\"order\"]"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("outbox.allowed_aggregate_types") && e.contains("{aggregatetype}"),
        "{e}"
    );
    let e = parse(
        &with("allowed_aggregate_types = [\"order\", \"bad type\"]"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("\"bad type\"") && e.contains("outbox.event.bad type"),
        "{e}"
    );
    let e = parse(
        &with("allowed_aggregate_types = [\"a\", \"b\", \"c\"]\nmax_topics = 2"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("lists 3 values") && e.contains("outbox.max_topics to at least 3"),
        "{e}"
    );
    assert!(
        parse(
            &with("allowed_aggregate_types = [\"a\", \"b\", \"c\"]\nmax_topics = 0"),
            &[]
        )
        .is_ok()
    );
}

#[test]
fn the_dead_letter_topic_is_exempt_from_the_bound_when_in_use() {
    let text = format!(
        "{MINIMAL}[outbox]\ntopic = \"{{aggregatetype}}\"\nmax_topics = 1\non_bad_row = \"dead-letter\"\ndead_letter_topic = \"dlq\"\n"
    );
    let mut router = parse(&text, &[]).unwrap().topic_router().unwrap();
    router.route(Some(b"order")).unwrap();
    assert!(router.route(Some(b"dlq")).is_ok());
    assert!(router.route(Some(b"other")).is_err());
}

#[test]
fn a_url_with_several_hosts_needs_a_session_target() {
    let with_url =
        |url: &str| format!("[postgres]\nurl = \"{url}\"\n[kafka]\nbrokers = \"k:9092\"\n");
    let e = parse(&with_url("postgres://w@pg1,pg2/app"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 hosts")
            && e.contains("primary")
            && e.contains("?target_session_attrs=read-write"),
        "{e}"
    );
    let e = parse(
        &with_url("host=pg1,pg2 user=w target_session_attrs=any"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("2 hosts"), "{e}");
    // read-write and primary: walship follows the primary, SQL and replication alike.
    for (url, target) in [
        (
            "postgres://w@pg1:5432,pg2:5433/app?target_session_attrs=read-write",
            walship_postgres::hosts::SessionTarget::ReadWrite,
        ),
        (
            "host=pg1,pg2 port=5432 user=w dbname=app target_session_attrs=primary",
            walship_postgres::hosts::SessionTarget::Primary,
        ),
    ] {
        let c = parse(&with_url(url), &[]).unwrap();
        let params = SourceSettings::resolve(&c).unwrap().params;
        assert_eq!(params.config.session_target, target, "{url}");
        assert_eq!(
            params.config.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite,
            "tokio-postgres checks read-write for both"
        );
        assert_eq!(params.endpoints().len(), 2);
    }
    // A target that picks a standby is refused, with the fix.
    let e = parse(
        &with_url("postgres://w@pg1,pg2/app?target_session_attrs=standby"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("postgres.url") && e.contains("read-write"),
        "{e}"
    );
    // One host with a target is fine too (a name that moves to the new primary).
    let c = parse(
        &with_url("postgres://w@pg/app?target_session_attrs=read-write"),
        &[],
    )
    .unwrap();
    assert_eq!(
        SourceSettings::resolve(&c).unwrap().params.describe(),
        "pg:5432"
    );
}

#[test]
fn failover_slot_defaults_to_off_and_comes_from_the_file_and_the_environment() {
    assert!(!parse(MINIMAL, &[]).unwrap().postgres.failover_slot);
    let file = MINIMAL.replace("[kafka]", "failover_slot = true\n[kafka]");
    assert!(parse(&file, &[]).unwrap().postgres.failover_slot);
    let c = parse(MINIMAL, &[("WALSHIP_POSTGRES__FAILOVER_SLOT", "true")]).unwrap();
    assert!(c.postgres.failover_slot);
    let e = parse(MINIMAL, &[("WALSHIP_POSTGRES__FAILOVER_SLOT", "yes")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("WALSHIP_POSTGRES__FAILOVER_SLOT") && e.contains("bool"),
        "{e}"
    );
}

#[test]
fn an_empty_id_column_needs_resume_dedup_turned_off_explicitly() {
    let e = parse(&format!("{MINIMAL}[outbox]\nid_column = \"\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("outbox.id_column") && e.contains("run.resume_dedup = false"),
        "{e}"
    );
    let c = parse(
        &format!("{MINIMAL}[outbox]\nid_column = \"\"\n[run]\nresume_dedup = false\n"),
        &[],
    )
    .unwrap();
    assert!(!c.run.resume_dedup && c.outbox.id_column.is_empty());
}

#[test]
fn pending_transactions_bound_is_validated() {
    let c = parse(MINIMAL, &[]).unwrap();
    assert_eq!(c.run.max_pending_transactions, 100_000);
    let e = parse(
        &format!("{MINIMAL}[run]\nmax_pending_transactions = 1\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("run.max_pending_transactions"), "{e}");
}

#[test]
fn missing_required_key_is_named() {
    let e = parse("[postgres]\nurl = \"postgres://a@b/c\"\n[kafka]\n", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("brokers"), "{e}");
}

#[test]
fn env_overrides_reach_nested_tables_and_add_to_them() {
    let file = format!("{MINIMAL}[kafka.librdkafka]\n\"security.protocol\" = \"SSL\"\n");
    let c = parse(
        &file,
        &[
            ("WALSHIP_KAFKA__LIBRDKAFKA__LINGER.MS", "20"),
            (
                "WALSHIP_KAFKA__LIBRDKAFKA",
                "{ \"compression.type\" = \"lz4\" }",
            ),
            ("WALSHIP_POSTGRES__SLOT", "\"123\""),
        ],
    )
    .unwrap();
    let props = &c.kafka.librdkafka;
    assert_eq!(props.get("linger.ms").map(String::as_str), Some("20"));
    assert_eq!(
        props.get("compression.type").map(String::as_str),
        Some("lz4")
    );
    assert_eq!(
        props.get("security.protocol").map(String::as_str),
        Some("SSL"),
        "the file's entries stay"
    );
    assert_eq!(c.postgres.slot, "123", "a quoted value stays a string");
}

#[test]
fn env_overrides_apply_with_types() {
    let c = parse(
        MINIMAL,
        &[
            ("WALSHIP_KAFKA__TOPIC_PARTITIONS", "3"),
            ("WALSHIP_POSTGRES__SLOT", "other"),
            ("HOME", "/x"),
        ],
    )
    .unwrap();
    assert_eq!(c.kafka.topic_partitions, 3);
    assert_eq!(c.postgres.slot, "other");
    let e = parse(MINIMAL, &[("WALSHIP_KAFKA__BROKRS", "x")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("brokrs") && e.contains("WALSHIP_KAFKA__BROKRS"),
        "{e}"
    );
}

#[test]
fn secrets_are_refused_in_the_file_and_never_printed() {
    let e = parse(
        &format!("{MINIMAL}[kafka.librdkafka]\n\"sasl.password\" = \"hunter2\"\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("secret_env") && !e.contains("hunter2"), "{e}");
    assert_eq!(format!("{:?}", Secret("hunter2".into())), "Secret(***)");
}

#[test]
fn invalid_values_explain_the_fix() {
    let e = parse(MINIMAL, &[("WALSHIP_POSTGRES__SLOT", "Bad-Slot")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("postgres.slot"), "{e}");
    let e = parse(MINIMAL, &[("WALSHIP_OUTBOX__TOPIC", "has space")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("outbox.topic"), "{e}");
    let with_headers = |cols: &str| format!("{MINIMAL}[outbox]\nheader_columns = [{cols}]\n");
    let e = parse(&with_headers("\"tenant\", \"walship.position\""), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"walship.position\"") && e.contains("header_columns"),
        "{e}"
    );
    assert!(parse(&with_headers("\"tenant\""), &[]).is_ok());
    let e = parse(MINIMAL, &[("WALSHIP_POSTGRES__READ_BATCHING", "fast")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("postgres.read_batching \"fast\"") && e.contains("\"auto\", \"on\", \"off\""),
        "{e}"
    );
    let c = parse(MINIMAL, &[("WALSHIP_POSTGRES__READ_BATCHING", "off")]).expect("off");
    assert_eq!(c.read_batching().expect("parsed"), ReadBatching::Off);
    assert_eq!(
        parse(MINIMAL, &[])
            .expect("default")
            .read_batching()
            .expect("parsed"),
        ReadBatching::Auto
    );
    let e = parse(MINIMAL, &[("WALSHIP_RUN__CPU_SCHEDULING", "fifo")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("run.cpu_scheduling \"fifo\"") && e.contains("\"batch\", \"normal\""),
        "{e}"
    );
    let default = parse(MINIMAL, &[]).expect("default");
    assert_eq!(
        default.cpu_scheduling().expect("parsed"),
        CpuScheduling::Batch
    );
    let c = parse(MINIMAL, &[("WALSHIP_RUN__CPU_SCHEDULING", "normal")]).expect("normal");
    assert_eq!(c.cpu_scheduling().expect("parsed"), CpuScheduling::Normal);
}

#[test]
fn tls_keys_override_the_url() {
    let url_only = "[postgres]\nurl = \"postgres://walship@db.example/app?sslmode=verify-ca&sslrootcert=/url/ca.pem\"\n[kafka]\nbrokers = \"k:9092\"\n";
    let c = parse(url_only, &[]).unwrap().connect_config().unwrap();
    assert_eq!(c.tls.mode, SslMode::VerifyCa);
    assert_eq!(
        c.tls.root_cert,
        Some(walship_postgres::tls::RootCert::File("/url/ca.pem".into()))
    );
    assert_eq!(c.get_dbname(), Some("app"));

    let c = parse(
        url_only,
        &[
            ("WALSHIP_POSTGRES__SSLMODE", "verify-full"),
            ("WALSHIP_POSTGRES__SSLROOTCERT", "/etc/walship/ca.pem"),
        ],
    )
    .unwrap()
    .connect_config()
    .unwrap();
    assert_eq!(c.tls.mode, SslMode::VerifyFull);
    assert_eq!(
        c.tls.root_cert,
        Some(walship_postgres::tls::RootCert::File(
            "/etc/walship/ca.pem".into()
        ))
    );

    // Default: prefer, like libpq.
    let c = parse(MINIMAL, &[]).unwrap().connect_config().unwrap();
    assert_eq!(c.tls.mode, SslMode::Prefer);
}

#[test]
fn bad_tls_keys_explain_the_fix() {
    let e = parse(MINIMAL, &[("WALSHIP_POSTGRES__SSLMODE", "verify_full")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("postgres.sslmode") && e.contains("verify-full"),
        "{e}"
    );
    let e = parse(MINIMAL, &[("WALSHIP_POSTGRES__SSLCERT", "/c.pem")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("postgres.sslkey"), "{e}");
    let e = parse(
        "[postgres]\nurl = \"postgres://w:hunter2@db/app?sslmode=nope\"\n[kafka]\nbrokers = \"k:9092\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("postgres.url") && e.contains("nope") && !e.contains("hunter2"),
        "{e}"
    );
}

/// librdkafka is built with OpenSSL (`ssl` feature): SASL_SSL with SCRAM is accepted, and the
/// password from `kafka.secret_env` reaches the producer but no message or `Debug` output.
#[test]
fn kafka_sasl_ssl_scram_config_is_accepted_and_the_password_stays_secret() {
    use rdkafka::producer::BaseProducer;
    const PASSWORD: &str = "s3cr3t-kafka-pa55word";
    let env = |var: &str| (var == "TEST_KAFKA_PASSWORD").then(|| PASSWORD.to_owned());
    let text = format!(
        "{MINIMAL}[kafka.librdkafka]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-256\"\n\"sasl.username\" = \"walship\"\n[kafka.secret_env]\n\"sasl.password\" = \"TEST_KAFKA_PASSWORD\"\n"
    );
    let config = parse(&text, &[]).unwrap();
    assert!(!format!("{config:?}").contains(PASSWORD));
    let settings = config.sink_settings_with_env(env).unwrap();
    assert_eq!(settings.secret_properties["sasl.password"], PASSWORD);
    let client_config = settings.client_config();
    assert_eq!(client_config.get("sasl.password"), Some(PASSWORD));
    // Creating the producer validates every property (and that SSL and SCRAM are compiled
    // in) without connecting.
    let producer: BaseProducer = client_config
        .create()
        .unwrap_or_else(|e| panic!("librdkafka refused SASL_SSL/SCRAM-SHA-256: {e}"));
    drop(producer);

    // A value librdkafka rejects: its message names the value, never the password.
    let mut bad = settings.clone();
    bad.librdkafka
        .insert("sasl.mechanisms".into(), "SCRAM-SHA-999".into());
    let e = bad
        .client_config()
        .create::<BaseProducer>()
        .err()
        .expect("bad mechanism refused")
        .to_string();
    assert!(e.contains("SCRAM-SHA-999") && !e.contains(PASSWORD), "{e}");

    // A missing secret names the property and the variable, never a value.
    let e = config
        .sink_settings_with_env(|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sasl.password") && e.contains("TEST_KAFKA_PASSWORD"),
        "{e}"
    );
}

#[test]
fn metrics_listen_takes_an_address_with_or_without_its_port() {
    let listen = |v: &str| {
        MetricsConfig {
            listen: Some(v.to_owned()),
        }
        .address()
    };
    assert_eq!(
        listen("0.0.0.0:9999").unwrap().unwrap().to_string(),
        "0.0.0.0:9999"
    );
    assert_eq!(
        listen("0.0.0.0").unwrap().unwrap().to_string(),
        format!("0.0.0.0:{DEFAULT_METRICS_PORT}")
    );
    assert_eq!(
        listen("[::]").unwrap().unwrap().to_string(),
        format!("[::]:{DEFAULT_METRICS_PORT}")
    );
    let e = listen("metrics.local").unwrap_err().to_string();
    assert!(
        e.contains("\"metrics.local\"") && e.contains("0.0.0.0:10187"),
        "{e}"
    );
    assert_eq!(MetricsConfig { listen: None }.address().unwrap(), None);
}

#[test]
fn producer_settings_that_would_reorder_a_key_are_refused() {
    for (key, value) in [
        ("message.timeout.ms", "30000"),
        ("delivery.timeout.ms", "120000"),
        ("partitioner", "random"),
    ] {
        let text = format!("{MINIMAL}[kafka.librdkafka]\n{key:?} = {value:?}\n");
        let e = parse(&text, &[]).expect_err(key).to_string();
        assert!(e.contains(key) && e.contains("order"), "{key}: {e}");
    }
    // Never timing out, and keyed partitioners, stay allowed.
    for (key, value) in [
        ("message.timeout.ms", "0"),
        ("partitioner", "murmur2"),
        ("partitioner", "consistent_random"),
    ] {
        let text = format!("{MINIMAL}[kafka.librdkafka]\n{key:?} = {value:?}\n");
        parse(&text, &[]).unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
    }
}

#[test]
fn queue_bounds_librdkafka_would_refuse_are_refused() {
    for (key, value) in [
        ("queue.buffering.max.messages", "-1"),
        ("queue.buffering.max.messages", "1e6"),
        ("queue.buffering.max.messages", "2147483648"),
        ("queue.buffering.max.kbytes", "0"),
    ] {
        let text = format!("{MINIMAL}[kafka.librdkafka]\n{key:?} = {value:?}\n");
        let e = parse(&text, &[]).expect_err(value).to_string();
        assert!(e.contains(key) && e.contains(value), "{key} = {value}: {e}");
    }
    for (key, value) in [
        ("queue.buffering.max.messages", "0"),
        ("queue.buffering.max.messages", "500"),
        ("queue.buffering.max.kbytes", "2147483647"),
    ] {
        let text = format!("{MINIMAL}[kafka.librdkafka]\n{key:?} = {value:?}\n");
        parse(&text, &[]).unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
    }
}

#[test]
fn records_are_plain_by_default_and_cloudevents_on_request() {
    use walship_kafka::record::{Format, cloudevents::Mode};
    let c = parse(MINIMAL, &[]).unwrap();
    assert_eq!(c.record_format().unwrap(), Format::Plain);
    assert_eq!(c.outbox_spec().traceparent, "");
    let text = format!(
        "{MINIMAL}[outbox]\ntopic = \"events\"\ncloudevents = \"structured\"\n\
         cloudevents_type = \"com.acme.{{aggregatetype}}.{{type}}\"\n\
         traceparent_column = \"traceparent\"\ntracestate_column = \"tracestate\"\n"
    );
    let c = parse(&text, &[]).unwrap();
    let Format::CloudEvents(ce) = c.record_format().unwrap() else {
        panic!("cloudevents");
    };
    assert_eq!(ce.mode, Mode::Structured);
    assert_eq!(ce.event_type.as_str(), "com.acme.{aggregatetype}.{type}");
    let spec = c.outbox_spec();
    assert_eq!(
        spec.aggregate_type, "aggregatetype",
        "extracted for the CloudEvents source although the topic is fixed"
    );
    assert_eq!(
        (spec.traceparent.as_str(), spec.tracestate.as_str()),
        ("traceparent", "tracestate")
    );
    let c = parse(MINIMAL, &[("WALSHIP_OUTBOX__CLOUDEVENTS", "binary")]).unwrap();
    assert!(
        matches!(c.record_format().unwrap(), Format::CloudEvents(ce) if ce.mode == Mode::Binary)
    );
}

#[test]
fn inconsistent_record_formats_are_refused_with_the_fix() {
    for (extra, needles) in [
        ("cloudevents = \"json\"\n", &["`json`", "`structured`"][..]),
        (
            "cloudevents = \"binary\"\ncloudevents_source = \"{nope}\"\n",
            &["outbox.cloudevents_source", "{nope}"],
        ),
        (
            "cloudevents = \"binary\"\ncloudevents_id = \"\"\n",
            &["outbox.cloudevents_id is empty"],
        ),
        (
            "cloudevents = \"binary\"\ntype_column = \"\"\n",
            &["outbox.cloudevents_type", "outbox.type_column"],
        ),
        (
            "tracestate_column = \"tracestate\"\n",
            &["outbox.traceparent_column is empty"],
        ),
        (
            "traceparent_column = \"tp\"\nheader_columns = [\"tp\"]\n",
            &["outbox.traceparent_column", "header_columns"],
        ),
        ("cloudevents_subjekt = \"\"\n", &["cloudevents_subjekt"]),
    ] {
        let e = parse(&format!("{MINIMAL}[outbox]\n{extra}"), &[])
            .unwrap_err()
            .to_string();
        for n in needles {
            assert!(e.contains(n), "{extra}: {e}");
        }
    }
}

#[test]
fn router_options_default_to_debeziums_behaviour_as_walship_had_it() {
    let c = parse(MINIMAL, &[]).unwrap();
    assert!(c.placements().unwrap().is_empty());
    assert!(!c.outbox.tombstone_on_empty_payload);
    assert_eq!(c.outbox_spec().timestamp, "");
    let text = format!(
        "{MINIMAL}[outbox]\nheader_columns = [\"tenant\"]\ntimestamp_column = \"occurred_at\"\n\
         additional_placement = [\"tenant:header:tenantId\", \"version:envelope:schemaVersion\", \
         \"shard:partition\"]\ntombstone_on_empty_payload = true\n"
    );
    let c = parse(&text, &[]).unwrap();
    use walship_kafka::record::Placement;
    let placed = c.placements().unwrap();
    assert_eq!(
        placed,
        vec![
            ("tenant".into(), Placement::Header("tenant".into())),
            ("tenant".into(), Placement::Header("tenantId".into())),
            (
                "version".into(),
                Placement::Envelope("schemaVersion".into())
            ),
            ("shard".into(), Placement::Partition),
        ]
    );
    let spec = c.outbox_spec();
    assert_eq!(
        spec.header_columns,
        ["tenant", "tenant", "version", "shard"]
    );
    assert_eq!(spec.timestamp, "occurred_at");
    let settings = Settings::resolve(&c).unwrap();
    assert_eq!(settings.session.placements.len(), 4);
    assert!(settings.session.tombstone_on_empty_payload);
}

#[test]
fn placements_that_would_break_a_record_are_refused_with_the_fix() {
    for (list, needles) in [
        ("\"tenant\"", &["names no placement"][..]),
        (
            "\"tenant:footer\"",
            &["other than header, envelope or partition"],
        ),
        ("\"shard:partition:p\"", &["has no name"]),
        (
            "\"a:partition\", \"b:partition\"",
            &["more than one partition column"],
        ),
        ("\"v:envelope:payload\"", &["is \"payload\" or named twice"]),
        ("\"a:envelope:x\", \"b:envelope:x\"", &["named twice"]),
        (
            "\"t:header:type\"",
            &["walship writes itself", "t:header:<name>"],
        ),
        ("\"t:header:walship.x\"", &["walship writes itself"]),
        ("\":header\"", &["column:placement[:name]"]),
    ] {
        let e = parse(
            &format!("{MINIMAL}[outbox]\nadditional_placement = [{list}]\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        for n in needles {
            assert!(e.contains(n), "{list}: {e}");
        }
    }
}

#[test]
fn a_topic_regex_fills_the_topics_groups_and_is_checked() {
    let text = format!(
        "{MINIMAL}[outbox]\ntopic = \"events.{{domain}}\"\ntopic_regex = \"(?<domain>[a-z]+)\\\\..*\"\n"
    );
    let c = parse(&text, &[]).unwrap();
    let mut router = c.topic_router().unwrap();
    assert_eq!(&**router.route(Some(b"shop.order")).unwrap(), "events.shop");
    assert!(router.route(Some(b"SHOP")).is_err());
    assert_eq!(c.outbox_spec().aggregate_type, "aggregatetype");
    for (extra, needle) in [
        (
            "topic = \"events.{domain}\"\n",
            "only a group of outbox.topic_regex",
        ),
        ("topic_regex = \"(\"\n", "outbox.topic_regex"),
        (
            "topic = \"e.{x}\"\ntopic_regex = \"(?<y>a)\"\n",
            "neither {aggregatetype} nor a group",
        ),
    ] {
        let e = parse(&format!("{MINIMAL}[outbox]\n{extra}"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{extra}: {e}");
    }
}
