//! A throwaway Kafka-protocol broker for the demo: librdkafka's mock cluster, listening on real
//! loopback sockets. Prints its bootstrap address, then runs until killed.
//!
//! Not for tests of walship's guarantees (those use a real broker process); it exists so a first
//! run of the demo does not wait for a broker build.
//!
//! ```sh
//! cargo run --example mock_broker -- 3   # 3 mock brokers
//! ```

use rdkafka::mocking::MockCluster;

fn main() {
    let brokers: i32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let cluster = match MockCluster::new(brokers) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start the mock cluster: {e}");
            std::process::exit(1);
        }
    };
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
