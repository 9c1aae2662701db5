//! Tests of the shared producer against librdkafka's mock cluster: who shares, whose reports
//! reach whom, each lane's budget, and what closing a lane does to the others.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::Producers;
use crate::record::Record;
use crate::sink::tests::settings;
use crate::sink::{DeliveryError, DeliveryListener, SendError, Sink, SinkSettings};

const WAIT: Duration = Duration::from_secs(30);

/// Every report a sink's listener heard: (token, acknowledged, purged).
#[derive(Default)]
struct Heard {
    reports: Mutex<Vec<(usize, bool, bool)>>,
    changed: tokio::sync::Notify,
}

impl DeliveryListener for Heard {
    fn on_delivery(&self, token: usize, result: Result<usize, DeliveryError>) {
        let (ok, purged) = match &result {
            Ok(_) => (true, false),
            Err(e) => (false, e.is_purge()),
        };
        self.reports.lock().unwrap().push((token, ok, purged));
        self.changed.notify_waiters();
    }
}

impl Heard {
    fn reports(&self) -> Vec<(usize, bool, bool)> {
        self.reports.lock().unwrap().clone()
    }

    /// Waits until `n` reports arrived.
    async fn until(&self, n: usize) -> Vec<(usize, bool, bool)> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.reports().len() >= n {
                    return self.reports();
                }
                changed.await;
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("{n} reports did not arrive: {:?}", self.reports()))
    }
}

fn cluster() -> (MockCluster<'static, DefaultProducerContext>, SinkSettings) {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for topic in ["a", "b"] {
        cluster.create_topic(topic, 2, 1).expect("topic");
    }
    let settings = settings(&cluster.bootstrap_servers());
    (cluster, settings)
}

fn record(topic: &str) -> Record<'_> {
    Record::new(topic, b"k", Some(b"v"), None)
}

fn sink(producers: &Producers, settings: &SinkSettings) -> (Sink, Arc<Heard>) {
    let heard = Arc::new(Heard::default());
    let sink = Sink::in_pool(producers, settings.clone(), heard.clone()).expect("sink");
    (sink, heard)
}

#[tokio::test]
async fn sinks_with_the_same_settings_share_one_producer_and_hear_only_their_own_reports() {
    let (_cluster, settings) = cluster();
    let producers = Producers::default();
    let (a, heard_a) = sink(&producers, &settings);
    let (b, heard_b) = sink(&producers, &settings);
    assert_eq!(producers.shared_count(), 1);
    for token in [7, 8, 9] {
        a.send(&record("a"), token).expect("a sends");
    }
    b.send(&record("b"), 7).expect("b sends");
    assert_eq!(
        heard_a.until(3).await,
        vec![(7, true, false), (8, true, false), (9, true, false)]
    );
    assert_eq!(heard_b.until(1).await, vec![(7, true, false)]);
    // The largest token a session can have passes through the lane number untouched.
    let big = (1 << 47) + 5;
    b.send(&record("b"), big).expect("b sends");
    assert_eq!(heard_b.until(2).await[1], (big, true, false));
    assert_eq!(heard_a.reports().len(), 3, "nothing of b's reached a");
}

#[tokio::test]
async fn other_producer_settings_or_sharing_turned_off_get_a_producer_of_their_own() {
    let (_cluster, settings) = cluster();
    let producers = Producers::default();
    let _a = sink(&producers, &settings);
    let mut lingering = settings.clone();
    lingering.librdkafka = BTreeMap::from([("linger.ms".to_owned(), "20".to_owned())]);
    let _b = sink(&producers, &lingering);
    assert_eq!(producers.shared_count(), 2);
    let alone = SinkSettings {
        share_producer: false,
        ..settings.clone()
    };
    let (c, heard_c) = sink(&producers, &alone);
    assert_eq!(producers.shared_count(), 2, "not in the pool");
    // Queue bounds are each pipeline's budget, not a reason for a producer of its own.
    let mut bounded = settings.clone();
    bounded
        .librdkafka
        .insert("queue.buffering.max.messages".into(), "500".into());
    let _d = sink(&producers, &bounded);
    assert_eq!(producers.shared_count(), 2, "shares the first one");
    c.send(&record("a"), 1).expect("sends");
    heard_c.until(1).await;
}

#[tokio::test]
async fn a_lane_stops_at_its_own_budget_and_leaves_room_for_the_others() {
    // Nobody listens on port 9: records stay queued.
    let mut settings = settings("127.0.0.1:9");
    settings
        .librdkafka
        .insert("queue.buffering.max.messages".into(), "3".into());
    let producers = Producers::default();
    let (a, _) = sink(&producers, &settings);
    let (b, _) = sink(&producers, &settings);
    for token in 0..3 {
        a.send(&record("a"), token).expect("within a's budget");
    }
    assert!(matches!(a.send(&record("a"), 3), Err(SendError::QueueFull)));
    assert_eq!(a.in_flight(), 3);
    for token in 0..3 {
        b.send(&record("b"), token)
            .expect("b has a budget of its own");
    }
}

#[tokio::test]
async fn closing_an_answered_lane_leaves_the_producer_to_the_others() {
    let (_cluster, settings) = cluster();
    let producers = Producers::default();
    let (a, heard_a) = sink(&producers, &settings);
    let (b, heard_b) = sink(&producers, &settings);
    a.send(&record("a"), 1).expect("a sends");
    heard_a.until(1).await;
    tokio::time::timeout(WAIT, a.close())
        .await
        .expect("closes at once");
    b.send(&record("b"), 1).expect("b still sends");
    assert_eq!(heard_b.until(1).await, vec![(1, true, false)]);
    assert_eq!(producers.shared_count(), 1);
}

#[tokio::test]
async fn closing_a_lane_with_records_in_flight_purges_the_shared_producer_and_replaces_it() {
    // Nobody listens on port 9: every record stays queued until purged.
    let settings = settings("127.0.0.1:9");
    let producers = Producers::default();
    let (a, heard_a) = sink(&producers, &settings);
    let (b, heard_b) = sink(&producers, &settings);
    a.send(&record("a"), 1).expect("a sends");
    b.send(&record("b"), 2).expect("b sends");
    tokio::time::timeout(WAIT, a.close())
        .await
        .expect("closes once its purge is reported");
    // Nothing of a's can be sent any more: its record was purged, and so was b's.
    assert_eq!(heard_a.reports(), vec![(1, false, true)]);
    assert_eq!(heard_b.until(1).await, vec![(2, false, true)]);
    // b cannot add to the purged producer (its session starts again)...
    match b.send(&record("b"), 3) {
        Err(SendError::Rejected { error, .. }) => assert!(error.purged, "{error}"),
        other => panic!("the retired producer took a record: {other:?}"),
    }
    // ...and the next sink gets a new producer, which takes records.
    let (c, _) = sink(&producers, &settings);
    c.send(&record("a"), 4).expect("a new producer");
    assert_eq!(producers.shared_count(), 1);
}

#[tokio::test]
async fn a_lane_dropped_with_records_in_flight_purges_its_producer() {
    let settings = settings("127.0.0.1:9");
    let producers = Producers::default();
    let (a, _) = sink(&producers, &settings);
    let (b, heard_b) = sink(&producers, &settings);
    a.send(&record("a"), 1).expect("a sends");
    b.send(&record("b"), 2).expect("b sends");
    drop(a);
    assert_eq!(heard_b.until(1).await, vec![(2, false, true)]);
}

#[tokio::test]
async fn no_message_bound_means_none_for_a_lane_too() {
    let mut settings = settings("127.0.0.1:9");
    settings
        .librdkafka
        .insert("queue.buffering.max.messages".into(), "0".into());
    let producers = Producers::default();
    let (a, _) = sink(&producers, &settings);
    for token in 0..10 {
        a.send(&record("a"), token).expect("no bound");
    }
}

#[tokio::test]
async fn a_lane_dropped_with_records_in_flight_still_hears_their_purge() {
    let settings = settings("127.0.0.1:9");
    let producers = Producers::default();
    let (a, heard_a) = sink(&producers, &settings);
    let (_b, _) = sink(&producers, &settings);
    a.send(&record("a"), 1).expect("a sends");
    drop(a);
    assert_eq!(heard_a.until(1).await, vec![(1, false, true)]);
}
