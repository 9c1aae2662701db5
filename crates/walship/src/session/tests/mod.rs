//! The session core against in-memory fakes of its two seams.
//!
//! Owns [`FakeWal`] (frames pushed by the test, standby status recorded), [`FakeSink`]
//! (records recorded; the test acknowledges them through the session's [`Progress`], as
//! librdkafka's poll thread would) and the [`Harness`] that drives a session through them. The
//! cases the end-to-end suite can only reach with luck live beside it, one file per theme:
//! `ordering`, `stopping`, `bad_rows`, `resuming`, `history`.
//!
//! Invariant: every wait here is for a condition, with a timeout; none sleeps to synchronise,
//! and a case that needs time to pass (a shutdown timeout, a freeze) runs on paused time
//! (`start_paused`), so it never waits on the clock. A "nothing was confirmed" assertion is
//! made after a keepalive that asks for a reply has been answered, so the session has had its
//! chance to report.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pgoutput::tuple::{Column, TupleData};
use pgoutput::{
    Begin, Commit, Encoder, Insert, LogicalMessage, Lsn, Message, PgTimestamp, Relation,
    RelationColumn,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use walship_kafka::{
    Delivered, DeliveryError, DeliveryListener, ErrorClass, Position, ReadBackError, Record,
    Refusal, SendError, TopicError, TopicRouter,
};
use walship_postgres::{Frame, OutboxSpec, PgError, Relations, TableName};

use super::progress::Progress;
use super::resume::Resume;
use super::{EventSink, Session, SessionParts, SessionStats, WalSource};
use crate::config::settings::SessionSettings;
use crate::error::Error;
use crate::telemetry::Telemetry;

mod bad_rows;
mod history;
mod ordering;
mod resuming;
mod stopping;

const WAIT: Duration = Duration::from_secs(10);
const OUTBOX_OID: u32 = 16_400;
const START: Lsn = Lsn(0x100);

// ------------------------------------------------------------------------------------------
// The fakes

#[derive(Default)]
struct WalState {
    frames: VecDeque<Frame>,
    /// Every standby status: (flushed, reply requested).
    statuses: Vec<(Lsn, bool)>,
    finished: bool,
}

#[derive(Default)]
struct WalShared {
    state: Mutex<WalState>,
    /// What happened to the session's two ends, in order: "sink closed", "stream finished",
    /// "stream released" (the source dropped).
    ends: Mutex<Vec<&'static str>>,
    /// Frames were pushed.
    pushed: Notify,
    /// A status was sent or the stream finished.
    reported: Notify,
}

/// A replication stream the test writes to.
struct FakeWal(Arc<WalShared>);

impl Drop for FakeWal {
    fn drop(&mut self) {
        self.0.ends.lock().unwrap().push("stream released");
        self.0.reported.notify_waiters();
    }
}

impl WalSource for FakeWal {
    fn try_next(&mut self) -> Result<Option<Frame>, PgError> {
        Ok(self.0.state.lock().unwrap().frames.pop_front())
    }

    async fn fill(&mut self) -> Result<(), PgError> {
        loop {
            let pushed = self.0.pushed.notified();
            if !self.0.state.lock().unwrap().frames.is_empty() {
                return Ok(());
            }
            pushed.await;
        }
    }

    async fn send_status(&mut self, flushed: Lsn, reply_requested: bool) -> Result<(), PgError> {
        let mut state = self.0.state.lock().unwrap();
        if let Some(&(last, _)) = state.statuses.last() {
            assert!(
                flushed >= last,
                "status went backwards: {last} then {flushed}"
            );
        }
        state.statuses.push((flushed, reply_requested));
        drop(state);
        self.0.reported.notify_waiters();
        Ok(())
    }

    async fn finish(self) -> Result<(), PgError> {
        self.0.state.lock().unwrap().finished = true;
        self.0.ends.lock().unwrap().push("stream finished");
        self.0.reported.notify_waiters();
        Ok(())
    }

    async fn place_relation(
        &mut self,
        _oid: u32,
        _root: u32,
        _table: &TableName,
    ) -> Result<Option<(TableName, bool)>, PgError> {
        Ok(None)
    }
}

/// One record the sink accepted.
#[derive(Debug, Clone)]
struct Sent {
    topic: String,
    key: Vec<u8>,
    payload: Option<Vec<u8>>,
    headers: HashMap<String, Vec<u8>>,
    token: usize,
}

impl Sent {
    fn position(&self) -> Position {
        Position::parse(&self.headers["walship.position"]).expect("a position header")
    }
}

#[derive(Default)]
struct SinkState {
    sent: Vec<Sent>,
    /// Sends refused with `QueueFull` so far.
    refused: u64,
    queue_full: bool,
    /// While set, topic checks wait for it.
    topic_gate: Option<Arc<Notify>>,
    topic_checks: u64,
    /// What a read-back of a topic finds.
    found: HashMap<String, Vec<(Position, &'static str)>>,
    /// Like `found`, with the timeline each record names.
    found_on: HashMap<String, Vec<(Position, &'static str, u32)>>,
    read_backs: Vec<String>,
    known: HashSet<String>,
    /// While set, closing the sink (destroying the producer) waits for it.
    close_gate: Option<Arc<Notify>>,
    /// Every record that was still unacknowledged when the sink closed (purged).
    purged: usize,
    /// Sends to the dead-letter topic refused at once with this error (a producer that refuses
    /// what it cannot accept).
    refuse_dead_letters: Option<Refusal>,
    /// A send panics (a bug somewhere on the way).
    panic_on_send: bool,
    /// Other pipelines' sinks share this sink's producer.
    shares: bool,
}

struct SinkShared {
    state: Mutex<SinkState>,
    changed: Notify,
    progress: Arc<Progress>,
    /// The source's shared state, to log the close among the stream's ends.
    wal: Arc<WalShared>,
}

/// A refusal of a record the broker can never take: a bad row.
fn too_large() -> Refusal {
    Refusal::new(ErrorClass::Record, "message size too large")
}

/// A broker the test acknowledges for.
struct FakeSink(Arc<SinkShared>);

impl EventSink for FakeSink {
    fn send(&mut self, record: &Record<'_>, token: usize) -> Result<(), SendError> {
        if self.0.state.lock().unwrap().panic_on_send {
            panic!("a bug on the way to the broker");
        }
        let mut state = self.0.state.lock().unwrap();
        if let Some(refusal) = state.refuse_dead_letters.clone()
            && record.topic == "outbox.dead-letter"
        {
            state.refused += 1;
            drop(state);
            self.0.changed.notify_waiters();
            return Err(SendError::Rejected {
                topic: record.topic.to_owned(),
                error: refusal,
            });
        }
        if state.queue_full {
            state.refused += 1;
            drop(state);
            self.0.changed.notify_waiters();
            return Err(SendError::QueueFull);
        }
        state.sent.push(Sent {
            topic: record.topic.to_owned(),
            key: record.key.to_vec(),
            payload: record.payload.map(<[u8]>::to_vec),
            headers: record
                .headers()
                .map(|(k, v)| (k.to_owned(), v.unwrap_or_default().to_vec()))
                .collect(),
            token,
        });
        drop(state);
        self.0.changed.notify_waiters();
        Ok(())
    }

    fn check_topic(
        &mut self,
        topic: &str,
    ) -> Option<impl Future<Output = Result<(), TopicError>> + Send + 'static> {
        let mut state = self.0.state.lock().unwrap();
        if state.known.contains(topic) {
            return None;
        }
        state.topic_checks += 1;
        let gate = state.topic_gate.clone();
        drop(state);
        self.0.changed.notify_waiters();
        Some(async move {
            if let Some(gate) = gate {
                gate.notified().await;
            }
            Ok(())
        })
    }

    fn topic_exists(&mut self, topic: &str) {
        self.0.state.lock().unwrap().known.insert(topic.to_owned());
    }

    fn read_back(
        &mut self,
        topic: &str,
        _source: &str,
        _since: Lsn,
        _limit: usize,
    ) -> impl Future<Output = Result<Delivered, ReadBackError>> + Send + 'static {
        let mut state = self.0.state.lock().unwrap();
        state.read_backs.push(topic.to_owned());
        let found: Delivered = state
            .found
            .get(topic)
            .into_iter()
            .flatten()
            .map(|(p, id)| (*p, *id, None))
            .chain(
                state
                    .found_on
                    .get(topic)
                    .into_iter()
                    .flatten()
                    .map(|(p, id, t)| (*p, *id, Some(*t))),
            )
            .map(|(p, id, timeline)| (p, Some(Box::from(id.as_bytes())), timeline))
            .collect();
        async move { Ok(found) }
    }

    fn shares_producer(&self) -> bool {
        self.0.state.lock().unwrap().shares
    }

    /// Like a producer being destroyed: waits for the close gate if one is set, counts what
    /// is unacknowledged as purged, and logs the close.
    async fn close(self) {
        let gate = self.0.state.lock().unwrap().close_gate.clone();
        if let Some(gate) = gate {
            gate.notified().await;
        }
        let in_flight = self.0.progress.in_flight();
        self.0.state.lock().unwrap().purged = usize::try_from(in_flight).unwrap();
        self.0.wal.ends.lock().unwrap().push("sink closed");
        self.0.changed.notify_waiters();
    }
}

// ------------------------------------------------------------------------------------------
// The harness

struct Harness {
    wal: Arc<WalShared>,
    sink: Arc<SinkShared>,
    progress: Arc<Progress>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<SessionStats, Error>>>,
    encoder: Encoder,
    /// Acknowledged records, by index in `sent`.
    acked: HashSet<usize>,
}

fn settings() -> SessionSettings {
    SessionSettings {
        status_interval: Duration::from_millis(50),
        shutdown_timeout: Duration::from_millis(300),
        ..SessionSettings::default()
    }
}

fn start(settings: SessionSettings, resume: Option<Resume>) -> Harness {
    start_with(settings, resume, |_| {})
}

fn start_with(
    settings: SessionSettings,
    resume: Option<Resume>,
    prepare: impl FnOnce(&mut SinkState),
) -> Harness {
    start_configured(settings, resume, prepare, |s| s)
}

/// A session that stops at once when `abandon` fires.
fn start_abandonable(settings: SessionSettings, abandon: CancellationToken) -> Harness {
    start_configured(settings, None, |_| {}, |s| s.abandon_on(abandon))
}

/// A session on a server whose `wal_sender_timeout` makes `limit` its silence limit.
fn start_with_limit(limit: Option<Duration>) -> Harness {
    let timeout = limit.map(|l| l * 4 / 3);
    start_configured(settings(), None, |_| {}, |s| s.silence_limit(timeout))
}

fn start_configured(
    settings: SessionSettings,
    resume: Option<Resume>,
    prepare: impl FnOnce(&mut SinkState),
    configure: impl FnOnce(Session<FakeWal, FakeSink>) -> Session<FakeWal, FakeSink>,
) -> Harness {
    let telemetry = Arc::new(Telemetry::default());
    let progress = Arc::new(Progress::with_telemetry(START, Arc::clone(&telemetry)));
    let wal = Arc::new(WalShared::default());
    let mut sink_state = SinkState::default();
    prepare(&mut sink_state);
    let sink = Arc::new(SinkShared {
        state: Mutex::new(sink_state),
        changed: Notify::new(),
        progress: Arc::clone(&progress),
        wal: Arc::clone(&wal),
    });
    let spec = OutboxSpec::debezium(TableName::parse("public.outbox"));
    let session = Session::new(SessionParts {
        source: FakeWal(Arc::clone(&wal)),
        sink: FakeSink(Arc::clone(&sink)),
        relations: Relations::new(spec),
        router: TopicRouter::new("outbox.event.{aggregatetype}").unwrap(),
        progress: Arc::clone(&progress),
        settings: SessionSettings {
            message_prefixes: vec!["outbox".into()],
            ..settings
        },
        telemetry,
        source_id: "7/walship".into(),
        resume,
    });
    let session = configure(session);
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let task = tokio::spawn(async move { session.run(&token).await });
    let mut h = Harness {
        wal,
        sink,
        progress,
        cancel,
        task: Some(task),
        encoder: Encoder::new(1),
        acked: HashSet::new(),
    };
    h.push(Message::Relation(outbox_relation()));
    h
}

fn outbox_relation() -> Relation {
    let column = |name: &str| RelationColumn {
        flags: 0,
        name: name.into(),
        type_oid: 25,
        type_modifier: -1,
    };
    Relation {
        xid: None,
        id: OUTBOX_OID,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns: ["id", "aggregatetype", "aggregateid", "type", "payload"]
            .into_iter()
            .map(column)
            .collect(),
    }
}

/// One outbox row: (id, aggregate type, aggregate id); `None` id column values stay NULL.
type Row<'a> = (&'a str, &'a str, Option<&'a str>);

impl Harness {
    fn push(&mut self, msg: Message) {
        let data = self.encoder.encode(&msg).unwrap();
        self.push_frame(Frame::XLogData {
            wal_start: Lsn(0x10),
            wal_end: Lsn(0x10),
            send_time: PgTimestamp::now(),
            data,
        });
    }

    fn push_frame(&self, frame: Frame) {
        self.wal.state.lock().unwrap().frames.push_back(frame);
        self.wal.pushed.notify_waiters();
    }

    fn begin(&mut self, xid: u32, commit_lsn: u64) {
        self.push(Message::Begin(Begin {
            final_lsn: Lsn(commit_lsn),
            commit_time: PgTimestamp::now(),
            xid,
        }));
    }

    fn insert(&mut self, (id, kind, key): Row<'_>) {
        let key = key.map(str::as_bytes);
        let payload = format!("{{\"id\":\"{id}\"}}");
        let columns = [
            Column::Text(id.as_bytes()),
            Column::Text(kind.as_bytes()),
            key.map_or(Column::Null, Column::Text),
            Column::Text(b"created"),
            Column::Text(payload.as_bytes()),
        ];
        let tuple = TupleData::encode(&columns).unwrap();
        self.push(Message::Insert(Insert {
            xid: None,
            relation_id: OUTBOX_OID,
            tuple,
        }));
    }

    /// Commits the open transaction; its end LSN is `commit_lsn + 8`.
    fn commit(&mut self, commit_lsn: u64) -> Lsn {
        let end = Lsn(commit_lsn + 8);
        self.push(Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: end,
            commit_time: PgTimestamp::now(),
        }));
        end
    }

    /// A whole transaction of outbox rows; returns its end LSN.
    fn txn(&mut self, xid: u32, commit_lsn: u64, rows: &[Row<'_>]) -> Lsn {
        self.begin(xid, commit_lsn);
        for row in rows {
            self.insert(*row);
        }
        self.commit(commit_lsn)
    }

    fn keepalive(&self, wal_end: Lsn, reply_requested: bool) {
        self.push_frame(Frame::Keepalive {
            wal_end,
            send_time: PgTimestamp::now(),
            reply_requested,
        });
    }

    async fn until_sink<T>(&self, what: &str, mut ready: impl FnMut(&SinkState) -> Option<T>) -> T {
        let wait = async {
            loop {
                let changed = self.sink.changed.notified();
                if let Some(t) = ready(&self.sink.state.lock().unwrap()) {
                    return t;
                }
                changed.await;
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for the sink: {what}"))
    }

    /// Waits for at least `n` records; returns them all.
    async fn records(&self, n: usize) -> Vec<Sent> {
        self.until_sink(&format!("{n} records"), |s| {
            (s.sent.len() >= n).then(|| s.sent.clone())
        })
        .await
    }

    async fn until_status(&self, what: &str, mut ready: impl FnMut(&WalState) -> bool) {
        let wait = async {
            loop {
                let reported = self.wal.reported.notified();
                if ready(&self.wal.state.lock().unwrap()) {
                    return;
                }
                reported.await;
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for the source: {what}"));
    }

    /// Asks for a reply and waits for it: the position the session reports once it has read
    /// everything pushed so far.
    async fn confirmed_now(&self, wal_end: Lsn) -> Lsn {
        let replies = self.replies();
        self.keepalive(wal_end, true);
        self.until_status("a reply", |s| {
            s.statuses.iter().filter(|(_, reply)| *reply).count() > replies
        })
        .await;
        self.last_status()
    }

    fn replies(&self) -> usize {
        let state = self.wal.state.lock().unwrap();
        state.statuses.iter().filter(|(_, reply)| *reply).count()
    }

    fn last_status(&self) -> Lsn {
        let state = self.wal.state.lock().unwrap();
        state.statuses.last().map_or(START, |(lsn, _)| *lsn)
    }

    async fn until_confirmed(&self, lsn: Lsn) {
        self.until_status(&format!("a status of {lsn}"), |s| {
            s.statuses.iter().any(|(l, _)| *l >= lsn)
        })
        .await;
        assert_eq!(self.last_status(), lsn, "confirmed past {lsn}");
    }

    /// Acknowledges record `index` (in send order) as the broker would.
    fn ack(&mut self, sent: &[Sent], index: usize) {
        assert!(
            self.acked.insert(index),
            "record {index} acknowledged twice"
        );
        self.progress.on_delivery(sent[index].token, Ok(1));
    }

    fn fail(&mut self, sent: &[Sent], index: usize, error: Refusal) {
        assert!(self.acked.insert(index));
        let s = &sent[index];
        self.progress.on_delivery(
            s.token,
            Err(DeliveryError {
                topic: s.topic.clone(),
                partition: 0,
                key: Some(s.key.clone()),
                payload_len: s.payload.as_ref().map_or(0, Vec::len),
                position: Some(s.position()),
                id: s.headers.get("id").cloned(),
                error,
            }),
        );
    }

    /// Requests a stop and waits for the session to end.
    async fn stop(&mut self) -> Result<SessionStats, Error> {
        self.cancel.cancel();
        self.end().await
    }

    async fn end(&mut self) -> Result<SessionStats, Error> {
        let task = self.task.take().expect("the session is running");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the session did not end")
            .expect("the session panicked")
    }

    fn finished(&self) -> bool {
        self.wal.state.lock().unwrap().finished
    }

    /// The session's ends in order; asserts the sink closed before the stream was let go.
    fn ends(&self) -> Vec<&'static str> {
        let ends = self.wal.ends.lock().unwrap().clone();
        let closed = ends.iter().position(|e| *e == "sink closed");
        let released = ends.iter().position(|e| *e != "sink closed");
        assert!(
            closed.is_some() && closed < released,
            "the producer must be gone before the stream is let go: {ends:?}"
        );
        ends
    }

    fn statuses(&self) -> usize {
        self.wal.state.lock().unwrap().statuses.len()
    }
}

fn keys(sent: &[Sent]) -> Vec<&str> {
    sent.iter()
        .map(|s| std::str::from_utf8(&s.key).unwrap())
        .collect()
}

fn at(commit_lsn: u64, index: u32) -> Position {
    Position { commit_lsn, index }
}
