//! The outcome book: what finished tasks need written back, per queue, and
//! the engine's counts. Each task's outcome goes through the retry policy
//! here; nothing here waits or talks to Redis (the writer ships `take()`).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::now_ms;
use super::retry::{Decision, RetryPolicy};
use super::taken::Taken;
use crate::connection::Endpoint;
use crate::envelope::{self, TaskRef};
use crate::history::{Event, Events};
use crate::keys::Keys;
use crate::outcome::Outcome;
use crate::streams::{Completed, DeadLetter, Durations, Ended, QueueOutcomes, QueueSpec};

/// What a dispatcher run did. The supervisor adds these up across the
/// dispatcher's lives (they are published into the shared region).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
    /// Tasks cancelled (`Client.cancel`), run or not.
    pub cancelled: u64,
    /// Tasks held back by a global limit (back to the delayed set, their
    /// attempt unchanged).
    pub throttled: u64,
}

impl Report {
    /// The names of the counts, in `to_array` order.
    pub const NAMES: [&'static str; 10] = [
        "processed",
        "failed",
        "retried",
        "dead",
        "skipped",
        "handed_back",
        "left_pending",
        "restarts",
        "cancelled",
        "throttled",
    ];

    /// The counts in `NAMES` order.
    #[must_use]
    pub fn to_array(&self) -> [u64; 10] {
        [
            self.processed,
            self.failed,
            self.retried,
            self.dead,
            self.skipped,
            self.handed_back,
            self.left_pending,
            self.restarts,
            self.cancelled,
            self.throttled,
        ]
    }

    /// A report from counts in `NAMES` order.
    #[must_use]
    pub fn from_array(counts: [u64; 10]) -> Self {
        let [processed, failed, retried, dead, skipped, handed_back, left_pending, restarts, cancelled, throttled] =
            counts;
        Self {
            processed,
            failed,
            retried,
            dead,
            skipped,
            handed_back,
            left_pending,
            restarts,
            cancelled,
            throttled,
        }
    }
}

/// How a run ended, as the book needs it: a success (with its return
/// value when the task keeps its result) or a failure with its texts.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The outcome.
    pub outcome: Outcome,
    /// Error text.
    pub message: &'a [u8],
    /// Traceback, may be empty.
    pub traceback: &'a [u8],
    /// Delay the handler asked for (`Retry(delay=...)`), ms.
    pub delay_ms: Option<u64>,
    /// A success's return value (JSON; empty when not sent).
    pub value: &'a [u8],
}

impl<'a> Failure<'a> {
    /// A failure with a message and nothing else.
    #[must_use]
    pub fn new(outcome: Outcome, message: &'a [u8]) -> Self {
        Self {
            outcome,
            message,
            traceback: b"",
            delay_ms: None,
            value: b"",
        }
    }
}

/// The outcome book.
pub struct Book {
    keys: Keys,
    queues: Arc<Vec<QueueSpec>>,
    policy: RetryPolicy,
    outcomes: Vec<QueueOutcomes>,
    /// Counts since the dispatcher started.
    pub totals: Report,
    /// Counts not yet published to the shared region.
    fresh: Report,
    /// Task ids cancelled (`Client.cancel`) per queue index, with when the
    /// record expires (ms since the epoch): their tasks end as cancelled
    /// whatever else comes of them, except a success.
    cancelled: HashMap<(u16, Bytes), u64>,
    /// This engine's (consumer) name.
    worker: String,
    /// Whether it records task history.
    history: bool,
    /// With Sentinel: the endpoint whose generation says which master the
    /// outcomes are written to (see [`Book::current`]).
    failover: Option<Endpoint>,
    /// Tasks read from an earlier master whose outcomes were not booked,
    /// since the last call of [`Book::take_stale`].
    stale: Vec<(u16, Bytes)>,
    /// The generation of the first outcome booked since the last
    /// [`Book::take`]: the master the batch is meant for.
    booked_at: Option<u64>,
}

impl Book {
    /// An empty book for `queues`.
    #[must_use]
    pub fn new(keys: Keys, queues: Arc<Vec<QueueSpec>>, policy: RetryPolicy) -> Self {
        let count = queues.len();
        Self {
            keys,
            queues,
            policy,
            outcomes: vec![QueueOutcomes::default(); count],
            totals: Report::default(),
            fresh: Report::default(),
            cancelled: HashMap::new(),
            worker: String::new(),
            history: false,
            failover: None,
            stale: Vec::new(),
            booked_at: None,
        }
    }

    /// Follows the master the sentinels name: from now on only the outcomes
    /// of tasks read from the master of the endpoint's current generation
    /// are booked.
    pub fn follow_failover(&mut self, endpoint: Endpoint) {
        self.failover = endpoint.follows_failover().then_some(endpoint);
    }

    /// `taken`, unless it was read from a master the sentinels no longer
    /// name. Entry ids are made by each master from its clock: once both
    /// took writes (the old one until it is demoted), an id read from the
    /// old one can name another task on the new one, and acking it there
    /// would delete that task unrun. So nothing of such a task is booked:
    /// it is pending on the new master (taken back, run again) or was
    /// never delivered there (read again), or it was the old master's
    /// alone. At least once, never lost. Remembered for [`Book::take_stale`].
    fn current(&mut self, taken: Taken) -> Option<Taken> {
        let Some(endpoint) = &self.failover else {
            return Some(taken);
        };
        let now = endpoint.generation();
        if taken.generation != now {
            self.stale.push((taken.queue, taken.entry.entry_id));
            self.count(|report| report.left_pending += 1);
            return None;
        }
        self.booked_at.get_or_insert(now);
        Some(taken)
    }

    /// The tasks left unbooked as read from an earlier master, since the
    /// last call.
    pub fn take_stale(&mut self) -> Vec<(u16, Bytes)> {
        std::mem::take(&mut self.stale)
    }

    /// The generation of the master the outcomes taken last are meant for:
    /// that of their first booking, else the endpoint's now (0 without
    /// Sentinel).
    pub fn take_generation(&mut self) -> u64 {
        let now = self.failover.as_ref().map_or(0, Endpoint::generation);
        self.booked_at.take().unwrap_or(now)
    }

    /// Names this engine in history events and kept summaries.
    pub fn set_worker(&mut self, worker: &str) {
        worker.clone_into(&mut self.worker);
    }

    /// Keeps the summary of a task that ended (`state`) when it asks for
    /// one (`retention`): its type, payload, labels, runs, times and engine,
    /// then `detail`'s fields (result, or reason and error).
    fn keep_summary(
        &mut self,
        taken: &Taken,
        state: &str,
        attempts: u32,
        detail: impl FnOnce(&mut Event<'_>),
    ) {
        let retention_ms = if taken.flags.parsed {
            taken.flags.retention_ms
        } else {
            envelope::parse(&taken.entry).map_or(0, |task| task.retention_ms)
        };
        if retention_ms == 0 {
            return;
        }
        let Ok(task) = envelope::parse(&taken.entry) else {
            return;
        };
        let now = now_ms();
        let mut summary = Vec::with_capacity(256 + task.payload.len());
        let mut written = Event::object(&mut summary, task.id.as_bytes());
        written
            .text("state", state.as_bytes())
            .text("type", task.kind.as_bytes())
            .long_text("payload", task.payload, false);
        if let Some(labels) = task.labels {
            written.text("labels", labels);
        }
        written
            .number("attempts", u64::from(attempts))
            .number("enqueued_at", task.enqueued_at_ms);
        if taken.started_ms > 0 {
            written.number("started_at", taken.started_ms);
        }
        written
            .number("finished_at", now)
            .text("worker", self.worker.as_bytes());
        detail(&mut written);
        written.end();
        self.outcomes[usize::from(taken.queue)]
            .completed
            .push(Completed {
                id: Bytes::copy_from_slice(task.id.as_bytes()),
                expires_ms: now + retention_ms,
                summary,
            });
    }

    /// Records every task's lifecycle from now on (`crate::history`), as
    /// engine `worker`.
    pub fn record_history(&mut self, worker: &str) {
        self.set_worker(worker);
        self.history = true;
    }

    /// Books a history event of `taken` (when recording): its id, attempt,
    /// time and engine, the run time when it was handed to an actor, else
    /// the task's own fields (its only event may be this one), then
    /// `detail`'s fields.
    fn record(&mut self, taken: &Taken, event: &str, detail: impl FnOnce(&mut Event<'_>)) {
        if !self.history {
            return;
        }
        let worker = &self.worker;
        let now = now_ms();
        let id = taken.entry.get(envelope::field::ID).unwrap_or_default();
        let events = &mut self.outcomes[usize::from(taken.queue)].events;
        if taken.flags.parsed && taken.started_ms > 0 {
            // Handed to an actor: its started event has its fields.
            let mut written = events.begin(event, id, taken.flags.attempt, now, worker);
            written.number("d", now.saturating_sub(taken.started_ms));
            detail(&mut written);
            written.end();
            return;
        }
        let task = envelope::parse(&taken.entry);
        let attempt = task.as_ref().map_or(0, |task| task.attempt);
        let mut written = events.begin(event, id, attempt, now, worker);
        if taken.started_ms > 0 {
            written.number("d", now.saturating_sub(taken.started_ms));
        } else if let Ok(task) = &task {
            task_fields(&mut written, task);
        } else {
            written.text("k", taken.kind());
            if let Some(payload) = taken.entry.get(envelope::field::PAYLOAD) {
                written.long_text("p", payload, false);
            }
        }
        detail(&mut written);
        written.end();
    }

    /// Writes the `started` event of `task` (of queue `queue`, handed to an
    /// actor at `at_ms`) into `into`, when recording: with the task's own
    /// fields, so a task whose enqueue was not recorded is complete in the
    /// history from here. Booked by [`Book::add_events`] once the batch is
    /// in its ring (made from the parse the hand-over did anyway).
    pub fn start_event(
        &self,
        into: &mut Vec<(u16, Events)>,
        queue: u16,
        task: &TaskRef<'_>,
        at_ms: u64,
    ) {
        if !self.history {
            return;
        }
        let at = if let Some(at) = into.iter().position(|(known, _)| *known == queue) {
            at
        } else {
            into.push((queue, Events::default()));
            into.len() - 1
        };
        let mut written = into[at].1.begin(
            "started",
            task.id.as_bytes(),
            task.attempt,
            at_ms,
            &self.worker,
        );
        task_fields(&mut written, task);
        written.end();
    }

    /// Books events made aside (see [`Book::start_event`]), leaving `events`
    /// empty.
    pub fn add_events(&mut self, events: &mut Vec<(u16, Events)>) {
        for (queue, made) in events.drain(..) {
            if let Some(outcome) = self.outcomes.get_mut(usize::from(queue)) {
                outcome.events.merge(made);
            }
        }
    }

    /// Books a failed run (`failure`) of `taken`, when recording.
    fn record_failed(&mut self, taken: &Taken, failure: &Failure<'_>) {
        self.record(taken, "failed", |event| {
            event
                .text("r", failure.outcome.name().as_bytes())
                .long_text("x", failure.message, false)
                .long_text("tb", failure.traceback, true);
        });
    }

    /// Records that task `id` of queue `queue` is cancelled until
    /// `expires_ms`. Returns false when it was known already.
    pub fn add_cancelled(&mut self, queue: u16, id: Bytes, expires_ms: u64) -> bool {
        self.cancelled.insert((queue, id), expires_ms).is_none()
    }

    /// Forgets cancel records past their lifetime.
    pub fn prune_cancelled(&mut self, now_ms: u64) {
        self.cancelled.retain(|_, expires| *expires > now_ms);
    }

    /// Whether `taken`'s task id was cancelled (free while none is).
    #[must_use]
    pub fn is_cancelled(&self, taken: &Taken) -> bool {
        if self.cancelled.is_empty() {
            return false;
        }
        taken.entry.get(envelope::field::ID).is_some_and(|id| {
            self.cancelled
                .contains_key(&(taken.queue, Bytes::copy_from_slice(id)))
        })
    }

    /// Ends a task as cancelled: acked, counted, its unique key released and
    /// its kept outcome (when it keeps one) says so. No retry, no dead letter.
    pub fn cancel(&mut self, taken: Taken, ran: bool) {
        let Some(taken) = self.current(taken) else {
            return;
        };
        self.record(&taken, "cancelled", |_| {});
        self.end_final(
            &taken,
            ran,
            "cancelled",
            Outcome::Cancelled.name(),
            b"cancelled",
            b"",
        );
        let outcome = &mut self.outcomes[usize::from(taken.queue)];
        outcome.type_counts(taken.kind()).cancelled += 1;
        outcome.finished.push(taken.entry.entry_id);
        outcome.cancelled += 1;
        self.count(|report| report.cancelled += 1);
    }

    /// What every final end (dead or cancelled) does first: releases the
    /// unique key and keeps the outcome when the task asks for one. Returns
    /// the attempts the task made.
    fn end_final(
        &mut self,
        taken: &Taken,
        ran: bool,
        state: &'static str,
        reason: &'static str,
        error: &[u8],
        traceback: &[u8],
    ) -> u32 {
        self.release_unique(taken);
        let task = envelope::parse(&taken.entry).ok();
        let attempts = task
            .as_ref()
            .map_or(0, |task| task.attempt + u32::from(ran));
        let result_ttl_ms = task.map_or(0, |task| task.result_ttl_ms);
        self.keep_summary(taken, state, attempts, |summary| {
            summary
                .text("reason", reason.as_bytes())
                .long_text("error", error, false)
                .long_text("traceback", traceback, true);
        });
        if result_ttl_ms > 0 {
            self.keep_outcome(
                taken,
                result_ttl_ms,
                Ended {
                    id: Bytes::new(),
                    ttl_ms: 0,
                    state,
                    value: Vec::new(),
                    reason,
                    error: error.to_vec(),
                    traceback: traceback.to_vec(),
                    attempts,
                },
            );
        }
        attempts
    }

    fn count(&mut self, change: impl Fn(&mut Report)) {
        change(&mut self.totals);
        change(&mut self.fresh);
    }

    /// Counts handed out since the last call (to publish them).
    pub fn take_fresh(&mut self) -> Report {
        std::mem::take(&mut self.fresh)
    }

    /// An actor died and is replaced.
    pub fn count_restart(&mut self) {
        self.count(|report| report.restarts += 1);
    }

    /// Tasks still running at the shutdown deadline.
    pub fn count_left_pending(&mut self, tasks: u64) {
        self.count(|report| report.left_pending += tasks);
    }

    fn queue_of(&mut self, taken: &Taken) -> &mut QueueOutcomes {
        &mut self.outcomes[usize::from(taken.queue)]
    }

    /// Ends a delivery with `outcome` (`Succeeded`, or a failure with its
    /// texts): acked, retried, dead-lettered or handed back, by the policy.
    pub fn finish(&mut self, taken: Taken, failure: &Failure<'_>) {
        let Some(taken) = self.current(taken) else {
            return;
        };
        if failure.outcome == Outcome::Succeeded {
            self.succeed(taken, failure.value);
            return;
        }
        if failure.outcome != Outcome::Cancelled && self.is_cancelled(&taken) {
            // A cancelled task that failed, crashed, timed out or was not
            // started ends as cancelled, never retried.
            self.cancel(taken, failure.outcome.ran());
            return;
        }
        let (attempt, max_retry) = taken.attempts();
        let decision = self.policy.decide(
            failure.outcome,
            attempt,
            max_retry,
            failure.delay_ms,
            fastrand::f64(),
        );
        match decision {
            Decision::Done => self.done(taken),
            Decision::HandBack => self.hand_back(taken),
            Decision::Cancelled => self.cancel(taken, true),
            Decision::Dead => self.dead(taken, failure),
            Decision::Retry { delay_ms } => {
                if self.history {
                    if failure.outcome != Outcome::Retry {
                        self.record_failed(&taken, failure);
                    }
                    let due = now_ms() + delay_ms;
                    self.record(&taken, "retried", |event| {
                        event.number("u", due);
                        if failure.outcome == Outcome::Retry {
                            event.text("r", Outcome::Retry.name().as_bytes());
                        }
                    });
                }
                self.retry(taken, attempt, delay_ms, failure.message);
            }
        }
    }

    /// A run succeeded without a reported value (a range of plain
    /// successes).
    pub fn done(&mut self, taken: Taken) {
        let Some(taken) = self.current(taken) else {
            return;
        };
        self.succeed(taken, b"");
    }

    /// A run succeeded and returned `value` (JSON, empty = none). Only
    /// tasks that went through an actor succeed, so their flags are known.
    fn succeed(&mut self, taken: Taken, value: &[u8]) {
        let runs = if taken.flags.parsed {
            taken.attempts().0 + 1
        } else {
            1
        };
        self.keep_summary(&taken, "succeeded", runs, |summary| {
            if !value.is_empty() {
                summary.long_text("result", value, false);
            }
        });
        self.record(&taken, "succeeded", |event| {
            if !value.is_empty() {
                event.long_text("v", value, false);
            }
        });
        self.release_unique(&taken);
        if taken.flags.result_ttl_ms > 0 {
            let attempts = taken.attempts().0 + 1;
            self.keep_outcome(
                &taken,
                taken.flags.result_ttl_ms,
                Ended {
                    id: Bytes::new(),
                    ttl_ms: 0,
                    state: "succeeded",
                    value: if value.is_empty() {
                        b"null".to_vec()
                    } else {
                        value.to_vec()
                    },
                    reason: "",
                    error: Vec::new(),
                    traceback: Vec::new(),
                    attempts,
                },
            );
        }
        let outcome = &mut self.outcomes[usize::from(taken.queue)];
        if taken.flags.idempotent {
            if let Some(id) = taken.entry.get(envelope::field::ID) {
                outcome.done_ids.push(Bytes::copy_from_slice(id));
            }
        }
        outcome.type_counts(taken.kind()).processed += 1;
        outcome.finished.push(taken.entry.entry_id);
        outcome.processed += 1;
        self.count(|report| report.processed += 1);
    }

    /// A delivery of a task whose id is already done: ack it without running.
    pub fn skip_done(&mut self, taken: Taken) {
        let Some(taken) = self.current(taken) else {
            return;
        };
        let outcome = self.queue_of(&taken);
        outcome.finished.push(taken.entry.entry_id);
        outcome.skipped += 1;
        self.count(|report| report.skipped += 1);
    }

    /// An entry deleted while pending (no fields): drop it from the group.
    pub fn drop_deleted(&mut self, taken: Taken) {
        let Some(taken) = self.current(taken) else {
            return;
        };
        self.queue_of(&taken).finished.push(taken.entry.entry_id);
    }

    /// Moves a task to the dead letters with the failure's reason and texts.
    pub fn dead(&mut self, taken: Taken, failure: &Failure<'_>) {
        let Some(taken) = self.current(taken) else {
            return;
        };
        let ran = failure.outcome.ran();
        if self.history {
            if ran {
                self.record_failed(&taken, failure);
            }
            self.record(&taken, "dead", |event| {
                event.text("r", failure.outcome.name().as_bytes());
                if !ran {
                    event.long_text("x", failure.message, false);
                }
            });
        }
        let attempts = self.end_final(
            &taken,
            ran,
            "dead",
            failure.outcome.name(),
            failure.message,
            failure.traceback,
        );
        let outcome = &mut self.outcomes[usize::from(taken.queue)];
        outcome.finished.push(taken.entry.entry_id.clone());
        let counts = outcome.type_counts(taken.kind());
        counts.dead += 1;
        if ran {
            counts.failed += 1;
            outcome.failed += 1;
        }
        outcome.dead_count += 1;
        outcome.dead.push(DeadLetter {
            entry: taken.entry,
            reason: failure.outcome.name(),
            error: failure.message.to_vec(),
            traceback: failure.traceback.to_vec(),
            attempts,
        });
        self.count(|report| {
            report.dead += 1;
            report.failed += u64::from(ran);
        });
    }

    /// Schedules the next run of a failed task (attempt + 1, carrying the error).
    fn retry(&mut self, taken: Taken, attempt: u32, delay_ms: u64, error: &[u8]) {
        let fields = envelope::next_run_fields(&taken.entry, attempt + 1, error);
        let outcome = &mut self.outcomes[usize::from(taken.queue)];
        if delay_ms == 0 {
            outcome.append.push(fields);
        } else {
            let member = envelope::delayed_member(
                fields
                    .iter()
                    .map(|(name, value)| (name.as_ref(), value.as_ref())),
            );
            outcome.delayed.push((now_ms() + delay_ms, member));
        }
        let counts = outcome.type_counts(taken.kind());
        counts.failed += 1;
        counts.retried += 1;
        outcome.finished.push(taken.entry.entry_id);
        outcome.failed += 1;
        outcome.retried += 1;
        self.count(|report| {
            report.failed += 1;
            report.retried += 1;
        });
    }

    /// A task that did not run and goes back to wait, if it should: an entry
    /// deleted while pending is dropped and a cancelled task ends as
    /// cancelled instead (`None` then).
    fn still_to_run(&mut self, taken: Taken) -> Option<Taken> {
        let taken = self.current(taken)?;
        if taken.entry.fields.is_empty() {
            self.drop_deleted(taken);
            return None;
        }
        if self.is_cancelled(&taken) {
            self.cancel(taken, false);
            return None;
        }
        Some(taken)
    }

    /// Hands a taken task back to the stream unchanged (graceful stop).
    /// An entry deleted while pending (no fields) is only dropped: there is
    /// nothing to append (an `XADD` without fields would abort the queue's
    /// whole transaction).
    pub fn hand_back(&mut self, taken: Taken) {
        let Some(taken) = self.still_to_run(taken) else {
            return;
        };
        let outcome = self.queue_of(&taken);
        outcome.append.push(taken.entry.fields);
        outcome.finished.push(taken.entry.entry_id);
        self.count(|report| report.handed_back += 1);
    }

    /// Holds a task back for a global limit: acked and put in its queue's
    /// delayed set, due at `due_ms`, with its fields (and attempt)
    /// unchanged; its unique key stays held. Not a failure.
    pub fn throttle(&mut self, taken: Taken, due_ms: u64) {
        let Some(taken) = self.still_to_run(taken) else {
            return;
        };
        let member = envelope::delayed_member(
            taken
                .entry
                .fields
                .iter()
                .map(|(name, value)| (name.as_ref(), value.as_ref())),
        );
        let outcome = &mut self.outcomes[usize::from(taken.queue)];
        outcome.delayed.push((due_ms, member));
        outcome.type_counts(taken.kind()).throttled += 1;
        outcome.finished.push(taken.entry.entry_id);
        outcome.throttled += 1;
        self.count(|report| report.throttled += 1);
    }

    /// Keeps the outcome of a task enqueued with a `result_ttl` (`ended`
    /// without its id and lifetime, which come from the task).
    fn keep_outcome(&mut self, taken: &Taken, ttl_ms: u64, ended: Ended) {
        let Some(id) = taken.entry.get(envelope::field::ID) else {
            return;
        };
        self.outcomes[usize::from(taken.queue)].ended.push(Ended {
            id: Bytes::copy_from_slice(id),
            ttl_ms,
            ..ended
        });
    }

    /// Keeps one of our long-held entries (read from the master of
    /// `generation`) fresh, so nobody claims it.
    pub fn refresh(&mut self, queue: u16, entry_id: Bytes, generation: u64) {
        if let Some(endpoint) = &self.failover {
            let now = endpoint.generation();
            if now != generation {
                return;
            }
            self.booked_at.get_or_insert(now);
        }
        self.outcomes[usize::from(queue)].refresh.push(entry_id);
    }

    /// Adds an actor's handler run times to the outcomes of their queue.
    pub fn add_durations(&mut self, queue: u16, durations: Durations) {
        if let Some(outcome) = self.outcomes.get_mut(usize::from(queue)) {
            outcome.add_durations(durations);
        }
    }

    /// Queues the release of the task's unique-key lock. Known flags spare
    /// a task without a key the field lookup.
    fn release_unique(&mut self, taken: &Taken) {
        if taken.flags.parsed && !taken.flags.unique {
            return;
        }
        let (Some(key), Some(id)) = (
            taken.entry.get(envelope::field::UNIQUE_KEY),
            taken.entry.get(envelope::field::ID),
        ) else {
            return;
        };
        let queue = &self.queues[usize::from(taken.queue)].name;
        let lock = self.keys.unique(queue, &String::from_utf8_lossy(key));
        self.outcomes[usize::from(taken.queue)]
            .unlock
            .push((lock, Bytes::copy_from_slice(id)));
    }

    /// Whatever piled up for the writer since the last call.
    pub fn take(&mut self) -> Option<Vec<QueueOutcomes>> {
        if self.outcomes.iter().all(QueueOutcomes::is_empty) {
            return None;
        }
        let fresh = vec![QueueOutcomes::default(); self.outcomes.len()];
        Some(std::mem::replace(&mut self.outcomes, fresh))
    }
}

/// A task's own fields in a history event: type, payload, labels, when it
/// was enqueued and its retries.
fn task_fields(event: &mut Event<'_>, task: &TaskRef<'_>) {
    event
        .text("k", task.kind.as_bytes())
        .long_text("p", task.payload, false);
    if let Some(labels) = task.labels {
        event.text("l", labels);
    }
    event
        .number("q", task.enqueued_at_ms)
        .number("m", u64::from(task.max_retry));
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::backoff::Backoff;
    use crate::envelope::RawEntry;

    fn book() -> Book {
        let queues = Arc::new(vec![QueueSpec {
            name: "q".to_owned(),
            weight: 1,
            stream: "flumeq:{q}:stream".to_owned(),
        }]);
        let policy = RetryPolicy {
            backoff: Backoff {
                base_ms: 0,
                max_ms: 0,
            },
        };
        Book::new(Keys::default(), queues, policy)
    }

    fn taken(id: &str, attempt: u32, max_retry: u32) -> Taken {
        let fields = [
            ("id", id.to_owned()),
            ("type", "t".to_owned()),
            ("payload", "{}".to_owned()),
            ("attempt", attempt.to_string()),
            ("max_retry", max_retry.to_string()),
            ("unique_key", "k".to_owned()),
        ];
        let entry = RawEntry {
            entry_id: Bytes::from(format!("1-{attempt}")),
            fields: fields
                .into_iter()
                .map(|(name, value)| (Bytes::from(name), Bytes::from(value)))
                .collect(),
        };
        Taken::new(0, entry, Instant::now(), 0)
    }

    #[test]
    fn failures_retry_then_die_and_every_path_acks_the_entry() {
        let mut book = book();
        book.finish(taken("a", 0, 1), &Failure::new(Outcome::Failed, b"boom"));
        book.finish(taken("b", 1, 1), &Failure::new(Outcome::Crashed, b"killed"));
        book.finish(taken("c", 0, 5), &Failure::new(Outcome::NotStarted, b""));
        book.finish(taken("d", 0, 5), &Failure::new(Outcome::Invalid, b"bad"));
        let outcomes = book.take().expect("outcomes");
        let queue = &outcomes[0];
        assert_eq!(queue.finished.len(), 4);
        // a: retried now (zero backoff) with attempt 1 and its error; c: handed back.
        assert_eq!(queue.append.len(), 2);
        assert_eq!(
            queue.dead.iter().map(|d| d.reason).collect::<Vec<_>>(),
            ["crashed", "invalid"]
        );
        assert_eq!(queue.dead[0].attempts, 2, "the crash was its second run");
        assert_eq!(queue.dead[1].attempts, 0, "an invalid task never ran");
        assert_eq!((queue.failed, queue.retried, queue.dead_count), (2, 1, 2));
        // Both dead tasks held the unique key: released (flags unknown, so looked up).
        assert_eq!(queue.unlock.len(), 2);
        assert_eq!(
            book.totals,
            Report {
                failed: 2,
                retried: 1,
                dead: 2,
                handed_back: 1,
                ..Report::default()
            }
        );
        assert_eq!(book.take_fresh(), book.totals);
        assert_eq!(book.take_fresh(), Report::default());
        assert!(book.take().is_none());
    }

    #[test]
    fn with_sentinel_only_tasks_read_from_the_master_named_now_are_booked() {
        let mut book = book();
        let endpoint = Endpoint::parse("redis+sentinel://127.0.0.1:1/main").expect("url");
        book.follow_failover(endpoint);
        // Read from the master before (generation 1 is not the endpoint's
        // 0 here): nothing of it is written, whatever its end.
        let mut before = taken("old", 0, 1);
        before.generation = 1;
        book.finish(before, &Failure::new(Outcome::Failed, b"boom"));
        let mut held_back = taken("old2", 0, 1);
        held_back.generation = 1;
        book.throttle(held_back, 5);
        book.refresh(0, Bytes::from_static(b"1-0"), 1);
        assert!(book.take().is_none());
        assert_eq!(book.take_generation(), 0);
        let stale = book.take_stale();
        assert_eq!(stale.len(), 2);
        assert_eq!(book.totals.left_pending, 2);
        // Read from the master named now: booked, for that generation.
        book.done(taken("new", 0, 1));
        let outcomes = book.take().expect("outcomes");
        assert_eq!(outcomes[0].finished.len(), 1);
        assert_eq!(book.take_generation(), 0);
        assert!(book.take_stale().is_empty());
    }

    fn keeping(id: &str, attempt: u32) -> Taken {
        let mut taken = taken(id, attempt, 0);
        taken
            .entry
            .fields
            .push((Bytes::from("result_ttl"), Bytes::from("60")));
        taken.flags.result_ttl_ms = 60_000;
        taken.flags.parsed = true;
        taken
    }

    #[test]
    fn kept_outcomes_survive_merging_and_name_their_end() {
        let mut book = book();
        let success = Failure {
            value: b"[1,2]",
            ..Failure::new(Outcome::Succeeded, b"")
        };
        book.finish(keeping("v", 0), &success);
        book.done(keeping("r", 0));
        book.done(taken("plain", 0, 0));
        let mut first = book.take().expect("outcomes");
        book.finish(
            keeping("d", 2),
            &Failure::new(Outcome::BadResult, b"not JSON"),
        );
        let second = book.take().expect("outcomes");
        first[0].merge(second.into_iter().next().expect("one queue"));
        let ended = &first[0].ended;
        let summary: Vec<_> = ended
            .iter()
            .map(|e| {
                (
                    e.id.as_ref(),
                    e.state,
                    e.value.as_slice(),
                    e.reason,
                    e.attempts,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (&b"v"[..], "succeeded", &b"[1,2]"[..], "", 1),
                (&b"r"[..], "succeeded", &b"null"[..], "", 1),
                (&b"d"[..], "dead", &b""[..], "bad_result", 3),
            ]
        );
        assert!(ended.iter().all(|e| e.ttl_ms == 60_000));
        assert_eq!(first[0].dead[0].reason, "bad_result");
    }

    #[test]
    fn a_recording_book_books_each_step_of_a_tasks_life() {
        let mut book = book();
        book.record_history("pod-1");
        let mut first = taken("h", 0, 1);
        first.started_ms = 1;
        let mut made = Vec::new();
        let task = envelope::parse(&first.entry).expect("task");
        book.start_event(&mut made, 0, &task, 1);
        book.add_events(&mut made);
        book.finish(first, &Failure::new(Outcome::Failed, b"boom"));
        let mut second = taken("h", 1, 1);
        second.started_ms = 1;
        book.finish(
            second,
            &Failure {
                value: b"42",
                ..Failure::new(Outcome::Succeeded, b"")
            },
        );
        book.dead(
            taken("never", 0, 0),
            &Failure::new(Outcome::Invalid, b"bad"),
        );
        let outcomes = book.take().expect("outcomes");
        let events: serde_json::Value =
            serde_json::from_slice(&outcomes[0].events.to_json()).expect("json");
        let names: Vec<&str> = events
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|event| event["e"].as_str())
            .collect();
        assert_eq!(
            names,
            ["started", "failed", "retried", "succeeded", "dead"],
            "{events}"
        );
        assert_eq!(outcomes[0].events.count, 5);
        assert_eq!(events[0]["k"], "t");
        assert_eq!(events[0]["w"], "pod-1");
        assert_eq!(events[1]["x"], "boom");
        assert_eq!(events[3]["v"], "42");
        assert_eq!(events[3]["a"], 1);
        assert!(events[3].get("d").is_some());
        // Never handed to an actor: the dead event carries the task's fields.
        assert_eq!(events[4]["p"], "{}");
        assert_eq!(events[4]["r"], "invalid");
    }

    #[test]
    fn a_book_not_recording_books_no_event() {
        let mut book = book();
        book.done(taken("a", 0, 0));
        assert!(book.take().expect("outcomes")[0].events.is_empty());
    }

    #[test]
    fn tasks_with_a_retention_leave_a_summary_when_they_end() {
        let mut book = book();
        book.set_worker("pod-2");
        let with_retention = |id: &str| {
            let mut taken = taken(id, 0, 0);
            taken
                .entry
                .fields
                .push((Bytes::from_static(b"retention"), Bytes::from_static(b"60")));
            taken
        };
        book.finish(
            with_retention("kept"),
            &Failure {
                value: b"[1]",
                ..Failure::new(Outcome::Succeeded, b"")
            },
        );
        book.finish(
            with_retention("died"),
            &Failure::new(Outcome::Rejected, b"no"),
        );
        book.done(taken("plain", 0, 0));
        let outcomes = book.take().expect("outcomes");
        let completed = &outcomes[0].completed;
        assert_eq!(completed.len(), 2);
        let kept: serde_json::Value = serde_json::from_slice(&completed[0].summary).expect("json");
        assert_eq!(kept["id"], "kept");
        assert_eq!(kept["state"], "succeeded");
        assert_eq!(kept["type"], "t");
        assert_eq!(kept["payload"], "{}");
        assert_eq!(kept["worker"], "pod-2");
        let died: serde_json::Value = serde_json::from_slice(&completed[1].summary).expect("json");
        assert_eq!(died["state"], "dead");
        assert_eq!(died["reason"], "rejected");
        assert_eq!(died["error"], "no");
        assert!(completed[0].expires_ms >= now_ms() + 59_000);
    }
}
