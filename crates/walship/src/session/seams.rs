//! The session's two seams: where WAL comes from and where events go.
//!
//! Owns the traits [`WalSource`] and [`EventSink`] and their production implementations,
//! [`PgSource`] (a replication stream plus a catalog connection) and [`KafkaSink`] (the
//! producer plus the resume scanner). The session core is generic over both, so its unit tests
//! drive it with in-memory fakes.
//!
//! Invariant: a sink reports every record it accepted exactly once, through the
//! [`Progress`] it was built with (its `DeliveryListener`), and a record it refused is never
//! reported; a source's `send_status` is the only way a position reaches PostgreSQL.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgoutput::Lsn;
use tokio_postgres::Client;
use walship_kafka::{
    Delivered, Producers, ReadBackError, Record, ResumeScanner, SendError, Sink, SinkSettings,
    TopicError,
};
use walship_postgres::{Frame, PgError, ReplicationStream, TableName};

use super::progress::Progress;
use crate::error::Error;

/// Longest one topic's read-back may take (the replication stream waits meanwhile).
const SCAN_TIMEOUT: Duration = Duration::from_secs(20);

/// A started logical replication stream, and the catalog for what the stream cannot tell.
pub trait WalSource: Send {
    /// The next frame already received, without waiting; `None` when none is buffered.
    fn try_next(&mut self) -> Result<Option<Frame>, PgError>;

    /// Waits until more of the stream has arrived. Cancel-safe: dropping it loses nothing.
    fn fill(&mut self) -> impl Future<Output = Result<(), PgError>> + Send;

    /// Reports `flushed` as written, flushed and applied: the slot may move there.
    fn send_status(
        &mut self,
        flushed: Lsn,
        reply_requested: bool,
    ) -> impl Future<Output = Result<(), PgError>> + Send;

    /// Ends the stream cleanly once the server has processed every status sent before.
    fn finish(self) -> impl Future<Output = Result<(), PgError>> + Send
    where
        Self: Sized;

    /// Asks the catalog about relation `oid`: its current name, and whether it sits under
    /// `root` (the outbox, configured as `table`). `None` when the relation is gone or the
    /// source has no catalog connection.
    fn place_relation(
        &mut self,
        oid: u32,
        root: u32,
        table: &TableName,
    ) -> impl Future<Output = Result<Option<(TableName, bool)>, PgError>> + Send;
}

/// Where records go: hands them to the broker and reports acknowledgements to the session's
/// [`Progress`] (out of band, in any order).
pub trait EventSink: Send {
    /// Hands `record` over; its outcome is reported with `token`. `QueueFull` is backpressure:
    /// try again after some acknowledgements. A refusal arrives classified
    /// ([`walship_kafka::Refusal`]): the session decides on its class, never on a client
    /// library's error codes.
    fn send(&mut self, record: &Record<'_>, token: usize) -> Result<(), SendError>;

    /// `None` when `topic` is known to exist; else the check (creating it if configured to),
    /// borrowing nothing so the session can keep the walsender informed while it runs.
    fn check_topic(
        &mut self,
        topic: &str,
    ) -> Option<impl Future<Output = Result<(), TopicError>> + Send + 'static>;

    /// Remembers that `topic` exists.
    fn topic_exists(&mut self, topic: &str);

    /// Reads `topic` back: the positions at or after `since` that this source (`source`, the
    /// `walship.source` header) already wrote there, at most `limit` of them. An error is a
    /// reason to log; the events are then sent again.
    fn read_back(
        &mut self,
        topic: &str,
        source: &str,
        since: Lsn,
        limit: usize,
    ) -> impl Future<Output = Result<Delivered, ReadBackError>> + Send + 'static;

    /// Whether other pipelines' sinks use this sink's producer: closing it with records in
    /// flight would purge theirs too ([`EventSink::close`]).
    fn shares_producer(&self) -> bool {
        false
    }

    /// Drops every record not yet acknowledged and destroys the producer; resolves once it is
    /// gone, so nothing it holds can be sent after. A producer other sinks share is not
    /// destroyed: when this sink has records in flight, it is purged (theirs too) and retired. Bytes it had already written to a socket
    /// can still reach the broker (without broker-side fencing nothing can recall them): a
    /// consumer recognises such a copy by a `walship.position` at or below one it has seen.
    fn close(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized;
}

/// [`WalSource`] over PostgreSQL: the replication stream, and a SQL connection for catalog
/// lookups (`None`: relations the session's outbox scope does not know stay unplaced).
pub struct PgSource {
    stream: ReplicationStream,
    catalog: Option<Client>,
}

impl PgSource {
    /// Pairs a started stream with a catalog connection.
    pub fn new(stream: ReplicationStream, catalog: Option<Client>) -> Self {
        PgSource { stream, catalog }
    }
}

impl WalSource for PgSource {
    fn try_next(&mut self) -> Result<Option<Frame>, PgError> {
        self.stream.try_next()
    }

    fn fill(&mut self) -> impl Future<Output = Result<(), PgError>> + Send {
        self.stream.fill()
    }

    fn send_status(
        &mut self,
        flushed: Lsn,
        reply_requested: bool,
    ) -> impl Future<Output = Result<(), PgError>> + Send {
        self.stream.send_status(flushed, reply_requested)
    }

    fn finish(self) -> impl Future<Output = Result<(), PgError>> + Send {
        self.stream.finish()
    }

    async fn place_relation(
        &mut self,
        oid: u32,
        root: u32,
        table: &TableName,
    ) -> Result<Option<(TableName, bool)>, PgError> {
        match &self.catalog {
            Some(client) => {
                walship_postgres::catalog::place_relation(client, oid, root, table).await
            }
            None => Ok(None),
        }
    }
}

/// [`EventSink`] over Kafka: the session's producer, and a consumer (created on first use,
/// kept for the next topic) that reads topics back after an unclean stop.
pub struct KafkaSink {
    sink: Sink,
    settings: SinkSettings,
    scanner: Scanner,
}

impl KafkaSink {
    /// Joins the producer `producers` has for these settings (or makes one); acknowledgements
    /// go to `progress`. Its error never carries a secret value ([`SinkSettings::create`]).
    pub fn new(
        producers: &Producers,
        settings: SinkSettings,
        progress: Arc<Progress>,
    ) -> Result<Self, Error> {
        let sink = Sink::in_pool(producers, settings.clone(), progress)
            .map_err(|e| Error::Producer(e.to_string()))?;
        Ok(KafkaSink {
            sink,
            settings,
            scanner: Scanner::default(),
        })
    }
}

impl EventSink for KafkaSink {
    fn send(&mut self, record: &Record<'_>, token: usize) -> Result<(), SendError> {
        self.sink.send(record, token)
    }

    fn check_topic(
        &mut self,
        topic: &str,
    ) -> Option<impl Future<Output = Result<(), TopicError>> + Send + 'static> {
        self.sink.check_topic(topic)
    }

    fn topic_exists(&mut self, topic: &str) {
        self.sink.topic_exists(topic);
    }

    fn read_back(
        &mut self,
        topic: &str,
        source: &str,
        since: Lsn,
        limit: usize,
    ) -> impl Future<Output = Result<Delivered, ReadBackError>> + Send + 'static {
        let (settings, scanner) = (self.settings.clone(), Arc::clone(&self.scanner.0));
        let (topic, source) = (topic.to_owned(), source.to_owned());
        // The consumer blocks: off the async runtime.
        let scan = tokio::task::spawn_blocking(move || {
            let mut held = scanner.lock().unwrap_or_else(|e| e.into_inner());
            if held.is_none() {
                *held = Some(
                    ResumeScanner::new(&settings, &source, SCAN_TIMEOUT)
                        .map_err(|e| ReadBackError::of(&e))?,
                );
            }
            let found = held.as_ref().map(|s| s.delivered(&topic, since.0, limit));
            found
                .unwrap_or_else(|| Ok(Delivered::default()))
                .map_err(|e| ReadBackError::of(&e))
        });
        async move {
            scan.await.unwrap_or_else(|e| {
                Err(ReadBackError::other(format!(
                    "the read-back did not finish: {e}"
                )))
            })
        }
    }

    fn shares_producer(&self) -> bool {
        self.sink.shares_producer()
    }

    fn close(self) -> impl Future<Output = ()> + Send {
        // The scanner is closed off the runtime as it goes ([`Scanner`]).
        self.sink.close()
    }
}

/// The resume scanner, made on first use. Closing a consumer waits for its threads: when
/// this goes, the scanner is dropped off the async runtime.
#[derive(Default)]
struct Scanner(Arc<Mutex<Option<ResumeScanner>>>);

impl Drop for Scanner {
    fn drop(&mut self) {
        let scanner = self.0.lock().ok().and_then(|mut s| s.take());
        if let Some(scanner) = scanner
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn_blocking(move || drop(scanner));
        }
    }
}
