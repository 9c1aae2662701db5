//! Prints the records of one topic from its beginning: partition, offset, key, headers and value.
//!
//! The README's quick start uses it to show the events walship published, for readers without
//! Kafka's own tools (`kafka-console-consumer.sh`, kcat), and its test runs it to check that the
//! events arrived. It reads every partition with `assign` (no consumer group, nothing committed)
//! and exits 0 once it has printed COUNT records, 1 when fewer arrive within 30 s.
//!
//! ```sh
//! cargo run -p walship --example tail -- localhost:9092 outbox.event.order 2
//! ```

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

const USAGE: &str = "usage: tail BROKERS TOPIC [COUNT]";
const WAIT: Duration = Duration::from_secs(30);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let brokers = args.next().ok_or(USAGE)?;
    let topic = args.next().ok_or(USAGE)?;
    let count: usize = match args.next() {
        Some(n) => n.parse().map_err(|_| USAGE)?,
        None => 1,
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "walship-tail")
        .set("enable.auto.commit", "false")
        .set("log_level", "3")
        .create()?;
    let deadline = Instant::now() + WAIT;
    // The topic exists once walship has routed an event to it: ask until it does.
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5));
        if let Some(t) = md
            .iter()
            .flat_map(|md| md.topics())
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        {
            break t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>();
        }
        if Instant::now() > deadline {
            return Err(format!("topic {topic} did not appear within 30 s at {brokers}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut seen = 0;
    while seen < count {
        if Instant::now() > deadline {
            return Err(format!("{seen} of {count} records arrived within 30 s").into());
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        let text = |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
        let headers = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| format!("{}={}", h.key, text(h.value)))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let value = msg
            .payload()
            .map_or_else(|| "(tombstone)".to_owned(), |v| text(Some(v)));
        println!(
            "partition {} offset {} key {} headers {headers} value {value}",
            msg.partition(),
            msg.offset(),
            text(msg.key())
        );
        seen += 1;
    }
    Ok(())
}
