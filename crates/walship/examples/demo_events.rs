//! The demo's application and downstream consumer in one program.
//!
//! 1. Writes outbox events for a few aggregates the way an application would: each business
//!    change and its outbox row in one transaction, several aggregates interleaved.
//! 2. Consumes the topics walship publishes to and prints each aggregate's events in the order
//!    they arrived, checking that the order matches the commit order.
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
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
            if let Some(t) = md
                .topics()
                .iter()
                .find(|t| t.error().is_none() && !t.partitions().is_empty())
            {
                for p in t.partitions() {
                    tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                }
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("topic {topic} did not appear: is walship running?").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    consumer.assign(&tpl)?;
    let expected = STEPS.len() * AGGREGATES.len();
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = 0;
    println!("consuming ...");
    while seen < expected {
        if Instant::now() > deadline {
            return Err(format!("only {seen} of {expected} events arrived within 60 s").into());
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        let event_type = msg
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "type").and_then(|h| h.value))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default();
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
    println!("\nper aggregate, in consumed order:");
    let mut all_ordered = true;
    for (key, events) in &per_key {
        let ordered = events.iter().map(String::as_str).eq(STEPS.iter().copied());
        all_ordered &= ordered;
        println!(
            "  {key:<11} {}  {}",
            events.join(" → "),
            if ordered {
                "✓ commit order"
            } else {
                "✗ OUT OF ORDER"
            }
        );
    }
    if !all_ordered {
        return Err("some aggregate's events arrived out of commit order".into());
    }
    println!("\nall {expected} events arrived, each aggregate in commit order.");
    Ok(())
}
