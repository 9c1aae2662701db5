//! The producers behind the sinks: one librdkafka producer shared by every sink of a process
//! with the same producer settings, its delivery reports served when they arrive.
//!
//! ```text
//!  Sink ─ Lane 0 ─┐                                   ┌─▶ Lane 0's listener (its Progress)
//!  Sink ─ Lane 1 ─┼─▶ Shared: one producer ─▶ broker  ├─▶ Lane 1's listener
//!  Sink ─ Lane 2 ─┘        │ delivery reports          └─▶ Lane 2's listener
//!                          └─▶ main queue ──(fd written when it turns non-empty)──▶ poll thread
//! ```
//!
//! Owns the producers ([`Producers`], one pool per process), each producer's poll thread, and
//! the lanes: what one sink has in a shared producer (its listener, its records in flight, its
//! share of the queue).
//!
//! Invariants:
//! - Every record a lane hands over is reported exactly once, to that lane's listener: the
//!   delivery opaque carries the lane's number beside the sink's token.
//! - **A lane is closed only when none of its records can still be sent**: all answered, or —
//!   when some are not — the whole producer is retired (its queue purged, later sends refused),
//!   since librdkafka cannot purge one lane. The other lanes' purged records fail as purged
//!   (their sessions start again from their confirmed positions), and the pool makes a new
//!   producer for whoever asks next.
//! - A lane never holds more than its own budget of the queue (the configured
//!   `queue.buffering.max.messages` / `.kbytes`, per lane): a stalled lane cannot fill the
//!   queue for the others. The shared producer's own librdkafka bounds are lifted to the
//!   maximum.
//! - Nothing wakes for nothing: the poll thread sleeps on a socket librdkafka writes to when
//!   its queue of reports turns non-empty, instead of polling on a timer (a safety net looks
//!   every 10 s).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext, PurgeConfig};

use crate::sink::{DeliveryError, DeliveryListener, SinkSettings};

/// Bits of the delivery opaque that carry the sink's token; the lane's number sits above.
const TOKEN_BITS: u32 = 48;
const TOKEN_MASK: usize = (1 << TOKEN_BITS) - 1;
/// Most lanes one producer serves at once.
const MAX_LANES: usize = 1 << (usize::BITS - TOKEN_BITS);

/// librdkafka's largest queue bounds: a shared producer's own; each lane keeps its budget.
const QUEUE_MAX_MESSAGES: &str = "2147483647";
const QUEUE_MAX_KBYTES: &str = "2147483647";

/// How long the poll thread sleeps without a wake-up before it looks at the queue anyway (a
/// safety net; every report wakes it).
const POLL_SAFETY_NET: Duration = Duration::from_secs(10);

/// How long closing a lane waits for the reports of its purged records.
const PURGE_REPORTS_WAIT: Duration = Duration::from_secs(10);

/// The producers of one process. Sinks with the same producer configuration share one
/// producer, unless their settings say not to share ([`SinkSettings::share_producer`]).
#[derive(Default)]
pub struct Producers {
    shared: Mutex<HashMap<String, Weak<Shared>>>,
}

impl std::fmt::Debug for Producers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys hold secret values: never shown.
        f.debug_struct("Producers").finish_non_exhaustive()
    }
}

impl Producers {
    /// An empty pool.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A lane for `listener` in the producer these settings share (made now if there is none,
    /// or if the last one was retired or failed fatally), or in a producer of its own.
    pub(crate) fn lane(
        &self,
        settings: &SinkSettings,
        listener: Arc<dyn DeliveryListener>,
    ) -> Result<Lane, KafkaError> {
        // Built once: the budget, the pool key and the producer all read it.
        let config = settings.client_config();
        let budget = Budget::of(&config);
        if !settings.share_producer {
            let shared = Shared::new(settings, config, false)?;
            return shared.lane(listener, budget);
        }
        let key = key_of(&config);
        let mut pool = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        pool.retain(|_, weak| weak.strong_count() > 0);
        if let Some(shared) = pool.get(&key).and_then(Weak::upgrade)
            && shared.usable()
        {
            // Full of lanes: this sink gets a producer of its own.
            if let Ok(lane) = Arc::clone(&shared).lane(Arc::clone(&listener), budget) {
                return Ok(lane);
            }
        }
        let shared = Shared::new(settings, config, true)?;
        pool.insert(key, Arc::downgrade(&shared));
        shared.lane(listener, budget)
    }

    /// How many producers are alive (shared or not, counting only the pool's).
    pub fn shared_count(&self) -> usize {
        let pool = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        pool.values().filter(|w| w.strong_count() > 0).count()
    }
}

/// The pool key: the producer's whole configuration, secrets included (kept in memory only),
/// but for the queue bounds: in a shared producer they are each lane's budget.
fn key_of(config: &ClientConfig) -> String {
    let map = config.config_map();
    let mut pairs: Vec<_> = map
        .iter()
        .filter(|(k, _)| {
            let k: &str = k;
            !matches!(
                k,
                "queue.buffering.max.messages" | "queue.buffering.max.kbytes"
            )
        })
        .collect();
    pairs.sort();
    let mut key = String::new();
    for (k, v) in pairs {
        key.push_str(k);
        key.push('=');
        key.push_str(v);
        key.push('\n');
    }
    key
}

/// One lane's share of the producer's queue.
#[derive(Debug, Clone, Copy)]
struct Budget {
    messages: usize,
    bytes: usize,
}

impl Budget {
    /// The configured queue bounds (walship's defaults unless set), each lane's own.
    fn of(config: &ClientConfig) -> Budget {
        let get = |key: &str, default: usize| {
            config
                .get(key)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(default)
        };
        // librdkafka: 0 messages means no limit.
        let messages = match get("queue.buffering.max.messages", 100_000) {
            0 => usize::MAX,
            n => n,
        };
        Budget {
            messages,
            bytes: get("queue.buffering.max.kbytes", 65_536).saturating_mul(1024),
        }
    }
}

/// What a lane has in its producer; the delivery path and the lane's sink both see it.
struct LaneState {
    listener: Arc<dyn DeliveryListener>,
    in_flight: AtomicUsize,
    bytes: AtomicUsize,
    /// Notified whenever `in_flight` drops to zero.
    drained: tokio::sync::Notify,
}

/// The lanes of one producer, by number. A number is reused only after its lane is gone and
/// either drained or its producer retired, so no late report reaches a newer lane.
#[derive(Default)]
struct Lanes {
    slots: RwLock<Vec<Option<Arc<LaneState>>>>,
}

impl Lanes {
    fn add(&self, state: Arc<LaneState>) -> Option<usize> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = slots.iter().position(Option::is_none) {
            slots[i] = Some(state);
            return Some(i);
        }
        if slots.len() >= MAX_LANES {
            return None;
        }
        slots.push(Some(state));
        Some(slots.len() - 1)
    }

    fn remove(&self, id: usize) {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get_mut(id) {
            *slot = None;
        }
    }

    fn count(&self) -> usize {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.iter().filter(|s| s.is_some()).count()
    }

    fn get(&self, id: usize) -> Option<Arc<LaneState>> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(id).and_then(Clone::clone)
    }
}

/// Routes librdkafka's callbacks: logs to tracing, each delivery report to its lane.
pub(crate) struct Context {
    lanes: Arc<Lanes>,
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "{fac}: {message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "{fac}: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "{fac}: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reports most of these through `log` as well; only a fatal error (the
        // idempotent producer cannot continue) is news here.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(target: "librdkafka", "fatal Kafka client error: {error}: {reason}");
        } else {
            tracing::debug!(target: "librdkafka", "Kafka client error: {error}: {reason}");
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (lane, token) = (opaque >> TOKEN_BITS, opaque & TOKEN_MASK);
        // A lane dropped without closing leaves its reports unheard (its producer was retired).
        let Some(state) = self.lanes.get(lane) else {
            return;
        };
        let (size, outcome) = match result {
            Ok(msg) => {
                let size = msg.key_len() + msg.payload_len();
                (size, Ok(size))
            }
            Err((error, msg)) => (
                msg.key_len() + msg.payload_len(),
                Err(DeliveryError::of(error, msg)),
            ),
        };
        // The lane's count drops before the listener hears: once the listener's own count
        // (a session's `Progress`) says nothing is in flight, the lane says so too, and closing
        // it purges nothing.
        state.bytes.fetch_sub(size, Ordering::AcqRel);
        let last = state.in_flight.fetch_sub(1, Ordering::AcqRel) == 1;
        state.listener.on_delivery(token, outcome);
        if last {
            state.drained.notify_waiters();
        }
    }
}

/// One producer and its poll thread, shared by its lanes.
pub(crate) struct Shared {
    /// Dropped on the blocking pool when a runtime is current (destruction joins threads).
    inner: crate::sink::OffRuntime<Driven>,
    lanes: Arc<Lanes>,
    /// False once retired: sends are refused, and the pool makes a new producer.
    open: RwLock<bool>,
    /// Whether the pool hands it to more than one sink.
    pooled: bool,
    /// Fires once the producer is destroyed.
    gone: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl Shared {
    /// A producer with `config` (built from `settings`, which mask its errors).
    fn new(
        settings: &SinkSettings,
        mut config: ClientConfig,
        pooled: bool,
    ) -> Result<Arc<Shared>, KafkaError> {
        if pooled {
            // Each lane keeps its own budget ([`Budget`]); the producer's bound is their sum.
            config
                .set("queue.buffering.max.messages", QUEUE_MAX_MESSAGES)
                .set("queue.buffering.max.kbytes", QUEUE_MAX_KBYTES);
        }
        let lanes = Arc::new(Lanes::default());
        let producer: BaseProducer<Context> = settings.create(
            &config,
            Context {
                lanes: Arc::clone(&lanes),
            },
        )?;
        let driven = Driven::start(producer)
            .map_err(|e| KafkaError::ClientCreation(format!("starting the poll thread: {e}")))?;
        let (inner, gone) = crate::sink::OffRuntime::new(driven);
        Ok(Arc::new(Shared {
            inner,
            lanes,
            open: RwLock::new(true),
            pooled,
            gone: Mutex::new(Some(gone)),
        }))
    }

    /// A new lane for `listener`; an error when the producer serves [`MAX_LANES`] already.
    fn lane(
        self: Arc<Self>,
        listener: Arc<dyn DeliveryListener>,
        budget: Budget,
    ) -> Result<Lane, KafkaError> {
        // Held while the lane is added: a producer retired meanwhile gets no new lane (its
        // freed numbers could otherwise meet a report of the lane that had them before).
        let open = self.open.read().unwrap_or_else(|e| e.into_inner());
        if !*open {
            return Err(KafkaError::ClientCreation(
                "the producer was retired".into(),
            ));
        }
        let state = Arc::new(LaneState {
            listener,
            in_flight: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
        });
        let Some(id) = self.lanes.add(Arc::clone(&state)) else {
            return Err(KafkaError::ClientCreation(format!(
                "a producer serves at most {MAX_LANES} sinks"
            )));
        };
        drop(open);
        Ok(Lane {
            shared: Some(self),
            state,
            id,
            budget,
        })
    }

    fn producer(&self) -> &BaseProducer<Context> {
        &self.inner.get().producer
    }

    /// Frees lane `id`'s number, unless the producer is retired: no new lane joins a retired
    /// producer, and its late reports (purges) still reach the lane's listener.
    fn release(&self, id: usize) {
        let open = self.open.read().unwrap_or_else(|e| e.into_inner());
        if *open {
            self.lanes.remove(id);
        }
    }

    /// Neither retired nor failed for good: fit for another lane.
    fn usable(&self) -> bool {
        *self.open.read().unwrap_or_else(|e| e.into_inner())
            && self.producer().client().fatal_error().is_none()
    }

    /// Refuses every later send and purges everything queued or in flight: nothing handed to
    /// this producer before can be sent any more (bar bytes already written to a socket).
    fn retire(&self) {
        let mut open = self.open.write().unwrap_or_else(|e| e.into_inner());
        if *open {
            *open = false;
            if self.pooled && self.lanes.count() > 1 {
                tracing::warn!(
                    "a pipeline stopped with records not yet acknowledged in the producer it \
                     shares: the producer is purged and replaced; the other pipelines on it \
                     start again from their confirmed positions (nothing is lost; set \
                     kafka.share_producer = false to keep each pipeline's producer its own)"
                );
            }
            // Without waiting for the broker threads: this may run on the runtime's thread, and
            // a closing lane awaits its reports anyway.
            self.producer()
                .purge(PurgeConfig::default().queue().inflight().non_blocking());
        }
    }
}

mod report_queue;
use report_queue::ReportQueue;

/// What one sink holds in a producer: a number for its records' reports, its listener, and
/// its share of the queue. Dropped without [`Lane::close`] while records are in flight, it
/// retires the producer (like dropping a producer of its own would destroy it).
pub(crate) struct Lane {
    shared: Option<Arc<Shared>>,
    state: Arc<LaneState>,
    id: usize,
    budget: Budget,
}

/// Why a lane did not take a record.
pub(crate) enum LaneRefusal {
    /// The lane's budget or librdkafka's queue is full.
    Full,
    /// librdkafka refused it.
    Refused(KafkaError),
    /// The producer was retired by another lane's close.
    Retired,
}

impl Lane {
    fn shared(&self) -> &Shared {
        // Only `close` and `drop` take it.
        self.shared
            .as_deref()
            .unwrap_or_else(|| unreachable!("taken only when closing"))
    }

    /// Hands `record` to the producer; `size` is its key and value length in bytes.
    pub(crate) fn send(
        &self,
        record: rdkafka::producer::BaseRecord<'_, [u8], [u8], usize>,
        token: usize,
        size: usize,
    ) -> Result<(), LaneRefusal> {
        debug_assert!(token <= TOKEN_MASK, "token {token} too large");
        let state = &self.state;
        let in_flight = state.in_flight.load(Ordering::Acquire);
        if in_flight >= self.budget.messages
            || (in_flight > 0 && state.bytes.load(Ordering::Acquire) + size > self.budget.bytes)
        {
            return Err(LaneRefusal::Full);
        }
        let shared = self.shared();
        let open = shared.open.read().unwrap_or_else(|e| e.into_inner());
        if !*open {
            return Err(LaneRefusal::Retired);
        }
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.bytes.fetch_add(size, Ordering::AcqRel);
        let mut record = record;
        record.delivery_opaque = (self.id << TOKEN_BITS) | (token & TOKEN_MASK);
        match shared.producer().send(record) {
            Ok(()) => Ok(()),
            Err((error, _)) => {
                state.bytes.fetch_sub(size, Ordering::AcqRel);
                if state.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
                    state.drained.notify_waiters();
                }
                match error {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        Err(LaneRefusal::Full)
                    }
                    error => Err(LaneRefusal::Refused(error)),
                }
            }
        }
    }

    /// Whether other sinks use this lane's producer now.
    pub(crate) fn shared_with_others(&self) -> bool {
        let shared = self.shared();
        shared.pooled && shared.lanes.count() > 1
    }

    /// Records handed over and not yet reported.
    pub(crate) fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::Acquire)
    }

    /// Closes the lane once none of its records can still be sent: at once when all are
    /// answered; else the producer is retired (see the module documentation) and the purge
    /// reports are awaited. Resolves after the producer is destroyed when this lane was its
    /// last user.
    pub(crate) fn close(mut self) -> impl Future<Output = ()> + Send + 'static {
        let shared = self.shared.take();
        let state = Arc::clone(&self.state);
        let id = self.id;
        async move {
            let Some(shared) = shared else { return };
            if state.in_flight.load(Ordering::Acquire) > 0 {
                shared.retire();
                let drained = async {
                    loop {
                        let notified = state.drained.notified();
                        if state.in_flight.load(Ordering::Acquire) == 0 {
                            return;
                        }
                        notified.await;
                    }
                };
                if tokio::time::timeout(PURGE_REPORTS_WAIT, drained)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        in_flight = state.in_flight.load(Ordering::Acquire),
                        "the purged producer did not report every record in time"
                    );
                }
            }
            shared.release(id);
            // The last user destroys the producer and waits until it is gone.
            if let Some(last) = Arc::into_inner(shared) {
                let gone = last.gone.lock().ok().and_then(|mut g| g.take());
                drop(last);
                if let Some(gone) = gone {
                    let _ = gone.await;
                }
            }
        }
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            if self.state.in_flight.load(Ordering::Acquire) > 0 {
                shared.retire();
            }
            shared.release(self.id);
        }
    }
}

/// A producer whose delivery reports are served by a thread that sleeps until librdkafka
/// has some (no timer: an idle producer's thread never wakes).
pub(crate) struct Driven {
    producer: Arc<BaseProducer<Context>>,
    stop: Arc<AtomicBool>,
    /// Written by librdkafka when its report queue turns non-empty, and by `drop` to stop.
    wake: UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Driven {
    fn start(producer: BaseProducer<Context>) -> std::io::Result<Driven> {
        let producer = Arc::new(producer);
        let (sleep, wake) = UnixStream::pair()?;
        // librdkafka must never block writing to it.
        wake.set_nonblocking(true)?;
        sleep.set_read_timeout(Some(POLL_SAFETY_NET))?;
        let queue = ReportQueue::of(producer.client(), wake.as_raw_fd());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (producer, stop) = (Arc::clone(&producer), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("walship-delivery".into())
                .spawn(move || serve(&producer, &queue, &sleep, &stop))?
        };
        Ok(Driven {
            producer,
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

/// The poll thread: serves every report queued, then sleeps until librdkafka writes that the
/// queue turned non-empty (or `stop` is set and the socket written). The queue handle (and its
/// registration of the socket) goes with the thread, before the producer and the socket.
fn serve(
    producer: &BaseProducer<Context>,
    queue: &ReportQueue,
    mut sleep: &UnixStream,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 64];
    loop {
        while queue.len() > 0 {
            producer.poll(Duration::ZERO);
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        // Timeouts and interruptions just mean: look again.
        let _ = sleep.read(&mut buf);
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = (&self.wake).write(b"s");
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Dropping the producer now purges what is left and serves the purge reports itself.
    }
}

#[cfg(test)]
pub(crate) mod tests;
