//! Unit tests of `[[pipelines]]` files: merging, names, `[cluster]`.
use super::*;

const SHARED: &str = r#"
[kafka]
brokers = "k:9092"
librdkafka = { "linger.ms" = "5", "batch.size" = "100000" }

[outbox]
topic = "shared.{aggregatetype}"

[metrics]
listen = "127.0.0.1:10187"
"#;

fn load(pipelines: &str) -> Result<Deployment, ConfigError> {
    Deployment::from_toml(
        &format!("{SHARED}\n{pipelines}"),
        std::iter::empty(),
        "test",
    )
}

#[test]
fn a_file_without_pipelines_is_one_unnamed_pipeline() {
    let d = Deployment::from_toml(
        "[postgres]\nurl = \"postgres://a/db\"\n[kafka]\nbrokers = \"k:9092\"\n",
        std::iter::empty(),
        "test",
    )
    .unwrap();
    assert!(d.is_single());
    assert_eq!(d.pipelines[0].config.postgres.slot, "walship");
}

#[test]
fn cpu_scheduling_is_the_processs_and_one_pipeline_cannot_change_it() {
    let two = |b_run: &str| {
        format!(
            "[[pipelines]]\nname = \"a\"\npostgres = {{ url = \"postgres://a/db\" }}\n\
                 [[pipelines]]\nname = \"b\"\npostgres = {{ url = \"postgres://b/db\" }}\n{b_run}"
        )
    };
    let d = load(&two("")).unwrap();
    assert_eq!(d.cpu_scheduling, CpuScheduling::Batch);
    let d = Deployment::from_toml(
        &format!("{SHARED}[run]\ncpu_scheduling = \"normal\"\n{}", two("")),
        std::iter::empty(),
        "test",
    )
    .unwrap();
    assert_eq!(d.cpu_scheduling, CpuScheduling::Normal);
    let e = load(&two("run = { cpu_scheduling = \"normal\" }\n")).unwrap_err();
    assert!(
        e.0.contains("run.cpu_scheduling is the process's")
            && e.0.contains("\"b\"")
            && e.0.contains("top-level [run]"),
        "{e}"
    );
}

#[test]
fn pipelines_lay_their_tables_over_the_shared_ones() {
    let d = load(
        r#"
[[pipelines]]
name = "orders"
postgres = { url = "postgres://orders/db", slot = "s_orders" }

[[pipelines]]
name = "billing"
postgres = { url = "postgres://billing/db" }
outbox = { topic = "billing.{aggregatetype}" }
kafka = { librdkafka = { "linger.ms" = "20" } }
"#,
    )
    .unwrap();
    assert!(!d.is_single());
    assert_eq!(d.metrics.listen.as_deref(), Some("127.0.0.1:10187"));
    let [orders, billing] = d.pipelines.as_slice() else {
        panic!("two pipelines")
    };
    assert_eq!(orders.name.as_deref(), Some("orders"));
    assert_eq!(orders.config.postgres.slot, "s_orders");
    assert_eq!(orders.config.outbox.topic, "shared.{aggregatetype}");
    assert_eq!(billing.config.postgres.slot, "walship");
    assert_eq!(billing.config.outbox.topic, "billing.{aggregatetype}");
    // Nested tables merge: the override changes one property and keeps the other.
    assert_eq!(billing.config.kafka.librdkafka["linger.ms"], "20");
    assert_eq!(billing.config.kafka.librdkafka["batch.size"], "100000");
    assert_eq!(orders.config.kafka.librdkafka["linger.ms"], "5");
}

#[test]
fn environment_overrides_set_the_shared_tables_and_pipelines_keep_their_own() {
    let d = Deployment::from_toml(
        &format!(
            "{SHARED}\n[[pipelines]]\nname = \"a\"\npostgres = {{ url = \"postgres://a/db\" }}\n\
                 [[pipelines]]\nname = \"b\"\npostgres = {{ url = \"postgres://b/db\" }}\n\
                 kafka = {{ brokers = \"own:9092\" }}\n"
        ),
        [("WALSHIP_KAFKA__BROKERS".to_owned(), "env:9092".to_owned())],
        "test",
    )
    .unwrap();
    assert_eq!(d.pipelines[0].config.kafka.brokers, "env:9092");
    assert_eq!(d.pipelines[1].config.kafka.brokers, "own:9092");
}

#[test]
fn mistakes_are_named_with_their_pipeline_and_fix() {
    let cases = [
        (
            "[[pipelines]]\npostgres = { url = \"postgres://a/db\" }\n",
            "pipelines[0] has no name",
        ),
        (
            "[[pipelines]]\nname = \"A b\"\npostgres = { url = \"postgres://a/db\" }\n",
            "is not a pipeline name",
        ),
        (
            "[[pipelines]]\nname = \"a\"\npostgres = { url = \"postgres://a/db\" }\n\
                 [[pipelines]]\nname = \"a\"\npostgres = { url = \"postgres://b/db\" }\n",
            "two pipelines are named \"a\"",
        ),
        (
            "[[pipelines]]\nname = \"a\"\npostgres = { url = \"postgres://a/db\" }\n\
                 [[pipelines]]\nname = \"b\"\npostgres = { url = \"postgres://a/db\" }\n",
            "uses slot \"walship\" of a server another pipeline already streams from",
        ),
        (
            "[[pipelines]]\nname = \"a\"\npostgres = { url = \"postgres://a/db\" }\n\
                 metrics = { listen = \"127.0.0.1:1\" }\n",
            "[metrics] is the process's",
        ),
        (
            "[[pipelines]]\nname = \"a\"\npostgres = { url = \"postgres://a/db\", slot = \"Bad\" }\n",
            "pipeline \"a\"",
        ),
        (
            "[[pipelines]]\nname = \"a\"\n",
            "pipeline \"a\": missing field `postgres`",
        ),
    ];
    for (text, needle) in cases {
        let e = load(text).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle:?} not in: {e}");
    }
    let e = Deployment::from_toml(&format!("pipelines = []\n{SHARED}"), [], "test")
        .unwrap_err()
        .to_string();
    assert!(e.contains("pipelines is empty"), "{e}");
}

#[test]
fn cluster_is_read_with_defaults_and_its_mistakes_are_named() {
    let two = "[[pipelines]]\nname = \"b\"\npostgres = { url = \"postgres://b/db\" }\n\
                   [[pipelines]]\nname = \"a\"\npostgres = { url = \"postgres://a/db\" }\n";
    let d = load(&format!("[cluster]\ngroup = \"fleet\"\n{two}")).unwrap();
    let c = d.cluster.expect("cluster");
    assert_eq!(c.coordination_topic("b"), "walship.fleet.pipeline.b");
    assert_eq!(c.session_timeout(), Duration::from_secs(6));
    // The environment reaches [cluster] as any other table.
    let d = Deployment::from_toml(
        &format!("{SHARED}\n[cluster]\ngroup = \"fleet\"\n{two}"),
        [(
            "WALSHIP_CLUSTER__SESSION_TIMEOUT_MS".to_owned(),
            "10000".to_owned(),
        )],
        "test",
    )
    .unwrap();
    assert_eq!(d.cluster.unwrap().session_timeout_ms, 10_000);
    let cases = [
        (format!("[cluster]\n{two}"), "missing field `group`"),
        (
            format!("[cluster]\ngroup = \"a b\"\n{two}"),
            "cluster.group = \"a b\"",
        ),
        (
            format!("[cluster]\ngroup = \"g\"\ntopic_prefix = \"a/b.\"\n{two}"),
            "does not make legal Kafka topic names",
        ),
        (
            format!(
                "[cluster]\ngroup = \"g\"\ntopic_prefix = \"{}\"\n{two}",
                "p".repeat(190)
            ),
            "at most 186 characters",
        ),
        (
            format!("[cluster]\ngroup = \"g\"\ntopic = \"walship.g.pipelines\"\n{two}"),
            "every pipeline now has a coordination topic of its own",
        ),
        (
            format!("[cluster]\ngroup = \"g\"\nsession_timeout_ms = 10\n{two}"),
            "out of range",
        ),
        (
            format!("[cluster]\ngroup = \"g\"\nsessions = 1\n{two}"),
            "unknown field `sessions`",
        ),
        (
            format!(
                "[cluster]\ngroup = \"g\"\n{two}[[pipelines]]\nname = \"c\"\n\
                     postgres = {{ url = \"postgres://c/db\" }}\nkafka = {{ brokers = \"other:9092\" }}\n"
            ),
            "every pipeline uses the same kafka.brokers",
        ),
    ];
    for (text, needle) in cases {
        let e = load(&text).unwrap_err().to_string();
        assert!(e.contains(needle), "{needle:?} not in: {e}");
    }
    let e = Deployment::from_toml(
            "[cluster]\ngroup = \"g\"\n[postgres]\nurl = \"postgres://a/db\"\n[kafka]\nbrokers = \"k:9092\"\n",
            std::iter::empty(),
            "test",
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("this file has none"), "{e}");
}
