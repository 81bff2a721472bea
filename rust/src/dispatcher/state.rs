//! The dispatcher's bookkeeping: tasks taken from Redis, batches handed to
//! actors, and what each finished task needs written back.
//!
//! Nothing here waits or talks to Redis; the event loop in `mod.rs` feeds it
//! and ships `take_outcomes()` to the writer.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use log::{info, warn};

use super::{now_ms, DispatcherConfig, Report};
use crate::backoff::Backoff;
use crate::envelope::{self, RawEntry};
use crate::frame::{self, FailureKind};
use crate::keys::Keys;
use crate::region::{Region, SLOT_LOST, SLOT_RUNNING, SLOT_STARTING};
use crate::streams::{DeadLetter, Durations, QueueOutcomes, QueueSpec};

/// A task taken from Redis: pending in our consumer until we ack it.
#[derive(Debug)]
pub struct Taken {
    /// Index of its queue.
    pub queue: u16,
    /// The entry as read.
    pub entry: RawEntry,
    /// When we took it (to keep long-held entries fresh).
    pub since: Instant,
    /// Set when the task is handed to an actor (its fields were parsed then),
    /// so finishing it needs no second look at the fields.
    flags: Flags,
}

/// What finishing a task must also do, learnt when it was parsed.
#[derive(Debug, Clone, Copy, Default)]
struct Flags {
    /// It holds a unique-key lock to release.
    unique: bool,
    /// Its id is the caller's: write a done marker on success.
    idempotent: bool,
    /// Index of its `type` field, for counting by type without a search.
    kind_at: usize,
}

/// One item of an actor's run-times report: queue index, type, seconds in
/// all, `(bucket, runs)` pairs.
type DurationsItem = (u16, String, f64, Vec<(u32, u64)>);

/// The task type of an entry (empty when missing).
fn kind_of(entry: &RawEntry) -> &[u8] {
    entry.get(envelope::field::TYPE).unwrap_or_default()
}

impl Taken {
    /// A task taken at `since` (one clock read serves a whole read's batch).
    #[must_use]
    pub fn new(queue: u16, entry: RawEntry, since: Instant) -> Self {
        Self {
            queue,
            entry,
            since,
            flags: Flags::default(),
        }
    }

    fn label(&self) -> String {
        let id = self
            .entry
            .get(envelope::field::ID)
            .map(|id| String::from_utf8_lossy(id).into_owned())
            .unwrap_or_default();
        format!("{id} (entry {})", self.entry.id_text())
    }
}

/// Tasks handed to one actor in one frame.
struct Batch {
    slot: usize,
    tasks: Vec<Option<Taken>>,
    left: usize,
}

/// How a run ended without success.
pub struct Failed<'a> {
    /// Short cause for dead letters.
    pub reason: &'static str,
    /// Error text.
    pub message: &'a [u8],
    /// Traceback, may be empty.
    pub traceback: &'a [u8],
    /// Requested delay before the next run (`Retry(delay=...)`), ms.
    pub delay_ms: Option<u64>,
    /// Whether retries are allowed at all (`Reject` says no).
    pub retry: bool,
}

/// The dispatcher's state.
pub struct Dispatcher<'r> {
    region: &'r Region,
    config: DispatcherConfig,
    keys: Keys,
    backoff: Backoff,
    /// The queues served, in the order the engine gave them.
    pub queues: Arc<Vec<QueueSpec>>,
    /// Taken and not yet handed to an actor.
    pub backlog: VecDeque<Taken>,
    batches: HashMap<u64, Batch>,
    outstanding: Vec<usize>,
    next_batch_id: u64,
    frame: Vec<u8>,
    outcomes: Vec<QueueOutcomes>,
    /// Slots whose actor we killed for a timeout, with the reason text.
    timed_out: HashMap<usize, String>,
    last_refresh: Instant,
    /// Counts for the final report.
    pub report: Report,
}

impl<'r> Dispatcher<'r> {
    /// Fresh state for `region`.
    #[must_use]
    pub fn new(region: &'r Region, config: DispatcherConfig, queues: Vec<QueueSpec>) -> Self {
        let slots = region.layout().slots;
        let queue_count = queues.len();
        Self {
            region,
            keys: Keys::new(&config.prefix),
            backoff: Backoff {
                base_ms: config.retry_base_ms,
                max_ms: config.retry_max_ms,
            },
            config,
            queues: Arc::new(queues),
            backlog: VecDeque::new(),
            batches: HashMap::new(),
            outstanding: vec![0; slots],
            next_batch_id: 1,
            frame: Vec::with_capacity(64 * 1024),
            outcomes: vec![QueueOutcomes::default(); queue_count],
            timed_out: HashMap::new(),
            last_refresh: Instant::now(),
            report: Report::default(),
        }
    }

    fn slot_usable(&self, slot: usize) -> bool {
        let state = self.region.slot(slot).state.load(Ordering::SeqCst);
        state == SLOT_STARTING || state == SLOT_RUNNING
    }

    /// Tasks we could still take without exceeding any actor's prefetch.
    #[must_use]
    pub fn credit(&self) -> usize {
        let room: usize = (0..self.outstanding.len())
            .filter(|slot| self.slot_usable(*slot))
            .map(|slot| self.config.prefetch.saturating_sub(self.outstanding[slot]))
            .sum();
        room.saturating_sub(self.backlog.len())
    }

    /// Tasks taken and not finished.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.backlog.len() + self.batches.values().map(|batch| batch.left).sum::<usize>()
    }

    /// Takes `entries` (our own pending entries, re-read after a lost
    /// reply) except those we already hold; returns how many were new.
    pub fn take_back_unheld(&mut self, entries: Vec<(u16, RawEntry)>) -> usize {
        let held: std::collections::HashSet<Bytes> = self
            .backlog
            .iter()
            .chain(
                self.batches
                    .values()
                    .flat_map(|batch| batch.tasks.iter().flatten()),
            )
            .map(|taken| taken.entry.entry_id.clone())
            .collect();
        let before = self.backlog.len();
        let now = Instant::now();
        self.backlog.extend(
            entries
                .into_iter()
                .filter(|(_, entry)| !held.contains(&entry.entry_id))
                .map(|(queue, entry)| Taken::new(queue, entry, now)),
        );
        self.backlog.len() - before
    }

    fn queue_name(&self, queue: u16) -> &str {
        &self.queues[queue as usize].name
    }

    /// Queues the release of the task's unique-key lock. `parsed` says the
    /// flags are known (then a task without a key costs no field lookup).
    fn release_unique(&mut self, taken: &Taken, parsed: bool) {
        if parsed && !taken.flags.unique {
            return;
        }
        let (Some(key), Some(id)) = (
            taken.entry.get(envelope::field::UNIQUE_KEY),
            taken.entry.get(envelope::field::ID),
        ) else {
            return;
        };
        let lock = self
            .keys
            .unique(self.queue_name(taken.queue), &String::from_utf8_lossy(key));
        self.outcomes[taken.queue as usize]
            .unlock
            .push((lock, Bytes::copy_from_slice(id)));
    }

    /// A run succeeded.
    /// Only tasks that went through an actor succeed, so their flags are set.
    pub fn done(&mut self, taken: Taken) {
        self.release_unique(&taken, true);
        let outcome = &mut self.outcomes[taken.queue as usize];
        if taken.flags.idempotent {
            if let Some(id) = taken.entry.get(envelope::field::ID) {
                outcome.done_ids.push(Bytes::copy_from_slice(id));
            }
        }
        let kind = taken
            .entry
            .fields
            .get(taken.flags.kind_at)
            .map_or(&b""[..], |(_, kind)| kind);
        outcome.type_counts(kind).processed += 1;
        outcome.finished.push(taken.entry.entry_id);
        outcome.processed += 1;
        self.report.processed += 1;
    }

    /// A delivery of a task whose id is already done: ack it without running.
    pub fn skip_done(&mut self, taken: Taken) {
        let outcome = &mut self.outcomes[taken.queue as usize];
        outcome.finished.push(taken.entry.entry_id);
        outcome.skipped += 1;
        self.report.skipped += 1;
    }

    /// Moves a task to the dead letters. `ran` says whether this was a run
    /// (it then counts as a failed attempt).
    pub fn dead(
        &mut self,
        taken: Taken,
        reason: &'static str,
        error: Vec<u8>,
        traceback: Vec<u8>,
        ran: bool,
    ) {
        self.release_unique(&taken, false);
        let attempts =
            envelope::parse(&taken.entry).map_or(0, |task| task.attempt + u32::from(ran));
        let outcome = &mut self.outcomes[taken.queue as usize];
        outcome.finished.push(taken.entry.entry_id.clone());
        let counts = outcome.type_counts(kind_of(&taken.entry));
        counts.dead += 1;
        if ran {
            counts.failed += 1;
            outcome.failed += 1;
            self.report.failed += 1;
        }
        outcome.dead_count += 1;
        self.report.dead += 1;
        outcome.dead.push(DeadLetter {
            entry: taken.entry,
            reason,
            error,
            traceback,
            attempts,
        });
    }

    /// A run failed: schedule the next one, or dead-letter the task once its
    /// retries are spent (or when retrying is not allowed).
    pub fn failed(&mut self, taken: Taken, failure: &Failed<'_>) {
        let (attempt, max_retry) = match envelope::parse(&taken.entry) {
            Ok(task) => (task.attempt, task.max_retry),
            Err(_) => (0, 0),
        };
        if !failure.retry || attempt >= max_retry {
            self.dead(
                taken,
                failure.reason,
                failure.message.to_vec(),
                failure.traceback.to_vec(),
                true,
            );
            return;
        }
        let delay = failure
            .delay_ms
            .unwrap_or_else(|| self.backoff.next_delay_ms(attempt));
        let fields = envelope::next_run_fields(&taken.entry, attempt + 1, failure.message);
        let outcome = &mut self.outcomes[taken.queue as usize];
        if delay == 0 {
            outcome.append.push(fields);
        } else {
            let member = envelope::delayed_member(
                fields
                    .iter()
                    .map(|(name, value)| (name.as_ref(), value.as_ref())),
            );
            outcome.delayed.push((now_ms() + delay, member));
        }
        let counts = outcome.type_counts(kind_of(&taken.entry));
        counts.failed += 1;
        counts.retried += 1;
        outcome.finished.push(taken.entry.entry_id);
        outcome.failed += 1;
        outcome.retried += 1;
        self.report.failed += 1;
        self.report.retried += 1;
    }

    /// Hands a taken task back to the stream unchanged (graceful stop).
    pub fn hand_back(&mut self, taken: Taken) {
        let outcome = &mut self.outcomes[taken.queue as usize];
        outcome.append.push(taken.entry.fields);
        outcome.finished.push(taken.entry.entry_id);
        self.report.handed_back += 1;
    }

    /// Hands back everything not yet given to an actor.
    pub fn hand_back_backlog(&mut self) {
        while let Some(taken) = self.backlog.pop_front() {
            self.hand_back(taken);
        }
    }

    /// Hands as much of the backlog to actors as their prefetch and rings allow.
    pub fn pump(&mut self) {
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
            if taken.entry.fields.is_empty() {
                // Deleted while pending (seen when re-reading our history):
                // nothing to run, just drop it from the group.
                self.outcomes[taken.queue as usize]
                    .finished
                    .push(taken.entry.entry_id);
                continue;
            }
            let verdict = match envelope::parse_indexed(&taken.entry) {
                Err(error) => Err(("invalid", error.to_string())),
                Ok((task, _)) if task.deadline_ms.is_some_and(|deadline| deadline <= now) => Err((
                    "expired",
                    "deadline passed before the task could run".to_owned(),
                )),
                Ok((task, kind_at)) => {
                    let length = frame::task_record_len(&task);
                    if frame::TASK_FRAME_OVERHEAD + length > max_frame {
                        Err((
                            "too_large",
                            format!(
                                "task of {length} bytes does not fit the actor ring (at most {max_frame} bytes; raise ring_bytes)"
                            ),
                        ))
                    } else if self.frame.len() + length > max_frame {
                        Ok(None)
                    } else {
                        frame::push_task(&mut self.frame, taken.queue, &task);
                        Ok(Some(Flags {
                            unique: task.unique_key.is_some(),
                            idempotent: task.idempotent,
                            kind_at,
                        }))
                    }
                }
            };
            match verdict {
                Ok(Some(flags)) => {
                    let mut taken = taken;
                    taken.flags = flags;
                    tasks.push(Some(taken));
                }
                Ok(None) => {
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
    pub fn collect_results(&mut self) {
        for slot in 0..self.outstanding.len() {
            self.collect_slot(slot);
        }
    }

    fn collect_slot(&mut self, slot: usize) {
        let ring = self.region.result_ring(slot);
        let mut any = false;
        loop {
            let applied = ring.read_frame(|bytes| {
                if let Some(report) = frame::read_durations(bytes) {
                    self.apply_durations(slot, report);
                    return;
                }
                match frame::read_results(bytes) {
                    Ok(results) => self.apply_results(slot, &results),
                    Err(error) => {
                        warn!("actor {slot} sent a bad result frame, ignoring it: {error}");
                    }
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

    /// Adds an actor's handler run times to the outcomes of their queues.
    fn apply_durations(&mut self, slot: usize, report: &[u8]) {
        let parsed: Result<Vec<DurationsItem>, _> = serde_json::from_slice(report);
        let Ok(items) = parsed else {
            warn!("actor {slot} sent unreadable run times, ignoring them");
            return;
        };
        for (queue, kind, sum, buckets) in items {
            if let Some(outcome) = self.outcomes.get_mut(queue as usize) {
                outcome.add_durations(Durations { kind, sum, buckets });
            }
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
            let Some(failure) = failure else {
                self.done(taken);
                continue;
            };
            match failure.kind {
                FailureKind::UnknownType => self.dead(
                    taken,
                    "unknown_type",
                    failure.message.to_vec(),
                    Vec::new(),
                    false,
                ),
                FailureKind::Invalid => {
                    self.dead(
                        taken,
                        "invalid",
                        failure.message.to_vec(),
                        Vec::new(),
                        false,
                    );
                }
                FailureKind::NotStarted => self.hand_back(taken),
                FailureKind::Reject | FailureKind::Error | FailureKind::Retry => {
                    let kind = failure.kind;
                    self.failed(
                        taken,
                        &Failed {
                            reason: if kind == FailureKind::Reject {
                                "rejected"
                            } else {
                                "error"
                            },
                            message: failure.message,
                            traceback: failure.traceback,
                            delay_ms: (kind == FailureKind::Retry).then_some(failure.delay_ms),
                            retry: kind != FailureKind::Reject,
                        },
                    );
                }
            }
        }
    }

    /// Takes back the tasks of actors the supervisor saw die: the one that was
    /// running counts a failed attempt; the others go back first in line.
    pub fn reclaim_lost_slots(&mut self) {
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
                        warn!("task {} died with its actor: {reason}", taken.label());
                        let kind = if reason.starts_with("timeout") {
                            "timeout"
                        } else {
                            "crashed"
                        };
                        self.failed(
                            taken,
                            &Failed {
                                reason: kind,
                                message: reason.as_bytes(),
                                traceback: b"",
                                delay_ms: None,
                                retry: true,
                            },
                        );
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
            self.report.restarts += 1;
            self.region.reclaim(slot);
            info!("actor slot {slot} reclaimed ({reason})");
        }
    }

    /// Kills actors whose running task passed its hard timeout.
    pub fn enforce_timeouts(&mut self) {
        let now = crate::region::monotonic_ms();
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
                    "timeout: the handler ran longer than {}s",
                    envelope::format_seconds(limit)
                ),
            );
            warn!("actor {slot} (pid {pid}) passed its task timeout; killing it");
            if pid > 0 {
                // SAFETY: kill(2) on the actor's pid; the supervisor reaps it
                // only after it saw it exit, so the pid is not reused before.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }

    /// Every `claim_stale_after / 3`, lists the entries we have held longer
    /// than that, so the writer resets their idle time: a live engine's long
    /// task is never claimed by another.
    pub fn refresh_held(&mut self) {
        let period = Duration::from_millis(self.config.claim_stale_after_ms / 3)
            .max(Duration::from_millis(50));
        if self.last_refresh.elapsed() < period {
            return;
        }
        self.last_refresh = Instant::now();
        let held = self.backlog.iter().chain(
            self.batches
                .values()
                .flat_map(|batch| batch.tasks.iter().flatten()),
        );
        for taken in held {
            if taken.since.elapsed() >= period {
                self.outcomes[taken.queue as usize]
                    .refresh
                    .push(taken.entry.entry_id.clone());
            }
        }
    }

    /// Whatever piled up for the writer since the last call.
    pub fn take_outcomes(&mut self) -> Option<Vec<QueueOutcomes>> {
        if self.outcomes.iter().all(QueueOutcomes::is_empty) {
            return None;
        }
        let fresh = vec![QueueOutcomes::default(); self.outcomes.len()];
        Some(std::mem::replace(&mut self.outcomes, fresh))
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
