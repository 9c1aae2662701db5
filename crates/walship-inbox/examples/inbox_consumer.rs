//! A consumer process applying walship's events to its own database, each exactly once.
//!
//! Each event becomes a row of `applied_events`, in the transaction that advances the inbox's
//! mark; the Kafka offset is stored only after that commit. Kill it at any moment and start it
//! again: nothing is applied twice and nothing is missed.
//!
//! The book's chapter on the inbox (docs/src/inbox.md) includes the parts between the ANCHOR
//! comments, so it cannot drift from the crate.
//!
//! ```sh
//! cargo run -p walship-inbox --example inbox_consumer -- \
//!     'postgres://postgres@127.0.0.1:5432/projection' 127.0.0.1:9092 orders-projection outbox.event.order
//! ```

#![allow(clippy::print_stdout)]

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use tokio_postgres::Transaction;
use walship_inbox::{Admission, Handler, Inbox};

// ANCHOR: handler
/// The consumer's own work: one row per event.
struct Project;

impl Handler for Project {
    type Error = tokio_postgres::Error;

    async fn handle<M: Message + Sync>(
        &mut self,
        tx: &Transaction<'_>,
        record: &M,
    ) -> Result<(), tokio_postgres::Error> {
        let key = String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned();
        let payload = record
            .payload()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        tx.execute(
            "INSERT INTO applied_events (topic, kafka_partition, kafka_offset, key, payload) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &record.topic(),
                &record.partition(),
                &record.offset(),
                &key,
                &payload,
            ],
        )
        .await?;
        Ok(())
    }
}
// ANCHOR_END: handler

const USAGE: &str = "usage: inbox_consumer POSTGRES_URL BOOTSTRAP GROUP TOPIC...";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or(USAGE)?;
    let bootstrap = args.next().ok_or(USAGE)?;
    let group = args.next().ok_or(USAGE)?;
    let topics: Vec<String> = args.collect();
    if topics.is_empty() {
        return Err(USAGE.into());
    }

    // ANCHOR: setup
    let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let inbox = Inbox::new();
    inbox.create_tables(&client).await?;
    // The inbox's statements prepared once on this connection.
    let inbox = inbox.prepare(&client).await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS applied_events (
                 seq bigserial PRIMARY KEY, topic text, kafka_partition int, kafka_offset bigint,
                 key text, payload text)",
        )
        .await?;

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest");
    walship_inbox::configure(&mut config);
    let consumer: StreamConsumer = config.create()?;
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;

    let (mut applied, mut skipped) = (0u64, 0u64);
    loop {
        let message = consumer.recv().await?;
        // Any error ends the process without storing the record's offset: it is redelivered
        // after a restart, and skipped if it had been applied after all.
        match inbox
            .process(&mut client, &consumer, &message, &mut Project)
            .await?
        {
            Admission::Apply => applied += 1,
            Admission::Duplicate => skipped += 1,
        }
        if (applied + skipped) % 1000 == 0 {
            println!("{applied} applied, {skipped} copies skipped");
        }
    }
    // ANCHOR_END: setup
}
