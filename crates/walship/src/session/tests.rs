//! The session core against in-memory fakes of its two seams.
//!
//! Owns [`FakeWal`] (frames pushed by the test, standby status recorded) and [`FakeSink`]
//! (records recorded; the test acknowledges them through the session's [`Progress`], as
//! librdkafka's poll thread would), and the cases the end-to-end suite can only reach with
//! luck: acknowledgement order, keepalive confirmation, abandoning a stop, dead letters and
//! resume skips.
//!
//! Invariant: every wait here is for a condition, with a timeout; none sleeps to synchronise.
//! A "nothing was confirmed" assertion is made after a keepalive that asks for a reply has been
//! answered, so the session has had its chance to report.

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

// ------------------------------------------------------------------------------------------
// Ordering and confirmation

#[tokio::test]
async fn events_leave_in_wal_order_with_their_positions_and_headers() {
    let mut h = start(settings(), None);
    h.txn(
        1,
        0x200,
        &[("1", "order", Some("A")), ("2", "user", Some("B"))],
    );
    h.txn(2, 0x300, &[("3", "order", Some("A"))]);
    let sent = h.records(3).await;
    assert_eq!(keys(&sent), ["A", "B", "A"]);
    assert_eq!(
        sent.iter().map(|s| s.topic.as_str()).collect::<Vec<_>>(),
        [
            "outbox.event.order",
            "outbox.event.user",
            "outbox.event.order"
        ]
    );
    let positions: Vec<_> = sent
        .iter()
        .map(|s| (s.position().commit_lsn, s.position().index))
        .collect();
    assert_eq!(positions, [(0x200, 0), (0x200, 1), (0x300, 0)]);
    assert_eq!(sent[0].headers["walship.source"], b"7/walship");
    assert_eq!(sent[0].headers["id"], b"1");
    assert_eq!(sent[0].headers["type"], b"created");
    assert_eq!(sent[0].payload.as_deref(), Some(&br#"{"id":"1"}"#[..]));
}

#[tokio::test]
async fn the_slot_moves_only_behind_every_ack_of_a_prefix_of_transactions() {
    let mut h = start(settings(), None);
    let first = h.txn(
        1,
        0x200,
        &[("1", "order", Some("A")), ("2", "order", Some("B"))],
    );
    let second = h.txn(2, 0x300, &[("3", "order", Some("C"))]);
    let sent = h.records(3).await;
    // The later transaction is acknowledged first (another partition): nothing moves.
    h.ack(&sent, 2);
    assert_eq!(h.confirmed_now(second).await, START);
    // Half of the first: still nothing.
    h.ack(&sent, 1);
    assert_eq!(h.confirmed_now(second).await, START);
    // The whole prefix: both transactions, promptly.
    h.ack(&sent, 0);
    h.until_confirmed(second).await;
    assert!(second > first);
    let stats = h.stop().await.unwrap();
    assert_eq!((stats.events_sent, stats.transactions), (3, 2));
    assert!(h.finished(), "a graceful stop ends the stream cleanly");
}

#[tokio::test]
async fn a_keepalive_outside_a_transaction_confirms_its_position_and_inside_one_does_not() {
    let mut h = start(settings(), None);
    // Idle: the server has sent everything before 0x180, none of it an event.
    h.keepalive(Lsn(0x180), false);
    h.until_confirmed(Lsn(0x180)).await;
    // Inside a transaction whose event is not acknowledged, a keepalive confirms nothing.
    h.begin(1, 0x200);
    h.insert(("1", "order", Some("A")));
    let sent = h.records(1).await;
    assert_eq!(h.confirmed_now(Lsn(0x1F0)).await, Lsn(0x180));
    let end = h.commit(0x200);
    assert_eq!(h.confirmed_now(end).await, Lsn(0x180));
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
    // And after it, the keepalive's position again.
    h.keepalive(Lsn(0x400), false);
    h.until_confirmed(Lsn(0x400)).await;
}

#[tokio::test]
async fn a_transaction_without_outbox_rows_is_confirmed_once_the_earlier_ones_are() {
    let mut h = start(settings(), None);
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.begin(2, 0x300);
    let empty = h.commit(0x300);
    let sent = h.records(1).await;
    assert_eq!(h.confirmed_now(empty).await, START);
    h.ack(&sent, 0);
    h.until_confirmed(empty).await;
    assert!(empty > first);
}

#[tokio::test]
async fn the_pending_bound_holds_reading_until_the_oldest_transaction_completes() {
    let mut h = start(
        SessionSettings {
            max_pending: 2,
            ..settings()
        },
        None,
    );
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x300, &[("2", "order", Some("B"))]);
    let third = h.txn(3, 0x400, &[("3", "order", Some("C"))]);
    let sent = h.records(2).await;
    // Two transactions are tracked: the third waits, its record not handed over, while the
    // walsender keeps hearing from the session...
    let statuses = h.wal.state.lock().unwrap().statuses.len();
    h.until_status("standby status while waiting", |s| {
        s.statuses.len() >= statuses + 2
    })
    .await;
    assert_eq!(h.sink.state.lock().unwrap().sent.len(), 2);
    // ...until the oldest completes.
    h.ack(&sent, 0);
    let sent = h.records(3).await;
    assert_eq!(keys(&sent), ["A", "B", "C"]);
    h.ack(&sent, 1);
    h.ack(&sent, 2);
    h.until_confirmed(third).await;
}

// ------------------------------------------------------------------------------------------
// Stopping

#[tokio::test]
async fn a_stop_mid_transaction_finishes_the_transaction_first() {
    let mut h = start(settings(), None);
    h.begin(1, 0x200);
    h.insert(("1", "order", Some("A")));
    h.records(1).await;
    h.cancel.cancel();
    h.insert(("2", "order", Some("A")));
    let end = h.commit(0x200);
    let sent = h.records(2).await;
    h.ack(&sent, 0);
    h.ack(&sent, 1);
    let stats = h.end().await.unwrap();
    assert_eq!(stats.events_sent, 2, "the rest of the transaction was sent");
    // Both acknowledged before the end: the whole transaction is confirmed.
    assert_eq!(h.last_status(), end);
    assert!(h.finished());
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test]
async fn a_stop_holds_the_stream_reporting_status_until_its_records_are_acknowledged() {
    let mut h = start(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        None,
    );
    let end = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let sent = h.records(1).await;
    h.cancel.cancel();
    // The acknowledgement is slow: the walsender keeps hearing from the session meanwhile
    // (three more status reports), and the stream is neither finished nor released.
    let before = h.statuses();
    h.until_status("status while the acknowledgement is awaited", |s| {
        s.statuses.len() >= before + 3
    })
    .await;
    assert!(
        h.wal.ends.lock().unwrap().is_empty(),
        "let go before the ack"
    );
    h.ack(&sent, 0);
    h.end().await.unwrap();
    assert_eq!(h.last_status(), end);
    assert_eq!(h.sink.state.lock().unwrap().purged, 0);
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test]
async fn a_stop_whose_acknowledgements_never_come_lets_the_stream_go_after_the_timeout_and_the_close()
 {
    let gate = Arc::new(Notify::new());
    let held = Arc::clone(&gate);
    let mut h = start_with(settings(), None, move |s| s.close_gate = Some(held));
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.records(1).await;
    let stopped = tokio::time::Instant::now();
    let before = h.statuses();
    h.cancel.cancel();
    // Status every 50 ms: twelve reports span the 300 ms shutdown timeout and then some of the
    // producer's (slow) destruction. The stream stays meanwhile.
    h.until_status("status through the timeout and the close", |s| {
        s.statuses.len() >= before + 12
    })
    .await;
    assert!(stopped.elapsed() > settings().shutdown_timeout);
    assert!(
        h.wal.ends.lock().unwrap().is_empty(),
        "let go before the close"
    );
    gate.notify_one();
    h.end().await.unwrap();
    assert!(stopped.elapsed() >= settings().shutdown_timeout);
    assert!(
        h.last_status() < first,
        "an unacknowledged transaction was confirmed"
    );
    assert_eq!(h.sink.state.lock().unwrap().purged, 1);
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test]
async fn an_abandoned_session_does_not_wait_for_acknowledgements() {
    let abandon = CancellationToken::new();
    let mut h = start_abandonable(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        abandon.clone(),
    );
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.records(1).await;
    abandon.cancel();
    h.cancel.cancel();
    h.end().await.unwrap();
    assert!(h.last_status() < first);
    assert_eq!(h.sink.state.lock().unwrap().purged, 1);
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test]
async fn an_abandoned_session_waiting_for_room_ends_at_once() {
    let abandon = CancellationToken::new();
    let mut h = start_abandonable(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            max_in_flight: 2,
            ..settings()
        },
        abandon.clone(),
    );
    // Two records fill the window; the third waits for room that never comes (a broker cut off).
    let first = h.txn(
        1,
        0x200,
        &[
            ("1", "order", Some("A")),
            ("2", "order", Some("A")),
            ("3", "order", Some("A")),
        ],
    );
    h.records(2).await;
    abandon.cancel();
    h.cancel.cancel();
    h.end().await.unwrap();
    assert_eq!(
        h.sink.state.lock().unwrap().sent.len(),
        2,
        "sent after the abandon"
    );
    assert!(h.last_status() < first);
    assert_eq!(
        h.ends(),
        ["sink closed", "stream finished", "stream released"]
    );
}

#[tokio::test]
async fn an_abandoned_session_waiting_for_the_broker_mid_transaction_ends_at_once() {
    let gate = Arc::new(Notify::new());
    let abandon = CancellationToken::new();
    let held = Arc::clone(&gate);
    let mut h = start_configured(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        None,
        |s| {
            s.known.insert("outbox.event.order".into());
            s.topic_gate = Some(held);
        },
        |s| s.abandon_on(abandon.clone()),
    );
    // The first event went out; the second needs a topic check the broker does not answer.
    h.begin(1, 0x200);
    h.insert(("1", "order", Some("A")));
    h.insert(("2", "invoice", Some("B")));
    let end = h.commit(0x200);
    h.records(1).await;
    h.until_sink("the topic check", |s| (s.topic_checks > 0).then_some(()))
        .await;
    abandon.cancel();
    h.cancel.cancel();
    h.end().await.unwrap();
    assert_eq!(h.sink.state.lock().unwrap().sent.len(), 1);
    assert!(h.last_status() < end);
    h.ends();
    drop(gate);
}

#[tokio::test]
async fn a_session_that_panics_still_closes_its_sink_before_letting_the_stream_go() {
    let mut h = start_with(settings(), None, |s| s.panic_on_send = true);
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let task = h.task.take().expect("running");
    let joined = tokio::time::timeout(WAIT, task).await.expect("ended");
    assert!(joined.is_err_and(|e| e.is_panic()), "the panic goes on");
    h.ends();
}

#[tokio::test]
async fn a_session_that_was_silent_too_long_publishes_nothing_more_of_what_it_read() {
    let mut h = start_with_limit(Some(Duration::from_millis(400)));
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let sent = h.records(1).await;
    h.ack(&sent, 0);
    // Frozen: the runtime does not run the session for longer than the limit allows, while
    // frames it had read wait in its buffer.
    h.txn(2, 0x300, &[("2", "order", Some("B"))]);
    std::thread::sleep(Duration::from_millis(700));
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Silenced { .. }), "{error}");
    assert!(error.is_transient());
    assert!(error.to_string().contains("wal_sender_timeout"), "{error}");
    assert_eq!(h.records(1).await.len(), 1, "published after the freeze");
    assert_eq!(h.ends(), ["sink closed", "stream released"]);
}

#[tokio::test]
async fn a_stop_while_the_producer_queue_is_full_abandons_the_open_transaction() {
    let mut h = start_with(settings(), None, |s| s.queue_full = true);
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.until_sink("a refused send", |s| (s.refused > 0).then_some(()))
        .await;
    let stats = h.stop().await.unwrap();
    assert_eq!(stats.events_sent, 0);
    assert!(h.sink.state.lock().unwrap().sent.is_empty());
    assert!(
        h.last_status() < first,
        "the abandoned transaction was confirmed"
    );
    assert!(h.finished());
}

#[tokio::test]
async fn a_stop_during_a_topic_check_does_not_wait_for_the_broker() {
    let gate = Arc::new(Notify::new());
    let held = Arc::clone(&gate);
    let mut h = start_with(
        SessionSettings {
            shutdown_timeout: Duration::from_secs(3600),
            ..settings()
        },
        None,
        move |s| s.topic_gate = Some(held),
    );
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.until_sink("a topic check", |s| (s.topic_checks > 0).then_some(()))
        .await;
    // Nothing of the transaction was sent: the stop abandons it at once, although the
    // shutdown timeout is an hour.
    let stats = h.stop().await.unwrap();
    assert_eq!(stats.events_sent, 0);
    assert!(h.last_status() < first);
    drop(gate);
}

// ------------------------------------------------------------------------------------------
// Bad rows, refused records, failed deliveries

#[tokio::test]
async fn a_bad_row_under_fail_stops_the_session_before_its_transaction_is_confirmed() {
    let mut h = start(settings(), None);
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x300, &[("2", "order", None)]);
    let sent = h.records(1).await;
    h.ack(&sent, 0);
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Row { xid: 2, .. }), "{error}");
    assert!(error.to_string().contains("aggregateid"), "{error}");
    // The first transaction may be confirmed; never the bad one.
    assert!(h.last_status() <= first);
}

#[tokio::test]
async fn a_bad_row_is_dead_lettered_in_its_place_and_confirmed_behind_its_dead_letter() {
    let mut h = start(
        SessionSettings {
            dead_letter_topic: Some("outbox.dead-letter".into()),
            ..settings()
        },
        None,
    );
    let end = h.txn(1, 0x200, &[("1", "order", Some("A")), ("2", "order", None)]);
    let sent = h.records(2).await;
    assert_eq!(sent[1].topic, "outbox.dead-letter");
    let reason = String::from_utf8(sent[1].headers["walship.error"].clone()).unwrap();
    assert!(reason.contains("aggregateid"), "{reason}");
    assert_eq!(sent[1].headers["walship.table"], b"public.outbox");
    // The value is the whole row, as JSON, so nothing of it is lost.
    let value = String::from_utf8(sent[1].payload.clone().unwrap_or_default()).unwrap();
    assert!(
        value.contains(r#""id":"2""#) && value.contains(r#""aggregateid":null"#),
        "{value}"
    );
    assert_eq!(
        sent[1].position(),
        Position {
            commit_lsn: 0x200,
            index: 1
        }
    );
    h.ack(&sent, 0);
    assert_eq!(
        h.confirmed_now(end).await,
        START,
        "the dead letter is not acknowledged yet"
    );
    h.ack(&sent, 1);
    h.until_confirmed(end).await;
}

fn dead_lettering() -> SessionSettings {
    SessionSettings {
        dead_letter_topic: Some("outbox.dead-letter".into()),
        ..settings()
    }
}

#[tokio::test]
async fn an_oversized_bad_row_is_dead_lettered_cut_to_fit_with_its_size() {
    let mut h = start(
        SessionSettings {
            max_record_bytes: 4_000,
            ..dead_lettering()
        },
        None,
    );
    let big = "x".repeat(10_000);
    let end = h.txn(1, 0x200, &[(&big, "order", None)]);
    let sent = h.records(1).await;
    let dead = &sent[0];
    assert_eq!(dead.topic, "outbox.dead-letter");
    let value = dead.payload.clone().unwrap_or_default();
    let headers: usize = dead.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(!value.is_empty() && value.len() < 10_000, "{}", value.len());
    assert!(
        value.len() + headers + dead.key.len() <= 4_000,
        "{} + {headers} does not fit",
        value.len()
    );
    let full: usize = String::from_utf8(dead.headers["walship.truncated"].clone())
        .unwrap()
        .parse()
        .unwrap();
    assert!(full > 10_000, "the original JSON's size: {full}");
    assert!(value.starts_with(b"{"), "the value is the row's JSON, cut");
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
}

#[tokio::test]
async fn a_dead_letter_the_producer_refuses_is_sent_once_without_its_value_then_stops() {
    let mut h = start_with(dead_lettering(), None, |s| {
        s.refuse_dead_letters = Some(too_large());
    });
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x300, &[("2", "order", None)]);
    let sent = h.records(1).await;
    h.ack(&sent, 0);
    let error = h.end().await.unwrap_err();
    assert!(
        matches!(error, Error::DeadLetterRefused { xid: 2, .. }),
        "{error}"
    );
    assert!(!error.is_transient());
    assert!(error.to_string().contains("outbox.dead-letter"), "{error}");
    assert_eq!(
        h.sink.state.lock().unwrap().refused,
        2,
        "once with its value, once without"
    );
    assert!(h.last_status() <= first, "confirmed past the row");
    h.ends();
}

#[tokio::test]
async fn a_dead_letter_the_broker_refuses_twice_stops_without_confirming_its_row() {
    let mut h = start(dead_lettering(), None);
    let first = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x300, &[("2", "order", None)]);
    let sent = h.records(2).await;
    h.ack(&sent, 0);
    assert!(!sent[1].payload.as_ref().is_none_or(Vec::is_empty));
    h.fail(
        &sent,
        1,
        Refusal::new(ErrorClass::Record, "invalid timestamp"),
    );
    // Sent again in its place, without its value.
    let sent = h.records(3).await;
    assert_eq!(sent[2].topic, "outbox.dead-letter");
    assert_eq!(sent[2].payload.as_deref(), Some(&b""[..]));
    assert_eq!(sent[2].token, sent[1].token);
    h.fail(
        &sent,
        2,
        Refusal::new(ErrorClass::Record, "invalid timestamp"),
    );
    let error = h.end().await.unwrap_err();
    assert!(
        matches!(error, Error::DeadLetterRefused { xid: 2, .. }),
        "{error}"
    );
    assert_eq!(h.records(3).await.len(), 3, "no third attempt");
    assert!(h.last_status() <= first, "confirmed past the row");
    h.ends();
}

#[tokio::test]
async fn a_record_the_broker_refuses_is_dead_lettered_and_its_transaction_waits_for_it() {
    let mut h = start(
        SessionSettings {
            dead_letter_topic: Some("outbox.dead-letter".into()),
            ..settings()
        },
        None,
    );
    let end = h.txn(
        1,
        0x200,
        &[("1", "order", Some("A")), ("2", "order", Some("B"))],
    );
    let sent = h.records(2).await;
    h.ack(&sent, 0);
    h.fail(&sent, 1, too_large());
    let sent = h.records(3).await;
    let dead = &sent[2];
    assert_eq!(dead.topic, "outbox.dead-letter");
    assert_eq!(dead.key, b"B");
    assert_eq!(
        dead.token, sent[1].token,
        "the dead letter takes the refused record's place"
    );
    assert_eq!(dead.position(), sent[1].position());
    assert_eq!(h.confirmed_now(end).await, START);
    h.ack(&sent, 2);
    h.until_confirmed(end).await;
}

#[tokio::test]
async fn a_failed_delivery_stops_the_session_without_confirming_its_transaction() {
    let mut h = start(settings(), None);
    let end = h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let sent = h.records(1).await;
    h.fail(
        &sent,
        0,
        Refusal::new(ErrorClass::Transient, "message timed out"),
    );
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Delivery(_)), "{error}");
    assert!(
        error.is_transient(),
        "a timed-out delivery is retried by reconnecting"
    );
    assert!(h.last_status() < end);
}

#[tokio::test]
async fn a_nontransactional_message_with_an_outbox_prefix_is_a_bad_row() {
    let mut h = start(settings(), None);
    h.push(Message::Message(LogicalMessage {
        xid: None,
        flags: 0,
        lsn: Lsn(0x180),
        prefix: "outbox".into(),
        content: Bytes::from_static(br#"{"aggregatetype":"order","aggregateid":"A"}"#),
    }));
    let error = h.end().await.unwrap_err();
    assert!(matches!(error, Error::Message { xid: None, .. }), "{error}");
    assert!(h.last_status() < Lsn(0x180));
}

// ------------------------------------------------------------------------------------------
// Resume after an unclean stop

fn at(commit_lsn: u64, index: u32) -> Position {
    Position { commit_lsn, index }
}

#[tokio::test]
async fn resume_skips_what_the_topic_holds_and_the_transaction_completes_on_the_rest() {
    let resume = Resume::new(START, Lsn(0x1000));
    let mut h = start_with(settings(), Some(resume), |s| {
        s.found.insert(
            "outbox.event.order".into(),
            vec![(at(0x200, 0), "1"), (at(0x200, 1), "2")],
        );
    });
    let end = h.txn(
        1,
        0x200,
        &[
            ("1", "order", Some("A")),
            ("2", "order", Some("A")),
            ("3", "order", Some("A")),
        ],
    );
    let sent = h.records(1).await;
    assert_eq!(
        sent[0].headers["id"], b"3",
        "events 1 and 2 were already delivered"
    );
    assert_eq!(sent[0].position(), at(0x200, 2));
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
    assert_eq!(
        h.sink.state.lock().unwrap().read_backs,
        ["outbox.event.order"]
    );
}

#[tokio::test]
async fn resume_sends_again_from_the_first_event_of_a_key_it_did_not_find() {
    let resume = Resume::new(START, Lsn(0x1000));
    let mut h = start_with(settings(), Some(resume), |s| {
        // The topic holds event 2 of key A but not event 1 (lost in flight), and event 3 of B.
        s.found.insert(
            "outbox.event.order".into(),
            vec![(at(0x200, 1), "2"), (at(0x200, 2), "3")],
        );
    });
    let end = h.txn(
        1,
        0x200,
        &[
            ("1", "order", Some("A")),
            ("2", "order", Some("A")),
            ("3", "order", Some("B")),
        ],
    );
    // A's event 2 is sent again so it cannot be the last word before event 1; B's is skipped.
    let sent = h.records(2).await;
    assert_eq!(keys(&sent), ["A", "A"]);
    assert_eq!(sent[1].headers["id"], b"2");
    h.ack(&sent, 0);
    h.ack(&sent, 1);
    h.until_confirmed(end).await;
    assert_eq!(h.sink.state.lock().unwrap().sent.len(), 2);
}

#[tokio::test]
async fn resume_ends_once_the_stream_passes_what_an_earlier_run_can_have_sent() {
    let resume = Resume::new(START, Lsn(0x300));
    let mut h = start_with(settings(), Some(resume), |s| {
        s.found
            .insert("outbox.event.order".into(), vec![(at(0x400, 0), "9")]);
    });
    // Committed after the server's position at start: never looked up, never skipped.
    let end = h.txn(1, 0x400, &[("9", "order", Some("A"))]);
    let sent = h.records(1).await;
    assert!(h.sink.state.lock().unwrap().read_backs.is_empty());
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
}

// ------------------------------------------------------------------------------------------
// Published events and the server's history

/// Timeline 2, which branched from 1 at 0x300.
fn promoted() -> walship_postgres::failover::History {
    walship_postgres::failover::History {
        timeline: 2,
        switches: vec![walship_postgres::failover::TimelineSwitch {
            timeline: 1,
            end: Lsn(0x300),
        }],
    }
}

#[tokio::test]
async fn after_a_promotion_records_beyond_the_branch_stop_the_session_before_its_first_record() {
    let mut h = start_configured(
        settings(),
        None,
        |s| {
            s.found_on.insert(
                "outbox.event.order".into(),
                vec![
                    (at(0x200, 0), "1", 1),
                    (at(0x300, 0), "2", 1),
                    (at(0x380, 0), "3", 1),
                ],
            );
        },
        |s| {
            s.on_server(promoted(), "pg2:5432", 0).check_published(
                vec!["outbox.event.order".into()],
                START,
                Arc::default(),
            )
        },
    );
    h.txn(1, 0x400, &[("9", "order", Some("A"))]);
    let error = h.end().await.unwrap_err();
    let Error::Fork {
        records,
        first,
        last,
        record_timeline,
        ended,
        next_epoch,
        ..
    } = &error
    else {
        panic!("{error}");
    };
    // Every record of timeline 1 since the slot's position is named, the newest past its end.
    assert_eq!((*records, *first, *last), (3, at(0x200, 0), at(0x380, 0)));
    assert_eq!(
        (*record_timeline, *ended, *next_epoch),
        (1, Some(Lsn(0x300)), 1)
    );
    assert!(!error.is_transient());
    let text = error.to_string();
    assert!(
        text.contains("pg2:5432")
            && text.contains("0/200:0 to 0/380:0")
            && text.contains("past where timeline 1 ended (0/300)")
            && text.contains("which began at 0/300")
            && text.contains("Nothing was published or confirmed")
            && text.contains("postgres.source_epoch = 1"),
        "{text}"
    );
    assert!(
        h.sink.state.lock().unwrap().sent.is_empty(),
        "published on a fork"
    );
    assert!(h.last_status() < Lsn(0x400));
    h.ends();
}

#[tokio::test]
async fn after_a_promotion_records_within_the_history_let_the_session_go_on_naming_its_timeline() {
    let mut h = start_configured(
        settings(),
        Some(Resume::new(START, Lsn(0x1000))),
        |s| {
            s.found_on.insert(
                "outbox.event.order".into(),
                vec![(at(0x200, 0), "1", 1), (at(0x400, 0), "2", 2)],
            );
        },
        |s| {
            s.on_server(promoted(), "pg2:5432", 0).check_published(
                vec!["outbox.event.order".into()],
                START,
                Arc::default(),
            )
        },
    );
    let end = h.txn(
        1,
        0x400,
        &[("2", "order", Some("A")), ("3", "order", Some("A"))],
    );
    // Event 2 was published on this timeline by an earlier session: the check's read-back
    // serves the resume lookup too, without a second read.
    let sent = h.records(1).await;
    assert_eq!(sent[0].headers["id"], b"3");
    assert_eq!(sent[0].headers["walship.timeline"], b"2");
    assert_eq!(
        h.sink.state.lock().unwrap().read_backs,
        ["outbox.event.order"]
    );
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
}

#[tokio::test]
async fn a_resume_lookup_that_finds_a_later_timeline_stops_an_old_primary() {
    let resume = Resume::new(START, Lsn(0x1000));
    let mut h = start_with(settings(), Some(resume), |s| {
        s.found_on
            .insert("outbox.event.order".into(), vec![(at(0x200, 0), "1", 2)]);
    });
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    let error = h.end().await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::Fork {
                record_timeline: 2,
                timeline: 1,
                ..
            }
        ),
        "{error}"
    );
    assert!(h.sink.state.lock().unwrap().sent.is_empty());
    h.ends();
}

#[tokio::test]
async fn every_record_names_the_timeline_whose_wal_holds_its_commit() {
    let mut h = start_configured(
        settings(),
        None,
        |_| {},
        |s| s.on_server(promoted(), "pg2", 0),
    );
    // Read again from before the branch point (0x300): timeline 1's; after it: 2's.
    h.txn(1, 0x200, &[("1", "order", Some("A"))]);
    h.txn(2, 0x400, &[("2", "order", Some("A"))]);
    let sent = h.records(2).await;
    assert_eq!(sent[0].headers["walship.timeline"], b"1");
    assert_eq!(sent[1].headers["walship.timeline"], b"2");
    let mut first = start(settings(), None);
    first.txn(1, 0x200, &[("1", "order", Some("A"))]);
    assert_eq!(first.records(1).await[0].headers["walship.timeline"], b"1");
}

#[tokio::test]
async fn records_of_earlier_versions_without_a_timeline_are_not_judged() {
    let mut h = start_configured(
        settings(),
        Some(Resume::new(START, Lsn(0x1000))),
        |s| {
            // Past the branch point, without a timeline header: unknown, not a fork.
            s.found
                .insert("outbox.event.order".into(), vec![(at(0x380, 0), "7")]);
        },
        |s| {
            s.on_server(promoted(), "pg2:5432", 0).check_published(
                vec!["outbox.event.order".into()],
                START,
                Arc::default(),
            )
        },
    );
    let end = h.txn(1, 0x400, &[("8", "order", Some("A"))]);
    let sent = h.records(1).await;
    h.ack(&sent, 0);
    h.until_confirmed(end).await;
}
