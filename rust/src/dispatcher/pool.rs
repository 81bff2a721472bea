//! The actor pool: the backlog of taken tasks, the batches handed to each
//! actor over its ring, the results read back, hard timeouts, and the tasks
//! of actors that died.
//!
//! Each actor is given about `PREFETCH_WORK_US` of work ahead (learnt from
//! the run times its result frames carry), at most `prefetch` tasks: enough
//! to stay busy between reads, and little for a killed engine to leave
//! half-done. Blame when an actor dies: the task it was running (a sync
//! handler, from its slot header), or the async tasks it had started (from
//! its `STARTED` frames) counts a failed attempt; when nothing can be
//! blamed, its tasks are set aside as suspects and run alone from then on,
//! so the next death is pinned on the task that causes it. Either way a
//! task that keeps killing actors runs out of attempts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{info, warn};

use super::book::{Book, Failure};
use super::settings::defaults;
use super::taken::{Flags, Taken};
use crate::envelope::{self, RawEntry};
use crate::frame::{self, result_kind};
use crate::history::Events;
use crate::outcome::Outcome;
use crate::region::{self, Region, SLOT_LOST, SLOT_RUNNING, SLOT_STARTING};
use crate::streams::Durations;

/// Tasks queued behind what an actor runs at once, before its first results
/// say how long its tasks take.
const FIRST_PREFETCH: usize = 16;
/// Tasks an actor holds beyond what it runs at once, with strict priority.
const STRICT_AHEAD: usize = 1;
/// Weight of the newest sample in the run-time average.
const PACE_WEIGHT: f64 = 0.25;
/// A cancelled task that still runs is signalled again this often, until
/// `cancel_grace` passes (a signal can land just before it started).
const RESIGNAL: Duration = Duration::from_millis(500);

/// One item of an actor's run-times report: queue index, type, seconds in
/// all, `(bucket, runs)` pairs.
type DurationsItem = (u16, String, f64, Vec<(u32, u64)>);

/// How fast an actor works, as its result frames tell.
#[derive(Debug, Clone, Copy, Default)]
struct Pace {
    /// Average handler run time per task, µs (`None` until a frame said).
    per_task_us: Option<f64>,
    /// How many of its tasks run at once (1 for sync handlers).
    parallel: u32,
}

impl Pace {
    fn observe(&mut self, work_us: u64, tasks: usize, parallel: u32) {
        // Frames that end tasks without running them (split parts, tasks
        // handed back) say nothing of how long tasks take.
        if tasks == 0 || work_us == 0 {
            return;
        }
        let sample = (work_us as f64 / tasks as f64).max(0.1);
        self.per_task_us = Some(match self.per_task_us {
            Some(average) => average + PACE_WEIGHT * (sample - average),
            None => sample,
        });
        self.parallel = parallel.max(1);
    }

    /// Tasks to hand the actor ahead: those it runs at once, plus about
    /// `PREFETCH_WORK_US` of work queued behind them. Before any result,
    /// `declared` is what the actor said it runs at once.
    fn limit(&self, cap: usize, declared: u32) -> usize {
        let Some(per_task) = self.per_task_us else {
            return (declared.max(1) as usize + FIRST_PREFETCH).min(cap);
        };
        let parallel = f64::from(self.parallel.max(1));
        let queued = (defaults::PREFETCH_WORK_US as f64 * parallel / per_task).ceil();
        let limit = parallel + queued.min(cap as f64);
        (limit as usize).clamp(1, cap)
    }
}

/// Why we killed an actor, for blaming its tasks when it is reclaimed.
#[derive(Debug, Clone)]
enum Kill {
    /// Its sync task `(batch, index)` passed its timeout.
    Sync(u64, u32, String),
    /// Its event loop did not end async tasks past their timeouts: those
    /// `(batch, index)` with their messages.
    Async(Vec<(u64, u32, String)>),
    /// Cancelled tasks `(batch, index)` still ran `cancel_grace` after the
    /// cancel.
    Cancel(Vec<(u64, u32)>),
}

/// A cancelled task handed to an actor, until it ends.
#[derive(Debug)]
struct Cancelling {
    slot: usize,
    batch: u64,
    index: u32,
    since: Instant,
    /// When it was last posted to the actor's cancel box and signalled
    /// (`None`: the box was full, or the actor not running yet).
    signalled: Option<Instant>,
}

/// What the dispatcher tracks of one actor slot.
/// An actor with work left is refilled once this share of its limit is free.
const REFILL_PARTS: usize = 8;

#[derive(Debug, Default)]
struct Slot {
    /// Tasks handed to it and not finished.
    outstanding: usize,
    pace: Pace,
    kill: Option<Kill>,
    /// It runs a suspect: nothing else goes to it until the suspect ended
    /// (an actor with async handlers would run the next batch beside it).
    alone: bool,
}

/// Tasks handed to one actor in one frame.
struct Batch {
    slot: usize,
    tasks: Vec<Option<Taken>>,
    left: usize,
    /// Async tasks it reported started and not finished: `(index, deadline_ms)`.
    started: Vec<(u32, u64)>,
}

/// The actor pool.
pub struct Pool<'r> {
    region: &'r Region,
    slots: Vec<Slot>,
    /// Taken and not yet handed to an actor.
    pub backlog: VecDeque<Taken>,
    batches: HashMap<u64, Batch>,
    next_batch_id: u64,
    frame: Vec<u8>,
    prefetch: usize,
    refresh_every: Duration,
    last_refresh: Instant,
    /// Per queue: paused (its tasks are handed back, not to actors).
    paused: Vec<bool>,
    any_paused: bool,
    /// Strict priority: the backlog is handed out in queue order, and an
    /// actor holds one task ahead of what it runs at most.
    pub strict: bool,
    /// Cancelled tasks actors hold.
    cancelling: Vec<Cancelling>,
    /// How long a cancelled task may run on before its actor is killed.
    pub cancel_grace: Duration,
    /// The engine records history: actors send return values back, and
    /// each hand-over is booked as the tasks' start.
    pub record_results: bool,
    /// `started` events of the batch being built, per queue (booked once
    /// the batch is in its ring).
    started: Vec<(u16, Events)>,
}

impl<'r> Pool<'r> {
    /// A pool over `region`'s slots; `prefetch` caps what one actor holds,
    /// held entries are refreshed every `refresh_every`.
    #[must_use]
    pub fn new(region: &'r Region, prefetch: usize, refresh_every: Duration) -> Self {
        let slots = region.layout().slots;
        Self {
            region,
            slots: (0..slots).map(|_| Slot::default()).collect(),
            backlog: VecDeque::new(),
            batches: HashMap::new(),
            next_batch_id: 1,
            frame: Vec::with_capacity(64 * 1024),
            prefetch: prefetch.max(1),
            refresh_every,
            last_refresh: Instant::now(),
            paused: Vec::new(),
            any_paused: false,
            strict: false,
            cancelling: Vec::new(),
            cancel_grace: Duration::from_millis(defaults::CANCEL_GRACE_MS),
            record_results: false,
            started: Vec::new(),
        }
    }

    /// Task `id` of queue `queue` was cancelled: if it waits in the backlog
    /// it ends as cancelled now; if an actor holds it, the actor is told
    /// (it skips the task, or stops it if it runs) and is killed should it
    /// still run after `cancel_grace`. Returns whether we held it.
    pub fn cancel(&mut self, book: &mut Book, queue: u16, id: &[u8]) -> bool {
        let matches = |taken: &Taken| {
            taken.queue == queue && taken.entry.get(envelope::field::ID) == Some(id)
        };
        let mut found = false;
        if self.backlog.iter().any(matches) {
            let (cancelled, kept): (VecDeque<Taken>, VecDeque<Taken>) =
                std::mem::take(&mut self.backlog)
                    .into_iter()
                    .partition(matches);
            self.backlog = kept;
            for taken in cancelled {
                book.cancel(taken, false);
            }
            found = true;
        }
        let now = Instant::now();
        for (batch_id, batch) in &self.batches {
            for (index, task) in batch.tasks.iter().enumerate() {
                if task.as_ref().is_some_and(matches) {
                    let index = index as u32;
                    if !self
                        .cancelling
                        .iter()
                        .any(|c| (c.batch, c.index) == (*batch_id, index))
                    {
                        self.cancelling.push(Cancelling {
                            slot: batch.slot,
                            batch: *batch_id,
                            index,
                            since: now,
                            signalled: None,
                        });
                    }
                    found = true;
                }
            }
        }
        self.signal_cancels(false);
        found
    }

    /// Posts the cancels not yet told (`again`: also those running still,
    /// last told `RESIGNAL` ago) to their actors' boxes, and signals them.
    fn signal_cancels(&mut self, again: bool) {
        let now = Instant::now();
        for at in 0..self.cancelling.len() {
            let cancel = &self.cancelling[at];
            let due = match cancel.signalled {
                None => true,
                Some(when) => again && now >= when + RESIGNAL && self.is_running(cancel),
            };
            if !due {
                continue;
            }
            let header = self.region.slot(cancel.slot);
            let pid = header.pid.load(Ordering::SeqCst);
            if header.state.load(Ordering::SeqCst) != SLOT_RUNNING || pid == 0 {
                continue;
            }
            if self
                .region
                .post_cancel(cancel.slot, cancel.batch, cancel.index)
            {
                // SAFETY: kill(2) on the actor's pid, which handles SIGUSR1
                // (installed before it said it runs); the supervisor reaps
                // it only after it saw it exit, so the pid is not reused.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGUSR1);
                }
                self.cancelling[at].signalled = Some(now);
            }
        }
    }

    /// Whether the cancelled task runs now (a sync task in its actor's
    /// header, or an async one the actor said it started).
    fn is_running(&self, cancel: &Cancelling) -> bool {
        let header = self.region.slot(cancel.slot);
        let sync = header.running_index.load(Ordering::SeqCst) == cancel.index + 1
            && header.running_batch.load(Ordering::SeqCst) == cancel.batch;
        sync || self.batches.get(&cancel.batch).is_some_and(|batch| {
            batch
                .started
                .iter()
                .any(|(index, _)| *index == cancel.index)
        })
    }

    /// Forgets the cancels of tasks that ended, tells actors again about
    /// those still running, and kills the actors of those still running
    /// `cancel_grace` after their cancel.
    pub fn enforce_cancels(&mut self) {
        if self.cancelling.is_empty() {
            return;
        }
        let batches = &self.batches;
        self.cancelling.retain(|cancel| {
            batches.get(&cancel.batch).is_some_and(|batch| {
                batch
                    .tasks
                    .get(cancel.index as usize)
                    .is_some_and(Option::is_some)
            })
        });
        self.signal_cancels(true);
        let mut overdue: HashMap<usize, Vec<(u64, u32)>> = HashMap::new();
        for cancel in &self.cancelling {
            if cancel.since.elapsed() >= self.cancel_grace
                && self.slots[cancel.slot].kill.is_none()
                && self.is_running(cancel)
            {
                overdue
                    .entry(cancel.slot)
                    .or_default()
                    .push((cancel.batch, cancel.index));
            }
        }
        for (slot, tasks) in overdue {
            let pid = self.region.slot(slot).pid.load(Ordering::SeqCst);
            warn!(
                "actor {slot} (pid {pid}): {} cancelled task(s) still ran {}s after the cancel; killing it",
                tasks.len(),
                self.cancel_grace.as_secs_f64()
            );
            self.slots[slot].kill = Some(Kill::Cancel(tasks));
            if pid > 0 {
                // SAFETY: as in `enforce_timeouts`.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }

    /// Which queues are paused (by index): from now on their tasks in the
    /// backlog go back to their streams at the next `pump`.
    pub fn set_paused(&mut self, paused: &[bool]) {
        self.paused = paused.to_vec();
        self.any_paused = paused.iter().any(|paused| *paused);
    }

    /// Hands the backlog's tasks of paused queues back to their streams
    /// (appended again: they run after resume, behind what was enqueued
    /// meanwhile). Returns how many.
    fn hand_back_paused(&mut self, book: &mut Book) -> usize {
        let paused = &self.paused;
        let is_paused = |taken: &Taken| paused.get(usize::from(taken.queue)) == Some(&true);
        if !self.backlog.iter().any(is_paused) {
            return 0;
        }
        let (held, kept): (VecDeque<Taken>, VecDeque<Taken>) = std::mem::take(&mut self.backlog)
            .into_iter()
            .partition(is_paused);
        self.backlog = kept;
        let count = held.len();
        for taken in held {
            book.hand_back(taken);
        }
        count
    }

    fn usable(&self, slot: usize) -> bool {
        let state = self.region.slot(slot).state.load(Ordering::SeqCst);
        (state == SLOT_STARTING || state == SLOT_RUNNING) && self.slots[slot].kill.is_none()
    }

    fn limit(&self, slot: usize) -> usize {
        let declared = self.region.slot(slot).parallel.load(Ordering::Relaxed);
        if self.strict {
            // A task of a higher queue waits for one task ahead at most.
            return (declared.max(1) as usize + STRICT_AHEAD).min(self.prefetch);
        }
        self.slots[slot].pace.limit(self.prefetch, declared)
    }

    /// Tasks we could still take without giving any actor more than its
    /// prefetch.
    #[must_use]
    pub fn credit(&self) -> usize {
        let room: usize = (0..self.slots.len())
            .filter(|slot| self.usable(*slot))
            .map(|slot| {
                self.limit(slot)
                    .saturating_sub(self.slots[slot].outstanding)
            })
            .sum();
        room.saturating_sub(self.backlog.len())
    }

    /// Tasks taken and not finished.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.backlog.len() + self.batches.values().map(|batch| batch.left).sum::<usize>()
    }

    fn held(&self) -> impl Iterator<Item = &Taken> {
        self.backlog.iter().chain(
            self.batches
                .values()
                .flat_map(|batch| batch.tasks.iter().flatten()),
        )
    }

    /// The entry ids of every task we hold.
    #[must_use]
    pub fn held_ids(&self) -> HashSet<Bytes> {
        self.held()
            .map(|taken| taken.entry.entry_id.clone())
            .collect()
    }

    /// Those of `entries` (our own pending entries, re-read or claimed)
    /// that we do not hold already.
    #[must_use]
    pub fn unheld(&self, entries: Vec<(u16, RawEntry, u64)>) -> Vec<(u16, RawEntry, u64)> {
        let held = self.held_ids();
        entries
            .into_iter()
            .filter(|(_, entry, _)| !held.contains(&entry.entry_id))
            .collect()
    }

    /// Hands back everything not yet given to an actor (graceful stop).
    pub fn hand_back_backlog(&mut self, book: &mut Book) {
        while let Some(taken) = self.backlog.pop_front() {
            book.hand_back(taken);
        }
    }

    /// Hands as much of the backlog to actors as their prefetch and rings
    /// allow (tasks of paused queues go back to their streams instead).
    pub fn pump(&mut self, book: &mut Book) {
        if self.any_paused {
            self.hand_back_paused(book);
        }
        if self.strict && !self.backlog.iter().is_sorted_by_key(|taken| taken.queue) {
            // Higher queues first; a stable sort keeps each queue's order.
            self.backlog
                .make_contiguous()
                .sort_by_key(|taken| taken.queue);
        }
        let slots = self.slots.len();
        let mut full = vec![false; slots];
        while let Some(next) = self.backlog.front() {
            // A suspect runs alone: only on an actor with nothing else.
            let suspect = next.suspect;
            let eligible: Vec<usize> = (0..slots)
                .filter(|slot| {
                    let state = &self.slots[*slot];
                    let limit = self.limit(*slot);
                    // An actor that still has work is refilled in chunks of
                    // an eighth of its limit, not a task at a time: each
                    // batch costs it a wake-up (async actors had batches of
                    // one or two tasks, ~100 µs each).
                    let refill = state.outstanding == 0
                        || state.outstanding + (limit / REFILL_PARTS).max(1) <= limit;
                    !full[*slot]
                        && !state.alone
                        && (!suspect || state.outstanding == 0)
                        && state.outstanding < limit
                        && refill
                        && self.usable(*slot)
                })
                .collect();
            let Some(&slot) = eligible
                .iter()
                .min_by_key(|slot| self.slots[**slot].outstanding)
            else {
                return;
            };
            let share = self.backlog.len().div_ceil(eligible.len());
            let want = share
                .min(self.limit(slot) - self.slots[slot].outstanding)
                .max(1);
            if !self.send_batch(book, slot, want) {
                full[slot] = true;
            }
        }
    }

    /// Sends up to `want` backlog tasks to `slot` in one frame. Returns false
    /// when the ring had no room (the tasks stay in the backlog). A suspect
    /// task travels alone.
    fn send_batch(&mut self, book: &mut Book, slot: usize, want: usize) -> bool {
        let ring = self.region.task_ring(slot);
        let max_frame = ring.max_frame();
        let batch_id = self.next_batch_id;
        let now = super::now_ms();
        let mut tasks: Vec<Option<Taken>> = Vec::with_capacity(want);
        frame::begin_tasks(&mut self.frame, batch_id);
        while tasks.len() < want {
            let Some(taken) = self.backlog.pop_front() else {
                break;
            };
            if taken.suspect && !tasks.is_empty() {
                self.backlog.push_front(taken);
                break;
            }
            if taken.entry.fields.is_empty() {
                // Deleted while pending (seen when re-reading our history):
                // nothing to run, just drop it from the group.
                book.drop_deleted(taken);
                continue;
            }
            if book.is_cancelled(&taken) {
                // Cancelled while pending (taken back, claimed, or read
                // before the engine heard of the cancel): it never starts.
                book.cancel(taken, false);
                continue;
            }
            let verdict = match envelope::parse_indexed(&taken.entry) {
                Err(error) => Err((Outcome::Invalid, error.to_string())),
                Ok((task, _)) if task.deadline_ms.is_some_and(|deadline| deadline <= now) => Err((
                    Outcome::Expired,
                    "deadline passed before the task could run".to_owned(),
                )),
                Ok((task, kind_at)) => {
                    let length = frame::task_record_len(&task);
                    if frame::HEADER + length > max_frame {
                        Err((
                            Outcome::TooLarge,
                            format!(
                                "task of {length} bytes does not fit the actor ring (at most {max_frame} bytes; raise ring_bytes)"
                            ),
                        ))
                    } else if self.frame.len() + length > max_frame {
                        Ok(None)
                    } else {
                        frame::push_task(&mut self.frame, taken.queue, &task, self.record_results);
                        book.start_event(&mut self.started, taken.queue, &task, now);
                        Ok(Some(Flags {
                            unique: task.unique_key.is_some(),
                            idempotent: task.idempotent,
                            kind_at,
                            result_ttl_ms: task.result_ttl_ms,
                            retention_ms: task.retention_ms,
                            attempt: task.attempt,
                            parsed: true,
                        }))
                    }
                }
            };
            match verdict {
                Ok(Some(flags)) => {
                    let mut taken = taken;
                    taken.flags = flags;
                    taken.started_ms = now;
                    let alone = taken.suspect;
                    tasks.push(Some(taken));
                    if alone {
                        break;
                    }
                }
                Ok(None) => {
                    self.backlog.push_front(taken);
                    break;
                }
                Err((outcome, message)) => {
                    book.dead(taken, &Failure::new(outcome, message.as_bytes()));
                }
            }
        }
        if tasks.is_empty() {
            return true;
        }
        frame::set_count(&mut self.frame, tasks.len() as u32);
        if !ring.write_frame(&[&self.frame]) {
            self.started.clear();
            for taken in tasks.into_iter().rev().flatten() {
                self.backlog.push_front(taken);
            }
            return false;
        }
        ring.notify_consumer();
        book.add_events(&mut self.started);
        self.next_batch_id += 1;
        self.slots[slot].outstanding += tasks.len();
        self.slots[slot].alone = tasks.iter().flatten().any(|taken| taken.suspect);
        self.batches.insert(
            batch_id,
            Batch {
                slot,
                left: tasks.len(),
                tasks,
                started: Vec::new(),
            },
        );
        true
    }

    /// Reads every frame of every result ring and books the outcomes.
    pub fn collect_all(&mut self, book: &mut Book) {
        for slot in 0..self.slots.len() {
            self.collect(book, slot);
        }
    }

    fn collect(&mut self, book: &mut Book, slot: usize) {
        let ring = self.region.result_ring(slot);
        let mut any = false;
        while ring
            .read_frame(|bytes| self.apply_frame(book, slot, bytes))
            .is_some()
        {
            any = true;
        }
        if any {
            ring.notify_producer();
        }
    }

    fn apply_frame(&mut self, book: &mut Book, slot: usize, bytes: &[u8]) {
        let kind = frame::header(bytes).map(|header| header.kind);
        let applied = match kind {
            Ok(result_kind::RESULTS) => {
                frame::read_results(bytes).map(|results| self.apply_results(book, slot, &results))
            }
            Ok(result_kind::STARTED) => frame::read_started(bytes).map(|(batch_id, started)| {
                if let Some(batch) = self.batches.get_mut(&batch_id) {
                    batch.started.extend(started);
                }
            }),
            Ok(result_kind::RUN_TIMES) => {
                frame::read_run_times(bytes).map(|json| apply_run_times(book, slot, json))
            }
            Ok(other) => {
                warn!("actor {slot} sent a frame of unknown kind {other}, ignoring it");
                Ok(())
            }
            Err(error) => Err(error),
        };
        if let Err(error) = applied {
            warn!("actor {slot} sent a bad frame, ignoring it: {error}");
        }
    }

    fn apply_results(&mut self, book: &mut Book, slot: usize, results: &frame::Results<'_>) {
        let Some(batch) = self.batches.get_mut(&results.batch_id) else {
            warn!(
                "actor {slot} reported results for unknown batch {}",
                results.batch_id
            );
            return;
        };
        let mut finished = 0;
        for record in &results.records {
            let Some(taken) = batch
                .tasks
                .get_mut(record.index as usize)
                .and_then(Option::take)
            else {
                continue;
            };
            batch.left -= 1;
            finished += 1;
            if !batch.started.is_empty() {
                batch.started.retain(|(index, _)| *index != record.index);
            }
            let failure = Failure {
                outcome: record.outcome,
                message: record.message,
                traceback: record.traceback,
                delay_ms: (record.outcome == Outcome::Retry).then_some(record.delay_ms),
                value: record.value,
            };
            book.finish(taken, &failure);
        }
        let range = results.range;
        let end = (range.start + range.count).min(batch.tasks.len() as u32);
        for index in range.start.min(end)..end {
            if let Some(taken) = batch.tasks[index as usize].take() {
                batch.left -= 1;
                finished += 1;
                book.done(taken);
            }
        }
        if batch.left == 0 {
            self.batches.remove(&results.batch_id);
        }
        let state = &mut self.slots[slot];
        state.outstanding = state.outstanding.saturating_sub(finished);
        if state.outstanding == 0 {
            state.alone = false;
        }
        state.pace.observe(range.work_us, finished, range.parallel);
    }

    /// Takes back the tasks of actors the supervisor saw die, blaming the
    /// task (or tasks) responsible; the others go back first in line.
    pub fn reclaim_lost(&mut self, book: &mut Book) {
        for slot in 0..self.slots.len() {
            if self.region.slot(slot).state.load(Ordering::SeqCst) == SLOT_LOST {
                self.reclaim(book, slot);
            }
        }
    }

    fn reclaim(&mut self, book: &mut Book, slot: usize) {
        // Results the actor managed to publish are real: apply them first.
        self.collect(book, slot);
        let header = self.region.slot(slot);
        let running = match header.running_index.load(Ordering::SeqCst) {
            0 => None,
            index => Some((header.running_batch.load(Ordering::SeqCst), index - 1)),
        };
        let exit = describe_exit(header.exit_status.load(Ordering::SeqCst));
        let mut ids: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, batch)| batch.slot == slot)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        let mut batches: Vec<(u64, Batch)> = ids
            .into_iter()
            .filter_map(|id| self.batches.remove(&id).map(|batch| (id, batch)))
            .collect();
        let blame = blame(self.slots[slot].kill.take(), running, &batches, &exit);
        let mut returned = Vec::new();
        for (id, batch) in &mut batches {
            for (index, task) in batch.tasks.iter_mut().enumerate() {
                let Some(mut taken) = task.take() else {
                    continue;
                };
                let index = index as u32;
                match &blame {
                    Blame::Tasks(blamed) => {
                        if let Some((_, _, outcome, message)) =
                            blamed.iter().find(|(b, i, _, _)| *b == *id && *i == index)
                        {
                            warn!("task {} died with its actor: {message}", taken.label());
                            book.finish(taken, &Failure::new(*outcome, message.as_bytes()));
                            continue;
                        }
                    }
                    Blame::Suspects(set) => {
                        if set.as_ref().is_none_or(|set| set.contains(&(*id, index))) {
                            taken.suspect = true;
                        }
                    }
                }
                returned.push(taken);
            }
        }
        if let Blame::Suspects(_) = blame {
            if !returned.is_empty() {
                warn!(
                    "actor {slot} died ({exit}) with no single task to blame; its {} task(s) will run one at a time",
                    returned.iter().filter(|taken| taken.suspect).count()
                );
            }
        }
        // Tasks that had not started go back first in line, in order.
        for taken in returned.into_iter().rev() {
            self.backlog.push_front(taken);
        }
        self.slots[slot].outstanding = 0;
        self.slots[slot].alone = false;
        book.count_restart();
        self.region.reclaim(slot);
        info!("actor slot {slot} reclaimed ({exit})");
    }

    /// Kills actors whose sync task passed its timeout, or whose event loop
    /// let async tasks run past theirs (plus a grace: a healthy loop
    /// cancels them itself).
    pub fn enforce_timeouts(&mut self) {
        let now = region::monotonic_ms();
        for slot in 0..self.slots.len() {
            let header = self.region.slot(slot);
            if header.state.load(Ordering::SeqCst) != SLOT_RUNNING
                || self.slots[slot].kill.is_some()
            {
                continue;
            }
            let deadline = header.running_deadline_ms.load(Ordering::SeqCst);
            let running = header.running_index.load(Ordering::SeqCst);
            let kill = if deadline > 0 && now >= deadline && running != 0 {
                let since = header.running_since_ms.load(Ordering::SeqCst);
                Some(Kill::Sync(
                    header.running_batch.load(Ordering::SeqCst),
                    running - 1,
                    format!(
                        "timeout: the handler ran longer than {}s",
                        envelope::format_seconds(deadline.saturating_sub(since))
                    ),
                ))
            } else {
                self.async_overdue(slot, now).map(Kill::Async)
            };
            let Some(kill) = kill else {
                continue;
            };
            let pid = header.pid.load(Ordering::SeqCst);
            match &kill {
                Kill::Sync(..) => {
                    warn!("actor {slot} (pid {pid}) passed its task timeout; killing it");
                }
                Kill::Async(overdue) => warn!(
                    "actor {slot} (pid {pid}): {} async task(s) ran past their timeout and its event loop did not cancel them (blocked?); killing it",
                    overdue.len()
                ),
                Kill::Cancel(_) => {}
            }
            self.slots[slot].kill = Some(kill);
            if pid > 0 {
                // SAFETY: kill(2) on the actor's pid; the supervisor reaps it
                // only after it saw it exit, so the pid is not reused before.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }

    /// Async tasks of `slot` past their deadline plus the grace.
    fn async_overdue(&self, slot: usize, now: u64) -> Option<Vec<(u64, u32, String)>> {
        let overdue: Vec<(u64, u32, String)> = self
            .batches
            .iter()
            .filter(|(_, batch)| batch.slot == slot)
            .flat_map(|(id, batch)| {
                batch
                    .started
                    .iter()
                    .filter(|(_, deadline)| {
                        *deadline > 0 && now >= deadline + defaults::ASYNC_GRACE_MS
                    })
                    .map(move |(index, _)| {
                        let timeout = batch.tasks[*index as usize]
                            .as_ref()
                            .and_then(|taken| envelope::parse(&taken.entry).ok())
                            .map_or(0, |task| task.timeout_ms);
                        (
                            *id,
                            *index,
                            format!(
                                "timeout: the handler ran longer than {}s and the event loop did not cancel it (a coroutine blocked the loop)",
                                envelope::format_seconds(timeout)
                            ),
                        )
                    })
            })
            .collect();
        (!overdue.is_empty()).then_some(overdue)
    }

    /// Every `claim_stale_after / 3`, asks the writer to refresh the entries
    /// we have held longer than that: a live engine's long task is never
    /// claimed by another.
    pub fn refresh_held(&mut self, book: &mut Book) {
        if self.last_refresh.elapsed() < self.refresh_every {
            return;
        }
        self.last_refresh = Instant::now();
        let period = self.refresh_every;
        let stale: Vec<(u16, Bytes, u64)> = self
            .held()
            .filter(|taken| taken.since.elapsed() >= period)
            .map(|taken| (taken.queue, taken.entry.entry_id.clone(), taken.generation))
            .collect();
        for (queue, entry_id, generation) in stale {
            book.refresh(queue, entry_id, generation);
        }
    }
}

fn apply_run_times(book: &mut Book, slot: usize, json: &[u8]) {
    let parsed: Result<Vec<DurationsItem>, _> = serde_json::from_slice(json);
    let Ok(items) = parsed else {
        warn!("actor {slot} sent unreadable run times, ignoring them");
        return;
    };
    for (queue, kind, sum, buckets) in items {
        book.add_durations(queue, Durations { kind, sum, buckets });
    }
}

/// Who answers for an actor's death.
#[derive(Debug)]
enum Blame {
    /// These `(batch, index)` count a failed attempt with this outcome and text.
    Tasks(Vec<(u64, u32, Outcome, String)>),
    /// Nobody for sure: these tasks (`None`: all of the actor's) become
    /// suspects and run alone from now on.
    Suspects(Option<HashSet<(u64, u32)>>),
}

fn blame(
    kill: Option<Kill>,
    running: Option<(u64, u32)>,
    batches: &[(u64, Batch)],
    exit: &str,
) -> Blame {
    let unfinished = |id: u64, index: u32| {
        batches.iter().any(|(batch_id, batch)| {
            *batch_id == id && batch.tasks.get(index as usize).is_some_and(Option::is_some)
        })
    };
    match kill {
        Some(Kill::Sync(batch, task, reason)) => {
            // Only the task that overran: should it have ended just before
            // the kill landed, the next one is not to blame.
            return Blame::Tasks(
                running
                    .filter(|(id, index)| (*id, *index) == (batch, task) && unfinished(*id, *index))
                    .map(|(id, index)| (id, index, Outcome::TimedOut, reason))
                    .into_iter()
                    .collect(),
            );
        }
        Some(Kill::Async(overdue)) => {
            return Blame::Tasks(
                overdue
                    .into_iter()
                    .map(|(id, index, message)| (id, index, Outcome::TimedOut, message))
                    .collect(),
            );
        }
        Some(Kill::Cancel(cancelled)) => {
            return Blame::Tasks(
                cancelled
                    .into_iter()
                    .filter(|(id, index)| unfinished(*id, *index))
                    .map(|(id, index)| {
                        let message = "cancelled; the handler did not stop within cancel_grace, so its actor was killed";
                        (id, index, Outcome::Cancelled, message.to_owned())
                    })
                    .collect(),
            );
        }
        None => {}
    }
    if let Some((id, index)) = running.filter(|(id, index)| unfinished(*id, *index)) {
        return Blame::Tasks(vec![(id, index, Outcome::Crashed, exit.to_owned())]);
    }
    let started: Vec<(u64, u32)> = batches
        .iter()
        .flat_map(|(id, batch)| batch.started.iter().map(move |(index, _)| (*id, *index)))
        .filter(|(id, index)| unfinished(*id, *index))
        .collect();
    match started.as_slice() {
        [(id, index)] => {
            return Blame::Tasks(vec![(*id, *index, Outcome::Crashed, exit.to_owned())])
        }
        [] => {}
        several => return Blame::Suspects(Some(several.iter().copied().collect())),
    }
    // Nothing was running. A suspect running alone is the culprit.
    let left: Vec<(u64, u32, bool)> = batches
        .iter()
        .flat_map(|(id, batch)| {
            batch
                .tasks
                .iter()
                .enumerate()
                .filter_map(move |(index, task)| {
                    task.as_ref()
                        .map(|taken| (*id, index as u32, taken.suspect))
                })
        })
        .collect();
    match left.as_slice() {
        [(id, index, true)] => Blame::Tasks(vec![(*id, *index, Outcome::Crashed, exit.to_owned())]),
        _ => Blame::Suspects(None),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(tasks: &[(u32, bool)], started: &[(u32, u64)]) -> Batch {
        Batch {
            slot: 0,
            tasks: tasks
                .iter()
                .map(|(_, suspect)| {
                    let mut taken = Taken::new(
                        0,
                        RawEntry {
                            entry_id: Bytes::from_static(b"1-0"),
                            fields: Vec::new(),
                        },
                        Instant::now(),
                        0,
                    );
                    taken.suspect = *suspect;
                    Some(taken)
                })
                .collect(),
            left: tasks.len(),
            started: started.to_vec(),
        }
    }

    fn blamed(blame: &Blame) -> Vec<(u64, u32, Outcome)> {
        match blame {
            Blame::Tasks(tasks) => tasks.iter().map(|(b, i, o, _)| (*b, *i, *o)).collect(),
            Blame::Suspects(_) => Vec::new(),
        }
    }

    #[test]
    fn the_running_sync_task_answers_for_a_crash_or_a_timeout() {
        let batches = vec![(7, batch(&[(0, false), (1, false)], &[]))];
        let crash = blame(None, Some((7, 1)), &batches, "exit");
        assert_eq!(blamed(&crash), [(7, 1, Outcome::Crashed)]);
        let timeout = blame(
            Some(Kill::Sync(7, 0, "t".into())),
            Some((7, 0)),
            &batches,
            "exit",
        );
        assert_eq!(blamed(&timeout), [(7, 0, Outcome::TimedOut)]);
        // The overrunning task ended as the kill landed: its successor is innocent.
        let late = blame(
            Some(Kill::Sync(7, 0, "t".into())),
            Some((7, 1)),
            &batches,
            "exit",
        );
        assert!(blamed(&late).is_empty());
    }

    #[test]
    fn one_started_async_task_answers_several_become_suspects() {
        let one = vec![(3, batch(&[(0, false), (1, false)], &[(1, 0)]))];
        assert_eq!(
            blamed(&blame(None, None, &one, "x")),
            [(3, 1, Outcome::Crashed)]
        );
        let two = vec![(3, batch(&[(0, false), (1, false)], &[(0, 0), (1, 0)]))];
        match blame(None, None, &two, "x") {
            Blame::Suspects(Some(set)) => assert_eq!(set.len(), 2),
            other => panic!("expected suspects, got {other:?}"),
        }
    }

    #[test]
    fn a_death_between_tasks_makes_suspects_and_a_lone_suspect_answers() {
        let between = vec![(1, batch(&[(0, false), (1, false)], &[]))];
        assert!(matches!(
            blame(None, None, &between, "x"),
            Blame::Suspects(None)
        ));
        let alone = vec![(2, batch(&[(0, true)], &[]))];
        assert_eq!(
            blamed(&blame(None, None, &alone, "x")),
            [(2, 0, Outcome::Crashed)]
        );
    }

    #[test]
    fn overdue_async_tasks_answer_for_a_blocked_loop_kill() {
        let batches = vec![(4, batch(&[(0, false), (1, false)], &[(0, 5), (1, 9)]))];
        let kill = Kill::Async(vec![(4, 0, "blocked".into())]);
        assert_eq!(
            blamed(&blame(Some(kill), None, &batches, "x")),
            [(4, 0, Outcome::TimedOut)]
        );
    }

    #[test]
    fn prefetch_holds_about_fifty_ms_of_work_capped() {
        let mut pace = Pace::default();
        assert_eq!(pace.limit(512, 1), 1 + FIRST_PREFETCH);
        assert_eq!(pace.limit(512, 100), 100 + FIRST_PREFETCH);
        pace.observe(1_000, 1000, 1); // 1 µs tasks
        assert_eq!(pace.limit(512, 1), 512);
        let mut pace = Pace::default();
        pace.observe(10_000, 10, 1); // 1 ms tasks
        assert_eq!(pace.limit(512, 1), 51);
        let mut pace = Pace::default();
        pace.observe(2_000_000, 1, 1); // 2 s tasks
        assert_eq!(pace.limit(512, 1), 2);
        let mut pace = Pace::default();
        pace.observe(200_000_000, 100, 100); // async, 2 s each, 100 at once
        assert_eq!(pace.limit(512, 100), 103);
    }
}
