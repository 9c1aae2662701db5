//! Tests of the producer: settings, sending against librdkafka's mock cluster, topic checks,
//! and where the producer is destroyed.

use super::*;

/// Settings for `brokers` with walship's defaults and no extra properties.
pub(crate) fn settings(brokers: &str) -> SinkSettings {
    SinkSettings {
        brokers: brokers.into(),
        client_id: "walship".into(),
        create_topics: true,
        topic_partitions: 3,
        topic_replication_factor: 1,
        librdkafka: BTreeMap::new(),
        secret_properties: BTreeMap::new(),
        share_producer: true,
    }
}

#[test]
fn debug_never_shows_secret_values() {
    let mut secret_properties = BTreeMap::new();
    secret_properties.insert("sasl.password".to_owned(), "hunter2".to_owned());
    let s = SinkSettings {
        secret_properties,
        ..settings("b:9092")
    };
    let text = format!("{s:?}");
    assert!(
        text.contains("sasl.password") && !text.contains("hunter2"),
        "{text}"
    );
}

#[test]
fn other_clients_connect_like_the_producer_without_producer_settings() {
    let mut s = settings("b:9092");
    s.librdkafka.insert("linger.ms".into(), "50".into());
    s.librdkafka
        .insert("security.protocol".into(), "SASL_SSL".into());
    s.librdkafka
        .insert("enable.ssl.certificate.verification".into(), "false".into());
    s.librdkafka
        .insert("broker.address.family".into(), "v4".into());
    s.secret_properties
        .insert("sasl.password".into(), "hunter2".into());
    let c = s.connection_config();
    assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
    assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
    assert_eq!(c.get("sasl.password"), Some("hunter2"));
    assert_eq!(c.get("enable.ssl.certificate.verification"), Some("false"));
    assert_eq!(c.get("broker.address.family"), Some("v4"));
    assert_eq!(c.get("linger.ms"), None);
    assert_eq!(c.get("enable.idempotence"), None);
    // A metadata request must never create a topic (librdkafka's producer-type handles,
    // the admin client among them, would allow it by default).
    assert_eq!(c.get("allow.auto.create.topics"), Some("false"));
}

/// A secret under a property name librdkafka does not know (a Java client's) makes every
/// client's creation fail, and librdkafka echoes the value: none of walship's clients may
/// let it through, whatever the name.
#[tokio::test]
async fn no_client_error_carries_a_secret_value() {
    const SECRET: &str = "PW-4f1d9c";
    let mut s = settings("127.0.0.1:9");
    s.secret_properties
        .insert("ssl.truststore.password".into(), SECRET.into());
    // A known property whose value is invalid: librdkafka quotes the value in its message.
    let mut invalid = settings("127.0.0.1:9");
    invalid
        .secret_properties
        .insert("security.protocol".into(), SECRET.into());
    for s in [s, invalid] {
        let mut texts = Vec::new();
        let listener = Arc::new(Threads(Default::default(), Default::default()));
        match Sink::new(s.clone(), listener) {
            Ok(_) => panic!("the producer accepted {:?}", s.secret_properties),
            Err(e) => texts.push(format!("producer: {e} / {e:?}")),
        }
        let e = ensure_topic(&s, "t").await.expect_err("admin client");
        texts.push(format!("admin: {e} / {e:?}"));
        match crate::resume::ResumeScanner::new(&s, "7/w", Duration::from_secs(1)) {
            Ok(_) => panic!("the resume reader accepted {:?}", s.secret_properties),
            Err(e) => texts.push(format!("resume reader: {e} / {e:?}")),
        }
        let group = crate::group::GroupSettings {
            group: "g".into(),
            topics: vec!["walship.g.a".into()],
            session_timeout: Duration::from_secs(6),
            settle_limit: Duration::from_secs(12),
        };
        match crate::group::join(&s, &group).await {
            Ok(_) => panic!("the group member accepted {:?}", s.secret_properties),
            Err(e) => texts.push(format!("group member: {e} / {e:?}")),
        }
        let e = crate::probe::probe(&s, Duration::from_secs(1))
            .await
            .expect_err("probe");
        texts.push(format!("probe: {e} / {e:?}"));
        for text in &texts {
            assert!(!text.contains(SECRET), "{text}");
            assert!(
                text.contains("security.protocol") || text.contains("truststore"),
                "the error names the property: {text}"
            );
        }
    }
}

/// librdkafka's in-process mock cluster, which cannot create topics through the Admin API
/// (the demo's mock broker creates them up front).
fn mock() -> (
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    SinkSettings,
) {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let settings = settings(&cluster.bootstrap_servers());
    (cluster, settings)
}

#[tokio::test]
async fn finds_a_topic_that_exists() {
    let (cluster, settings) = mock();
    cluster.create_topic("outbox.event.order", 3, 1).unwrap();
    ensure_topic(&settings, "outbox.event.order").await.unwrap();
}

#[tokio::test]
async fn the_lookup_never_creates_a_topic() {
    let (_cluster, mut settings) = mock();
    settings.create_topics = false;
    for _ in 0..2 {
        // The mock cluster creates a topic for any metadata request that allows it, so a
        // second lookup would find one the first had created.
        let e = ensure_topic(&settings, "outbox.event.order")
            .await
            .unwrap_err();
        assert!(matches!(e, TopicError::Missing(_)), "{e}");
    }
}

#[test]
fn user_overrides_apply_last() {
    let mut librdkafka = BTreeMap::new();
    librdkafka.insert("linger.ms".to_owned(), "50".to_owned());
    let s = SinkSettings {
        librdkafka,
        ..settings("b:9092")
    };
    let c = s.client_config();
    assert_eq!(c.get("linger.ms"), Some("50"));
    assert_eq!(c.get("enable.idempotence"), Some("true"));
    assert_eq!(c.get("partitioner"), Some("murmur2_random"));
}

/// Records the threads that delivery reports arrive on.
struct Threads(
    std::sync::Mutex<Vec<std::thread::ThreadId>>,
    tokio::sync::Notify,
);

impl DeliveryListener for Threads {
    fn on_delivery(&self, _token: usize, _result: Result<usize, DeliveryError>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(std::thread::current().id());
        self.1.notify_one();
    }
}

#[test]
fn dropping_a_sink_on_a_runtime_destroys_its_producer_off_the_runtime_thread() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let listener = Arc::new(Threads(Default::default(), Default::default()));
    runtime.block_on(async {
        // Nobody listens on port 9: the record stays queued until the drop purges it, and
        // its report is served by whoever destroys the producer.
        let sink = Sink::new(settings("127.0.0.1:9"), listener.clone()).expect("sink");
        let record = Record::new("t", b"k", Some(b"v"), None);
        sink.send(&record, 1).expect("queued");
        let purged = listener.1.notified();
        drop(sink);
        tokio::time::timeout(Duration::from_secs(30), purged)
            .await
            .expect("the purge report arrives");
    });
    let threads = listener.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(!threads.is_empty());
    assert!(
        threads.iter().all(|t| *t != std::thread::current().id()),
        "the producer was destroyed on the runtime's own thread"
    );
}
