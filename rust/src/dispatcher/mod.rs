//! The dispatcher: read batches from Redis → hand them to actors over the
//! rings → collect results → write outcomes back in pipelines.
//!
//! It runs on a single-threaded tokio runtime in the engine's dispatcher
//! process. Start order (stop order is the reverse):
//!
//! 1. the write connection, and the consumer groups (retried until Redis answers);
//! 2. this consumer's own pending entries from an earlier life are taken back;
//! 3. the writer task (outcomes), the scheduler (delayed tasks, `scheduler.rs`)
//!    and recovery (stale tasks, dead consumers, `recovery.rs`);
//! 4. the event loop below.
//!
//! The loop is driven by: the one outstanding read (`XREADGROUP`, zero-copy
//! decoded), the results eventfd (actors finished something), the control
//! eventfd (stop requested, an actor died), pages of claimed stale tasks, and
//! a 100 ms tick (hard timeouts, keeping held entries fresh). Writes go to the
//! writer task on its own connection, which merges whatever piled up while
//! its previous pipeline was in flight: one round trip per batch whatever its
//! size.

mod recovery;
mod registry;
mod scheduler;
mod state;

use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use log::{info, warn};
use redis::aio::ConnectionManager;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

use self::recovery::{Claimed, Recovery};
use self::registry::Registry;
use self::scheduler::{DelayedState, Scheduler};
use self::state::{Dispatcher, Taken};
use crate::envelope::{self, RawEntry};
use crate::keys::Keys;
use crate::region::{self, Region};
use crate::streams::reader::{self, ReadError, Reader};
use crate::streams::writer::{self as store, WriteSettings};
use crate::streams::{QueueOutcomes, QueueSpec};

/// How the dispatcher runs; built by the engine from its arguments.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// Redis URL.
    pub url: String,
    /// Key prefix.
    pub prefix: String,
    /// Queues served, with their weights.
    pub queues: Vec<(String, u32)>,
    /// Consumer group.
    pub group: String,
    /// This engine's consumer name in the group.
    pub consumer: String,
    /// Stop once nothing is ready, in flight or delayed.
    pub burst: bool,
    /// Most tasks handed to one actor and not yet finished.
    pub prefetch: usize,
    /// Most entries fetched by one read.
    pub read_count: usize,
    /// How long one blocking read waits when the queues are empty.
    pub block_ms: u64,
    /// How long a graceful stop waits for running tasks.
    pub shutdown_timeout_ms: u64,
    /// Approximate bound of each dead-letter stream.
    pub dead_max_length: usize,
    /// Idle time after which another engine's entry is claimed.
    pub claim_stale_after_ms: u64,
    /// First retry delay.
    pub retry_base_ms: u64,
    /// Largest retry delay.
    pub retry_max_ms: u64,
    /// How long done markers of idempotent tasks live.
    pub processed_ttl_ms: u64,
    /// What the worker registry shows of this engine (host, pid, queues...).
    pub registry: Vec<(String, String)>,
    /// Heartbeat interval of the registry entry (0 = not registered).
    pub heartbeat_ms: u64,
}

/// What a dispatcher run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Tasks done successfully.
    pub processed: u64,
    /// Failed runs (retried or not).
    pub failed: u64,
    /// Failed runs scheduled to run again.
    pub retried: u64,
    /// Tasks moved to dead letters.
    pub dead: u64,
    /// Deliveries acked without running (their id was already done).
    pub skipped: u64,
    /// Tasks handed back unstarted at a graceful stop.
    pub handed_back: u64,
    /// Tasks still running at the shutdown deadline, left pending in Redis.
    pub left_pending: u64,
    /// Actors that died and were replaced.
    pub restarts: u64,
}

/// Why a dispatcher could not run.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The runtime or an eventfd could not be set up.
    #[error("dispatcher setup failed: {0}")]
    Setup(#[from] std::io::Error),
    /// A queue name is unusable.
    #[error(transparent)]
    Queue(#[from] crate::keys::QueueNameError),
    /// Redis refused the configuration (bad URL, ...).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The read connection cannot serve this URL.
    #[error("redis: {0}")]
    Config(String),
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
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

/// What one read brought.
struct Fetched {
    /// Our own pending entries, re-read after a lost reply (some we hold).
    own: Vec<(u16, RawEntry)>,
    /// New entries to run.
    new: Vec<(u16, RawEntry)>,
    /// New entries whose task id is already done.
    done: Vec<(u16, RawEntry)>,
}

/// A finished read: the connection back, and what it brought.
type ReadOutcome = (Reader, Result<Fetched, ReadError>);
type ReadFuture = Pin<Box<dyn Future<Output = ReadOutcome> + Send>>;

async fn maybe_read(read: &mut Option<ReadFuture>) -> ReadOutcome {
    match read {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Writes outcomes as they come, retrying forever while Redis is away.
async fn writer(
    mut receiver: mpsc::UnboundedReceiver<Vec<QueueOutcomes>>,
    mut connection: ConnectionManager,
    keys: Keys,
    queues: Arc<Vec<QueueSpec>>,
    settings: WriteSettings,
    delayed: Arc<DelayedState>,
) {
    while let Some(mut merged) = receiver.recv().await {
        let mut messages = 1;
        while let Ok(more) = receiver.try_recv() {
            for (into, from) in merged.iter_mut().zip(more) {
                into.merge(from);
            }
            messages += 1;
        }
        let mut patience = Patience::new("writing task outcomes");
        loop {
            let written = store::write_outcomes(
                &mut connection,
                &keys,
                &queues,
                &settings,
                &merged,
                now_ms(),
            )
            .await;
            match written {
                Ok(()) => {
                    patience.done();
                    delayed.written.fetch_add(messages, Ordering::SeqCst);
                    break;
                }
                Err(error) => patience.wait(&error).await,
            }
        }
    }
}

/// Runs the dispatcher until a stop request (or, in burst mode, until no work
/// is left). Blocks the calling thread; call it without holding the GIL.
pub fn run(region: &Region, config: DispatcherConfig) -> Result<Report, DispatchError> {
    for (name, _) in &config.queues {
        crate::keys::validate_queue(name)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(region, config))
}

/// Capped exponential waiting between attempts at something Redis must do,
/// logging the first failure and the recovery once each (per failing spell).
/// Used by start-up, the outcome writer and the delayed-task mover.
pub(crate) struct Patience {
    what: &'static str,
    delay: Duration,
    warned: bool,
}

impl Patience {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            delay: Duration::from_millis(100),
            warned: false,
        }
    }

    pub(crate) async fn wait(&mut self, error: &(dyn std::fmt::Display + Sync)) {
        if !self.warned {
            warn!(
                "{} failed ({error}); retrying until redis answers",
                self.what
            );
            self.warned = true;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
    }

    /// It worked: log the recovery (once per failing spell) and start over.
    pub(crate) fn done(&mut self) {
        if self.warned {
            info!("{}: redis answers again", self.what);
        }
        self.warned = false;
        self.delay = Duration::from_millis(100);
    }
}

/// A delivery whose count says it was handed out more often than its runs
/// allow without ever finishing (each time killing its engine): poison.
fn is_poison(entry: &RawEntry, deliveries: u64) -> bool {
    envelope::parse(entry).is_ok_and(|task| deliveries > u64::from(task.max_retry) + 2)
}

#[expect(
    clippy::too_many_lines,
    reason = "the event loop reads best in one piece"
)]
async fn serve(region: &Region, config: DispatcherConfig) -> Result<Report, DispatchError> {
    let keys = Keys::new(&config.prefix);
    let queues: Vec<QueueSpec> = config
        .queues
        .iter()
        .map(|(name, weight)| QueueSpec {
            name: name.clone(),
            weight: (*weight).max(1),
            stream: keys.stream(name),
        })
        .collect();
    let response_timeout = Duration::from_millis(config.block_ms + 10_000);
    let make_reader = |role: &str| {
        let name = format!("flumeq:{}:{role}:{}", config.consumer, std::process::id());
        Reader::new(&config.url, response_timeout, &name)
            .map_err(|error| DispatchError::Config(error.to_string()))
    };
    let mut reader = make_reader("reader")?;
    let recovery_reader = make_reader("recovery")?;
    // Fail fast on a malformed URL; otherwise wait for Redis as long as it takes.
    redis::Client::open(config.url.as_str())?;
    let mut patience = Patience::new("connecting to redis");
    let writer_connection = loop {
        match store::connect(&config.url, response_timeout).await {
            Ok(connection) => break connection,
            Err(error) => patience.wait(&error).await,
        }
    };
    patience.done();
    let mut group_connection = writer_connection.clone();
    let mut patience = Patience::new("creating consumer groups");
    while let Err(error) =
        store::ensure_groups(&mut group_connection, &keys, &queues, &config.group).await
    {
        patience.wait(&error).await;
    }
    patience.done();

    let mut state = Dispatcher::new(region, config.clone(), queues);
    // Take back what an earlier life of this consumer name left pending.
    let mut after = vec![Bytes::from_static(b"0"); state.queues.len()];
    let mut patience = Patience::new("reading own pending tasks");
    loop {
        let queues = Arc::clone(&state.queues);
        let read = reader::read_own_pending(
            &mut reader,
            &queues,
            &config.group,
            &config.consumer,
            500,
            &mut after,
        )
        .await;
        let page = match read {
            Ok(page) => page,
            Err(error) => {
                patience.wait(&error).await;
                continue;
            }
        };
        patience.done();
        if page.is_empty() {
            break;
        }
        info!(
            "taking back {} task(s) this consumer left pending",
            page.len()
        );
        let now = Instant::now();
        state.backlog.extend(
            page.into_iter()
                .map(|(queue, entry)| Taken::new(queue, entry, now)),
        );
    }

    let delayed_state = Arc::new(DelayedState::default());
    let (sender, receiver) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(writer(
        receiver,
        writer_connection.clone(),
        keys.clone(),
        Arc::clone(&state.queues),
        WriteSettings {
            group: config.group.clone(),
            consumer: config.consumer.clone(),
            dead_max_length: config.dead_max_length,
            processed_ttl_ms: config.processed_ttl_ms,
        },
        Arc::clone(&delayed_state),
    ));
    let scheduler_task = Scheduler {
        connection: writer_connection.clone(),
        keys: keys.clone(),
        queues: Arc::clone(&state.queues),
        dead_max_length: config.dead_max_length,
        state: Arc::clone(&delayed_state),
    }
    .start();
    let (claim_sender, mut claims) = mpsc::channel::<Vec<Claimed>>(1);
    let lost_reply = Arc::new(AtomicBool::new(false));
    let recovery_task = Recovery {
        reader: recovery_reader,
        queues: Arc::clone(&state.queues),
        group: config.group.clone(),
        consumer: config.consumer.clone(),
        stale_ms: config.claim_stale_after_ms,
        sender: claim_sender,
        lost_reply: Arc::clone(&lost_reply),
    }
    .start();

    let mut registry = Registry::new(
        writer_connection.clone(),
        &keys,
        &config.consumer,
        config.registry.clone(),
        Duration::from_millis(config.heartbeat_ms),
    );
    let results_event = watch(region.results_event())?;
    let control_event = watch(region.control_event())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut reader_slot = Some(reader);
    let mut read: Option<ReadFuture> = None;
    let mut stopping_since: Option<Instant> = None;
    let mut last_read_empty = false;
    let mut read_retry_at: Option<Instant> = None;
    let mut read_delay = Duration::from_millis(100);
    let mut read_failing = false;
    let mut sent: u64 = 0;
    let mut pending_checked: Option<Instant> = None;

    loop {
        if stopping_since.is_none() && region.stop_requested() {
            info!(
                "stop requested: taking no new tasks; {} in flight",
                state.in_flight()
            );
            stopping_since = Some(Instant::now());
            state.hand_back_backlog();
        }
        let idle = state.in_flight() == 0;
        if read.is_none() && idle {
            if stopping_since.is_some() {
                break;
            }
            let nothing_delayed = delayed_state.left.load(Ordering::SeqCst) == 0
                && delayed_state.written.load(Ordering::SeqCst) == sent
                && delayed_state.pass_after_write.load(Ordering::SeqCst) > sent;
            let check_due =
                pending_checked.is_none_or(|at| at.elapsed() >= Duration::from_millis(100));
            if config.burst && last_read_empty && nothing_delayed && check_due {
                // Nothing here: but tasks other consumers hold (alive, or dead
                // and soon claimed by recovery), or that the mover just made
                // due, are still in the streams.
                pending_checked = Some(Instant::now());
                match store::tasks_in_streams(&mut group_connection, &state.queues, &config.group)
                    .await
                {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(error) => warn!("cannot count pending tasks: {error}"),
                }
            }
        }
        if let Some(since) = stopping_since {
            if since.elapsed() >= Duration::from_millis(config.shutdown_timeout_ms) {
                state.report.left_pending = state.in_flight() as u64;
                warn!(
                    "shutdown timeout passed; leaving {} running task(s) pending for another engine",
                    state.report.left_pending
                );
                break;
            }
        }
        let may_read = read_retry_at.is_none_or(|at| Instant::now() >= at);
        let credit = state.credit();
        if read.is_none() && stopping_since.is_none() && may_read && credit > 0 {
            // After a lost reply, re-read our own pending entries, but only
            // once every outcome is written (else a finished task whose ack
            // is still queued would look like one to run again).
            let recover = delayed_state.written.load(Ordering::SeqCst) == sent
                && lost_reply.swap(false, Ordering::SeqCst);
            if let Some(mut connection) = reader_slot.take() {
                let count = credit.min(config.read_count);
                // Burst mode with nothing in flight asks without blocking, so
                // it can tell "empty" at once; otherwise block (never spin).
                let block = if config.burst && idle {
                    0
                } else if config.burst {
                    100
                } else {
                    config.block_ms
                };
                let queues = Arc::clone(&state.queues);
                let group = config.group.clone();
                let consumer = config.consumer.clone();
                let keys = keys.clone();
                read = Some(Box::pin(async move {
                    let result = async {
                        let mut own = Vec::new();
                        if recover {
                            let mut after = vec![Bytes::from_static(b"0"); queues.len()];
                            loop {
                                let page = reader::read_own_pending(
                                    &mut connection,
                                    &queues,
                                    &group,
                                    &consumer,
                                    500,
                                    &mut after,
                                )
                                .await?;
                                if page.is_empty() {
                                    break;
                                }
                                own.extend(page);
                            }
                        }
                        let entries = reader::read_new(
                            &mut connection,
                            &queues,
                            &group,
                            &consumer,
                            count,
                            block,
                        )
                        .await?;
                        let (new, done) =
                            reader::split_done(&mut connection, &keys, &queues, entries).await?;
                        Ok(Fetched { own, new, done })
                    }
                    .await;
                    (connection, result)
                }));
            }
        }

        tokio::select! {
            guard = control_event.readable() => {
                let mut guard = guard?;
                region::drain_event(region.control_event());
                guard.clear_ready();
                state.reclaim_lost_slots();
                state.pump();
            }
            guard = results_event.readable() => {
                let mut guard = guard?;
                region::drain_event(region.results_event());
                guard.clear_ready();
                state.collect_results();
                state.pump();
            }
            (connection, result) = maybe_read(&mut read) => {
                read = None;
                reader_slot = Some(connection);
                match result {
                    Ok(Fetched { own, new, done }) => {
                        if read_failing {
                            info!("redis is back; reading again");
                            read_failing = false;
                        }
                        read_delay = Duration::from_millis(100);
                        read_retry_at = None;
                        last_read_empty = new.is_empty() && done.is_empty();
                        if !own.is_empty() {
                            let taken = state.take_back_unheld(own);
                            if taken > 0 {
                                info!("took back {taken} task(s) delivered to us while a reply was lost");
                                last_read_empty = false;
                            }
                        }
                        let now = Instant::now();
                        for (queue, entry) in done {
                            state.skip_done(Taken::new(queue, entry, now));
                        }
                        state.backlog.extend(new.into_iter().map(|(queue, entry)| Taken::new(queue, entry, now)));
                        state.pump();
                    }
                    Err(error) => {
                        if error.reply_may_be_lost() {
                            lost_reply.store(true, Ordering::SeqCst);
                        }
                        if error.is_missing_group() {
                            // The stream or group vanished (FLUSHALL, a Redis
                            // restart without persistence): create them again.
                            let created = store::ensure_groups(
                                &mut group_connection, &keys, &state.queues, &config.group,
                            ).await;
                            if let Err(error) = created {
                                warn!("cannot recreate consumer groups: {error}");
                            }
                        }
                        if !read_failing {
                            warn!("reading tasks failed ({error}); retrying with backoff");
                            read_failing = true;
                        }
                        read_retry_at = Some(Instant::now() + read_delay);
                        read_delay = (read_delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
            page = claims.recv(), if credit > 0 && stopping_since.is_none() => {
                let now = Instant::now();
                for (queue, entry, deliveries) in page.unwrap_or_default() {
                    let taken = Taken::new(queue, entry, now);
                    if is_poison(&taken.entry, deliveries) {
                        let message = format!(
                            "delivered {deliveries} times without finishing (its runs keep killing engines)"
                        );
                        state.dead(taken, "poison", message.into_bytes(), Vec::new(), true);
                    } else {
                        state.backlog.push_back(taken);
                    }
                }
                state.pump();
            }
            _ = tick.tick() => {
                state.enforce_timeouts();
                state.reclaim_lost_slots();
                state.refresh_held();
                state.pump();
                registry.beat(&state.report, state.in_flight());
            }
        }
        if let Some(outcomes) = state.take_outcomes() {
            // The writer only stops when the sender is dropped below.
            if sender.send(outcomes).is_ok() {
                sent += 1;
            }
        }
    }
    recovery_task.abort();
    // Claimed pages nobody took yet are ours in Redis: hand them back.
    claims.close();
    let now = Instant::now();
    while let Ok(page) = claims.try_recv() {
        for (queue, entry, _) in page {
            state.hand_back(Taken::new(queue, entry, now));
        }
    }
    if let Some(outcomes) = state.take_outcomes() {
        let _ = sender.send(outcomes);
    }
    region.close_all();
    drop(sender);
    if let Err(error) = writer_task.await {
        warn!("outcome writer failed: {error}");
    }
    scheduler_task.abort();
    registry.leave().await;
    Ok(state.report)
}
