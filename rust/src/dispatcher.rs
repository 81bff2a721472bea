//! The dispatcher: read batches from Redis → hand them to actors over the
//! rings → collect results → write outcomes back in pipelines.
//!
//! It runs on a single-threaded tokio runtime. Four event sources drive it:
//! the outstanding `XREADGROUP` (at most one at a time), the results eventfd
//! (actors finished something), the control eventfd (stop requested, an actor
//! died) and a 100 ms tick (hard timeouts, shutdown deadline). Writes go to a
//! separate writer task on its own connection, which merges everything that
//! piled up while its previous pipeline was in flight, so acks cost one round
//! trip per batch whatever the batch size.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use redis::aio::ConnectionManager;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

use crate::envelope::{self, RawEntry};
use crate::frame::{self, FailureKind};
use crate::keys::Keys;
use crate::region::{self, Region, SLOT_LOST, SLOT_RUNNING, SLOT_STARTING};
use crate::streams::reader::{self, Reader};
use crate::streams::{writer as store, DeadLetter, QueueOutcomes, QueueSpec};

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
    /// Stop once nothing is ready or in flight.
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
}

/// What a dispatcher run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Tasks done successfully.
    pub processed: u64,
    /// Failed runs.
    pub failed: u64,
    /// Tasks moved to dead letters.
    pub dead: u64,
    /// Tasks still running at the shutdown deadline, left pending in Redis.
    pub left_pending: u64,
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

/// A task taken from Redis: pending in our consumer until we ack it.
#[derive(Debug)]
struct Taken {
    queue: u16,
    entry: RawEntry,
}

/// Tasks handed to one actor in one frame.
struct Batch {
    slot: usize,
    tasks: Vec<Option<Taken>>,
    left: usize,
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

type ReadOutcome = (Reader, Result<Vec<(u16, RawEntry)>, reader::ReadError>);
type ReadFuture = Pin<Box<dyn Future<Output = ReadOutcome> + Send>>;

struct Dispatcher<'r> {
    region: &'r Region,
    config: DispatcherConfig,
    queues: Arc<Vec<QueueSpec>>,
    backlog: VecDeque<Taken>,
    batches: HashMap<u64, Batch>,
    outstanding: Vec<usize>,
    next_batch_id: u64,
    frame: Vec<u8>,
    outcomes: Vec<QueueOutcomes>,
    /// Slots whose actor we killed for a timeout, with the reason text.
    timed_out: HashMap<usize, String>,
    report: Report,
}

impl<'r> Dispatcher<'r> {
    fn new(region: &'r Region, config: DispatcherConfig, queues: Vec<QueueSpec>) -> Self {
        let slots = region.layout().slots;
        let queue_count = queues.len();
        Self {
            region,
            config,
            queues: Arc::new(queues),
            backlog: VecDeque::new(),
            batches: HashMap::new(),
            outstanding: vec![0; slots],
            next_batch_id: 1,
            frame: Vec::with_capacity(64 * 1024),
            outcomes: vec![QueueOutcomes::default(); queue_count],
            timed_out: HashMap::new(),
            report: Report::default(),
        }
    }

    fn slot_usable(&self, slot: usize) -> bool {
        let state = self.region.slot(slot).state.load(Ordering::SeqCst);
        state == SLOT_STARTING || state == SLOT_RUNNING
    }

    /// Tasks we could still take without exceeding any actor's prefetch.
    fn credit(&self) -> usize {
        let room: usize = (0..self.outstanding.len())
            .filter(|slot| self.slot_usable(*slot))
            .map(|slot| self.config.prefetch.saturating_sub(self.outstanding[slot]))
            .sum();
        room.saturating_sub(self.backlog.len())
    }

    fn in_flight(&self) -> usize {
        self.backlog.len() + self.batches.values().map(|batch| batch.left).sum::<usize>()
    }

    fn done(&mut self, taken: Taken) {
        let outcome = &mut self.outcomes[taken.queue as usize];
        outcome.finished.push(taken.entry.entry_id);
        outcome.processed += 1;
        self.report.processed += 1;
    }

    fn dead(
        &mut self,
        taken: Taken,
        reason: &'static str,
        error: Vec<u8>,
        traceback: Vec<u8>,
        ran: bool,
    ) {
        let attempts =
            envelope::parse(&taken.entry).map_or(0, |task| task.attempt + u32::from(ran));
        let outcome = &mut self.outcomes[taken.queue as usize];
        outcome.finished.push(taken.entry.entry_id.clone());
        if ran {
            outcome.failed += 1;
            self.report.failed += 1;
        }
        self.report.dead += 1;
        outcome.dead.push(DeadLetter {
            entry: taken.entry,
            reason,
            error,
            traceback,
            attempts,
        });
    }

    /// Hands as much of the backlog to actors as their prefetch and rings allow.
    fn pump(&mut self) {
        let slots = self.outstanding.len();
        let mut full = vec![false; slots];
        while !self.backlog.is_empty() {
            let eligible: Vec<usize> = (0..slots)
                .filter(|slot| {
                    !full[*slot]
                        && self.outstanding[*slot] < self.config.prefetch
                        && self.slot_usable(*slot)
                })
                .collect();
            let Some(&slot) = eligible.iter().min_by_key(|slot| self.outstanding[**slot]) else {
                return;
            };
            let share = self.backlog.len().div_ceil(eligible.len());
            let want = share
                .min(self.config.prefetch - self.outstanding[slot])
                .max(1);
            if !self.send_batch(slot, want) {
                full[slot] = true;
            }
        }
    }

    /// Sends up to `want` backlog tasks to `slot` in one frame. Returns false
    /// when the ring had no room (the tasks stay in the backlog).
    fn send_batch(&mut self, slot: usize, want: usize) -> bool {
        let ring = self.region.task_ring(slot);
        let max_frame = ring.max_frame();
        let batch_id = self.next_batch_id;
        let now = now_ms();
        let mut tasks: Vec<Option<Taken>> = Vec::with_capacity(want);
        frame::begin_tasks(&mut self.frame, batch_id, 0);
        while tasks.len() < want {
            let Some(taken) = self.backlog.pop_front() else {
                break;
            };
            let verdict = match envelope::parse(&taken.entry) {
                Err(error) => Err(("invalid", error.to_string())),
                Ok(task) if task.deadline_ms.is_some_and(|deadline| deadline <= now) => Err((
                    "expired",
                    "deadline passed before the task could run".to_owned(),
                )),
                Ok(task) => {
                    let length = frame::task_record_len(&task);
                    if frame::TASK_FRAME_OVERHEAD + length > max_frame {
                        Err((
                            "too_large",
                            format!(
                                "task of {length} bytes does not fit the actor ring (at most {max_frame} bytes; raise ring_bytes)"
                            ),
                        ))
                    } else if self.frame.len() + length > max_frame {
                        Ok(false)
                    } else {
                        frame::push_task(&mut self.frame, taken.queue, &task);
                        Ok(true)
                    }
                }
            };
            match verdict {
                Ok(true) => tasks.push(Some(taken)),
                Ok(false) => {
                    self.backlog.push_front(taken);
                    break;
                }
                Err((reason, message)) => {
                    self.dead(taken, reason, message.into_bytes(), Vec::new(), false);
                }
            }
        }
        if tasks.is_empty() {
            return true;
        }
        let count = tasks.len() as u32;
        self.frame[8..12].copy_from_slice(&count.to_le_bytes());
        if !ring.write_frame(&[&self.frame]) {
            for taken in tasks.into_iter().rev().flatten() {
                self.backlog.push_front(taken);
            }
            return false;
        }
        ring.notify_consumer();
        self.next_batch_id += 1;
        self.outstanding[slot] += tasks.len();
        self.batches.insert(
            batch_id,
            Batch {
                slot,
                left: tasks.len(),
                tasks,
            },
        );
        true
    }

    /// Reads every result frame of every slot and records the outcomes.
    fn collect_results(&mut self) {
        for slot in 0..self.outstanding.len() {
            self.collect_slot(slot);
        }
    }

    fn collect_slot(&mut self, slot: usize) {
        let ring = self.region.result_ring(slot);
        let mut any = false;
        loop {
            let applied = ring.read_frame(|bytes| match frame::read_results(bytes) {
                Ok(results) => {
                    self.apply_results(slot, &results);
                    true
                }
                Err(error) => {
                    warn!("actor {slot} sent a bad result frame, ignoring it: {error}");
                    true
                }
            });
            if applied.is_none() {
                break;
            }
            any = true;
        }
        if any {
            ring.notify_producer();
        }
    }

    fn apply_results(&mut self, slot: usize, results: &frame::Results<'_>) {
        let Some(batch) = self.batches.get_mut(&results.batch_id) else {
            warn!(
                "actor {slot} reported results for unknown batch {}",
                results.batch_id
            );
            return;
        };
        let mut finished: Vec<(Taken, Option<&frame::Failure<'_>>)> = Vec::new();
        let mut failures = results.failures.iter().peekable();
        for index in results.start..results.start + results.count {
            let failure = failures.next_if(|failure| failure.index == index);
            if let Some(taken) = batch.tasks.get_mut(index as usize).and_then(Option::take) {
                batch.left -= 1;
                finished.push((taken, failure));
            }
        }
        if batch.left == 0 {
            self.batches.remove(&results.batch_id);
        }
        self.outstanding[slot] = self.outstanding[slot].saturating_sub(finished.len());
        for (taken, failure) in finished {
            match failure {
                None => self.done(taken),
                Some(failure) => {
                    let reason = match failure.kind {
                        FailureKind::Error | FailureKind::Retry => "error",
                        FailureKind::UnknownType => "unknown_type",
                        FailureKind::Reject => "rejected",
                        FailureKind::Invalid => "invalid",
                    };
                    let ran = !matches!(
                        failure.kind,
                        FailureKind::UnknownType | FailureKind::Invalid
                    );
                    self.dead(
                        taken,
                        reason,
                        failure.message.to_vec(),
                        failure.traceback.to_vec(),
                        ran,
                    );
                }
            }
        }
    }

    /// Takes back the tasks of actors the supervisor saw die.
    fn reclaim_lost_slots(&mut self) {
        for slot in 0..self.outstanding.len() {
            let header = self.region.slot(slot);
            if header.state.load(Ordering::SeqCst) != SLOT_LOST {
                continue;
            }
            // Results the actor managed to publish are real: apply them first.
            self.collect_slot(slot);
            let running_batch = header.running_batch.load(Ordering::SeqCst);
            let running_index = header.running_index.load(Ordering::SeqCst);
            let status = header.exit_status.load(Ordering::SeqCst);
            let reason = self
                .timed_out
                .remove(&slot)
                .unwrap_or_else(|| describe_exit(status));
            let ids: Vec<u64> = self
                .batches
                .iter()
                .filter(|(_, batch)| batch.slot == slot)
                .map(|(id, _)| *id)
                .collect();
            let mut returned = Vec::new();
            for id in ids {
                let Some(batch) = self.batches.remove(&id) else {
                    continue;
                };
                for (index, taken) in batch.tasks.into_iter().enumerate() {
                    let Some(taken) = taken else { continue };
                    if running_index > 0 && id == running_batch && index as u32 + 1 == running_index
                    {
                        warn!("task {} died with its actor: {reason}", task_label(&taken));
                        let kind = if reason.starts_with("timeout") {
                            "timeout"
                        } else {
                            "crashed"
                        };
                        self.dead(taken, kind, reason.clone().into_bytes(), Vec::new(), true);
                    } else {
                        returned.push((id, index, taken));
                    }
                }
            }
            // Tasks that had not started go back first in line, in order.
            returned.sort_by_key(|(id, index, _)| (*id, *index));
            for (_, _, taken) in returned.into_iter().rev() {
                self.backlog.push_front(taken);
            }
            self.outstanding[slot] = 0;
            self.region.reclaim(slot);
            info!("actor slot {slot} reclaimed ({reason})");
        }
    }

    /// Kills actors whose running task passed its hard timeout.
    fn enforce_timeouts(&mut self) {
        let now = now_ms();
        for slot in 0..self.outstanding.len() {
            let header = self.region.slot(slot);
            if header.state.load(Ordering::SeqCst) != SLOT_RUNNING
                || self.timed_out.contains_key(&slot)
            {
                continue;
            }
            let deadline = header.running_deadline_ms.load(Ordering::SeqCst);
            if deadline == 0 || now < deadline || header.running_index.load(Ordering::SeqCst) == 0 {
                continue;
            }
            let since = header.running_since_ms.load(Ordering::SeqCst);
            let pid = header.pid.load(Ordering::SeqCst);
            let limit = deadline.saturating_sub(since);
            self.timed_out.insert(
                slot,
                format!(
                    "timeout: the handler ran longer than {}",
                    envelope::format_seconds(limit) + "s"
                ),
            );
            warn!("actor {slot} (pid {pid}) passed its task timeout; killing it");
            if pid > 0 {
                // SAFETY: plain kill(2) on the actor's pid, which the supervisor
                // reaps (so the pid cannot have been reused before LOST).
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }

    fn take_outcomes(&mut self) -> Option<Vec<QueueOutcomes>> {
        if self.outcomes.iter().all(QueueOutcomes::is_empty) {
            return None;
        }
        let fresh = vec![QueueOutcomes::default(); self.outcomes.len()];
        Some(std::mem::replace(&mut self.outcomes, fresh))
    }
}

fn task_label(taken: &Taken) -> String {
    let id = taken
        .entry
        .get(envelope::field::ID)
        .map(|id| String::from_utf8_lossy(id).into_owned())
        .unwrap_or_default();
    format!("{id} (entry {})", taken.entry.id_text())
}

/// Text for an actor's exit status as multiprocessing reports it.
fn describe_exit(status: i32) -> String {
    if status < 0 {
        let signal = -status;
        let name = match signal {
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGTERM => " (SIGTERM)",
            libc::SIGBUS => " (SIGBUS)",
            _ => "",
        };
        format!("actor process was killed by signal {signal}{name}")
    } else {
        format!("actor process exited with code {status}")
    }
}

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
    group: String,
    dead_max_length: usize,
) {
    while let Some(mut merged) = receiver.recv().await {
        while let Ok(more) = receiver.try_recv() {
            for (into, from) in merged.iter_mut().zip(more) {
                into.merge(from);
            }
        }
        let mut delay = Duration::from_millis(50);
        let mut failing = false;
        loop {
            let written = store::write_outcomes(
                &mut connection,
                &keys,
                &queues,
                &group,
                &merged,
                dead_max_length,
                now_ms(),
            )
            .await;
            match written {
                Ok(()) => {
                    if failing {
                        info!("redis is back; outcomes written");
                    }
                    break;
                }
                Err(error) => {
                    if !failing {
                        warn!("cannot write task outcomes ({error}); retrying until redis answers");
                        failing = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
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

async fn connect_forever(url: &str, timeout: Duration) -> Result<ConnectionManager, DispatchError> {
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    loop {
        match store::connect(url, timeout).await {
            Ok(connection) => return Ok(connection),
            Err(error) if error.kind() == redis::ErrorKind::InvalidClientConfig => {
                return Err(error.into())
            }
            Err(error) => {
                if !warned {
                    warn!("cannot reach redis ({error}); retrying");
                    warned = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
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
    let writer_connection = connect_forever(&config.url, response_timeout).await?;
    let mut group_connection = writer_connection.clone();
    let mut reader_slot = Some(
        Reader::new(&config.url, response_timeout)
            .map_err(|error| DispatchError::Config(error.to_string()))?,
    );
    let mut ready_groups = false;

    let mut state = Dispatcher::new(region, config.clone(), queues);
    let (sender, receiver) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(writer(
        receiver,
        writer_connection,
        keys.clone(),
        Arc::clone(&state.queues),
        config.group.clone(),
        config.dead_max_length,
    ));

    let results_event = watch(region.results_event())?;
    let control_event = watch(region.control_event())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut read: Option<ReadFuture> = None;
    let mut stopping_since: Option<Instant> = None;
    let mut last_read_empty = false;
    let mut read_retry_at: Option<Instant> = None;
    let mut read_delay = Duration::from_millis(100);
    let mut read_failing = false;

    loop {
        if stopping_since.is_none() && region.stop_requested() {
            info!(
                "stop requested: taking no new tasks, finishing {} in flight",
                state.in_flight()
            );
            stopping_since = Some(Instant::now());
        }
        let idle = state.in_flight() == 0;
        if read.is_none() && idle && (stopping_since.is_some() || (config.burst && last_read_empty))
        {
            break;
        }
        if let Some(since) = stopping_since {
            if since.elapsed() >= Duration::from_millis(config.shutdown_timeout_ms) {
                state.report.left_pending = state.in_flight() as u64;
                warn!(
                    "shutdown timeout passed; leaving {} task(s) pending for another engine",
                    state.report.left_pending
                );
                break;
            }
        }
        let may_read = read_retry_at.is_none_or(|at| Instant::now() >= at);
        if read.is_none() && stopping_since.is_none() && may_read {
            if !ready_groups {
                match store::ensure_groups(
                    &mut group_connection,
                    &keys,
                    &state.queues,
                    &config.group,
                )
                .await
                {
                    Ok(()) => ready_groups = true,
                    Err(error) => {
                        if !read_failing {
                            warn!("cannot create consumer groups ({error}); retrying");
                            read_failing = true;
                        }
                        read_retry_at = Some(Instant::now() + read_delay);
                        read_delay = (read_delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let credit = state.credit();
            if ready_groups && credit > 0 && reader_slot.is_some() {
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
                if let Some(mut connection) = reader_slot.take() {
                    read = Some(Box::pin(async move {
                        let result = reader::read_new(
                            &mut connection,
                            &queues,
                            &group,
                            &consumer,
                            count,
                            block,
                        )
                        .await;
                        (connection, result)
                    }));
                }
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
                    Ok(entries) => {
                        if read_failing {
                            info!("redis is back; reading again");
                            read_failing = false;
                        }
                        read_delay = Duration::from_millis(100);
                        read_retry_at = None;
                        last_read_empty = entries.is_empty();
                        state.backlog.extend(entries.into_iter().map(|(queue, entry)| Taken { queue, entry }));
                        state.pump();
                    }
                    Err(error) => {
                        if error.is_missing_group() {
                            // The stream or group vanished (FLUSHALL, a Redis
                            // restart without persistence): create them again.
                            ready_groups = false;
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
            _ = tick.tick() => {
                state.enforce_timeouts();
                state.reclaim_lost_slots();
                state.pump();
            }
        }
        if let Some(outcomes) = state.take_outcomes() {
            // The writer only stops when the sender is dropped below.
            let _ = sender.send(outcomes);
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
    Ok(state.report)
}
