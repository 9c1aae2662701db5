//! A throwaway Kafka-protocol broker for the demo: librdkafka's mock cluster, listening on real
//! loopback sockets. Creates the topics it is given, prints its bootstrap address, then runs
//! until killed.
//!
//! The mock cluster cannot create topics through the Admin API (it does not implement
//! CreateTopics, and its metadata names no controller), and walship never lets a metadata request
//! auto-create a topic: so the topics walship will publish to must be named here, as one would
//! create them on a real cluster whose brokers refuse topic creation.
//!
//! Not for tests of walship's guarantees (those use a real broker process); it exists so a first
//! run of the demo does not wait for a broker build.
//!
//! ```sh
//! # 1 mock broker with two topics of 3 partitions each
//! cargo run --example mock_broker -- 1 outbox.event.order:3 outbox.event.customer:3
//! ```

use rdkafka::mocking::MockCluster;

const USAGE: &str = "usage: mock_broker [BROKERS] [TOPIC[:PARTITIONS]]...";

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let brokers: i32 = match args.next_if(|a| a.parse::<i32>().is_ok()) {
        Some(n) => n.parse().unwrap_or(1),
        None => 1,
    };
    let mut topics = Vec::new();
    for arg in args {
        let (name, partitions) = match arg.split_once(':') {
            Some((name, n)) => match n.parse::<i32>() {
                Ok(n) if n > 0 => (name.to_owned(), n),
                _ => fail(&format!("bad partition count in {arg:?}; {USAGE}")),
            },
            None => (arg.clone(), 1),
        };
        if name.is_empty() {
            fail(&format!("empty topic name in {arg:?}; {USAGE}"));
        }
        topics.push((name, partitions));
    }
    let cluster = match MockCluster::new(brokers) {
        Ok(c) => c,
        Err(e) => fail(&format!("cannot start the mock cluster: {e}")),
    };
    for (name, partitions) in &topics {
        if let Err(e) = cluster.create_topic(name, *partitions, 1) {
            fail(&format!(
                "cannot create topic {name:?} on the mock cluster: {e}"
            ));
        }
    }
    #[allow(clippy::print_stdout)]
    {
        println!("{}", cluster.bootstrap_servers());
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

fn fail(message: &str) -> ! {
    eprintln!("mock_broker: {message}");
    std::process::exit(1);
}
