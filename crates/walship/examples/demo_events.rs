//! The demo's application and downstream consumer in one program.
//!
//! 1. Writes outbox events for a few aggregates the way an application would: each business
//!    change and its outbox row in one transaction, several aggregates interleaved.
//! 2. Consumes the topics walship publishes to and prints each aggregate's events in the order
//!    they arrived, checking that the order matches the commit order.
//!
//! Exits non-zero unless, within 60 s of the writes, every aggregate's events arrived exactly
//! once each and in commit order (and nothing else arrived): the test command runs the demo.
//!
//! ```sh
//! cargo run --example demo_events -- 'postgres://postgres@127.0.0.1:5432/demo' 127.0.0.1:9092
//! ```

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

const AGGREGATES: [(&str, &str); 4] = [
    ("order", "order-1001"),
    ("order", "order-1002"),
    ("customer", "cust-7"),
    ("order", "order-1003"),
];
const STEPS: [&str; 4] = ["Created", "Paid", "Packed", "Shipped"];

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .ok_or("usage: demo_events POSTGRES_URL BOOTSTRAP")?;
    let bootstrap = args
        .next()
        .ok_or("usage: demo_events POSTGRES_URL BOOTSTRAP")?;

    let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    println!(
        "writing {} events for {} aggregates ...",
        STEPS.len() * AGGREGATES.len(),
        AGGREGATES.len()
    );
    for (step, event) in STEPS.iter().enumerate() {
        for (kind, id) in AGGREGATES {
            let tx = client.transaction().await?;
            // A real application would update its business tables here, in the same transaction.
            tx.execute(
                "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ($1, $2, $3, $4::text::jsonb)",
                &[&kind, &id, event, &format!("{{\"step\": {step}, \"event\": \"{event}\"}}")],
            )
            .await?;
            tx.commit().await?;
        }
    }

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "walship-demo")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for topic in ["outbox.event.order", "outbox.event.customer"] {
        loop {
            // A broker still starting may not answer: ask again until the deadline.
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
            if let Some(t) = md
                .iter()
                .flat_map(|md| md.topics())
                .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
            {
                for p in t.partitions() {
                    tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                }
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "topic {topic} did not appear within 60 s: is walship running? (its log: .walship-demo/walship.log)"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    consumer.assign(&tpl)?;
    let expected = STEPS.len() * AGGREGATES.len();
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = 0;
    let mut problems = Vec::new();
    println!("consuming ...");
    while seen < expected {
        if Instant::now() > deadline {
            return Err(format!(
                "only {seen} of {expected} events arrived within 60 s (walship's log: .walship-demo/walship.log)"
            )
            .into());
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        let event_type = event_type(&msg);
        check_topic(&msg, &key, &mut problems);
        println!(
            "  {:<22} partition {} offset {:>3}  key {:<11} type {:<8} payload {}",
            msg.topic(),
            msg.partition(),
            msg.offset(),
            key,
            event_type,
            String::from_utf8_lossy(msg.payload().unwrap_or_default())
        );
        per_key.entry(key).or_default().push(event_type);
        seen += 1;
    }
    // Anything after the expected events is a duplicate or a stray: give it a moment to show.
    let linger = Instant::now() + Duration::from_secs(1);
    while Instant::now() < linger {
        if let Some(msg) = consumer.poll(Duration::from_millis(100)) {
            let msg = msg?;
            let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
            check_topic(&msg, &key, &mut problems);
            per_key.entry(key).or_default().push(event_type(&msg));
        }
    }
    println!("\nper aggregate, in consumed order:");
    for (_, id) in AGGREGATES {
        let events = per_key.remove(id).unwrap_or_default();
        let ordered = events.iter().map(String::as_str).eq(STEPS.iter().copied());
        let verdict = if ordered {
            "✓ commit order".to_owned()
        } else if events.is_empty() {
            "✗ MISSING".to_owned()
        } else {
            format!("✗ expected {}", STEPS.join(" → "))
        };
        println!("  {id:<11} {}  {verdict}", events.join(" → "));
        if !ordered {
            problems.push(format!("{id}: {}", events.join(", ")));
        }
    }
    for (key, events) in per_key {
        println!("  {key:<11} {}  ✗ UNEXPECTED KEY", events.join(" → "));
        problems.push(format!("unexpected key {key:?}"));
    }
    if !problems.is_empty() {
        return Err(format!(
            "events missing, duplicated, misrouted or out of commit order: {}",
            problems.join("; ")
        )
        .into());
    }
    println!("\nall {expected} events arrived, each aggregate in commit order.");
    Ok(())
}

/// The event's `type` header.
fn event_type(msg: &impl Message) -> String {
    msg.headers()
        .and_then(|h| h.iter().find(|h| h.key == "type").and_then(|h| h.value))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// Notes a problem unless `msg` came from its aggregate type's topic.
fn check_topic(msg: &impl Message, key: &str, problems: &mut Vec<String>) {
    if let Some((kind, _)) = AGGREGATES.iter().find(|(_, id)| *id == key) {
        let want = format!("outbox.event.{kind}");
        if msg.topic() != want {
            problems.push(format!("{key} arrived on {}, not {want}", msg.topic()));
        }
    }
}
