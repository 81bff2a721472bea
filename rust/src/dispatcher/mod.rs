//! The dispatcher: read batches from Redis → hand them to actors over the
//! rings → collect results → write outcomes back in pipelines.
//!
//! It runs on a single-threaded tokio runtime in the engine's dispatcher
//! process, as a set of components (after asynq's server), each in its own
//! module with its parameters, `start()` and `shutdown()`:
//!
//! | component | module | does |
//! |---|---|---|
//! | read loop | `fetcher` | one outstanding `XREADGROUP` (zero-copy), own pending re-reads |
//! | actor pool | `pool` | backlog, batches to the rings, results, timeouts, blame, prefetch |
//! | outcome book | `book` | per-queue outcomes of finished tasks, counts |
//! | retry policy | `retry` | retry, dead letter or hand back, and when |
//! | writer | `writer` | outcome pipelines on its own connection, replay-safe |
//! | scheduler | `scheduler` | due delayed tasks into the streams (atomic Lua) |
//! | recovery | `recovery` | `XAUTOCLAIM` of dead engines' stale tasks |
//! | janitor | `janitor` | removal of dead consumers |
//! | registry | `registry` | this engine's heartbeat entry |
//! | control poll | `control` | paused queues, read from Redis every 250 ms |
//! | limits | `limits` | global rate and concurrency limits, checked per batch by the read loop |
//! | leases | `leases` | the concurrency leases held: renewed while their tasks run, freed at their end |
//!
//! Start order (`serve`; stop order is the reverse, in `Dispatcher::stop`):
//!
//! 1. the write connection and the consumer groups (waiting for Redis as long
//!    as it takes, or until a stop request);
//! 2. the paused queues (read before any task is), then writer, scheduler,
//!    recovery, janitor, read loop, registry, control poll;
//! 3. the event loop, whose first read takes back what an earlier life of
//!    this consumer name left pending.
//!
//! The event loop (`Dispatcher::run`) is driven by the read loop's results,
//! the results eventfd (actors finished something), the control eventfd
//! (stop requested, an actor died), pages of claimed stale tasks, SIGTERM or
//! SIGINT (a stop request: the whole process group gets them from systemd or
//! a terminal), and a 100 ms tick (hard timeouts, held entries).

mod book;
mod control;
mod fetcher;
mod janitor;
mod leases;
mod limits;
mod patience;
mod pool;
mod recovery;
mod registry;
mod retry;
mod scheduler;
mod settings;
mod taken;
mod writer;

use std::collections::HashSet;
use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::connection::Link;
use bytes::Bytes;
use log::{info, warn};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use self::book::Report;
use self::book::{Book, Failure};
use self::control::{Cancel, Control, Paused, Snapshot};
use self::fetcher::{Fetched, Fetcher, FetcherHandle, ReadRequest, Recover};
use self::janitor::Janitor;
use self::leases::Leases;
use self::limits::{Admission, Limiter};
use self::patience::Patience;
use self::pool::Pool;
use self::recovery::{ClaimedPage, Recovery};
use self::registry::Registry;
use self::retry::RetryPolicy;
use self::scheduler::{DelayedState, Scheduler};
pub use self::settings::{defaults, Settings};
use self::taken::Taken;
use self::writer::{Writer, WriterHandle};
use crate::backoff::Backoff;
use crate::connection::Endpoint;
use crate::envelope::{self, RawEntry};
use crate::keys::Keys;
use crate::outcome::Outcome;
use crate::region::{self, Region};
use crate::streams::reader::ReadError;
use crate::streams::writer::{self as store, WriteScripts, WriteSettings};
use crate::streams::QueueSpec;

/// Why a dispatcher could not run.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The runtime or an eventfd could not be set up.
    #[error("dispatcher setup failed: {0}")]
    Setup(#[from] std::io::Error),
    /// A queue name is unusable.
    #[error(transparent)]
    Queue(#[from] crate::keys::QueueNameError),
    /// The Redis URL cannot be used.
    #[error("{0}")]
    Config(String),
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// A background component's task; `shutdown` stops it wherever it is.
pub struct Background(JoinHandle<()>);

impl Background {
    fn spawn(future: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(future))
    }

    /// Stops the component.
    pub fn shutdown(self) {
        self.0.abort();
    }
}

/// Registers a duplicate of one of the region's eventfds with tokio.
fn watch(fd: RawFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: dup(2) of a descriptor the region keeps open; checked below.
    let copy = unsafe { libc::dup(fd) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `copy` is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(copy) };
    // SAFETY: the AsyncFd owns `owned`, so the descriptor stays open and the
    // same for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
        .map_err(|error| error.into_parts().1)
}

/// SIGTERM and SIGINT, caught in the dispatcher: the supervisor's Python
/// handlers cannot run while this process is inside Rust, and a signal to
/// the whole process group must stop the engine gracefully, not kill it.
struct Signals {
    streams: Vec<Signal>,
}

impl Signals {
    fn new() -> Self {
        let streams = [SignalKind::terminate(), SignalKind::interrupt()]
            .into_iter()
            .filter_map(|kind| match signal(kind) {
                Ok(stream) => Some(stream),
                Err(error) => {
                    warn!("cannot watch signal {}: {error}", kind.as_raw_value());
                    None
                }
            })
            .collect();
        Self { streams }
    }

    /// Resolves when one of the signals arrives.
    async fn recv(&mut self) {
        loop {
            if self.streams.is_empty() {
                return std::future::pending().await;
            }
            let (arrived, at) = {
                let polls = self
                    .streams
                    .iter_mut()
                    .map(|stream| Box::pin(stream.recv()));
                first_of(polls).await
            };
            if arrived.is_some() {
                return;
            }
            // The signal driver is gone: stop watching this one (never spin).
            drop(self.streams.swap_remove(at));
        }
    }
}

/// The next value of a watched channel (`None`: its sender is gone; never
/// resolves without a channel).
async fn changed<T: Clone>(receiver: Option<&mut watch::Receiver<T>>) -> Option<T> {
    let Some(receiver) = receiver else {
        return std::future::pending().await;
    };
    match receiver.changed().await {
        Ok(()) => Some(receiver.borrow_and_update().clone()),
        Err(_) => None,
    }
}

/// The next cancels of a channel (`None`: its sender is gone; never
/// resolves without a channel).
async fn next_cancels(
    receiver: Option<&mut mpsc::UnboundedReceiver<Vec<Cancel>>>,
) -> Option<Vec<Cancel>> {
    match receiver {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits for the first of `futures` to finish: its output and position.
async fn first_of<F: Future + Unpin>(futures: impl Iterator<Item = F>) -> (F::Output, usize) {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(move |context| {
        for (at, future) in futures.iter_mut().enumerate() {
            if let std::task::Poll::Ready(output) = std::pin::Pin::new(future).poll(context) {
                return std::task::Poll::Ready((output, at));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Runs the dispatcher until a stop request (or, in burst mode, until no work
/// is left). Blocks the calling thread; call it without holding the GIL.
pub fn run(region: &Region, settings: Settings) -> Result<Report, DispatchError> {
    for (name, _) in &settings.queues {
        crate::keys::validate_queue(name)?;
    }
    let endpoint =
        Endpoint::parse(&settings.url).map_err(|error| DispatchError::Config(error.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(region, settings.checked(), endpoint))
}

/// A delivery whose count says it was handed out more often than its runs
/// allow without ever finishing (each time killing its engine): poison.
fn is_poison(entry: &RawEntry, deliveries: u64) -> bool {
    envelope::parse(entry).is_ok_and(|task| deliveries > u64::from(task.max_retry) + 2)
}

/// The write connection and the consumer groups, retried until Redis answers.
async fn prepare(
    endpoint: &Endpoint,
    timeout: Duration,
    keys: &Keys,
    queues: &[QueueSpec],
    group: &str,
) -> Link {
    let mut patience = Patience::new("connecting to redis");
    let mut connection = loop {
        match endpoint.connect_managed(timeout).await {
            Ok(connection) => break connection,
            Err(error) => patience.wait(&error).await,
        }
    };
    patience.done();
    let mut patience = Patience::new("creating consumer groups");
    while let Err(error) = store::ensure_groups(&mut connection, keys, queues, group).await {
        patience.wait(&error).await;
    }
    patience.done();
    connection
}

/// Resolves once a stop was requested (by the supervisor or a signal).
async fn stop_requested(region: &Region, control: &AsyncFd<OwnedFd>, signals: &mut Signals) {
    while !region.stop_requested() {
        tokio::select! {
            guard = control.readable() => {
                if let Ok(mut guard) = guard {
                    region::drain_event(region.control_event());
                    guard.clear_ready();
                } else {
                    return std::future::pending().await;
                }
            }
            () = signals.recv() => region.request_stop(),
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "the start order of every component, in one place"
)]
async fn serve(
    region: &Region,
    settings: Settings,
    endpoint: Endpoint,
) -> Result<Report, DispatchError> {
    let keys = Keys::new(&settings.prefix);
    let queues: Arc<Vec<QueueSpec>> = Arc::new(
        settings
            .queues
            .iter()
            .map(|(name, weight)| QueueSpec {
                name: name.clone(),
                weight: (*weight).max(1),
                stream: keys.stream(name),
            })
            .collect(),
    );
    let control_fd = watch(region.control_event())?;
    let results = watch(region.results_event())?;
    let mut signals = Signals::new();
    let response_timeout = Duration::from_millis(settings.block_ms + 10_000);
    let connection = tokio::select! {
        connection = prepare(&endpoint, response_timeout, &keys, &queues, &settings.group) => connection,
        () = stop_requested(region, &control_fd, &mut signals) => {
            info!("stopped before redis answered");
            region.close_all();
            return Ok(Report::default());
        }
    };
    // With Sentinel, every connection follows the master the sentinels name.
    let master_watch = Background::spawn(endpoint.clone().watch_master());
    let mut control = Control::new(connection.clone(), keys.clone(), Arc::clone(&queues));
    let Snapshot { paused, cancels } = tokio::select! {
        snapshot = control.read_retrying() => snapshot,
        () = stop_requested(region, &control_fd, &mut signals) => {
            info!("stopped before redis answered");
            region.close_all();
            return Ok(Report::default());
        }
    };
    region.set_paused(&paused);
    let raw = |role: &str| {
        let name = format!("flumeq:{}:{role}:{}", settings.consumer, std::process::id());
        endpoint.raw(&name, response_timeout)
    };

    let delayed = Arc::new(DelayedState::default());
    let lost_reply = Arc::new(AtomicBool::new(false));
    let writer = Writer {
        connection: connection.clone(),
        keys: keys.clone(),
        queues: Arc::clone(&queues),
        settings: WriteSettings {
            group: settings.group.clone(),
            consumer: settings.consumer.clone(),
            dead_max_length: settings.dead_max_length,
            processed_ttl_ms: settings.processed_ttl_ms,
            history_buffer: settings.history_buffer,
            retention_max_length: settings.retention_max_length,
            scripts: WriteScripts::default(),
        },
        delayed: Arc::clone(&delayed),
        lost_reply: Arc::clone(&lost_reply),
    }
    .start();
    let scheduler = Scheduler {
        connection: connection.clone(),
        keys: keys.clone(),
        queues: Arc::clone(&queues),
        dead_max_length: settings.dead_max_length,
        state: Arc::clone(&delayed),
    }
    .start();
    let limiter =
        Limiter::new(&keys, &settings.rate_limits, &settings.concurrency_limits).map(Arc::new);
    let (claim_sender, claims) = mpsc::channel::<ClaimedPage>(1);
    let recovery = Recovery {
        reader: raw("recovery"),
        keys: keys.clone(),
        queues: Arc::clone(&queues),
        group: settings.group.clone(),
        consumer: settings.consumer.clone(),
        stale_ms: settings.claim_stale_after_ms,
        sender: claim_sender,
        limiter: limiter.clone(),
        lost_reply: Arc::clone(&lost_reply),
    }
    .start();
    let janitor = Janitor {
        reader: raw("janitor"),
        queues: Arc::clone(&queues),
        group: settings.group.clone(),
        consumer: settings.consumer.clone(),
        stale_ms: settings.claim_stale_after_ms,
    }
    .start();
    let fetcher = Fetcher {
        reader: raw("reader"),
        keys: keys.clone(),
        queues: Arc::clone(&queues),
        group: settings.group.clone(),
        consumer: settings.consumer.clone(),
        limiter: limiter.clone(),
        one_slot: endpoint.is_cluster(),
        seen: None,
    }
    .start();
    let leases =
        limiter.map(|limiter| Leases::start(limiter, Arc::clone(&queues), connection.clone()));
    let registry = Registry::new(
        connection.clone(),
        &keys,
        &settings.consumer,
        settings.registry.clone(),
        Duration::from_millis(settings.heartbeat_ms),
    );
    let policy = RetryPolicy {
        backoff: Backoff {
            base_ms: settings.retry_base_ms,
            max_ms: settings.retry_max_ms,
        },
    };
    let refresh_every =
        Duration::from_millis(settings.claim_stale_after_ms / 3).max(Duration::from_millis(50));
    let (control_poll, paused_changes, cancel_records) = control.start(Arc::clone(&paused));
    let mut pool = Pool::new(region, settings.prefetch, refresh_every);
    pool.strict = settings.strict;
    pool.cancel_grace = Duration::from_millis(settings.cancel_grace_ms);
    pool.set_paused(&paused);
    let mut book = Book::new(keys.clone(), Arc::clone(&queues), policy);
    book.set_worker(&settings.consumer);
    book.follow_failover(endpoint.clone());
    if settings.history {
        book.record_history(&settings.consumer);
        pool.record_results = true;
    }
    for Cancel {
        queue,
        id,
        expires_ms,
    } in cancels
    {
        book.add_cancelled(queue, id, expires_ms);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dispatcher = Dispatcher {
        region,
        pool,
        book,
        keys,
        queues,
        settings,
        fetcher,
        writer,
        leases,
        claims,
        lost_reply,
        master_generation: endpoint.generation(),
        endpoint: endpoint.clone(),
        delayed,
        registry,
        connection,
        control: control_fd,
        results,
        signals,
        tick,
        paused,
        paused_changes: Some(paused_changes),
        cancel_records: Some(cancel_records),
        pruned_at: Instant::now(),
        stopping_since: None,
        recover: true,
        finished_since_recover: None,
        read_recovers: None,
        claims_closed: false,
        reads: ReadPace::default(),
        pending_checked: None,
    };
    let ran = dispatcher.run().await;
    control_poll.shutdown();
    master_watch.shutdown();
    ran?;
    Ok(dispatcher.stop(recovery, janitor, scheduler).await)
}

/// The pacing of reads: backoff after failures (logged once per spell), and
/// whether the last read found nothing.
struct ReadPace {
    retry_at: Option<Instant>,
    delay: Duration,
    failing: bool,
    /// The last read brought no task.
    last_empty: bool,
}

impl Default for ReadPace {
    fn default() -> Self {
        Self {
            retry_at: None,
            delay: Duration::from_millis(100),
            failing: false,
            last_empty: false,
        }
    }
}

impl ReadPace {
    fn may_read(&self) -> bool {
        self.retry_at.is_none_or(|at| Instant::now() >= at)
    }

    fn succeeded(&mut self, empty: bool) {
        if self.failing {
            info!("redis is back; reading again");
        }
        *self = Self {
            last_empty: empty,
            ..Self::default()
        };
    }

    fn failed(&mut self, error: &ReadError) {
        if !self.failing {
            warn!("reading tasks failed ({error}); retrying with backoff");
            self.failing = true;
        }
        self.retry_at = Some(Instant::now() + self.delay);
        // Reads resume soon after Redis is back.
        self.delay = (self.delay * 2).min(Duration::from_secs(1));
    }
}

/// The running dispatcher: its components and the event loop's state.
struct Dispatcher<'r> {
    region: &'r Region,
    settings: Settings,
    keys: Keys,
    queues: Arc<Vec<QueueSpec>>,
    pool: Pool<'r>,
    book: Book,
    fetcher: FetcherHandle,
    writer: WriterHandle,
    /// The concurrency leases held (`None`: no global limits).
    leases: Option<Leases>,
    claims: mpsc::Receiver<ClaimedPage>,
    /// Raised by recovery when a claim's reply may have been lost.
    lost_reply: Arc<AtomicBool>,
    /// Where connections go; with Sentinel, the master it names.
    endpoint: Endpoint,
    /// The endpoint's generation the last read saw. When the sentinels
    /// name another master, acks the old one took after the new one was
    /// promoted are gone: those tasks are pending again, ours, and not
    /// held, so they are taken back as after a lost reply.
    master_generation: u64,
    delayed: Arc<DelayedState>,
    registry: Registry,
    /// For the burst check and recreating groups.
    connection: Link,
    control: AsyncFd<OwnedFd>,
    results: AsyncFd<OwnedFd>,
    signals: Signals,
    tick: tokio::time::Interval,
    stopping_since: Option<Instant>,
    /// The next read re-reads our own pending entries first.
    recover: bool,
    /// While such a read is out: the entries finished meanwhile. Their
    /// acks may not be written when Redis answers the read, so it still
    /// lists them as pending; taking them back would run them again.
    finished_since_recover: Option<HashSet<Bytes>>,
    /// The outstanding read takes back our own entries: all of them
    /// (`Some(true)`, at start) or those we do not hold (`Some(false)`).
    read_recovers: Option<bool>,
    /// Recovery stopped sending claimed pages (it ended).
    claims_closed: bool,
    reads: ReadPace,
    pending_checked: Option<Instant>,
    /// Per queue: paused (not read; its tasks are handed back).
    paused: Paused,
    /// Changes of `paused` (`None` once the poll ended).
    paused_changes: Option<watch::Receiver<Paused>>,
    /// New cancel records (`None` once the poll ended).
    cancel_records: Option<mpsc::UnboundedReceiver<Vec<Cancel>>>,
    /// When expired cancel records were last forgotten.
    pruned_at: Instant,
}

impl Dispatcher<'_> {
    async fn run(&mut self) -> Result<(), DispatchError> {
        loop {
            if self.stopping_since.is_none() && self.region.stop_requested() {
                info!(
                    "stop requested: taking no new tasks; {} in flight",
                    self.pool.in_flight()
                );
                self.stopping_since = Some(Instant::now());
            }
            if self.stopping_since.is_some() {
                // Also what comes back from actors that died meanwhile.
                self.pool.hand_back_backlog(&mut self.book);
            }
            let idle = self.pool.in_flight() == 0;
            if idle && !self.fetcher.busy() {
                if self.stopping_since.is_some() {
                    break;
                }
                if self.burst_finished().await {
                    break;
                }
            }
            if let Some(since) = self.stopping_since {
                if since.elapsed() >= Duration::from_millis(self.settings.shutdown_timeout_ms) {
                    let left = self.pool.in_flight() as u64;
                    self.book.count_left_pending(left);
                    warn!(
                        "shutdown timeout passed; leaving {left} running task(s) pending for another engine"
                    );
                    break;
                }
            }
            self.maybe_read(idle);
            let credit = self.pool.credit();
            let taking = credit > 0 && self.stopping_since.is_none() && !self.claims_closed;
            tokio::select! {
                guard = self.control.readable() => {
                    let mut guard = guard?;
                    region::drain_event(self.region.control_event());
                    guard.clear_ready();
                    self.pool.reclaim_lost(&mut self.book);
                    self.pool.pump(&mut self.book);
                }
                guard = self.results.readable() => {
                    let mut guard = guard?;
                    region::drain_event(self.region.results_event());
                    guard.clear_ready();
                    self.pool.collect_all(&mut self.book);
                    self.pool.pump(&mut self.book);
                }
                fetched = self.fetcher.next() => self.on_fetched(fetched).await,
                page = self.claims.recv(), if taking => match page {
                    Some(page) => self.on_claims(page),
                    None => self.claims_closed = true,
                },
                _ = self.tick.tick() => {
                    // Async actors write STARTED frames without waking us.
                    self.pool.collect_all(&mut self.book);
                    self.pool.enforce_timeouts();
                    self.pool.enforce_cancels();
                    self.pool.reclaim_lost(&mut self.book);
                    if self.pruned_at.elapsed() >= Duration::from_secs(60) {
                        self.pruned_at = Instant::now();
                        self.book.prune_cancelled(now_ms());
                    }
                    self.pool.refresh_held(&mut self.book);
                    self.pool.pump(&mut self.book);
                    // The engine's counts over every dispatcher life.
                    let counts = Report::from_array(self.region.counts());
                    self.registry.beat(&counts, self.pool.in_flight());
                }
                () = self.signals.recv() => {
                    info!("signal received: stopping gracefully");
                    self.region.request_stop();
                }
                changed = changed(self.paused_changes.as_mut()) => match changed {
                    Some(paused) => self.on_paused(paused),
                    None => self.paused_changes = None,
                },
                cancels = next_cancels(self.cancel_records.as_mut()) => match cancels {
                    Some(cancels) => self.on_cancels(cancels),
                    None => self.cancel_records = None,
                },
            }
            self.flush();
        }
        self.flush();
        Ok(())
    }

    /// Queues were paused or resumed: actors check the marks before each
    /// task; the backlog's tasks of paused queues go back to their streams.
    fn on_paused(&mut self, paused: Paused) {
        let names = |paused: &[bool]| -> Vec<&str> {
            self.queues
                .iter()
                .zip(paused)
                .filter(|(_, paused)| **paused)
                .map(|(queue, _)| queue.name.as_str())
                .collect()
        };
        info!(
            "paused queues: {:?} (were {:?})",
            names(&paused),
            names(&self.paused)
        );
        self.region.set_paused(&paused);
        self.pool.set_paused(&paused);
        self.paused = paused;
        self.pool.pump(&mut self.book);
    }

    /// Tasks were cancelled: those we hold end as cancelled (at once when
    /// no actor has them, else once their actor skipped or stopped them);
    /// the others are remembered for when we take them.
    fn on_cancels(&mut self, cancels: Vec<Cancel>) {
        for Cancel {
            queue,
            id,
            expires_ms,
        } in cancels
        {
            if self.book.add_cancelled(queue, id.clone(), expires_ms)
                && self.pool.cancel(&mut self.book, queue, &id)
            {
                info!(
                    "task {} of queue {} cancelled",
                    String::from_utf8_lossy(&id),
                    self.queues[usize::from(queue)].name
                );
            }
        }
        self.pool.pump(&mut self.book);
    }

    /// Publishes the counts and hands the outcomes to the writer.
    fn flush(&mut self) {
        let fresh = self.book.take_fresh();
        self.region.add_counts(&fresh.to_array());
        let outcomes = self.book.take();
        let stale = self.book.take_stale();
        if let Some(leases) = &mut self.leases {
            leases.flush(outcomes.as_deref());
            leases.forget(&stale);
        }
        if !stale.is_empty() {
            // They may still be pending for us on the new master: once
            // what we wrote is in, take back what we do not hold.
            info!(
                "{} task(s) read from the master before the failover ended: their \
                 outcomes are not written to the new one; they run again",
                stale.len()
            );
            self.lost_reply.store(true, Ordering::SeqCst);
        }
        if let Some(outcomes) = outcomes {
            if let Some(finished) = &mut self.finished_since_recover {
                for queue in &outcomes {
                    finished.extend(queue.finished.iter().cloned());
                }
            }
            let generation = self.book.take_generation();
            self.writer.send(outcomes, generation);
        }
    }

    /// Burst mode: whether nothing is ready, pending in any consumer, or
    /// delayed (checked at most every 100 ms).
    async fn burst_finished(&mut self) -> bool {
        let sent = self.writer.sent;
        let nothing_delayed = self.delayed.left.load(Ordering::SeqCst) == 0
            && self.delayed.written.load(Ordering::SeqCst) == sent
            && self.delayed.pass_after_write.load(Ordering::SeqCst) > sent;
        let check_due = self
            .pending_checked
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(100));
        if !(self.settings.burst && self.reads.last_empty && nothing_delayed && check_due) {
            return false;
        }
        // Nothing here: but tasks other consumers hold (alive, or dead and
        // soon claimed by recovery), or that the mover just made due, are
        // still in the streams.
        self.pending_checked = Some(Instant::now());
        // Paused queues' tasks wait for a resume: not work left for a burst.
        let open: Vec<QueueSpec> = self
            .queues
            .iter()
            .zip(self.paused.iter())
            .filter(|(_, paused)| !**paused)
            .map(|(queue, _)| queue.clone())
            .collect();
        match store::tasks_in_streams(&mut self.connection, &open, &self.settings.group).await {
            Ok(0) => true,
            Ok(_) => false,
            Err(error) => {
                warn!("cannot count pending tasks: {error}");
                false
            }
        }
    }

    /// Asks for a read when actors have room and none is outstanding.
    fn maybe_read(&mut self, idle: bool) {
        let may = self.reads.may_read();
        let credit = self.pool.credit();
        if self.fetcher.busy() || self.stopping_since.is_some() || !may || credit == 0 {
            return;
        }
        // At start, take back everything this consumer name left pending.
        // After a lost reply, what we do not hold, but only once every
        // outcome is written (else a finished task whose ack is still queued
        // would look like one to run again).
        let written = self.delayed.written.load(Ordering::SeqCst) == self.writer.sent;
        let generation = self.endpoint.generation();
        if generation != self.master_generation {
            self.master_generation = generation;
            self.lost_reply.store(true, Ordering::SeqCst);
        }
        let recover = if self.recover {
            Recover::All
        } else if written && self.lost_reply.swap(false, Ordering::SeqCst) {
            Recover::Unheld(Arc::new(self.pool.held_ids()))
        } else {
            Recover::No
        };
        // Burst mode with nothing in flight asks once without blocking, so
        // it can tell "empty" at once; then it blocks too (never spin).
        let block_ms = if self.settings.burst && idle && !self.reads.last_empty {
            0
        } else if self.settings.burst {
            100
        } else {
            self.settings.block_ms
        };
        let recovering = recover.any();
        if !recovering && self.paused.iter().all(|paused| *paused) {
            // Every queue is paused: nothing to read (a resume, or the tick,
            // wakes the loop). For burst mode, that is "empty".
            self.reads.last_empty = true;
            return;
        }
        let startup = matches!(recover, Recover::All);
        let sent = self.fetcher.request(ReadRequest {
            count: credit.min(self.settings.read_count),
            block_ms,
            recover,
            paused: Arc::clone(&self.paused),
            strict: self.settings.strict,
        });
        if sent {
            self.recover = false;
            self.read_recovers = recovering.then_some(startup);
            if recovering {
                self.finished_since_recover = Some(HashSet::new());
            }
        }
    }

    async fn on_fetched(&mut self, fetched: Result<Fetched, ReadError>) {
        let finished_meanwhile = self.finished_since_recover.take();
        let recovered = self.read_recovers.take();
        match fetched {
            Ok(Fetched {
                own,
                new,
                done,
                mut admission,
                own_generation,
                generation,
            }) => {
                self.reads.succeeded(new.is_empty() && done.is_empty());
                if !own.is_empty() {
                    let finished = finished_meanwhile.unwrap_or_default();
                    let own = own
                        .into_iter()
                        .filter(|(_, entry, _)| !finished.contains(&entry.entry_id))
                        .collect();
                    let taken = self.take_back(own, own_generation, &mut admission);
                    if taken > 0 {
                        info!("took back {taken} task(s) this consumer left pending");
                        self.reads.last_empty = false;
                    }
                }
                let now = Instant::now();
                for (queue, entry) in done {
                    self.book
                        .skip_done(Taken::new(queue, entry, now, generation));
                }
                if admission.is_empty() {
                    self.pool.backlog.extend(
                        new.into_iter()
                            .map(|(queue, entry)| Taken::new(queue, entry, now, generation)),
                    );
                } else {
                    for (queue, entry) in new {
                        self.admit(Taken::new(queue, entry, now, generation), &mut admission);
                    }
                }
                self.pool.pump(&mut self.book);
            }
            Err(error) => {
                // A failed take-back is asked for again with the next read.
                match recovered {
                    Some(true) => self.recover = true,
                    Some(false) => self.lost_reply.store(true, Ordering::SeqCst),
                    None => {}
                }
                if error.reply_may_be_lost() {
                    self.lost_reply.store(true, Ordering::SeqCst);
                }
                if error.is_missing_group() {
                    // The stream or group vanished (FLUSHALL, a Redis restart
                    // without persistence): create them again.
                    let created = store::ensure_groups(
                        &mut self.connection,
                        &self.keys,
                        &self.queues,
                        &self.settings.group,
                    )
                    .await;
                    if let Err(error) = created {
                        warn!("cannot recreate consumer groups: {error}");
                    }
                }
                self.reads.failed(&error);
            }
        }
    }

    /// Takes back our own pending entries that we do not hold (an earlier
    /// life's, or delivered while a reply was lost); the poison ones go to
    /// the dead letters. Returns how many were taken.
    fn take_back(
        &mut self,
        own: Vec<(u16, RawEntry, u64)>,
        generation: u64,
        admission: &mut Admission,
    ) -> usize {
        let unheld = self.pool.unheld(own);
        let now = Instant::now();
        let mut taken = 0;
        for (queue, entry, deliveries) in unheld {
            let taken_back = Taken::new(queue, entry, now, generation);
            self.take_or_bury(taken_back, deliveries, admission);
            taken += 1;
        }
        taken
    }

    /// Queues a task delivered `deliveries` times, or buries it as poison.
    fn take_or_bury(&mut self, taken: Taken, deliveries: u64, admission: &mut Admission) {
        if is_poison(&taken.entry, deliveries) {
            let message = format!(
                "delivered {deliveries} times without finishing (its runs keep killing engines)"
            );
            self.book
                .dead(taken, &Failure::new(Outcome::Poison, message.as_bytes()));
        } else {
            self.admit(taken, admission);
        }
    }

    /// Queues a task the global limits let run (keeping the lease it took),
    /// or holds it back as they said. Entries the limits judged but that
    /// are dropped before this (held or finished already) leave a lease
    /// that lapses on its own.
    fn admit(&mut self, taken: Taken, admission: &mut Admission) {
        if !admission.is_empty() {
            let key = (taken.queue, taken.entry.entry_id.clone());
            if let Some(due_ms) = admission.held.remove(&key) {
                self.book.throttle(taken, due_ms);
                return;
            }
            if let (Some(at), Some(leases)) = (admission.leased.remove(&key), &mut self.leases) {
                leases.take([(key, at)]);
            }
        }
        self.pool.backlog.push_back(taken);
    }

    fn on_claims(&mut self, (page, mut admission, generation): ClaimedPage) {
        let now = Instant::now();
        // A take-back of our own entries may have got some of these first
        // (they were ours in Redis while the page waited).
        for (queue, entry, deliveries) in self.pool.unheld(page) {
            let claimed = Taken::new(queue, entry, now, generation);
            self.take_or_bury(claimed, deliveries, &mut admission);
        }
        self.pool.pump(&mut self.book);
    }

    /// Stops the components, in the reverse of their start order, and
    /// writes the last outcomes within a bounded grace. Returns the counts.
    async fn stop(
        self,
        recovery: Background,
        janitor: Background,
        scheduler: Background,
    ) -> Report {
        let Self {
            region,
            mut book,
            fetcher,
            mut writer,
            mut leases,
            mut claims,
            mut registry,
            ..
        } = self;
        fetcher.shutdown();
        janitor.shutdown();
        recovery.shutdown();
        // Claimed pages nobody took yet are ours in Redis: hand them back.
        claims.close();
        let now = Instant::now();
        while let Ok((page, admission, generation)) = claims.try_recv() {
            if let Some(leases) = &mut leases {
                leases.take(admission.leased);
            }
            for (queue, entry, _) in page {
                book.hand_back(Taken::new(queue, entry, now, generation));
            }
        }
        scheduler.shutdown();
        // The actors exit once they see their rings closed.
        region.close_all();
        region.add_counts(&book.take_fresh().to_array());
        if let Some(outcomes) = book.take() {
            let generation = book.take_generation();
            writer.send(outcomes, generation);
        }
        let grace = Duration::from_millis(defaults::WRITE_GRACE_MS);
        // Whatever this engine still leases runs no more: freed beside the
        // last writes (or lapsing soon when Redis is away).
        let free_leases = async {
            if let Some(leases) = leases {
                leases.stop(Duration::from_secs(2)).await;
            }
        };
        let (left, ()) = tokio::join!(writer.shutdown(Instant::now() + grace), free_leases);
        if left > 0 {
            warn!(
                "{left} finished task outcome(s) could not be written (redis unreachable for {}s); \
                 those tasks stay pending in redis and will run again",
                grace.as_secs()
            );
        }
        registry.leave().await;
        book.totals
    }
}
